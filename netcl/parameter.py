"""The parameter type the optimizers update."""

import itertools

import pyopencl.array as cla

# Bumped on every assignment to any Parameter's .data or .grad. An optimizer
# whose parameters are all Parameters compares it with the value it saw at
# its last step: equal means no array changed, and the step skips every
# per-parameter check (constant host cost per step).
_assignments = itertools.count()
_generation = [0]
_data_generation = [0]  # bumped by assignments to .data only


def generation():
    """A number that changes whenever any :class:`Parameter`'s ``data`` or
    ``grad`` is assigned."""
    return _generation[0]


def data_generation():
    """A number that changes whenever any :class:`Parameter`'s ``data`` is
    assigned (a step whose only changes are new gradients then skips
    looking at every parameter's data)."""
    return _data_generation[0]


class Parameter:
    """A trainable tensor on an OpenCL device and its gradient.

    ``data`` is a C-contiguous :class:`pyopencl.array.Array` that the optimizers
    update in place; ``grad`` is ``None`` or an Array of the same shape, dtype
    and context. The optimizers accept any object with such ``data``/``grad``
    attributes, so other pyopencl code need not use this class; with this
    class a step whose arrays are those of the last step costs the host the
    same whatever the number of parameters.
    """

    __slots__ = ("_data", "_grad", "__weakref__")

    def __init__(self, data, grad=None):
        if not isinstance(data, cla.Array):
            raise TypeError(
                f"Parameter data must be a pyopencl.array.Array, got {type(data).__name__}")
        self.data = data
        self.grad = grad

    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value):
        self._data = value
        _generation[0] = _data_generation[0] = next(_assignments)

    @property
    def grad(self):
        return self._grad

    @grad.setter
    def grad(self, value):
        self._grad = value
        _generation[0] = next(_assignments)

    @property
    def shape(self):
        return self._data.shape

    @property
    def dtype(self):
        return self._data.dtype

    def __repr__(self):
        grad = "None" if self._grad is None else "Array"
        return f"Parameter(shape={self.shape}, dtype={self.dtype}, grad={grad})"
