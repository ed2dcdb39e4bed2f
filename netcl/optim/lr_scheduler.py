r"""Learning-rate schedulers with ``torch.optim.lr_scheduler``'s names,
signatures, defaults, arithmetic and state dicts, for netcl optimizers.

torch's schedulers refuse anything that is not a ``torch.optim.Optimizer``;
these drive :class:`netcl.optim.Optimizer` (and any object that looks like
one, see below). Every scheduler writes ``group['lr']`` (and, when cycling
momentum, ``group['momentum']`` or ``group['betas'][0]``) as a Python float.
netcl passes those values to its update kernels as arguments re-set at every
step, so changing them never builds or re-binds a kernel.

What a scheduler accepts
------------------------
Any object with ``param_groups``, a list of dicts each holding ``'lr'``; a
netcl optimizer is one, and so is a ``torch.optim.Optimizer`` whose learning
rates are Python floats. Cycling momentum (:class:`CyclicLR`,
:class:`OneCycleLR`) also reads ``optimizer.defaults``, as torch does: a
``'betas'`` entry (netcl's ``Adam``/``AdamW``) cycles ``betas[0]``, else a
``'momentum'`` entry (``SGD``, ``RMSProp``) cycles ``momentum``. Anything
else raises ``TypeError`` naming its type.

Arithmetic
----------
Each value is computed with the same float64 operations in the same order as
torch 2.13, so the sequences are equal bit for bit. Most schedulers are
*chainable*: each step multiplies the current ``group['lr']`` by a factor, so
several schedulers on one optimizer compose (:class:`ChainedScheduler`), and
an lr set by hand between steps carries on. Passing ``epoch`` to ``step()``
(deprecated, as in torch, with its warning) switches to the *closed form*
``f(base_lr, epoch)`` where the scheduler has one.

Warnings, as torch
------------------
``UserWarning`` when ``scheduler.step()`` comes before the optimizer's first
step, when the optimizer's ``step`` was replaced after the scheduler wrapped
it, when ``step`` is given the deprecated ``epoch``, and when ``get_lr()`` is
called outside ``step()``. Each message starts with torch's words, so a
``warnings.filterwarnings(message=...)`` written for torch matches. A step
through :class:`netcl.amp.GradScaler` counts as an optimizer step even when
the device skips it (torch's scaler skips on the host and then warns).

State dicts
-----------
``state_dict()`` holds the scheduler's attributes under torch's names (never
the optimizer; lambdas only through the ``__dict__`` of callable objects, as
torch), so a torch scheduler's ``state_dict()`` loads here and the other way
round. ``load_state_dict`` checks the keys and nested schedulers first and
raises naming what is missing or unknown before anything changes.
"""

import math
import types
import warnings
from bisect import bisect_right
from collections import Counter
from collections.abc import Mapping
from functools import wraps
from weakref import ref

__all__ = [
    "LRScheduler", "LambdaLR", "MultiplicativeLR", "StepLR", "MultiStepLR", "ConstantLR",
    "LinearLR", "ExponentialLR", "SequentialLR", "PolynomialLR", "CosineAnnealingLR",
    "ChainedScheduler", "ReduceLROnPlateau", "CyclicLR", "CosineAnnealingWarmRestarts",
    "OneCycleLR",
]

EPOCH_DEPRECATION_WARNING = (
    "The epoch parameter in `scheduler.step()` was not necessary and is being "
    "deprecated where possible. Call `scheduler.step()` without it; while it is "
    "given, schedulers that have a closed form compute the learning rate from it "
    "instead of chaining from the current one.")

_ORDER_WARNING = (
    "Detected call of `lr_scheduler.step()` before `optimizer.step()`. Step the "
    "optimizer first: otherwise the first value of the schedule is never used.")

_OVERRIDE_WARNING = (
    "Seems like `optimizer.step()` has been overridden after learning rate scheduler "
    "initialization. The scheduler can then no longer tell whether the optimizer has "
    "stepped; call `optimizer.step()` before `lr_scheduler.step()`.")

_GET_LR_WARNING = (
    "To get the last learning rate computed by the scheduler, please use "
    "`get_last_lr()`. get_lr() computes the next one and is meant for step().")

# Attributes torch keeps in its state dicts that are transient here (flags
# that are only set inside a step): accepted when loading, never required.
_TRANSIENT = frozenset({"_is_initial", "_get_lr_called_within_step"})


def _check_optimizer(optimizer):
    groups = getattr(optimizer, "param_groups", None)
    if not isinstance(groups, list) or not groups \
            or not all(isinstance(g, Mapping) and "lr" in g for g in groups):
        raise TypeError(f"{type(optimizer).__name__} is not an Optimizer (a scheduler needs "
                        "param_groups: a non-empty list of dicts with 'lr')")


def _per_group(name, optimizer, value):
    """``value`` for each group: a list/tuple of one per group, or one for all."""
    if isinstance(value, (list, tuple)):
        if len(value) != len(optimizer.param_groups):
            raise ValueError(f"{name} must have the same length as optimizer.param_groups. "
                             f"{name} has {len(value)} values, param_groups has "
                             f"{len(optimizer.param_groups)}.")
        return list(value)
    return [value] * len(optimizer.param_groups)


def _lrs(optimizer):
    return [group["lr"] for group in optimizer.param_groups]


def _momentum_key(optimizer):
    """'betas' or 'momentum': which hyperparameter momentum cycling drives."""
    defaults = getattr(optimizer, "defaults", {})
    if "momentum" not in defaults and "betas" not in defaults:
        raise ValueError("optimizer must support momentum or beta1 with `cycle_momentum` "
                         "option enabled")
    return "betas" in defaults


