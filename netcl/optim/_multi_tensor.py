"""Launching one family kernel over many tensors at once.

A step over ResNet-50's 161 tensors must not cost 161 launches: each launch
costs microseconds on the host and, on PoCL, a fork/join of the worker
threads. The family kernels therefore take up to ``k_max`` tensors each
(bounded by the device's argument-size limit) and a chunk table that gives
every work-group one (tensor, start, count) row. The table depends only on the
tensors' lengths, so it is built once per layout and reused every step.
"""

import numpy as np
import pyopencl as cl

# Elements per work-group row: 16384 (64 KiB per float32 buffer) is big enough
# that per-group overhead vanishes and small enough that a 2-core CPU or a GPU
# gets many rows to share.
CHUNK = 16384
_MAX_SLOTS = 32
_UINT_LIMIT = 2**32 - CHUNK


def slot_counts(device, n_state, n_tensor_scalars, n_scalars):
    """The tensor counts kernels are rendered for, largest first.

    A kernel takes 2 + n_state pointers, two uint offsets and n_tensor_scalars
    scalars per tensor; the device caps the total argument size (1 KiB on
    PoCL). Powers of two below the maximum keep the number of distinct builds
    small whatever the model.
    """
    pointer = device.address_bits // 8
    # offsets and scalars counted padded to 8 bytes
    per_tensor = (2 + n_state) * pointer + (2 + n_tensor_scalars) * 8
    budget = device.max_parameter_size - pointer - 8 * n_scalars
    k_max = max(1, min(_MAX_SLOTS, budget // per_tensor))
    counts = [k_max]
    k = 1
    while k < k_max:
        counts.append(k)
        k *= 2
    return sorted(set(counts), reverse=True)


def _chunk_rows(lengths):
    rows = []
    for k, n in enumerate(lengths):
        for start in range(0, n, CHUNK):
            rows.append((k, start, min(CHUNK, n - start)))
    return np.asarray(rows, dtype=np.uint32).reshape(-1, 3)


class Launch:
    """One kernel launch: which tensors, how many kernel slots, its chunk table,
    and whether every tensor in it starts on a vector boundary."""

    __slots__ = ("indices", "slots", "table", "n_rows", "aligned")

    def __init__(self, context, indices, slots, lengths, aligned):
        self.indices = indices
        self.slots = slots
        self.aligned = aligned
        rows = _chunk_rows(lengths)
        self.n_rows = len(rows)
        self.table = cl.Buffer(
            context, cl.mem_flags.READ_ONLY | cl.mem_flags.COPY_HOST_PTR, hostbuf=rows)


def plan(context, lengths, aligned, slot_choices):
    """Split tensors of the given lengths into launches.

    Empty tensors need no work and get no launch. Aligned and unaligned tensors
    go to separate launches (they need different kernels). Full launches use
    the largest slot count; the remainder uses the smallest rendered count that
    holds it.
    """
    for n in lengths:
        if n >= _UINT_LIMIT:
            raise ValueError(
                f"a tensor of {n} elements is too large: netcl indexes tensors with 32-bit offsets")
    k_max = slot_choices[0]
    launches = []
    for kind in (True, False):
        todo = [i for i, n in enumerate(lengths) if n > 0 and aligned[i] == kind]
        for begin in range(0, len(todo), k_max):
            part = todo[begin:begin + k_max]
            slots = min(k for k in slot_choices if k >= len(part))
            launches.append(Launch(context, part, slots, [lengths[i] for i in part], kind))
    return launches


def element_offset(array):
    offset = array.offset // array.dtype.itemsize
    if offset >= _UINT_LIMIT:
        raise ValueError("an array's offset into its buffer exceeds 32-bit indexing")
    return offset


class Batch:
    """The launches of one step for one group's tensors of one dtype, with
    everything they need, prepared before anything is enqueued."""

    __slots__ = ("params", "launches", "kernels", "tensor_args", "scalars", "group_size")

    def __init__(self, params, launches, kernels, tensor_args, scalars, group_size):
        self.params = params
        self.launches = launches
        self.kernels = kernels
        self.tensor_args = tensor_args
        self.scalars = scalars
        self.group_size = group_size

    def enqueue(self, queue):
        for kernel, launch in zip(self.kernels, self.launches):
            enqueue(queue, kernel, launch, self.tensor_args, self.scalars, self.group_size)


def enqueue(queue, kernel, launch, tensor_args, scalars, group_size):
    """Enqueue one launch; ``tensor_args[i]`` are the kernel arguments of tensor i.

    Unused slots repeat the last tensor's arguments: the chunk table never
    points at them, so they are never read.
    """
    args = []
    for i in launch.indices:
        args.extend(tensor_args[i])
    args.extend(tensor_args[launch.indices[-1]] * (launch.slots - len(launch.indices)))
    args.append(launch.table)
    args.extend(scalars)
    return kernel(queue, (launch.n_rows * group_size,), (group_size,), *args)
