"""float16 and bfloat16 parameters: float32 math, nearest-even stores, master
weights, stochastic rounding, Kahan compensation, bfloat16 state.

Oracles:
- the float32 path on the same (exactly upcast) values, rounded to the
  parameter's dtype by NumPy / ml_dtypes (nearest-even, written
  independently of the kernels' integer rounding): the low-precision step must
  equal it bit for bit, since it promises the same float32 arithmetic and one
  rounding per store (the float32 path itself is checked against torch in
  test_adam_sgd.py and test_rmsprop*.py);
- a float64 NumPy re-derivation of torch's rules for one step (independent
  of netcl's float32 path);
- torch's own SGD on bfloat16/float16 CPU tensors;
- a NumPy re-derivation of the stochastic-rounding hash, and statistics.
"""

import numpy as np
import pyopencl.array as cla
import pytest
import torch

ml_dtypes = pytest.importorskip("ml_dtypes")

import netcl  # noqa: E402
import rmsprop_reference as ref  # noqa: E402
from conftest import assert_close, make_queue  # noqa: E402
from netcl import amp  # noqa: E402
from netcl.optim import SGD, Adam, AdamW, RMSProp  # noqa: E402
from test_adam_sgd import _torch_adam_step, _torch_sgd_step  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
LOW = [F16, BF16]
SIZES = [1003, 85, 7]  # vector body and scalar tail