def _set_momentum(group, use_beta1, value):
    if use_beta1:
        group["betas"] = (value, *group["betas"][1:])
    else:
        group["momentum"] = value


def _mark_optimizer_steps(optimizer):
    """Make the optimizer record that it stepped (``optimizer._opt_called``).

    ``step`` is wrapped on the instance, as torch does, so that replacing it
    later is noticed; a netcl optimizer's ``_run_step`` (which a GradScaler
    calls instead of ``step``) is wrapped too. Objects whose ``step`` is not
    a bound method are left alone and get no ordering warnings.
    """
    optimizer_ref = ref(optimizer)
    for name in ("step", "_run_step"):
        method = getattr(optimizer, name, None)
        function = getattr(method, "__func__", None)
        if function is None or hasattr(method, "_wrapped_by_lr_sched"):
            continue

        def wrapper(*args, _function=function, **kwargs):
            owner = optimizer_ref()
            owner._opt_called = True
            return _function(owner, *args, **kwargs)

        wrapper = wraps(function)(wrapper)
        wrapper._wrapped_by_lr_sched = True
        setattr(optimizer, name, wrapper)


class _Flag:
    """Set an attribute to True for the duration of a ``with`` block."""

    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def __enter__(self):
        setattr(self.owner, self.name, True)

    def __exit__(self, *exc):
        setattr(self.owner, self.name, False)


def _lambda_state(functions):
    # Plain functions and lambdas are not saved (as torch); callable objects
    # save their attributes.
    return [None if isinstance(fn, types.FunctionType) else dict(fn.__dict__)
            for fn in functions]


class LRScheduler:
    r"""Base class: holds the optimizer, ``base_lrs`` and ``last_epoch``.

    With ``last_epoch=-1`` (a fresh run) each group gets ``'initial_lr'``
    (its current lr, unless already set) and ``base_lrs`` are those; a
    non-default ``last_epoch`` resumes and needs ``'initial_lr'`` in every
    group (``KeyError`` otherwise). Construction performs the initial step,
    which sets ``last_epoch`` to 0 and the learning rates to the schedule's
    first value.

    Subclasses implement :meth:`get_lr` (the chainable rule) and optionally
    ``_get_closed_form_lr``.
    """

    _get_lr_called_within_step = False
    _is_initial = False

    def __init__(self, optimizer, last_epoch=-1):
        _check_optimizer(optimizer)
        self.optimizer = optimizer
        if last_epoch == -1:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
        else:
            for i, group in enumerate(optimizer.param_groups):
                if "initial_lr" not in group:
                    raise KeyError(
                        f"param 'initial_lr' is not specified in param_groups[{i}] when "
                        "resuming scheduler with last_epoch >= 0: load the optimizer's state "
                        "(which holds it) first, or start with last_epoch=-1")
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = last_epoch
        _mark_optimizer_steps(optimizer)
        self._initial_step()

    def _initial_step(self):
        self._step_count = 0
        with _Flag(self, "_is_initial"):
            self.step()

    # ------------------------------------------------------------ stepping
    def get_lr(self):
        """The learning rates of the step in progress (called by :meth:`step`);
        use :meth:`get_last_lr` to read the current ones."""
        raise NotImplementedError

    def get_last_lr(self):
        """The learning rates this scheduler set last, one per group."""
        return self._last_lr

    def _warn_outside_step(self):
        if not self._get_lr_called_within_step:
            warnings.warn(_GET_LR_WARNING, UserWarning, stacklevel=3)

    def _warn_order(self):
        # Only where the optimizer's class has a step method to wrap (see
        # _mark_optimizer_steps), and only at the first step after construction.
        if self._step_count != 1 or not callable(getattr(type(self.optimizer), "step", None)):
            return
        if not hasattr(self.optimizer.step, "_wrapped_by_lr_sched"):
            warnings.warn(_OVERRIDE_WARNING, UserWarning, stacklevel=3)
        elif not getattr(self.optimizer, "_opt_called", False):
            warnings.warn(_ORDER_WARNING, UserWarning, stacklevel=3)

    def step(self, epoch=None):
        """Advance the schedule by one step (after the optimizer's step).

        ``epoch`` is deprecated (a warning): it sets ``last_epoch`` and uses
        the closed form where the scheduler has one.
        """
        self._warn_order()
        self._step_count += 1
        if epoch is not None:
            warnings.warn(EPOCH_DEPRECATION_WARNING, UserWarning, stacklevel=2)
        self._update_lr(epoch)

    def _update_lr(self, epoch=None):
        with _Flag(self, "_get_lr_called_within_step"):
            if epoch is None:
                self.last_epoch += 1
                values = self.get_lr()
            else:
                self.last_epoch = epoch
                closed_form = getattr(self, "_get_closed_form_lr", None)
                values = closed_form() if closed_form is not None else self.get_lr()
        values = list(values)
        if len(values) != len(self.optimizer.param_groups):
            raise ValueError(f"{type(self).__name__} computed {len(values)} learning rates "
                             f"for {len(self.optimizer.param_groups)} parameter groups")
        for group, lr in zip(self.optimizer.param_groups, values):
            group["lr"] = lr
        self._last_lr = _lrs(self.optimizer)

    # ---------------------------------------------------------- state dicts
    #: Attributes not saved as they are: the optimizer, and those that
    #: _saved_specially() saves in another form.
    _not_saved = ("optimizer",)

    def _saved_specially(self):
        """State-dict entries for attributes that cannot be saved as they are."""
        return {}

    def _check_special(self, state_dict):
        """Raise unless the entries of _saved_specially() in ``state_dict`` fit."""

    def _load_special(self, state_dict):
        """Restore the entries of _saved_specially() (already checked)."""

    def state_dict(self):
        """The scheduler's state under torch's attribute names (no optimizer)."""
        state = {key: value for key, value in self.__dict__.items()
                 if key not in self._not_saved}
        state.update(self._saved_specially())
        return state

    def _check_state_dict(self, state_dict):
        """Raise naming the problem unless ``state_dict`` fits this scheduler."""
        name = type(self).__name__
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"{name} state_dict must be a dict, got "
                            f"{type(state_dict).__name__}")
        expected = set(self.state_dict())
        missing = sorted(expected - set(state_dict) - _TRANSIENT)
        unknown = sorted(set(state_dict) - expected - _TRANSIENT)
        if missing:
            raise KeyError(f"{name} state_dict lacks {missing}")
        if unknown:
            raise ValueError(f"{name} state_dict has unknown keys {unknown}")
        self._check_special(state_dict)

    def load_state_dict(self, state_dict):
        """Restore a state from :meth:`state_dict` (or torch's scheduler of the
        same class), checked first."""
        self._check_state_dict(state_dict)
        special = self._saved_specially()
        self.__dict__.update({k: v for k, v in state_dict.items() if k not in special})
        self._load_special(state_dict)

    def __repr__(self):
        return f"{type(self).__name__}(last_epoch={getattr(self, 'last_epoch', None)}, " \
               f"last_lr={getattr(self, '_last_lr', None)})"


