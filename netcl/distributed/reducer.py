"""Gradient all-reduce: device -> one host bucket per dtype -> MPI -> device.

The gradients are copied into one reusable host array per dtype (pinned,
i.e. allocated by the OpenCL runtime with ``CL_MEM_ALLOC_HOST_PTR`` and
mapped, where it allows it, so that copies to and from a GPU need no
intermediate buffer), reduced in place over the ranks in messages of at most
``bucket_bytes`` — a few large messages, never one per tensor — and copied
back. Gradients that are views of one buffer (:func:`netcl.optim.flatten_`)
travel as one copy each way; a message starts as soon as the copies it covers
have landed, while later ones are still in flight.

Averaging: ``op="average"`` multiplies the sum by ``f / N`` (``N`` ranks,
``f = gradient_predivide_factor``, as Horovod) after the reduction and, when
``f != 1``, every rank's gradient by ``1 / f`` before it, each factor rounded
to the gradient's dtype; ``op="sum"`` leaves the sum as it is.

Reduction order: MPI chooses it. With two ranks the sum is one addition
(``g0 + g1``, commutative in IEEE arithmetic), so the result is bitwise the
same as a single process adding the two halves' gradients. With more ranks
the grouping may vary with the MPI library, the message size and the
algorithm it picks, so results agree with a single process only to float
rounding. ``deterministic=True`` fixes it: every rank gathers every rank's
gradients (N times the bucket's memory and traffic) and adds them in rank
order, ``((g0 + g1) + g2) + ...``, bitwise reproducible with any N.
"""

import hashlib
import time

import numpy as np
import pyopencl as cl

from netcl.device import is_simulator
from netcl.distributed._comm import MPI, DistributedError

__all__ = ["GradientReducer", "DEFAULT_BUCKET_BYTES"]

#: Largest message of the all-reduce (torch DDP's default bucket is 25 MiB).
DEFAULT_BUCKET_BYTES = 25 << 20
# Views of one buffer whose gaps are at most this many bytes (flatten_'s
# alignment padding) are copied as one segment.
_MAX_GAP_BYTES = 128


class _Segment:
    """A contiguous device byte range and where it sits in its dtype's host bucket."""

    __slots__ = ("buffer", "offset", "nbytes", "host_start", "count")

    def __init__(self, buffer, offset, nbytes, host_start, itemsize):
        self.buffer, self.offset, self.nbytes = buffer, offset, nbytes
        self.host_start, self.count = host_start, nbytes // itemsize


class _Layout:
    """Segments and messages per dtype for one set of gradient arrays."""

    def __init__(self, grads):
        self.segments = {}  # dtype -> [_Segment]
        self.sizes = {}     # dtype -> host elements
        for grad in grads:
            dtype = grad.dtype
            segments = self.segments.setdefault(dtype, [])
            buffer, offset, nbytes = grad.base_data, grad.offset, grad.nbytes
            last = segments[-1] if segments else None
            end = None if last is None else last.offset + last.nbytes
            if last is not None and last.buffer.int_ptr == buffer.int_ptr \
                    and end <= offset <= end + _MAX_GAP_BYTES:
                last.nbytes = offset + nbytes - last.offset
                last.count = last.nbytes // dtype.itemsize
                continue
            host = 0 if last is None else last.host_start + last.count
            segments.append(_Segment(buffer, offset, nbytes, host, dtype.itemsize))
        for dtype, segments in self.segments.items():
            self.sizes[dtype] = segments[-1].host_start + segments[-1].count
        # What every rank must agree on: dtypes and segment lengths, in order.
        text = repr([(dtype.str, [s.count for s in segments])
                     for dtype, segments in self.segments.items()])
        digest = hashlib.blake2b(text.encode(), digest_size=7).digest()
        self.signature = int.from_bytes(digest, "little")  # fits an int64