VARIANTS = [
    (Adam, dict(lr=1e-2)),
    (Adam, dict(lr=1e-2, amsgrad=True, weight_decay=0.1, maximize=True)),
    (AdamW, dict(lr=1e-2)),
    (SGD, dict(lr=0.1)),
    (SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (SGD, dict(lr=0.1, momentum=0.9, dampening=0.1)),
    (RMSProp, dict(lr=1e-2)),
    (RMSProp, dict(lr=1e-2, centered=True, momentum=0.5, weight_decay=0.1)),
    (RMSProp, dict(lr=1e-2, centered=True, momentum=0.9, nesterov=True, lr_in_momentum=True,
                   eps_in_sqrt=True, initial_scale=1.0, bias_correction=True,
                   decoupled_weight_decay=True, weight_decay=0.1, clamp_variance=True)),
]


def variant_id(v):
    cls, kw = v
    return cls.__name__ + "".join(f"-{k}={w}" for k, w in kw.items() if k != "lr")


def dtype_id(d):
    return np.dtype(d).name


def lp(x, dtype):
    """float32/float64 -> dtype, to nearest-even (NumPy / ml_dtypes)."""
    return np.asarray(x).astype(dtype)


def ulp_of(x, dtype):
    """The spacing of ``dtype`` at the magnitude of the float64 values ``x``."""
    mantissa, min_exponent = (10, -14) if np.dtype(dtype) == F16 else (7, -126)
    exponent = np.floor(np.log2(np.maximum(np.abs(x), 1e-300)))
    return 2.0 ** (np.maximum(exponent, min_exponent) - mantissa)


def bits(x):
    return np.asarray(x).view(np.uint16 if np.asarray(x).dtype.itemsize == 2 else np.uint32)


def host(array):
    return array.get()


def make(queue, dtype, seed=0, sizes=SIZES, scale=1.0):
    rng = np.random.default_rng(seed)
    return [netcl.Parameter(cla.to_device(queue, lp(scale * rng.standard_normal(n), dtype)))
            for n in sizes]


def grads(sizes, dtype, step):
    rng = np.random.default_rng(100 + step)
    return [lp(rng.standard_normal(n), dtype) for n in sizes]


def state32(opt, p):
    return {k: host(v).astype(np.float32) for k, v in opt.state.get(id(p), {}).items()
            if k != "step"}


# ----------------------------------------------------- NumPy stochastic rounding
def _mix(h):
    h = h.astype(np.uint32)
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


def random_bits(seed, index, step, n):
    """The documented hash: per tensor key = mix(seed ^ mix(index * 0x85EBCA6B ^
    mix(step))); per element mix(mix(i * 0x9E3779B9 + key))."""
    u = np.uint32
    key = _mix(np.array([seed], u) ^ _mix(np.array([index], u) * u(0x85EBCA6B)
                                          ^ _mix(np.array([step], u))))
    i = np.arange(n, dtype=u)
    return _mix(_mix(i * u(0x9E3779B9) + key))


def stochastic(x32, dtype, rand):
    """float32 -> dtype, rounding up in magnitude with probability equal to the
    fraction of the spacing (re-derived here from the value's binade)."""
    x32 = np.asarray(x32, np.float32)
    if np.dtype(dtype) == BF16:
        b = x32.view(np.uint32)
        out = ((b + (rand >> np.uint32(16))) >> np.uint32(16)).astype(np.uint16)
        return out.view(BF16)
    x = x32.astype(np.float64)
    exponent = np.floor(np.log2(np.where(x == 0, 1.0, np.abs(x))))
    ulp = 2.0 ** np.maximum(exponent - 10, -24)
    below = np.trunc(np.abs(x) / ulp) * ulp
    fraction = (np.abs(x) - below) / ulp
    uniform = (rand >> np.uint32(8)).astype(np.float64) * 2.0 ** -24
    return np.copysign(below + np.where(uniform < fraction, ulp, 0.0), x).astype(F16)


# ------------------------------------------------------- bitwise vs float32 path
@pytest.mark.parametrize("mode", ["nearest", "master_weights", "kahan", "stochastic_rounding",
                                  "guarded", "bfloat16_state"])
@pytest.mark.parametrize("dtype", LOW, ids=dtype_id)
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_matches_float32_path_rounded(ctx_factory, variant, dtype, mode):
    """Each step: the low-precision optimizer on (p, g) against netcl's float32
    optimizer on the exactly upcast values; every store rounded as documented."""
    cls, kwargs = variant
    queue = make_queue(ctx_factory)
    options = {"master_weights": dict(master_weights=True), "kahan": dict(kahan=True),
               "stochastic_rounding": dict(stochastic_rounding=True, seed=1234),
               "guarded": dict(skip_nonfinite=True, max_grad_norm=2.0),
               "bfloat16_state": dict(state_dtype="bfloat16")}.get(mode, {})
    guard = {k: v for k, v in options.items() if k in ("skip_nonfinite", "max_grad_norm")}
    params = make(queue, dtype)
    mirror = [netcl.Parameter(cla.to_device(queue, host(p.data).astype(np.float32)))
              for p in params]
    opt = cls(params, **kwargs, **options)
    opt32 = cls(mirror, **kwargs, **guard)
    comp = [np.zeros(p.data.size, np.float32) for p in params]
    for step in range(1, 4):
        hg = grads(SIZES, dtype, step)
        for p, q, g in zip(params, mirror, hg):
            p.grad = cla.to_device(queue, g)
            q.grad = cla.to_device(queue, g.astype(np.float32))
        before = [host(p.data).astype(np.float32) for p in params]
        opt.step()
        opt32.step()
        for index, (p, q) in enumerate(zip(params, mirror)):
            new32 = host(q.data)
            got = host(p.data)
            if mode == "kahan":
                total = comp[index] + (new32 - before[index])
                expected = lp(before[index] + total, dtype)
                comp[index] = lp(total - (expected.astype(np.float32) - before[index]),
                                 dtype).astype(np.float32)
                np.testing.assert_array_equal(bits(host(opt.state[id(p)]["kahan_comp"])),
                                              bits(lp(comp[index], dtype)))
            elif mode == "stochastic_rounding":
                rand = random_bits(1234, index, step, p.data.size)
                expected = stochastic(new32, dtype, rand)
            else:
                expected = lp(new32, dtype)
            np.testing.assert_array_equal(bits(got), bits(expected),
                                          err_msg=f"param {index}, step {step}")
            ours = state32(opt, p)
            theirs = state32(opt32, q)
            if mode == "master_weights":
                np.testing.assert_array_equal(bits(ours.pop("master_param")), bits(new32))
            ours.pop("kahan_comp", None)
            assert set(ours) == set(theirs)
            for name in ours:
                if mode == "bfloat16_state":
                    # The float32 path kept more bits: compare one step's
                    # rounding only (state re-synchronised below).
                    expected_state = lp(theirs[name], BF16).astype(np.float32)
                else:
                    expected_state = theirs[name]
                np.testing.assert_array_equal(bits(ours[name]), bits(expected_state),
                                              err_msg=f"{name} of param {index}, step {step}")
            if mode != "master_weights":  # the float32 path continues from the stored values
                q.data.set(got.astype(np.float32))
            if mode == "bfloat16_state":
                for name, value in ours.items():
                    opt32.state[id(q)][name].set(value)


# ---------------------------------------------------- float64 re-derivation
@pytest.mark.parametrize("dtype", LOW, ids=dtype_id)
@pytest.mark.parametrize("family", ["adam", "sgd", "rmsprop"])
def test_one_step_against_float64_rules(ctx_factory, dtype, family):
    """One step from low-precision values against torch's rule in float64:
    state within a few float32 ulp, params within one ulp of their dtype."""
    queue = make_queue(ctx_factory)
    params = make(queue, dtype, seed=3)
    hyper = {"adam": dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1,
                          amsgrad=True, maximize=False, decoupled_weight_decay=True),
             "sgd": dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01,
                         nesterov=True, maximize=False),
             "rmsprop": dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.5,
                             centered=True)}[family]
    cls = {"adam": Adam, "sgd": SGD, "rmsprop": RMSProp}[family]
    opt = cls(params, **hyper)
    for step in (1, 2):
        hg = grads(SIZES, dtype, step)
        before = [host(p.data).astype(np.float64) for p in params]
        states = [{} if step == 1 else {k: v.astype(np.float64)
                                        for k, v in state32(opt, p).items()} for p in params]
        for p, g in zip(params, hg):
            p.grad = cla.to_device(queue, g)
        opt.step()
        for p, g, b, state in zip(params, hg, before, states):
            g = g.astype(np.float64)
            if family == "adam":
                expected = _torch_adam_step(b, g, state, step, **hyper)
            elif family == "sgd":
                if step > 1:
                    state = {"momentum_buffer": state["momentum_buffer"]}
                expected = _torch_sgd_step(b, g, state, step, **hyper)
            else:
                expected = ref.torch_rmsprop_step(b, g, state, step, **hyper)
            got = host(p.data).astype(np.float64)
            assert np.all(np.abs(got - expected) <= ulp_of(expected, dtype)), family
            for name, value in state32(opt, p).items():
                assert_close(value, state[name].astype(np.float32), f"{family} {name}", nulp=8)