class _LambdaScheduler(LRScheduler):
    """A scheduler with one function of the epoch per group."""

    _not_saved = ("optimizer", "lr_lambdas")

    def __init__(self, optimizer, lr_lambda, last_epoch):
        _check_optimizer(optimizer)
        self.optimizer = optimizer
        if isinstance(lr_lambda, (list, tuple)):
            if len(lr_lambda) != len(optimizer.param_groups):
                raise ValueError(f"Expected {len(optimizer.param_groups)} lr_lambdas, "
                                 f"but got {len(lr_lambda)}")
            self.lr_lambdas = list(lr_lambda)
        else:
            self.lr_lambdas = [lr_lambda] * len(optimizer.param_groups)
        for fn in self.lr_lambdas:
            if not callable(fn):
                raise TypeError(f"lr_lambda should be a function, but got {type(fn).__name__}")
        super().__init__(optimizer, last_epoch)

    def _saved_specially(self):
        # ``lr_lambdas``: None for a function (not saved), a copy of a callable
        # object's ``__dict__``.
        return {"lr_lambdas": _lambda_state(self.lr_lambdas)}

    def _check_special(self, state_dict):
        saved = state_dict["lr_lambdas"]
        if not isinstance(saved, (list, tuple)) or len(saved) != len(self.lr_lambdas):
            raise ValueError(f"{type(self).__name__} state_dict['lr_lambdas'] must hold one "
                             f"entry per group ({len(self.lr_lambdas)})")

    def _load_special(self, state_dict):
        for fn, attributes in zip(self.lr_lambdas, state_dict["lr_lambdas"]):
            if attributes is not None:
                fn.__dict__.update(attributes)


class LambdaLR(_LambdaScheduler):
    r""":math:`\eta_t = \eta_0\,\lambda(t)`: the initial lr times a function
    of the epoch (one function, or a list of one per group)."""

    def __init__(self, optimizer, lr_lambda, last_epoch=-1):
        super().__init__(optimizer, lr_lambda, last_epoch)

    def get_lr(self):
        self._warn_outside_step()
        return [base_lr * fn(self.last_epoch)
                for fn, base_lr in zip(self.lr_lambdas, self.base_lrs)]


class MultiplicativeLR(_LambdaScheduler):
    r""":math:`\eta_t = \eta_{t-1}\,\lambda(t)` for :math:`t \ge 1`: each step
    multiplies the current lr by a function of the epoch."""

    def __init__(self, optimizer, lr_lambda, last_epoch=-1):
        super().__init__(optimizer, lr_lambda, last_epoch)

    def get_lr(self):
        self._warn_outside_step()
        if self._is_initial:
            return _lrs(self.optimizer)
        return [group["lr"] * fn(self.last_epoch)
                for fn, group in zip(self.lr_lambdas, self.optimizer.param_groups)]


