"""Choosing the OpenCL device netcl uses when the caller names none, and the
kernel layout (vector width, work-group size) it uses on each device."""

import os
import threading
from dataclasses import dataclass

import numpy as np
import pyopencl as cl


class NoOpenCLDeviceError(RuntimeError):
    """No OpenCL platform or device could be found."""


_INSTALL_HINT = (
    'no OpenCL device was found. On a machine without a GPU driver, install the '
    'PoCL CPU device with: pip install "netcl[pocl]"'
)

_lock = threading.Lock()
_default = {}


def is_simulator(device):
    """Whether ``device`` is Oclgrind, which checks every access but runs
    orders of magnitude slower than hardware: netcl never picks it by itself."""
    return "oclgrind" in device.platform.name.lower()


def _pick_device():
    try:
        platforms = cl.get_platforms()
    except cl.Error as exc:  # the ICD loader reports "no platforms" as an error
        raise NoOpenCLDeviceError(_INSTALL_HINT) from exc
    devices = []
    for platform in platforms:
        try:
            devices.extend(platform.get_devices())
        except cl.Error:
            continue  # a broken platform must not hide a working one
    if not devices:
        raise NoOpenCLDeviceError(_INSTALL_HINT)
    return pick_reason(devices)[0]


def pick_reason(devices):
    """``(device, reason)``: the device netcl picks from ``devices`` and why.

    The first GPU, else the first CPU, else the first device; a simulator
    (Oclgrind, whose type claims every bit) only when nothing else exists.
    """
    hardware = [d for d in devices if not is_simulator(d)]
    gpus = [d for d in hardware if d.type & cl.device_type.GPU]
    cpus = [d for d in hardware if d.type & cl.device_type.CPU]
    if gpus:
        return gpus[0], "the first GPU"
    if cpus:
        return cpus[0], "no GPU: the first CPU device"
    if hardware:
        return hardware[0], "no GPU or CPU device: the first device"
    return devices[0], "only a simulator (Oclgrind) is installed"


def default_context():
    """Return the process-wide default OpenCL context, creating it on first use.

    ``PYOPENCL_CTX`` is honoured exactly as :func:`pyopencl.create_some_context`
    does (e.g. ``PYOPENCL_CTX=0:1``). Otherwise the first GPU is preferred, then
    the first CPU device (PoCL). With no OpenCL platform at all a
    :class:`NoOpenCLDeviceError` says how to install PoCL.
    """
    with _lock:
        if "context" not in _default:
            if os.environ.get("PYOPENCL_CTX"):
                _default["context"] = cl.create_some_context(interactive=False)
            else:
                _default["context"] = cl.Context([_pick_device()])
        return _default["context"]


def default_queue():
    """Return the in-order command queue on :func:`default_context`."""
    context = default_context()
    with _lock:
        if "queue" not in _default:
            _default["queue"] = cl.CommandQueue(context)
        return _default["queue"]


# ---------------------------------------------------------------- layouts
#: Environment variables that override the layout (documented in README.md,
#: "Devices"). Read each time a layout is computed: once per optimizer.
LAYOUT_ENV = "NETCL_LAYOUT"
VECTOR_BYTES_ENV = "NETCL_VECTOR_BYTES"

# The widest vector netcl uses on a CPU by default. PoCL 3.0 reports a native
# float width of 16 (64 bytes) on Zen 4 while its LLVM compiles for znver3,
# which has no AVX-512: 64-byte vectors then abort the process inside LLVM,
# where no exception can be raised. 32 bytes built and ran on every CPU and
# compiler seen; on an AVX-512 Xeon 64 bytes measured no faster (wiki/Performance.md).
_CPU_VECTOR_BYTES = 32
# GPUs coalesce 16-byte vector accesses across a work-group. A group runs
# one chunk-table row (CHUNK elements), and a multi-tensor launch of
# ResNet-50's tensors has only a few hundred rows, so small groups leave a big
# GPU idle. On an NVIDIA H200 (bench, Adam on ResNet-50 shapes, median of 20)
# groups of 64 took 0.49 ms, 128 0.39 ms and 256 0.41 ms (BERT-base: 0.99,
# 0.94, 0.93 ms): 128, or the device's maximum if that is smaller.
_GPU_VECTOR_BYTES = 16
_GPU_GROUP = 128
# 64 bytes is float16, the widest float vector OpenCL C has.
_VALID_BYTES = (4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Layout:
    """How netcl's kernels are laid out on one device.

    ``kind`` is ``"cpu"`` (one work-item per group, each running its row as a
    vector loop: PoCL runs larger groups 30-60% slower) or ``"gpu"``
    (work-groups of 128 coalescing 16-byte vectors); ``vector_bytes`` is the
    explicit vector size in the kernels' bodies; ``reason`` says where both
    came from.
    """

    kind: str
    vector_bytes: int
    local_size: int
    reason: str

    def vector_width(self, dtype):
        """Elements of ``dtype`` per explicit vector (at least 1)."""
        return max(1, self.vector_bytes // np.dtype(dtype).itemsize)


def _gpu_group(device):
    """_GPU_GROUP, or the largest power of two the device allows below it
    (the kernels' local reductions halve the group)."""
    size = _GPU_GROUP
    while size > 1 and size > device.max_work_group_size:
        size //= 2
    return size


def _env_choice(name, valid):
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return None
    if value not in valid:
        raise ValueError(f"{name}={os.environ[name]!r} is not valid: use one of "
                         f"{', '.join(valid)} (or leave it unset)")
    return value


def layout(device):
    """The :class:`Layout` netcl uses on ``device``.

    By default a CPU device gets ``"cpu"`` with 32-byte vectors and any other
    device ``"gpu"`` with 16-byte vectors. ``NETCL_LAYOUT=cpu|gpu`` forces the
    kind (``gpu`` runs the GPU code path anywhere, e.g. under Oclgrind) and
    ``NETCL_VECTOR_BYTES=4|8|16|32|64`` the vector size; an invalid
    value raises ``ValueError`` naming the variable. The vector never exceeds
    the device's guaranteed buffer alignment, since aligned launches read
    whole vectors through vector pointers.
    """
    kind = _env_choice(LAYOUT_ENV, ("cpu", "gpu"))
    reasons = []
    if kind is not None:
        reasons.append(f"{LAYOUT_ENV}={kind}")
    else:
        kind = "cpu" if device.type & cl.device_type.CPU else "gpu"
        reasons.append(f"{kind.upper()} device")
    forced = _env_choice(VECTOR_BYTES_ENV, tuple(str(b) for b in _VALID_BYTES))
    if forced is not None:
        vector_bytes = int(forced)
        reasons.append(f"{VECTOR_BYTES_ENV}={vector_bytes}")
    else:
        vector_bytes = _CPU_VECTOR_BYTES if kind == "cpu" else _GPU_VECTOR_BYTES
    aligned_bytes = max(4, device.mem_base_addr_align // 8)
    if vector_bytes > aligned_bytes:
        vector_bytes = aligned_bytes
        reasons.append(f"capped at the device's {aligned_bytes}-byte buffer alignment")
    local_size = 1 if kind == "cpu" else _gpu_group(device)
    return Layout(kind, vector_bytes, local_size, ", ".join(reasons))
