"""Shared test helpers: device selection, torch mirrors and ulp-aware comparison.

Devices (see wiki/Testing.md): every test that takes ``ctx_factory`` (or
``device``/``platform``) runs on each selected device. ``PYOPENCL_TEST``
selects them exactly as in pyopencl (``PYOPENCL_TEST=portable``,
``PYOPENCL_TEST=0:1``, ``PYOPENCL_TEST="intel;portable"``); unset, every
visible device except simulators (Oclgrind, which tests/test_oclgrind.py runs
on its own). ``NETCL_REQUIRE_DEVICES=pocl,intel,oclgrind`` turns a missing
implementation into an error instead of fewer tests (CI sets it).

Isolation: with pytest-xdist installed (the ``test`` extra), tests run in
``NETCL_TEST_WORKERS`` worker processes (default: up to 2, one per core); a
worker killed by a crash (an LLVM abort in a kernel build kills the whole
interpreter) is reported as that test's failure and replaced, so the run
still ends with a summary. ``NETCL_TEST_WORKERS=0`` (or ``-p no:xdist``, or
an explicit ``-n``) turns that off.
"""

import gc
import os

import numpy as np
import pyopencl as cl
import pyopencl.array as cla
import pyopencl.tools  # noqa: F401  (cl.tools.clear_first_arg_caches)
import pytest

import netcl
from netcl import _kernels
from netcl.device import is_simulator

# ----------------------------------------------------------------- devices
#: NETCL_REQUIRE_DEVICES names -> text to find in a platform's name or vendor.
_IMPLEMENTATIONS = {"pocl": "portable computing language", "intel": "intel",
                    "oclgrind": "oclgrind", "nvidia": "nvidia", "amd": "amd"}


class ContextFactory:
    """A fresh context on one device per call (pyopencl's ``ctx_factory``)."""

    #: The contexts made for the running test, released when it ends (the
    #: ``_release_contexts`` fixture). Intel's CPU runtime frees a context whose
    #: last Python handle is released even while queues made on it are in use
    #: (clRetainContext then fails with INVALID_CONTEXT), so none may go
    #: before its test is over; and none may outlive it: a GPU runs out of
    #: memory for contexts after a few hundred.
    alive = []

    def __init__(self, device):
        self.device = device

    def __call__(self):
        context = cl.Context([self.device])
        ContextFactory.alive.append(context)
        return context

    def __str__(self):
        # The id names the device, never its address: pytest-xdist workers must
        # collect identical ids.
        return (f"<context factory for <pyopencl.Device '{self.device.name.strip()}' on "
                f"'{self.device.platform.name.strip()}'>>")


@pytest.fixture(autouse=True)
def _release_contexts():
    yield
    ContextFactory.alive.clear()
    # pyopencl memoizes its own kernels (Array.fill, reductions) by context.
    cl.tools.clear_first_arg_caches()
    gc.collect()  # implementations limit how many contexts may be alive


def _platform_devices(platform):
    try:
        return platform.get_devices()
    except cl.Error:
        return []  # a broken platform must not hide a working one


def visible_devices():
    """Every device of every platform the ICD loader shows."""
    try:
        platforms = cl.get_platforms()
    except cl.Error:
        return []
    return [d for p in platforms for d in _platform_devices(p)]


def devices_under_test():
    """The devices ``ctx_factory`` tests run on (see the module docstring)."""
    if os.environ.get("PYOPENCL_TEST"):
        from pyopencl.tools import get_test_platforms_and_devices

        return [d for _, devices in get_test_platforms_and_devices() for d in devices]
    return [d for d in visible_devices() if not is_simulator(d)]


def _matches(device, implementation):
    text = _IMPLEMENTATIONS.get(implementation, implementation)
    platform = device.platform
    return text in f"{platform.name} {platform.vendor}".lower()


def required_implementations():
    names = os.environ.get("NETCL_REQUIRE_DEVICES", "")
    return [n.strip().lower() for n in names.split(",") if n.strip()]


def is_required(implementation):
    return implementation in required_implementations()


def _describe(device):
    return f"{device.name.strip()} [{device.platform.name.strip()}]"


def pytest_generate_tests(metafunc):
    names = [n for n in ("platform", "device", "ctx_factory") if n in metafunc.fixturenames]
    if not names:
        return
    devices = devices_under_test()
    values = []
    for device in devices:
        row = {"platform": device.platform, "device": device,
               "ctx_factory": ContextFactory(device)}
        values.append(tuple(row[n] for n in names))

    def ids(value):
        if isinstance(value, cl.Platform):
            return f"<pyopencl.Platform '{value.name}'>"
        if isinstance(value, cl.Device):
            return f"<pyopencl.Device '{value.name.strip()}'>"
        return str(value)

    metafunc.parametrize(names, values, ids=ids)


def pytest_report_header(config):
    lines = ["OpenCL devices under test: "
             + ("; ".join(_describe(d) for d in devices_under_test()) or "none")]
    required = required_implementations()
    if required:
        lines.append("required (NETCL_REQUIRE_DEVICES): " + ", ".join(required))
    return lines


def pytest_sessionstart(session):
    """NETCL_REQUIRE_DEVICES: a missing implementation fails the run at once.

    A required hardware implementation must be among the devices under test;
    a required simulator (Oclgrind) only visible, since tests/test_oclgrind.py
    runs it by itself.
    """
    if hasattr(session.config, "workerinput"):
        return  # checked once, by the controller
    required = required_implementations()
    if not required:
        return
    tested, visible = devices_under_test(), visible_devices()
    missing = []
    for name in required:
        pool = visible if name == "oclgrind" else tested
        if not any(_matches(d, name) for d in pool):
            missing.append(name)
    if missing:
        raise pytest.UsageError(
            f"NETCL_REQUIRE_DEVICES requires {', '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not among the devices "
            f"{'visible' if missing == ['oclgrind'] else 'under test'}.\n"
            f"  devices under test: {'; '.join(map(_describe, tested)) or 'none'}\n"
            f"  visible devices: {'; '.join(map(_describe, visible)) or 'none'}\n"
            f"  PYOPENCL_TEST={os.environ.get('PYOPENCL_TEST', '')!r} "
            f"OCL_ICD_VENDORS={os.environ.get('OCL_ICD_VENDORS', '')!r}\n"
            "  Intel's runtime needs: pip install \"netcl[intel]\" and "
            "export OCL_ICD_VENDORS=$(python -m netcl.icd)")


# ----------------------------------------------------------------- isolation
@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Run the tests in pytest-xdist workers unless told otherwise.

    Only initial conftests see this hook: running ``pytest tests`` or a file
    under tests/ loads this one early enough.
    """
    if hasattr(config, "workerinput") or not config.pluginmanager.hasplugin("xdist"):
        return
    option = config.option
    if getattr(option, "numprocesses", None) is not None or getattr(option, "tx", None):
        return  # the user chose
    if option.usepdb or option.collectonly or getattr(option, "looponfail", False):
        return
    workers = os.environ.get("NETCL_TEST_WORKERS", "").strip()
    if workers:
        try:
            count = int(workers)
        except ValueError:
            raise pytest.UsageError(
                f"NETCL_TEST_WORKERS={workers!r} is not a number of worker processes") from None
    else:
        count = min(2, os.cpu_count() or 1)
    if count <= 0:
        return
    option.numprocesses = count
    if getattr(option, "dist", "no") == "no":
        option.dist = "load"
    if getattr(option, "maxworkerrestart", None) is None:
        option.maxworkerrestart = 1000  # every crash is reported, none ends the run


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
