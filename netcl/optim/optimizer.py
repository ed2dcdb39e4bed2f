"""The Optimizer base: parameter groups, lazily allocated device state,
multi-tensor kernel dispatch and ``state_dict``.

An algorithm family subclasses :class:`Optimizer` and describes itself with a
few hooks (which template, which state buffers, which structural flags and
which hyperparameter arguments); everything else — validation, state,
dispatch, checkpoints — lives here once.
"""

import itertools
import math
import numbers
from contextlib import contextmanager
from collections.abc import Mapping, MutableMapping, Set

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from netcl import _kernels
from netcl.device import is_simulator, layout as device_layout
from netcl.optim import (_arena, _engine, _precision, _quantize, _stats, checkpoint,
                         hooks as _hooks)
from netcl.parameter import (Parameter, data_generation as parameter_data_generation,
                             generation as parameter_generation)

# Launch plans kept per optimizer. A model whose gradients are all present
# every step uses one plan per (group, dtype); steps with missing gradients
# each need their own, and the least recently used is dropped past this.
_PLAN_CACHE_SIZE = 32


# Every optimizer family, by class name, in definition order (see families()).
_FAMILIES = {}


def families():
    """The optimizer families: ``{class name: class}``, e.g. ``{'RMSProp': RMSProp,
    'Adam': Adam, 'AdamW': AdamW, 'SGD': SGD}``. Defining a subclass of
    :class:`Optimizer` with a ``template`` (or a ``torch_name``) adds it."""
    return dict(_FAMILIES)


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


def fill(queue, array, value):
    """Fill ``array`` with ``value`` by a fill command: no kernel to build.

    On a simulator (Oclgrind, which never marks what a fill command writes as
    initialised) the same bytes are written from the host instead.
    """
    if not array.nbytes:
        return
    # As bytes: pyopencl does not take bfloat16 host arrays as buffers.
    if is_simulator(queue.device):
        host = np.full(array.size, value, array.dtype).view(np.uint8)
        cl.enqueue_copy(queue, array.base_data, host, dst_offset=array.offset)
        return
    pattern = np.asarray([value], array.dtype).view(np.uint8)
    cl.enqueue_fill_buffer(queue, array.base_data, pattern, array.offset, array.nbytes)


#: Keyword arguments every optimizer takes besides its hyperparameters.
ENGINE_OPTIONS = ("skip_nonfinite", "max_grad_norm", "master_weights", "stochastic_rounding",
                  "kahan", "state_dtype", "seed")


def check_flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")


class _StateEntry(MutableMapping):
    """One parameter's state: its device buffers, and ``'step'`` read from the
    optimizer's device-resident step counts (a sync only when read).

    Every change bumps the optimizer's state version, so a step re-checks
    state buffers only after something replaced one.
    """

    __slots__ = ("_optimizer", "_index", "_buffers")

    def __init__(self, optimizer, index, buffers):
        self._optimizer = optimizer
        self._index = index
        self._buffers = dict(buffers)

    def _has_step(self):
        return self._optimizer.step_in_state

    def __getitem__(self, name):
        if name == "step" and self._has_step():
            return self._optimizer._read_steps()[self._index].item()
        return self._buffers[name]

    def __setitem__(self, name, value):
        if name == "step" and self._has_step():
            self._optimizer._write_step(self._index, value)
            return
        self._buffers[name] = value
        self._optimizer._state_version += 1

    def __delitem__(self, name):
        if name == "step" and self._has_step():
            raise KeyError("a parameter's step count cannot be deleted")
        del self._buffers[name]
        self._optimizer._state_version += 1

    def __iter__(self):
        if self._has_step():
            yield "step"
        yield from self._buffers

    def __len__(self):
        return len(self._buffers) + bool(self._has_step())

    def buffers(self):
        """The device buffers by name (no sync)."""
        return self._buffers

    def __repr__(self):
        return f"{dict(self.items())!r}"


