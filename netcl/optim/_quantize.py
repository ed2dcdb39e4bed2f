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
code is the map entry nearest to ``value * (1 / absmax)`` in float32 (the
reciprocal once per block, as bitsandbytes; the lower entry on a tie; a zero
block stores the code of 0, and so does a NaN: a code has no NaN).

The kernel finds that code without a search, in one table read. With
entries ``m[0..255]`` ascending, the code of ``x`` is the number of
*decision thresholds* at or below it, ``t[k]`` (:func:`thresholds`) being the
least float32 that float32 arithmetic puts nearer ``m[k+1]`` than ``m[k]``
(``x - m[k] > m[k+1] - x``). No two thresholds share the upper 16 bits of a
float32 (sign, exponent, 7 mantissa bits: a *bucket*), so
:func:`lookup_table` holds, per bucket, the number of thresholds below all of
its values and where in the bucket its one threshold, if any, lies (as the
low 16 bits, which order a bucket's values): the code is that count plus one
compare of ``x``'s low bits (:func:`quantize` is the same in NumPy). A CPU
reads a table one lane at a time, so table reads are most of an int8 step's
cost there; the bucket count and the threshold share one 32-bit entry.

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


# Buckets: float32s sharing their upper BUCKET_SHIFT bits (sign, exponent,
# 7 mantissa bits). A bucket's index in the lookup table is its magnitude
# bits clamped to [LOW_BUCKET, HIGH_BUCKET], minus LOW_BUCKET, plus BUCKETS
# for a negative value: LOW_BUCKET (one below the smallest threshold of either
# map) holds every smaller magnitude, HIGH_BUCKET (1.0's) every larger one,
# and neither holds a threshold.
BUCKET_SHIFT = 16
KEY_MASK = (1 << BUCKET_SHIFT) - 1
NO_THRESHOLD = KEY_MASK  # a key is never above it


def _nearer_upper(x, lower, upper):
    """The kernel's float32 test: x is nearer ``upper`` than ``lower``."""
    with np.errstate(invalid="ignore"):
        return np.float32(x - lower) > np.float32(upper - x)


def thresholds(signed):
    """float32[255]: ``t[k]``, the least float32 with ``t[k] - m[k] >
    m[k+1] - t[k]`` in float32 (the test is monotone in x), so a value
    gets code k+1 rather than k from ``t[k]`` on."""
    table = MAPS[signed]
    out = np.empty(255, np.float32)
    for k in range(255):
        lower, upper = table[k], table[k + 1]
        x = np.float32((np.float64(lower) + np.float64(upper)) / 2)
        while _nearer_upper(x, lower, upper):
            x = np.nextafter(x, np.float32(-np.inf))
        while not _nearer_upper(x, lower, upper):
            x = np.nextafter(x, np.float32(np.inf))
        out[k] = x
    return out


THRESHOLDS = {True: thresholds(True), False: thresholds(False)}


def _magnitude_bucket(values):
    return (np.asarray(values, np.float32).view(np.uint32) & 0x7FFFFFFF) >> BUCKET_SHIFT


LOW_BUCKET = int(min(_magnitude_bucket(t).min() for t in THRESHOLDS.values())) - 1
HIGH_BUCKET = int(_magnitude_bucket(1.0))
BUCKETS = HIGH_BUCKET - LOW_BUCKET + 1  # per sign


def _key(values):
    """A float32's place in its bucket, ascending with the value: the low
    BUCKET_SHIFT bits, complemented for a negative value (whose magnitude
    falls as the value rises)."""
    bits = np.asarray(values, np.float32).view(np.uint32)
    return (bits ^ np.where(bits >> 31, KEY_MASK, 0)) & KEY_MASK


def lookup_table(signed):
    """uint32[2 * BUCKETS], one entry per bucket of non-negative then
    negative float32s: ``below << 16 | last``, so that a value in the bucket
    gets the code ``below + (key > last)`` (:func:`_key`). ``below`` counts
    the thresholds under the bucket's least value; a threshold inside it
    (never more than one) at key ``k`` makes ``last = k - 1``, or moves into
    ``below`` at ``k = 0``; without one ``last`` is NO_THRESHOLD."""
    t = THRESHOLDS[signed].astype(np.float64)
    b = np.arange(LOW_BUCKET, HIGH_BUCKET + 1, dtype=np.uint64)
    least_positive = (b << BUCKET_SHIFT).astype(np.uint32).view(np.float32).astype(np.float64)
    least_negative = -(((b + 1) << BUCKET_SHIFT) - 1).astype(np.uint32).view(np.float32)
    least_positive[0] = 0.0  # LOW_BUCKET holds every smaller magnitude
    least_negative = least_negative.astype(np.float64)
    least_negative[-1] = -np.inf  # HIGH_BUCKET every larger one
    below = np.searchsorted(t, np.concatenate([least_positive, least_negative]), side="left")
    last = np.full(below.shape, NO_THRESHOLD, np.int64)
    mine = THRESHOLDS[signed]
    index = (_magnitude_bucket(mine).astype(np.int64) - LOW_BUCKET
             + (mine.view(np.uint32) >> 31).astype(np.int64) * BUCKETS)
    assert np.unique(index).size == index.size, "two thresholds share a bucket"
    assert not np.isin(index % BUCKETS, (0, BUCKETS - 1)).any(), "a clamped bucket holds a threshold"
    key = _key(mine).astype(np.int64)
    below[index[key == 0]] += 1
    last[index[key > 0]] = key[key > 0] - 1
    assert (below + (last != NO_THRESHOLD)).max() <= 255, "a code past 255"
    return ((below.astype(np.uint32) << BUCKET_SHIFT) | last.astype(np.uint32)).astype(np.uint32)


def quantize(values, signed):
    """The kernel's code choice, in NumPy (the tests hold it to the nearest-entry
    rule; the kernel is checked through its own results)."""
    x = np.asarray(values, np.float32)
    bits = x.view(np.uint32)
    bucket = (np.clip((bits & 0x7FFFFFFF) >> BUCKET_SHIFT, LOW_BUCKET, HIGH_BUCKET)
              - LOW_BUCKET + (bits >> 31) * BUCKETS)
    entry = lookup_table(signed)[bucket]
    code = (entry >> BUCKET_SHIFT) + (_key(x) > (entry & KEY_MASK))
    return np.where(np.isnan(x), zero_code(signed), code).astype(np.uint8)


def c_array(values):
    """A float array as exact OpenCL C hex literals."""
    return ", ".join(float(v).hex() + "f" for v in values)


def c_uint_array(values):
    return ",".join("%du" % int(v) for v in values)