# ------------------------------------------------------------- torch as oracle
@pytest.mark.parametrize("dtype", LOW, ids=dtype_id)
def test_sgd_matches_torch_low_precision(ctx_factory, dtype):
    """torch's SGD on bfloat16/float16 CPU tensors computes p - lr*g in float
    and rounds once, as netcl does: equal within one ulp of the dtype on any
    CPU dispatch path (fma or not), and mostly bit for bit. torch rounds the
    learning rate to the tensor's dtype first (netcl keeps it float32), so
    the rate here is a power of two, exact in both."""
    queue = make_queue(ctx_factory)
    params = make(queue, dtype, seed=5)
    tdtype = {F16: torch.float16, BF16: torch.bfloat16}[dtype]
    tparams = [torch.tensor(host(p.data).astype(np.float32)).to(tdtype) for p in params]
    opt = SGD(params, lr=2.0**-4)
    topt = torch.optim.SGD(tparams, lr=2.0**-4)
    for step in range(1, 4):
        hg = grads(SIZES, dtype, step)
        for p, tp, g in zip(params, tparams, hg):
            p.grad = cla.to_device(queue, g)
            tp.grad = torch.tensor(g.astype(np.float32)).to(tdtype)
        opt.step()
        topt.step()
        for p, tp in zip(params, tparams):
            ours = host(p.data).astype(np.float64)
            theirs = tp.float().numpy().astype(np.float64)
            assert np.all(np.abs(ours - theirs) <= ulp_of(theirs, dtype))
            assert np.mean(ours == theirs) > 0.99
            p.data.set(lp(theirs, dtype))  # continue from the same values


# --------------------------------------------------------- precision behaviour
@pytest.mark.parametrize("variant", [(Adam, dict(eps=1e-8)), (AdamW, dict(amsgrad=True)),
                                     (RMSProp, dict(centered=True, momentum=0.9)),
                                     (RMSProp, dict(eps_in_sqrt=True)),
                                     (SGD, dict(momentum=0.9))], ids=variant_id)
def test_zero_gradient_keeps_float16_finite_and_unchanged(ctx_factory, variant):
    cls, kwargs = variant
    queue = make_queue(ctx_factory)
    params = make(queue, F16, seed=7)
    before = [host(p.data) for p in params]
    opt = cls(params, **kwargs, weight_decay=0)
    for _ in range(3):
        for p in params:
            p.grad = cla.to_device(queue, np.zeros(p.data.size, F16))
        opt.step()
    for p, b in zip(params, before):
        np.testing.assert_array_equal(bits(host(p.data)), bits(b))


