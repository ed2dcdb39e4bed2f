"""Shared test helpers: device selection, torch mirrors and ulp-aware comparison.

Devices come from pyopencl's ``pytest_generate_tests_for_pyopencl`` (set
``PYOPENCL_TEST`` to choose them); every test that takes ``ctx_factory`` runs on
each selected device.
"""

import numpy as np
import pyopencl as cl
import pyopencl.array as cla
import pytest

from pyopencl.tools import pytest_generate_tests_for_pyopencl as pytest_generate_tests  # noqa: F401

import netcl
from netcl import _kernels


def make_queue(ctx_factory, dtype=np.float32):
    context = ctx_factory()
    if np.dtype(dtype) == np.float64 and not _kernels.supports_fp64(context.devices[0]):
        pytest.skip(f"{context.devices[0].name} has no cl_khr_fp64")
    return cl.CommandQueue(context)


def assert_close(actual, expected, what, nulp=None):
    """Compare to a reference within a few units in the last place.

    Each element may differ by ``nulp`` ulp of its own magnitude, plus an
    absolute floor of ``nulp`` ulp of the array's largest magnitude, which
    covers values that came out of a cancellation (e.g. a centered variance).
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if actual.size == 0:
        return
    if nulp is None:
        nulp = 8 if actual.dtype == np.float32 else 64
    eps = np.finfo(actual.dtype).eps
    magnitude = np.maximum(np.abs(actual), np.abs(expected))
    tolerance = nulp * eps * (magnitude + np.max(np.abs(expected)))
    error = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    worst = np.argmax(error - tolerance)
    assert np.all(error <= tolerance), (
        f"{what}: element {np.unravel_index(worst, actual.shape)} is {actual.flat[worst]!r}, "
        f"expected {expected.flat[worst]!r} (tolerance {tolerance.flat[worst]:.3g})")


class Mirror:
    """A netcl parameter and a torch tensor holding the same values."""

    def __init__(self, queue, host):
        import torch

        self.param = netcl.Parameter(cla.to_device(queue, host))
        self.tensor = torch.tensor(host.copy(), requires_grad=True)

    def set_grad(self, queue, grad):
        import torch

        if grad is None:
            self.param.grad = None
            self.tensor.grad = None
        else:
            self.param.grad = cla.to_device(queue, grad)
            self.tensor.grad = torch.tensor(grad.copy())


def assert_state_matches(opt, topt, mirrors, step):
    """Params and every state buffer torch keeps, compared buffer by buffer."""
    for i, m in enumerate(mirrors):
        assert_close(m.param.data.get(), m.tensor.detach().numpy(), f"step {step} param {i}")
        ours = opt.state.get(id(m.param), {})
        theirs = topt.state.get(m.tensor, {})
        assert set(ours) == set(theirs), f"step {step} param {i}: state {set(ours)} != {set(theirs)}"
        for name, value in theirs.items():
            if name == "step":
                assert ours["step"] == int(value.item()), f"step {step} param {i}: step count"
            else:
                assert_close(ours[name].get(), value.numpy(), f"step {step} param {i} {name}")
