<%doc>
The kernels around a family's update pass, all of one step:

  grad_stats  the reduction pass (only when the step is guarded: skip_nonfinite,
              max_grad_norm or a GradScaler): per chunk-table row, the sum of
              squares of the gradient, or NaN when the row holds a NaN or
              infinity, so one number per row carries both the norm and the
              found-inf decision. Launched over the same chunk tables as the
              update pass; work-items of a group reduce through local memory.
  finalize    one work-item: sums the rows in order (deterministic), and writes
              the control buffer the update kernels read: found_inf, the
              gradient unscale factor, the clipping coefficient, the total norm.
  advance     one work-item: adds 1 to the step count of every parameter of
              this step, or, when a guarded step was skipped, to the
              skipped-step counter instead (flag guard).

Flags: kernel (which one), and per kernel —
  grad_stats: param_t, param_format, factor_t, vector_width, n_tensors, aligned,
              declarations (from netcl.optim._engine.stats_arguments),
              local_size (work-items per group, a power of two)
  finalize:   factor_t, scaler (a GradScaler's device state is read for the
              scale, and its found-inf flag, shared by every optimizer it
              drives until GradScaler.update() resets it, is or-ed with this
              step's), unscaled (GradScaler.unscale_ already unscaled the
              gradients and wrote its found-inf into control), clip
              (max_grad_norm is set)
</%doc>
<%!
    from netcl.optim._engine import (ROW, G_OFFSET, offsets_stride, FOUND_INF, UNSCALE, CLIP_COEF,
                                     TOTAL_NORM, SCALE, SCALER_FOUND_INF)
%>
<%page args="kernel, **flags"/>
${getattr(self, kernel)(**flags)}

<%def name="grad_stats(param_t, param_format, factor_t, vector_width, n_tensors, aligned, declarations, local_size)">
<%
    W = vector_width
    # float16 and bfloat16 gradients (param_format "half", "bfloat16") are
    # read into float32 and reduced there; param_t is then their buffer type.
    load_t = param_t
    if param_format in ("half", "bfloat16"):
        load_t = "float"

    def load(index, width):
        if param_format == "half":
            return "vload_half(%s, g_ptr)" % index if width == 1 else \
                "vload_half%d(%s, g_ptr)" % (width, index)
        if param_format == "bfloat16":
            if width == 1:
                return "as_float((uint)g_ptr[%s] << 16)" % index
            raw = ("((__global const ushort%d *)g_ptr)[%s]" % (width, index)) if aligned \
                else "vload%d(%s, g_ptr)" % (width, index)
            return "as_float%d(convert_uint%d(%s) << 16)" % (width, width, raw)
        return None
    # Squares accumulate in the gradient's own type along a row (at most
    # 16384 of them: a few ulp) and rows in factor_t; reading in float64
    # would halve the vector width. A non-finite element is flagged
    # separately and turns the row's sum into NaN, so a sum that merely
    # overflows float32 stays an infinite norm (as torch's) and not a
    # found-inf.
    V = load_t if W == 1 else "%s%d" % (load_t, W)

    def vector_load(index):
        if load(index, W):
            return load(index, W)
        if W == 1:
            return "g_ptr[%s]" % index
        if aligned:
            return "((__global const %s%d *)g_ptr)[%s]" % (param_t, W, index)
        return "vload%d(%s, g_ptr)" % (W, index)
    body_load = vector_load("i")
    tail_load = load("at", 1) or "g_ptr[at]"
