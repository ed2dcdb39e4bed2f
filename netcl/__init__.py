"""netcl: deep-learning optimizers that run on any OpenCL device.

The optimizers live in :mod:`netcl.optim` and follow ``torch.optim``'s names,
defaults and semantics; all optimizer state stays on the device.
"""

__version__ = "0.1.0"

from netcl.device import NoOpenCLDeviceError, default_context, default_queue
from netcl.parameter import Parameter

__all__ = [
    "NoOpenCLDeviceError",
    "Parameter",
    "default_context",
    "default_queue",
]
