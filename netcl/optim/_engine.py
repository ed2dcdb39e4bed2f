"""The step engine: launch plans, the kernel-argument layout, and the bound
programs a step enqueues.

A step over ResNet-50's 161 tensors must not cost 161 launches, and its host
cost must not grow with the number of tensors. So:

- **Multi-tensor launches.** A family kernel takes up to ``k_max`` tensors
  (bounded by the device's argument-size limit) and a chunk table giving
  every work-group one row ``(slot, start, count, parameter index)``; the
  table depends only on the tensors' lengths and is built once per layout.
- **One argument layout.** :func:`step_arguments` is the only definition of
  a kernel's parameter list: the template declares exactly its entries and
  the host derives the scalar dtypes and every argument index from it.
- **Bound once.** A :class:`Program` holds this optimizer's own kernel
  objects with their arguments already set; a step re-sets only the
  arguments whose arrays or hyperparameters changed, then enqueues.
- **On the device.** Step counts live in a device buffer (the kernel reads
  ``t`` and derives bias corrections itself); the control buffer carries
  found-inf, the gradient unscale factor and the clipping coefficient from
  the step's reduction pass to its update pass and step-count advance, so a
  step whose outcome depends on device values never waits for the host.
"""

from dataclasses import dataclass

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from netcl import _kernels
from netcl.optim import _precision

# Elements per work-group row: 16384 (64 KiB per float32 buffer) is big enough
# that per-group overhead vanishes and small enough that a 2-core CPU or a GPU
# gets many rows to share.
CHUNK = 16384
_MAX_SLOTS = 64
_UINT_LIMIT = 2**32 - CHUNK
ROW = 4  # uints per chunk-table row: slot, start, count, parameter index
# A launch's offsets buffer: per slot, the element offsets of its parameter,
# gradient and each state array (in state-name order) in their buffers.
P_OFFSET, G_OFFSET, STATE_OFFSETS = range(3)


def offsets_stride(n_state):
    """uints per slot in the offsets buffer of a launch with ``n_state`` state buffers."""
    return STATE_OFFSETS + n_state

# The control buffer (float32): what the reduction pass decides for the rest
# of the step.
FOUND_INF, UNSCALE, CLIP_COEF, TOTAL_NORM = range(4)
CONTROL_SIZE = 4
INITIAL_CONTROL = np.array([0.0, 1.0, 1.0, 0.0], np.float32)
# A GradScaler's device state (float32): what finalize reads and writes.
SCALE, GROWTH_TRACKER, SCALER_FOUND_INF = range(3)
# What a track_stats update pass writes per chunk-table row (factor type), in
# order: sums of squares of the gradient (unscaled, before clipping), of the
# parameter before the update, of the update, of the second moment and of the
# momentum state; non-finite and zero gradient elements; the effective
# learning rate's min, max and sum.
STATS_COLUMNS = ("grad_sq", "nonfinite", "zeros", "param_sq", "update_sq",
                 "second_moment_sq", "momentum_sq", "lr_min", "lr_max", "lr_sum")


@dataclass(frozen=True)
class Arg:
    """One kernel parameter: its name, its C type and, for scalars, the NumPy
    dtype the host passes (``None`` for buffers)."""

    name: str
    c_type: str
    dtype: object = None

    @property
    def declaration(self):
        return f"{self.c_type} {self.name}"


def _buffer(c_type, const=False):
    return f"__global {'const ' if const else ''}{c_type} *restrict"


