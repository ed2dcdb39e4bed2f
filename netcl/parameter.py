"""The parameter type the optimizers update."""

import pyopencl.array as cla


class Parameter:
    """A trainable tensor on an OpenCL device and its gradient.

    ``data`` is a C-contiguous :class:`pyopencl.array.Array` that the optimizers
    update in place; ``grad`` is ``None`` or an Array of the same shape, dtype
    and context. The optimizers accept any object with such ``data``/``grad``
    attributes, so other pyopencl code need not use this class.
    """

    __slots__ = ("data", "grad", "__weakref__")

    def __init__(self, data, grad=None):
        if not isinstance(data, cla.Array):
            raise TypeError(
                f"Parameter data must be a pyopencl.array.Array, got {type(data).__name__}")
        self.data = data
        self.grad = grad

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    def __repr__(self):
        grad = "None" if self.grad is None else "Array"
        return f"Parameter(shape={self.shape}, dtype={self.dtype}, grad={grad})"
