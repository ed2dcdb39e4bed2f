"""netcl: deep-learning optimizers that run on any OpenCL device.

The optimizers live in :mod:`netcl.optim` and follow ``torch.optim``'s names,
defaults and semantics; all optimizer state stays on the device.
:func:`netcl.devices` (or ``python -m netcl.info``) lists the OpenCL devices,
the one netcl uses by default and the kernel layout on each.
"""

__version__ = "0.1.0"

from netcl.device import NoOpenCLDeviceError, default_context, default_queue
from netcl.parameter import Parameter

__all__ = [
    "NoOpenCLDeviceError",
    "Parameter",
    "default_context",
    "default_queue",
    "devices",
]


def __getattr__(name):
    # netcl.devices comes from netcl.info, imported on first use so that
    # `python -m netcl.info` does not find its module already imported.
    if name == "devices":
        from netcl.info import devices

        globals()["devices"] = devices
        return devices
    raise AttributeError(f"module 'netcl' has no attribute {name!r}")
