"""The one place where OpenCL kernels are rendered, built and cached.

Templates live in the ``netcl.kernels`` package (the top-level ``kernels/``
folder of the source tree) and are rendered by Mako with
``strict_undefined=True``, so a flag a template forgets to receive is an error
rather than a silently empty string. Only structural choices (dtypes, variant
flags, vector width, number of tensors per launch) go into the rendering and the
cache key; hyperparameters are kernel arguments, so changing a learning rate
never rebuilds anything.

Programs are cached per context in a ``WeakKeyDictionary`` so that dropping a
context frees its programs (the cached values must not refer to the context). pyopencl and PoCL also keep compiled binaries on
disk, which makes a rebuild in a new process cheap.
"""

import glob
import os
import shutil
import threading
import time
import uuid
import warnings
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
    # PoCL's CPU devices call their builtins instead of inlining them (when
    # the host lacks a CPU feature the builtin library was built for); the
    # kernels then use inline equivalents (kernels/inline_math.cl.mako).
    if "Portable Computing Language" in device.platform.name and \
            device.type & cl.device_type.CPU:
        options.append("-DNETCL_INLINE_MATH")
    return options


class KernelBuildError(RuntimeError):
    """A kernel could not be built, even bypassing the on-disk caches."""


def cache_directories():
    """The on-disk binary caches a build may read: pyopencl's and PoCL's."""
    import platformdirs  # a pyopencl dependency; pyopencl finds its cache the same way

    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    pocl = os.environ.get("POCL_CACHE_DIR") or os.path.join(xdg, "pocl", "kcache")
    return [platformdirs.user_cache_dir("pyopencl", "pyopencl"), pocl]


def _build(context, source, kernel_name, bypass_cache):
    options = build_options(context.devices[0])
    if bypass_cache:
        # pyopencl's binary cache is skipped with cache_dir=False; PoCL keys its
        # own cache by source and options (not comments), so a unique macro
        # gives a fresh entry.
        options = options + [f"-DNETCL_REBUILD_{uuid.uuid4().hex}"]
        program = cl.Program(context, source).build(options=options, cache_dir=False)
    else:
        program = cl.Program(context, source).build(options=options)
    names = program.get_info(cl.program_info.KERNEL_NAMES).split(";")
    if kernel_name not in names:
        raise cl.LogicError(f"the built program has kernels {names}, not {kernel_name!r}")
    cl.Kernel(program, kernel_name)  # raises if the binary cannot make the kernel
    # The cache keeps the bare program: pyopencl's Program wrapper holds its
    # Context, which as a value of the WeakKeyDictionary keyed by that Context
    # would keep every context (and its device memory) alive for good.
    return program._get_prg()


def _evict_pocl_entries(since):
    """Remove the PoCL cache entries read since ``since`` (a time.time()).

    PoCL touches an entry's ``last_accessed`` file on every cache hit, so the
    entries a failed build just loaded are exactly those touched since it
    began. Returns the directories removed.
    """
    root = cache_directories()[1]
    removed = []
    for stamp in glob.glob(os.path.join(glob.escape(root), "*", "*", "last_accessed")):
        try:
            if os.stat(stamp).st_mtime >= since:
                entry = os.path.dirname(stamp)
                shutil.rmtree(entry)
                removed.append(entry)
        except OSError:
            continue  # another process removed or is rewriting it
    return removed


def get_program(context, template_name, kernel_name, **flags):
    """The built program of a template, cached per context by its flags.

    A build that yields no usable kernel (an aborted earlier build can leave a
    broken binary in PoCL's on-disk cache) is retried once bypassing the
    binary caches, after removing the PoCL entries that build read, with a
    warning naming them; if the retry fails too, :class:`KernelBuildError`
    names the cache directories and how to clear them.
    """
    key = (template_name, kernel_name, tuple(sorted(flags.items())))
    with _lock:
        per_context = _programs.setdefault(context, {})
        program = per_context.get(key)
    if program is not None:
        return program
    source = render(template_name, **flags)
    started = time.time() - 1.0  # file times may be coarser than the clock
    try:
        program = _build(context, source, kernel_name, bypass_cache=False)
    except cl.Error as first:
        removed = _evict_pocl_entries(started)
        try:
            program = _build(context, source, kernel_name, bypass_cache=True)
        except cl.Error as second:
            raise KernelBuildError(
                f"building kernel {kernel_name!r} from {template_name} failed ({first}); "
                f"a rebuild bypassing the binary caches failed too ({second}). If an "
                "earlier process was killed while building, remove the cache "
                "directories " + " and ".join(repr(d) for d in cache_directories())
                + " and try again.") from second
        warnings.warn(
            f"building kernel {kernel_name!r} from {template_name} found a broken entry in "
            f"the on-disk kernel cache ({first}); it was rebuilt bypassing the cache"
            + (f" and the broken entries {removed} were removed" if removed else "")
            + ". PoCL may still report the broken binary when this process exits.",
            RuntimeWarning, stacklevel=2)
    with _lock:
        return per_context.setdefault(key, program)


def new_kernel(program, kernel_name, scalar_arg_dtypes):
    """A new kernel object of ``program`` with its scalar argument dtypes set.

    Setting arguments and enqueueing is not atomic, so a kernel object must
    not be shared by code that may run in two threads: each optimizer makes
    its own. Keep the object: a new one would re-learn its argument types,
    which turns a ~5 us launch into ~60 us.
    """
    kernel = cl.Kernel(program, kernel_name)
    kernel.set_scalar_arg_dtypes(list(scalar_arg_dtypes))
    return kernel


_thread_kernels = threading.local()


def get_kernel(context, template_name, kernel_name, scalar_arg_dtypes, **flags):
    """A kernel object cached per thread and context (for code without an
    owner object to keep it, like :mod:`netcl.nn`'s functions)."""
    cache = getattr(_thread_kernels, "cache", None)
    if cache is None:
        cache = _thread_kernels.cache = weakref.WeakKeyDictionary()
    key = (template_name, kernel_name, tuple(sorted(flags.items())))
    per_context = cache.setdefault(context, {})
    kernel = per_context.get(key)
    if kernel is None:
        program = get_program(context, template_name, kernel_name, **flags)
        kernel = per_context[key] = new_kernel(program, kernel_name, scalar_arg_dtypes)
    return kernel
