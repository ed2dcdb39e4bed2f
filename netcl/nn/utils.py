"""Gradient clipping with ``torch.nn.utils``' names, formulas and return values.

:func:`clip_grad_norm_` and :func:`clip_grad_value_` (and the two halves of
the former, :func:`get_total_norm` and :func:`clip_grads_with_norm_`) work on
the gradients of :class:`netcl.Parameter` objects (anything with a ``.grad``
that is ``None`` or a float32/float64 ``pyopencl.array.Array``) and never wait
for the device: the total norm is returned as a 0-d device Array, and the
clipping coefficient ``clamp(max_norm / (total + 1e-6), max=1)`` is computed
on the device and multiplied into every gradient unconditionally, exactly as
torch does. Only ``error_if_nonfinite=True`` reads the norm back (a sync, as
in torch).

The work is a few multi-tensor launches whatever the number of tensors: a
reduction pass over every gradient (one partial per work-group), a
one-work-item kernel that combines the partials into the total, and a pass
that multiplies the gradients in place. Gradients are enqueued on the queue
of the first gradient; all must live in one OpenCL context.

For the optimizers' own fused clipping (no pass that rewrites the
gradients), see ``max_grad_norm=`` in :mod:`netcl.optim`.
"""

import functools
import math
import os
import threading
import types
import warnings
import weakref
from collections import OrderedDict

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from netcl import _kernels
from netcl.device import default_queue, layout as device_layout
from netcl.optim import _engine

__all__ = ["clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_", "get_total_norm"]

_TEMPLATE = "amp.cl.mako"
_U = np.uint32
_PLAN_CACHE_SIZE = 64
_plans = weakref.WeakKeyDictionary()   # context -> OrderedDict(key -> launches)
_plans_lock = threading.Lock()
_queues = weakref.WeakKeyDictionary()  # context -> queue, for arrays that have none


# ------------------------------------------------------------- the passes
def _buffer(c_type, const=False):
    return f"__global {'const ' if const else ''}{c_type} *restrict"


@functools.lru_cache(maxsize=256)
def _foreach_arguments(op, slots, param_dtype, acc_dtype, norm=None, norm_dtype=None):
    """The parameter list of a multi-tensor pass (the one definition the
    template's declaration and the host's argument order both come from)."""
    Arg = _engine.Arg
    param_t, acc_t = _kernels.c_type(param_dtype), _kernels.c_type(acc_dtype)
    args = []
    for k in range(slots):
        args += [Arg(f"g{k}", _buffer(param_t, const=op == "norm")),
                 Arg(f"g{k}_offset", "const uint", _U)]
    args.append(Arg("chunks", _buffer("uint", const=True)))
    if op in ("unscale", "norm"):
        args += [Arg("partials", _buffer(acc_t)), Arg("row_base", "const uint", _U)]
    if op == "unscale":
        args.append(Arg("scaler_state", _buffer("float", const=True)))
    elif op == "norm" and norm == "p":
        args.append(Arg("p", f"const {acc_t}", np.dtype(acc_dtype)))
    elif op == "mul":
        norm_t = _kernels.c_type(norm_dtype)
        args += [Arg("total", _buffer(norm_t, const=True)),
                 Arg("total_offset", "const uint", _U),
                 Arg("max_norm", f"const {norm_t}", np.dtype(norm_dtype))]
    elif op == "clamp":
        args += [Arg("lo", f"const {param_t}", np.dtype(param_dtype)),
                 Arg("hi", f"const {param_t}", np.dtype(param_dtype))]
    return tuple(args)


_KERNEL_NAMES = {"unscale": "unscale_grads", "norm": "grad_norm", "mul": "mul_grads",
                 "clamp": "clamp_grads"}


_layouts = {}


def layout(device):
    """netcl's kernel layout on ``device`` (:func:`netcl.device.layout`),
    remembered per device and layout environment variables."""
    from netcl.device import LAYOUT_ENV, VECTOR_BYTES_ENV
    key = (device.int_ptr, os.environ.get(LAYOUT_ENV), os.environ.get(VECTOR_BYTES_ENV))
    found = _layouts.get(key)
    if found is None:
        found = _layouts[key] = device_layout(device)
    return found


def acc_dtype(device):
    """The type partial results are accumulated in: float64 where the device has it."""
    return np.dtype(np.float64 if _kernels.supports_fp64(device) else np.float32)


