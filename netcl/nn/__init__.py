"""A minimal set of layers to train small networks on the device.

Just enough to train a multilayer perceptron with the :mod:`netcl.optim`
optimizers without leaving the OpenCL device: :class:`Linear`, :class:`ReLU`,
:class:`Sequential`, :func:`softmax_cross_entropy` and :func:`take_rows`
(gathers a mini-batch from a dataset that lives on the device).

There is no autograd: each layer remembers what its last :meth:`forward` needs
and :meth:`backward` takes the gradient of the loss with respect to that
forward's output. Parameter gradients are *accumulated* into ``.grad`` as in
torch (allocated when ``None``), so call the optimizer's ``zero_grad()``
between steps. Shapes follow torch: inputs are ``(batch, features)`` and
``Linear.weight`` is ``(out_features, in_features)``.

Arrays may be views with an offset (``x[16:32]``); everything is enqueued on
one in-order queue and nothing waits for the device except reading a result.

Gradient clipping (``clip_grad_norm_``, ``clip_grad_value_``) lives in
:mod:`netcl.nn.utils`, as in torch.
"""

import numpy as np
import pyopencl.array as cla

from netcl import _kernels
from netcl.device import default_queue, layout as device_layout
from netcl.parameter import Parameter

__all__ = ["Linear", "ReLU", "Sequential", "softmax_cross_entropy", "take_rows", "utils"]

_BLOCK_ROWS = 4  # rows of outputs per matmul work item; columns: one device vector
_XENT_GROUP = 64
_U = np.uint32


def _kernel(queue, name, scalar_arg_dtypes, **flags):
    return _kernels.get_kernel(queue.context, "nn.cl.mako", name, scalar_arg_dtypes,
                               kernel=name, **flags)


def _arg(array):
    """(buffer, element offset) of an Array, for the kernels' pointer arguments."""
    offset, rest = divmod(array.offset, array.dtype.itemsize)
    if rest:
        raise ValueError("array offset is not a whole number of elements")
    return [array.base_data, _U(offset)]


def _check(array, name, ndim=None, dtype=None):
    if not isinstance(array, cla.Array):
        raise TypeError(f"{name} must be a pyopencl.array.Array, got {type(array).__name__}")
    if ndim is not None and array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {array.shape}")
    if dtype is not None and array.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype)}, got {array.dtype}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")


def _queue_of(array, queue=None):
    return queue or array.queue or default_queue()


