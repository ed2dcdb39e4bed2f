"""Low-precision parameters and compressed optimizer state: the dtypes, their
storage in kernels, and the options that choose how a low-precision
parameter is written back.

A parameter (and its gradient) may be ``numpy.float16`` or
``ml_dtypes.bfloat16``. The kernel loads both into float32 registers, runs
the family's update there (the hyperparameter scalars are float32 too) and
stores the result back rounded — to nearest-even by default:

- float16 is loaded and stored by ``vload_half``/``vstore_half_rte``, which
  are core OpenCL: no ``cl_khr_fp16`` needed;
- bfloat16 is the upper half of a float32, held in a ``ushort`` buffer: a
  load is a shift, a store an integer round-to-nearest-even (NaN kept quiet).

How the rounded value is written back (one option per optimizer, no effect
on float32/float64 parameters):

``master_weights=True``
    a float32 copy ``state['master_param']`` is the parameter the update
    reads and writes; the low-precision parameter receives its rounded
    value in the same pass (+4 bytes per parameter).
``stochastic_rounding=True``
    the write-back rounds up or down with probability proportional to the
    distance (unbiased), from a counter-based hash of ``(seed, parameter
    index, the parameter's step count, element index)``: the same bits on
    every run and device, no random state beyond ``seed`` (no extra memory).
``kahan=True``
    ``state['kahan_comp']`` (in the parameter's dtype) carries what the
    rounding lost and adds it to the next update (+2 bytes per parameter).

``state_dtype`` chooses how the family's state buffers are stored:
``"float32"`` (default), ``"bfloat16"`` (rounded to nearest-even, half the
memory) or ``"int8"`` (see :mod:`netcl.optim._quantize`).
"""

import numpy as np

try:  # optional: the NumPy bfloat16 dtype JAX and others use
    import ml_dtypes
    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - bfloat16 params need ml_dtypes anyway
    BFLOAT16 = None

FLOAT16 = np.dtype(np.float16)
FLOAT32 = np.dtype(np.float32)
FLOAT64 = np.dtype(np.float64)
LOW_PRECISION = tuple(d for d in (FLOAT16, BFLOAT16) if d is not None)
PARAM_DTYPES = (FLOAT32, FLOAT64) + LOW_PRECISION
STATE_DTYPES = ("float32", "bfloat16", "int8")

#: State names the engine adds for low-precision parameters (torch-style).
MASTER = "master_param"
KAHAN = "kahan_comp"

#: Storage format of a buffer in a kernel, by dtype: the template's load and
#: store helpers dispatch on it.
_FORMATS = {FLOAT32: "float", FLOAT64: "double", FLOAT16: "half",
            np.dtype(np.uint8): "codes"}  # codes: int8 state, see _quantize
if BFLOAT16 is not None:
    _FORMATS[BFLOAT16] = "bfloat16"

#: The C type a buffer of each format is declared with.
POINTER_TYPES = {"float": "float", "double": "double", "half": "half", "bfloat16": "ushort",
                 "codes": "uchar"}


def is_low_precision(dtype):
    return np.dtype(dtype) in LOW_PRECISION


def storage_format(dtype):
    """The kernel storage format of ``dtype`` (``"float"``, ``"double"``,
    ``"half"`` or ``"bfloat16"``)."""
    try:
        return _FORMATS[np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"dtype {np.dtype(dtype)} is not supported (netcl optimizers update "
                        "float32, float64, float16 and bfloat16 parameters)") from None


def compute_dtype(param_dtype):
    """The type a parameter's update is computed in: float32 for float16,
    bfloat16 and float32 parameters, float64 for float64."""
    return FLOAT64 if np.dtype(param_dtype) == FLOAT64 else FLOAT32


def check_state_dtype(value):
    if value not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be one of {', '.join(map(repr, STATE_DTYPES))}, "
                         f"got {value!r}")
    if value == "bfloat16" and BFLOAT16 is None:
        raise ValueError("state_dtype='bfloat16' needs the ml_dtypes package")


def check_seed(seed):
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) \
            or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")


def bits_view(array):
    """A pyopencl Array of float16 or bfloat16 as its uint16 bits (pyopencl's
    elementwise kernels know neither without cl_khr_fp16), anything else as
    it is."""
    if array.dtype in LOW_PRECISION:
        return array.view(np.uint16)
    return array