class StepLR(LRScheduler):
    r"""Multiply the lr by ``gamma`` every ``step_size`` epochs:
    :math:`\eta_t = \eta_0\,\gamma^{\lfloor t / s \rfloor}` (closed form)."""

    def __init__(self, optimizer, step_size, gamma=0.1, last_epoch=-1):
        self.step_size = step_size
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        self._warn_outside_step()
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return _lrs(self.optimizer)
        return [group["lr"] * self.gamma for group in self.optimizer.param_groups]

    def _get_closed_form_lr(self):
        return [base_lr * self.gamma ** (self.last_epoch // self.step_size)
                for base_lr in self.base_lrs]


class MultiStepLR(LRScheduler):
    r"""Multiply the lr by ``gamma`` at each milestone (a milestone listed
    :math:`k` times multiplies by :math:`\gamma^k`):
    :math:`\eta_t = \eta_0\,\gamma^{\#\{m \le t\}}`. ``milestones`` is kept as a
    ``collections.Counter``, as torch keeps it."""

    def __init__(self, optimizer, milestones, gamma=0.1, last_epoch=-1):
        self.milestones = Counter(milestones)
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        self._warn_outside_step()
        if self.last_epoch not in self.milestones:
            return _lrs(self.optimizer)
        factor = self.gamma ** self.milestones[self.last_epoch]
        return [group["lr"] * factor for group in self.optimizer.param_groups]

    def _get_closed_form_lr(self):
        passed = bisect_right(sorted(self.milestones.elements()), self.last_epoch)
        return [base_lr * self.gamma ** passed for base_lr in self.base_lrs]


class ConstantLR(LRScheduler):
    r""":math:`\eta_t = \eta_0 \cdot` ``factor`` for :math:`t <` ``total_iters``,
    then :math:`\eta_0` (``factor`` in [0, 1])."""

    def __init__(self, optimizer, factor=1.0 / 3, total_iters=5, last_epoch=-1):
        if factor > 1.0 or factor < 0:
            raise ValueError("Constant multiplicative factor expected to be between 0 and 1.")
        self.factor = factor
        self.total_iters = total_iters
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        self._warn_outside_step()
        if self.last_epoch == 0:
            return [group["lr"] * self.factor for group in self.optimizer.param_groups]
        if self.last_epoch != self.total_iters:
            return _lrs(self.optimizer)
        return [group["lr"] * (1.0 / self.factor) for group in self.optimizer.param_groups]

    def _get_closed_form_lr(self):
        return [base_lr * (self.factor + (self.last_epoch >= self.total_iters) * (1 - self.factor))
                for base_lr in self.base_lrs]


class LinearLR(LRScheduler):
    r"""The factor moves linearly from ``start_factor`` (in (0, 1]) to
    ``end_factor`` (in [0, 1]) over ``total_iters`` epochs, then stays:
    :math:`\eta_t = \eta_0\,(s + (e - s)\min(t, T)/T)` (closed form). The
    chainable form multiplies by the ratio of consecutive factors."""

    def __init__(self, optimizer, start_factor=1.0 / 3, end_factor=1.0, total_iters=5,
                 last_epoch=-1):
        if start_factor > 1.0 or start_factor <= 0:
            raise ValueError("Starting multiplicative factor expected to be greater than 0 "
                             "and less or equal to 1.")
        if end_factor > 1.0 or end_factor < 0:
            raise ValueError("Ending multiplicative factor expected to be between 0 and 1.")
        self.start_factor = start_factor
        self.end_factor = end_factor
        self.total_iters = total_iters
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        self._warn_outside_step()
        start, end, total = self.start_factor, self.end_factor, self.total_iters
        if self.last_epoch == 0:
            return [group["lr"] * start for group in self.optimizer.param_groups]
        if self._is_initial or self.last_epoch > total:
            return _lrs(self.optimizer)
        # factor(t) / factor(t-1), with factor(t) = s + (e - s) t / T, written
        # as 1 + (e - s) / (T s + (t - 1)(e - s)).
        ratio = 1.0 + (end - start) / (total * start + (self.last_epoch - 1) * (end - start))
        return [group["lr"] * ratio for group in self.optimizer.param_groups]

    def _get_closed_form_lr(self):
        start, end, total = self.start_factor, self.end_factor, self.total_iters
        return [base_lr * (start + (end - start) * min(total, self.last_epoch) / total)
                for base_lr in self.base_lrs]


class ExponentialLR(LRScheduler):
    r""":math:`\eta_t = \eta_0\,\gamma^t`: multiply by ``gamma`` every epoch."""

    def __init__(self, optimizer, gamma, last_epoch=-1):
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        self._warn_outside_step()
        if self._is_initial:
            return _lrs(self.optimizer)
        return [group["lr"] * self.gamma for group in self.optimizer.param_groups]

    def _get_closed_form_lr(self):
        return [base_lr * self.gamma ** self.last_epoch for base_lr in self.base_lrs]


class PolynomialLR(LRScheduler):
    r""":math:`\eta_t = \eta_0\,(1 - \min(t, T)/T)^p`: polynomial decay to 0
    over ``total_iters`` epochs. The chainable form multiplies by
    :math:`\left(\frac{1 - t/T}{1 - (t-1)/T}\right)^p`."""

    def __init__(self, optimizer, total_iters=5, power=1.0, last_epoch=-1):
        self.total_iters = total_iters
        self.power = power
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        self._warn_outside_step()
        if self._is_initial or self.last_epoch > self.total_iters:
            return _lrs(self.optimizer)
        total, t = self.total_iters, self.last_epoch
        factor = ((1.0 - t / total) / (1.0 - (t - 1) / total)) ** self.power
        return [group["lr"] * factor for group in self.optimizer.param_groups]

    def _get_closed_form_lr(self):
        return [base_lr * (1.0 - min(self.total_iters, self.last_epoch) / self.total_iters)
                ** self.power for base_lr in self.base_lrs]


class CosineAnnealingLR(LRScheduler):
    r"""Cosine annealing (SGDR without restarts):
    :math:`\eta_t = \eta_{min} + (\eta_0 - \eta_{min})(1 + \cos(\pi t / T))/2`
    (closed form). The chainable form, as torch's, follows the same curve
    from the current lr and keeps going past ``T_max`` (the lr rises again
    over the next ``T_max`` epochs)."""

    def __init__(self, optimizer, T_max, eta_min=0.0, last_epoch=-1):
        self.T_max = T_max
        self.eta_min = eta_min
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        self._warn_outside_step()
        t, period, low = self.last_epoch, self.T_max, self.eta_min
        groups = self.optimizer.param_groups
        if self._is_initial:
            return _lrs(self.optimizer)
        if self._step_count == 1 and t > 0:  # resumed: restart from the closed form
            return [low + (base_lr - low) * (1 + math.cos(t * math.pi / period)) / 2
                    for base_lr in self.base_lrs]
        if (t - 1 - period) % (2 * period) == 0:  # the trough: the ratio below is 0/0
            return [group["lr"] + (base_lr - low) * (1 - math.cos(math.pi / period)) / 2
                    for base_lr, group in zip(self.base_lrs, groups)]
        ratio = (1 + math.cos(math.pi * t / period)) / (1 + math.cos(math.pi * (t - 1) / period))
        return [ratio * (group["lr"] - low) + low for group in groups]

    def _get_closed_form_lr(self):
        return [self.eta_min + (base_lr - self.eta_min)
                * (1 + math.cos(math.pi * self.last_epoch / self.T_max)) / 2
                for base_lr in self.base_lrs]


class CosineAnnealingWarmRestarts(LRScheduler):
    r"""SGDR: cosine annealing that restarts every :math:`T_i` epochs, with
    :math:`T_0` = ``T_0`` and :math:`T_{i+1} = T_i \cdot` ``T_mult``:
    :math:`\eta = \eta_{min} + (\eta_0 - \eta_{min})(1 + \cos(\pi T_{cur}/T_i))/2`.

    ``step(epoch)`` takes a (possibly fractional) epoch without a warning, as
    torch's does, to anneal within an epoch.
    """

    def __init__(self, optimizer, T_0, T_mult=1, eta_min=0.0, last_epoch=-1):
        if T_0 <= 0 or not isinstance(T_0, int):
            raise ValueError(f"Expected positive integer T_0, but got {T_0}")
        if T_mult < 1 or not isinstance(T_mult, int):
            raise ValueError(f"Expected integer T_mult >= 1, but got {T_mult}")
        if not isinstance(eta_min, (float, int)):
            raise ValueError(f"Expected float or int eta_min, but got {eta_min} of type "
                             f"{type(eta_min)}")
        self.T_0 = T_0
        self.T_i = T_0
        self.T_mult = T_mult
        self.eta_min = eta_min
        self.T_cur = last_epoch
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        self._warn_outside_step()
        return [self.eta_min + (base_lr - self.eta_min)
                * (1 + math.cos(math.pi * self.T_cur / self.T_i)) / 2
                for base_lr in self.base_lrs]

    def step(self, epoch=None):
        """One epoch on, or to ``epoch`` (any non-negative number)."""
        if epoch is None and self.last_epoch < 0:
            epoch = 0
        if epoch is None:
            epoch = self.last_epoch + 1
            self.T_cur = self.T_cur + 1
            if self.T_cur >= self.T_i:
                self.T_cur = self.T_cur % self.T_i
                self.T_i = self.T_i * self.T_mult
        elif epoch < 0:
            raise ValueError(f"Expected non-negative epoch, but got {epoch}")
        elif epoch >= self.T_0:
            if self.T_mult == 1:
                self.T_cur = epoch % self.T_0
            else:
                # Restart n has begun once epoch >= T_0 (T_mult^n - 1) / (T_mult - 1).
                n = int(math.log(epoch / self.T_0 * (self.T_mult - 1) + 1, self.T_mult))
                self.T_cur = epoch - self.T_0 * (self.T_mult ** n - 1) / (self.T_mult - 1)
                self.T_i = self.T_0 * self.T_mult ** n
        else:
            self.T_i = self.T_0
            self.T_cur = epoch
        self.last_epoch = math.floor(epoch)
        with _Flag(self, "_get_lr_called_within_step"):
            values = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, values):
            group["lr"] = lr
        self._last_lr = _lrs(self.optimizer)


