"""Flat storage: parameters and gradients as views of one buffer per dtype.

An optimizer over flat parameters updates all of them with one launch per
group and dtype, and a step whose arrays did not change costs the host the
same for 10 or 10,000 tensors.
"""

from dataclasses import dataclass, field

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from netcl.optim import _precision

# Each tensor starts on a 128-byte boundary, a multiple of the widest vector
# netcl uses (NETCL_VECTOR_BYTES=64), so flat tensors are read through vector
# pointers.
_ALIGN_BYTES = 128


@dataclass
class FlatParameters:
    """What :func:`flatten_` made: per dtype, the buffer holding every
    parameter and the one holding every gradient."""

    data: dict = field(default_factory=dict)
    grads: dict = field(default_factory=dict)

    def zero_grad(self, queue=None):
        """Zero every gradient with one fill per dtype (the flat gradients stay
        in place, unlike ``optimizer.zero_grad()``'s default ``set_to_none``)."""
        for grads in self.grads.values():
            _precision.bits_view(grads).fill(0, queue=queue)  # bfloat16: its bits


def flatten_(params, queue=None):
    """Move ``params`` into flat storage, in place, and return a :class:`FlatParameters`.

    For each dtype, one buffer receives every parameter's values and one
    every gradient (a copy of the current gradient, or zeros where it is
    ``None``); each parameter's ``.data`` and ``.grad`` become views of them,
    with the same shapes. Call it before creating the optimizer (state made
    afterwards is flat too) and keep the gradients in place: write them into
    ``p.grad`` (or accumulate there) and zero them with
    :meth:`FlatParameters.zero_grad` or ``optimizer.zero_grad(set_to_none=False)``
    rather than assigning new arrays, which leaves flat storage for that step.

    ``params`` are objects with ``.data``/``.grad`` pyopencl Arrays
    (:class:`netcl.Parameter`), all in one context, C-contiguous, each listed
    once. Nothing changes if any check fails.
    """
    params = list(params)
    seen = set()
    for i, p in enumerate(params):
        data = getattr(p, "data", None)
        if not isinstance(data, cla.Array):
            raise TypeError(f"parameter {i}: .data must be a pyopencl.array.Array, "
                            f"got {type(data).__name__}")
        if not data.flags.c_contiguous:
            raise ValueError(f"parameter {i}: .data must be C-contiguous")
        if data.context != params[0].data.context:
            raise ValueError(f"parameter {i} lives in another OpenCL context")
        grad = p.grad
        if grad is not None and (not isinstance(grad, cla.Array) or grad.shape != data.shape
                                 or grad.dtype != data.dtype):
            raise ValueError(f"parameter {i}: .grad must be None or an Array of the "
                             "parameter's shape and dtype")
        if id(p) in seen:
            raise ValueError(f"parameter {i} appears more than once")
        seen.add(id(p))
    if not params:
        return FlatParameters()
    queue = queue or params[0].data.queue
    by_dtype = {}
    for p in params:
        by_dtype.setdefault(p.data.dtype, []).append(p)
    flat = FlatParameters()
    views = []
    for dtype, members in by_dtype.items():
        align = max(1, _ALIGN_BYTES // dtype.itemsize)
        offsets, total = [], 0
        for p in members:
            offsets.append(total)
            total += -(-p.data.size // align) * align
        data = cla.zeros(queue, max(total, 1), dtype)
        grads = cla.zeros(queue, max(total, 1), dtype)
        for p, offset in zip(members, offsets):
            n = p.data.size
            data_view = data[offset:offset + n].reshape(p.data.shape)
            grad_view = grads[offset:offset + n].reshape(p.data.shape)
            if n:
                _copy(queue, p.data, data_view)
                if p.grad is not None:
                    _copy(queue, p.grad, grad_view)
            views.append((p, data_view, grad_view))
        flat.data[np.dtype(dtype)] = data
        flat.grads[np.dtype(dtype)] = grads
    for p, data_view, grad_view in views:  # every copy is enqueued: now switch over
        p.data = data_view
        p.grad = grad_view
    return flat


def _copy(queue, source, target):
    cl.enqueue_copy(queue, target.base_data, source.base_data, byte_count=source.nbytes,
                    src_offset=source.offset, dst_offset=target.offset)
