"""Dynamic loss scaling with ``torch.amp.GradScaler``'s API, on the device.

:class:`GradScaler` keeps its scale, growth tracker and found-inf flag in one
small device buffer. With :mod:`netcl.optim` optimizers nothing waits for the
device: :meth:`GradScaler.step` enqueues the optimizer's guarded step, whose
reduction pass checks the (scaled) gradients for NaN/infinity and whose
update kernels unscale them and skip the whole step on found-inf — torch's
``grad_scale``/``found_inf`` contract for fused optimizers — and
:meth:`GradScaler.update` adjusts the scale in a one-work-item kernel with
torch's ``_amp_update_scale_`` rule. :meth:`GradScaler.unscale_` unscales the
gradients in place first, for clipping or inspecting them in between (see
:func:`netcl.nn.utils.clip_grad_norm_`). Only :meth:`get_scale`,
:meth:`state_dict`, ``scale(<float>)`` and pickling read the device.

A typical iteration, as with torch::

    scaler = netcl.amp.GradScaler()
    loss, dlogits = ...                         # forward
    model.backward(scaler.scale(dlogits))       # backward of the scaled loss
    scaler.unscale_(opt)                        # optional: clip true gradients
    netcl.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(opt)                            # skipped on the device on inf/NaN
    scaler.update()
"""

import math
import numbers
from collections import abc
from enum import Enum

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from netcl import _kernels
from netcl.device import default_queue
from netcl.nn import utils as _utils
from netcl.optim import _engine, hooks as step_hooks

__all__ = ["GradScaler", "OptState"]

_U = np.uint32
# The growth tracker is a float32 on the device: exact for integers below this.
_TRACKER_LIMIT = 2**24
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class OptState(Enum):
    """Where an optimizer is in the current iteration (torch's ``OptState``)."""

    READY = 0
    UNSCALED = 1
    STEPPED = 2


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _check_scale(name, value, allow_zero=False):
    if not _is_real(value) or not math.isfinite(value) \
            or not (value >= 0 if allow_zero else value > 0) or abs(value) > _FLOAT32_MAX:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound} that float32 holds, "
                         f"got {value!r}")
    return float(value)


def _check_growth_factor(value):
    if not _is_real(value) or not math.isfinite(value) or not value > 1.0:
        raise ValueError(f"growth_factor must be a finite number > 1.0, got {value!r}")
    return float(value)


def _check_backoff_factor(value):
    if not _is_real(value) or not 0.0 < value < 1.0:
        raise ValueError(f"backoff_factor must lie in (0, 1), got {value!r}")
    return float(value)


def _check_interval(value):
    if not isinstance(value, (numbers.Integral, np.integer)) \
            or isinstance(value, (bool, np.bool_)) or not 1 <= value < _TRACKER_LIMIT:
        raise ValueError(f"growth_interval must be an integer in [1, 2**24), got {value!r} "
                         "(the growth tracker is counted in a float32 on the device)")
    return int(value)


def _check_tracker(value):
    if isinstance(value, (bool, np.bool_)) or not _is_real(value) \
            or not float(value).is_integer() or not 0 <= value < _TRACKER_LIMIT:
        raise ValueError(f"_growth_tracker must be a whole number in [0, 2**24), got {value!r}")
    return int(value)


def _order(before, after):
    """Make ``after`` wait for what is enqueued on ``before`` so far (no host wait)."""
    if before is not None and after is not None and before != after:
        cl.enqueue_barrier(after, wait_for=[cl.enqueue_marker(before)])