@pytest.mark.parametrize("option", ["master_weights", "kahan", "nearest"])
def test_ten_thousand_small_updates(ctx_factory, option):
    """10,000 updates of 1e-5 on a float16 weight of 1.0 (its spacing there is
    2**-10 ~ 1e-3): alone it never moves; a float32 master copy accumulates
    them exactly as float32 does; Kahan compensation gets within a float16
    ulp of the same."""
    queue = make_queue(ctx_factory)
    p = netcl.Parameter(cla.to_device(queue, np.ones(8, F16)))
    p.grad = cla.to_device(queue, np.full(8, -1.0, F16))
    kwargs = {} if option == "nearest" else {option: True}
    opt = SGD([p], lr=1e-5, **kwargs)
    for _ in range(10_000):
        opt.step()
    total = np.float32(1.0)
    for _ in range(10_000):
        total = np.float32(total + np.float32(1e-5))
    got = host(p.data).astype(np.float64)
    if option == "nearest":
        np.testing.assert_array_equal(got, 1.0)
    elif option == "master_weights":
        np.testing.assert_array_equal(host(opt.state[id(p)]["master_param"]), total)
        np.testing.assert_array_equal(host(p.data), lp(total, F16))
    else:
        assert np.all(np.abs(got - float(total)) <= 2.0 ** -10), got


@pytest.mark.parametrize("dtype", LOW, ids=dtype_id)
def test_stochastic_rounding_is_unbiased_and_seeded(ctx_factory, dtype):
    """An update of a quarter of the spacing on 2**16 weights of 1.0: nearest
    rounding never moves them; stochastic rounding moves a quarter of them up
    by one spacing (mean within 5 standard deviations), the same ones for the
    same seed, others for another seed."""
    queue = make_queue(ctx_factory)
    n = 1 << 16
    spacing = 2.0 ** (-7 if dtype == BF16 else -10)

    def run(seed, **kwargs):
        p = netcl.Parameter(cla.to_device(queue, np.ones(n, dtype)))
        p.grad = cla.to_device(queue, np.full(n, -spacing / 4, dtype))
        SGD([p], lr=1.0, seed=seed, **kwargs).step()
        return host(p.data).astype(np.float64)

    nearest = run(0)
    np.testing.assert_array_equal(nearest, 1.0)
    first = run(7, stochastic_rounding=True)
    assert set(np.unique(first)) <= {1.0, 1.0 + spacing}
    up = np.mean(first > 1.0)
    assert abs(up - 0.25) <= 5 * np.sqrt(0.25 * 0.75 / n)
    np.testing.assert_array_equal(run(7, stochastic_rounding=True), first)
    other = run(8, stochastic_rounding=True)
    assert np.mean(other != first) > 0.2


@pytest.mark.parametrize("dtype", LOW, ids=dtype_id)
def test_grad_scaler_and_nonfinite_skip(ctx_factory, dtype):
    """A GradScaler drives a low-precision optimizer as a float32 one: the
    same skip on an infinite gradient and, after unscaling in float32, the
    rounded float32 result."""
    queue = make_queue(ctx_factory)
    params = make(queue, dtype, seed=9)
    mirror = [netcl.Parameter(cla.to_device(queue, host(p.data).astype(np.float32)))
              for p in params]
    opt, opt32 = Adam(params, lr=1e-2), Adam(mirror, lr=1e-2)
    scaler, scaler32 = (amp.GradScaler(queue, init_scale=2.0**4, growth_interval=2)
                        for _ in range(2))
    for step in range(1, 5):
        hg = [lp(g.astype(np.float32) * 16, dtype) for g in grads(SIZES, dtype, step)]
        if step == 2:
            hg[1][3] = np.inf
        before = [host(p.data) for p in params]
        for p, q, g in zip(params, mirror, hg):
            p.grad = cla.to_device(queue, g)
            q.grad = cla.to_device(queue, g.astype(np.float32))
        scaler.step(opt)
        scaler32.step(opt32)
        scaler.update()
        scaler32.update()
        assert scaler.get_scale() == scaler32.get_scale()
        for p, q, b in zip(params, mirror, before):
            if step == 2:
                np.testing.assert_array_equal(bits(host(p.data)), bits(b))
            np.testing.assert_array_equal(bits(host(p.data)), bits(lp(host(q.data), dtype)))
            q.data.set(host(p.data).astype(np.float32))
    assert opt.skipped_steps == 1


# ------------------------------------------------------------ state and files
@pytest.mark.parametrize("options", [dict(master_weights=True), dict(kahan=True),
                                     dict(state_dtype="bfloat16", stochastic_rounding=True),
                                     dict(state_dtype="int8", master_weights=True)],
                         ids=lambda o: "-".join(o))