class GradientReducer:
    """All-reduce gradient arrays over the ranks of a :class:`Communicator`.

    ``reduce(grads, queue)`` replaces every array in ``grads`` (pyopencl
    Arrays, the same shapes and dtypes in the same order on every rank —
    checked each call with one 16-byte reduction) by the sum or average over
    the ranks. The copies are enqueued on ``queue``; the copies back are not
    waited for, so kernels enqueued later on the same queue see the result.
    """

    def __init__(self, comm, op="average", gradient_predivide_factor=1.0,
                 bucket_bytes=DEFAULT_BUCKET_BYTES, deterministic=False, pinned=True):
        if op not in ("average", "sum"):
            raise ValueError(f"op must be 'average' or 'sum', got {op!r}")
        factor = gradient_predivide_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float, np.floating)) \
                or not np.isfinite(factor) or not factor > 0:
            raise ValueError("gradient_predivide_factor must be a finite number > 0, "
                             f"got {factor!r}")
        if factor != 1.0 and op != "average":
            raise ValueError("gradient_predivide_factor applies to op='average' only")
        if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, (int, np.integer)) \
                or bucket_bytes < 1024:
            raise ValueError(f"bucket_bytes must be an integer >= 1024, got {bucket_bytes!r}")
        self.comm = comm
        self.op = op
        self.predivide = float(factor)
        self.bucket_bytes = int(bucket_bytes)
        self.deterministic = bool(deterministic)
        self.pinned = bool(pinned)
        self._key = None
        self._layout = None
        self._host = {}      # dtype -> host bucket (numpy, maybe pinned)
        self._pinned = {}    # dtype -> the OpenCL buffer behind a pinned bucket
        self._gathered = {}  # (dtype, start) -> (ranks, count) receive buffer (deterministic)
        self._check = np.zeros(2, np.int64)
        #: Seconds the last reduce() spent waiting for MPI (after the copies
        #: to the host), for the benchmark.
        self.last_wait_seconds = 0.0

    def host_bytes(self):
        """Bytes of host memory held for the buckets."""
        return sum(a.nbytes for a in self._host.values()) + \
            sum(a.nbytes for a in self._gathered.values())

    def _bucket(self, queue, dtype, size):
        host = self._host.get(dtype)
        if host is not None and host.size == size:
            return host
        self._host.pop(dtype, None)
        self._pinned.pop(dtype, None)
        host = None
        if self.pinned and not is_simulator(queue.device):
            try:
                buffer = cl.Buffer(queue.context, cl.mem_flags.READ_WRITE
                                   | cl.mem_flags.ALLOC_HOST_PTR, size * dtype.itemsize)
                host, _ = cl.enqueue_map_buffer(
                    queue, buffer, cl.map_flags.READ | cl.map_flags.WRITE, 0, (size,), dtype,
                    is_blocking=True)
                self._pinned[dtype] = buffer
            except cl.Error:
                host = None
        if host is None:
            host = np.empty(size, dtype)
        self._host[dtype] = host
        return host

    def _messages(self, dtype, size):
        step = max(1, self.bucket_bytes // dtype.itemsize)
        return [(start, min(size, start + step)) for start in range(0, size, step)]

    def reduce(self, grads, queue, what="the gradient all-reduce"):
        """Sum/average ``grads`` over the ranks, in place (see the class doc)."""
        key = tuple((g.base_data.int_ptr, g.offset, g.size, g.dtype.num) for g in grads)
        if key != self._key:
            self._layout = _Layout(grads)
            self._key = key
        layout = self._layout
        comm = self.comm

        # Every rank must bring the same layout, or the sums mix unrelated
        # gradients: [max(sig), max(-sig)] equals [sig, -sig] only if all agree.
        check = self._check
        check[0], check[1] = layout.signature, -layout.signature
        comm.allreduce_(check, f"{what} (layout check)", op=MPI.MAX)
        if check[0] != layout.signature or check[1] != -layout.signature:
            raise DistributedError(
                f"rank {comm.rank}: {what}: the ranks' gradients differ in number, dtype or "
                "size (every rank must have gradients for the same parameters, in the same "
                "order)")
        if comm.size == 1 and self.predivide == 1.0:
            return  # nothing to reduce or scale

        pre = None if self.predivide == 1.0 else 1.0 / self.predivide
        post = self.predivide / comm.size if self.op == "average" else None
        requests, pending = [], []
        for dtype, segments in layout.segments.items():
            size = layout.sizes[dtype]
            host = self._bucket(queue, dtype, size)
            events = [cl.enqueue_copy(queue, host[s.host_start:s.host_start + s.count],
                                      s.buffer, src_offset=s.offset, is_blocking=False)
                      for s in segments]
            landed = 0
            for start, stop in self._messages(dtype, size):
                # Start each message once the copies it covers have landed.
                while landed < len(segments) and segments[landed].host_start < stop:
                    events[landed].wait()
                    landed += 1
                chunk = host[start:stop]
                if pre is not None:
                    np.multiply(chunk, dtype.type(pre), out=chunk)
                if self.deterministic and comm.size > 1:
                    gathered = self._gathered.get((dtype, start))
                    if gathered is None or gathered.shape != (comm.size, stop - start):
                        gathered = np.empty((comm.size, stop - start), dtype)
                        self._gathered[(dtype, start)] = gathered
                    requests.append(comm.iallgather(chunk, gathered))
                    pending.append((chunk, gathered))
                elif comm.size > 1:
                    requests.append(comm.iallreduce(chunk))
                    pending.append((chunk, None))
                else:
                    pending.append((chunk, None))
        started = time.perf_counter()
        comm.wait(requests, what)
        self.last_wait_seconds = time.perf_counter() - started
        for chunk, gathered in pending:
            if gathered is not None:  # add in rank order
                np.copyto(chunk, gathered[0])
                for row in gathered[1:]:
                    np.add(chunk, row, out=chunk)
            if post is not None and post != 1.0:
                np.multiply(chunk, chunk.dtype.type(post), out=chunk)
        for dtype, segments in layout.segments.items():
            host = self._host[dtype]
            for s in segments:
                cl.enqueue_copy(queue, s.buffer, host[s.host_start:s.host_start + s.count],
                                dst_offset=s.offset, is_blocking=False)
