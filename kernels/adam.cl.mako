<%inherit file="multi_tensor.cl.mako"/>
<%doc>
Adam and AdamW, in the operation order of torch.optim's _single_tensor_adam
(torch 2.13, the path torch takes for CPU tensors). fma sits exactly where
torch's CPU kernels fuse: add with alpha, addcmul and lerp. addcdiv, mul and
div by a scalar are not fused there and are not fused here.

Flags: track_stats (the skeleton's; update() then assigns effective_lr),
maximize, weight_decay (coupled: g += wd * p), decoupled (AdamW:
p *= 1 - lr * wd; only with weight_decay), amsgrad (booleans).
Scalars (computed on the host in float64, then rounded to the state type as
torch rounds Python scalars): one_minus_beta1, beta2, one_minus_beta2, eps,
weight_decay_value, decay_factor (1 - lr * wd). Factor arguments (factor_t):
factor_lr, factor_beta1, factor_beta2, from which factors() computes this
tensor's neg_step_size (-lr / (1 - beta1^t)) and bias_correction2_sqrt
((1 - beta2^t) ** 0.5) as torch does on Python floats, rounded once.
</%doc>
<%def name="factors()">
    const ${factor_t} step = (${factor_t})t;
    const ${state_t} neg_step_size =
        (${state_t})(-(factor_lr / (1 - pow(factor_beta1, step))));
    const ${state_t} bias_correction2_sqrt = (${state_t})sqrt(1 - pow(factor_beta2, step));
</%def>
<%def name="update(T)">
% if maximize:
        g = -g;
% endif
% if weight_decay and decoupled:
        p = p * decay_factor;
% elif weight_decay:
        g = netcl_fma((${T})weight_decay_value, p, g);
% endif
        // exp_avg.lerp_(g, 1 - beta1): ATen picks the form by the weight's size.
        if (one_minus_beta1 < 0.5)
            exp_avg = netcl_fma((${T})one_minus_beta1, g - exp_avg, exp_avg);
        else
            exp_avg = netcl_fma((${T})(one_minus_beta1 - 1), g - exp_avg, g);
        // exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        exp_avg_sq = netcl_fma(one_minus_beta2 * g, g, exp_avg_sq * beta2);
% if amsgrad:
        // torch.maximum: NaN in exp_avg_sq propagates.
        max_exp_avg_sq = (max_exp_avg_sq >= exp_avg_sq) ? max_exp_avg_sq : exp_avg_sq;
        ${T} denom = netcl_sqrt(max_exp_avg_sq) / bias_correction2_sqrt + eps;
% else:
        ${T} denom = netcl_sqrt(exp_avg_sq) / bias_correction2_sqrt + eps;
% endif
% if track_stats:
        // The factor that multiplies exp_avg.
        ${T} effective_lr = -neg_step_size / denom;
% endif
        // p.addcdiv_(exp_avg, denom, value=-step_size)
        p = p + (neg_step_size * exp_avg) / denom;
</%def>