@pytest.mark.parametrize("dtype", LOW, ids=dtype_id)
def test_checkpoint_resumes_bit_exactly(ctx_factory, tmp_path, dtype, options):
    queue = make_queue(ctx_factory)
    sizes = [5000, 85]  # int8 state for the first, float32 for the second
    params = make(queue, dtype, seed=11, sizes=sizes)
    opt = Adam(params, lr=1e-2, **options)

    def step(opt, params, s):
        for p, g in zip(params, grads(sizes, dtype, s)):
            p.grad = cla.to_device(queue, g)
        opt.step()

    step(opt, params, 1)
    step(opt, params, 2)
    path = tmp_path / "opt.safetensors"
    opt.save(path)
    copies = [netcl.Parameter(cla.to_device(queue, host(p.data))) for p in params]
    resumed = Adam(copies, lr=1e-2, **options)
    resumed.load(path)
    for s in (3, 4):
        step(opt, params, s)
        step(resumed, copies, s)
    for p, q in zip(params, copies):
        np.testing.assert_array_equal(bits(host(p.data)), bits(host(q.data)))
        for name, value in opt.state[id(p)].items():
            if name != "step":
                np.testing.assert_array_equal(bits(host(value)),
                                              bits(host(resumed.state[id(q)][name])))
    other = "float32" if options.get("state_dtype") in ("bfloat16", "int8") else "bfloat16"
    fresh = Adam(copies, lr=1e-2, **{**options, "state_dtype": other})
    with pytest.raises(ValueError, match="state_dtype"):
        fresh.load(path)


def test_bad_options_and_inputs(ctx_factory):
    queue = make_queue(ctx_factory)
    p = make(queue, BF16, sizes=[10])[0]
    with pytest.raises(ValueError, match="choose one"):
        Adam([p], master_weights=True, kahan=True)
    with pytest.raises(ValueError, match="choose one"):
        SGD([p], stochastic_rounding=True, master_weights=True)
    with pytest.raises(ValueError, match="state_dtype"):
        Adam([p], state_dtype="float16")
    with pytest.raises(ValueError, match="int8"):
        SGD([p], state_dtype="int8")
    with pytest.raises(ValueError, match="seed"):
        SGD([p], seed=-1)
    with pytest.raises(TypeError, match="kahan"):
        SGD([p], kahan=1)
    for options in (dict(master_weights=True), dict(kahan=True), dict(state_dtype="int8")):
        with pytest.raises(ValueError, match=f"{next(iter(options))}=.*torch.optim.Adam"):
            Adam([p], **options).state_dict(format="torch")
    opt = Adam([p], lr=1e-2)
    p.grad = cla.to_device(queue, np.zeros(10, F16))
    before = host(p.data)
    with pytest.raises(TypeError, match="grad dtype float16 does not match parameter dtype "
                                        "bfloat16"):
        opt.step()
    np.testing.assert_array_equal(bits(host(p.data)), bits(before))
    assert len(opt.state) == 0


# ------------------------------------------------------------------ int8 state
def recipe_map(signed):
    """bitsandbytes' create_dynamic_map(signed, max_exponent_bits=7,
    total_bits=8), re-derived: per decade i, 2**i (signed, both signs) or
    2**(i+1) midpoints of an even split of [0.1, 1], times 10**(i-6); 0; 1."""
    values = [0.0, 1.0]
    for i in range(7):
        n = 2**i if signed else 2**(i + 1)
        edges = [0.1 + 0.9 * k / n for k in range(n + 1)]
        for a, b in zip(edges, edges[1:]):
            values.append(10.0 ** (i - 6) * (a + b) / 2)
            if signed:
                values.append(-10.0 ** (i - 6) * (a + b) / 2)
    return np.sort(np.array(values)).astype(np.float32)


def quantize(x, table):
    """Nearest map entry to each float32 x (the lower on a tie, in float32
    arithmetic); NaN gets the code of 0."""
    x = np.asarray(x, np.float32)
    index = np.clip(np.searchsorted(table, x, side="right") - 1, 0, 255)
    upper = np.minimum(index + 1, 255)
    with np.errstate(invalid="ignore"):
        nearer_up = (index < 255) & ((x - table[index]) > (table[upper] - x))
    code = index + nearer_up
    return np.where(np.isnan(x), np.flatnonzero(table == 0)[0], code).astype(np.uint8)


