"""The kernel layout netcl picks per device, its overrides, the default device
choice, and recovery from a poisoned on-disk kernel cache."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyopencl as cl
import pytest

from netcl import device as netcl_device

from conftest import make_queue
from _new_process import python_path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def queue(ctx_factory):
    return make_queue(ctx_factory)


def test_cpu_vectors_are_never_wider_than_32_bytes(queue, monkeypatch):
    """PoCL 3.0 on Zen 4 reports 64-byte native vectors but compiles for znver3:
    64-byte vectors abort the process inside LLVM."""
    monkeypatch.delenv(netcl_device.LAYOUT_ENV, raising=False)
    monkeypatch.delenv(netcl_device.VECTOR_BYTES_ENV, raising=False)
    layout = netcl_device.layout(queue.device)
    if queue.device.type & cl.device_type.CPU:
        assert layout.kind == "cpu" and layout.local_size == 1
        assert layout.vector_bytes <= 32
        assert layout.vector_width(np.float64) <= 4
    else:
        assert layout.kind == "gpu" and layout.local_size == 128
        assert layout.vector_bytes == 16


VECTOR_TYPE = re.compile(r"\b(u?char|u?short|u?int|u?long|half|float|double)(2|3|4|8|16)\b")
SCALAR_BYTES = dict(char=1, uchar=1, short=2, ushort=2, int=4, uint=4, long=8, ulong=8,
                    half=2, float=4, double=8)


def test_no_kernel_declares_a_vector_wider_than_the_layout(ctx_factory, monkeypatch):
    """Every vector type in every kernel the optimizers and the gradient
    utilities build fits the layout's vector bytes, accumulators included
    (float32 gradients summed in float64 once made double8: PoCL on Zen 4
    crashed compiling the p-norm's pow)."""
    import pyopencl.array as cla
    import netcl
    from netcl import _kernels, amp
    from netcl.nn.utils import clip_grad_norm_, clip_grad_value_
    from netcl.optim import Adam, AdamW, RMSProp, SGD
    from netcl.optim._precision import BFLOAT16
    monkeypatch.delenv(netcl_device.LAYOUT_ENV, raising=False)
    monkeypatch.delenv(netcl_device.VECTOR_BYTES_ENV, raising=False)
    queue = make_queue(ctx_factory)
    limit = netcl_device.layout(queue.device).vector_bytes
    sources = []
    build = _kernels._build

    def recording_build(context, source, *args, **kwargs):
        sources.append(source)
        return build(context, source, *args, **kwargs)

    monkeypatch.setattr(_kernels, "_build", recording_build)
    dtypes = [np.dtype(np.float32), BFLOAT16]
    if _kernels.supports_fp64(queue.device):
        dtypes.append(np.dtype(np.float64))
    rng = np.random.default_rng(0)

    def params(dtype):
        out = []
        for n in (5000, 37):
            p = netcl.Parameter(cla.to_device(queue, rng.standard_normal(n).astype(dtype)))
            p.grad = cla.to_device(queue, rng.standard_normal(n).astype(dtype))
            out.append(p)
        return out

    for dtype in dtypes:
        if dtype != BFLOAT16:
            for norm in (2.0, 1.0, float("inf"), 0.0, 3.0):
                clip_grad_norm_(params(dtype), 1.0, norm)
            clip_grad_value_(params(dtype), 0.5)
            scaler = amp.GradScaler(queue)
            opt = SGD(params(dtype), lr=0.1)
            scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
        state = ["float32", "int8"] if dtype == BFLOAT16 else ["float32"]
        for state_dtype in state:
            options = dict(state_dtype=state_dtype,
                           stochastic_rounding=dtype == BFLOAT16)
            for cls, kwargs in ((Adam, dict(amsgrad=True, max_grad_norm=1.0)),
                                (AdamW, dict(skip_nonfinite=True, track_stats=True)),
                                (RMSProp, dict(centered=True, momentum=0.9)),
                                (SGD, dict(lr=0.1, momentum=0.9, nesterov=True))):
                if cls is SGD and state_dtype == "int8":
                    continue
                cls(params(dtype), **kwargs, **options).step()
    queue.finish()
    assert sources
    widest = {}
    for source in sources:
        for scalar, lanes in VECTOR_TYPE.findall(source):
            size = SCALAR_BYTES[scalar] * (4 if lanes == "3" else int(lanes))
            widest[scalar + lanes] = size
    too_wide = sorted(t for t, size in widest.items() if size > limit)
    where = [re.findall(r"__kernel void (\w+)", source) for source in sources
             if any(t in source for t in too_wide)]
    assert not too_wide, (limit, too_wide, where)


def test_layout_overrides(queue, monkeypatch):
    monkeypatch.setenv(netcl_device.LAYOUT_ENV, "gpu")
    monkeypatch.setenv(netcl_device.VECTOR_BYTES_ENV, "8")
    layout = netcl_device.layout(queue.device)
    assert (layout.kind, layout.local_size, layout.vector_bytes) == ("gpu", 128, 8)
    assert layout.vector_width(np.float32) == 2
    assert "NETCL_LAYOUT=gpu" in layout.reason and "NETCL_VECTOR_BYTES=8" in layout.reason


@pytest.mark.parametrize("name, value", [
    ("NETCL_LAYOUT", "fpga"), ("NETCL_VECTOR_BYTES", "24"), ("NETCL_VECTOR_BYTES", "sixty")])
def test_invalid_override_names_the_variable(queue, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        netcl_device.layout(queue.device)


class FakePlatform:
    def __init__(self, name):
        self.name = name


class FakeDevice:
    def __init__(self, platform, type):
        self.platform = FakePlatform(platform)
        self.type = type


def test_default_device_is_never_the_simulator():
    all_bits = cl.device_type.CPU | cl.device_type.GPU | cl.device_type.ACCELERATOR
    grind = FakeDevice("Oclgrind", all_bits)
    pocl = FakeDevice("Portable Computing Language", cl.device_type.CPU)
    gpu = FakeDevice("AMD Accelerated Parallel Processing", cl.device_type.GPU)
    assert netcl_device.pick_reason([grind, pocl])[0] is pocl
    assert netcl_device.pick_reason([grind, pocl, gpu])[0] is gpu
    assert netcl_device.pick_reason([grind])[0] is grind  # nothing else to run on


STEP = """
import numpy as np, pyopencl.array as cla, netcl
from netcl.optim import Adam
q = netcl.default_queue()
p = netcl.Parameter(cla.to_device(q, np.linspace(-1, 1, 1000).astype(np.float32)))
p.grad = cla.to_device(q, np.linspace(2, -2, 1000).astype(np.float32))
opt = Adam([p], lr=0.1)
opt.step(); opt.step()
np.save(__import__("sys").argv[1], p.data.get())
"""


def _ctx_env(queue, tmp_path):
    for p, platform in enumerate(cl.get_platforms()):
        devices = platform.get_devices()
        if queue.device in devices:
            ctx = f"{p}:{devices.index(queue.device)}"
            break
    return dict(os.environ, PYOPENCL_CTX=ctx, PYTHONPATH=python_path(),
                POCL_CACHE_DIR=str(tmp_path / "pocl"), XDG_CACHE_HOME=str(tmp_path / "xdg"))


def test_poisoned_pocl_cache_is_rebuilt_and_evicted(queue, tmp_path):
    """A broken program.bc in PoCL's cache yields a program without kernels
    (INVALID_KERNEL_NAME). The step must still run, correctly, with a warning
    naming the entry, and the entry must be gone for the next process."""
    if "Portable Computing Language" not in queue.device.platform.name:
        pytest.skip("PoCL's on-disk cache layout")
    env = _ctx_env(queue, tmp_path)
    script = tmp_path / "step.py"
    script.write_text(STEP)

    def run(name):
        return subprocess.run([sys.executable, "-W", "always", str(script),
                               str(tmp_path / name)],
                              env=env, capture_output=True, text=True, timeout=300)

    clean = run("clean.npy")
    assert clean.returncode == 0, clean.stderr
    entries = list((tmp_path / "pocl").rglob("program.bc"))
    assert entries
    for entry in entries:  # a broken binary, as an aborted build can leave
        entry.write_bytes(entry.read_bytes()[:200])
    # PoCL itself may abort at exit once it has loaded a broken binary: judge
    # this run by its output and warning, the next one by everything.
    poisoned = run("poisoned.npy")
    assert "broken entry in the on-disk kernel cache" in poisoned.stderr, poisoned.stderr
    assert str(tmp_path / "pocl") in poisoned.stderr
    assert np.array_equal(np.load(tmp_path / "clean.npy"), np.load(tmp_path / "poisoned.npy"))
    after = run("after.npy")
    assert after.returncode == 0, after.stderr
    assert "broken entry" not in after.stderr
    assert np.array_equal(np.load(tmp_path / "clean.npy"), np.load(tmp_path / "after.npy"))


def test_build_error_names_the_cache_directories(queue, monkeypatch):
    from netcl import _kernels

    def broken(context, source, kernel_name, bypass_cache):
        raise cl.LogicError("clCreateKernel failed: INVALID_KERNEL_NAME")

    monkeypatch.setattr(_kernels, "_build", broken)
    fresh = cl.Context([queue.device])  # nothing cached for it yet
    with pytest.raises(_kernels.KernelBuildError) as info:
        _kernels.get_program(fresh, "nn.cl.mako", "relu_forward", kernel="relu_forward",
                             T="float")
    for directory in _kernels.cache_directories():
        assert directory in str(info.value)