class Batch:
    """Gradients of one dtype and the launches (chunk tables) covering them.

    The launches come from :func:`netcl.optim._engine.plan` and are cached
    per context by the gradients' lengths and alignment, so a model whose
    gradients keep their sizes plans once.
    """

    __slots__ = ("dtype", "grads", "offsets", "launches", "n_rows", "first")

    def __init__(self, queue, dtype, grads, first):
        self.dtype = dtype
        self.grads = grads
        self.first = first  # ordinal of the batch's first tensor among all batches
        device = queue.device
        width = layout(device).vector_width(dtype)
        itemsize = dtype.itemsize
        # check_grad made sure offsets are whole elements below 2**32
        self.offsets = offsets = [g.offset // itemsize for g in grads]
        aligned = tuple(o % width == 0 for o in offsets)
        lengths = tuple(g.size for g in grads)
        self.launches = _plan(queue.context, device, dtype, lengths, aligned)
        self.n_rows = sum(launch.n_rows for launch in self.launches)

    def owners(self):
        """Per row of every launch in order: the ordinal of the tensor it belongs to."""
        out = []
        for launch in self.launches:
            for index in launch.indices:
                rows = -(-self.grads[index].size // _engine.CHUNK)
                out += [self.first + index] * rows
        return out


def _slot_choices(device, dtype):
    acc = acc_dtype(device)
    fixed = max(_engine.argument_bytes(device, _foreach_arguments(
        op, 0, dtype, acc, norm="p", norm_dtype=np.float64)) for op in _KERNEL_NAMES)
    per_tensor = _engine.argument_bytes(device, _foreach_arguments("mul", 1, dtype, acc,
                                                                   norm_dtype=np.float64)[:2])
    return _engine.slot_counts(device, per_tensor, fixed)


def _plan(context, device, dtype, lengths, aligned):
    key = (dtype, lengths, aligned)
    with _plans_lock:
        cache = _plans.setdefault(context, OrderedDict())
        launches = cache.get(key)
        if launches is not None:
            cache.move_to_end(key)
            return launches
    launches = _engine.plan(context, lengths, list(range(len(lengths))), aligned,
                            _slot_choices(device, dtype))
    with _plans_lock:
        cache[key] = launches
        while len(cache) > _PLAN_CACHE_SIZE:
            cache.popitem(last=False)
    return launches


def batches(queue, grads):
    """Split gradients by dtype (first-seen order) into :class:`Batch` es."""
    by_dtype = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    out, first = [], 0
    for dtype, members in by_dtype.items():
        out.append(Batch(queue, dtype, members, first))
        first += len(members)
    return out


_thread = threading.local()


def _kernel(context, op, slots, aligned, dtype, norm, norm_dtype, layout):
    """This thread's kernel object for one launch shape, and its arguments."""
    cache = getattr(_thread, "kernels", None)
    if cache is None:
        cache = _thread.kernels = weakref.WeakKeyDictionary()
    per_context = cache.setdefault(context, {})
    key = (op, slots, aligned, dtype, norm, norm_dtype, layout)
    found = per_context.get(key)
    if found is None:
        acc = acc_dtype(context.devices[0])
        arguments = _foreach_arguments(op, slots, dtype, acc, norm, norm_dtype)
        name = _KERNEL_NAMES[op]
        # The reductions hold a vector of accumulators: it too must fit the
        # layout's vector bytes (float32 gradients summed in float64 would
        # make 64-byte vectors, which PoCL cannot compile for a CPU without
        # AVX-512: it crashes).
        width = layout.vector_width(dtype)
        if op in ("unscale", "norm"):
            width = min(width, layout.vector_width(acc))
        flags = dict(param_t=_kernels.c_type(dtype), acc_t=_kernels.c_type(acc),
                     vector_width=width, local_size=layout.local_size,
                     n_tensors=slots, aligned=aligned,
                     declarations=tuple(a.declaration for a in arguments))
        if op == "norm":
            flags["norm"] = norm
        if op == "mul":
            flags["norm_t"] = _kernels.c_type(norm_dtype)
        program = _kernels.get_program(context, _TEMPLATE, name, kernel=name, **flags)
        found = per_context[key] = _kernels.new_kernel(program, name,
                                                       [a.dtype for a in arguments])
    return found


def enqueue_pass(queue, op, batch, extra=(), partials=None, row_base=0, norm=None,
                 norm_dtype=None):
    """Enqueue one multi-tensor pass of ``op`` over a batch; ``extra`` are the
    op's trailing arguments (after chunks, partials and row_base). Returns
    the next free row of ``partials``."""
    context = queue.context
    lay = layout(queue.device)
    local_size = lay.local_size
    grads, offsets = batch.grads, batch.offsets
    enqueue = cl.enqueue_nd_range_kernel
    for launch in batch.launches:
        kernel = _kernel(context, op, launch.slots, launch.aligned, batch.dtype, norm,
                         norm_dtype, lay)
        values = []
        indices = launch.indices
        for i in indices:
            values += (grads[i].base_data, offsets[i])
        # Unused slots repeat the last tensor: the chunk table never names them.
        values += (grads[indices[-1]].base_data, offsets[indices[-1]]) * (
            launch.slots - len(indices))
        values.append(launch.table)
        if partials is not None:
            values += (partials, row_base)
            row_base += launch.n_rows
        values += extra
        kernel.set_args(*values)
        enqueue(queue, kernel, (launch.n_rows * local_size,), (local_size,))
    return row_base


def one_item(queue, name, scalar_dtypes, values, **flags):
    """Enqueue a one-work-item kernel of the template."""
    kernel = _kernels.get_kernel(queue.context, _TEMPLATE, name, scalar_dtypes, kernel=name,
                                 **flags)
    kernel.set_args(*values)
    cl.enqueue_nd_range_kernel(queue, kernel, (1,), (1,))


# --------------------------------------------------------------- checking
def check_grad(grad, where, context=None):
    """Raise TypeError/ValueError unless ``grad`` is an Array the passes can use;
    returns its context. ``where`` (a string, or a callable giving one) names
    it in the message and is only evaluated on failure."""
    if isinstance(grad, cla.Array) and grad.flags.c_contiguous \
            and (grad.dtype == _F32 or (grad.dtype == _F64 and _fp64(grad.context))) \
            and (context is None or grad.context is context or grad.context == context) \
            and grad.offset % grad.dtype.itemsize == 0 \
            and grad.size < _SIZE_LIMIT and grad.offset // grad.dtype.itemsize < _SIZE_LIMIT:
        return grad.context
    where = where() if callable(where) else where
    if not isinstance(grad, cla.Array):
        raise TypeError(f"{where}: .grad must be None or a pyopencl.array.Array, "
                        f"got {type(grad).__name__}")
    if grad.dtype not in (np.float32, np.float64):
        raise TypeError(f"{where}: gradient dtype {grad.dtype} is not supported "
                        "(float32 and float64 are)")
    if not grad.flags.c_contiguous:
        raise ValueError(f"{where}: the gradient must be C-contiguous")
    if context is not None and grad.context != context:
        raise ValueError(f"{where}: the gradient lives in another OpenCL context than the others")
    if grad.dtype == np.float64 and not _fp64(grad.context):
        raise TypeError(f"{where}: float64 needs a device with cl_khr_fp64")
    if grad.offset % grad.dtype.itemsize:
        raise ValueError(f"{where}: the gradient's offset is not a whole number of elements")
    raise ValueError(f"{where}: a gradient of {grad.size} elements (at element offset "
                     f"{grad.offset // grad.dtype.itemsize}) is too large for 32-bit indexing")


_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)
_SIZE_LIMIT = 2**32 - _engine.CHUNK
_fp64_contexts = weakref.WeakKeyDictionary()


def _fp64(context):
    known = _fp64_contexts.get(context)
    if known is None:
        known = _fp64_contexts[context] = _kernels.supports_fp64(context.devices[0])
    return known


def queue_of(arrays, fallback=None):
    """The queue of the first array that has one, else one for their context."""
    for a in arrays:
        if a.queue is not None:
            return a.queue
    if not arrays:
        return fallback if fallback is not None else default_queue()
    context = arrays[0].context
    default = default_queue()
    if default.context == context:
        return default
    with _plans_lock:
        queue = _queues.get(context)
        if queue is None:
            queue = _queues[context] = cl.CommandQueue(context)
    return queue


def _parameter_list(parameters, stacklevel=3):
    """torch's handling of ``parameters``: one parameter or an iterable (a
    generator is consumed once; an empty one warns)."""
    if hasattr(parameters, "grad") and not isinstance(parameters, (list, tuple)):
        return [parameters]
    if isinstance(parameters, cla.Array):
        raise TypeError("parameters must be a parameter (an object with .grad) or an iterable "
                        "of them, not a pyopencl Array: pass the parameter that owns it")
    is_generator = isinstance(parameters, types.GeneratorType)
    try:
        parameters = list(parameters)
    except TypeError:
        raise TypeError("parameters must be a parameter (an object with .grad) or an iterable "
                        f"of them, got {type(parameters).__name__}") from None
    if is_generator and not parameters:
        warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.",
                      stacklevel=stacklevel + 1)
    return parameters


