"""RMSProp (Tieleman & Hinton, 2012) with torch.optim.RMSprop's semantics."""

from netcl.optim.optimizer import (
    Optimizer, check_flag, check_non_negative, check_unit_interval)


class RMSProp(Optimizer):
    r"""RMSProp, matching ``torch.optim.RMSprop`` operation for operation.

    For each parameter :math:`p` with gradient :math:`g` at step :math:`t`:

    .. math::

        g &\leftarrow -g \quad\text{if maximize} \\
        g &\leftarrow g + \lambda p \quad\text{(L2 weight decay, coupled)} \\
        v_t &= \alpha v_{t-1} + (1-\alpha) g^2 \\
        \bar g_t &= \alpha \bar g_{t-1} + (1-\alpha) g \quad\text{(centered only)} \\
        d &= \sqrt{v_t - \bar g_t^2} + \epsilon \;\text{(centered) or}\; \sqrt{v_t} + \epsilon \\
        b_t &= \mu b_{t-1} + g / d, \quad p \leftarrow p - \eta b_t \quad\text{(momentum > 0)} \\
        p &\leftarrow p - \eta g / d \quad\text{(momentum = 0)}

    with :math:`v_0 = \bar g_0 = b_0 = 0`. Note that :math:`\epsilon` is added
    *outside* the square root, as in torch; TensorFlow 1 and Keras add it
    inside (``sqrt(v + eps)``), which changes results when :math:`v` is small.

    State per parameter, as torch names it: ``step``, ``square_avg``,
    ``momentum_buffer`` (only when momentum > 0) and ``grad_avg`` (only when
    centered) — one to three buffers the size of the parameter.

    Args:
        params: parameters, ``(name, parameter)`` pairs, or parameter groups.
        lr: learning rate :math:`\eta` (default 1e-2).
        alpha: smoothing constant :math:`\alpha` in [0, 1] (default 0.99).
        eps: added to the denominator for numerical stability (default 1e-8).
        weight_decay: L2 penalty :math:`\lambda` added to the gradient (default 0).
        momentum: momentum factor :math:`\mu` (default 0).
        centered: normalise by an estimate of the gradient's variance instead
            of its uncentered second moment (default False).
        maximize: maximise the objective instead of minimising it (default False).
    """

    template = "rmsprop.cl.mako"
    scalar_names = ("lr", "alpha", "one_minus_alpha", "eps",
                    "weight_decay_value", "momentum_value")

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0,
                 momentum=0.0, centered=False, maximize=False):
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                        momentum=momentum, centered=centered, maximize=maximize)
        super().__init__(params, defaults)

    def _validate_group(self, group):
        check_non_negative("learning rate", group["lr"])
        check_unit_interval("alpha", group["alpha"])
        check_non_negative("epsilon", group["eps"])
        check_non_negative("weight_decay", group["weight_decay"])
        check_non_negative("momentum", group["momentum"])
        check_flag("centered", group["centered"])
        check_flag("maximize", group["maximize"])

    def _state_names(self, group):
        names = ["square_avg"]
        if group["momentum"] > 0:
            names.append("momentum_buffer")
        if group["centered"]:
            names.append("grad_avg")
        return names

    def _kernel_flags(self, group):
        return dict(maximize=bool(group["maximize"]), weight_decay=group["weight_decay"] != 0,
                    centered=bool(group["centered"]), momentum=group["momentum"] > 0)

    def _scalar_args(self, group, step):
        alpha = float(group["alpha"])
        return (group["lr"], alpha, 1.0 - alpha, group["eps"],
                group["weight_decay"], group["momentum"])


RMSprop = RMSProp
