<%doc>
Kernels of netcl.nn: a small MLP's forward and backward pass.

One program per kernel: the flag `kernel` names the def to emit and the other
flags are that def's arguments, so building a matmul variant never compiles
the others. Every array argument is a buffer plus an element offset, so views
(slices of a larger Array) work.

Flags:
  kernel   which kernel to emit (matmul, sum_rows, relu_forward,
           relu_backward, softmax_xent, take_rows)
  T        OpenCL C element type (float, double; int for take_rows)
  matmul:       trans_a, trans_b, bias (booleans), rows x width (the
                block of outputs one work item computes)
  softmax_xent: group (work-group size, a power of two)
  take_rows:    fill (what an out-of-range index yields)
</%doc>
<%page args="kernel, T, **flags"/>
% if T == "double":
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
% endif
${getattr(self, kernel)(T=T, **flags)}

<%def name="matmul(T, rows, width, trans_a, trans_b, bias)">
<%doc>
C[M,N] (+)= op(A)[M,K] . op(B)[K,N] (+ bias[N]).
op(A)[m,k] is A[k*M + m] when trans_a else A[m*K + k];
op(B)[k,n] is B[n*K + k] when trans_b else B[k*N + n].
Each work item computes a block of `rows` x `width` outputs in registers, one
`width`-wide vector per row, so each B vector is loaded once for `rows` rows;
blocks cut by the matrix edge take a scalar path. On a CPU this runs several
times faster than a local-memory tiled kernel (PoCL serialises barriers).
Launch: global (ceil(N/width), ceil(M/rows)), any local size.
accumulate != 0 adds to C (gradient accumulation, as torch's .grad).
</%doc>
<%
    R, V = rows, width
    TV = "%s%d" % (T, V)
    a_at = (lambda i, k: "a[(%s) * M + %s]" % (k, i)) if trans_a else \
        (lambda i, k: "a[(%s) * K + %s]" % (i, k))
    b_at = (lambda k, j: "b[(%s) * K + %s]" % (j, k)) if trans_b else \
        (lambda k, j: "b[(%s) * N + %s]" % (k, j))
%>
__kernel void matmul(__global const ${T} *a, uint a_off,
                     __global const ${T} *b, uint b_off,
                     __global ${T} *c, uint c_off,
% if bias:
                     __global const ${T} *bias, uint bias_off,
% endif
                     uint M, uint N, uint K, uint accumulate)
{
    a += a_off; b += b_off; c += c_off;
% if bias:
    bias += bias_off;
% endif
    const uint col = get_global_id(0) * ${V}, row = get_global_id(1) * ${R};
    if (row >= M || col >= N)
        return;
    if (row + ${R} <= M && col + ${V} <= N) {
% for r in range(R):
        ${TV} acc${r} = 0;
% endfor
        for (uint k = 0; k < K; ++k) {
% if trans_b:
            const ${TV} bk = (${TV})(${", ".join(b_at("k", "col + %d" % j) for j in range(V))});
% else:
            const ${TV} bk = vload${V}(0, b + k * N + col);
% endif
% for r in range(R):
            acc${r} = fma((${TV})${a_at("row + %d" % r, "k")}, bk, acc${r});
% endfor
        }
% for r in range(R):
<% at = "c + (row + %d) * N + col" % r %>\
% if bias:
        acc${r} += vload${V}(0, bias + col);
% endif
        vstore${V}(accumulate ? vload${V}(0, ${at}) + acc${r} : acc${r}, 0, ${at});
% endfor
        return;
    }
    for (uint i = row; i < min(row + ${R}, M); ++i) {
        for (uint j = col; j < min(col + ${V}, N); ++j) {
            ${T} acc = 0;
            for (uint k = 0; k < K; ++k)
                acc = fma(${a_at("i", "k")}, ${b_at("k", "j")}, acc);
% if bias:
            acc += bias[j];
% endif
            c[i * N + j] = accumulate ? c[i * N + j] + acc : acc;
        }
    }
}
</%def>

<%def name="sum_rows(T)">
// out[j] (+)= sum_i x[i*cols + j]: the bias gradient. Launch: global (cols).
__kernel void sum_rows(__global const ${T} *x, uint x_off,
                       __global ${T} *out, uint out_off,
                       uint rows, uint cols, uint accumulate)
{
    const uint j = get_global_id(0);
    if (j >= cols)
        return;
    x += x_off;
    ${T} acc = 0;
    for (uint i = 0; i < rows; ++i)
        acc += x[i * cols + j];
    out[out_off + j] = accumulate ? out[out_off + j] + acc : acc;
}
</%def>

<%def name="relu_forward(T)">
// y = max(x, 0), NaN propagating like torch.relu.
__kernel void relu_forward(__global const ${T} *x, uint x_off,
                           __global ${T} *y, uint y_off, uint n)
{
    const uint i = get_global_id(0);
    if (i < n) {
        const ${T} v = x[x_off + i];
        y[y_off + i] = v < 0 ? 0 : v;
    }
}
</%def>

<%def name="relu_backward(T)">
// gx = gy where y > 0 else 0 (torch's threshold_backward on the output).
__kernel void relu_backward(__global const ${T} *gy, uint gy_off,
                            __global const ${T} *y, uint y_off,
                            __global ${T} *gx, uint gx_off, uint n)
{
    const uint i = get_global_id(0);
    if (i < n)
        gx[gx_off + i] = y[y_off + i] > 0 ? gy[gy_off + i] : 0;
}
</%def>

<%def name="softmax_xent(T, group)">
<%doc>
Mean softmax cross-entropy over `rows` rows of `cols` logits and its gradient
(softmax - onehot) / rows, in one work-group of `group` items that stride over
the rows and then reduce their partial sums in a fixed order (deterministic).
A label outside [0, cols) makes the loss NaN. Launch: global = local = group.
</%doc>
__kernel __attribute__((reqd_work_group_size(${group}, 1, 1)))
void softmax_xent(__global const ${T} *logits, uint logits_off,
                  __global const int *labels, uint labels_off,
                  __global ${T} *grad, uint grad_off,
                  __global ${T} *loss, uint loss_off,
                  uint rows, uint cols, ${T} inv_rows)
{
    __local ${T} partial[${group}];
    const uint lid = get_local_id(0);
    logits += logits_off; labels += labels_off; grad += grad_off;
    ${T} acc = 0;
    for (uint r = lid; r < rows; r += ${group}) {
        __global const ${T} *z = logits + r * cols;
        __global ${T} *g = grad + r * cols;
        // (Starting from z[0] and looping from j = 1 miscompiles on PoCL 3.0
        // when cols == 1: NaN loss and a corrupted heap.)
        ${T} m = -INFINITY;
        for (uint j = 0; j < cols; ++j)
            m = fmax(m, z[j]);
        ${T} s = 0;
        for (uint j = 0; j < cols; ++j)
            s += exp(z[j] - m);
        const int y = labels[r];
        const bool valid = y >= 0 && y < (int)cols;
        acc += valid ? m + log(s) - z[y] : NAN;
        const ${T} inv_s = 1 / s;
        for (uint j = 0; j < cols; ++j)
            g[j] = (exp(z[j] - m) * inv_s - ((int)j == y ? 1 : 0)) * inv_rows;
    }
    partial[lid] = acc;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (uint stride = ${group // 2}; stride > 0; stride >>= 1) {
        if (lid < stride)
            partial[lid] += partial[lid + stride];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (lid == 0)
        loss[loss_off] = partial[0] * inv_rows;
}
</%def>

<%def name="take_rows(T, fill)">
// out[i, :] = x[index[i], :]; an index outside [0, n_rows) yields `fill`.
// Launch: global (cols, count).
__kernel void take_rows(__global const ${T} *x, uint x_off,
                        __global const int *index, uint index_off,
                        __global ${T} *out, uint out_off,
                        uint n_rows, uint cols, uint count)
{
    const uint j = get_global_id(0), i = get_global_id(1);
    if (j >= cols || i >= count)
        return;
    const int r = index[index_off + i];
    out[out_off + i * cols + j] =
        (r >= 0 && r < (int)n_rows) ? x[x_off + (uint)r * cols + j] : (${T})(${fill});
}
</%def>