%>
% if "double" in (param_t, factor_t):
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
% endif
__kernel void grad_stats(
    ${",\n    ".join(declarations)})
{
    const uint row = ${ROW} * get_group_id(0);
    const uint k = chunks[row];
    const uint start = chunks[row + 1];
    const uint count = chunks[row + 2];
    __global const ${param_t} *g_ptr;
    switch (k) {
% for k in range(n_tensors):
    case ${k}:
        g_ptr = g${k};
        break;
% endfor
    default:
        return;
    }
    g_ptr += offsets[${offsets_stride(0)} * k + ${G_OFFSET}] + start;
    // v - v is exactly 0 for a finite v and NaN for a NaN or infinity (no
    // contraction or fast math here), so `check` turns NaN if any element is
    // not finite: cheaper than isnan/isinf, which PoCL does not vectorise.
    ${V} acc = 0, check = 0;
    const uint n_vec = count / ${W};
% if local_size == 1:
    // One work-item reads the row's four quarters side by side into four
    // partial sums: one sequential stream per core reads at about half the
    // memory's speed on the CPUs measured (four: 33-37 GB/s against 17-19 on
    // 2 Ice Lake cores), and one addition chain would bound the loop too.
    ${V} acc1 = 0, acc2 = 0, acc3 = 0;
    const uint quarter = n_vec / 4;
    for (uint i = 0; i < quarter; ++i) {
%   for j, a in enumerate(("acc", "acc1", "acc2", "acc3")):
        const ${V} v${j} = ${vector_load("i + %d * quarter" % j if j else "i")};
        ${a} += v${j} * v${j};
%   endfor
        check += ((v0 - v0) + (v1 - v1)) + ((v2 - v2) + (v3 - v3));
    }
    for (uint i = 4 * quarter; i < n_vec; ++i) {
        const ${V} v = ${body_load};
        acc += v * v;
        check += v - v;
    }
    acc = (acc + acc1) + (acc2 + acc3);
% else:
    for (uint i = get_local_id(0); i < n_vec; i += get_local_size(0)) {
        const ${V} v = ${body_load};
        acc += v * v;
        check += v - v;
    }
% endif
    ${factor_t} sum = 0;
    ${load_t} row_check = 0;
% if W > 1:
%   for j in range(W):
    sum += (${factor_t})acc.s${"%x" % j};
    row_check += check.s${"%x" % j};
%   endfor
    for (uint at = n_vec * ${W} + get_local_id(0); at < count; at += get_local_size(0)) {
        const ${load_t} v = ${tail_load};
        sum += (${factor_t})(v * v);
        row_check += v - v;
    }
% else:
    sum = acc;
    row_check = check;
% endif
    if (isnan(row_check))
        sum = NAN;
% if local_size > 1:
    __local ${factor_t} scratch[${local_size}];
    const uint lid = get_local_id(0);
    scratch[lid] = sum;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (uint stride = ${local_size // 2}; stride > 0; stride >>= 1) {
        if (lid < stride)
            scratch[lid] += scratch[lid + stride];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (lid == 0)
        partials[row_base + get_group_id(0)] = scratch[0];
% else:
    partials[row_base + get_group_id(0)] = sum;
% endif
}
</%def>

<%def name="finalize(factor_t, scaler, unscaled, clip)">
% if factor_t == "double":
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
% endif
__kernel void finalize(__global const ${factor_t} *restrict partials, const uint n_rows,
                       __global float *restrict control,
                       __global float *restrict scaler_state,
                       const float max_norm)
{
    if (get_global_id(0) != 0)
        return;
    ${factor_t} sum = 0;
    for (uint r = 0; r < n_rows; ++r)
        sum += partials[r];
    // A non-finite gradient made its row NaN; an overflowing sum is only +inf.
    int found_inf = isnan(sum);
% if scaler and unscaled:
    // GradScaler.unscale_ already unscaled the gradients and checked them.
    found_inf = found_inf || control[${FOUND_INF}] != 0.0f;
    const float inv_scale = 1.0f;
% elif scaler:
    // torch: inv_scale = scale.double().reciprocal().float()
    const float inv_scale = (float)(1 / (${factor_t})scaler_state[${SCALE}]);
% else:
    const float inv_scale = 1.0f;
% endif
    const float total = (float)(sqrt(sum) * inv_scale);
% if clip:
    // torch.nn.utils.clip_grad_norm_: max_norm / (total + 1e-6), which torch
    // evaluates as (total + 1e-6).reciprocal() * max_norm, clamped at 1 (NaN kept).
    float coef = (1.0f / (total + 1e-6f)) * max_norm;
    coef = coef > 1.0f ? 1.0f : coef;
% else:
    const float coef = 1.0f;
% endif
    control[${FOUND_INF}] = found_inf ? 1.0f : 0.0f;
    control[${UNSCALE}] = inv_scale;
    control[${CLIP_COEF}] = coef;
    control[${TOTAL_NORM}] = total;
% if scaler:
    if (found_inf)
        scaler_state[${SCALER_FOUND_INF}] = 1.0f;
% endif
}
</%def>

<%def name="advance(guard)">
__kernel void advance(__global uint *restrict steps, __global const uint *restrict active,
                      const uint n_active, __global const float *restrict control,
                      __global uint *restrict skipped)
{
    if (get_global_id(0) != 0)
        return;
% if guard:
    // Only a guarded step's finalize decides found-inf: an unguarded step
    // never reads control (GradScaler.unscale_ may have left a value there).
    if (control[${FOUND_INF}] != 0.0f) {
        skipped[0] += 1;
        return;
    }
% endif
    for (uint i = 0; i < n_active; ++i)
        steps[active[i]] += 1;
}
</%def>
