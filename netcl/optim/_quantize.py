"""Blockwise dynamic 8-bit optimizer state (``state_dtype="int8"``).

As bitsandbytes' 8-bit optimizers (Dettmers et al., "8-bit Optimizers via
Block-wise Quantization", 2022): a state buffer of a tensor with at least
:data:`MIN_ELEMENTS` elements is stored as one byte per element — an index
into a 256-entry *dynamic* quantisation map — and one float32 scale per
block of :data:`BLOCK` consecutive elements, the block's largest magnitude
(``<name>_absmax`` in the state). An element's value is
``map[code] * absmax[block]``. Smaller tensors keep float32 state (their
memory does not matter and their statistics are the noisiest).

The update kernel reads a block's codes and scale, runs the update in float32,
and re-quantises in the same pass: a work-item owns whole blocks; on CPU
layouts it updates a block once, keeping the new values in private arrays
until their absmax is known; on GPU layouts it computes them once for the
absmax, then again (identically) to store the parameter and the codes. Each
code is the map entry nearest to ``value / absmax`` (the lower one on a
tie; a zero block stores the code of 0, and so does a NaN: a code has no
NaN).

The kernel finds that code without a search. With entries ``m[0..255]``
ascending, the code of ``x`` is the number of *decision thresholds* at or
below it, ``t[k]`` (:func:`thresholds`) being the least float32 that float32
arithmetic puts nearer ``m[k+1]`` than ``m[k]`` (``x - m[k] > m[k+1] - x``).
No two thresholds share the upper 16 bits of a float32 (sign, exponent,
7 mantissa bits: a *bucket*), so :func:`bucket_table` holds, per bucket, the
number of thresholds below all of its values, and one compare with the
next threshold finishes: two table reads per element.

The maps (:func:`dynamic_map`), as bitsandbytes' ``create_dynamic_map``
builds them with 8 bits and 7 exponent bits: for each decade
``i = 0..6``, ``2**i`` (signed) or ``2**(i+1)`` (unsigned) values
``10**(i-6) * m``, ``m`` the midpoints of an even split of [0.1, 1] into that
many intervals — so the entries are dense near 0 and sparse near 1 —, in
both signs for the signed map; then 0 and 1.0. That gives 256 entries
each; sorted ascending and rounded to float32. The signed map (values in
[-0.99, 1]) stores first moments (Adam's ``exp_avg``, RMSProp's
``grad_avg`` and ``momentum_buffer``), the unsigned one (values in [0, 1],
finer) second moments (``exp_avg_sq``, ``max_exp_avg_sq``,
``square_avg``).
"""

import numpy as np

BLOCK = 256
MIN_ELEMENTS = 4096
ABSMAX = "_absmax"  # suffix of a quantised buffer's per-block scales


def dynamic_map(signed):
    """The 256 sorted float32 entries of the signed or unsigned dynamic map."""
    exponent_bits = 7
    values = []
    for i in range(exponent_bits):
        count = 2**i if signed else 2**(i + 1)
        bounds = np.linspace(0.1, 1.0, count + 1)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10.0 ** (i - (exponent_bits - 1))
        values += list(scale * means)
        if signed:
            values += list(-scale * means)
    values += [0.0, 1.0]
    assert len(values) == 256
    return np.sort(np.asarray(values, np.float64)).astype(np.float32)


MAPS = {True: dynamic_map(True), False: dynamic_map(False)}


def zero_code(signed):
    return int(np.flatnonzero(MAPS[signed] == 0.0)[0])


def initial_codes(signed, value):
    """(code, absmax) that make every element of a new buffer ``value``."""
    if value == 0:
        return zero_code(signed), 0.0
    return int(np.flatnonzero(MAPS[signed] == np.float32(np.sign(value)))[0]), abs(value)


def blocks(size):
    return -(-size // BLOCK)


# Buckets: float32s sharing their upper BUCKET_SHIFT bits. Magnitudes below
# bucket LOW_BUCKET (under the smallest nonzero entry of either map) share
# its bucket, and those above 1.0 share HIGH_BUCKET (1.0's).
BUCKET_SHIFT = 16
LOW_BUCKET = min(int(np.float32(MAPS[s][MAPS[s] > 0].min()).view(np.uint32))
                 for s in (True, False)) >> BUCKET_SHIFT
LOW_BUCKET -= 1
HIGH_BUCKET = int(np.float32(1.0).view(np.uint32)) >> BUCKET_SHIFT
BUCKETS = HIGH_BUCKET - LOW_BUCKET + 1  # per sign


def _nearer_upper(x, lower, upper):
    """The kernel's float32 test: x is nearer ``upper`` than ``lower``."""
    with np.errstate(invalid="ignore"):
        return np.float32(x - lower) > np.float32(upper - x)


def thresholds(signed):
    """float32[256]: ``t[k]``, the least float32 with ``t[k] - m[k] >
    m[k+1] - t[k]`` in float32 (the test is monotone in x), so a value
    gets code k+1 rather than k from ``t[k]`` on; ``t[255]`` is the largest
    float32 (the kernel caps codes at 255, which is then every value's
    from 1.0 up)."""
    table = MAPS[signed]
    out = np.full(256, np.finfo(np.float32).max, np.float32)
    for k in range(255):
        lower, upper = table[k], table[k + 1]
        x = np.float32((np.float64(lower) + np.float64(upper)) / 2)
        while _nearer_upper(x, lower, upper):
            x = np.nextafter(x, np.float32(-np.inf))
        while not _nearer_upper(x, lower, upper):
            x = np.nextafter(x, np.float32(np.inf))
        out[k] = x
    return out


def _bucket_floors():
    """Each bucket's least value: non-negative buckets, then negative ones
    (whose values lie in (-end, -start], so the floor is -end, excluded)."""
    b = np.arange(LOW_BUCKET, HIGH_BUCKET + 1, dtype=np.uint64)
    start = (b << BUCKET_SHIFT).astype(np.uint32).view(np.float32).astype(np.float64)
    end = ((b + 1) << BUCKET_SHIFT).astype(np.uint32).view(np.float32).astype(np.float64)
    start[0], end[-1] = 0.0, np.inf
    return np.concatenate([start, -end])


def bucket_table(signed):
    """uint8[2 * BUCKETS]: per bucket of non-negative then negative float32s
    (index: clamped magnitude bits - LOW_BUCKET, + BUCKETS if negative), the
    number of thresholds at or below the bucket's least value."""
    finite = thresholds(signed)[:255].astype(np.float64)
    return np.searchsorted(finite, _bucket_floors(), side="right").astype(np.uint8)


def c_array(values):
    """A float array as exact OpenCL C hex literals."""
    return ", ".join(float(v).hex() + "f" for v in values)


def c_uchar_array(values):
    return ",".join(str(int(v)) for v in values)
