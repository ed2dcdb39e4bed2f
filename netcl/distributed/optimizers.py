"""Data-parallel optimizers over MPI: :class:`DistributedOptimizer` (Horovod's
gradient averaging around any netcl optimizer) and
:class:`ZeroRedundancyOptimizer` (torch's ZeRO-1: optimizer state sharded
over the ranks)."""

import numbers
import zlib

import numpy as np
import pyopencl as cl

from netcl.distributed import checkpoint as _checkpoint
from netcl.distributed._comm import Communicator, DistributedError
from netcl.distributed.reducer import DEFAULT_BUCKET_BYTES, GradientReducer, _Layout

__all__ = ["ConsistencyError", "DistributedOptimizer", "ZeroRedundancyOptimizer",
           "partition_parameters"]


class ConsistencyError(DistributedError):
    """The ranks' parameters differ (:meth:`DistributedOptimizer.check_consistency`)."""


def _check_every(value):
    if isinstance(value, (bool, np.bool_)):
        return 1 if value else 0
    if not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"check_consistency must be a bool or a number of steps >= 0, "
                         f"got {value!r}")
    return int(value)


class _Distributed:
    """What both optimizers share: the communicator, the gradient reducer,
    consistency checks, checkpoints and delegation to the wrapped optimizer
    (``self.optim``), so that ``param_groups``, ``state``, ``zero_grad``,
    ``skipped_steps`` and the step hooks read as the inner optimizer's and a
    :class:`netcl.amp.GradScaler` can drive the step."""

    def _setup(self, optim, comm, timeout, on_timeout, check_consistency, reducer_options):
        self.optim = optim
        self.comm = Communicator(comm, timeout, on_timeout)
        self.rank, self.world_size = self.comm.rank, self.comm.size
        self.reducer = None if reducer_options is None else \
            GradientReducer(self.comm, **reducer_options)
        self._check_every = _check_every(check_consistency)
        self._steps_taken = 0

    def __getattr__(self, name):
        # Only reached for names this class does not define.
        optim = self.__dict__.get("optim")
        if optim is None:
            raise AttributeError(name)
        return getattr(optim, name)

    def params(self):
        """Every parameter, in ``param_groups`` order."""
        return [p for group in self.optim.param_groups for p in group["params"]]

    def _grads(self):
        return [p.grad for p in self.params() if p.grad is not None]

    def _reduce(self):
        if self.reducer is not None:
            self.reducer.reduce(self._grads(), self.optim._queue)

    def _after_step(self):
        self._steps_taken += 1
        if self._check_every and self._steps_taken % self._check_every == 0:
            self.check_consistency()

    # ------------------------------------------------------------ checks
    def check_consistency(self):
        """Collective: raise :class:`ConsistencyError` on every rank unless all
        ranks hold bitwise identical parameters.

        Each rank reads its parameters back (a sync) and exchanges one CRC-32
        per parameter; the error names the differing parameters and which
        ranks hold which version.
        """
        params = self.params()
        crcs = np.array([zlib.crc32(memoryview(np.ascontiguousarray(
            p.data.get(queue=self.optim._queue))).cast("B")) for p in params], np.uint32)
        gathered = np.empty((self.world_size, len(params)), np.uint32)
        self.comm.wait(self.comm.iallgather(crcs, gathered), "the consistency check")
        differing = np.nonzero(np.any(gathered != gathered[0], axis=0))[0]
        if differing.size:
            first = int(differing[0])
            versions = {}
            for r in range(self.world_size):
                versions.setdefault(int(gathered[r, first]), []).append(r)
            raise ConsistencyError(
                f"ranks hold different parameters after step {self._steps_taken}: "
                f"{differing.size} of {len(params)} differ, first "
                f"{self.optim._describe_param(params[first])} (ranks grouped by its "
                f"checksum: {sorted(versions.values())})")

    def state_bytes(self):
        """Device bytes of optimizer state allocated on this rank (each
        distinct buffer once: flat and packed state count their whole
        buffers, alignment padding included)."""
        seen = {}
        for entry in self.optim._state_entries.values():
            for buffer in entry.buffers().values():
                seen[buffer.base_data.int_ptr] = buffer.base_data.size
        return sum(seen.values())

    # ------------------------------------------------------- checkpoints
    def save(self, path):
        """Collective: write one consolidated checkpoint (rank 0 writes it,
        atomically) that a single-process optimizer of the inner class loads
        with :func:`netcl.optim.load`; every rank raises if the write failed."""
        _checkpoint.save_consolidated(self, path)

    def load(self, path):
        """Collective: load a consolidated checkpoint (or one written by a
        single-process optimizer of the inner class) on every rank."""
        _checkpoint.load_consolidated(self, path)

    def save_sharded(self, path):
        """Collective: every rank writes its own optimizer state to
        :func:`netcl.distributed.shard_path` ``(path, rank, world_size)``,
        atomically, marked with one id per save."""
        _checkpoint.save_sharded(self, path)

    def load_sharded(self, path):
        """Collective: load what :meth:`save_sharded` wrote, on the same number
        of ranks; a set whose files come from different saves is refused."""
        _checkpoint.load_sharded(self, path)

    def _full_state_dict(self):
        """The whole state on rank 0 (None elsewhere), for a consolidated save."""
        return self.optim.state_dict() if self.rank == 0 else None

    def _load_full_state_dict(self, state_dict):
        self.optim.load_state_dict(state_dict)

    def _shard_description(self):
        return {}

    def __repr__(self):
        return (f"{type(self).__name__}(rank {self.rank} of {self.world_size}, "
                f"{self.optim!r})")


