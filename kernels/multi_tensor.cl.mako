<%doc>
Skeleton shared by every optimizer family: one launch updates up to
n_tensors tensors in a single fused pass.

Each work-group takes one row (tensor, start, count) of the chunk table built
on the host, so the tensors of a launch may have any lengths. The body runs on
explicit vectors of vector_width elements (PoCL does not vectorise scalar code
that calls sqrt) and then on the scalar tail of the chunk, so no access ever
leaves [start, start + count).

A family template inherits this file and defines update(T): it reads and
assigns the locals p, g and one local per state buffer, all of the compute
type T (a vector type in the body, a scalar type in the tail). The skeleton
loads them before and stores p and the state after.

Inputs: param_t, state_t (OpenCL C scalar types), vector_width, n_tensors,
state_names, scalar_names (hyperparameter arguments, passed as state_t),
tensor_scalar_names (arguments passed once per tensor, e.g. bias corrections
that depend on the tensor's own step count, as state_t),
aligned (every tensor's data and gradient start on a vector boundary, so
whole vectors can be read through vector pointers).

Work-items of a group stride through the chunk together: on a GPU that
coalesces; on a CPU the host launches one work-item per group, which PoCL
runs as a plain loop.
</%doc>
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

    args = []
    for k in range(n_tensors):
        args.append("__global %s *restrict p%d, const uint p%d_offset" % (param_t, k, k))
        args.append("__global const %s *restrict g%d, const uint g%d_offset" % (param_t, k, k))
        for name in state_names:
            args.append("__global %s *restrict %s%d" % (state_t, name, k))
        for name in tensor_scalar_names:
            args.append("const %s %s%d" % (state_t, name, k))
    args.append("__global const uint *restrict chunks")
    for name in scalar_names:
        args.append("const %s %s" % (state_t, name))
%>
<%def name="element(width)">
<% T = vec(state_t) if width > 1 else state_t %>\
        ${T} p = ${load("p_ptr", param_t, state_t, width)};
        ${T} g = ${load("g_ptr", param_t, state_t, width)};
% for name in state_names:
        ${T} ${name} = ${load(name + "_ptr", state_t, state_t, width)};
% endfor
${self.update(T)}
        ${store("p", "p_ptr", state_t, param_t, width)}
% for name in state_names:
        ${store(name, name + "_ptr", state_t, state_t, width)}
% endfor
</%def>
// Rounding must follow the update rule as written: contraction into fma is
// only where the template asks for it, as torch's CPU kernels do.
#pragma OPENCL FP_CONTRACT OFF
% if "double" in (param_t, state_t):
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
% endif

__kernel void optimizer_step(
    ${",\n    ".join(args)})
{
    const uint row = 3 * get_group_id(0);
    const uint k = chunks[row];
    const uint start = chunks[row + 1];
    const uint count = chunks[row + 2];

    __global ${param_t} *p_ptr;
    __global const ${param_t} *g_ptr;
% for name in state_names:
    __global ${state_t} *${name}_ptr;
% endfor
% for name in tensor_scalar_names:
    ${state_t} ${name};
% endfor
    switch (k) {
% for k in range(n_tensors):
    case ${k}:
        p_ptr = p${k} + p${k}_offset + start;
        g_ptr = g${k} + g${k}_offset + start;
  % for name in state_names:
        ${name}_ptr = ${name}${k} + start;
  % endfor
  % for name in tensor_scalar_names:
        ${name} = ${name}${k};
  % endfor
        break;
% endfor
    default:
        return;
    }

    const uint n_vec = count / ${W};
    for (uint i = get_local_id(0); i < n_vec; i += get_local_size(0)) {
        const uint at = i * ${W};
${element(W)}
    }
% if W > 1:
    for (uint at = n_vec * ${W} + get_local_id(0); at < count; at += get_local_size(0)) {
${element(1)}
    }
% endif
}