class _Composite(LRScheduler):
    """A scheduler made of others on the same optimizer (their states nest)."""

    _not_saved = ("optimizer", "_schedulers")

    def _check_members(self, optimizer, schedulers):
        name = type(self).__name__
        if len(schedulers) < 1:
            raise ValueError(f"{name} expects at least one scheduler, but got none.")
        for index, scheduler in enumerate(schedulers):
            if not hasattr(scheduler, "optimizer"):
                raise TypeError(f"{name}: the scheduler at index {index} should have "
                                "`optimizer` as its attribute.")
            if isinstance(scheduler, ReduceLROnPlateau):
                raise ValueError(f"{name} does not support `ReduceLROnPlateau` (its step needs "
                                 f"a metric), but got one at index {index}.")
            if scheduler.optimizer is not optimizer:
                raise ValueError(f"{name} expects all schedulers to belong to the same "
                                 f"optimizer, but the {type(scheduler).__name__} at index "
                                 f"{index} has another one.")

    def _saved_specially(self):
        return {"_schedulers": [s.state_dict() for s in self._schedulers]}

    def _check_special(self, state_dict):
        saved = state_dict["_schedulers"]
        if not isinstance(saved, (list, tuple)) or len(saved) != len(self._schedulers):
            raise ValueError(f"{type(self).__name__} state_dict['_schedulers'] must hold "
                             f"{len(self._schedulers)} state dicts")
        for scheduler, member in zip(self._schedulers, saved):
            scheduler._check_state_dict(member)

    def _load_special(self, state_dict):
        for scheduler, member in zip(self._schedulers, state_dict["_schedulers"]):
            scheduler.load_state_dict(member)


