<%inherit file="multi_tensor.cl.mako"/>
<%doc>
RMSProp, in torch.optim.RMSprop's operation order. The fma calls sit exactly
where torch's CPU kernels fuse (add with alpha, addcmul, lerp), so float32
results agree with torch bit for bit on almost every element.

Flags: maximize, weight_decay, centered, momentum (booleans).
Scalars: lr, alpha, one_minus_alpha, eps, weight_decay_value, momentum_value.
</%doc>
<%def name="update(T)">
% if maximize:
        g = -g;
% endif
% if weight_decay:
        g = fma((${T})weight_decay_value, p, g);
% endif
        square_avg = fma(one_minus_alpha * g, g, square_avg * alpha);
% if centered:
        // torch's lerp: the form it picks depends on whether the weight is below 1/2.
        if (one_minus_alpha < 0.5)
            grad_avg = fma((${T})one_minus_alpha, g - grad_avg, grad_avg);
        else
            grad_avg = fma((${T})(one_minus_alpha - 1), g - grad_avg, g);
        ${T} avg = sqrt(fma(-grad_avg, grad_avg, square_avg)) + eps;
% else:
        ${T} avg = sqrt(square_avg) + eps;
% endif
% if momentum:
        momentum_buffer = momentum_buffer * momentum_value + g / avg;
        p = fma((${T})(-lr), momentum_buffer, p);
% else:
        p = p + (-lr * g) / avg;
% endif
</%def>