def quantisation_probes(table):
    """float32 values where a nearest-entry choice can go wrong: every entry,
    every midpoint between neighbours, each +-4 ulps; every 16-bit bucket
    edge (the kernel looks values up by their upper 16 bits) +-1 ulp over
    [2**-40, 1]; zeros, subnormals and NaN."""
    mids = ((table[:-1].astype(np.float64) + table[1:]) / 2).astype(np.float32)
    centres = np.concatenate([table, mids])
    ulps = np.arange(-4, 5, dtype=np.int64)
    # Integer steps on the bits: ulps of the magnitude (mirrored below).
    near = (centres.view(np.int32)[:, None].astype(np.int64) + ulps).reshape(-1)
    edges = np.arange(np.float32(2**-40).view(np.uint32) >> 16, 0x3F81, dtype=np.int64) << 16
    edges = (edges[:, None] + np.array([-1, 0, 1])).reshape(-1)
    positive = np.concatenate([near.astype(np.uint32).view(np.float32),
                               edges.astype(np.uint32).view(np.float32)])
    positive = np.abs(positive[np.isfinite(positive)])
    specials = np.array([0.0, -0.0, 1e-45, -1e-45, 1e-39, np.nan], np.float32)
    values = np.concatenate([positive, -positive, specials])
    return values[~(np.abs(values) > 1)]


def test_int8_codes_are_the_nearest_map_entries(ctx_factory):
    """Through the update kernel, values chosen at every decision point of
    both maps: Adam with betas (0, 0) makes the first moment the gradient
    and the second its square; a 1.0 first in each block makes every block's
    scale 1, so the codes must be quantize(g) and quantize(g*g)."""
    from netcl.optim import _quantize
    queue = make_queue(ctx_factory)
    signed, unsigned = recipe_map(True), recipe_map(False)
    # Square roots of the unsigned map's decision points put g*g next to them.
    targets = quantisation_probes(unsigned)
    roots = np.sqrt(np.abs(targets[np.isfinite(targets)]).astype(np.float64)).astype(np.float32)
    values = np.concatenate([quantisation_probes(signed), roots])
    rng = np.random.default_rng(23)
    values = values[rng.permutation(values.size)]
    # 255 values per block after its 1.0; a partial last block of 13 + 1.
    per_block = _quantize.BLOCK - 1
    values = np.concatenate([values, np.zeros(-(values.size - 13) % per_block, np.float32)])
    blocks = np.split(values, np.arange(per_block, values.size, per_block))
    g = np.concatenate([np.concatenate([[np.float32(1.0)], b]) for b in blocks]).astype(
        np.float32)
    p = netcl.Parameter(cla.to_device(queue, np.zeros_like(g)))
    p.grad = cla.to_device(queue, g)
    opt = Adam([p], lr=1e-3, betas=(0.0, 0.0), state_dtype="int8")
    opt.step()
    state = opt.state[id(p)]
    for name, expected_values, table in (("exp_avg", g, signed),
                                         ("exp_avg_sq", g * g, unsigned)):
        np.testing.assert_array_equal(host(state[name + "_absmax"]), 1.0, err_msg=name)
        codes = host(state[name])
        expected = quantize(expected_values, table)
        wrong = np.flatnonzero(codes != expected)
        assert wrong.size == 0, (name, g[wrong[:5]], codes[wrong[:5]], expected[wrong[:5]])


def test_dynamic_maps():
    from netcl.optim import _quantize
    for signed in (True, False):
        table = _quantize.MAPS[signed]
        np.testing.assert_array_equal(table, recipe_map(signed))
        assert table.dtype == np.float32 and table.size == 256
        assert np.all(np.diff(table) > 0) and table[-1] == 1.0 and 0.0 in table
        assert (table < 0).sum() == (127 if signed else 0)


def test_int8_lookup_table_picks_the_nearest_entries():
    """The kernel's table (_quantize.lookup_table, read back through its
    NumPy twin) against the nearest-entry rule, on every decision point of
    both maps and a million random float32 bit patterns."""
    from netcl.optim import _quantize
    rng = np.random.default_rng(29)
    noise = rng.integers(0, 2**32, 1 << 20, dtype=np.uint64).astype(np.uint32).view(np.float32)
    for signed in (True, False):
        table = recipe_map(signed)
        values = np.concatenate([quantisation_probes(table), noise,
                                 np.float32([np.inf, -np.inf, 3e38, -3e38])])
        got = _quantize.quantize(values, signed)
        expected = quantize(values, table)
        wrong = np.flatnonzero(got != expected)
        assert wrong.size == 0, (signed, values[wrong[:5]], got[wrong[:5]], expected[wrong[:5]])


