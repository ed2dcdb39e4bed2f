"""Stochastic gradient descent with torch.optim.SGD's semantics."""

import math

from netcl.optim.optimizer import Optimizer, check_flag, check_non_negative, is_number


def _check_finite(name, value):
    if not is_number(value) or not math.isfinite(value):
        raise ValueError(f"Invalid {name} value: {value!r} (must be a finite number)")


class SGD(Optimizer):
    r"""SGD with optional momentum, matching ``torch.optim.SGD`` operation for operation.

    For each parameter :math:`p` with gradient :math:`g`:

    .. math::

        g &\leftarrow -g \quad\text{if maximize} \\
        g &\leftarrow g + \lambda p \quad\text{(L2 weight decay, coupled)} \\
        b &\leftarrow g \;\text{(first update with momentum), else}\;
             b \leftarrow \mu b + (1-\tau) g \\
        g &\leftarrow g + \mu b \;\text{(nesterov), else}\; g \leftarrow b
             \quad\text{(momentum > 0 only)} \\
        p &\leftarrow p - \eta g

    The momentum buffer starts as a copy of the first gradient; dampening
    :math:`\tau` applies only from the second update on.

    State per parameter, as torch keeps it: nothing when momentum is 0 (the
    parameter has no entry in ``state``), else only ``momentum_buffer`` — one
    buffer the size of the parameter and no step count.

    Args:
        params: parameters, ``(name, parameter)`` pairs, or parameter groups.
        lr: learning rate :math:`\eta` (default 1e-3, as torch 2.13).
        momentum: momentum factor :math:`\mu` (default 0).
        dampening: dampening :math:`\tau` for momentum (default 0).
        weight_decay: L2 penalty :math:`\lambda` added to the gradient (default 0).
        nesterov: Nesterov momentum; needs momentum > 0 and dampening 0
            (default False).
        maximize: maximise the objective instead of minimising it (default False).
        skip_nonfinite, max_grad_norm, track_stats, master_weights,
            stochastic_rounding, kahan, state_dtype, seed: the engine's
            options (the last five: float16 and bfloat16 parameters and
            compressed state, see wiki/Mixed-precision.md), see
            :class:`netcl.optim.Optimizer`.
    """

    template = "sgd.cl.mako"
    torch_name = "SGD"
    torch_hyperparameters = ("lr", "momentum", "dampening", "weight_decay", "nesterov",
                             "maximize")
    torch_options = {"foreach": None, "differentiable": False, "fused": None}
    stats_momentum = "momentum_buffer"
    benchmark_variants = {"sgd-nesterov": dict(momentum=0.9, nesterov=True)}
    scalar_names = ("lr", "weight_decay_value", "momentum_value", "one_minus_dampening")
    step_in_state = False

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0,
                 nesterov=False, *, maximize=False, **options):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
        super().__init__(params, defaults, **options)

    def _validate_group(self, group):
        check_non_negative("learning rate", group["lr"])
        check_non_negative("momentum", group["momentum"])
        _check_finite("dampening", group["dampening"])
        check_non_negative("weight_decay", group["weight_decay"])
        check_flag("nesterov", group["nesterov"])
        check_flag("maximize", group["maximize"])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(
                "Nesterov momentum requires a momentum and zero dampening (got momentum="
                f"{group['momentum']!r}, dampening={group['dampening']!r})")

    def _state_names(self, group):
        return ["momentum_buffer"] if group["momentum"] != 0 else []

    def _kernel_flags(self, group):
        momentum = group["momentum"] != 0
        return dict(maximize=bool(group["maximize"]), weight_decay=group["weight_decay"] != 0,
                    momentum=momentum, nesterov=momentum and bool(group["nesterov"]))

    def _scalar_args(self, group):
        return (float(group["lr"]), float(group["weight_decay"]), float(group["momentum"]),
                1 - float(group["dampening"]))


__all__ = ["SGD"]
