"""The one place where OpenCL kernels are rendered, built and cached.

Templates live in the ``netcl.kernels`` package (the top-level ``kernels/``
folder of the source tree) and are rendered by Mako with
``strict_undefined=True``, so a flag a template forgets to receive is an error
rather than a silently empty string. Only structural choices (dtypes, variant
flags, vector width, number of tensors per launch) go into the rendering and the
cache key; hyperparameters are kernel arguments, so changing a learning rate
never rebuilds anything.

Programs are cached per context in a ``WeakKeyDictionary`` so that dropping a
context frees its programs. pyopencl and PoCL also keep compiled binaries on
disk, which makes a rebuild in a new process cheap.
"""

import threading
import weakref
from importlib import resources

import numpy as np
import pyopencl as cl
from mako.lookup import TemplateLookup

_lookup = None
_lock = threading.Lock()
_programs = weakref.WeakKeyDictionary()


def _template_lookup():
    global _lookup
    if _lookup is None:
        directory = resources.files("netcl.kernels")
        _lookup = TemplateLookup(directories=[str(directory)], strict_undefined=True)
    return _lookup


def render(template_name, **flags):
    """Render a kernel template to OpenCL C source."""
    return _template_lookup().get_template(template_name).render(**flags)


def c_type(dtype):
    """The OpenCL C scalar type name of a NumPy float dtype."""
    dtype = np.dtype(dtype)
    names = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
    try:
        return names[dtype]
    except KeyError:
        raise TypeError(f"netcl kernels support float32 and float64, not {dtype}") from None


def supports_fp64(device):
    return "cl_khr_fp64" in device.extensions.split() or device.double_fp_config != 0


def build_options(device):
    # Exact IEEE division and sqrt where the device offers them: OpenCL otherwise
    # allows 2.5-3 ulp, which would break parity with torch on GPUs.
    options = []
    if device.single_fp_config & cl.device_fp_config.CORRECTLY_ROUNDED_DIVIDE_SQRT:
        options.append("-cl-fp32-correctly-rounded-divide-sqrt")
    return options


def get_kernel(context, template_name, kernel_name, scalar_arg_dtypes, **flags):
    """Return a cached kernel object with its scalar argument dtypes set.

    The key is the template, the kernel name and the rendering flags. Kernel
    objects are cached too: ``program.name`` creates a new object on each access
    and a fresh object would have to re-learn its argument types, which turns a
    ~5 us launch into ~60 us.
    """
    key = (template_name, kernel_name, tuple(sorted(flags.items())))
    with _lock:
        per_context = _programs.setdefault(context, {})
        kernel = per_context.get(key)
    if kernel is not None:
        return kernel
    source = render(template_name, **flags)
    device = context.devices[0]
    program = cl.Program(context, source).build(options=build_options(device))
    kernel = getattr(program, kernel_name)
    kernel.set_scalar_arg_dtypes(list(scalar_arg_dtypes))
    with _lock:
        return per_context.setdefault(key, kernel)
