<%inherit file="multi_tensor.cl.mako"/>
<%doc>
RMSProp, in the operation order of netcl's generic rule (netcl_rmsprop_step
in tests/rmsprop_reference.py), which with every option at its default is
torch.optim.RMSprop's. The fma calls sit exactly where torch's CPU kernels
fuse (add with alpha, addcmul, lerp), so float32 results agree with torch bit
for bit on almost every element; everything else is rounded step by step.

Flags (booleans): track_stats (the skeleton's; update() then assigns
effective_lr = lr / avg, the factor that multiplies g), maximize, weight_decay, centered, momentum, eps_in_sqrt,
bias_correction, decoupled (only with weight_decay), clamp_variance (only
with centered), lr_in_momentum and nesterov (only with momentum). With the
last six off, the body is torch's.
Scalars: lr, alpha, one_minus_alpha, eps, weight_decay_value, momentum_value,
decay_factor (1 - lr * wd), computed on the host in float64; factor_alpha
(factor_t), from which factors() computes this tensor's bias_correction_value
(1 - alpha^t) with bias_correction.
</%doc>
<%def name="factors()">
% if bias_correction:
    const ${state_t} bias_correction_value =
        (${state_t})(1 - pow(factor_alpha, (${factor_t})t));
% endif
</%def>
<%def name="update(T)">
<%
    # The averages as the denominator reads them: bias-corrected copies or the
    # stored state itself.
    v = "v_hat" if bias_correction else "square_avg"
    m = "m_hat" if bias_correction else "grad_avg"
    s = "netcl_fma(-%s, %s, %s)" % (m, m, v) if centered else v
%>\
% if maximize:
        g = -g;
% endif
% if weight_decay and decoupled:
        p = p * decay_factor;
% elif weight_decay:
        g = netcl_fma((${T})weight_decay_value, p, g);
% endif
        square_avg = netcl_fma(one_minus_alpha * g, g, square_avg * alpha);
% if centered:
        // torch's lerp: the form it picks depends on whether the weight is below 1/2.
        if (one_minus_alpha < 0.5)
            grad_avg = netcl_fma((${T})one_minus_alpha, g - grad_avg, grad_avg);
        else
            grad_avg = netcl_fma((${T})(one_minus_alpha - 1), g - grad_avg, g);
% endif
% if bias_correction:
        // The stored averages stay uncorrected.
        ${T} v_hat = square_avg / bias_correction_value;
  % if centered:
        ${T} m_hat = grad_avg / bias_correction_value;
  % endif
% endif
% if clamp_variance:
        // Negative (rounding) variance -> 0; written as a comparison so NaN stays NaN.
        ${T} s = ${s};
        s = (s < (${T})0) ? (${T})0 : s;
<% s = "s" %>\
% endif
% if eps_in_sqrt:
        ${T} avg = netcl_sqrt(${s} + eps);
% else:
        ${T} avg = netcl_sqrt(${s}) + eps;
% endif
% if track_stats:
        ${T} effective_lr = lr / avg;
% endif
% if momentum:
<% u = "(lr * g) / avg" if lr_in_momentum else "g / avg" %>\
  % if nesterov:
        ${T} u = ${u};
<% u = "u" %>\
  % endif
        momentum_buffer = momentum_buffer * momentum_value + ${u};
<% q = "momentum_value * momentum_buffer + u" if nesterov else "momentum_buffer" %>\
  % if lr_in_momentum:
        p = p - (${q});
  % else:
        p = netcl_fma((${T})(-lr), ${q}, p);
  % endif
% else:
        p = p + (-lr * g) / avg;
% endif
</%def>