class _State(MutableMapping):
    """``optimizer.state``: per-parameter entries keyed by ``id(parameter)``.

    Assigning a plain dict of buffers (``state[id(p)] = {...}``) is accepted
    and checked like any state at the next step.
    """

    def __init__(self, optimizer):
        self._optimizer = optimizer
        self._entries = {}

    # An entry whose parameter has not completed a step (its first step was
    # skipped for a non-finite gradient) is not shown: the state is as before.
    def _visible(self, key):
        entry = self._entries.get(key)
        return entry is not None and self._optimizer._read_steps()[entry._index] > 0

    def __getitem__(self, key):
        if not self._visible(key):
            raise KeyError(key)
        return self._entries[key]

    def __contains__(self, key):
        return self._visible(key)

    def __setitem__(self, key, value):
        optimizer = self._optimizer
        if not isinstance(value, _StateEntry):
            index = optimizer._index_of_id(key)
            if index is None:
                raise KeyError(f"{key!r} is not the id of a parameter of this optimizer")
            value = dict(value)
            step = value.pop("step", None)
            entry = _StateEntry(optimizer, index, value)
            if step is not None:
                entry["step"] = step
            value = entry
        self._entries[key] = value
        optimizer._state_version += 1

    def __delitem__(self, key):
        del self._entries[key]
        self._optimizer._state_version += 1

    def __iter__(self):
        steps = self._optimizer._read_steps()
        return iter([key for key, entry in self._entries.items() if steps[entry._index] > 0])

    def __len__(self):
        return len(list(iter(self)))

    def __repr__(self):
        return f"{dict(self.items())!r}"


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

    ``skip_nonfinite=True`` makes a step whose gradients hold any NaN or
    infinity change nothing (decided on the device; ``skipped_steps`` counts
    them); ``max_grad_norm`` clips the gradients' global L2 norm to it inside
    the update, as ``torch.nn.utils.clip_grad_norm_`` would before the step.
    Either adds one reduction pass that reads the gradients; step counts live
    on the device and ``state[...]['step']`` reads them (a sync).

    Parameters may be float32, float64, ``numpy.float16`` or
    ``ml_dtypes.bfloat16`` (gradients in the parameter's dtype). A float16 or
    bfloat16 parameter is updated in float32 (state float32 by default, the
    hyperparameters float32) and written back rounded to nearest-even, or as
    the options choose (no effect on float32/float64 parameters; see
    :mod:`netcl.optim._precision` and wiki/Mixed-precision.md):
    ``master_weights=True`` (a float32 ``state['master_param']``),
    ``stochastic_rounding=True`` (unbiased, reproducible from ``seed``, an
    integer in [0, 2**32)) or ``kahan=True`` (a compensation buffer
    ``state['kahan_comp']`` in the parameter's dtype) — one of them at
    most. ``state_dtype`` (``"float32"``, ``"bfloat16"``, or ``"int8"`` where
    the family supports it) chooses how the family's state buffers are stored
    for float32, float16 and bfloat16 parameters (float64 parameters keep
    float64 state).

    ``track_stats=True`` (also a per-group key) makes each step also compute
    training statistics inside its update pass — gradient, parameter, update
    and state norms, non-finite and zero counts, the effective learning
    rate's range — read with :meth:`stats` (see wiki/Telemetry.md).

    A family subclasses this with one module and one template: it defines
    ``template``, ``scalar_names``, ``factor_names``, the hooks
    ``_validate_group``, ``_state_names``, ``_initial_state``,
    ``_kernel_flags`` and ``_scalar_args``, and describes itself with
    ``torch_name``/``torch_hyperparameters``/``torch_options`` (the
    torch.optim counterpart, for ``state_dict(format="torch")``) and
    ``benchmark_variants``; it is then listed by :func:`families` — the
    checkpoints, the benchmark and the examples take their lists from there.
    """

    template = None
    #: The engine's options every family accepts (keyword-only), with defaults.
    #: ``track_stats`` is also a per-group key.
    engine_options = {"skip_nonfinite": False, "max_grad_norm": None, "track_stats": False,
                      "master_weights": False, "stochastic_rounding": False, "kahan": False,
                      "state_dtype": "float32", "seed": 0}
    #: The torch.optim class this family matches, the hyperparameters both
    #: share, and torch's other group keys with the defaults torch 2.13 gives them.
    torch_name = None
    torch_hyperparameters = ()
    torch_options = {}
    #: Name -> keyword arguments of the variants ``python -m netcl.bench`` times.
    benchmark_variants = {}
    #: For track_stats: the state buffers reported as the second moment and
    #: the momentum (when a group has them), and whether the template's
    #: update() assigns ``effective_lr``.
    stats_second_moment = None
    stats_momentum = None
    stats_effective_lr = False
    #: Hyperparameter kernel arguments in the state dtype, as torch rounds
    #: Python scalars for its tensor ops.
    scalar_names = ()
    #: Hyperparameter kernel arguments in float64 where the device has it,
    #: from which the template's factors() computes per-tensor values (bias
    #: corrections) from the tensor's device-resident step count.
    factor_names = ()
    #: Whether each parameter's state shows its update count as ``state['step']``.
    #: A family that shows none (torch's SGD) sets this False; a parameter
    #: whose group then needs no state buffers gets no state entry at all.
    step_in_state = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "template" in vars(cls) or "torch_name" in vars(cls):
            _FAMILIES[cls.__name__] = cls

    def __init__(self, params, defaults, *, skip_nonfinite=False, max_grad_norm=None,
                 track_stats=False, master_weights=False, stochastic_rounding=False,
                 kahan=False, state_dtype="float32", seed=0):
        self.defaults = dict(defaults, track_stats=track_stats)
        self._check_group(self.defaults)
        check_flag("skip_nonfinite", skip_nonfinite)
        if max_grad_norm is not None:
            check_non_negative("max_grad_norm", max_grad_norm)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self._init_precision(master_weights, stochastic_rounding, kahan, state_dtype, seed)
        self._state = _State(self)
        self._state_entries = self._state._entries
        self._state_version = 0
        self._checked_state_version = -1
        self.param_groups = []
        self._context = None
        self._queue = None
        self._plans = {}  # insertion-ordered: least recently used first
        self._checked_data = {}
        # [param, data, grad, places] per parameter in group order, as the
        # last prepared step saw them (grad None: not in that step; places:
        # where the program binds the gradient, _engine.Program.grad_places)
        self._step_arrays = []
        self._device_layout = None
        self._program = None
        self._param_index = {}  # id(param) -> index across groups
        self._position = []     # index -> (group, position in group)
        self._tracked = True    # every parameter is a netcl.Parameter
        self._steps = None      # device: per-parameter update counts (uint32)
        self._steps_host = None  # its last host copy, until the next step
        self._control = None    # device: found_inf, unscale, clip coef, norm
        self._skipped = None    # device: skipped-step count
        self._shard = None      # ids of the parameters this process updates (None: all)
        self._stats_steps = 0     # track_stats steps run so far
        self._stats_last = None   # (program, learning rates) of the last one
        self._step_pre_hooks, self._step_post_hooks = {}, {}
        self._state_dict_pre_hooks, self._state_dict_post_hooks = {}, {}
        self._load_state_dict_pre_hooks, self._load_state_dict_post_hooks = {}, {}

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

    def _init_precision(self, master_weights, stochastic_rounding, kahan, state_dtype, seed):
        """The low-precision options (see :mod:`netcl.optim._precision`)."""
        for name, value in (("master_weights", master_weights),
                            ("stochastic_rounding", stochastic_rounding), ("kahan", kahan)):
            check_flag(name, value)
        chosen = [name for name, value in (("master_weights", master_weights),
                                           ("stochastic_rounding", stochastic_rounding),
                                           ("kahan", kahan)) if value]
        if len(chosen) > 1:
            raise ValueError(f"{' and '.join(chosen)} are alternatives ways to write back a "
                             "low-precision parameter: choose one")
        _precision.check_state_dtype(state_dtype)
        if state_dtype == "int8" and not self.quantizable:
            raise ValueError(f"state_dtype='int8' quantises Adam's and RMSProp's moments; "
                             f"{type(self).__name__} supports 'float32' and 'bfloat16'")
        _precision.check_seed(seed)
        self.master_weights = bool(master_weights)
        self.stochastic_rounding = bool(stochastic_rounding)
        self.kahan = bool(kahan)
        self.state_dtype = state_dtype
        self.seed = int(seed)

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
        self._check_group(group)
        group["params"] = params
        if names is not None:
            group["param_names"] = names

        if self._context is None:
            self._context = context
            first_queue = getattr(params[0].data, "queue", None)
            self._queue = first_queue if first_queue is not None else cl.CommandQueue(context)
        self.param_groups.append(group)
        self._reindex()

    def _all_params(self):
        return [p for group in self.param_groups for p in group["params"]]

    @property
    def state(self):
        """Per-parameter state keyed by ``id(parameter)``: its device buffers
        and (``step_in_state``) ``'step'``, read from the device."""
        return self._state

    def _index_of_id(self, key):
        return self._param_index.get(key)

    def _reindex(self):
        """Index every parameter and size the device step counts to match."""
        self._param_index = {}
        self._position = []
        for g, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                self._param_index[id(p)] = len(self._position)
                self._position.append((g, i))
        self._tracked = all(isinstance(p, Parameter) for p in self._all_params())
        n = len(self._position)
        old = self._read_steps() if self._steps is not None else np.zeros(0, np.uint32)
        steps = np.zeros(n, np.uint32)
        steps[:len(old)] = old[:n]
        self._steps = cla.to_device(self._queue, steps)
        self._steps_host = None
        if self._control is None:
            self._control = cla.to_device(self._queue, _engine.INITIAL_CONTROL)
            self._skipped = cla.zeros(self._queue, 1, np.uint32)
        self._program = None

    @staticmethod
    def _check_param(p, context):
        """Raise TypeError/ValueError if p cannot be optimised here; returns its context."""
        data = getattr(p, "data", None)
        if not isinstance(data, cla.Array):
            raise TypeError(f".data must be a pyopencl.array.Array, "
                            f"got {type(data).__name__}")
        if data.dtype not in _precision.PARAM_DTYPES:
            raise TypeError(f"dtype {data.dtype} is not supported (netcl optimizers update "
                            "float32, float64, float16 and bfloat16 parameters)")
        if not data.flags.c_contiguous:
            raise ValueError(".data must be C-contiguous")
        if context is not None and data.context != context:
            raise ValueError("lives in another OpenCL context than the other parameters")
        if data.dtype == np.float64 and not _kernels.supports_fp64(data.context.devices[0]):
            raise TypeError("float64 needs a device with cl_khr_fp64")
        return data.context

    # ------------------------------------------------------------------ hooks
    def _check_group(self, group):
        """The engine's group keys, then the family's :meth:`_validate_group`."""
        check_flag("track_stats", group.get("track_stats", False))
        self._validate_group(group)

    def _validate_group(self, group):
        """Raise ValueError naming any hyperparameter out of range."""
        raise NotImplementedError

    def _state_names(self, group):
        """Names of the device state buffers, in kernel argument order."""
        raise NotImplementedError

    def _initial_state(self, group, name):
        """The value a state buffer starts from."""
        return 0.0

    #: State names ``state_dtype="int8"`` quantises, each with whether its
    #: values take both signs (the signed map) or not (see netcl.optim._quantize).
    quantized_state = {}

    @property
    def quantizable(self):
        return bool(self.quantized_state)

    def _quantized(self, dtype, size):
        """Whether a parameter's state is int8: ``state_dtype="int8"``, not
        float64, and at least _quantize.MIN_ELEMENTS elements."""
        return self.state_dtype == "int8" and np.dtype(dtype) != _precision.FLOAT64 \
            and size >= _quantize.MIN_ELEMENTS

    def _buffer_names(self, group, dtype, size=0):
        """The state buffers of a parameter of ``dtype`` and ``size`` elements
        in ``group``, in kernel order: the family's, the per-block scales of
        its int8 ones, then the low-precision write-back's."""
        names = list(self._state_names(group))
        if self._quantized(dtype, size):
            names += [name + _quantize.ABSMAX for name in names if name in self.quantized_state]
        if _precision.is_low_precision(dtype):
            if self.master_weights:
                names.append(_precision.MASTER)
            elif self.kahan:
                names.append(_precision.KAHAN)
        return names

    def _buffer_dtype(self, dtype, name, names=()):
        """The dtype a state buffer of a parameter of ``dtype`` is stored in;
        ``names`` are all its buffers (an int8 one has a ``_absmax`` partner)."""
        dtype = np.dtype(dtype)
        if name == _precision.MASTER or name.endswith(_quantize.ABSMAX):
            return _precision.FLOAT32
        if name == _precision.KAHAN:
            return dtype
        if name + _quantize.ABSMAX in names:
            return np.dtype(np.uint8)
        if dtype == _precision.FLOAT64 or self.state_dtype != "bfloat16":
            return _precision.compute_dtype(dtype)
        return _precision.BFLOAT16

    @staticmethod
    def _buffer_shape(p, name):
        if name.endswith(_quantize.ABSMAX):
            return (_quantize.blocks(p.data.size),)
        return p.data.shape

    def _state_format(self, dtype, name, names):
        """The kernel storage format of a state buffer."""
        return _precision.storage_format(self._buffer_dtype(dtype, name, names))

    def _initial_fill(self, group, name, names):
        """The value a new state buffer is filled with: the family's initial
        value, or for int8 state the code and scale that make it."""
        if name.endswith(_quantize.ABSMAX):
            base = name[:-len(_quantize.ABSMAX)]
            return _quantize.initial_codes(self.quantized_state[base],
                                           self._initial_state(group, base))[1]
        if name + _quantize.ABSMAX in names:
            return _quantize.initial_codes(self.quantized_state[name],
                                           self._initial_state(group, name))[0]
        return self._initial_state(group, name)

    def _kernel_flags(self, group):
        """Structural template flags (booleans); they key the kernel cache."""
        raise NotImplementedError

    def _scalar_args(self, group):
        """Hyperparameter arguments as floats, in ``scalar_names + factor_names`` order."""
        raise NotImplementedError

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
            _precision.bits_view(p.grad).fill(0, queue=self._queue)  # bfloat16: its bits

    def _describe_param(self, p):
        index = self._param_index.get(id(p))
        if index is None:
            return "parameter"
        group, position = self._position[index]
        names = self.param_groups[group].get("param_names")
        return _describe(index, names[position] if names else None)

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

    def _check_state(self, p, buffers, needed):
        """Raise unless ``buffers`` still fit ``p``: every buffer the kernel will
        write must have the parameter's shape and dtype, or the step would
        read and write outside it (e.g. after ``p.data`` was replaced by a
        larger or float64 array)."""
        missing = [name for name in needed if name not in buffers]
        if missing:
            raise ValueError(f"state lacks {sorted(missing)}, which this group's "
                             "settings need; set them before the first step")
        for name in needed:
            buffer = buffers[name]
            if not isinstance(buffer, cla.Array):
                raise TypeError(f"state {name!r} must be a pyopencl.array.Array, "
                                f"got {type(buffer).__name__}")
            expected = self._buffer_dtype(p.data.dtype, name, needed)
            shape = self._buffer_shape(p, name)
            if buffer.shape != shape or buffer.dtype != expected:
                raise ValueError(
                    f"state {name!r} has shape {buffer.shape} and dtype {buffer.dtype}, but "
                    f"the parameter now has shape {p.data.shape} and dtype {p.data.dtype} "
                    f"(state shape {shape}, dtype {expected}); "
                    "an optimizer's state belongs to the array it was created for — "
                    "create a new optimizer (or load a matching state) after replacing .data")
            # The kernels read state at its element offset, through vector
            # pointers when the parameter and gradient are vector-aligned: a
            # view must start where they do, or on an _arena.ALIGN boundary.
            # int8 state (codes and per-block scales) is whole buffers.
            whole = shape != p.data.shape or any(n + _quantize.ABSMAX in needed for n in needed)
            element = _engine.element_offset(buffer)
            placed = element == 0 if whole else (
                element == _engine.element_offset(p.data) or element % _arena.ALIGN == 0)
            if not placed or buffer.context != self._context:
                raise ValueError(f"state {name!r} must be a whole buffer, or a view at its "
                                 f"parameter's offset or at a multiple of {_arena.ALIGN} "
                                 "elements, in the optimizer's context")

    @property
    def skipped_steps(self):
        """Steps skipped for a non-finite gradient (read from the device: a sync)."""
        return int(self._skipped.get(queue=self._queue)[0])

    def _set_shard(self, owned):
        """Update (and keep state for) only the parameters in ``owned``.

        For sharded optimizer state (:mod:`netcl.distributed`'s ZeRO): the
        other parameters' gradients are still read by the step's reduction
        pass when the step is guarded (``skip_nonfinite``, ``max_grad_norm``
        or a GradScaler), so the skip decision and the clipping norm cover
        every gradient — identical on every process once the gradients are
        all-reduced — but those parameters get no state, no update and no
        step count. ``None`` updates every parameter again. Existing state of
        parameters outside the shard is dropped.
        """
        if owned is None:
            shard = None
        else:
            shard = {id(p) for p in owned}
            unknown = shard - set(self._param_index)
            if unknown:
                raise ValueError(f"{len(unknown)} parameter(s) of the shard are not in "
                                 "this optimizer's param_groups")
        self._shard = shard
        if shard is not None:
            for key in [key for key in self._state_entries if key not in shard]:
                del self._state_entries[key]
        self._state_version += 1
        self._program = None

    def step(self, closure=None):
        """Perform one optimization step over every parameter with a gradient.

        Everything that can fail — hyperparameters, parameters, gradients,
        state buffers, launch plans, kernel builds — is checked and prepared
        before anything changes: an error leaves params, state and step counts
        as they were. The kernels are then enqueued and the call returns
        without waiting for the device. With ``skip_nonfinite`` or
        ``max_grad_norm`` a reduction pass over the gradients comes first and
        the device itself decides whether to skip and how much to clip.
        """
        return _hooks.run_step(self, self._step, (closure,), {})

    def _step(self, closure=None):
        loss = None
        if closure is not None:
            loss = closure()
        self._run_step(None)
        return loss

    # ------------------------------------------------------------------ hooks
    def register_step_pre_hook(self, hook):
        """``hook(optimizer, args, kwargs)`` before each step; it may return
        new ``(args, kwargs)``. Returns a handle whose ``remove()`` drops it."""
        return _hooks.register(self._step_pre_hooks, hook)

    def register_step_post_hook(self, hook):
        """``hook(optimizer, args, kwargs)`` after each step (once its kernels
        are enqueued). Returns a removable handle."""
        return _hooks.register(self._step_post_hooks, hook)

    def register_state_dict_pre_hook(self, hook, prepend=False):
        """``hook(optimizer)`` before :meth:`state_dict` builds the dict."""
        return _hooks.register(self._state_dict_pre_hooks, hook, prepend)

    def register_state_dict_post_hook(self, hook, prepend=False):
        """``hook(optimizer, state_dict)`` after :meth:`state_dict`; a returned
        dict replaces it."""
        return _hooks.register(self._state_dict_post_hooks, hook, prepend)

    def register_load_state_dict_pre_hook(self, hook, prepend=False):
        """``hook(optimizer, state_dict)`` before :meth:`load_state_dict`
        (on a shallow copy); a returned dict is loaded instead."""
        return _hooks.register(self._load_state_dict_pre_hooks, hook, prepend)

    def register_load_state_dict_post_hook(self, hook, prepend=False):
        """``hook(optimizer)`` after :meth:`load_state_dict` succeeded."""
        return _hooks.register(self._load_state_dict_post_hooks, hook, prepend)

    def _run_step(self, scaler):
        """Prepare (or reuse) the bound program for this step and enqueue it.

        ``scaler`` is a :class:`netcl.amp.GradScaler` driving this step, or None.
        """
        scaler_key = None if scaler is None else scaler._step_key(self)
        groups = self._group_scalars()  # validates every group first
        program = self._program
        if not (program is not None and self._tracked
                and program.state_version == self._state_version
                and program.scaler_key == scaler_key
                and program.groups_key == self._groups_key(groups)
                and (program.generation == parameter_generation()
                     or self._rebind_new_grads(program))):
            program = self._prepare_step(groups, scaler_key)
        program.set_scalars([values for _, values in groups], scaler)
        program.enqueue(self._queue)
        self._steps_host = None
        if program.tracked:
            self._stats_steps += 1
            self._stats_last = (program, [group["lr"] for group in self.param_groups])

    def stats(self):
        """The statistics of the last ``track_stats`` step, read from the
        device (one wait): ``{'step': tracked steps so far, 'skipped': bool,
        'global': {...}, 'groups': {index: {'lr', 'stats': {...}, 'params':
        {name or index: {...}}}}}``, each innermost dict of Python numbers:
        ``grad_norm`` (the unscaled gradient, before clipping), ``param_norm``
        (before the update), ``update_norm``, ``update_to_weight``,
        ``nonfinite``, ``zeros``, ``numel`` and, where the family and group
        have them, ``second_moment_rms``, ``lr_min``/``lr_mean``/``lr_max``
        (the effective learning rate) and ``momentum_norm``. A skipped step
        reports the gradient and parameter values only. See wiki/Telemetry.md.
        """
        if self._stats_last is None:
            return _stats.empty()
        program, lrs = self._stats_last
        return _stats.read(self, program, self._stats_steps, lrs)

    def _group_scalars(self):
        """Per group: (kernel flags, scalar argument values), validated."""
        out = []
        for group in self.param_groups:
            self._check_group(group)
            flags = self._kernel_flags(group)
            flags["track_stats"] = bool(group.get("track_stats", False))
            out.append((flags, tuple(self._scalar_args(group))))
        return out

    def _groups_key(self, groups):
        return tuple((id(group["params"]), len(group["params"]), tuple(sorted(flags.items())))
                     for group, (flags, _) in zip(self.param_groups, groups))

    def _rebind_new_grads(self, program):
        """Reuse ``program`` when the only change since it was bound is new
        ``.grad`` arrays, each valid and at its predecessor's offset (a
        backward pass that allocates its gradients): re-set just those
        buffer arguments, one pass over the parameters. Returns False
        when anything else changed (a parameter's data, which parameters
        have gradients, an offset, a flat batch, an invalid gradient);
        :meth:`_prepare_step` then rebuilds, or raises naming the culprit."""
        # Only netcl.Parameters get here (self._tracked): their slots are read
        # directly, and their data need no look unless some .data was assigned.
        data_same = program.data_generation == parameter_data_generation()
        changed = []
        live = itertools.chain.from_iterable(group["params"] for group in self.param_groups)
        for entry, current in zip(self._step_arrays, live):
            p, data, old, places = entry
            if p is not current:  # a group's list was edited in place
                return False
            grad = p._grad
            if grad is old:
                if data_same or grad is None or p._data is data:
                    continue
                return False
            if (places is None or grad is None or not (data_same or p._data is data)
                    or not isinstance(grad, cla.Array) or grad.offset != old.offset):
                return False
            # Shaped, typed and laid out like the array it replaces, in the
            # same context: as valid as that one was.
            if not (grad.shape == old.shape and grad.dtype is old.dtype
                    and grad.strides == old.strides and grad.context is old.context):
                try:
                    self._check_grad(p)
                except (TypeError, ValueError):
                    return False
            changed.append((entry, grad))
        for entry, grad in changed:
            buffer = grad.base_data
            for kernel, position, record in entry[3]:
                kernel.set_arg(position, buffer)
                record[1] = grad
            entry[2] = grad
        program.generation = parameter_generation()
        program.data_generation = parameter_data_generation()
        return True

    def _prepare_step(self, groups, scaler_key):
        """Check everything and build (or refresh) the step's program; on
        success commit new state and return the program. Changes nothing on
        error."""
        checked_data = {}
        batches = []
        signature = []
        new_state = {}
        state_checked = self._state_version != self._checked_state_version
        param_index, entries = self._param_index, self._state_entries
        seen_data = self._checked_data
        seen_grads = {id(p): grad for p, _, grad, _ in self._step_arrays if grad is not None}
        shard, guarded = self._shard, self._guarded(scaler_key)
        for g, (group, (flags, _)) in enumerate(zip(self.param_groups, groups)):
            needed_by_dtype = {}
            by_dtype = {}
            for i, p in enumerate(group["params"]):
                grad = p.grad
                if grad is None:
                    continue
                key = id(p)
                if key not in param_index:
                    raise ValueError(
                        f"parameter group {g}, position {i}: not a parameter this optimizer "
                        "was given (a group's list was edited in place); use "
                        "add_param_group, or build a new optimizer")
                kind = (p.data.dtype, self._quantized(p.data.dtype, p.data.size))
                needed = needed_by_dtype.get(kind)
                if needed is None:
                    needed = needed_by_dtype[kind] = self._buffer_names(
                        group, p.data.dtype, p.data.size)
                try:
                    # An Array's dtype, shape and context never change, so an
                    # array that passed once needs no second look.
                    if seen_data.get(key) is not p.data:
                        self._check_param(p, self._context)
                        checked_data[key] = p.data
                        state_checked = True
                    if seen_grads.get(key) is not grad:
                        self._check_grad(p)
                    entry = entries.get(key)
                    if state_checked and entry is not None and entry.buffers():
                        self._check_state(p, entry.buffers(), needed)
                except (TypeError, ValueError) as exc:
                    names = group.get("param_names")
                    raise type(exc)(f"{_describe(param_index[key], names[i] if names else None)}"
                                    f": {exc}") from None
                # Outside this process's shard: only read by the guard's pass.
                update = shard is None or key in shard
                if not update and not guarded:
                    continue
                members = by_dtype.get((update, kind))
                if members is None:
                    members = by_dtype[(update, kind)] = []
                members.append((param_index[key], p))
            flag_key = tuple(sorted(flags.items()))
            for (update, kind), members in by_dtype.items():
                dtype = kind[0]
                needed = needed_by_dtype[kind]
                names = needed if update else ()
                fresh = [p for _, p in members if id(p) not in entries]
                if update and fresh and (needed or self.step_in_state):
                    new_state.update(self._new_state(group, fresh, len(fresh) == len(members),
                                                     needed))
                flat = self._flat(members, names, new_state)
                packs = () if flat else self._shared_state_packs(members, names, new_state)
                batches.append((g, group, flags, names, dtype, members, flat, update, packs))
                width, itemsize = self._vector_width(dtype), dtype.itemsize
                signature.append((g, update, kind, flag_key, flat, packs, tuple(
                    (index, p.data.size, (p.data.offset // itemsize) % width == 0
                     and (p.grad.offset // itemsize) % width == 0) for index, p in members)))
        signature = (tuple(signature), scaler_key)

        program = self._program
        try:
            if program is None or program.signature != signature:
                program = self._build_program(batches, signature, scaler_key, new_state)
            else:
                program.refresh_arrays(new_state)
        except BaseException:
            self._program = None  # possibly half re-bound: rebuild next time
            raise
        # Everything is valid and built: commit.
        for key, buffers in new_state.items():
            self._state_entries[key] = _StateEntry(self, self._param_index[key], buffers)
        self._checked_data.update(checked_data)
        stepped = {id(p) for batch in batches for _, p in batch[5]}
        self._step_arrays = [[p, p.data, p.grad, program.grad_places(p)] if id(p) in stepped
                             else [p, p.data, None, None]
                             for group in self.param_groups for p in group["params"]]
        self._state_version += 1 if new_state else 0
        self._checked_state_version = self._state_version
        program.generation = parameter_generation()
        program.data_generation = parameter_data_generation()
        program.state_version = self._state_version
        program.groups_key = self._groups_key(groups)
        self._program = program
        return program

    def _vector_width(self, dtype):
        """Elements per vector for parameters of ``dtype``: as many as the
        compute type fills (float16 and bfloat16 compute in float32)."""
        return self._layout().vector_width(_precision.compute_dtype(dtype))

    def _aligned(self, p, dtype):
        width = self._vector_width(dtype)
        return (p.data.offset // dtype.itemsize) % width == 0 \
            and (p.grad.offset // dtype.itemsize) % width == 0

    def _new_state(self, group, params, whole_batch, names):
        """New state buffers for ``params``, by ``id(param)``.

        When a whole batch of flat parameters (views of one buffer, see
        :func:`netcl.optim.flatten_`) starts together, each state buffer is
        likewise a view of one buffer at its parameter's offset, so the
        step stays a single launch. Otherwise parameters that start together
        get their state packed into shared buffers (:mod:`netcl.optim._arena`),
        so their launches pass one buffer per state name; int8 state (whose
        scales are per block) stays per tensor.
        """
        bases = {(id(p.data.base_data), id(p.grad.base_data)) for p in params}
        quantized = any(name.endswith(_quantize.ABSMAX) for name in names)
        flat = whole_batch and len(params) > 1 and len(bases) == 1 and names and all(
            p.grad.offset == p.data.offset for p in params) and not quantized
        out = {}
        if flat:
            base = params[0].data.base_data
            dtype = params[0].data.dtype
            whole = {name: cla.empty(self._queue, base.size // dtype.itemsize,
                                     self._buffer_dtype(dtype, name)) for name in names}
            for name, buffer in whole.items():
                fill(self._queue, buffer, self._initial_fill(group, name, names))
            for p in params:
                begin = p.data.offset // dtype.itemsize
                out[id(p)] = {name: buffer[begin:begin + p.data.size].reshape(p.data.shape)
                              for name, buffer in whole.items()}
            return out
        if len(params) > 1 and names and not quantized:
            dtypes = {name: self._buffer_dtype(params[0].data.dtype, name, names)
                      for name in names}
            views, arenas = _arena.allocate(self._queue, [p.data.shape for p in params], dtypes)
            for arena in arenas:
                for name, buffer in arena.items():
                    fill(self._queue, buffer, self._initial_fill(group, name, names))
            return {id(p): buffers for p, buffers in zip(params, views)}
        for p in params:
            buffers = {}
            for name in names:
                buffer = cla.empty(self._queue, self._buffer_shape(p, name),
                                   self._buffer_dtype(p.data.dtype, name, names))
                fill(self._queue, buffer, self._initial_fill(group, name, names))
                buffers[name] = buffer
            out[id(p)] = buffers
        return out

    def _flat(self, members, state_names, new_state):
        """For a flat batch — every parameter, gradient and state buffer a view
        of one buffer per role, each at its parameter's offset — the ids of
        those buffers (part of the program's signature); else None. A flat
        batch is updated by one launch whatever its number of tensors."""
        if len(members) < 2 or any(n.endswith(_quantize.ABSMAX) for n in state_names):
            return None  # int8 state is per tensor (its scales are per block)

        def buffers_of(p):
            if not state_names:
                return {}
            return new_state.get(id(p)) or self._state_entries[id(p)].buffers()

        first = members[0][1]
        roles = [first.data.base_data, first.grad.base_data]
        buffers = buffers_of(first)
        roles += [buffers[name].base_data for name in state_names]
        for _, p in members:
            offset = p.data.offset
            if p.data.base_data is not roles[0] or p.grad.base_data is not roles[1] \
                    or p.grad.offset != offset:
                return None
            buffers = buffers_of(p)
            for name, base in zip(state_names, roles[2:]):
                if buffers[name].base_data is not base or buffers[name].offset != offset:
                    return None
        return tuple(id(role) for role in roles)

    def _shared_state_packs(self, members, state_names, new_state):
        """Positions in ``members`` of the parameters whose state buffers are
        views of the same buffers (:mod:`netcl.optim._arena`), as a tuple
        of tuples, one per set of at least two; they are updated by launches
        that pass those buffers once."""
        if not state_names or any(n.endswith(_quantize.ABSMAX) for n in state_names):
            return ()
        by_bases = {}
        for position, (_, p) in enumerate(members):
            buffers = new_state.get(id(p)) or self._state_entries[id(p)].buffers()
            bases = tuple(id(buffers[name].base_data) for name in state_names)
            by_bases.setdefault(bases, []).append(position)
        return tuple(tuple(positions) for positions in by_bases.values() if len(positions) > 1)

    def _layout(self):
        if self._device_layout is None:
            self._device_layout = device_layout(self._context.devices[0])
        return self._device_layout

    def _factor_dtype(self):
        fp64 = _kernels.supports_fp64(self._context.devices[0])
        return np.dtype(np.float64 if fp64 else np.float32)

    def _plan(self, dtype, state_names, lengths, indices, aligned, starts=None,
              track_stats=False, shared_state=False):
        """The launches for tensors of these lengths, from a bounded cache.

        The plan (chunk tables) depends only on lengths, parameter indices,
        alignment and, for a flat batch, the tensors' starts in the shared
        buffers, so a model whose gradients are all present every step builds
        it once; the cache keeps the most recently used plans for steps with
        missing grads.
        """
        key = (dtype, len(state_names), track_stats, shared_state, tuple(lengths),
               tuple(indices), tuple(aligned), None if starts is None else tuple(starts))
        launches = self._plans.pop(key, None)
        if launches is None:
            if starts is not None:
                launches = [_engine.flat_launch(self._context, lengths, indices, starts,
                                                all(aligned))]
            else:
                device = self._context.devices[0]

                def size(slots):
                    return _engine.argument_bytes(device, self._step_arguments(
                        slots, dtype, state_names, track_stats, shared_state))

                fixed = size(0)
                per_tensor = size(1) - fixed
                slot_choices = _engine.slot_counts(device, per_tensor, fixed)
                launches = _engine.plan(self._context, lengths, indices, aligned, slot_choices,
                                        shared_state)
            while len(self._plans) >= _PLAN_CACHE_SIZE:
                self._plans.pop(next(iter(self._plans)))
        self._plans[key] = launches  # most recently used last
        return launches

    def _build_program(self, batches, signature, scaler_key, new_state):
        layout = self._layout()
        factor_dtype = self._factor_dtype()
        guard = self._guarded(scaler_key)
        program = _engine.Program(self, signature, scaler_key, guard)
        for g, group, flags, state_names, dtype, all_members, flat, update, packs in batches:
            track = update and flags.get("track_stats", False)
            if track:
                program.tracked_indices.setdefault(g, []).extend(i for i, _ in all_members)
            # Launches over each set of parameters whose state shares buffers,
            # then over the rest.
            packed = {position for pack in packs for position in pack}
            rest = tuple(i for i in range(len(all_members)) if i not in packed)
            for positions, shared in [(pack, True) for pack in packs] + [(rest, False)]:
                if not positions:
                    continue
                members = [all_members[i] for i in positions]
                params = [p for _, p in members]
                lengths = [p.data.size for p in params]
                indices = [index for index, _ in members]
                aligned = [self._aligned(p, dtype) for p in params]
                starts = [p.data.offset // dtype.itemsize for p in params] if flat else None
                launches = self._plan(dtype, state_names, lengths, indices, aligned, starts,
                                      track, shared)
                for launch in launches:
                    # A flat launch has one slot: the shared buffers, at offset 0.
                    slot_params = [_engine.FlatView(params[launch.indices[0]], new_state,
                                                    self._state_entries)] if flat else \
                        [params[i] for i in launch.indices]
                    if update:
                        kernel = self._update_kernel(dtype, factor_dtype, launch, layout,
                                                     state_names, flags, guard)
                        program.add_update(g, launch, kernel, slot_params, state_names,
                                           new_state)
                    if guard:
                        stats = self._stats_kernel(dtype, factor_dtype, launch, layout)
                        program.add_stats(launch, stats, slot_params)
        program.finish(self._active_indices(batches))
        return program

    def _guarded(self, scaler_key):
        return self.skip_nonfinite or self.max_grad_norm is not None or scaler_key is not None

    @staticmethod
    def _active_indices(batches):
        return [index for batch in batches if batch[7] for index, _ in batch[5]]

    def _step_arguments(self, slots, dtype, state_names, track_stats=False, shared_state=False):
        """The update kernel's arguments for ``slots`` tensors of ``dtype``
        (computed in float32 for float16 and bfloat16)."""
        return _engine.step_arguments(
            slots, state_names, self.scalar_names, self.factor_names, dtype,
            _precision.compute_dtype(dtype), self._factor_dtype(), track_stats,
            {name: self._buffer_dtype(dtype, name, state_names) for name in state_names},
            seed=self._stochastic(dtype), shared_state=shared_state)

    def _stochastic(self, dtype):
        return self.stochastic_rounding and _precision.is_low_precision(dtype)

    def _update_kernel(self, dtype, factor_dtype, launch, layout, state_names, flags, guard):
        track_stats = flags.get("track_stats", False)
        arguments = self._step_arguments(launch.slots, dtype, state_names, track_stats,
                                         launch.shared_state)
        param_format = _precision.storage_format(dtype)
        low_precision = _precision.is_low_precision(dtype)
        # Which state the statistics read (none without track_stats, so the
        # plain kernels' cache keys stay as they are).
        roles = dict(second_moment=None, momentum_state=None, effective_lr=False, local_size=1)
        if any(name.endswith(_quantize.ABSMAX) for name in state_names):
            roles["local_size"] = layout.local_size  # int8 state keeps blocks on CPUs
        if track_stats:
            roles = dict(
                second_moment=self.stats_second_moment
                if self.stats_second_moment in state_names else None,
                momentum_state=self.stats_momentum if self.stats_momentum in state_names
                else None,
                effective_lr=self.stats_effective_lr, local_size=layout.local_size)
        program = _kernels.get_program(
            self._context, self.template, "optimizer_step",
            param_t=_precision.POINTER_TYPES[param_format], param_format=param_format,
            state_t=_kernels.c_type(_precision.compute_dtype(dtype)),
            state_formats=tuple(self._state_format(dtype, name, state_names)
                                for name in state_names),
            signed_codes=tuple(name for name in state_names
                               if self.quantized_state.get(name) is True),
            master_weights=low_precision and self.master_weights,
            kahan=low_precision and self.kahan, stochastic=self._stochastic(dtype),
            factor_t=_kernels.c_type(factor_dtype),
            n_tensors=launch.slots, vector_width=self._vector_width(dtype),
            aligned=launch.aligned, state_names=tuple(state_names), guard=guard,
            shared_state=launch.shared_state,
            declarations=tuple(a.declaration for a in arguments), **roles, **flags)
        return _kernels.new_kernel(program, "optimizer_step", [a.dtype for a in arguments]), \
            arguments

    def _stats_kernel(self, dtype, factor_dtype, launch, layout):
        arguments = _engine.stats_arguments(launch.slots, dtype, factor_dtype)
        param_format = _precision.storage_format(dtype)
        program = _kernels.get_program(
            self._context, "step_control.cl.mako", "grad_stats", kernel="grad_stats",
            param_t=_precision.POINTER_TYPES[param_format], param_format=param_format,
            factor_t=_kernels.c_type(factor_dtype),
            vector_width=self._vector_width(dtype), n_tensors=launch.slots,
            aligned=launch.aligned, declarations=tuple(a.declaration for a in arguments),
            local_size=layout.local_size)
        return _kernels.new_kernel(program, "grad_stats", [a.dtype for a in arguments]), \
            arguments

    # ----------------------------------------------------- device step counts
    def _read_steps(self):
        """The step counts as a host array: one read after each step (a sync)."""
        if self._steps_host is None:
            self._steps_host = self._steps.get(queue=self._queue)
        return self._steps_host

    def _write_step(self, index, value):
        value = self._checked_step(value, _describe(index, None))
        host = np.asarray([value], np.uint32)
        cl.enqueue_copy(self._queue, self._steps.base_data, host,
                        dst_offset=self._steps.offset + 4 * index)
        self._steps_host = None

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
            return checkpoint.torch_state_dict(self, self.state_dict())
        for hook in list(self._state_dict_pre_hooks.values()):
            hook(self)
        state_dict = self._state_dict()
        for hook in list(self._state_dict_post_hooks.values()):
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def _state_dict(self):
        packed_state = {}
        groups = []
        index = 0
        steps = self._read_steps()
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            if "param_names" in packed:
                packed["param_names"] = list(packed["param_names"])
            packed["params"] = list(range(index, index + len(group["params"])))
            for i, p in zip(packed["params"], group["params"]):
                entry = self._state_entries.get(id(p))
                if entry is not None and steps[i] > 0:
                    saved = {"step": int(steps[i])} if self.step_in_state else {}
                    saved.update((name, value.get(queue=self._queue))
                                 for name, value in entry.buffers().items())
                    packed_state[i] = saved
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
        if self._load_state_dict_pre_hooks and isinstance(state_dict, Mapping):
            state_dict = dict(state_dict)  # hooks may edit it; the caller's stays
            for hook in list(self._load_state_dict_pre_hooks.values()):
                result = hook(self, state_dict)
                if result is not None:
                    state_dict = result
        self._load_state_dict(state_dict)
        for hook in list(self._load_state_dict_post_hooks.values()):
            hook(self)

    def _load_state_dict(self, state_dict):
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
            # Every saved group key but torch's own options (foreach, fused,
            # ...): hyperparameters, and keys schedulers add (initial_lr, ...).
            merged.update({k: v for k, v in saved.items()
                           if k not in ("params", "param_names")
                           and (k in self.defaults or k not in self._torch_only_keys)})
            try:
                self._check_group(merged)
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

        # Everything is valid: only now upload and swap in. A parameter
        # without saved state starts from step 0; one with SGD's momentum
        # buffer is past its first step.
        steps = np.zeros(len(self._position), np.uint32)
        buffers = {}
        for key, entry in new_state.items():
            entry = dict(entry)
            step = entry.pop("step", None)
            steps[self._param_index[key]] = 1 if step is None else step
            buffers[key] = entry
        uploaded = {key: _StateEntry(self, self._param_index[key], entry)
                    for key, entry in self._upload_state(buffers).items()}
        cl.enqueue_copy(self._queue, self._steps.base_data, steps,
                        dst_offset=self._steps.offset)
        self._steps_host = None
        for group, merged in zip(self.param_groups, new_groups):
            group.update(merged)
        self._state_entries.clear()
        self._state_entries.update(uploaded)
        self._state_version += 1

    def _upload_state(self, host_state):
        """Device copies of checked host state (``{id(param): {name: array}}``),
        packed into shared buffers (:mod:`netcl.optim._arena`) where entries
        have the same buffer names and dtypes and every buffer has its
        parameter's shape, as a step would have allocated them."""
        params = {id(p): p for group in self.param_groups for p in group["params"]}
        by_layout = {}
        for key, entry in host_state.items():
            shape = params[key].data.shape
            if entry and all(value.shape == shape and not name.endswith(_quantize.ABSMAX)
                             for name, value in entry.items()):
                layout = tuple((name, value.dtype) for name, value in entry.items())
                by_layout.setdefault(layout, []).append(key)
        out = {}
        for layout, keys in by_layout.items():
            if len(keys) < 2:
                continue
            views, _ = _arena.allocate(self._queue, [params[key].data.shape for key in keys],
                                       dict(layout))
            for key, entry in zip(keys, views):
                for name, view in entry.items():
                    # As bytes: the view's strides may differ from the host
                    # array's where a dimension has length 1.
                    host = np.ascontiguousarray(host_state[key][name]).reshape(-1)
                    cl.enqueue_copy(self._queue, view.base_data, host.view(np.uint8),
                                    dst_offset=view.offset)
                out[key] = entry
        for key, entry in host_state.items():
            if key not in out:
                out[key] = {name: cla.to_device(self._queue, value)
                            for name, value in entry.items()}
        return out

    def _checked_state(self, entry, group, p, where):
        """The entry as host arrays ready to upload, or None for "no state"."""
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}: state must be a dict, got {type(entry).__name__}")
        entry = {name: value for name, value in entry.items() if value is not None}
        names = self._buffer_names(group, p.data.dtype, p.data.size)
        if not set(entry) - {"step"}:
            if not names or "step" not in entry:
                return None  # no buffers (and for SGD no step): nothing to restore
        expected = set(names)
        found = set(entry) - {"step"}
        if found != expected:
            raise ValueError(f"{where}: state has buffers {sorted(found)}, "
                             f"expected {sorted(expected)}")
        checked = {}
        if self.step_in_state:
            checked["step"] = self._checked_step(entry.get("step", 0), where)
        for name in names:  # in kernel order, as a fresh state
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
            shape = self._buffer_shape(p, name)
            if value.shape != shape:
                raise ValueError(f"{where}: state {name!r} has shape {value.shape}, "
                                 f"expected {shape}")
            expected_dtype = self._buffer_dtype(p.data.dtype, name, names)
            if value.dtype != expected_dtype:
                raise TypeError(f"{where}: state {name!r} has dtype {value.dtype}, expected "
                                f"{expected_dtype} (this optimizer's state_dtype is "
                                f"{self.state_dtype!r})")
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
        if step >= 2**32 - 1:
            raise ValueError(f"{where}: step {step!r} is too large (step counts are 32-bit)")
        return int(step)

    #: torch.optim group keys netcl has no use for: never copied into a group.
    _torch_only_keys = frozenset({"foreach", "fused", "capturable", "differentiable"})

    def save(self, path, *, schedulers=None, scaler=None):
        """Write the state (and the schedulers' and scaler's) to a safetensors
        file, atomically (:func:`netcl.optim.save`)."""
        checkpoint.save(self, path, schedulers=schedulers, scaler=scaler)

    def load(self, path, *, schedulers=None, scaler=None):
        """Restore a file written by :meth:`save`, checked first (:func:`netcl.optim.load`)."""
        checkpoint.load(self, path, schedulers=schedulers, scaler=scaler)

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for key in sorted(k for k in group if k not in ("params", "param_names")):
                lines.append(f"    {key}: {group[key]}")
        lines.append(")")
        return "\n".join(lines)