INT8_VARIANTS = [(Adam, dict(lr=1e-2, amsgrad=True)), (AdamW, dict(lr=1e-2)),
                 (RMSProp, dict(lr=1e-2, centered=True, momentum=0.9)),
                 (RMSProp, dict(lr=1e-2, initial_scale=1.0))]


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), BF16], ids=dtype_id)
@pytest.mark.parametrize("variant", INT8_VARIANTS, ids=variant_id)
def test_int8_state_matches_the_same_quantisation(ctx_factory, variant, dtype):
    """Each step: the int8 optimizer against netcl's float32 optimizer whose
    state is set to the dequantised values (map[code] * absmax, in float32);
    the new scales are the blocks' largest magnitudes, the codes the map
    entries nearest to each value times its block's float32 reciprocal scale
    (re-derived in NumPy), the parameter the rounded float32 one.
    A tensor under 4096 elements keeps float32 state."""
    from netcl.optim import _quantize
    cls, kwargs = variant
    queue = make_queue(ctx_factory)
    sizes = [20000, 5000, 100]  # two rows of 16384; a partial last block; small
    params = make(queue, dtype, seed=13, sizes=sizes)
    mirror = [netcl.Parameter(cla.to_device(queue, host(p.data).astype(np.float32)))
              for p in params]
    opt = cls(params, **kwargs, state_dtype="int8")
    opt32 = cls(mirror, **kwargs)
    signs = cls.quantized_state
    for step in range(1, 4):
        hg = grads(sizes, dtype, step)
        if step > 1:
            for p, q in zip(params[:2], mirror[:2]):
                state = opt.state[id(p)]
                for name in opt32.state[id(q)]:
                    if name != "step":
                        table = _quantize.MAPS[signs[name]]
                        scale = np.repeat(host(state[name + "_absmax"]), 256)[:p.data.size]
                        deq = table[host(state[name])] * scale.astype(np.float32)
                        opt32.state[id(q)][name].set(deq.astype(np.float32))
        for p, q, g in zip(params, mirror, hg):
            q.data.set(host(p.data).astype(np.float32))
            p.grad = cla.to_device(queue, g)
            q.grad = cla.to_device(queue, g.astype(np.float32))
        opt.step()
        opt32.step()
        for index, (p, q) in enumerate(zip(params, mirror)):
            np.testing.assert_array_equal(bits(host(p.data)), bits(lp(host(q.data), dtype)))
            state = opt.state[id(p)]
            for name, value in opt32.state[id(q)].items():
                if name == "step":
                    continue
                new = host(value)
                if p.data.size < _quantize.MIN_ELEMENTS:
                    np.testing.assert_array_equal(host(state[name]), new)
                    continue
                blocks = np.pad(np.abs(new), (0, -new.size % 256)).reshape(-1, 256)
                absmax = blocks.max(axis=1)
                np.testing.assert_array_equal(host(state[name + "_absmax"]), absmax)
                # Scaled by the block's float32 reciprocal, as bitsandbytes.
                inverse = np.where(absmax > 0, np.float32(1) / np.where(absmax > 0, absmax, 1),
                                   0).astype(np.float32)
                ratio = new.astype(np.float32) * np.repeat(inverse, 256)[:new.size]
                expected = quantize(ratio, recipe_map(signs[name]))
                np.testing.assert_array_equal(host(state[name]), expected,
                                              err_msg=f"{name}, step {step}")


def test_track_stats_with_low_precision_and_int8_state(ctx_factory):
    """track_stats reports the same statistics for a bfloat16 parameter with
    int8 state as for the float32 path on the same values (to float32
    accumulation-order rounding)."""
    queue = make_queue(ctx_factory)
    p = make(queue, BF16, seed=17, sizes=[5000])[0]
    q = netcl.Parameter(cla.to_device(queue, host(p.data).astype(np.float32)))
    opt = Adam([p], lr=1e-3, track_stats=True, state_dtype="int8")
    opt32 = Adam([q], lr=1e-3, track_stats=True)
    g = grads([5000], BF16, 1)[0]
    p.grad = cla.to_device(queue, g)
    q.grad = cla.to_device(queue, g.astype(np.float32))
    opt.step()
    opt32.step()
    ours, theirs = opt.stats()["global"], opt32.stats()["global"]
    assert set(ours) == set(theirs)
    for key in ("grad_norm", "param_norm", "update_norm", "second_moment_rms", "momentum_norm"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-4), key


@pytest.mark.parametrize("dtype,state,resident,moved", [
    ("float32", "float32", 16.0, 28.0),           # p, g, m, v: 4 bytes each
    ("bfloat16", "float32", 12.0, 22.0),          # p, g 2 bytes; m, v 4
    ("bfloat16", "bfloat16", 8.0, 14.0),
    ("float16", "int8", 6.0 + 8 / 256, 10.0 + 16 / 256),  # codes + a float32 scale per 256
])
def test_bench_lowp_counts_bytes(ctx_factory, dtype, state, resident, moved):
    """The low-precision benchmark's bytes per parameter, on one tensor of
    8192 elements (timings are measured, never asserted)."""
    from netcl import bench, bench_lowp
    queue = make_queue(ctx_factory)
    workload = bench.Workload("one", "one tensor", (("w", (8192,)),))
    config = next(c for c in bench.OPTIMIZERS if c.name == "adam")
    row = bench_lowp.measure(queue, workload, config, dtype, state, steps=1, warmup=0,
                             ceiling=1.0)
    assert row["bytes_per_param"] == resident
    assert row["moved_per_param"] == moved
    assert row["ms"] > 0