class SequentialLR(_Composite):
    """Run ``schedulers`` one after another, switching at each milestone
    (``len(milestones) == len(schedulers) - 1``). At a milestone the next
    scheduler starts from its epoch 0 (its closed form at 0 where it has
    one), from the groups' ``'initial_lr'``."""

    def __init__(self, optimizer, schedulers, milestones, last_epoch=-1):
        _check_optimizer(optimizer)
        self._check_members(optimizer, schedulers)
        if len(milestones) != len(schedulers) - 1:
            raise ValueError("Sequential Schedulers expects number of schedulers provided to be "
                             "one more than the number of milestone points, but got number of "
                             f"schedulers {len(schedulers)} and the number of milestones to be "
                             f"equal to {len(milestones)}")
        self._schedulers = schedulers
        self._milestones = milestones
        self.last_epoch = last_epoch + 1
        self.optimizer = optimizer
        # Undo what constructing the members did: back to the initial lrs and
        # one epoch earlier, then let the first scheduler take its first step.
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"]
        self._rewind(self)
        first = self._schedulers[bisect_right(self._milestones, 0)]
        first._initial_step()
        self._last_lr = first.get_last_lr()

    def recursive_undo(self, sched=None):
        """Step every (nested) member's ``last_epoch`` back by one (torch's name)."""
        self._rewind(self if sched is None else sched)

    @classmethod
    def _rewind(cls, scheduler):
        if hasattr(scheduler, "_schedulers"):
            for member in scheduler._schedulers:
                cls._rewind(member)
        elif hasattr(scheduler, "last_epoch"):
            scheduler.last_epoch -= 1

    def step(self):
        """One epoch on, in whichever scheduler owns it."""
        self.last_epoch += 1
        index = bisect_right(self._milestones, self.last_epoch)
        scheduler = self._schedulers[index]
        if index > 0 and self._milestones[index - 1] == self.last_epoch:
            scheduler._update_lr(0)
        else:
            scheduler.step()
        self._last_lr = scheduler.get_last_lr()


class ChainedScheduler(_Composite):
    """Step every scheduler in ``schedulers`` at each step, in order: their
    chainable factors multiply."""

    def __init__(self, schedulers, optimizer=None):
        optimizer = optimizer or (schedulers[0].optimizer if len(schedulers) else None)
        self._check_members(optimizer, schedulers)
        _check_optimizer(optimizer)
        self._schedulers = schedulers
        self.optimizer = optimizer
        self._last_lr = _lrs(optimizer)

    def step(self):
        """Step each scheduler once."""
        for scheduler in self._schedulers:
            scheduler.step()
        self._last_lr = _lrs(self.optimizer)


class ReduceLROnPlateau(LRScheduler):
    r"""Multiply the lr by ``factor`` once the metric passed to ``step`` has
    not improved for more than ``patience`` epochs, then wait ``cooldown``
    epochs. An improvement is ``a < best (1 - threshold)`` (mode ``'min'``,
    ``'rel'``), ``a < best - threshold`` (``'abs'``), and mirrored for
    ``'max'``. A reduction below ``min_lr`` is clamped to it, and one
    smaller than ``eps`` is not applied."""

    def __init__(self, optimizer, mode="min", factor=0.1, patience=10, threshold=1e-4,
                 threshold_mode="rel", cooldown=0, min_lr=0, eps=1e-8):
        if factor >= 1.0:
            raise ValueError("Factor should be < 1.0.")
        _check_optimizer(optimizer)
        if mode not in ("min", "max"):
            raise ValueError(f"mode {mode} is unknown!")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"threshold mode {threshold_mode} is unknown!")
        self.factor = factor
        self.optimizer = optimizer
        if isinstance(min_lr, (list, tuple)):
            if len(min_lr) != len(optimizer.param_groups):
                raise ValueError(f"expected {len(optimizer.param_groups)} min_lrs, "
                                 f"got {len(min_lr)}")
            self.default_min_lr = None
            self.min_lrs = list(min_lr)
        else:
            self.default_min_lr = min_lr
            self.min_lrs = [min_lr] * len(optimizer.param_groups)
        self.patience = patience
        self.cooldown = cooldown
        self.eps = eps
        self.last_epoch = 0
        self._last_lr = _lrs(optimizer)
        self.mode_worse = math.inf if mode == "min" else -math.inf
        self.mode = mode
        self.threshold = threshold
        self.threshold_mode = threshold_mode
        self._reset()

    def _reset(self):
        self.best = self.mode_worse
        self.cooldown_counter = 0
        self.num_bad_epochs = 0

    @property
    def in_cooldown(self):
        return self.cooldown_counter > 0

    def is_better(self, a, best):
        """Whether metric ``a`` improves on ``best`` by more than the threshold."""
        if self.mode == "min":
            return a < best * (1.0 - self.threshold) if self.threshold_mode == "rel" \
                else a < best - self.threshold
        return a > best * (self.threshold + 1.0) if self.threshold_mode == "rel" \
            else a > best + self.threshold

    def step(self, metrics, epoch=None):
        """Record one epoch's metric (anything ``float()`` accepts)."""
        current = float(metrics)
        if epoch is None:
            epoch = self.last_epoch + 1
        else:
            warnings.warn(EPOCH_DEPRECATION_WARNING, UserWarning, stacklevel=2)
        self.last_epoch = epoch
        if self.is_better(current, self.best):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.in_cooldown:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0  # bad epochs during cooldown do not count
        if self.num_bad_epochs > self.patience:
            self._reduce_lr()
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        self._last_lr = _lrs(self.optimizer)

    def _reduce_lr(self):
        groups = self.optimizer.param_groups
        if len(groups) != len(self.min_lrs):
            if self.default_min_lr is None:
                raise RuntimeError(
                    f"The number of param groups in the `optimizer` ({len(groups)}) differs "
                    f"from when `ReduceLROnPlateau` was initialized ({len(self.min_lrs)}), "
                    "usually due to a new param group being added to the optimizer. Set "
                    "`min_lrs` to one value per group.")
            self.min_lrs = [self.default_min_lr] * len(groups)
        for group, min_lr in zip(groups, self.min_lrs):
            old_lr = float(group["lr"])
            new_lr = max(old_lr * self.factor, min_lr)
            if old_lr - new_lr > self.eps:
                group["lr"] = new_lr

    def _check_special(self, state_dict):
        mode, threshold_mode = state_dict["mode"], state_dict["threshold_mode"]
        if mode not in ("min", "max") or threshold_mode not in ("rel", "abs"):
            raise ValueError(f"ReduceLROnPlateau state_dict has mode {mode!r} and "
                             f"threshold_mode {threshold_mode!r}")