class DistributedOptimizer(_Distributed):
    """Average (or sum) gradients over the MPI ranks before ``optimizer``'s step.

    Horovod's ``DistributedOptimizer`` for netcl: ``step()`` all-reduces every
    gradient present (see :mod:`netcl.distributed.reducer`: one host bucket
    per dtype, messages of at most ``bucket_bytes``), then runs
    ``optimizer``'s step. Every rank must have gradients for the same
    parameters; the step is then identical on every rank, so so are the
    parameters and the state. Works with every netcl optimizer and with
    their ``skip_nonfinite`` and ``max_grad_norm`` and a
    :class:`netcl.amp.GradScaler`: after the all-reduce each rank's guard
    reads the same gradients, so a non-finite gradient on any rank (NaN or
    infinity stays non-finite through a sum) skips the step on every rank
    and the clipping norm is the global one.

    Args:
        optimizer: a :class:`netcl.optim.Optimizer` over this rank's replica
            of the parameters.
        comm: an mpi4py intracommunicator (default ``MPI.COMM_WORLD``).
        op: ``"average"`` (default) or ``"sum"``.
        backward_passes_per_step: gradients accumulate locally over this many
            ``step()`` calls before the all-reduce and the real step; the
            calls in between only count, and :meth:`zero_grad` zeroes only at
            the start of a window, so a plain ``zero_grad(); backward;
            step()`` loop accumulates unchanged. As Horovod, the accumulated
            gradients are summed over the passes, not averaged.
        gradient_predivide_factor: ``f``: every gradient is multiplied by
            ``1/f`` before the sum and the sum by ``f/N`` after it (average only).
        bucket_bytes: the largest message (default 25 MiB).
        deterministic: add the ranks' gradients in rank order (bitwise
            reproducible with any number of ranks; N times the host memory).
        timeout: seconds a collective may wait for the other ranks before the
            job is aborted (default 300, or ``NETCL_DISTRIBUTED_TIMEOUT``).
        on_timeout: ``"abort"`` (default: ``MPI_Abort`` a second after printing what
            timed out) or ``"raise"`` (:class:`DistributedTimeoutError`).
        check_consistency: ``True`` (every step) or ``k`` (every k-th step):
            verify that every rank holds identical parameters after the step
            (:meth:`check_consistency`).

    To clip with :func:`netcl.nn.utils.clip_grad_norm_` between backward and
    step, call :meth:`synchronize` first (the step then does not all-reduce
    again), as with Horovod; ``max_grad_norm=`` on the optimizer needs nothing.
    """

    def __init__(self, optimizer, comm=None, op="average", backward_passes_per_step=1,
                 gradient_predivide_factor=1.0, *, bucket_bytes=DEFAULT_BUCKET_BYTES,
                 deterministic=False, timeout=None, on_timeout="abort",
                 check_consistency=False):
        for name in ("_run_step", "_queue", "param_groups"):
            if not hasattr(optimizer, name):
                raise TypeError(f"optimizer must be a netcl.optim optimizer, got "
                                f"{type(optimizer).__name__}")
        if isinstance(optimizer, _Distributed):
            raise TypeError("optimizer is already distributed")
        passes = backward_passes_per_step
        if isinstance(passes, bool) or not isinstance(passes, numbers.Integral) or passes < 1:
            raise ValueError(f"backward_passes_per_step must be an integer >= 1, got {passes!r}")
        self._setup(optimizer, comm, timeout, on_timeout, check_consistency,
                    dict(op=op, gradient_predivide_factor=gradient_predivide_factor,
                         bucket_bytes=bucket_bytes, deterministic=deterministic))
        self.backward_passes_per_step = int(passes)
        self._passes = 0           # step() calls in the current window
        self._synchronized = False

    def synchronize(self):
        """All-reduce the gradients now (collective); the next step will not
        all-reduce them again."""
        self._reduce()
        self._synchronized = True

    def zero_grad(self, set_to_none=True):
        """The inner optimizer's ``zero_grad``, except inside an accumulation
        window (``backward_passes_per_step > 1``), where gradients must add up."""
        if self._passes == 0:
            self.optim.zero_grad(set_to_none)

    def _window_complete(self):
        self._passes += 1
        if self._passes < self.backward_passes_per_step:
            return False
        self._passes = 0
        return True

    def step(self, closure=None):
        """Count one backward pass; on the last of a window all-reduce (unless
        :meth:`synchronize` did) and step the inner optimizer (collective)."""
        loss = None
        if closure is not None:
            loss = closure()
        if not self._window_complete():
            return loss
        if not self._synchronized:
            self._reduce()
        self._synchronized = False
        self.optim.step()
        self._after_step()
        return loss

    def _run_step(self, scaler):
        # GradScaler.step(opt): the scaler's device-side unscale and skip
        # read the all-reduced gradients.
        if not self._window_complete():
            return
        if not self._synchronized:
            self._reduce()
        self._synchronized = False
        self.optim._run_step(scaler)
        self._after_step()


