"""Collectives with a deadline: the one place netcl.distributed talks to MPI.

Every collective is started non-blocking and polled until it completes or its
deadline passes. A rank that raised, hung or died never joins, so without a
deadline the others would wait forever; with one they report what they were
waiting for and abort the whole job (``MPI_Abort``), which also ends the rank
that failed. Polling backs off from a tight loop to 0.2 ms sleeps, so waiting
ranks leave the CPU to ranks still computing (several ranks often share a
node's cores).
"""

import os
import pickle
import sys
import time

import numpy as np

try:
    from mpi4py import MPI
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "netcl.distributed needs mpi4py and an MPI library: pip install \"netcl[mpi]\" "
        f"(mpi4py and the mpich wheel), or mpi4py built against your cluster's MPI ({exc})"
    ) from None

__all__ = ["Communicator", "DistributedError", "DistributedTimeoutError", "DEFAULT_TIMEOUT"]

#: Seconds a collective may wait for the other ranks (env NETCL_DISTRIBUTED_TIMEOUT).
DEFAULT_TIMEOUT = 300.0
_SPIN_SECONDS = 200e-6
_MAX_SLEEP = 200e-6
#: Pause between writing a timeout report and MPI_Abort: the launcher forwards
#: each rank's output through its own process and tears that down on an abort,
#: so without it the report was lost in about one abort in six (MPICH's Hydra).
_REPORT_SECONDS = 1.0

_MPI_TYPES = {np.dtype(np.float32): MPI.FLOAT, np.dtype(np.float64): MPI.DOUBLE,
              np.dtype(np.int64): MPI.INT64_T, np.dtype(np.uint32): MPI.UINT32_T,
              np.dtype(np.uint8): MPI.BYTE}


class DistributedError(RuntimeError):
    """Ranks disagree (layout, checkpoint set, parameters) or one of them failed."""


class DistributedTimeoutError(DistributedError):
    """A collective did not complete within the timeout (``on_timeout="raise"``)."""


def _timeout_from_env():
    text = os.environ.get("NETCL_DISTRIBUTED_TIMEOUT", "").strip()
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"NETCL_DISTRIBUTED_TIMEOUT={text!r} is not a number of seconds") \
            from None
    return value


class Communicator:
    """An mpi4py communicator whose collectives fail within ``timeout`` seconds.

    ``on_timeout="abort"`` (default) prints which collective timed out on
    which rank and, a second later (so the launcher forwards the report),
    calls ``MPI_Abort``, ending every rank of the job;
    ``"raise"`` raises :class:`DistributedTimeoutError` instead (the
    communicator is then unusable: the collective is still pending).
    """

    def __init__(self, comm=None, timeout=None, on_timeout="abort"):
        if comm is None:
            comm = MPI.COMM_WORLD
        if isinstance(comm, Communicator):
            comm = comm.comm
        if not isinstance(comm, MPI.Intracomm):
            raise TypeError(f"comm must be an mpi4py intracommunicator, got "
                            f"{type(comm).__name__}")
        if timeout is None:
            timeout = _timeout_from_env()
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if on_timeout not in ("abort", "raise"):
            raise ValueError(f"on_timeout must be 'abort' or 'raise', got {on_timeout!r}")
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.timeout = float(timeout)
        self.on_timeout = on_timeout

    # ------------------------------------------------------------ waiting
    def wait(self, requests, what):
        """Complete ``requests`` (one or a list) or fail after the timeout."""
        if not isinstance(requests, (list, tuple)):
            requests = [requests]
        start = time.monotonic()
        deadline = start + self.timeout
        sleep = 0.0
        while not MPI.Request.Testall(requests):
            now = time.monotonic()
            if now > deadline:
                self._timed_out(what)
            if now - start > _SPIN_SECONDS:
                sleep = min(_MAX_SLEEP, max(20e-6, 2 * sleep))
                time.sleep(sleep)

    def _timed_out(self, what):
        message = (f"netcl.distributed: rank {self.rank} of {self.size}: {what} did not "
                   f"complete within {self.timeout:g} s (timeout): another rank has failed, "
                   "died or stopped calling the collectives in the same order (see its "
                   "output)")
        if self.on_timeout == "raise":
            raise DistributedTimeoutError(message)
        sys.stderr.write(message + "; aborting the job (MPI_Abort)\n")
        sys.stderr.flush()
        time.sleep(_REPORT_SECONDS)
        self.comm.Abort(1)

    # -------------------------------------------------------- collectives
    def _spec(self, array):
        return [array, _MPI_TYPES[array.dtype]]

    def iallreduce(self, array, op=None):
        """Start an in-place sum (or ``op``) of ``array`` over the ranks."""
        return self.comm.Iallreduce(MPI.IN_PLACE, self._spec(array), op=op or MPI.SUM)

    def allreduce_(self, array, what, op=None):
        self.wait(self.iallreduce(array, op), what)
        return array

    def iallgather(self, send, recv):
        return self.comm.Iallgather(self._spec(send), self._spec(recv))

    def allgatherv_(self, array, counts, what):
        """Every rank's segment of ``array`` (rank r's ``counts[r]`` elements,
        in rank order) gathered into ``array`` on every rank, in place."""
        counts = [int(c) for c in counts]
        displacements = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
        request = self.comm.Iallgatherv(
            MPI.IN_PLACE, [array, counts, displacements, _MPI_TYPES[array.dtype]])
        self.wait(request, what)
        return array

    def barrier(self, what="a barrier"):
        self.wait(self.comm.Ibarrier(), what)

    def allgather_object(self, value, what):
        """``value`` of every rank, as a list in rank order (pickled)."""
        payload = np.frombuffer(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL),
                                np.uint8)
        sizes = np.zeros(self.size, np.int64)
        sizes[self.rank] = payload.size
        self.allreduce_(sizes, f"{what} (sizes)")
        gathered = np.empty(int(sizes.sum()), np.uint8)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        gathered[offsets[self.rank]:offsets[self.rank + 1]] = payload
        self.allgatherv_(gathered, sizes, what)
        return [pickle.loads(gathered[offsets[r]:offsets[r + 1]].tobytes())
                for r in range(self.size)]

    def gather_object(self, value, root, what):
        """``value`` of every rank as a list in rank order on ``root``; None elsewhere."""
        payload = np.frombuffer(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL),
                                np.uint8)
        sizes = np.zeros(self.size, np.int64)
        sizes[self.rank] = payload.size
        self.allreduce_(sizes, f"{what} (sizes)")
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        if self.rank == root:
            gathered = np.empty(int(sizes.sum()), np.uint8)
            receive = [gathered, sizes.tolist(), offsets[:-1].tolist(), MPI.BYTE]
        else:
            receive = None
        self.wait(self.comm.Igatherv([payload, MPI.BYTE], receive, root=root), what)
        if self.rank != root:
            return None
        return [pickle.loads(gathered[offsets[r]:offsets[r + 1]].tobytes())
                for r in range(self.size)]

    def check_all(self, error, what):
        """Collective: raise on every rank if ``error`` (an exception or None)
        is set on any rank, naming the ranks and their errors."""
        errors = self.allgather_object(None if error is None else
                                       f"{type(error).__name__}: {error}", what)
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            details = "; ".join(f"rank {r}: {e}" for r, e in failed)
            if error is not None:
                raise DistributedError(f"{what} failed on rank(s) "
                                       f"{[r for r, _ in failed]}: {details}") from error
            raise DistributedError(f"{what} failed on rank(s) {[r for r, _ in failed]}: "
                                   f"{details}")