def step_arguments(slots, state_names, scalar_names, factor_names, param_dtype, state_dtype,
                   factor_dtype, track_stats=False, state_dtypes=None, seed=False,
                   shared_state=False):
    """The parameter list of a family's update kernel, in order.

    Per tensor slot ``k``: ``p<k>``, ``g<k>`` and one buffer per state name
    (``<name><k>``); with ``shared_state`` (every tensor's state is a view of
    the same buffers: see :mod:`netcl.optim._arena`) one buffer per state
    name (``<name>``) for the whole launch instead; with ``track_stats`` the
    statistics rows (factor type) and this launch's first row; ``seed``
    (stochastic rounding only); then
    the offsets buffer (:func:`offsets_stride` uints per slot: where its
    parameter, gradient and each state array start in their buffers), the
    chunk table, the step
    counts and the control buffer; then the hyperparameter scalars in the
    state type and the factor arguments in the factor type.

    The offsets live in a buffer, not in scalar arguments, and state is
    shared where it can be, because an enqueue's host cost grows with its
    argument count (PoCL 3.0: ~0.25 us per scalar and ~0.5 us per buffer
    argument, every launch).

    ``state_dtype`` is the compute type (float32 for float16 and bfloat16
    parameters); ``state_dtypes`` maps a state name to the dtype its buffer
    is stored in when that differs (bfloat16 or int8 state, a float32 master
    copy).
    """
    state_dtypes = state_dtypes or {}
    param_t = _precision.POINTER_TYPES[_precision.storage_format(param_dtype)]
    state_t, factor_t = (_kernels.c_type(d) for d in (state_dtype, factor_dtype))
    state_types = {name: _precision.POINTER_TYPES[_precision.storage_format(
        state_dtypes.get(name, state_dtype))] for name in state_names}
    args = []
    for k in range(slots):
        args += [Arg(f"p{k}", _buffer(param_t)), Arg(f"g{k}", _buffer(param_t, const=True))]
        if not shared_state:
            args += [Arg(f"{name}{k}", _buffer(state_types[name])) for name in state_names]
    if shared_state:
        args += [Arg(name, _buffer(state_types[name])) for name in state_names]
    if track_stats:
        args += [Arg("stats_out", _buffer(factor_t)),
                 Arg("stats_row_base", "const uint", np.uint32)]
    if seed:
        args.append(Arg("seed", "const uint", np.uint32))
    args += [Arg("offsets", _buffer("uint", const=True)),
             Arg("chunks", _buffer("uint", const=True)),
             Arg("steps", _buffer("uint", const=True)),
             Arg("control", _buffer("float", const=True))]
    args += [Arg(name, f"const {state_t}", np.dtype(state_dtype)) for name in scalar_names]
    args += [Arg(name, f"const {factor_t}", np.dtype(factor_dtype)) for name in factor_names]
    return tuple(args)


def stats_arguments(slots, param_dtype, factor_dtype):
    """The parameter list of the gradient-statistics kernel (the reduction
    pass): per slot the gradient, then the offsets buffer (laid out as the
    update kernel's), the chunk table, the per-row partial results (in the
    factor type) and this launch's first row."""
    param_t = _precision.POINTER_TYPES[_precision.storage_format(param_dtype)]
    factor_t = _kernels.c_type(factor_dtype)
    args = [Arg(f"g{k}", _buffer(param_t, const=True)) for k in range(slots)]
    args += [Arg("offsets", _buffer("uint", const=True)),
             Arg("chunks", _buffer("uint", const=True)),
             Arg("partials", _buffer(factor_t)),
             Arg("row_base", "const uint", np.uint32)]
    return tuple(args)