def partition_parameters(param_groups, world_size):
    """torch ZeRO's partition: ``owners[index]`` = the rank owning each
    parameter (indices across groups in order).

    Within each group the parameters are taken largest first (ties in
    order) and each goes whole to the rank holding the fewest elements so far
    (ties to the lowest rank); the counts carry over from group to group.
    """
    sizes = [0] * world_size
    owners = []
    for group in param_groups:
        params = list(group["params"])
        order = sorted(range(len(params)), key=lambda i: -params[i].data.size)
        group_owners = [None] * len(params)
        for i in order:
            rank = min(range(world_size), key=lambda r: sizes[r])
            group_owners[i] = rank
            sizes[rank] += params[i].data.size
        owners += group_owners
    return owners


class ZeroRedundancyOptimizer(_Distributed):
    """ZeRO-1: each rank keeps and updates the optimizer state of its share of
    the parameters only, then the updated parameters are all-gathered.

    torch's ``ZeroRedundancyOptimizer(params, optimizer_class, **defaults)``
    for netcl: ``optimizer_class(params, **defaults)`` is built over every
    parameter on every rank, and the parameters are partitioned as torch
    does (:func:`partition_parameters`: largest first, whole, to the least
    loaded rank). A step all-reduces the gradients (``reduce_gradients=True``,
    the default; pass False when they are averaged already), steps — state,
    update and step count — only this rank's parameters, and all-gathers the
    updated values (one message per dtype), so every rank ends with the same
    parameters while holding about 1/N of the state.

    ``skip_nonfinite``, ``max_grad_norm`` and a GradScaler decide globally:
    the inner optimizer reads every gradient in its guard pass (all
    identical after the all-reduce) but updates only its shard
    (``Optimizer._set_shard``).

    State dicts: :meth:`local_state_dict` is this rank's shard;
    :meth:`consolidate_state_dict` ``(to=0)`` (call it on all ranks) gathers
    the whole state on rank ``to``, whose :meth:`state_dict` then returns it
    in the single-process layout; :meth:`load_state_dict` takes that whole
    state on every rank and keeps its shard.

    Memory note: with :func:`netcl.optim.flatten_` parameters the inner
    optimizer allocates each state buffer as one flat buffer of the whole
    model (views at each parameter's offset), so flat parameters get no
    memory saving; leave parameters unflattened under ZeRO.

    Options ``comm``, ``bucket_bytes``, ``deterministic``, ``timeout``,
    ``on_timeout`` and ``check_consistency`` are those of
    :class:`DistributedOptimizer`.
    """

    def __init__(self, params, optimizer_class, comm=None, *, reduce_gradients=True,
                 bucket_bytes=DEFAULT_BUCKET_BYTES, deterministic=False, timeout=None,
                 on_timeout="abort", check_consistency=False, **defaults):
        if not isinstance(optimizer_class, type) or not hasattr(optimizer_class, "_set_shard"):
            raise TypeError("optimizer_class must be a netcl.optim optimizer class, got "
                            f"{optimizer_class!r}")
        optim = optimizer_class(params, **defaults)
        self._setup(optim, comm, timeout, on_timeout, check_consistency,
                    dict(bucket_bytes=bucket_bytes, deterministic=deterministic)
                    if reduce_gradients else None)
        self.optimizer_class = optimizer_class
        self._consolidated = None
        self._gather_key = None
        self._partition()

    def _partition(self):
        params = self.params()
        self.owners = partition_parameters(self.optim.param_groups, self.world_size)
        owned = [p for p, r in zip(params, self.owners) if r == self.rank]
        self.optim._set_shard(owned)
        self._gather_key = None

    def add_param_group(self, param_group):
        """Add a group to the inner optimizer and repartition (collective in
        effect: every rank must add the same group)."""
        self.optim.add_param_group(param_group)
        self._partition()

    def step(self, closure=None):
        """All-reduce the gradients, step this rank's shard, all-gather the
        parameters (collective)."""
        loss = None
        if closure is not None:
            loss = closure()
        self._reduce()
        self.optim.step()
        self._gather()
        self._after_step()
        return loss

    def _run_step(self, scaler):
        self._reduce()
        self.optim._run_step(scaler)
        self._gather()
        self._after_step()

    # -------------------------------------------------- parameter gather
    def _gather(self):
        """Every rank's updated parameters to every rank: each copies its own
        shard into its segment of one host buffer per dtype, an in-place
        all-gather fills in the others, and they are copied back."""
        if self.world_size == 1:
            return  # the one rank updated every parameter
        queue = self.optim._queue
        params = self.params()
        active = [(p, r) for p, r in zip(params, self.owners) if p.grad is not None]
        key = tuple((p.data.base_data.int_ptr, p.data.offset, p.data.size) for p, _ in active)
        if key != self._gather_key:
            self._gather_plan = self._gather_layout(active)
            self._gather_key = key
        layouts, hosts, counts = self._gather_plan
        for dtype, host in hosts.items():
            mine = layouts[self.rank]
            start = sum(counts[dtype][:self.rank])
            events = [cl.enqueue_copy(queue, host[start + s.host_start:start + s.host_start
                                                  + s.count], s.buffer, src_offset=s.offset,
                                      is_blocking=False)
                      for s in mine.segments.get(dtype, ())]
            if events:
                cl.wait_for_events(events)
            self.comm.allgatherv_(host, counts[dtype], "the ZeRO parameter all-gather")
            for r, layout in enumerate(layouts):
                if r == self.rank:
                    continue
                start = sum(counts[dtype][:r])
                for s in layout.segments.get(dtype, ()):
                    cl.enqueue_copy(queue, s.buffer, host[start + s.host_start:start
                                                          + s.host_start + s.count],
                                    dst_offset=s.offset, is_blocking=False)

    def _gather_layout(self, active):
        layouts = [_Layout([p.data for p, r in active if r == rank])
                   for rank in range(self.world_size)]
        dtypes = []
        for p, _ in active:
            if p.data.dtype not in dtypes:
                dtypes.append(p.data.dtype)
        counts = {d: [layout.sizes.get(d, 0) for layout in layouts] for d in dtypes}
        hosts = {d: np.empty(sum(counts[d]), d) for d in dtypes}
        return layouts, hosts, counts

    # ------------------------------------------------------- state dicts
    def local_state_dict(self):
        """This rank's shard of the state (global parameter indices)."""
        return self.optim.state_dict()

    def consolidate_state_dict(self, to=0):
        """Collective: gather every rank's shard on rank ``to``, whose
        :meth:`state_dict` then returns the whole state."""
        if isinstance(to, bool) or not isinstance(to, numbers.Integral) \
                or not 0 <= to < self.world_size:
            raise ValueError(f"to must be a rank in [0, {self.world_size}), got {to!r}")
        shards = self.comm.gather_object(self.local_state_dict(), int(to),
                                         "consolidate_state_dict")
        if self.rank == to:
            merged = dict(shards[0])
            merged["state"] = {}
            for shard in shards:
                merged["state"].update(shard["state"])
            merged["state"] = dict(sorted(merged["state"].items()))
            self._consolidated = merged
        else:
            self._consolidated = None

    def state_dict(self):
        """The whole state after :meth:`consolidate_state_dict` on this rank
        (torch's rule); RuntimeError otherwise."""
        if self._consolidated is None:
            raise RuntimeError("Optimizer state has not been consolidated on this rank. "
                               "Please call `consolidate_state_dict(to=...)` on all ranks "
                               "beforehand.")
        return self._consolidated

    def load_state_dict(self, state_dict):
        """Load the whole state (as :meth:`state_dict` gives it, or a
        single-process optimizer's) on every rank; each keeps its shard."""
        self._load_full_state_dict(state_dict)

    def _full_state_dict(self):
        self.consolidate_state_dict(to=0)
        return self._consolidated

    def _load_full_state_dict(self, state_dict):
        shard = dict(state_dict)
        shard["state"] = {index: entry for index, entry in state_dict["state"].items()
                          if isinstance(index, numbers.Integral) and 0 <= index < len(self.owners)
                          and self.owners[index] == self.rank}
        unknown = [i for i in state_dict["state"] if not (
            isinstance(i, numbers.Integral) and 0 <= i < len(self.owners))]
        if unknown:
            raise ValueError(f"loaded state names parameter index {unknown[0]!r}, which no "
                             "parameter group holds")
        self.optim.load_state_dict(shard)

    def _shard_description(self):
        return {"owners": self.owners}
