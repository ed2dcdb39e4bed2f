"""Optimizer state packed into shared buffers.

The state buffers a step allocates together (every parameter of a batch that
starts at once) are views of one buffer per state name — an arena — each at
the same offset in every name's arena. A launch whose tensors' state shares
its arenas passes one buffer per state name instead of one per tensor: an
enqueue's host cost grows with its argument count (PoCL 3.0: about 0.5 us per
buffer argument), so Adam's arguments per tensor fall from four buffers to
two (parameter and gradient).

Each region starts on an ``ALIGN``-element boundary, so state is as aligned
for vector loads as a buffer of its own. An arena holds at most
``MAX_ARENA_BYTES`` (and never more than the device allows in one
allocation); a larger tensor gets an arena of its own.
"""

import pyopencl.array as cla

ALIGN = 16  # elements: a multiple of every vector width netcl renders
MAX_ARENA_BYTES = 256 << 20


def regions(sizes, max_elements):
    """Where each tensor's state goes: a list of ``(arena, start)`` for
    ``sizes``, and the arenas' lengths in elements."""
    lengths = []
    placed = []
    for n in sizes:
        padded = -(-n // ALIGN) * ALIGN
        if not lengths or (lengths[-1] and lengths[-1] + padded > max_elements):
            lengths.append(0)
        placed.append((len(lengths) - 1, lengths[-1]))
        lengths[-1] += padded
    return placed, lengths


def allocate(queue, shapes, dtypes):
    """Uninitialised state for tensors of ``shapes``: per tensor a dict of
    views by state name (``dtypes`` maps each name to its dtype), every
    name's view at the same offset of that name's arena."""
    device = queue.device
    widest = max(dtype.itemsize for dtype in dtypes.values())
    limit = min(MAX_ARENA_BYTES, device.max_mem_alloc_size) // widest
    sizes = [_size(shape) for shape in shapes]
    placed, lengths = regions(sizes, limit)
    arenas = [{name: cla.empty(queue, max(1, n), dtype) for name, dtype in dtypes.items()}
              for n in lengths]
    return [{name: buffer[start:start + n].reshape(shape)
             for name, buffer in arenas[arena].items()}
            for (arena, start), n, shape in zip(placed, sizes, shapes)], arenas


def _size(shape):
    n = 1
    for extent in shape:
        n *= extent
    return n