class CyclicLR(LRScheduler):
    r"""Cyclical learning rates (Smith, 2017): the lr moves between
    ``base_lr`` and ``max_lr`` along a triangle of ``step_size_up`` +
    ``step_size_down`` iterations, its height scaled by ``scale_fn`` of the
    cycle (``'triangular'``: 1, ``'triangular2'``: halved each cycle) or of
    the iteration (``'exp_range'``: :math:`\gamma^t`). With
    ``cycle_momentum`` the momentum (netcl's ``SGD``/``RMSProp``) or
    ``betas[0]`` (``Adam``/``AdamW``) moves the opposite way between
    ``max_momentum`` and ``base_momentum``. Step it after every batch.

    As torch, construction sets each group's lr to ``base_lr`` (a fresh
    run) and ``base_lrs`` are then ``base_lr``, not ``'initial_lr'``.
    """

    def __init__(self, optimizer, base_lr, max_lr, step_size_up=2000, step_size_down=None,
                 mode="triangular", gamma=1.0, scale_fn=None, scale_mode="cycle",
                 cycle_momentum=True, base_momentum=0.8, max_momentum=0.9, last_epoch=-1):
        _check_optimizer(optimizer)
        self.optimizer = optimizer
        base_lrs = _per_group("base_lr", optimizer, base_lr)
        if last_epoch == -1:
            for lr, group in zip(base_lrs, optimizer.param_groups):
                group["lr"] = lr
        self.max_lrs = _per_group("max_lr", optimizer, max_lr)
        step_size_up = float(step_size_up)
        step_size_down = float(step_size_down) if step_size_down is not None else step_size_up
        self.total_size = step_size_up + step_size_down
        self.step_ratio = step_size_up / self.total_size
        if mode not in ("triangular", "triangular2", "exp_range") and scale_fn is None:
            raise ValueError("mode is invalid and scale_fn is None")
        self.mode = mode
        self.gamma = gamma
        self._scale_fn_custom = scale_fn
        # A built-in mode decides whether it scales by cycle or by iteration.
        self.scale_mode = scale_mode if scale_fn is not None else \
            {"triangular": "cycle", "triangular2": "cycle", "exp_range": "iterations"}[mode]
        self.cycle_momentum = cycle_momentum
        if cycle_momentum:
            self.use_beta1 = _momentum_key(optimizer)
            self.base_momentums = _per_group("base_momentum", optimizer, base_momentum)
            self.max_momentums = _per_group("max_momentum", optimizer, max_momentum)
            if last_epoch == -1:
                for high, low, group in zip(self.max_momentums, self.base_momentums,
                                            optimizer.param_groups):
                    _set_momentum(group, self.use_beta1, high)
                    group["max_momentum"] = high
                    group["base_momentum"] = low
        super().__init__(optimizer, last_epoch)
        self.base_lrs = base_lrs

    def scale_fn(self, x):
        """The height multiplier at cycle (or iteration) ``x``."""
        if self._scale_fn_custom is not None:
            return self._scale_fn_custom(x)
        if self.mode == "triangular":
            return 1.0
        if self.mode == "triangular2":
            return 1 / (2.0 ** (x - 1))
        return self.gamma ** x

    def get_lr(self):
        """The lrs at ``last_epoch``; with ``cycle_momentum`` also sets the groups'
        momentum (or beta1)."""
        self._warn_outside_step()
        cycle = math.floor(1 + self.last_epoch / self.total_size)
        x = 1.0 + self.last_epoch / self.total_size - cycle  # position in the cycle, [0, 1)
        if x <= self.step_ratio:
            rise = x / self.step_ratio
        else:
            rise = (x - 1) / (self.step_ratio - 1)
        scale = self.scale_fn(cycle if self.scale_mode == "cycle" else self.last_epoch)
        lrs = [base_lr + (max_lr - base_lr) * rise * scale
               for base_lr, max_lr in zip(self.base_lrs, self.max_lrs)]
        if self.cycle_momentum:
            for low, high, group in zip(self.base_momentums, self.max_momentums,
                                        self.optimizer.param_groups):
                _set_momentum(group, self.use_beta1, high - (high - low) * rise * scale)
        return lrs

    _not_saved = ("optimizer", "_scale_fn_custom")

    def _saved_specially(self):
        # None for no function or a plain function (not saved), else a copy
        # of the callable object's ``__dict__``.
        fn = self._scale_fn_custom
        return {"_scale_fn_custom": None if fn is None else _lambda_state([fn])[0]}

    def _load_special(self, state_dict):
        attributes = state_dict["_scale_fn_custom"]
        if attributes is not None and self._scale_fn_custom is not None:
            self._scale_fn_custom.__dict__.update(attributes)


