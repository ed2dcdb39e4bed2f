"""Adam (Kingma & Ba, 2015) and AdamW (Loshchilov & Hutter, 2019) with
torch.optim.Adam's and torch.optim.AdamW's semantics.

AdamW is not a separate algorithm here: it is Adam with
``decoupled_weight_decay=True`` (as in torch 2.13, whose ``Adam`` takes that
flag too) and a default weight decay of 1e-2.
"""

from netcl.optim.optimizer import Optimizer, check_flag, check_non_negative, is_number


def _check_betas(betas):
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (must be a pair of numbers in [0, 1))")
    for index, beta in enumerate(betas):
        if not is_number(beta) or not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {beta!r} "
                             "(must lie in [0, 1))")


class Adam(Optimizer):
    r"""Adam, matching ``torch.optim.Adam`` operation for operation.

    For each parameter :math:`p` with gradient :math:`g` at its step
    :math:`t` (counted per parameter, starting at 1):

    .. math::

        g &\leftarrow -g \quad\text{if maximize} \\
        g &\leftarrow g + \lambda p \quad\text{(coupled weight decay), or} \\
        p &\leftarrow (1 - \eta\lambda) p \quad\text{(decoupled weight decay)} \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g \\
        v_t &= \beta_2 v_{t-1} + (1-\beta_2) g^2 \\
        \hat v_t &= \max(\hat v_{t-1}, v_t) \quad\text{(amsgrad), else } v_t \\
        p &\leftarrow p - \frac{\eta}{1-\beta_1^t}\,
             \frac{m_t}{\sqrt{\hat v_t}/\sqrt{1-\beta_2^t} + \epsilon}

    with :math:`m_0 = v_0 = \hat v_0 = 0`.

    State per parameter, as torch names it: ``step``, ``exp_avg``,
    ``exp_avg_sq`` and ``max_exp_avg_sq`` (only with amsgrad) — two or three
    buffers the size of the parameter.

    Args:
        params: parameters, ``(name, parameter)`` pairs, or parameter groups.
        lr: learning rate :math:`\eta` (default 1e-3).
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1) (default (0.9, 0.999)).
        eps: added to the denominator for numerical stability (default 1e-8).
        weight_decay: weight decay :math:`\lambda` (default 0).
        amsgrad: normalise by the running maximum of :math:`v_t` (default False).
        maximize: maximise the objective instead of minimising it (default False).
        decoupled_weight_decay: decay the parameter directly (AdamW) instead of
            adding :math:`\lambda p` to the gradient (default False).
        skip_nonfinite, max_grad_norm, track_stats, master_weights,
            stochastic_rounding, kahan, state_dtype, seed: the engine's
            options (the last five: float16 and bfloat16 parameters and
            compressed state, see wiki/Mixed-precision.md), see
            :class:`netcl.optim.Optimizer`.
    """

    template = "adam.cl.mako"
    #: int8 state: the first moment on the signed map, the second on the unsigned.
    quantized_state = {"exp_avg": True, "exp_avg_sq": False, "max_exp_avg_sq": False}
    torch_name = "Adam"
    torch_hyperparameters = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize",
                             "decoupled_weight_decay")
    torch_options = {"foreach": None, "capturable": False, "differentiable": False,
                     "fused": None}
    stats_second_moment = "exp_avg_sq"
    stats_momentum = "exp_avg"
    stats_effective_lr = True
    benchmark_variants = {"adam": {}, "amsgrad": dict(amsgrad=True)}
    scalar_names = ("one_minus_beta1", "beta2", "one_minus_beta2", "eps",
                    "weight_decay_value", "decay_factor")
    factor_names = ("factor_lr", "factor_beta1", "factor_beta2")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, maximize=False, decoupled_weight_decay=False, **options):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults, **options)

    def _validate_group(self, group):
        check_non_negative("learning rate", group["lr"])
        check_non_negative("epsilon", group["eps"])
        _check_betas(group["betas"])
        check_non_negative("weight_decay", group["weight_decay"])
        check_flag("amsgrad", group["amsgrad"])
        check_flag("maximize", group["maximize"])
        check_flag("decoupled_weight_decay", group["decoupled_weight_decay"])

    def _state_names(self, group):
        names = ["exp_avg", "exp_avg_sq"]
        if group["amsgrad"]:
            names.append("max_exp_avg_sq")
        return names

    def _kernel_flags(self, group):
        weight_decay = group["weight_decay"] != 0
        return dict(maximize=bool(group["maximize"]), weight_decay=weight_decay,
                    decoupled=weight_decay and bool(group["decoupled_weight_decay"]),
                    amsgrad=bool(group["amsgrad"]))

    def _scalar_args(self, group):
        # torch computes these on Python floats (float64); the kernel argument
        # rounds them to the state type as torch rounds Python scalars. The
        # factors (bias corrections) are computed per tensor on the device.
        lr = float(group["lr"])
        beta1, beta2 = (float(b) for b in group["betas"])
        weight_decay = float(group["weight_decay"])
        return (1 - beta1, beta2, 1 - beta2, float(group["eps"]), weight_decay,
                1 - lr * weight_decay, lr, beta1, beta2)


class AdamW(Adam):
    r"""AdamW: :class:`Adam` with decoupled weight decay, matching ``torch.optim.AdamW``.

    Each step first shrinks the parameter, :math:`p \leftarrow (1 - \eta\lambda) p`,
    then applies the Adam update to the undecayed gradient; the decay never
    enters the moment estimates. Same arguments as :class:`Adam` except that
    ``weight_decay`` defaults to 1e-2 and decay is always decoupled.
    """

    torch_name = "AdamW"
    benchmark_variants = {"adamw": dict(weight_decay=1e-2)}

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, **options):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         decoupled_weight_decay=True, **options)

    def load_state_dict(self, state_dict):
        # As torch's AdamW, a loaded state never turns decoupled decay off.
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


__all__ = ["Adam", "AdamW"]
