<%doc>
Training statistics accumulated inside an update pass (track_stats): the
values are already in registers, so they cost arithmetic, not memory
traffic. Composable defs the skeleton (multi_tensor.cl.mako) calls:

  declare(V, S, ...)    the accumulators: one set of vector type V for the
                        body, one of scalar type S for the tail; the
                        work-group's scratch memory
  gradient(T, width)    squares of g (after the unscale, before clipping),
                        its zeros, and a flag for non-finite elements
  finish_counts(W)      the zero count; the flag's lanes added into ss_check
  nonfinite(T, width)   counts non-finite elements (a second loop over g,
                        run only by a work-item whose flag is NaN)
  before(T, width)      keeps p before the update, its squares
  after(T, width, ...)  squares of the update p - p_before, of the second
                        moment and of the momentum state, and the effective
                        learning rate's min, max and sum (the family's
                        update() assigns effective_lr)
  write(...)            adds the lanes, reduces the work-group through local
                        memory, and writes this row's STATS_COLUMNS (in
                        netcl.optim._engine's order) to stats_out in factor_t

Counts are kept in the float accumulators: exact while below 2**24 (a row
holds at most 16384 elements). Comparisons of vectors give -1 for true, of
scalars 1, hence count().
</%doc>
<%!
    from netcl.optim._engine import STATS_COLUMNS

    SUMS = [c for c in STATS_COLUMNS if c not in ("lr_min", "lr_max")]

    def count(condition, T, width):
        if width > 1:
            return "convert_%s(-(%s))" % (T, condition)
        return "(%s)(%s)" % (T, condition)

    def acc(name, width):
        return ("sv_" if width > 1 else "ss_") + name
%>

<%def name="declare(V, S, W, factor_t, local_size)">
<%
    # Comparison results: -1/0 in the vector's integer type, 1/0 for scalars.
    mask_v = ("long" if S == "double" else "int") + str(W)
%>
% if local_size > 1:
    // OpenCL allows __local variables only at a kernel's outermost scope.
    __local ${factor_t} scratch[${local_size}];
% endif
% for prefix, T, mask in ([("sv_", V, mask_v)] if W > 1 else []) + [("ss_", S, "uint")]:
%   for name in SUMS:
    ${T} ${prefix}${name} = 0;
%   endfor
    ${T} ${prefix}lr_min = INFINITY;
    ${T} ${prefix}lr_max = -INFINITY;
    ${T} ${prefix}check = 0;
    ${mask} ${prefix}zero_mask = 0;
% endfor
</%def>

<%def name="finish_counts(W)">
<%doc>After the loops: the zero count from its masks; true when a
non-finite gradient element was seen (then the caller runs nonfinite()).</%doc>
% if W > 1:
    ss_zeros = ss_zero_mask;
%   for lane in range(W):
    ss_zeros -= sv_zero_mask.s${"%x" % lane};
    ss_check += sv_check.s${"%x" % lane};
%   endfor
% else:
    ss_zeros = ss_zero_mask;
% endif
</%def>

<%def name="gradient(T, width)">
        ${acc("grad_sq", width)} += g * g;
        // g - g is 0 for a finite g and NaN otherwise: the sum flags a
        // non-finite element in one add; nonfinite() counts them only then.
        ${acc("check", width)} += g - g;
        ${acc("zero_mask", width)} += g == (${T})0;
</%def>

<%def name="nonfinite(T, width)">
        ${acc("nonfinite", width)} += ${count("(g - g) != (%s)0" % T, T, width)};
</%def>

<%def name="before(T, width)">
        const ${T} p_before = p;
        ${acc("param_sq", width)} += p * p;
</%def>

<%def name="after(T, width, second_moment, momentum, effective_lr)">
        const ${T} update = p - p_before;
        ${acc("update_sq", width)} += update * update;
% if second_moment:
        ${acc("second_moment_sq", width)} += ${second_moment} * ${second_moment};
% endif
% if momentum:
        ${acc("momentum_sq", width)} += ${momentum} * ${momentum};
% endif
% if effective_lr:
        // Compare-and-select: PoCL does not vectorise fmin/fmax (NaN rules);
        // a NaN never replaces a bound either way.
        ${acc("lr_min", width)} = effective_lr < ${acc("lr_min", width)} ? effective_lr : ${acc("lr_min", width)};
        ${acc("lr_max", width)} = effective_lr > ${acc("lr_max", width)} ? effective_lr : ${acc("lr_max", width)};
        ${acc("lr_sum", width)} += effective_lr;
% endif
</%def>

<%def name="write(W, factor_t, local_size)">
<%
    def combine(name, a, b):
        if name == "lr_min":
            return "fmin(%s, %s)" % (a, b)
        if name == "lr_max":
            return "fmax(%s, %s)" % (a, b)
        return "%s + %s" % (a, b)
%>
    {
        __global ${factor_t} *out = stats_out + ${len(STATS_COLUMNS)} * (stats_row_base + get_group_id(0));
% if local_size > 1:
        const uint lid = get_local_id(0);
% endif
% for j, name in enumerate(STATS_COLUMNS):
        {
            ${factor_t} total = (${factor_t})ss_${name};
%   if W > 1:
%     for lane in range(W):
            total = ${combine(name, "total", "(%s)sv_%s.s%x" % (factor_t, name, lane))};
%     endfor
%   endif
%   if local_size > 1:
            scratch[lid] = total;
            barrier(CLK_LOCAL_MEM_FENCE);
            for (uint stride = ${local_size // 2}; stride > 0; stride >>= 1) {
                if (lid < stride)
                    scratch[lid] = ${combine(name, "scratch[lid]", "scratch[lid + stride]")};
                barrier(CLK_LOCAL_MEM_FENCE);
            }
            if (lid == 0)
                out[${j}] = scratch[0];
            barrier(CLK_LOCAL_MEM_FENCE);
%   else:
            out[${j}] = total;
%   endif
        }
% endfor
    }
</%def>