def _elementwise_range(n):
    group = 64
    return (max(1, -(-n // group)) * group,), (group,)


def _matmul(queue, a, b, out, m, n, k, trans_a=False, trans_b=False, bias=None,
            accumulate=False):
    """out[m, n] (+)= op(a) @ op(b) (+ bias) on the device."""
    if m == 0 or n == 0:
        return out
    c_type = _kernels.c_type(out.dtype)
    args = _arg(a) + _arg(b) + _arg(out)
    dtypes = [None, _U] * 3
    if bias is not None:
        args += _arg(bias)
        dtypes += [None, _U]
    dtypes += [_U] * 4
    # One device vector of columns (at least 2: the template has no 1-wide vectors).
    rows, width = _BLOCK_ROWS, max(2, device_layout(queue.device).vector_width(out.dtype))
    kernel = _kernel(queue, "matmul", dtypes, T=c_type, rows=rows, width=width,
                     trans_a=bool(trans_a), trans_b=bool(trans_b), bias=bias is not None)
    kernel(queue, (-(-n // width), -(-m // rows)), None, *args, _U(m), _U(n), _U(k),
           _U(accumulate))
    return out


class Linear:
    """``y = x @ weight.T + bias``, initialised like ``torch.nn.Linear``.

    ``weight`` (``(out_features, in_features)``) and ``bias``
    (``(out_features,)``) are :class:`netcl.Parameter` objects drawn from
    U(-1/sqrt(in_features), 1/sqrt(in_features)) with a NumPy generator seeded
    by ``seed``, so the same seed gives the same network on every device.
    """

    def __init__(self, in_features, out_features, queue=None, seed=0, dtype=np.float32):
        if in_features < 1 or out_features < 1:
            raise ValueError("in_features and out_features must be positive")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.queue = queue or default_queue()
        dtype = np.dtype(dtype)
        _kernels.c_type(dtype)  # rejects anything but float32/float64
        rng = np.random.default_rng(seed)
        bound = 1.0 / np.sqrt(in_features)
        weight = rng.uniform(-bound, bound, (out_features, in_features)).astype(dtype)
        bias = rng.uniform(-bound, bound, out_features).astype(dtype)
        self.weight = Parameter(cla.to_device(self.queue, weight))
        self.bias = Parameter(cla.to_device(self.queue, bias))
        self._input = None

    def parameters(self):
        return [self.weight, self.bias]

    def forward(self, x):
        _check(x, "Linear input", 2, self.weight.dtype)
        if x.shape[1] != self.in_features:
            raise ValueError(f"Linear expects {self.in_features} input features, "
                             f"got shape {x.shape}")
        out = cla.empty(self.queue, (x.shape[0], self.out_features), x.dtype)
        _matmul(self.queue, x, self.weight.data, out, x.shape[0], self.out_features,
                self.in_features, trans_b=True, bias=self.bias.data)
        self._input = x
        return out

    __call__ = forward

    def backward(self, grad_out, input_grad=True):
        """Accumulate ``weight.grad``/``bias.grad``; return d loss/d input (or None)."""
        x = self._input
        if x is None:
            raise RuntimeError("Linear.backward called before forward")
        _check(grad_out, "Linear grad_out", 2, x.dtype)
        if grad_out.shape != (x.shape[0], self.out_features):
            raise ValueError(f"grad_out has shape {grad_out.shape}, "
                             f"expected {(x.shape[0], self.out_features)}")
        batch, q = x.shape[0], self.queue
        for p in self.parameters():
            accumulate = p.grad is not None
            if accumulate:
                _check(p.grad, "existing .grad", p.data.ndim, p.dtype)
            else:
                p.grad = cla.empty(q, p.shape, p.dtype)
            if p is self.weight:  # grad_w[o, i] (+)= sum_n grad_out[n, o] x[n, i]
                _matmul(q, grad_out, x, p.grad, self.out_features, self.in_features, batch,
                        trans_a=True, accumulate=accumulate)
            else:
                kernel = _kernel(q, "sum_rows", [None, _U, None, _U, _U, _U, _U],
                                 T=_kernels.c_type(p.dtype))
                global_size, local_size = _elementwise_range(self.out_features)
                kernel(q, global_size, local_size, *_arg(grad_out), *_arg(p.grad),
                       _U(batch), _U(self.out_features), _U(accumulate))
        if not input_grad:
            return None
        grad_in = cla.empty(q, x.shape, x.dtype)
        return _matmul(q, grad_out, self.weight.data, grad_in, batch, self.in_features,
                       self.out_features)

    def __repr__(self):
        return f"Linear(in_features={self.in_features}, out_features={self.out_features})"


class ReLU:
    """``max(x, 0)``; backward passes the gradient where the output is positive."""

    def __init__(self, queue=None):
        self.queue = queue
        self._output = None

    def parameters(self):
        return []

    def forward(self, x):
        _check(x, "ReLU input")
        q = _queue_of(x, self.queue)
        out = cla.empty(q, x.shape, x.dtype)
        kernel = _kernel(q, "relu_forward", [None, _U, None, _U, _U],
                         T=_kernels.c_type(x.dtype))
        kernel(q, *_elementwise_range(x.size), *_arg(x), *_arg(out), _U(x.size))
        self._output = out
        return out

    __call__ = forward

    def backward(self, grad_out, input_grad=True):
        y = self._output
        if y is None:
            raise RuntimeError("ReLU.backward called before forward")
        _check(grad_out, "ReLU grad_out", dtype=y.dtype)
        if grad_out.shape != y.shape:
            raise ValueError(f"grad_out has shape {grad_out.shape}, expected {y.shape}")
        if not input_grad:
            return None
        q = _queue_of(y, self.queue)
        grad_in = cla.empty(q, y.shape, y.dtype)
        kernel = _kernel(q, "relu_backward", [None, _U] * 3 + [_U],
                         T=_kernels.c_type(y.dtype))
        kernel(q, *_elementwise_range(y.size), *_arg(grad_out), *_arg(y), *_arg(grad_in),
               _U(y.size))
        return grad_in

    def __repr__(self):
        return "ReLU()"


class Sequential:
    """Layers applied in order; :meth:`backward` runs them in reverse."""

    def __init__(self, *layers):
        self.layers = list(layers)

    def parameters(self):
        return [p for layer in self.layers for p in layer.parameters()]

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    __call__ = forward

    def backward(self, grad_out, input_grad=True):
        """Backpropagate; ``input_grad=False`` skips the first layer's input gradient."""
        for i, layer in enumerate(reversed(self.layers)):
            last = i == len(self.layers) - 1
            grad_out = layer.backward(grad_out, input_grad=input_grad or not last)
        return grad_out

    def __repr__(self):
        return "Sequential(" + ", ".join(map(repr, self.layers)) + ")"


def _device_labels(labels, queue, rows, classes):
    if isinstance(labels, cla.Array):
        _check(labels, "labels", 1, np.int32)
        return labels
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise TypeError("labels must be a 1-D integer array")
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"labels must lie in [0, {classes}), got "
                         f"[{labels.min()}, {labels.max()}]")
    return cla.to_device(queue, labels.astype(np.int32))


def softmax_cross_entropy(logits, labels):
    """Mean softmax cross-entropy of ``logits`` (N, C) against integer ``labels`` (N,).

    Equals ``torch.nn.functional.cross_entropy(logits, labels)``. Returns
    ``(loss, grad)``: ``loss`` is a 0-d device Array (``float(loss.get())``
    reads it), ``grad`` the (N, C) gradient of the loss w.r.t. ``logits``.
    ``labels`` is a host integer array (range-checked) or an int32 device
    Array (a label outside [0, C) makes the loss NaN).
    """
    _check(logits, "logits", 2)
    rows, classes = logits.shape
    if rows == 0 or classes == 0:
        raise ValueError(f"logits must be non-empty, got shape {logits.shape}")
    q = _queue_of(logits)
    labels = _device_labels(labels, q, rows, classes)
    if labels.shape != (rows,):
        raise ValueError(f"labels has shape {labels.shape}, expected ({rows},)")
    grad = cla.empty(q, logits.shape, logits.dtype)
    loss = cla.empty(q, (), logits.dtype)
    kernel = _kernel(q, "softmax_xent", [None, _U] * 4 + [_U, _U, logits.dtype],
                     T=_kernels.c_type(logits.dtype), group=_XENT_GROUP)
    kernel(q, (_XENT_GROUP,), (_XENT_GROUP,), *_arg(logits), *_arg(labels), *_arg(grad),
           *_arg(loss), _U(rows), _U(classes), logits.dtype.type(1.0 / rows))
    return loss, grad


def take_rows(x, index, queue=None):
    """``x[index]`` along the first axis, on the device: a mini-batch gather.

    ``x`` is a 1-D or 2-D float or int32 Array; ``index`` an int32 device
    Array or a host integer array (range-checked). On the device an index
    outside the rows yields NaN (floats) or -1 (int32) rather than reading
    out of bounds.
    """
    _check(x, "x")
    if x.ndim not in (1, 2):
        raise ValueError(f"take_rows needs a 1-D or 2-D array, got shape {x.shape}")
    q = _queue_of(x, queue)
    n_rows = x.shape[0]
    if not isinstance(index, cla.Array):
        index = np.asarray(index)
        if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
            raise TypeError("index must be a 1-D integer array")
        if index.size and (index.min() < 0 or index.max() >= n_rows):
            raise IndexError(f"index out of range for {n_rows} rows")
        index = cla.to_device(q, index.astype(np.int32))
    _check(index, "index", 1, np.int32)
    if x.dtype == np.int32:
        c_type, fill = "int", "-1"
    else:
        c_type, fill = _kernels.c_type(x.dtype), "NAN"
    cols = x.shape[1] if x.ndim == 2 else 1
    count = index.shape[0]
    out = cla.empty(q, (count,) + x.shape[1:], x.dtype)
    if count == 0:
        return out
    kernel = _kernel(q, "take_rows", [None, _U] * 3 + [_U] * 3, T=c_type, fill=fill)
    tile = 8
    global_size = (-(-cols // tile) * tile, -(-count // tile) * tile)
    kernel(q, global_size, (tile, tile), *_arg(x), *_arg(index), *_arg(out),
           _U(n_rows), _U(cols), _U(count))
    return out


from netcl.nn import utils  # noqa: E402  (torch.nn.utils counterpart)
