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
and re-quantises in the same pass: a work-item owns whole blocks; it
computes the block's new values once to find their new absmax, then again
(identically) to store the parameter and the codes, each code the map entry
nearest to ``value / absmax`` (the lower one on a tie; a zero block
stores the code of 0).

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


def c_array(values):
    """A float array as exact OpenCL C hex literals."""
    return ", ".join(float(v).hex() + "f" for v in values)
