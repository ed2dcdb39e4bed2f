"""RMSProp (Tieleman & Hinton, 2012) with torch.optim.RMSprop's semantics by
default, and every other framework's convention as an option or a preset."""

from types import MappingProxyType

from netcl.optim.optimizer import (
    Optimizer, check_flag, check_non_negative, check_unit_interval)

#: The options added to torch's signature, with their (torch-behaviour) defaults.
_OPTION_DEFAULTS = dict(
    eps_in_sqrt=False,
    initial_scale=0.0,
    lr_in_momentum=False,
    nesterov=False,
    bias_correction=False,
    decoupled_weight_decay=False,
    clamp_variance=False,
)

_TORCH_DEFAULTS = dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                       centered=False, maximize=False, **_OPTION_DEFAULTS)


def _preset(**changes):
    values = dict(_TORCH_DEFAULTS)
    values.update(changes)
    return MappingProxyType(values)


class RMSProp(Optimizer):
    r"""RMSProp, matching ``torch.optim.RMSprop`` operation for operation by default.

    For each parameter :math:`p` with gradient :math:`g` at its step :math:`t`
    (counted per parameter, starting at 1), learning rate :math:`\eta`,
    smoothing constant :math:`\alpha`, weight decay :math:`\lambda`, momentum
    :math:`\mu`; bracketed factors are computed in float64 (on the host, and
    :math:`1-\alpha^t` in the kernel from the device-resident step count):

    .. math::

        &(1)\ g \leftarrow -g \quad\text{if maximize} \\
        &(2)\ p \leftarrow p\,[1 - \eta\lambda] \ \text{(decoupled\_weight\_decay)}
              \quad\text{or}\quad g \leftarrow g + \lambda p \ \text{(L2, default)} \\
        &(3)\ v \leftarrow v\alpha + [1-\alpha]\, g g \\
        &(4)\ m \leftarrow \operatorname{lerp}(m, g, [1-\alpha]) \quad\text{(centered only)} \\
        &(5)\ \hat v = v / [1-\alpha^t],\ \hat m = m / [1-\alpha^t]
              \ \text{(bias\_correction), else}\ \hat v = v,\ \hat m = m \\
        &(6)\ s = \hat v - \hat m^2 \ \text{(centered; clamped: } s<0\ ?\ 0 : s
              \text{ with clamp\_variance)}, \ \text{else}\ s = \hat v \\
        &(7)\ d = \sqrt{s + \epsilon}\ \text{(eps\_in\_sqrt)},
              \ \text{else}\ d = \sqrt{s} + \epsilon \\
        &(8)\ \mu = 0:\ p \leftarrow p - \eta g / d \\
        &(9)\ \mu > 0:\ u = \eta g / d \ \text{(lr\_in\_momentum), else}\ u = g / d;
              \quad b \leftarrow b\mu + u; \\
        &\qquad q = \mu b + u \ \text{(nesterov), else}\ q = b; \quad
              p \leftarrow p - q \ \text{(lr\_in\_momentum), else}\ p \leftarrow p - \eta q

    ``lerp(m, g, w)`` is ATen's: ``m + w (g - m)`` for ``w < 0.5``, else
    ``g - (g - m)(1 - w)``. ``v`` starts at ``initial_scale``, ``m`` and ``b``
    at 0. With every option at its default this is exactly torch's
    ``_single_tensor_rmsprop``: :math:`\epsilon` *outside* the root, ``v`` from
    0, the learning rate outside the momentum buffer.

    State per parameter, as torch names it: ``step``, ``square_avg``,
    ``momentum_buffer`` (only when momentum > 0) and ``grad_avg`` (only when
    centered) — one to three buffers the size of the parameter. No option adds
    a buffer: the bias-correction factor is a kernel argument.

    Args:
        params: parameters, ``(name, parameter)`` pairs, or parameter groups.
        lr: learning rate :math:`\eta` (default 1e-2).
        alpha: smoothing constant :math:`\alpha` in [0, 1] (default 0.99; must
            be below 1 with ``bias_correction``).
        eps: added to the denominator for numerical stability (default 1e-8).
        weight_decay: weight decay :math:`\lambda` (default 0), an L2 term
            added to the gradient unless ``decoupled_weight_decay``.
        momentum: momentum factor :math:`\mu` (default 0).
        centered: normalise by an estimate of the gradient's variance instead
            of its uncentered second moment (default False).
        maximize: maximise the objective instead of minimising it (default False).
        eps_in_sqrt: :math:`d = \sqrt{s + \epsilon}` (TF1, Keras, timm, optax)
            instead of :math:`\sqrt{s} + \epsilon` (default False). The
            largest step multiplier becomes :math:`1/\sqrt\epsilon` instead of
            :math:`1/\epsilon`.
        initial_scale: start value of ``square_avg``, finite and >= 0 (default
            0; TF1 and timm start at 1, which makes the first steps small).
            Read when a parameter's state is created.
        lr_in_momentum: fold the learning rate into the momentum buffer,
            :math:`b \leftarrow \mu b + \eta g/d,\ p \leftarrow p - b`, as TF1,
            Keras, timm and optax do (default False). Identical to the
            default for a constant learning rate; after an lr change the old
            velocity keeps its old lr instead of being rescaled at once. No
            effect without momentum.
        nesterov: optax's Nesterov momentum: step by :math:`\mu b + u` with
            the new buffer :math:`b` (default False). No effect without
            momentum (accepted, as optax accepts ``momentum=0, nesterov=True``).
        bias_correction: divide ``square_avg`` (and ``grad_avg``) by
            :math:`1 - \alpha^t` when reading them, as optax does; the stored
            state stays uncorrected (default False). With ``initial_scale=0``
            the first step is then :math:`\eta g / (|g| + \epsilon)`.
        decoupled_weight_decay: shrink the parameter,
            :math:`p \leftarrow (1 - \eta\lambda) p`, before the update instead
            of adding :math:`\lambda p` to the gradient (Keras; timm's
            ``decoupled_decay``; default False). It ignores ``maximize``.
        clamp_variance: with ``centered``, replace a negative :math:`s` (only
            reachable through rounding) by 0 before the root; NaN stays NaN
            (default False). No effect without ``centered``.
        skip_nonfinite, max_grad_norm, track_stats, master_weights,
            stochastic_rounding, kahan, state_dtype, seed: the engine's
            options (the last five: float16 and bfloat16 parameters and
            compressed state, see wiki/Mixed-precision.md), see
            :class:`netcl.optim.Optimizer`.

    :meth:`from_preset` builds the optimizer with another framework's defaults
    and conventions (see :attr:`PRESETS`).
    """

    template = "rmsprop.cl.mako"
    #: int8 state: square_avg on the unsigned map, the signed ones on the signed.
    quantized_state = {"square_avg": False, "grad_avg": True, "momentum_buffer": True}
    torch_name = "RMSprop"
    torch_hyperparameters = ("lr", "momentum", "alpha", "eps", "centered", "weight_decay",
                             "maximize")
    torch_options = {"capturable": False, "foreach": None, "differentiable": False}
    stats_second_moment = "square_avg"
    stats_momentum = "momentum_buffer"
    stats_effective_lr = True
    benchmark_variants = {"rmsprop": {},
                          "rmsprop-centered-mom": dict(momentum=0.9, centered=True)}
    scalar_names = ("lr", "alpha", "one_minus_alpha", "eps",
                    "weight_decay_value", "momentum_value", "decay_factor")
    factor_names = ("factor_alpha",)

    #: Framework name -> the full keyword arguments that reproduce it.
    #: Sources: torch/optim/rmsprop.py (torch 2.13); TF1
    #: tensorflow/python/training/rmsprop.py and
    #: tensorflow/core/kernels/training_ops.cc (ApplyRMSProp); Keras 3
    #: keras/src/optimizers/rmsprop.py and base_optimizer.py; timm
    #: timm/optim/rmsprop_tf.py (RMSpropTF); optax optax/_src/alias.py and
    #: optax/_src/transform.py. TF1 and optax have no default learning rate:
    #: 1e-3 is netcl's choice. ``clamp_variance`` is netcl's robustness choice
    #: outside the torch preset: none of those frameworks clamps.
    PRESETS = MappingProxyType({
        "torch": _preset(),
        "tf1": _preset(lr=1e-3, alpha=0.9, eps=1e-10, eps_in_sqrt=True, initial_scale=1.0,
                       lr_in_momentum=True, clamp_variance=True),
        "keras": _preset(lr=1e-3, alpha=0.9, eps=1e-7, eps_in_sqrt=True, lr_in_momentum=True,
                         decoupled_weight_decay=True, clamp_variance=True),
        "timm": _preset(lr=1e-2, alpha=0.9, eps=1e-10, eps_in_sqrt=True, initial_scale=1.0,
                        lr_in_momentum=True, clamp_variance=True),
        "optax": _preset(lr=1e-3, alpha=0.9, eps=1e-8, eps_in_sqrt=True, lr_in_momentum=True,
                         clamp_variance=True),
    })

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0,
                 momentum=0.0, centered=False, maximize=False, *, eps_in_sqrt=False,
                 initial_scale=0.0, lr_in_momentum=False, nesterov=False,
                 bias_correction=False, decoupled_weight_decay=False, clamp_variance=False,
                 **options):
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                        momentum=momentum, centered=centered, maximize=maximize,
                        eps_in_sqrt=eps_in_sqrt, initial_scale=initial_scale,
                        lr_in_momentum=lr_in_momentum, nesterov=nesterov,
                        bias_correction=bias_correction,
                        decoupled_weight_decay=decoupled_weight_decay,
                        clamp_variance=clamp_variance)
        super().__init__(params, defaults, **options)

    @classmethod
    def from_preset(cls, name, params, **overrides):
        """An optimizer with framework ``name``'s defaults and conventions.

        ``name`` is one of ``"torch"``, ``"tf1"``, ``"keras"``, ``"timm"``,
        ``"optax"`` (see :attr:`PRESETS`); ``overrides`` replace preset values,
        e.g. ``RMSProp.from_preset("timm", params, momentum=0.9)``.
        """
        if not isinstance(name, str) or name not in cls.PRESETS:
            raise ValueError(f"unknown RMSProp preset {name!r}; "
                             f"valid presets: {', '.join(cls.PRESETS)}")
        unknown = set(overrides) - set(cls.PRESETS[name]) - set(cls.engine_options)
        if unknown:
            raise TypeError(f"unknown RMSProp option(s) {sorted(unknown)}")
        kwargs = dict(cls.PRESETS[name])
        kwargs.update(overrides)
        return cls(params, **kwargs)

    def _validate_group(self, group):
        check_non_negative("learning rate", group["lr"])
        check_unit_interval("alpha", group["alpha"])
        check_non_negative("epsilon", group["eps"])
        check_non_negative("weight_decay", group["weight_decay"])
        check_non_negative("momentum", group["momentum"])
        check_flag("centered", group["centered"])
        check_flag("maximize", group["maximize"])
        check_non_negative("initial_scale", group["initial_scale"])
        for name in ("eps_in_sqrt", "lr_in_momentum", "nesterov", "bias_correction",
                     "decoupled_weight_decay", "clamp_variance"):
            check_flag(name, group[name])
        if group["bias_correction"] and not group["alpha"] < 1.0:
            raise ValueError(f"Invalid alpha value: {group['alpha']!r} (bias_correction "
                             "divides by 1 - alpha^t, so alpha must be below 1)")

    def _state_names(self, group):
        names = ["square_avg"]
        if group["momentum"] > 0:
            names.append("momentum_buffer")
        if group["centered"]:
            names.append("grad_avg")
        return names

    def _initial_state(self, group, name):
        return float(group["initial_scale"]) if name == "square_avg" else 0.0

    def _kernel_flags(self, group):
        # Options that are no-ops in a group (see the docstring) are normalised
        # away so they never build a kernel of their own.
        weight_decay = group["weight_decay"] != 0
        centered = bool(group["centered"])
        momentum = group["momentum"] > 0
        return dict(maximize=bool(group["maximize"]), weight_decay=weight_decay,
                    centered=centered, momentum=momentum,
                    eps_in_sqrt=bool(group["eps_in_sqrt"]),
                    lr_in_momentum=momentum and bool(group["lr_in_momentum"]),
                    nesterov=momentum and bool(group["nesterov"]),
                    bias_correction=bool(group["bias_correction"]),
                    decoupled=weight_decay and bool(group["decoupled_weight_decay"]),
                    clamp_variance=centered and bool(group["clamp_variance"]))

    def _scalar_args(self, group):
        # Host factors in float64, rounded once to the kernel's type.
        lr = float(group["lr"])
        alpha = float(group["alpha"])
        weight_decay = float(group["weight_decay"])
        return (lr, alpha, 1.0 - alpha, float(group["eps"]), weight_decay,
                float(group["momentum"]), 1.0 - lr * weight_decay, alpha)


RMSprop = RMSProp
