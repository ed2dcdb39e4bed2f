<%inherit file="multi_tensor.cl.mako"/>
<%doc>
SGD with momentum, dampening and Nesterov, in the operation order of
torch.optim's _single_tensor_sgd (torch 2.13, the path torch takes for CPU
tensors). fma sits exactly where torch's CPU kernels fuse: add with alpha.

Flags: maximize, weight_decay, momentum, nesterov (booleans; nesterov only
with momentum). State: momentum_buffer (only with momentum).
Scalars: lr, weight_decay_value, momentum_value, one_minus_dampening. A
tensor's first update (t == 1, from the device-resident count torch's SGD
does not expose) takes the momentum buffer as a copy of the gradient, without
dampening, as torch does when it creates the buffer.
</%doc>
<%def name="factors()">
    const bool first_step = t == 1;
</%def>
<%def name="update(T)">
% if maximize:
        g = -g;
% endif
% if weight_decay:
        g = netcl_fma((${T})weight_decay_value, p, g);
% endif
% if momentum:
        if (first_step)
            momentum_buffer = g;
        else
            momentum_buffer = netcl_fma((${T})one_minus_dampening, g, momentum_buffer * momentum_value);
  % if nesterov:
        g = netcl_fma((${T})momentum_value, momentum_buffer, g);
  % else:
        g = momentum_buffer;
  % endif
% endif
        p = netcl_fma((${T})(-lr), g, p);
</%def>
