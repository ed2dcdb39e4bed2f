<%doc>
Kernels of netcl.amp (GradScaler) and netcl.nn.utils (gradient clipping).

One program per kernel: the flag `kernel` names the def to emit and the other
flags are that def's arguments.

Multi-tensor passes over gradients (launched over the chunk tables of
netcl.optim._engine.plan: every work-group takes one row (slot, start, count,
owner) and the work-items of the group stride through it together):
  unscale_grads  g *= inv_scale in place, inv_scale = (float)(1/(double)scale)
                 read from the scaler's device state, as torch's
                 _amp_foreach_non_finite_check_and_unscale_; per row, a partial
                 that is NaN exactly when the row holds a NaN or an infinity
                 (the sum of v - v over the row: 0 for every finite v).
  grad_norm      per row, the partial reduction of a p-norm: sum of squares
                 (norm "2"), of |g| ("1"), of |g|^p ("p"), the largest ("inf")
                 or smallest ("-inf") |g| with NaN propagating, or the count of
                 non-zero elements ("0").
  mul_grads      g *= clamp(max_norm / (total + 1e-6), max=1), computed by every
                 work-item from the total norm on the device exactly as torch
                 computes it: (1 / (total + 1e-6)) * max_norm in the total's type
                 (Python's `float / tensor` is `tensor.reciprocal() * float`).
  clamp_grads    g = min(max(g, lo), hi), NaN kept (torch's clamp_min_, clamp_max_).
Each work-group writes its own partial (partials[row_base + group]); nothing
is written by two work-items.

One-work-item kernels:
  unscale_done   or-s the partials into the optimizer's control[FOUND_INF]
                 (written 1 or 0) and, when set, the scaler's found-inf flag.
  norm_done      combines the partials into the total norm, stored in the
                 total's type.
  scaler_update  torch's _amp_update_scale_ on the scaler's device state
                 [scale, growth_tracker, found_inf], then found_inf = 0.
  scaler_set     sets the scale (from a value or a device array), optionally
                 the growth tracker, optionally resets found_inf.
Elementwise:
  scale_outputs  out = x * scale (the scaler's `scale(outputs)`).

Flags: kernel, and per kernel —
  multi-tensor passes: op (unscale, norm, mul, clamp), param_t, acc_t (double
    where the device has it), vector_width, n_tensors, aligned, local_size,
    declarations (built on the host by netcl.nn.utils._foreach_arguments),
    norm (for op norm), norm_t (for op mul: the total norm's type)
  unscale_done: acc_t
  norm_done: acc_t, norm, norm_t
  scaler_update: acc_t
  scaler_set: src (value, float or double)
  scale_outputs: T
</%doc>
<%!
    import numpy as np
    from netcl.optim._engine import ROW, FOUND_INF, SCALE, GROWTH_TRACKER, SCALER_FOUND_INF

    def eps_literal(t):
        # torch adds the Python float 1e-6 in the total's dtype: for float32
        # the double 1e-6 rounded to float, written exactly (hex) so that no
        # double literal appears in a float-only program.
        if t == "double":
            return "1e-6"
        return float(np.float32(1e-6)).hex() + "f"
%>
<%page args="kernel, **flags"/>
<%namespace name="math" file="inline_math.cl.mako"/>
// Rounding follows the formulas as written: no contraction into fma.
#pragma OPENCL FP_CONTRACT OFF
${getattr(self, kernel)(**flags)}

<%def name="fp64(*types)">
% if "double" in types:
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
% endif
</%def>

## ----------------------------------------------------------- reductions
<%def name="combine(norm, x, y)">\
% if norm == "inf":
(((${y}) > (${x}) || isnan(${y})) ? (${y}) : (${x}))\
% elif norm == "-inf":
(((${y}) < (${x}) || isnan(${y})) ? (${y}) : (${x}))\
% else:
((${x}) + (${y}))\
% endif
</%def>

<%def name="identity(norm, t)">\
% if norm == "-inf":
(${t})INFINITY\
% else:
(${t})0\
% endif
</%def>

## The multi-tensor pass shared by unscale_grads, grad_norm, mul_grads and clamp_grads.
<%def name="foreach(name, op, param_t, acc_t, vector_width, n_tensors, aligned, local_size,
                    declarations, norm=None, norm_t=None)">
<%
    W = vector_width
    def vec(t):
        return t if W == 1 else "%s%d" % (t, W)
    TV, AV = vec(param_t), vec(acc_t)
    # How partials combine: unscale sums (v - v), the norms as their kind says.
    kind = norm if op == "norm" else "sum"
    reduces = op in ("unscale", "norm")
    writes = op != "norm"

    def convert(value, width):
        if param_t == acc_t:
            return value
        if width == 1:
            return "(%s)(%s)" % (acc_t, value)
        return "convert_%s%d(%s)" % (acc_t, width, value)

    def load(width):
        if width == 1:
            return "g_ptr[at]"
        if aligned:
            return "((__global %s%s *)g_ptr)[i]" % ("const " if not writes else "", TV)
        return "vload%d(i, g_ptr)" % W

    def store(width):
        if width == 1:
            return "g_ptr[at] = v;"
        if aligned:
            return "((__global %s *)g_ptr)[i] = v;" % TV
        return "vstore%d(v, i, g_ptr);" % W
%>
${fp64(param_t, acc_t, norm_t)}
## Only the reductions compute in acc_t (netcl.nn.utils sizes W to fit it).
${math.declare(sorted({param_t, acc_t} if reduces else {param_t}), sorted({1, W}))}
__kernel void ${name}(
    ${",\n    ".join(declarations)})
{
    const uint row = ${ROW} * get_group_id(0);
    const uint k = chunks[row];
    const uint start = chunks[row + 1];
    const uint count = chunks[row + 2];
    __global ${"" if writes else "const "}${param_t} *g_ptr;
    switch (k) {
% for k in range(n_tensors):
    case ${k}:
        g_ptr = g${k} + g${k}_offset + start;
        break;
% endfor
    default:
        return;
    }
% if op == "unscale":
    // torch: inv_scale = scale.double().reciprocal().float()
    const float inv_scale = (float)(1 / (${acc_t})scaler_state[${SCALE}]);
    const ${param_t} factor = (${param_t})inv_scale;
% elif op == "mul":
    // torch: clip_coef = max_norm / (total_norm + 1e-6), i.e.
    // (total_norm + 1e-6).reciprocal() * max_norm; clamp(clip_coef, max=1.0)
    // (NaN stays NaN); grads.mul_(clip_coef) in the gradients' type.
    ${norm_t} coef = ((${norm_t})1 / (total[total_offset] + ${eps_literal(norm_t)})) * max_norm;
    coef = coef > (${norm_t})1 ? (${norm_t})1 : coef;
    const ${param_t} factor = (${param_t})coef;
% endif
% if reduces:
    ${AV} acc = ${identity(kind, AV)};
% endif
    const uint n_vec = count / ${W};
    for (uint i = get_local_id(0); i < n_vec; i += get_local_size(0)) {
% if W == 1:
        const uint at = i;
% endif
        ${element(op, kind, TV, AV, W, load(W), store(W), convert, "acc")}
    }
% if W > 1:
    for (uint at = n_vec * ${W} + get_local_id(0); at < count; at += get_local_size(0)) {
        ${element(op, kind, param_t, acc_t, 1, load(1), store(1), convert, "acc.s0")}
    }
% endif
% if reduces:
    ${acc_t} sum = ${"acc" if W == 1 else "acc.s0"};
  % for j in range(1, W):
    sum = ${combine(kind, "sum", "acc.s%x" % j)};
  % endfor
  % if local_size > 1:
    __local ${acc_t} scratch[${local_size}];
    const uint lid = get_local_id(0);
    scratch[lid] = sum;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (uint stride = ${local_size // 2}; stride > 0; stride >>= 1) {
        if (lid < stride)
            scratch[lid] = ${combine(kind, "scratch[lid]", "scratch[lid + stride]")};
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (lid == 0)
        partials[row_base + get_group_id(0)] = scratch[0];
  % else:
    partials[row_base + get_group_id(0)] = sum;
  % endif
% endif
}
</%def>

## One element (width 1) or one vector of the pass: v is read, maybe
## reduced into acc, maybe rewritten.
<%def name="element(op, kind, T, A, width, load, store, convert, acc)">
<%
    def select(a, b, cond):
        # cond ? b : a, elementwise (vectors need select, scalars a ternary)
        if width == 1:
            return "((%s) ? (%s) : (%s))" % (cond, b, a)
        return "netcl_select(%s, %s, %s)" % (a, b, cond)
%>\
{
            ${T} v = ${load};
% if op == "unscale":
            ${acc} += ${convert("v - v", width)};
            v = v * factor;
            ${store}
% elif op == "mul":
            v = v * factor;
            ${store}
% elif op == "clamp":
            v = ${select("v", "(%s)lo" % T, "v < (%s)lo" % T)};
            v = ${select("v", "(%s)hi" % T, "v > (%s)hi" % T)};
            ${store}
% else:
            const ${A} a = netcl_fabs(${convert("v", width)});
  % if kind == "2":
            ${acc} += a * a;
  % elif kind == "1":
            ${acc} += a;
  % elif kind == "p":
            ${acc} += pow(a, (${A})p);
  % elif kind == "0":
            ${acc} += ${select("(%s)0" % A, "(%s)1" % A, "a != (%s)0" % A)};
  % elif kind == "inf":
            ${acc} = ${select(acc, "a", "(a > %s) | (a != a)" % acc)};
  % elif kind == "-inf":
            ${acc} = ${select(acc, "a", "(a < %s) | (a != a)" % acc)};
  % endif
% endif
        }
</%def>

<%def name="unscale_grads(**flags)">${foreach("unscale_grads", "unscale", **flags)}</%def>
<%def name="grad_norm(**flags)">${foreach("grad_norm", "norm", **flags)}</%def>
<%def name="mul_grads(**flags)">${foreach("mul_grads", "mul", **flags)}</%def>
<%def name="clamp_grads(**flags)">${foreach("clamp_grads", "clamp", **flags)}</%def>

## ------------------------------------------------------- one work-item
<%def name="unscale_done(acc_t)">
${fp64(acc_t)}
__kernel void unscale_done(__global const ${acc_t} *restrict partials, const uint n_rows,
                           __global float *restrict control, const uint control_offset,
                           __global float *restrict scaler_state)
{
    if (get_global_id(0) != 0)
        return;
    ${acc_t} sum = 0;
    for (uint r = 0; r < n_rows; ++r)
        sum += partials[r];
    // Every partial is 0 or NaN: NaN exactly when a gradient held a NaN or an infinity.
    const int found_inf = isnan(sum);
    control[control_offset + ${FOUND_INF}] = found_inf ? 1.0f : 0.0f;
    if (found_inf)
        scaler_state[${SCALER_FOUND_INF}] = 1.0f;
}
</%def>

<%def name="norm_done(acc_t, norm, norm_t)">
${fp64(acc_t, norm_t)}
__kernel void norm_done(__global const ${acc_t} *restrict partials, const uint n_rows,
% if norm == "0":
                        __global const uint *restrict owners,
% endif
% if norm == "p":
                        const ${acc_t} p,
% endif
                        __global ${norm_t} *restrict total, const uint total_offset)
{
    if (get_global_id(0) != 0)
        return;
% if norm == "0":
    // torch: the 0-"norm" of the per-tensor counts of non-zero elements, i.e.
    // the number of tensors holding a non-zero element. A tensor's rows are
    // consecutive.
    ${acc_t} acc = 0;
    uint last = 0xffffffffu;
    for (uint r = 0; r < n_rows; ++r) {
        if (partials[r] != 0 && owners[r] != last) {
            acc += 1;
            last = owners[r];
        }
    }
% else:
    ${acc_t} acc = ${identity(norm, acc_t)};
    for (uint r = 0; r < n_rows; ++r)
        acc = ${combine(norm, "acc", "partials[r]")};
  % if norm == "2":
    acc = sqrt(acc);
  % elif norm == "p":
    acc = pow(acc, 1 / p);
  % endif
% endif
    total[total_offset] = (${norm_t})acc;
}
</%def>

<%def name="scaler_update(acc_t)">
${fp64(acc_t)}
// torch's _amp_update_scale_ (CPU): growth and backoff factors are doubles, the
// product is rounded to float; growth never makes the scale infinite.
__kernel void scaler_update(__global float *restrict state, const ${acc_t} growth_factor,
                            const ${acc_t} backoff_factor, const uint growth_interval)
{
    if (get_global_id(0) != 0)
        return;
    const float scale = state[${SCALE}];
    if (state[${SCALER_FOUND_INF}] != 0.0f) {
        state[${SCALE}] = (float)((${acc_t})scale * backoff_factor);
        state[${GROWTH_TRACKER}] = 0.0f;
    } else {
        // The tracker is a float, exact below 2**24 (growth_interval is kept below).
        const float successful = state[${GROWTH_TRACKER}] + 1.0f;
        if (successful == (float)growth_interval) {
            const float grown = (float)((${acc_t})scale * growth_factor);
            if (isfinite(grown))
                state[${SCALE}] = grown;
            state[${GROWTH_TRACKER}] = 0.0f;
        } else {
            state[${GROWTH_TRACKER}] = successful;
        }
    }
    state[${SCALER_FOUND_INF}] = 0.0f;
}
</%def>

<%def name="scaler_set(src)">
${fp64(src)}
__kernel void scaler_set(__global float *restrict state,
% if src == "value":
                         const float scale,
% else:
                         __global const ${src} *restrict source, const uint source_offset,
% endif
                         const float tracker, const uint set_tracker, const uint reset_found_inf)
{
    if (get_global_id(0) != 0)
        return;
% if src == "value":
    state[${SCALE}] = scale;
% else:
    state[${SCALE}] = (float)source[source_offset];
% endif
    if (set_tracker)
        state[${GROWTH_TRACKER}] = tracker;
    if (reset_found_inf)
        state[${SCALER_FOUND_INF}] = 0.0f;
}
</%def>

<%def name="scale_outputs(T)">
${fp64(T)}
__kernel void scale_outputs(__global const ${T} *restrict x, const uint x_offset,
                            __global ${T} *restrict out, const uint n,
                            __global const float *restrict state)
{
    const uint i = get_global_id(0);
    if (i >= n)
        return;
    out[i] = x[x_offset + i] * (${T})state[${SCALE}];
}
</%def>
