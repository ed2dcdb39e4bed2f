"""The Optimizer base: parameter groups, lazily allocated device state,
multi-tensor kernel dispatch and ``state_dict``.

An algorithm family subclasses :class:`Optimizer` and describes itself with a
few hooks (which template, which state buffers, which structural flags and
which hyperparameter arguments); everything else — validation, state,
dispatch, checkpoints — lives here once.
"""

import math
import numbers
from contextlib import contextmanager
from collections.abc import Mapping, Set

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from netcl import _kernels
from netcl.device import layout as device_layout
from netcl.optim import _multi_tensor

# Launch plans kept per optimizer. A model whose gradients are all present
# every step uses one plan per (group, dtype); steps with missing gradients
# each need their own, and the least recently used is dropped past this.
_PLAN_CACHE_SIZE = 32


def _describe(index, name):
    return f"parameter {index}" + (f" ({name!r})" if name is not None else "")


@contextmanager
def _naming(index, name):
    """Prefix a TypeError/ValueError raised inside with the parameter it is about.

    The message is only built when something fails, which keeps the per-step
    checks cheap.
    """
    try:
        yield
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{_describe(index, name)}: {exc}") from None


def is_number(value):
    """A real number as torch accepts one: Python or NumPy ints and floats, not bools."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_non_negative(name, value):
    if not is_number(value) or not value >= 0.0 or math.isinf(value):
        raise ValueError(f"Invalid {name} value: {value!r} (must be a finite number >= 0)")


def check_unit_interval(name, value, *, upper_open=False):
    if not is_number(value) or not (0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0):
        interval = "[0, 1)" if upper_open else "[0, 1]"
        raise ValueError(f"Invalid {name} value: {value!r} (must lie in {interval})")


def check_flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")


class Optimizer:
    """Base class of the netcl optimizers, modelled on ``torch.optim.Optimizer``.

    ``params`` is an iterable of parameters (objects with ``.data``, a
    C-contiguous float ``pyopencl.array.Array``, and ``.grad``, ``None`` or an
    Array like ``.data``), of ``(name, parameter)`` pairs, or of dicts
    ``{'params': [...], <hyperparameter>: value}`` defining parameter groups
    whose missing hyperparameters come from ``defaults``.

    State is allocated on the device at a parameter's first step with a
    gradient and kept in ``self.state``, a dict keyed by ``id(parameter)``.
    All parameters must live in one OpenCL context; kernels are enqueued on the
    first parameter's queue (or a new queue on its context) and a step never
    waits for the device.

    Subclasses define ``template``, ``scalar_names``, ``tensor_scalar_names``
    and the hooks ``_validate_group``, ``_state_names``, ``_initial_state``,
    ``_kernel_flags``, ``_scalar_args`` and ``_tensor_scalar_args``.
    """

    template = None
    #: Hyperparameter kernel arguments shared by every tensor of a launch.
    scalar_names = ()
    #: Kernel arguments that depend on a tensor's own step count (bias
    #: corrections, SGD's first step), passed per tensor so that tensors at
    #: different step counts still share a launch.
    tensor_scalar_names = ()
    #: Whether each parameter's state counts its updates in ``state['step']``.
    #: A family that keeps no count (torch's SGD) sets this False; a parameter
    #: whose group then needs no state buffers gets no state entry at all.
    step_in_state = True

    def __init__(self, params, defaults):
        self.defaults = dict(defaults)
        self._validate_group(self.defaults)
        self.state = {}
        self.param_groups = []
        self._context = None
        self._queue = None
        self._plans = {}  # insertion-ordered: least recently used first
        # Kernel objects by (slots, aligned, dtype, flags): the flags determine
        # the state names, so those need not be part of the key.
        self._kernels = {}
        self._checked_data = {}
        self._device_layout = None

        if isinstance(params, Set):
            self.add_param_group({"params": params})  # raises torch's message for sets
        if isinstance(params, cla.Array) or not hasattr(params, "__iter__"):
            raise TypeError(
                "params argument given to the optimizer should be an iterable of parameters "
                f"or dicts, but got {type(params).__name__}")
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        groups = params if isinstance(params[0], Mapping) else [{"params": params}]
        for group in groups:
            self.add_param_group(group)

    # ----------------------------------------------------------- param groups
    def add_param_group(self, param_group):
        """Add a group ``{'params': [...], hyperparameter: value, ...}``.

        Rejects sets (their order changes between runs), empty groups,
        duplicates within the group, parameters already in another group and
        invalid hyperparameters; nothing is added when any check fails.
        """
        if not isinstance(param_group, Mapping):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        if "params" not in param_group:
            raise ValueError("param_group has no 'params' entry")
        params = param_group["params"]
        if isinstance(params, Set):
            raise TypeError(
                "optimizer parameters need to be organized in ordered collections, but the "
                "ordering of parameters in sets will change between runs. Please use a list "
                "instead.")
        if hasattr(params, "data") and not isinstance(params, (list, tuple)):
            params = [params]
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")

        names = None
        if all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in params):
            names = [name for name, _ in params]
            params = [p for _, p in params]
        elif any(isinstance(p, tuple) for p in params):
            raise TypeError("params must be all parameters or all (name, parameter) pairs")

        base = len(self._all_params())
        context = self._context
        for offset, p in enumerate(params):
            with _naming(base + offset, names[offset] if names else None):
                context = self._check_param(p, context)

        ids = [id(p) for p in params]
        if len(set(ids)) != len(ids):
            raise ValueError("optimizer contains a parameter group with duplicate parameters")
        existing = {id(p) for p in self._all_params()}
        if existing.intersection(ids):
            raise ValueError("some parameters appear in more than one parameter group")
        if names is not None:
            taken = {n for g in self.param_groups for n in g.get("param_names", ())}
            if len(set(names)) != len(names) or taken.intersection(names):
                raise ValueError("parameter names must be unique across all groups")
        elif any("param_names" in g for g in self.param_groups):
            raise ValueError("all parameter groups must be named if any is")

        group = {key: value for key, value in param_group.items() if key != "params"}
        unknown = set(group) - set(self.defaults) - {"param_names"}
        if unknown:
            raise ValueError(f"unknown hyperparameter(s) {sorted(unknown)} for "
                             f"{type(self).__name__}")
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        self._validate_group(group)
        group["params"] = params
        if names is not None:
            group["param_names"] = names

        if self._context is None:
            self._context = context
            first_queue = getattr(params[0].data, "queue", None)
            self._queue = first_queue if first_queue is not None else cl.CommandQueue(context)
        self.param_groups.append(group)

    def _all_params(self):
        return [p for group in self.param_groups for p in group["params"]]

    @staticmethod
    def _check_param(p, context):
        """Raise TypeError/ValueError if p cannot be optimised here; returns its context."""
        data = getattr(p, "data", None)
        if not isinstance(data, cla.Array):
            raise TypeError(f".data must be a pyopencl.array.Array, "
                            f"got {type(data).__name__}")
        if data.dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype {data.dtype} is not supported "
                            "(netcl optimizers update float32 and float64 parameters)")
        if not data.flags.c_contiguous:
            raise ValueError(".data must be C-contiguous")
        if context is not None and data.context != context:
            raise ValueError("lives in another OpenCL context than the other parameters")
        if data.dtype == np.float64 and not _kernels.supports_fp64(data.context.devices[0]):
            raise TypeError("float64 needs a device with cl_khr_fp64")
        return data.context

    # ------------------------------------------------------------------ hooks
    def _validate_group(self, group):
        """Raise ValueError naming any hyperparameter out of range."""
        raise NotImplementedError

    def _state_names(self, group):
        """Names of the device state buffers, in kernel argument order."""
        raise NotImplementedError

    def _initial_state(self, group, name):
        """The value a state buffer starts from."""
        return 0.0

    def _kernel_flags(self, group):
        """Structural template flags (booleans); they key the kernel cache."""
        raise NotImplementedError

    def _scalar_args(self, group):
        """Hyperparameter arguments as floats, in ``scalar_names`` order."""
        raise NotImplementedError

    def _tensor_scalar_args(self, group, step):
        """Per-tensor arguments as floats (``tensor_scalar_names`` order).

        ``step`` is the parameter's update count including this update. Where
        ``step_in_state`` is False it is 1 for a parameter whose state this
        step creates and ``None`` otherwise.
        """
        return ()

    # ------------------------------------------------------------------- step
    def zero_grad(self, set_to_none=True):
        """Reset gradients: to ``None`` by default, as torch, else to zeros in place.

        With ``set_to_none=False`` every gradient is checked to be an Array
        first, so a bad one raises before any gradient has been zeroed.
        """
        params = [p for p in self._all_params() if p.grad is not None]
        if set_to_none:
            for p in params:
                p.grad = None
            return
        for p in params:
            if not isinstance(p.grad, cla.Array):
                raise TypeError(f"{self._describe_param(p)}: .grad must be None or a "
                                f"pyopencl.array.Array, got {type(p.grad).__name__}")
        for p in params:
            p.grad.fill(0, queue=self._queue)

    def _describe_param(self, p):
        index = 0
        for group in self.param_groups:
            for i, q in enumerate(group["params"]):
                if q is p:
                    names = group.get("param_names")
                    return _describe(index + i, names[i] if names else None)
            index += len(group["params"])
        return "parameter"

    def _check_grad(self, p):
        grad = p.grad
        if not isinstance(grad, cla.Array):
            raise TypeError(f".grad must be None or a pyopencl.array.Array, "
                            f"got {type(grad).__name__}")
        if grad.shape != p.data.shape:
            raise ValueError(f"grad shape {grad.shape} does not match "
                             f"parameter shape {p.data.shape}")
        if grad.dtype != p.data.dtype:
            raise TypeError(f"grad dtype {grad.dtype} does not match "
                            f"parameter dtype {p.data.dtype}")
        if grad.context != self._context:
            raise ValueError("grad lives in another OpenCL context than the parameter")
        if not grad.flags.c_contiguous:
            raise ValueError("grad must be C-contiguous")

    def _check_state(self, p, state, needed):
        """Raise unless ``state`` still fits ``p``: every buffer the kernel will
        write must have the parameter's shape and dtype, or the step would
        read and write outside it (e.g. after ``p.data`` was replaced by a
        larger or float64 array)."""
        missing = [name for name in needed if name not in state]
        if missing:
            raise ValueError(f"state lacks {sorted(missing)}, which this group's "
                             "settings need; set them before the first step")
        for name in needed:
            buffer = state[name]
            if not isinstance(buffer, cla.Array):
                raise TypeError(f"state {name!r} must be a pyopencl.array.Array, "
                                f"got {type(buffer).__name__}")
            if buffer.shape != p.data.shape or buffer.dtype != p.data.dtype:
                raise ValueError(
                    f"state {name!r} has shape {buffer.shape} and dtype {buffer.dtype}, but "
                    f"the parameter now has shape {p.data.shape} and dtype {p.data.dtype}; "
                    "an optimizer's state belongs to the array it was created for — "
                    "create a new optimizer (or load a matching state) after replacing .data")
            if buffer.offset != 0 or buffer.context != self._context:
                raise ValueError(f"state {name!r} must be a whole buffer (offset 0) "
                                 "in the optimizer's context")

    def step(self, closure=None):
        """Perform one optimization step over every parameter with a gradient.

        Everything that can fail — hyperparameters, parameters, gradients,
        state buffers, launch plans, kernel builds — is checked and prepared
        before anything changes: an error leaves params, state and step counts
        as they were. The kernels are then enqueued and the call returns
        without waiting for the device.
        """
        loss = None
        if closure is not None:
            loss = closure()
        batches, new_state, checked_data = self._prepare_step()
        # Nothing below raises on valid input: commit state, then enqueue.
        self._checked_data.update(checked_data)
        self.state.update(new_state)
        if self.step_in_state:
            for batch in batches:
                for p in batch.params:
                    self.state[id(p)]["step"] += 1
        for batch in batches:
            batch.enqueue(self._queue)
        return loss

    def _prepare_step(self):
        """Check everything and build what the step needs; change nothing.

        Returns the step's batches (one per group and dtype), the state
        entries to create and the parameter arrays newly checked.
        """
        active_groups = []
        checked_data = {}
        index = 0
        for group in self.param_groups:
            self._validate_group(group)
            needed = self._state_names(group)
            names = group.get("param_names")
            active = []
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                with _naming(index + i, names[i] if names else None):
                    # An Array's dtype, shape and context never change, so a
                    # data array that passed once needs no second look.
                    if self._checked_data.get(id(p)) is not p.data:
                        self._check_param(p, self._context)
                        checked_data[id(p)] = p.data
                    self._check_grad(p)
                    state = self.state.get(id(p))
                    if state:
                        self._check_state(p, state, needed)
                active.append(p)
            index += len(group["params"])
            active_groups.append((group, needed, active))

        new_state = {}
        batches = []
        for group, needed, active in active_groups:
            for p in active:
                if not self.state.get(id(p)):
                    state = self._new_state(group, p)
                    if state:
                        new_state[id(p)] = state
            by_dtype = {}
            for p in active:
                by_dtype.setdefault(p.data.dtype, []).append(p)
            flags = self._kernel_flags(group)
            for dtype, members in by_dtype.items():
                batches.append(self._batch(group, needed, flags, dtype, members, new_state))
        return batches, new_state, checked_data

    def _new_state(self, group, p):
        state = {"step": 0} if self.step_in_state else {}
        for name in self._state_names(group):
            buffer = cla.empty(self._queue, p.data.shape, p.data.dtype)
            if buffer.nbytes:
                # A fill command, not pyopencl's fill kernel: nothing to build.
                pattern = np.asarray(self._initial_state(group, name), p.data.dtype)
                cl.enqueue_fill_buffer(self._queue, buffer.base_data, pattern, 0, buffer.nbytes)
            state[name] = buffer
        return state

    def _batch(self, group, state_names, flags, dtype, params, new_state):
        """The launches of one group's parameters of one dtype, ready to enqueue."""
        layout = self._layout()
        width = layout.vector_width(dtype)
        scalar_type = dtype.type
        per_step = {}  # tensor scalars by step: computed once per distinct step
        tensor_args, aligned = [], []
        for p in params:
            state = self.state.get(id(p)) or new_state.get(id(p), {})
            if self.step_in_state:
                step = state["step"] + 1
            else:
                step = 1 if id(p) in new_state else None
            if step not in per_step:
                per_step[step] = [scalar_type(v) for v in self._tensor_scalar_args(group, step)]
            p_offset = _multi_tensor.element_offset(p.data)
            g_offset = _multi_tensor.element_offset(p.grad)
            args = [p.data.base_data, p_offset, p.grad.base_data, g_offset]
            args.extend(state[name].base_data for name in state_names)
            args.extend(per_step[step])
            tensor_args.append(args)
            aligned.append(p_offset % width == 0 and g_offset % width == 0)
        launches = self._plan(dtype, len(state_names), [p.data.size for p in params], aligned)
        flag_key = tuple(sorted(flags.items()))
        kernels = []
        for launch in launches:
            key = (launch.slots, launch.aligned, dtype, flag_key)
            kernel = self._kernels.get(key)
            if kernel is None:
                kernel = self._kernels[key] = self._kernel(dtype, launch, width, state_names,
                                                           flags)
            kernels.append(kernel)
        scalars = [scalar_type(value) for value in self._scalar_args(group)]
        return _multi_tensor.Batch(params, launches, kernels, tensor_args, scalars,
                                   layout.local_size)

    def _layout(self):
        if self._device_layout is None:
            self._device_layout = device_layout(self._context.devices[0])
        return self._device_layout

    def _plan(self, dtype, n_state, lengths, aligned):
        """The launches for tensors of these lengths, from a bounded cache.

        The plan (chunk tables) depends only on lengths and alignment, so a
        model whose gradients are all present every step builds it once; the
        cache keeps the most recently used plans for steps with missing grads.
        """
        key = (dtype, n_state, tuple(lengths), tuple(aligned))
        launches = self._plans.pop(key, None)
        if launches is None:
            slot_choices = _multi_tensor.slot_counts(
                self._context.devices[0], n_state,
                len(self.tensor_scalar_names), len(self.scalar_names))
            launches = _multi_tensor.plan(self._context, lengths, aligned, slot_choices)
            while len(self._plans) >= _PLAN_CACHE_SIZE:
                self._plans.pop(next(iter(self._plans)))
        self._plans[key] = launches  # most recently used last
        return launches

    def _kernel(self, dtype, launch, width, state_names, flags):
        """This optimizer's own kernel object for one launch shape.

        Kernel objects are never shared between optimizers: setting arguments
        and enqueueing is not atomic, so two optimizers stepping in two
        threads would race on a shared one.
        """
        c_type = _kernels.c_type(dtype)
        program = _kernels.get_program(
            self._context, self.template, "optimizer_step",
            param_t=c_type, state_t=c_type, n_tensors=launch.slots, vector_width=width,
            aligned=launch.aligned, state_names=tuple(state_names),
            tensor_scalar_names=tuple(self.tensor_scalar_names),
            scalar_names=tuple(self.scalar_names), **flags)
        per_tensor = [None, np.uint32, None, np.uint32] + [None] * len(state_names)
        per_tensor += [np.dtype(dtype)] * len(self.tensor_scalar_names)
        dtypes = per_tensor * launch.slots + [None]
        dtypes += [np.dtype(dtype)] * len(self.scalar_names)
        return _kernels.new_kernel(program, "optimizer_step", dtypes)

    # -------------------------------------------------------------- state_dict
    def state_dict(self, format="netcl"):
        """Return the state in torch's layout, with NumPy host copies of the buffers.

        ``{'state': {index: {'step': int, <buffer>: ndarray}}, 'param_groups':
        [{<hyperparameters>, 'params': [indices]}]}``; indices count parameters
        across groups in order. Loading it back restores the exact bits.

        ``format="torch"`` gives what ``torch.optim``'s ``load_state_dict``
        accepts once each array goes through ``torch.from_numpy``: ``step`` as
        a 0-d float32 array and torch's group keys; ``ValueError`` if a
        netcl-only option is not at its default (see
        :func:`netcl.optim.checkpoint.torch_state_dict`).
        """
        if format not in ("netcl", "torch"):
            raise ValueError(f"format must be 'netcl' or 'torch', got {format!r}")
        if format == "torch":
            from netcl.optim import checkpoint
            return checkpoint.torch_state_dict(self, self.state_dict())
        packed_state = {}
        groups = []
        index = 0
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            if "param_names" in packed:
                packed["param_names"] = list(packed["param_names"])
            packed["params"] = list(range(index, index + len(group["params"])))
            for i, p in zip(packed["params"], group["params"]):
                state = self.state.get(id(p))
                if state:
                    packed_state[i] = {
                        name: value.get(queue=self._queue) if isinstance(value, cla.Array)
                        else value for name, value in state.items()}
            index += len(group["params"])
            groups.append(packed)
        return {"state": packed_state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Load a state produced by :meth:`state_dict` (or torch's equivalent).

        Group count, parameters per group, each group's hyperparameters and
        every state buffer's name, shape and dtype are checked before anything
        changes; a mismatch raises an error naming the group and parameter.

        torch's own ``state_dict()`` loads as it is: buffers may be NumPy
        arrays or anything ``numpy.asarray`` converts (CPU tensors), ``step``
        a number or a 0-d array/tensor, group keys netcl does not have
        (``foreach``, ``capturable``, ...) are ignored, and a state entry whose
        buffers are all ``None`` (torch's SGD without momentum) means no state.
        """
        if not isinstance(state_dict, Mapping) or "param_groups" not in state_dict \
                or "state" not in state_dict:
            raise ValueError("state_dict must be a dict with 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        if isinstance(saved_groups, (str, bytes, Mapping)) \
                or not hasattr(saved_groups, "__len__") \
                or not all(isinstance(saved, Mapping) for saved in saved_groups):
            raise ValueError("state_dict['param_groups'] must be a list of dicts")
        if not isinstance(saved_state, Mapping):
            raise ValueError("state_dict['state'] must be a dict keyed by parameter index")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups, "
                             f"this optimizer has {len(self.param_groups)}")

        new_groups = []
        id_for_index = {}
        for g, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            saved_params = list(saved.get("params", ()))
            if len(saved_params) != len(group["params"]):
                raise ValueError(
                    f"parameter group {g}: loaded state has {len(saved_params)} parameters, "
                    f"this optimizer has {len(group['params'])}")
            saved_names = saved.get("param_names")
            if saved_names is not None and "param_names" in group \
                    and list(saved_names) != list(group["param_names"]):
                raise ValueError(f"parameter group {g}: parameter names {list(saved_names)} "
                                 f"do not match {group['param_names']}")
            merged = dict(group)
            merged.update({k: v for k, v in saved.items() if k in self.defaults})
            try:
                self._validate_group(merged)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"parameter group {g}: {exc}") from None
            new_groups.append(merged)
            for saved_index, p in zip(saved_params, group["params"]):
                if saved_index in id_for_index:
                    raise ValueError(f"parameter group {g}: parameter index {saved_index!r} "
                                     "appears more than once in the loaded param_groups")
                id_for_index[saved_index] = (g, p)

        new_state = {}
        for saved_index, entry in saved_state.items():
            if saved_index not in id_for_index:
                raise ValueError(f"loaded state names parameter index {saved_index!r}, "
                                 "which no parameter group holds")
            g, p = id_for_index[saved_index]
            position = new_groups[g]["params"].index(p)
            names = new_groups[g].get("param_names")
            where = f"parameter group {g}, " + _describe(
                saved_index, names[position] if names else None)
            checked = self._checked_state(entry, new_groups[g], p, where)
            if checked is not None:
                new_state[id(p)] = checked

        # Everything is valid: only now upload and swap in.
        uploaded = {}
        for key, entry in new_state.items():
            uploaded[key] = {
                name: cla.to_device(self._queue, value) if isinstance(value, np.ndarray)
                else value for name, value in entry.items()}
        for group, merged in zip(self.param_groups, new_groups):
            group.update(merged)
        self.state = uploaded

    def _checked_state(self, entry, group, p, where):
        """The entry as host arrays ready to upload, or None for "no state"."""
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}: state must be a dict, got {type(entry).__name__}")
        entry = {name: value for name, value in entry.items() if value is not None}
        if not set(entry) - {"step"}:
            if not self._state_names(group) or "step" not in entry:
                return None  # no buffers (and for SGD no step): nothing to restore
        expected = set(self._state_names(group))
        found = set(entry) - {"step"}
        if found != expected:
            raise ValueError(f"{where}: state has buffers {sorted(found)}, "
                             f"expected {sorted(expected)}")
        checked = {}
        if self.step_in_state:
            checked["step"] = self._checked_step(entry.get("step", 0), where)
        for name in self._state_names(group):  # in kernel order, as a fresh state
            value = entry[name]
            if not isinstance(value, np.ndarray):
                try:
                    value = np.asarray(value) if hasattr(value, "__array__") else None
                except Exception as exc:  # e.g. a tensor on a GPU
                    raise TypeError(f"{where}: state {name!r} ({type(entry[name]).__name__}) "
                                    f"cannot be converted to a numpy array: {exc}") from None
                if value is None or value.dtype == object:
                    raise TypeError(f"{where}: state {name!r} must be a numpy array, "
                                    f"got {type(entry[name]).__name__}")
            if value.shape != p.data.shape:
                raise ValueError(f"{where}: state {name!r} has shape {value.shape}, "
                                 f"expected {p.data.shape}")
            if value.dtype != p.data.dtype:
                raise TypeError(f"{where}: state {name!r} has dtype {value.dtype}, "
                                f"expected {p.data.dtype}")
            checked[name] = np.ascontiguousarray(value)
        return checked

    @staticmethod
    def _checked_step(step, where):
        if hasattr(step, "__array__") and not isinstance(step, np.generic):
            try:
                step = np.asarray(step)
            except Exception as exc:
                raise ValueError(f"{where}: step {step!r} cannot be read: {exc}") from None
        if isinstance(step, np.ndarray):
            if step.shape != ():
                raise ValueError(f"{where}: step must be a scalar, got shape {step.shape}")
            step = step.item()
        if isinstance(step, bool) or not isinstance(step, (int, float, np.integer, np.floating)) \
                or not float(step).is_integer() or step < 0:
            raise ValueError(f"{where}: step must be a non-negative whole number, got {step!r}")
        return int(step)

    def save(self, path):
        """Write the state to a safetensors file, atomically (:func:`netcl.optim.save`)."""
        from netcl.optim import checkpoint
        checkpoint.save(self, path)

    def load(self, path):
        """Restore a file written by :meth:`save`, checked first (:func:`netcl.optim.load`)."""
        from netcl.optim import checkpoint
        checkpoint.load(self, path)

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for key in sorted(k for k in group if k not in ("params", "param_names")):
                lines.append(f"    {key}: {group[key]}")
        lines.append(")")
        return "\n".join(lines)
