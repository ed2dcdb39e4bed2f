"""Choosing the OpenCL device that netcl uses when the caller names none."""

import os
import threading

import pyopencl as cl


class NoOpenCLDeviceError(RuntimeError):
    """No OpenCL platform or device could be found."""


_INSTALL_HINT = (
    'no OpenCL device was found. On a machine without a GPU driver, install the '
    'PoCL CPU device with: pip install "netcl[pocl]"'
)

_lock = threading.Lock()
_default = {}


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
    gpus = [d for d in devices if d.type & cl.device_type.GPU]
    cpus = [d for d in devices if d.type & cl.device_type.CPU]
    return (gpus or cpus or devices)[0]


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