def _grads_of(parameters):
    grads, context = [], None
    for i, p in enumerate(parameters):
        try:
            grad = p.grad
        except AttributeError:
            raise TypeError(f"parameter {i}: {type(p).__name__} has no .grad") from None
        if grad is not None:
            context = check_grad(grad, lambda: f"parameter {i}", context)
            grads.append(grad)
    return grads


def _tensor_list(tensors):
    if isinstance(tensors, cla.Array):
        tensors = [tensors]
    else:
        try:
            tensors = list(tensors)
        except TypeError:
            raise TypeError("tensors must be a pyopencl Array or an iterable of them, "
                            f"got {type(tensors).__name__}") from None
    context = None
    for i, t in enumerate(tensors):
        context = check_grad(t, lambda: f"tensor {i}", context)
    return tensors


def _check_foreach(foreach):
    if foreach is not None and not isinstance(foreach, (bool, np.bool_)):
        raise TypeError(f"foreach must be None or a bool, got {foreach!r}")


def _norm_kind(norm_type):
    if norm_type == 2.0:
        return "2"
    if norm_type == 1.0:
        return "1"
    if norm_type == math.inf:
        return "inf"
    if norm_type == -math.inf:
        return "-inf"
    if norm_type == 0.0:
        return "0"
    return "p"