@pytest.mark.parametrize("dtype", LOW, ids=dtype_id)
def test_track_stats_counts_nonfinite_low_precision_gradients(ctx_factory, dtype):
    queue = make_queue(ctx_factory)
    p = make(queue, dtype, seed=19, sizes=[1003])[0]
    before = host(p.data)
    opt = Adam([p], lr=1e-3, track_stats=True, skip_nonfinite=True)
    g = grads([1003], dtype, 1)[0]
    g[[5, 700]] = [np.nan, -np.inf]
    g[9] = 0
    p.grad = cla.to_device(queue, g)
    opt.step()
    stats = opt.stats()
    assert stats["skipped"] and stats["global"]["nonfinite"] == 2
    assert stats["global"]["zeros"] == 1
    np.testing.assert_array_equal(bits(host(p.data)), bits(before))


@pytest.mark.parametrize("cls", [Adam, AdamW], ids=lambda c: c.__name__)
def test_adam_first_moment_matches_torch_bfloat16(ctx_factory, cls):
    """torch keeps Adam's state in the parameter's dtype; with bfloat16
    parameters and state_dtype="bfloat16" the first moment (torch's lerp_,
    computed in float and rounded once, as here) is torch's bit for bit over
    several steps. (torch's second moment rounds after mul_ and again after
    addcmul_, and its denominator in bfloat16 throughout, so the rest
    differs by design: netcl rounds only when storing.) An element may sit
    one bfloat16 ulp away where torch's CPU path (fma or not) rounds the
    float value on the other side of a rounding boundary."""
    queue = make_queue(ctx_factory)
    params = make(queue, BF16, seed=5)
    tparams = [torch.tensor(host(p.data).astype(np.float32)).to(torch.bfloat16)
               for p in params]
    opt = cls(params, lr=2.0**-7, state_dtype="bfloat16")
    topt = getattr(torch.optim, cls.__name__)(tparams, lr=2.0**-7)
    for step in range(1, 6):
        for p, tp, g in zip(params, tparams, grads(SIZES, BF16, step)):
            p.grad = cla.to_device(queue, g)
            tp.grad = torch.tensor(g.astype(np.float32)).to(torch.bfloat16)
        opt.step()
        topt.step()
        for p, tp in zip(params, tparams):
            theirs = topt.state[tp]["exp_avg"].float().numpy().astype(np.float64)
            ours = host(opt.state[id(p)]["exp_avg"]).astype(np.float64)
            assert np.all(np.abs(ours - theirs) <= ulp_of(theirs, BF16))
            assert np.mean(ours == theirs) > 0.99
            tp.data.copy_(torch.from_numpy(host(p.data).astype(np.float32)).to(torch.bfloat16))
            topt.state[tp]["exp_avg"].copy_(torch.from_numpy(ours.astype(np.float32)))


@pytest.mark.parametrize("dtype", LOW, ids=dtype_id)
def test_flat_storage_and_zero_grad(ctx_factory, dtype):
    """flatten_ and zero_grad(set_to_none=False) work on low-precision
    parameters (pyopencl's fill does not know bfloat16: its bits are
    zeroed), and a flat batch steps as the same tensors one by one."""
    from netcl.optim import flatten_
    queue = make_queue(ctx_factory)
    params, loose = make(queue, dtype, seed=23), make(queue, dtype, seed=23)
    flat = flatten_(params, queue)
    opt, opt_loose = Adam(params, master_weights=True), Adam(loose, master_weights=True)
    for step in (1, 2):
        for p, q, g in zip(params, loose, grads(SIZES, dtype, step)):
            p.grad.set(g)
            q.grad = cla.to_device(queue, g)
        opt.step()
        opt_loose.step()
    for p, q in zip(params, loose):
        np.testing.assert_array_equal(bits(host(p.data)), bits(host(q.data)))
    flat.zero_grad(queue)
    opt_loose.zero_grad(set_to_none=False)
    for p, q in zip(params, loose):
        assert not np.any(bits(host(p.grad))) and not np.any(bits(host(q.grad)))