def slot_counts(device, per_tensor_bytes, fixed_bytes):
    """The tensor counts kernels are rendered for, largest first.

    The device caps the total argument size (1 KiB on PoCL). Powers of two
    below the maximum keep the number of distinct builds small whatever the
    model.
    """
    budget = device.max_parameter_size - fixed_bytes
    k_max = max(1, min(_MAX_SLOTS, budget // per_tensor_bytes))
    counts = [k_max]
    k = 1
    while k < k_max:
        counts.append(k)
        k *= 2
    return sorted(set(counts), reverse=True)


def argument_bytes(device, args):
    """Bytes ``args`` take in the device's argument space (scalars padded to 8)."""
    pointer = device.address_bits // 8
    return sum(pointer if a.dtype is None else max(8, np.dtype(a.dtype).itemsize) for a in args)


class Launch:
    """One kernel launch: which tensors (positions in its batch), how many
    kernel slots, its chunk table, whether every tensor in it starts on a
    vector boundary, and whether their state shares one buffer per name."""

    __slots__ = ("indices", "slots", "table", "n_rows", "aligned", "row_params",
                 "shared_state")

    def __init__(self, context, indices, slots, lengths, param_indices, aligned, starts=None,
                 shared_state=False):
        self.indices = indices
        self.slots = slots
        self.aligned = aligned
        self.shared_state = shared_state
        rows = []
        for k, (n, index) in enumerate(zip(lengths, param_indices)):
            # Flat launches: every tensor in slot 0, at its start in the shared buffers.
            slot, base = (0, starts[k]) if starts is not None else (k, 0)
            for start in range(0, n, CHUNK):
                rows.append((slot, base + start, min(CHUNK, n - start), index))
        rows = np.asarray(rows, dtype=np.uint32).reshape(-1, ROW)
        self.n_rows = len(rows)
        self.row_params = rows[:, 3].copy()  # each row's parameter index
        self.table = cl.Buffer(
            context, cl.mem_flags.READ_ONLY | cl.mem_flags.COPY_HOST_PTR, hostbuf=rows)


def plan(context, lengths, param_indices, aligned, slot_choices, shared_state=False):
    """Split tensors of the given lengths into launches.

    Empty tensors need no work and get no launch. Aligned and unaligned tensors
    go to separate launches (they need different kernels). Full launches use
    the largest slot count; the remainder uses the smallest rendered count that
    holds it. ``shared_state``: the tensors' state shares one buffer per name.
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
            launches.append(Launch(context, part, slots, [lengths[i] for i in part],
                                   [param_indices[i] for i in part], kind,
                                   shared_state=shared_state))
    return launches


def flat_launch(context, lengths, param_indices, starts, aligned):
    """The single launch of a flat batch: one slot (the shared buffers), a
    row per chunk of every tensor, starting at the tensor's offset."""
    for n, start in zip(lengths, starts):
        if start + n >= _UINT_LIMIT:
            raise ValueError("a flat buffer of more than 2**32 elements is too large: netcl "
                             "indexes tensors with 32-bit offsets")
    nonempty = [i for i, n in enumerate(lengths) if n > 0]
    return Launch(context, list(range(len(lengths))), 1, [lengths[i] for i in nonempty],
                  [param_indices[i] for i in nonempty], aligned,
                  [starts[i] for i in nonempty])


class FlatView:
    """The one slot of a flat launch: the shared buffers, seen as a tensor at
    offset 0, standing in for the batch's parameters."""

    __slots__ = ("data", "grad", "buffers", "member")

    def __init__(self, member, new_state, entries):
        self.member = member
        self.data = _whole(member.data)
        self.grad = _whole(member.grad)
        entry = entries.get(id(member))  # none for a parameter read only by the guard
        buffers = new_state.get(id(member)) or (entry.buffers() if entry is not None else {})
        self.buffers = {name: _whole(b) for name, b in buffers.items()}


def _whole(array):
    """The whole buffer under a view, as a 1-d Array at offset 0."""
    n = array.base_data.size // array.dtype.itemsize
    return cla.Array(array.queue, (n,), array.dtype, data=array.base_data)


def element_offset(array):
    offset = array.offset // array.dtype.itemsize
    if offset >= _UINT_LIMIT:
        raise ValueError("an array's offset into its buffer exceeds 32-bit indexing")
    return offset


class _Bound:
    """One launch with its own kernel object, arguments already set, and the
    arrays those arguments were set from (to re-set only what changed)."""

    __slots__ = ("kernel", "positions", "params", "seen", "global_size", "local_size",
                 "group", "state_names", "hyper", "scalars", "slots", "offsets",
                 "offsets_buffer", "offsets_changed", "shared_state", "stride")

    def __init__(self, kernel, arguments, launch, local_size, params, group=None,
                 state_names=()):
        self.kernel = kernel
        self.positions = {a.name: i for i, a in enumerate(arguments)}
        self.params = params
        self.slots = launch.slots
        self.shared_state = launch.shared_state
        self.seen = [None] * len(params)
        self.global_size = (launch.n_rows * local_size,)
        self.local_size = (local_size,)
        self.group = group
        self.state_names = state_names
        # (position, dtype) of the hyperparameter scalars: those after "control".
        after = self.positions.get("control", len(arguments))
        self.hyper = [(i, np.dtype(a.dtype).type) for i, a in enumerate(arguments) if i > after]
        self.scalars = None
        # The offsets buffer's contents, kept on the host; unused slots read 0.
        self.stride = offsets_stride(len(state_names))
        self.offsets = np.zeros(max(1, launch.slots) * self.stride, np.uint32)
        self.offsets_buffer = cl.Buffer(kernel.context, cl.mem_flags.READ_ONLY,
                                        self.offsets.nbytes)
        self.offsets_changed = True
        self.set("offsets", self.offsets_buffer)

    def upload_offsets(self, queue):
        """Copy changed offsets to the device, ahead of this launch's next
        enqueue on the (in-order) queue; pyopencl keeps the copied array
        alive until the copy is done."""
        if self.offsets_changed:
            cl.enqueue_copy(queue, self.offsets_buffer, self.offsets.copy(), is_blocking=False)
            self.offsets_changed = False

    def set(self, name, value):
        set_arg(self.kernel, self.positions[name], value)


def set_arg(kernel, position, value):
    """Set one kernel argument: a buffer, or a NumPy scalar as its bytes.

    pyopencl's ``set_arg`` takes ~80 us for a scalar on PoCL (it inspects
    the argument's type on every call); the packed bytes go straight to
    clSetKernelArg in ~1 us, as pyopencl's own generated invokers do.
    """
    if isinstance(value, np.generic):
        kernel._set_arg_buf(position, value.tobytes())
    else:
        kernel.set_arg(position, value)


class Program:
    """Everything one step enqueues, bound once.

    Built when the step's structure changes (which parameters have
    gradients, their sizes and alignment, group flags, the guard); reused,
    re-setting only changed arguments, while it does not. Per step it runs:
    [grad_stats launches, finalize] when guarded, the update launches, and
    advance.
    """

    def __init__(self, optimizer, signature, scaler_key, guard):
        self.optimizer = optimizer
        self.signature = signature
        self.scaler_key = scaler_key
        self.guard = guard
        self.updates = []
        self.stats = []
        self.n_rows = 0
        self.generation = None
        self.data_generation = None
        self.state_version = None
        self.groups_key = None
        self.finalize = None
        self.advance = None
        self.partials = None
        self.active = None
        self.scaler_state = None
        self.tracked = []          # update launches that write statistics rows
        self.stats_rows = []       # their rows' parameter indices, in row order
        self.stats_buffer = None
        self.tracked_indices = {}  # group -> indices of its parameters in this step
        self._grad_places = None   # id(param) -> [(kernel, g argument, slot record)]

    # ------------------------------------------------------------- building
    def add_update(self, group, launch, kernel_and_args, params, state_names, new_state):
        kernel, arguments = kernel_and_args
        opt = self.optimizer
        bound = _Bound(kernel, arguments, launch, opt._layout().local_size, params, group,
                       state_names)
        self._bind_tensors(bound, new_state)
        bound.set("chunks", launch.table)
        bound.set("steps", opt._steps.base_data)
        bound.set("control", opt._control.base_data)
        if "seed" in bound.positions:
            bound.set("seed", np.uint32(opt.seed))
        if "stats_out" in bound.positions:
            bound.set("stats_row_base", np.uint32(sum(len(r) for r in self.stats_rows)))
            self.stats_rows.append(launch.row_params)
            self.tracked.append(bound)
        self.updates.append(bound)

    def add_stats(self, launch, kernel_and_args, params):
        kernel, arguments = kernel_and_args
        bound = _Bound(kernel, arguments, launch, self.optimizer._layout().local_size, params)
        self._bind_tensors(bound, {})
        bound.set("chunks", launch.table)
        bound.set("row_base", np.uint32(self.n_rows))
        self.n_rows += launch.n_rows
        self.stats.append(bound)

    def finish(self, active):
        """Bind the finalize and advance kernels; ``active`` are the indices of
        the parameters this step updates."""
        opt = self.optimizer
        context = opt._context
        if self.guard:
            factor_dtype = opt._factor_dtype()
            self.partials = cl.Buffer(context, cl.mem_flags.READ_WRITE,
                                      max(1, self.n_rows) * factor_dtype.itemsize)
            for bound in self.stats:
                bound.set("partials", self.partials)
            scaler, unscaled = self.scaler_key or (False, False)
            program = _kernels.get_program(
                context, "step_control.cl.mako", "finalize", kernel="finalize",
                factor_t=_kernels.c_type(factor_dtype), scaler=scaler, unscaled=unscaled,
                clip=opt.max_grad_norm is not None)
            self.finalize = _kernels.new_kernel(program, "finalize",
                                                [None, np.uint32, None, None, np.float32])
            max_norm = opt.max_grad_norm if opt.max_grad_norm is not None else 0.0
            # Without a scaler the scaler-state argument is never read.
            self.finalize.set_args(self.partials, np.uint32(self.n_rows),
                                   opt._control.base_data, opt._control.base_data,
                                   np.float32(max_norm))
        if self.tracked:
            self.stats_rows = np.concatenate(self.stats_rows)
            self.stats_buffer = cl.Buffer(
                context, cl.mem_flags.READ_WRITE,
                max(1, len(self.stats_rows)) * len(STATS_COLUMNS) * opt._factor_dtype().itemsize)
            for bound in self.tracked:
                bound.set("stats_out", self.stats_buffer)
        self.active = cl.Buffer(context, cl.mem_flags.READ_ONLY | cl.mem_flags.COPY_HOST_PTR,
                                hostbuf=np.asarray(active or [0], np.uint32))
        program = _kernels.get_program(context, "step_control.cl.mako", "advance",
                                       kernel="advance", guard=self.guard)
        self.advance = _kernels.new_kernel(program, "advance",
                                           [None, None, np.uint32, None, None])
        self.advance.set_args(opt._steps.base_data, self.active, np.uint32(len(active)),
                              opt._control.base_data, opt._skipped.base_data)

    def _bind_tensors(self, bound, new_state):
        for k, p in enumerate(bound.params):
            self._bind_slot(bound, k, p, new_state.get(id(p)))
        self._bind_tensors_tail(bound)

    def _bind_slot(self, bound, k, p, buffers=None, record=True):
        """Set slot ``k``'s arguments from ``p``: only those whose array
        differs from what the slot was last bound to."""
        data, grad = p.data, p.grad
        seen = bound.seen[k] if record else None
        old_data, old_grad, old_state = seen if seen is not None else (None, None, ())
        positions = bound.positions
        # Everything that can raise comes before the first set_arg.
        values = []
        offsets = {}
        if data is not old_data and f"p{k}" in positions:
            values.append((positions[f"p{k}"], data.base_data))
            offsets[P_OFFSET] = element_offset(data)
        if grad is not old_grad:
            values.append((positions[f"g{k}"], grad.base_data))
            offsets[G_OFFSET] = element_offset(grad)
        state = ()
        if bound.state_names:
            if isinstance(p, FlatView):
                buffers = p.buffers
            elif buffers is None:
                buffers = self.optimizer._state_entries[id(p)].buffers()
            state = tuple(buffers[name] for name in bound.state_names)
            suffix = "" if bound.shared_state else k
            for j, (name, buffer, old) in enumerate(zip(
                    bound.state_names, state, old_state or (None,) * len(state))):
                if buffer is not old:
                    values.append((positions[f"{name}{suffix}"], buffer.base_data))
                    offsets[STATE_OFFSETS + j] = element_offset(buffer)
        kernel = bound.kernel
        for position, value in values:
            kernel.set_arg(position, value)
        for which, offset in offsets.items():
            if bound.offsets[k * bound.stride + which] != offset:
                bound.offsets[k * bound.stride + which] = offset
                bound.offsets_changed = True
        if record:  # in place: grad_places holds these records
            if seen is None:
                bound.seen[k] = [data, grad, state]
            else:
                seen[:] = (data, grad, state)

    def refresh_arrays(self, new_state):
        """Re-set the arguments of every slot whose arrays changed."""
        entries = self.optimizer._state_entries
        for bound in self.updates + self.stats:
            for k, p in enumerate(bound.params):
                if isinstance(p, FlatView):
                    continue  # its buffers are part of the program's signature
                data, grad, state = bound.seen[k]
                if p.data is data and p.grad is grad and (not state or all(
                        a is b for a, b in zip(state, map(
                            entries[id(p)].buffers().get, bound.state_names)))):
                    continue
                self._bind_slot(bound, k, p, new_state.get(id(p)))
            bound.upload_offsets(self.optimizer._queue)

    def grad_places(self, param):
        """Where ``param``'s gradient is bound: ``(kernel, argument index,
        slot record)`` per launch that reads it, for re-setting just that
        buffer when a backward pass allocates a new gradient at the same
        offset (the slot record's ``[1]`` is then updated too); None if the
        parameter has no slot of its own (a flat batch's slot is the shared
        buffer) or is not in this program."""
        places = self._grad_places
        if places is None:
            places = self._grad_places = {}
            for bound in self.updates + self.stats:
                for k, p in enumerate(bound.params):
                    if not isinstance(p, FlatView):
                        places.setdefault(id(p), []).append(
                            (bound.kernel, bound.positions[f"g{k}"], bound.seen[k]))
        return places.get(id(param))

    def _bind_tensors_tail(self, bound):
        # Unused slots point at a buffer the optimizer owns for its lifetime:
        # the chunk table never names them, so they are never read, and they
        # never need re-setting when a tensor's arrays change.
        placeholder = self.optimizer._control.base_data
        names = ["p", "g"] + list(bound.state_names)
        for k in range(len(bound.params), bound.slots):
            for name in names:
                if f"{name}{k}" in bound.positions:
                    bound.set(f"{name}{k}", placeholder)
        bound.upload_offsets(self.optimizer._queue)

    # ----------------------------------------------------------- each step
    def set_scalars(self, group_values, scaler):
        """Set the hyperparameter arguments of launches whose group's values changed."""
        for bound in self.updates:
            values = group_values[bound.group]
            if values != bound.scalars:
                old = bound.scalars or (None,) * len(values)
                for (position, type_), value, before in zip(bound.hyper, values, old):
                    if value != before:
                        set_arg(bound.kernel, position, type_(value))
                bound.scalars = values
        if self.scaler_key:
            state = scaler._device_state()
            if state is not self.scaler_state:
                set_arg(self.finalize, 3, state.base_data)
                self.scaler_state = state

    def enqueue(self, queue):
        enqueue = cl.enqueue_nd_range_kernel
        if self.guard:
            for bound in self.stats:
                enqueue(queue, bound.kernel, bound.global_size, bound.local_size)
            enqueue(queue, self.finalize, (1,), (1,))
        for bound in self.updates:
            enqueue(queue, bound.kernel, bound.global_size, bound.local_size)
        enqueue(queue, self.advance, (1,), (1,))
