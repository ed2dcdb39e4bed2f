<%doc>
Skeleton shared by every optimizer family: one launch updates up to
n_tensors tensors in a single fused pass.

Each work-group takes one row (tensor slot k, start, count, parameter index)
of the chunk table built on the host, so the tensors of a launch may have any
lengths; start counts from where slot k's arrays begin in their buffers (the
launch's offsets buffer). The body runs on explicit vectors of vector_width elements (PoCL
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

Inputs: param_t (the C type parameter and gradient buffers are declared
with), state_t (the compute type: the locals, the hyperparameter scalars),
factor_t (OpenCL C scalar types), param_format and state_formats (one per
state name): how each buffer is stored — "float", "double", "half" or
"bfloat16" (see netcl.optim._precision); master_weights (state master_param,
float32, is the parameter; p receives its rounded value), kahan (state
kahan_comp, in the parameter's format, compensates the write-back),
stochastic (the write-back of p rounds stochastically with the uint argument
seed; see netcl_hash below), vector_width,
n_tensors, state_names, shared_state (one buffer per state name for every
tensor of the launch, each tensor's state at its offset), declarations (the kernel's parameter list, built on
the host by netcl.optim._engine.step_arguments, the one place that defines
the argument layout), aligned (every tensor's data and gradient start on a
vector boundary, so whole vectors can be read through vector pointers),
guard (the step reads control: control[0] != 0 skips the whole step, as a
non-finite gradient does; g is multiplied by control[1], the gradient
unscale factor, then by control[2], the clipping coefficient — two roundings,
as torch's GradScaler.unscale_ followed by clip_grad_norm_).

local_size: work-items per group (1 on CPU layouts; given with
track_stats or int8 state, else 1). track_stats (with second_moment,
momentum_state: the state names whose squares are summed, or None;
effective_lr: the family's update() assigns the local effective_lr) also
accumulates the step's statistics (track_stats.cl.mako) and writes one row
of them per work-group to stats_out, also on a skipped step (gradient and
parameter statistics only).

Builtins called per element go through inline_math.cl.mako (netcl_fma,
netcl_select, ...): on PoCL's CPU devices OpenCL's own are function calls.

Work-items of a group stride through the chunk together: on a GPU that
coalesces; on a CPU the host launches one work-item per group, which PoCL
runs as a plain loop.
</%doc>
<%!
    from netcl.optim._engine import (ROW, P_OFFSET, G_OFFSET, STATE_OFFSETS, offsets_stride,
                                     FOUND_INF, UNSCALE, CLIP_COEF)
    from netcl.optim import _quantize
%>
<%namespace name="stats" file="track_stats.cl.mako"/>
<%namespace name="math" file="inline_math.cl.mako"/>
<%
    W = vector_width

    def vec(t, width=W):
        return t if width == 1 else "%s%d" % (t, width)

    # Aligned launches read whole vectors through vector pointers: PoCL turns
    # vloadN/vstoreN on scalar pointers into element-wise accesses and loses
    # about half the bandwidth. Unaligned views (odd offsets) keep vloadN.
    def access(ptr, t, width):
        if width == 1:
            return "%s[at]" % ptr
        if aligned:
            return "((__global %s%d *)%s)[i]" % (t, width, ptr)
        return None

    # Storage formats (netcl.optim._precision): "float" and "double" are
    # loaded as they are (converted when the compute type differs); "half"
    # through vload_half/vstore_half_rte, core OpenCL that needs no
    # cl_khr_fp16; "bfloat16" is a ushort holding a float32's upper half.
    def load(ptr, fmt, dst_t, width):
        if fmt == "half":
            return "vload_half(at, %s)" % ptr if width == 1 else \
                "vload_half%d(0, %s + at)" % (width, ptr)
        if fmt == "bfloat16":
            raw = access(ptr, "ushort", width) or "vload%d(0, %s + at)" % (width, ptr)
            return "netcl_from_bf16_%d(%s)" % (width, raw)
        value = access(ptr, fmt, width) or "vload%d(0, %s + at)" % (width, ptr)
        if fmt == dst_t:
            return value
        return "(%s)%s" % (dst_t, value) if width == 1 else "convert_%s%d(%s)" % (dst_t, width, value)

    # Stores round to nearest-even; stochastic=True rounds the low-precision
    # formats up or down by the element's random bits (`rand`).
    def store(value, ptr, fmt, src_t, width, stochastic=False):
        if fmt == "half":
            if stochastic:
                value = "netcl_half_sr_%d(%s, rand)" % (width, value)
            return "vstore_half_rte(%s, at, %s);" % (value, ptr) if width == 1 else \
                "vstore_half%d_rte(%s, 0, %s + at);" % (width, value, ptr)
        if fmt == "bfloat16":
            value = "netcl_to_bf16_%s_%d(%s%s)" % (
                "sr" if stochastic else "rte", width, value, ", rand" if stochastic else "")
            fmt = "ushort"
        elif fmt != src_t:
            value = "(%s)%s" % (fmt, value) if width == 1 else \
                "convert_%s%d_rte(%s)" % (fmt, width, value)
        target = access(ptr, fmt, width)
        if target is None:
            return "vstore%d(%s, 0, %s + at);" % (width, value, ptr)
        return "%s = %s;" % (target, value)

    # Low-precision write-back options (netcl.optim._precision).
    low_precision = param_format in ("half", "bfloat16")
    formats = dict(zip(state_names, state_formats))
    # int8 state (netcl.optim._quantize): "codes" buffers index a dynamic
    # map (signed for the names in signed_codes) and "<name>_absmax" holds
    # one scale per block.
    quantized = [n for n in state_names if formats[n] == "codes"]
    family_names = [n for n in state_names if n not in ("master_param", "kahan_comp")
                    and not n.endswith(_quantize.ABSMAX)]

    def qmap(name):
        return "netcl_qmap_signed" if name in signed_codes else "netcl_qmap_unsigned"

    def codes(name, width):
        return "%s_ptr[at]" % name if width == 1 else access(name + "_ptr", "uchar", width) or "vload%d(0, %s_ptr + at)" % (width, name)

    # On CPU layouts the new values of a block's int8 state wait in private
    # arrays (vectors, so whole vectors are stored and loaded) until the
    # block's new scale is known.
    keep_block = local_size == 1

    def kept(name, width):
        if width == W:
            return "%s_block[(at - begin) / %d]" % (name, W)
        return "((float *)%s_block)[at - begin]" % name

    def lanes(width):
        return ["s%x" % j for j in range(width)]
    pointer_types = {"float": "float", "double": "double", "half": "half",
                     "bfloat16": "ushort", "codes": "uchar"}
    formats_used = {param_format} | set(state_formats)
    widths = sorted({1, W})
%>
<%def name="element(width, phase='full')">
<% T = vec(state_t, width) %>\
% if stochastic:
        // This element's random bits: a hash of (seed, tensor, step, index).
        const ${vec("uint", width)} rand = netcl_hash_${width}(netcl_hash_${width}(
            ((${vec("uint", width)})(start + at)${" + lanes" if width > 1 else ""}) * 0x9E3779B9u + sr_key));
% endif
% if master_weights:
        // The float32 master copy is the parameter; on a tensor's first
        // update it starts from the low-precision value.
        ${T} p = first_update ? ${load("p_ptr", param_format, state_t, width)}
                              : ${load("master_param_ptr", "float", state_t, width)};
% else:
        ${T} p = ${load("p_ptr", param_format, state_t, width)};
% endif
        ${T} g = ${load("g_ptr", param_format, state_t, width)};
% for name in family_names:
  % if name in quantized:
        ${T} ${name} = netcl_dequantize_${width}(${qmap(name)}, ${codes(name, width)}) * ${name}_scale;
  % else:
        ${T} ${name} = ${load(name + "_ptr", formats[name], state_t, width)};
  % endif
% endfor
% if kahan:
        const ${T} kahan_base = p;
        ${T} kahan_comp = ${load("kahan_comp_ptr", param_format, state_t, width)};
% endif
% if guard:
        g = g * unscale;
% endif
% if track_stats and phase != "measure":
${stats.gradient(T, width)}
${stats.before(T, width)}
% endif
% if guard:
        g = g * clip_coef;
% endif
${self.update(T)}
% if phase in ("measure", "keep"):
  % for name in quantized:
        ${name}_max${"" if width == 1 else "_lanes"} = netcl_fmax(${name}_max${"" if width == 1 else "_lanes"}, netcl_fabs(${name}));
  % endfor
% endif
% if phase != "measure":
${stores(T, width, phase)}
% endif
</%def>
<%def name="stores(T, width, phase)">
% if track_stats:
${stats.after(T, width, second_moment, momentum_state, effective_lr)}
% endif
% if master_weights:
        ${store("p", "master_param_ptr", "float", state_t, width)}
% endif
% if kahan:
        // Kahan-compensated write-back: the rounding error of this store is
        // carried (in the parameter's dtype) into the next update.
        {
            const ${T} sum = kahan_comp + (p - kahan_base);
            p = kahan_base + sum;
            ${store("p", "p_ptr", param_format, state_t, width)}
            p = ${load("p_ptr", param_format, state_t, width)};
            kahan_comp = sum - (p - kahan_base);
            ${store("kahan_comp", "kahan_comp_ptr", param_format, state_t, width)}
        }
% else:
        ${store("p", "p_ptr", param_format, state_t, width, stochastic)}
% endif
% for name in family_names:
  % if name in quantized and phase == "keep":
        ${kept(name, width)} = ${name};
  % elif name in quantized:
        {
${quantize_store(name, T, width)}
        }
  % else:
        ${store(name, name + "_ptr", formats[name], state_t, width)}
  % endif
% endfor
</%def>
<%def name="helpers(width)">
<%
    F, U, I, S = (vec(t, width) for t in ("float", "uint", "int", "ushort"))
%>\
% if "bfloat16" in formats_used:
inline ${F} netcl_from_bf16_${width}(const ${S} bits)
{
    return as_${F}(convert_${U}(bits) << 16);
}

// float32 -> bfloat16, to nearest-even; a NaN stays a (quiet) NaN.
inline ${S} netcl_to_bf16_rte_${width}(const ${F} x)
{
    const ${U} b = as_${U}(x);
    const ${U} rounded = (b + (${U})0x7FFFu + ((b >> 16) & (${U})1u)) >> 16;
    return convert_${S}(netcl_select(rounded, (b >> 16) | (${U})0x40u, x != x));
}
% endif
% if stochastic:
// murmur3's 32-bit finaliser: a bijection that mixes every input bit.
inline ${U} netcl_hash_${width}(${U} h)
{
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    h *= 0xC2B2AE35u;
    h ^= h >> 16;
    return h;
}
  % if param_format == "bfloat16":
// float32 -> bfloat16, stochastically: add 16 random bits below the cut and
// truncate, so x rounds away from zero with probability (its distance from
// the value below) / (the spacing). NaN stays NaN.
inline ${S} netcl_to_bf16_sr_${width}(const ${F} x, const ${U} rand)
{
    const ${U} b = as_${U}(x);
    const ${U} rounded = (b + (rand >> 16)) >> 16;
    return convert_${S}(netcl_select(rounded, (b >> 16) | (${U})0x40u, x != x));
}
  % elif param_format == "half":
// x rounded stochastically to a value float16 holds exactly (the store's
// round-to-nearest-even then changes nothing): ulp is float16's spacing at
// |x| (2^-24 in its subnormal range); every operation here is exact.
inline ${F} netcl_half_sr_${width}(const ${F} x, const ${U} rand)
{
    const ${I} exponent = convert_${I}((as_${U}(x) >> 23) & (${U})0xFFu) - 127;
    const ${I} ulp_exponent = max(exponent - 10, (${I})-24);
    const ${F} ulp = as_${F}(convert_${U}(ulp_exponent + 127) << 23);
    const ${F} inv_ulp = as_${F}(convert_${U}(127 - ulp_exponent) << 23);
    const ${F} magnitude = fabs(x);
    const ${F} below = trunc(magnitude * inv_ulp) * ulp;
    const ${F} fraction = (magnitude - below) * inv_ulp;
    const ${F} uniform = convert_${F}(rand >> 8) * 0x1p-24f;
    // inf and NaN pass through: below is inf or NaN, fraction NaN.
    return copysign(below + select((${F})0.0f, ulp, uniform < fraction), x);
}
  % endif
% endif
</%def>
// Rounding must follow the update rule as written: contraction into fma is
// only where the template asks for it, as torch's CPU kernels do.
#pragma OPENCL FP_CONTRACT OFF
% if "double" in (param_t, state_t, factor_t):
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
% endif
${math.declare(sorted({state_t, "float"}), widths)}
% for width in widths:
${helpers(width)}
% endfor
% if quantized:
__constant float netcl_qmap_signed[256] = {${_quantize.c_array(_quantize.MAPS[True])}};
__constant float netcl_qmap_unsigned[256] = {${_quantize.c_array(_quantize.MAPS[False])}};
// netcl.optim._quantize.lookup_table: per bucket, below << 16 | last.
% for signed, name in ((True, "signed"), (False, "unsigned")):
__constant uint netcl_qmap_${name}_lookup[${2 * _quantize.BUCKETS}] = {${_quantize.c_uint_array(_quantize.lookup_table(signed))}};
% endfor
  % for width in widths:
${quantize_helpers(width)}
  % endfor
% endif

<%def name="gather(t, table, index, width)">\
% if width == 1:
${table}[${index}]\
% else:
(${vec(t, width)})(${", ".join("%s[%s.%s]" % (table, index, lane) for lane in lanes(width))})\
% endif
</%def>
<%def name="quantize_helpers(width)">
<%
    F, U, I, C = (vec(t, width) for t in ("float", "uint", "int", "uchar"))
%>\
inline ${F} netcl_dequantize_${width}(__constant const float *map, const ${C} codes)
{
    return ${gather("float", "map", "codes", width)};
}

// The index of the map entry nearest to x (the lower one on a tie; a NaN
// gets the code of 0): from x's bucket (upper 16 bits) the number of
// decision thresholds below it, plus one if x's key (low 16 bits, ascending
// with x) is past the bucket's threshold (netcl.optim._quantize).
inline ${C} netcl_quantize_${width}(__constant const uint *lookup, const uint zero, const ${F} x)
{
    const ${U} bits = as_${U}(x);
    const ${U} magnitude = (bits & 0x7FFFFFFFu) >> ${_quantize.BUCKET_SHIFT};
    const ${U} clamped = netcl_select(netcl_select(magnitude, (${U})${_quantize.LOW_BUCKET}u,
                                                  magnitude < ${_quantize.LOW_BUCKET}u),
                                     (${U})${_quantize.HIGH_BUCKET}u, magnitude > ${_quantize.HIGH_BUCKET}u);
    const ${U} negative = as_${U}(as_${I}(bits) >> 31);  // all ones for a negative x
    const ${U} bucket = clamped - ${_quantize.LOW_BUCKET}u + (negative & ${_quantize.BUCKETS}u);
    const ${U} entry = ${gather("uint", "lookup", "bucket", width)};
    const ${U} key = (bits ^ negative) & ${_quantize.KEY_MASK}u;
    const ${U} below = entry >> ${_quantize.BUCKET_SHIFT};
    const ${U} code = netcl_select(below, below + 1u, key > (entry & ${_quantize.KEY_MASK}u));
    return convert_${C}(netcl_select(code, (${U})zero, x != x));
}
</%def>
<%def name="skipped_element(width)">
<% T = vec(state_t, width) %>\
        ${T} p = ${load("p_ptr", param_format, state_t, width)};
        ${T} g = ${load("g_ptr", param_format, state_t, width)};
        g = g * unscale;
${stats.gradient(T, width)}
${stats.before(T, width)}
</%def>
<%def name="count_nonfinite(width)">
<% T = vec(state_t) if width > 1 else state_t %>\
        ${T} g = ${load("g_ptr", param_format, state_t, width)};
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
<%def name="block_loops(phase)">
<% body = requantize if phase == "requantize" else element %>\
% if W > 1:
        for (uint at = begin; at < vector_end; at += ${W}) {
            const uint i = at / ${W};
${body(W, phase)}
        }
% endif
        for (uint at = ${"vector_end" if W > 1 else "begin"}; at < end; ++at) {
${body(1, phase)}
        }
</%def>
<%def name="quantize_store(name, T, width)">
            // The nearest code to the value times the block's inverse scale.
            const ${vec("uchar", width)} codes = netcl_quantize_${width}(${qmap(name)}_lookup,
                ${_quantize.zero_code(name in signed_codes)}u, ${name} * ${name}_inverse_scale);
% if width == 1 or aligned:
            ${access(name + "_ptr", "uchar", width)} = codes;
% else:
            vstore${width}(codes, 0, ${name}_ptr + at);
% endif
</%def>
<%def name="requantize(width, phase)">
<% T = vec(state_t, width) %>\
% for name in quantized:
        {
            const ${T} ${name} = ${kept(name, width)};
${quantize_store(name, T, width)}
        }
% endfor
</%def>
<%def name="max_of_lanes(name)">\
<% parts = ["%s.%s" % (name, lane) for lane in lanes(W)] %>\
${reduce_max(parts)}\
</%def>
<%!
    def reduce_max(parts):
        while len(parts) > 1:
            parts = ["netcl_fmax(%s, %s)" % (a, b) for a, b in zip(parts[::2], parts[1::2])]
        return parts[0]
%>
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
% if master_weights:
    const bool first_update = t == 1;
% endif
% if stochastic:
    // Per tensor and step; elements then hash their index into it.
    const uint sr_key = netcl_hash_1(seed ^ netcl_hash_1(
        chunks[row + 3] * 0x85EBCA6Bu ^ netcl_hash_1(t)));
  % if W > 1:
    const ${vec("uint")} lanes = (${vec("uint")})(${", ".join(str(j) for j in range(W))});
  % endif
% endif
    __global ${param_t} *p_ptr;
    __global const ${param_t} *g_ptr;
% for name in state_names:
    __global ${pointer_types[formats[name]]} *${name}_ptr;
% endfor
    switch (k) {
% for k in range(n_tensors):
    case ${k}:
        p_ptr = p${k};
        g_ptr = g${k};
  % for name in state_names:
        ${name}_ptr = ${name}${"" if shared_state else k};
  % endfor
        break;
% endfor
    default:
        return;
    }
<% stride = offsets_stride(len(state_names)) %>\
    p_ptr += offsets[${stride} * k + ${P_OFFSET}] + start;
    g_ptr += offsets[${stride} * k + ${G_OFFSET}] + start;
% for name in state_names:
  % if name.endswith(_quantize.ABSMAX):
    ${name}_ptr += start / ${_quantize.BLOCK};
  % else:
    ${name}_ptr += offsets[${stride} * k + ${STATE_OFFSETS + loop.index}] + start;
  % endif
% endfor

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
% if quantized:
    // A work-item owns whole blocks (a row starts on a block boundary). On
    // CPU layouts it updates a block once, keeping the new int8 state in
    // private arrays until their largest magnitudes (the new scales) are
    // known, then quantises those; elsewhere (a private array per work-item
    // would spill) it computes the block's new state once for the scales,
    // then again, identically, to store the parameter and the codes.
    const uint n_blocks = (count + ${_quantize.BLOCK - 1}) / ${_quantize.BLOCK};
    for (uint b = get_local_id(0); b < n_blocks; b += get_local_size(0)) {
        const uint begin = b * ${_quantize.BLOCK};
        const uint end = min(begin + ${_quantize.BLOCK}, count);
        // Whole vectors, then (only in a tensor's last block) the rest.
        const uint vector_end = begin + (end - begin) / ${W} * ${W};
  % for name in quantized:
        const float ${name}_scale = ${name}${_quantize.ABSMAX}_ptr[b];
        float ${name}_max = 0.0f;
    % if W > 1:
        ${vec("float")} ${name}_max_lanes = 0.0f;
    % endif
  % endfor
  % if keep_block:
    % for name in quantized:
        ${vec("float")} ${name}_block[${_quantize.BLOCK // W}];
    % endfor
${block_loops("keep")}
  % else:
${block_loops("measure")}
  % endif
  % for name in quantized:
    % if W > 1:
        ${name}_max = netcl_fmax(${name}_max, ${max_of_lanes(name + "_max_lanes")});
    % endif
        const float ${name}_new_scale = ${name}_max;
        // As bitsandbytes: values are scaled by the reciprocal (a zero block
        // stores the code of 0).
        const float ${name}_inverse_scale = ${name}_new_scale > 0.0f ? 1.0f / ${name}_new_scale : 0.0f;
  % endfor
  % if keep_block:
${block_loops("requantize")}
  % else:
${block_loops("store")}
  % endif
  % for name in quantized:
        ${name}${_quantize.ABSMAX}_ptr[b] = ${name}_new_scale;
  % endfor
    }
% else:
${loops(element)}
% endif
% if track_stats:
${finish_stats()}
% endif
}