class GradScaler:
    """``torch.amp.GradScaler`` for netcl: same constructor defaults, methods,
    state_dict keys and scale arithmetic.

    ``queue`` takes the place of torch's ``device``: a ``pyopencl``
    CommandQueue, a Context (a new queue on it) or ``None`` (netcl's default
    queue). The scale state lives there; optimizers whose queue differs are
    ordered against it with markers and barriers (no host wait).

    ``init_scale`` (finite, > 0), ``growth_factor`` (> 1),
    ``backoff_factor`` (in (0, 1)) and ``growth_interval`` (an integer in
    [1, 2**24): the tracker is a float32 on the device) are checked, naming
    the value. ``enabled=False`` makes :meth:`scale`, :meth:`unscale_` and
    :meth:`update` no-ops and :meth:`step` a plain ``optimizer.step()``.

    Unlike torch, the scale exists from construction (torch creates it at
    the first :meth:`scale` call and asserts before that).
    """

    def __init__(self, queue=None, init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000, enabled=True):
        if not isinstance(enabled, (bool, np.bool_)):
            raise TypeError(f"enabled must be a bool, got {enabled!r}")
        self._enabled = bool(enabled)
        if queue is not None and not isinstance(queue, (cl.CommandQueue, cl.Context)):
            raise TypeError("queue must be a pyopencl CommandQueue, a Context or None (netcl's "
                            f"default queue) in place of torch's device, got {queue!r}")
        self._queue_arg = queue
        self._queue = None
        self._state = None
        if not self._enabled:
            return
        self._init_scale = _check_scale("init_scale", init_scale)
        self._growth_factor = _check_growth_factor(growth_factor)
        self._backoff_factor = _check_backoff_factor(backoff_factor)
        self._growth_interval = _check_interval(growth_interval)
        self._init_growth_tracker = 0
        self._per_optimizer_states = {}
        self._create_state(self._init_scale, 0)

    def _create_state(self, scale, tracker):
        queue = self._queue_arg
        if queue is None:
            queue = default_queue()
        elif isinstance(queue, cl.Context):
            queue = cl.CommandQueue(queue)
        self._queue = queue
        host = np.zeros(3, np.float32)
        host[_engine.SCALE] = scale
        host[_engine.GROWTH_TRACKER] = tracker
        self._state = cla.to_device(queue, host)

    # -------------------------------------------------- the engine's contract
    def _device_state(self):
        """The float32 device Array ``[scale, growth_tracker, found_inf]`` (indices
        ``SCALE``, ``GROWTH_TRACKER``, ``SCALER_FOUND_INF`` of
        :mod:`netcl.optim._engine`), at offset 0 of its own buffer."""
        return self._state

    def _step_key(self, optimizer):
        """``(True, unscaled)``: the step is scaler-driven, and whether
        :meth:`unscale_` already unscaled this optimizer's gradients."""
        stage = self._stage(optimizer)
        return True, stage is OptState.UNSCALED

    def _stage(self, optimizer):
        entry = self._per_optimizer_states.get(id(optimizer))
        return OptState.READY if entry is None else entry[0]

    def _set_stage(self, optimizer, stage, recorded):
        entry = self._per_optimizer_states.get(id(optimizer))
        recorded = recorded or (entry is not None and entry[1])
        # The optimizer is kept so that its id is not reused before update().
        self._per_optimizer_states[id(optimizer)] = (stage, recorded, optimizer)

    @staticmethod
    def _check_optimizer(optimizer):
        for name in ("_run_step", "_control", "_queue", "param_groups"):
            if not hasattr(optimizer, name):
                raise TypeError("GradScaler drives netcl.optim optimizers (whose steps unscale "
                                "and skip on the device); got "
                                f"{type(optimizer).__name__}")

    def _check_context(self, context, what):
        if context != self._queue.context:
            raise ValueError(f"{what} lives in another OpenCL context than the GradScaler's "
                             "queue; create the GradScaler with that queue")

    # -------------------------------------------------------------- scaling
    def scale(self, outputs):
        """Multiply ``outputs`` by the scale.

        A float32/float64 pyopencl Array gives a new Array of the same shape
        and dtype, ``x * scale`` computed on the device (no sync); a Python
        number gives a float, which reads the scale (a sync); lists and
        tuples are scaled element by element into the same type, other
        iterables into a lazy ``map``, as torch does. Disabled: ``outputs``
        unchanged.
        """
        if not self._enabled:
            return outputs
        if isinstance(outputs, cla.Array):
            return self._scale_array(outputs)
        if _is_real(outputs):
            return float(outputs) * self.get_scale()
        if isinstance(outputs, abc.Iterable) and not isinstance(outputs, (str, bytes)):
            iterable = map(self.scale, outputs)
            if isinstance(outputs, (list, tuple)):
                return type(outputs)(iterable)
            return iterable
        raise ValueError("outputs must be a pyopencl Array, a number or an iterable of them, "
                         f"got {type(outputs).__name__}")

    def _scale_array(self, x):
        if x.dtype not in (np.float32, np.float64):
            raise TypeError(f"GradScaler.scale supports float32 and float64 Arrays, "
                            f"got {x.dtype}")
        if not x.flags.c_contiguous:
            raise ValueError("GradScaler.scale needs a C-contiguous Array")
        self._check_context(x.context, "the Array to scale")
        if x.dtype == np.float64 and not _kernels.supports_fp64(x.context.devices[0]):
            raise TypeError("float64 needs a device with cl_khr_fp64")
        queue = x.queue if x.queue is not None else self._queue
        out = cla.empty(queue, x.shape, x.dtype)
        if x.size == 0:
            return out
        _order(self._queue, queue)
        kernel = _kernels.get_kernel(queue.context, _utils._TEMPLATE, "scale_outputs",
                                     [None, _U, None, _U, None], kernel="scale_outputs",
                                     T=_kernels.c_type(x.dtype))
        kernel.set_args(x.base_data, _U(_engine.element_offset(x)), out.base_data,
                        _U(x.size), self._state.base_data)
        cl.enqueue_nd_range_kernel(queue, kernel, (x.size,), None)
        # The scale must not change (update()) before this kernel has read it.
        _order(queue, self._queue)
        return out

    # ------------------------------------------------------------- unscale_
    def unscale_(self, optimizer):
        """Divide the optimizer's gradients by the scale in place.

        Every gradient ``g`` becomes ``g * inv_scale`` with ``inv_scale =
        (float)(1 / (double)scale)``, as torch's
        ``_amp_foreach_non_finite_check_and_unscale_``; whether any of them
        held a NaN or an infinity goes into the optimizer's control buffer
        (which its next :meth:`step` reads to skip) and into the scaler's
        found-inf flag (which :meth:`update` reads). Enqueued on the
        optimizer's queue: a few launches, no sync. Raises torch's
        RuntimeError when called twice for an optimizer before
        :meth:`update`, or after :meth:`step`.
        """
        if not self._enabled:
            return
        self._check_optimizer(optimizer)
        stage = self._stage(optimizer)
        if stage is OptState.UNSCALED:
            raise RuntimeError(
                "unscale_() has already been called on this optimizer since the last update().")
        if stage is OptState.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        grads, context = [], None
        check = _utils.check_grad
        for group in optimizer.param_groups:
            for p in group["params"]:
                grad = p.grad
                if grad is not None:
                    context = check(grad, lambda: optimizer._describe_param(p), context)
                    grads.append(grad)
        queue = optimizer._queue
        control = optimizer._control
        self._check_context(control.context, "the optimizer")
        if grads:
            self._check_context(context, "the optimizer's gradients")
            self._enqueue_unscale(queue, grads, control)
        self._set_stage(optimizer, OptState.UNSCALED, recorded=bool(grads))

    def _enqueue_unscale(self, queue, grads, control):
        device = queue.device
        acc = _utils.acc_dtype(device)
        parts = _utils.batches(queue, grads)
        n_rows = sum(b.n_rows for b in parts)
        partials = cl.Buffer(queue.context, cl.mem_flags.READ_WRITE,
                             max(1, n_rows) * acc.itemsize)
        _order(self._queue, queue)
        row_base = 0
        for batch in parts:
            row_base = _utils.enqueue_pass(queue, "unscale", batch, (self._state.base_data,),
                                           partials=partials, row_base=row_base)
        _utils.one_item(queue, "unscale_done", [None, _U, None, _U, None],
                        [partials, _U(n_rows), control.base_data,
                         _U(_engine.element_offset(control)), self._state.base_data],
                        acc_t=_kernels.c_type(acc))
        _order(queue, self._queue)

    # ----------------------------------------------------------------- step
    def step(self, optimizer, *args, **kwargs):
        """Step ``optimizer`` unless its gradients hold a NaN or an infinity.

        Disabled: ``optimizer.step(*args, **kwargs)``. Enabled: the
        optimizer's guarded step is enqueued with this scaler — the
        non-finite check, the unscale (unless :meth:`unscale_` did it) and
        the skip all happen on the device, so this returns without waiting
        (and returns None). As torch, a closure raises RuntimeError, and so
        does a second step() before :meth:`update`; an optimizer none of
        whose parameters has a gradient raises torch's AssertionError.
        """
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs or any(callable(a) for a in args):
            raise RuntimeError("Closure use is not currently supported if GradScaler is enabled.")
        if args or kwargs:
            raise TypeError("GradScaler.step takes no arguments besides the optimizer, got "
                            f"{len(args)} positional and {sorted(kwargs)} keyword argument(s)")
        self._check_optimizer(optimizer)
        stage = self._stage(optimizer)
        if stage is OptState.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")
        entry = self._per_optimizer_states.get(id(optimizer))
        recorded = entry is not None and entry[1]
        if stage is OptState.READY:
            recorded = any(p.grad is not None
                           for group in optimizer.param_groups for p in group["params"])
        if not recorded:
            raise AssertionError("No inf checks were recorded for this optimizer.")
        self._check_context(optimizer._control.context, "the optimizer")
        _order(self._queue, optimizer._queue)
        # As torch's scaler calls optimizer.step, the optimizer's step hooks run.
        step_hooks.run_step(optimizer, lambda: optimizer._run_step(self), (), {})
        _order(optimizer._queue, self._queue)
        self._set_stage(optimizer, OptState.STEPPED, recorded=True)
        return None

    # --------------------------------------------------------------- update
    def update(self, new_scale=None):
        """Update the scale on the device, as torch.

        After a found-inf in any optimizer since the last update the scale is
        multiplied by ``backoff_factor`` and the tracker reset; otherwise the
        tracker counts one more clean iteration, and on reaching
        ``growth_interval`` the scale is multiplied by ``growth_factor``
        (unless that overflows float32) and the tracker reset. The products
        are taken in float64 where the device has it and rounded to float32,
        as torch's ``_amp_update_scale_``. ``new_scale`` (a positive number,
        or a one-element float Array read on the device) sets the scale
        instead, leaving the tracker. Either way the found-inf flag and
        every optimizer's unscale_/step record are cleared. No sync.
        """
        if not self._enabled:
            return
        queue = self._queue
        if new_scale is not None:
            if isinstance(new_scale, cla.Array):
                if new_scale.size != 1 or new_scale.dtype not in (np.float32, np.float64):
                    raise ValueError("new_scale should be a number or a 1-element float32/float64 "
                                     f"Array, got shape {new_scale.shape} and dtype "
                                     f"{new_scale.dtype}")
                self._check_context(new_scale.context, "new_scale")
                src = _kernels.c_type(new_scale.dtype)
                if src == "double" and not _kernels.supports_fp64(queue.device):
                    raise TypeError("float64 needs a device with cl_khr_fp64")
                _order(new_scale.queue, queue)
                _utils.one_item(queue, "scaler_set", [None, None, _U, np.float32, _U, _U],
                                [self._state.base_data, new_scale.base_data,
                                 _U(_engine.element_offset(new_scale)), np.float32(0), _U(0),
                                 _U(1)], src=src)
                _order(queue, new_scale.queue)
            else:
                value = _check_scale("new_scale", new_scale)
                _utils.one_item(queue, "scaler_set", [None, np.float32, np.float32, _U, _U],
                                [self._state.base_data, np.float32(value), np.float32(0), _U(0),
                                 _U(1)], src="value")
        else:
            if not any(entry[1] for entry in self._per_optimizer_states.values()):
                raise AssertionError("No inf checks were recorded prior to update.")
            acc = _utils.acc_dtype(queue.device)
            _utils.one_item(queue, "scaler_update", [None, acc, acc, _U],
                            [self._state.base_data, acc.type(self._growth_factor),
                             acc.type(self._backoff_factor), _U(self._growth_interval)],
                            acc_t=_kernels.c_type(acc))
        self._per_optimizer_states = {}

    # ------------------------------------------------------------ accessors
    def _read_state(self):
        return self._state.get(queue=self._queue)

    def get_scale(self):
        """The current scale as a Python float (reads the device: a sync); 1.0
        when disabled."""
        if not self._enabled:
            return 1.0
        return float(self._read_state()[_engine.SCALE])

    def _get_growth_tracker(self):
        if not self._enabled:
            return 0
        return int(self._read_state()[_engine.GROWTH_TRACKER])

    def get_growth_factor(self):
        """The scale growth factor."""
        return self._growth_factor

    def set_growth_factor(self, new_factor):
        """Set the scale growth factor (a finite number > 1)."""
        self._growth_factor = _check_growth_factor(new_factor)

    def get_backoff_factor(self):
        """The scale backoff factor."""
        return self._backoff_factor

    def set_backoff_factor(self, new_factor):
        """Set the scale backoff factor (in (0, 1))."""
        self._backoff_factor = _check_backoff_factor(new_factor)

    def get_growth_interval(self):
        """The growth interval."""
        return self._growth_interval

    def set_growth_interval(self, new_interval):
        """Set the growth interval (an integer in [1, 2**24)). As in torch, a
        tracker already past a smaller new interval never equals it again, so
        the scale then grows only after the next backoff."""
        self._growth_interval = _check_interval(new_interval)

    def is_enabled(self):
        """Whether this scaler scales."""
        return self._enabled

    @property
    def queue(self):
        """The queue the scale state lives on (None when disabled)."""
        return self._queue

    # ----------------------------------------------------------- state_dict
    def state_dict(self):
        """torch's keys: ``scale`` (float), ``growth_factor``, ``backoff_factor``,
        ``growth_interval`` and ``_growth_tracker`` (int); reads the device (a
        sync). Loads into torch's GradScaler and back. Disabled: ``{}``."""
        if not self._enabled:
            return {}
        state = self._read_state()
        return {
            "scale": float(state[_engine.SCALE]),
            "growth_factor": self._growth_factor,
            "backoff_factor": self._backoff_factor,
            "growth_interval": self._growth_interval,
            "_growth_tracker": int(state[_engine.GROWTH_TRACKER]),
        }

    def load_state_dict(self, state_dict):
        """Load a state from :meth:`state_dict` or torch's ``GradScaler.state_dict()``.

        Every value is checked before anything changes; the scale and the
        tracker are written on the device (the found-inf flag of an
        iteration in progress is kept, as torch keeps it). Disabled: no-op.
        """
        if not self._enabled:
            return
        scale, growth_factor, backoff_factor, growth_interval, tracker = \
            self._checked_state(state_dict)
        self._init_scale = scale
        self._growth_factor = growth_factor
        self._backoff_factor = backoff_factor
        self._growth_interval = growth_interval
        self._init_growth_tracker = tracker
        _utils.one_item(self._queue, "scaler_set", [None, np.float32, np.float32, _U, _U],
                        [self._state.base_data, np.float32(scale), np.float32(tracker), _U(1),
                         _U(0)], src="value")

    @staticmethod
    def _checked_state(state_dict):
        """``(scale, growth_factor, backoff_factor, growth_interval, tracker)`` from
        a state dict, each checked (an error names the value); changes nothing."""
        if not isinstance(state_dict, abc.Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        if len(state_dict) == 0:
            raise RuntimeError("The source state dict is empty, possibly because it was saved "
                               "from a disabled instance of GradScaler.")
        keys = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")
        missing = [k for k in keys if k not in state_dict]
        if missing:
            raise KeyError(f"GradScaler state_dict lacks {missing}")
        return (_check_scale("scale", _plain(state_dict["scale"]), allow_zero=True),
                _check_growth_factor(_plain(state_dict["growth_factor"])),
                _check_backoff_factor(_plain(state_dict["backoff_factor"])),
                _check_interval(_plain(state_dict["growth_interval"])),
                _check_tracker(_plain(state_dict["_growth_tracker"])))

    def __getstate__(self):
        if self._enabled and self._per_optimizer_states:
            raise AssertionError("A GradScaler instance may only be pickled at the beginning "
                                 "of an iteration, or at the end after scaler.update().")
        state = {"enabled": self._enabled}
        if self._enabled:
            state.update(self.state_dict())
        return state

    def __setstate__(self, state):
        """Unpickled on netcl's default queue."""
        self._enabled = state["enabled"]
        self._queue_arg = None
        self._queue = None
        self._state = None
        if self._enabled:
            self._growth_factor = state["growth_factor"]
            self._backoff_factor = state["backoff_factor"]
            self._growth_interval = state["growth_interval"]
            self._init_scale = state["scale"]
            self._init_growth_tracker = state["_growth_tracker"]
            self._per_optimizer_states = {}
            self._create_state(self._init_scale, self._init_growth_tracker)

    def __repr__(self):
        if not self._enabled:
            return "GradScaler(enabled=False)"
        return (f"GradScaler(growth_factor={self._growth_factor}, "
                f"backoff_factor={self._backoff_factor}, "
                f"growth_interval={self._growth_interval})")


def _plain(value):
    """A 0-d array or tensor (as torch state dicts may hold) as a Python scalar."""
    if hasattr(value, "item") and not isinstance(value, (int, float)):
        try:
            return value.item()
        except (TypeError, ValueError):
            return value
    return value