def _ord_text(norm_type):
    if not math.isfinite(norm_type) or not norm_type.is_integer():
        return repr(norm_type)
    return str(int(norm_type))


def _zeros(queue, dtype):
    out = cla.empty(queue, (), dtype)
    cl.enqueue_fill_buffer(queue, out.base_data, np.zeros(1, dtype), out.offset, out.nbytes)
    return out


def _total_norm(grads, norm_type, error_if_nonfinite, queue):
    """The total norm of ``grads`` (checked Arrays) as a 0-d Array on ``queue``."""
    norm_type = float(norm_type)
    kind = _norm_kind(norm_type)
    if not grads:
        return _zeros(queue, np.float32)
    if (kind in ("inf", "-inf") or norm_type < 0) and any(g.size == 0 for g in grads):
        raise RuntimeError(f"linalg.vector_norm cannot compute the {_ord_text(norm_type)} norm "
                           "on an empty tensor because the operation does not have an identity")
    device = queue.device
    acc = acc_dtype(device)
    norm_dtype = np.dtype(np.float64 if any(g.dtype == np.float64 for g in grads)
                          else np.float32)
    parts = batches(queue, grads)
    n_rows = sum(b.n_rows for b in parts)
    partials = cl.Buffer(queue.context, cl.mem_flags.READ_WRITE, max(1, n_rows) * acc.itemsize)
    extra = (acc.type(norm_type),) if kind == "p" else ()
    row_base = 0
    for batch in parts:
        row_base = enqueue_pass(queue, "norm", batch, extra, partials=partials,
                                row_base=row_base, norm=kind)
    total = cla.empty(queue, (), norm_dtype)
    values = [partials, _U(n_rows)]
    dtypes = [None, _U]
    if kind == "0":
        owners = np.asarray([o for b in parts for o in b.owners()] or [0], np.uint32)
        values.append(cl.Buffer(queue.context, cl.mem_flags.READ_ONLY
                                | cl.mem_flags.COPY_HOST_PTR, hostbuf=owners))
        dtypes.append(None)
    if kind == "p":
        values.append(acc.type(norm_type))
        dtypes.append(acc)
    values += [total.base_data, _U(_engine.element_offset(total))]
    dtypes += [None, _U]
    one_item(queue, "norm_done", dtypes, values, acc_t=_kernels.c_type(acc), norm=kind,
             norm_t=_kernels.c_type(norm_dtype))
    if error_if_nonfinite:
        value = float(total.get(queue=queue))  # a sync, as torch's check is
        if not math.isfinite(value):
            raise RuntimeError(
                f"The total norm of order {norm_type} for gradients from `parameters` is "
                "non-finite, so it cannot be clipped. To disable this error and scale the "
                "gradients by the non-finite norm anyway, set `error_if_nonfinite=False`")
    return total