class OneCycleLR(LRScheduler):
    r"""The 1cycle policy (Smith & Topin, 2018): the lr rises from
    ``max_lr / div_factor`` to ``max_lr`` over the first ``pct_start`` of
    ``total_steps`` (or ``epochs * steps_per_epoch``), then anneals to
    ``initial_lr / final_div_factor``, by cosine or linearly
    (``anneal_strategy``); ``three_phase`` adds a symmetric descent before
    the final annealing. With ``cycle_momentum`` momentum (or ``betas[0]``)
    moves inversely between ``max_momentum`` and ``base_momentum``. Stepping
    past ``total_steps`` raises ``ValueError``.

    As torch, a fresh run writes ``'initial_lr'``, ``'max_lr'``,
    ``'min_lr'`` (and ``'max_momentum'``, ``'base_momentum'``) into each group.
    """

    def __init__(self, optimizer, max_lr, total_steps=None, epochs=None, steps_per_epoch=None,
                 pct_start=0.3, anneal_strategy="cos", cycle_momentum=True,
                 base_momentum=0.85, max_momentum=0.95, div_factor=25.0,
                 final_div_factor=1e4, three_phase=False, last_epoch=-1):
        _check_optimizer(optimizer)
        self.optimizer = optimizer
        if total_steps is not None:
            if total_steps <= 0 or not isinstance(total_steps, int):
                raise ValueError(f"Expected positive integer total_steps, but got {total_steps}")
            self.total_steps = total_steps
        elif epochs is not None and steps_per_epoch is not None:
            if not isinstance(epochs, int) or epochs <= 0:
                raise ValueError(f"Expected positive integer epochs, but got {epochs}")
            if not isinstance(steps_per_epoch, int) or steps_per_epoch <= 0:
                raise ValueError("Expected positive integer steps_per_epoch, but got "
                                 f"{steps_per_epoch}")
            self.total_steps = epochs * steps_per_epoch
        else:
            raise ValueError("You must define either total_steps OR (epochs AND steps_per_epoch)")
        if pct_start < 0 or pct_start > 1 or not isinstance(pct_start, float):
            raise ValueError(f"Expected float between 0 and 1 pct_start, but got {pct_start}")
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError("anneal_strategy must be one of 'cos' or 'linear', instead got "
                             f"{anneal_strategy}")

        def phase(end_step, start_lr, end_lr, start_momentum, end_momentum):
            return dict(end_step=end_step, start_lr=start_lr, end_lr=end_lr,
                        start_momentum=start_momentum, end_momentum=end_momentum)

        warmup_end = float(pct_start * self.total_steps) - 1
        last = self.total_steps - 1
        if three_phase:
            self._schedule_phases = [
                phase(warmup_end, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
                phase(float(2 * pct_start * self.total_steps) - 2, "max_lr", "initial_lr",
                      "base_momentum", "max_momentum"),
                phase(last, "initial_lr", "min_lr", "max_momentum", "max_momentum")]
        else:
            self._schedule_phases = [
                phase(warmup_end, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
                phase(last, "max_lr", "min_lr", "base_momentum", "max_momentum")]
        self._anneal_func_type = anneal_strategy

        max_lrs = _per_group("max_lr", optimizer, max_lr)
        if last_epoch == -1:
            for peak, group in zip(max_lrs, optimizer.param_groups):
                group["initial_lr"] = peak / div_factor
                group["max_lr"] = peak
                group["min_lr"] = group["initial_lr"] / final_div_factor
        self.cycle_momentum = cycle_momentum
        if cycle_momentum:
            self.use_beta1 = _momentum_key(optimizer)
            max_momentums = _per_group("max_momentum", optimizer, max_momentum)
            base_momentums = _per_group("base_momentum", optimizer, base_momentum)
            if last_epoch == -1:
                for high, low, group in zip(max_momentums, base_momentums,
                                            optimizer.param_groups):
                    _set_momentum(group, self.use_beta1, high)
                    group["max_momentum"] = high
                    group["base_momentum"] = low
        super().__init__(optimizer, last_epoch)

    def _anneal(self, start, end, pct):
        if self._anneal_func_type == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def get_lr(self):
        """The lrs at ``last_epoch``; with ``cycle_momentum`` also sets the groups'
        momentum (or beta1)."""
        self._warn_outside_step()
        step = self.last_epoch
        if step > self.total_steps:
            raise ValueError(f"Tried to step {step} times. The specified number of total "
                             f"steps is {self.total_steps}")
        lrs = []
        for group in self.optimizer.param_groups:
            start_step = 0.0
            for i, phase in enumerate(self._schedule_phases):
                end_step = phase["end_step"]
                if step <= end_step or i == len(self._schedule_phases) - 1:
                    pct = (step - start_step) / (end_step - start_step)
                    lrs.append(self._anneal(group[phase["start_lr"]], group[phase["end_lr"]],
                                            pct))
                    if self.cycle_momentum:
                        _set_momentum(group, self.use_beta1, self._anneal(
                            group[phase["start_momentum"]], group[phase["end_momentum"]], pct))
                    break
                start_step = phase["end_step"]
        return lrs
