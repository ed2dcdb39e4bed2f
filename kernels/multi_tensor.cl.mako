<%doc>
Skeleton shared by every optimizer family: one launch updates up to
n_tensors tensors in a single fused pass.

Each work-group takes one row (tensor slot k, start, count, parameter index)
of the chunk table built on the host, so the tensors of a launch may have any
lengths. The body runs on explicit vectors of vector_width elements (PoCL
does not vectorise scalar code that calls sqrt) and then on the scalar tail of
the chunk, so no access ever leaves [start, start + count).

A family template inherits this file and defines
- factors(): per-tensor values computed from t, the tensor's update count
  including this one (read from the device-resident step counts), in
  factor_t (double where the device has it, as torch computes them on Python
  floats), e.g. Adam's bias corrections;
- update(T): reads and assigns the locals p, g and one local per state
  buffer, all of the compute type T (a vector type in the body, a scalar type
  in the tail). The skeleton loads them before and stores p and the state
  after.

Inputs: param_t, state_t, factor_t (OpenCL C scalar types), vector_width,
n_tensors, state_names, declarations (the kernel's parameter list, built on
the host by netcl.optim._engine.step_arguments, the one place that defines
the argument layout), aligned (every tensor's data and gradient start on a
vector boundary, so whole vectors can be read through vector pointers),
guard (the step reads control: control[0] != 0 skips the whole step, as a
non-finite gradient does; g is multiplied by control[1], the gradient
unscale factor, then by control[2], the clipping coefficient — two roundings,
as torch's GradScaler.unscale_ followed by clip_grad_norm_).

track_stats (with second_moment, momentum_state: the state names whose
squares are summed, or None; effective_lr: the family's update() assigns
the local effective_lr; local_size: work-items per group) also accumulates
the step's statistics (track_stats.cl.mako) and writes one row of them per
work-group to stats_out, also on a skipped step (gradient and parameter
statistics only).

Work-items of a group stride through the chunk together: on a GPU that
coalesces; on a CPU the host launches one work-item per group, which PoCL
runs as a plain loop.
</%doc>
<%!
    from netcl.optim._engine import ROW, FOUND_INF, UNSCALE, CLIP_COEF
%>
<%namespace name="stats" file="track_stats.cl.mako"/>
<%
    W = vector_width

    def vec(t):
        return t if W == 1 else "%s%d" % (t, W)

    # Aligned launches read whole vectors through vector pointers: PoCL turns
    # vloadN/vstoreN on scalar pointers into element-wise accesses and loses
    # about half the bandwidth. Unaligned views (odd offsets) keep vloadN.
    def access(ptr, t, width):
        if width == 1:
            return "%s[at]" % ptr
        if aligned:
            return "((__global %s%d *)%s)[i]" % (t, width, ptr)
        return None

    def load(ptr, src_t, dst_t, width):
        value = access(ptr, src_t, width) or "vload%d(0, %s + at)" % (width, ptr)
        if src_t == dst_t:
            return value
        return "(%s)%s" % (dst_t, value) if width == 1 else "convert_%s%d(%s)" % (dst_t, width, value)

    def store(value, ptr, src_t, dst_t, width):
        if src_t != dst_t:
            value = "(%s)%s" % (dst_t, value) if width == 1 else \
                "convert_%s%d_rte(%s)" % (dst_t, width, value)
        target = access(ptr, dst_t, width)
        if target is None:
            return "vstore%d(%s, 0, %s + at);" % (width, value, ptr)
        return "%s = %s;" % (target, value)

%>
<%def name="element(width)">
<% T = vec(state_t) if width > 1 else state_t %>\
        ${T} p = ${load("p_ptr", param_t, state_t, width)};
        ${T} g = ${load("g_ptr", param_t, state_t, width)};
% for name in state_names:
        ${T} ${name} = ${load(name + "_ptr", state_t, state_t, width)};
% endfor
% if guard:
        g = g * unscale;
% endif
% if track_stats:
${stats.gradient(T, width)}
${stats.before(T, width)}
% endif
% if guard:
        g = g * clip_coef;
% endif
${self.update(T)}
% if track_stats:
${stats.after(T, width, second_moment, momentum_state, effective_lr)}
% endif
        ${store("p", "p_ptr", state_t, param_t, width)}
% for name in state_names:
        ${store(name, name + "_ptr", state_t, state_t, width)}
% endfor
</%def>
// Rounding must follow the update rule as written: contraction into fma is
// only where the template asks for it, as torch's CPU kernels do.
#pragma OPENCL FP_CONTRACT OFF
% if "double" in (param_t, state_t, factor_t):
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
% endif

<%def name="skipped_element(width)">
<% T = vec(state_t) if width > 1 else state_t %>\
        ${T} p = ${load("p_ptr", param_t, state_t, width)};
        ${T} g = ${load("g_ptr", param_t, state_t, width)};
        g = g * unscale;
${stats.gradient(T, width)}
${stats.before(T, width)}
</%def>
<%def name="count_nonfinite(width)">
<% T = vec(state_t) if width > 1 else state_t %>\
        ${T} g = ${load("g_ptr", param_t, state_t, width)};
% if guard:
        g = g * unscale;
% endif
${stats.nonfinite(T, width)}
</%def>
<%def name="finish_stats()">
${stats.finish_counts(W)}
    if (isnan(ss_check)) {  // rare: count the non-finite elements
${loops(count_nonfinite)}
    }
${stats.write(W, factor_t, local_size)}
</%def>
<%def name="loops(body)">
    const uint n_vec = count / ${W};
    for (uint i = get_local_id(0); i < n_vec; i += get_local_size(0)) {
        const uint at = i * ${W};
${body(W)}
    }
% if W > 1:
    for (uint at = n_vec * ${W} + get_local_id(0); at < count; at += get_local_size(0)) {
${body(1)}
    }
% endif
</%def>
<%def name="factors()"></%def>
__kernel void optimizer_step(
    ${",\n    ".join(declarations)})
{
    const uint row = ${ROW} * get_group_id(0);
    const uint k = chunks[row];
    const uint start = chunks[row + 1];
    const uint count = chunks[row + 2];
% if guard:
    // Decided on the device by this step's reduction pass: a non-finite
    // gradient anywhere skips the whole step.
    const bool skipped = control[${FOUND_INF}] != 0.0f;
  % if not track_stats:
    if (skipped)
        return;
  % endif
    const ${state_t} unscale = (${state_t})control[${UNSCALE}];
    const ${state_t} clip_coef = (${state_t})control[${CLIP_COEF}];
% endif
    // This tensor's update count, this update included.
    const uint t = steps[chunks[row + 3]] + 1;
${self.factors()}
    __global ${param_t} *p_ptr;
    __global const ${param_t} *g_ptr;
% for name in state_names:
    __global ${state_t} *${name}_ptr;
% endfor
    switch (k) {
% for k in range(n_tensors):
    case ${k}:
        p_ptr = p${k} + p${k}_offset + start;
        g_ptr = g${k} + g${k}_offset + start;
  % for name in state_names:
        ${name}_ptr = ${name}${k} + s${k}_offset + start;
  % endfor
        break;
% endfor
    default:
        return;
    }
% if track_stats:
${stats.declare(vec(state_t), state_t, W, factor_t, local_size)}
% endif
% if guard and track_stats:
    if (skipped) {  // nothing changes; the statistics still show why
${loops(skipped_element)}
${finish_stats()}
        return;
    }
% endif
${loops(element)}
% if track_stats:
${finish_stats()}
% endif
}