def _clip_with_norm(grads, max_norm, total_norm, queue):
    if not isinstance(total_norm, cla.Array):
        raise TypeError("total_norm must be a pyopencl Array (as get_total_norm returns), "
                        f"got {type(total_norm).__name__}")
    if total_norm.size != 1 or total_norm.dtype not in (np.float32, np.float64):
        raise ValueError("total_norm must be a one-element float32 or float64 Array, got "
                         f"shape {total_norm.shape} and dtype {total_norm.dtype}")
    if total_norm.context != queue.context:
        raise ValueError("total_norm lives in another OpenCL context than the gradients")
    norm_dtype = total_norm.dtype
    extra = (total_norm.base_data, _U(_engine.element_offset(total_norm)),
             norm_dtype.type(max_norm))
    for batch in batches(queue, grads):
        enqueue_pass(queue, "mul", batch, extra, norm_dtype=norm_dtype)


# ------------------------------------------------------------- public API
def get_total_norm(tensors, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    """The ``norm_type``-norm of all ``tensors`` together, as
    ``torch.nn.utils.get_total_norm``: a 0-d device Array (float64 when any
    tensor is float64, else float32), computed without waiting for the device.

    ``tensors`` is a float32/float64 pyopencl Array or an iterable of them.
    ``norm_type`` may be ``inf``/``-inf``, 0 (torch's: the number of
    tensors holding a non-zero element) or any other p; the infinity norms
    and negative p raise torch's RuntimeError for an empty tensor. No
    tensors: a float32 zero. ``error_if_nonfinite=True`` reads the norm back
    (a sync) and raises torch's RuntimeError when it is NaN or infinite.
    ``foreach`` is accepted for torch's signature (every path is multi-tensor).
    """
    _check_foreach(foreach)
    tensors = _tensor_list(tensors)
    return _total_norm(tensors, norm_type, error_if_nonfinite, queue_of(tensors))


def clip_grads_with_norm_(parameters, max_norm, total_norm, foreach=None):
    """Multiply every gradient by ``clamp(max_norm / (total_norm + 1e-6), max=1)``
    in place, as ``torch.nn.utils.clip_grads_with_norm_``; ``total_norm`` is
    a one-element device Array (e.g. from :func:`get_total_norm`) and the
    coefficient is computed on the device (no sync)."""
    _check_foreach(foreach)
    parameters = _parameter_list(parameters)
    grads = _grads_of(parameters)
    max_norm = float(max_norm)
    if not grads:
        return
    _clip_with_norm(grads, max_norm, total_norm, queue_of(grads))


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False,
                    foreach=None):
    """Clip the gradients' total norm to ``max_norm``, as
    ``torch.nn.utils.clip_grad_norm_``.

    The norm is taken over every gradient together (``norm_type``: 2, 1,
    ``inf``, ``-inf``, 0 or any p, torch's definitions); each gradient is then
    multiplied in place by ``clamp(max_norm / (total + 1e-6), max=1)`` — also
    when that is 1 or NaN, as torch does, so nothing waits for the device.
    Returns the total norm before clipping as a 0-d device Array (float64
    when any gradient is float64, else float32). ``parameters``: one object
    with ``.grad`` (a :class:`netcl.Parameter`) or an iterable of them;
    ``None`` gradients are skipped. ``error_if_nonfinite=True`` reads the
    norm back (a sync) and raises torch's RuntimeError, leaving the gradients
    unchanged, when it is NaN or infinite.
    """
    _check_foreach(foreach)
    parameters = _parameter_list(parameters)
    grads = _grads_of(parameters)
    max_norm = float(max_norm)
    if not grads:
        fallback = next((p.data.queue for p in parameters
                         if isinstance(getattr(p, "data", None), cla.Array)
                         and p.data.queue is not None), None)
        return _zeros(fallback or default_queue(), np.float32)
    queue = queue_of(grads)
    total = _total_norm(grads, norm_type, error_if_nonfinite, queue)
    _clip_with_norm(grads, max_norm, total, queue)
    return total


def clip_grad_value_(parameters, clip_value, foreach=None):
    """Clamp every gradient to ``[-clip_value, clip_value]`` in place, as
    ``torch.nn.utils.clip_grad_value_`` (NaN stays NaN); returns None."""
    _check_foreach(foreach)
    parameters = _parameter_list(parameters)
    clip_value = float(clip_value)
    grads = _grads_of(parameters)
    if not grads:
        return
    queue = queue_of(grads)
    for batch in batches(queue, grads):
        enqueue_pass(queue, "clamp", batch, (batch.dtype.type(-clip_value),
                                             batch.dtype.type(clip_value)))
