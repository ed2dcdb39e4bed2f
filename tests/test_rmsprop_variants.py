"""RMSProp's framework options and presets against the float64 reference rule.

The oracle is ``netcl_rmsprop_step`` in ``tests/rmsprop_reference.py`` (float64
NumPy; ``tests/test_rmsprop_reference.py`` ties it to each framework's own
rule and to torch). Every case runs STEPS steps and compares the parameters and
every state buffer after each step: float32 against the float64 oracle within
RTOL[float32] (accumulated float32 rounding), float64 within RTOL[float64],
measured by deviation().

What runs where. Each distinct set of kernel flags is one build per dtype
(~0.3-0.5 s cold on the 2-core PoCL machine, ~0.04 s from PoCL's disk
cache), and all oracle runs share one context (shared_queue) so each is built
once. The full cross is therefore kept to one dtype: ~175 builds in all,
about 55 s of CPU cold and under 30 s warm.

* CROSS: every combination of the seven new options crossed with centered
  and momentum {0, 0.9}, float32, small shapes (0, 1, 7 and 3x5 elements):
  200 cases, 120 distinct kernels. Combinations in which an option does
  nothing (lr_in_momentum or nesterov without momentum, clamp_variance
  without centered) are left out here and checked to be exact no-ops by
  test_noop_options; the degenerate centered + bias_correction +
  initial_scale=0 corner (zero variance at step 1) has its own test.
* SUBSET of CROSS (all options off, each alone, all on, per centered x
  momentum; 28 cases): float64 on the small shapes, and float32 and float64 on the long
  shapes (0, 1, 7 and 20011 elements: two chunks of 16384, a vector body and
  a scalar tail). The long shapes hold as many non-empty tensors as the small
  ones, so they reuse the same kernels.
* Every preset x centered x momentum x {float32, float64} x {small, long}
  (80 cases).

The learning rate changes at every step (a decaying schedule with a drop at
step 11), so where lr enters the momentum buffer (lr_in_momentum) is
observable, and so is decoupled decay's use of the current lr.
"""

import itertools

import numpy as np
import pyopencl.array as cla
import pytest

import netcl
from netcl import _kernels
from netcl.optim import RMSProp

from conftest import Mirror, assert_close, make_queue

try:  # works whether or not tests/ is imported as a package
    from tests import rmsprop_reference as ref
except ImportError:  # pragma: no cover
    import rmsprop_reference as ref

STEPS = 20
SMALL = [(0,), (1,), (7,), (3, 5)]
LONG = [(0,), (1,), (7,), (20011,)]
#: Largest allowed deviation() per dtype: relative to each element, plus the
#: same fraction of the buffer's scale as an absolute floor. The worst seen on
#: PoCL is ~1.3e-6 (float32, long shapes; ~2e-7 for the presets) and ~4e-15
#: (float64), so both leave room for other devices' rounding.
RTOL = {np.float32: 1e-5, np.float64: 1e-12}

#: Hyperparameters of the cross. eps is large so that its placement changes
#: results well beyond the float32 tolerance; alpha = 0.9 keeps bias
#: correction and the initial scale visible for all 20 steps.
CROSS_BASE = dict(lr=1e-2, alpha=0.9, eps=1e-3, weight_decay=0.1)

#: The new options and the values crossed.
OPTION_AXES = {
    "eps_in_sqrt": (False, True),
    "initial_scale": (0.0, 1.0),
    "lr_in_momentum": (False, True),
    "nesterov": (False, True),
    "bias_correction": (False, True),
    "decoupled_weight_decay": (False, True),
    "clamp_variance": (False, True),
}
BASE_AXES = {"centered": (False, True), "momentum": (0.0, 0.9)}


#: Options that act only together with another setting.
NEEDS = {"lr_in_momentum": "momentum", "nesterov": "momentum", "clamp_variance": "centered"}


def _active(case):
    """The new options that can act with this case's centered and momentum."""
    return [name for name in OPTION_AXES if name not in NEEDS or case[NEEDS[name]]]


def _left_out(case):
    """Why a combination is not in CROSS (None when it is)."""
    if any(case[name] != OPTION_AXES[name][0] for name in OPTION_AXES
           if name not in _active(case)):
        return "an option that cannot act"
    if case["centered"] and case["bias_correction"] and case["initial_scale"] == 0:
        return "zero variance at step 1"
    return None


def _all_cases():
    axes = {**BASE_AXES, **OPTION_AXES}
    for values in itertools.product(*axes.values()):
        yield dict(zip(axes, values))


CROSS = [case for case in _all_cases() if _left_out(case) is None]


def _options_on(case):
    return [name for name, (off, _) in OPTION_AXES.items() if case.get(name, off) != off]


def _is_subset(case):
    """All options off, exactly one on, or every option that can act on."""
    return len(_options_on(case)) in (0, 1, len(_active(case)))


SUBSET = [case for case in CROSS if _is_subset(case)]
PRESET_CASES = [dict(preset=name, centered=c, momentum=m)
                for name in RMSProp.PRESETS for c, m in itertools.product(*BASE_AXES.values())]


def case_id(case):
    parts = [f"{k}={v}" for k, v in case.items() if k in ("preset", "centered", "momentum")]
    return "-".join(parts + [f"{name}={case[name]}" for name in _options_on(case)])


def schedule(lr0, t):
    """The learning rate of step t = 1..STEPS: decaying, with a drop at step 11."""
    return lr0 * (1.0 - 0.02 * (t - 1)) * (0.3 if t > 10 else 1.0)


def gradient(rng, shape, dtype, step):
    # Scale varies over steps so the averages see both growth and decay.
    scale = 10.0 ** rng.uniform(-2, 1) * (1 + step % 3)
    return (scale * rng.standard_normal(shape)).astype(dtype)


_QUEUES = {}


def shared_queue(ctx_factory, dtype):
    """One queue per device for the oracle runs.

    Kernels are cached per context, so sharing one builds each flag
    combination once per session rather than once per test (a run itself
    takes ~50 ms). Calling ``ctx_factory`` also empties pyopencl's kernel
    caches (its ``fill`` among them), so it is called only the first time.
    """
    queue = _QUEUES.get(ctx_factory.device.int_ptr)
    if queue is None:
        queue = _QUEUES[ctx_factory.device.int_ptr] = make_queue(ctx_factory)
    if np.dtype(dtype) == np.float64 and not _kernels.supports_fp64(queue.device):
        pytest.skip(f"{queue.device.name} has no cl_khr_fp64")
    return queue


def deviation(actual, expected, scale):
    """The largest ``|actual - expected| / (|expected| + scale)``.

    ``scale`` is the largest magnitude the buffer has held so far (over every
    tensor of the run and every step): float32 rounding error is relative to
    the terms an element was summed from, and a momentum buffer or centered
    average can cancel to far below them.
    """
    if actual.size == 0:
        return 0.0
    error = np.abs(actual.astype(np.float64) - expected)
    return float(np.max(error / (np.abs(expected) + scale)))


def run_against_oracle(queue, dtype, shapes, options, steps=STEPS, seed=0, rtol=None):
    """Step netcl and the oracle side by side; compare after every step.

    ``options`` are RMSProp keyword arguments; the oracle gets the same ones
    on top of netcl's defaults. Every parameter and state buffer must stay
    within ``rtol`` (default RTOL[dtype]) by :func:`deviation`. Returns the
    largest deviation seen.
    """
    rtol = RTOL[dtype] if rtol is None else rtol
    rng = np.random.default_rng(seed)
    hosts = [rng.standard_normal(shape).astype(dtype) for shape in shapes]
    params = [netcl.Parameter(cla.to_device(queue, host)) for host in hosts]
    opt = RMSProp(params, **options)
    hyper = dict(ref.NETCL_DEFAULTS, **options)
    lr0 = hyper["lr"]
    expected = [host.astype(np.float64) for host in hosts]
    states = [{} for _ in hosts]
    scales = {}
    worst = 0.0
    for t in range(1, steps + 1):
        hyper["lr"] = opt.param_groups[0]["lr"] = schedule(lr0, t)
        for i, (p, shape) in enumerate(zip(params, shapes)):
            g = gradient(rng, shape, dtype, t)
            p.grad = cla.to_device(queue, g)
            expected[i] = ref.netcl_rmsprop_step(expected[i], g.astype(np.float64), states[i], t,
                                                 **hyper)
        opt.step()
        pairs = []
        for i, p in enumerate(params):
            state = opt.state[id(p)]
            assert set(state) == {"step"} | set(states[i]), \
                f"step {t} param {i}: state {set(state)}"
            assert state["step"] == t, f"step {t} param {i}: step count"
            pairs.append((i, "param", p.data.get(), expected[i]))
            pairs.extend((i, name, state[name].get(), value) for name, value in states[i].items())
        for _, name, _, value in pairs:
            if value.size:
                scales[name] = max(scales.get(name, 0.0), float(np.max(np.abs(value))))
        for i, name, actual, value in pairs:
            assert actual.dtype == dtype
            dev = deviation(actual, value, scales[name] if value.size else 0.0)
            assert dev <= rtol, (
                f"step {t} param {i} {name}: deviation {dev:.3g} > {rtol:.3g}; "
                f"worst element {np.argmax(np.abs(actual - value))}")
            worst = max(worst, dev)
    return worst


# --------------------------------------------------------------- the oracle runs
@pytest.mark.parametrize("case", CROSS, ids=case_id)
def test_option_cross_float32(ctx_factory, case):
    queue = shared_queue(ctx_factory, np.float32)
    run_against_oracle(queue, np.float32, SMALL, dict(CROSS_BASE, **case))


@pytest.mark.parametrize("dtype,shapes", [
    pytest.param(np.float64, SMALL, id="float64-small"),
    pytest.param(np.float32, LONG, id="float32-long"),
    pytest.param(np.float64, LONG, id="float64-long"),
])  # float32 on the small shapes: test_option_cross_float32
@pytest.mark.parametrize("case", SUBSET, ids=case_id)
def test_option_subset_dtypes_and_long_shape(ctx_factory, case, dtype, shapes):
    queue = shared_queue(ctx_factory, dtype)
    run_against_oracle(queue, dtype, shapes, dict(CROSS_BASE, **case))


@pytest.mark.parametrize("shapes", [SMALL, LONG], ids=["small", "long"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", PRESET_CASES, ids=case_id)
def test_presets(ctx_factory, case, dtype, shapes):
    queue = shared_queue(ctx_factory, dtype)
    options = dict(RMSProp.PRESETS[case["preset"]], centered=case["centered"],
                   momentum=case["momentum"])
    run_against_oracle(queue, dtype, shapes, options)


def test_cross_tolerance_sees_every_option():
    """In the cross's setting, each option (clamp_variance aside, which acts
    only on rounding noise) moves the oracle's params or state far beyond the
    float32 tolerance, so the cross cannot pass with an option ignored."""
    rng = np.random.default_rng(5)
    p0 = rng.standard_normal(50)
    grads = [gradient(rng, (50,), np.float64, t) for t in range(1, STEPS + 1)]

    def trajectory(**options):
        hyper = dict(ref.NETCL_DEFAULTS, **CROSS_BASE, **options)
        lr0, p, state, out = hyper["lr"], p0, {}, []
        for t, g in enumerate(grads, start=1):
            hyper["lr"] = schedule(lr0, t)
            p = ref.netcl_rmsprop_step(p, g, state, t, **hyper)
            out.append([p] + [state[k] for k in sorted(state)])
        return [np.array(arrays) for arrays in zip(*out)]  # per array: steps x elements

    def separation(a, b):  # the cross's measure, per array, scale over the whole run
        return max(deviation(x, y, np.max(np.abs(y))) for x, y in zip(a, b))

    base = dict(centered=True, momentum=0.9, initial_scale=1.0)
    for name, (off, on) in OPTION_AXES.items():
        if name != "clamp_variance":
            gap = separation(trajectory(**{**base, name: off}), trajectory(**{**base, name: on}))
            assert gap > 10 * RTOL[np.float32], (name, gap)


# ------------------------------------------------------------- special behaviour
def test_defaults_spelled_out_match_torch(ctx_factory):
    """Every new option at its default: torch.optim.RMSprop's results."""
    torch = pytest.importorskip("torch")
    queue = make_queue(ctx_factory)
    rng = np.random.default_rng(6)
    mirrors = [Mirror(queue, rng.standard_normal(s).astype(np.float32))
               for s in SMALL + [(20011,)]]
    hyper = dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.1, momentum=0.9, centered=True)
    opt = RMSProp([m.param for m in mirrors], **hyper, maximize=False, eps_in_sqrt=False,
                  initial_scale=0.0, lr_in_momentum=False, nesterov=False,
                  bias_correction=False, decoupled_weight_decay=False, clamp_variance=False)
    topt = torch.optim.RMSprop([m.tensor for m in mirrors], foreach=False, **hyper)
    for step in range(1, STEPS + 1):
        if step == 11:
            opt.param_groups[0]["lr"] = topt.param_groups[0]["lr"] = 2.5e-3
        for m in mirrors:
            m.set_grad(queue, gradient(rng, m.tensor.shape, np.float32, step))
        before = ref.mirror_buffers(opt, topt, mirrors)
        opt.step()
        topt.step()
        # torch's rounding depends on its CPU dispatch path where weight decay
        # cancels the gradient: see rmsprop_reference.assert_torch_rmsprop_step.
        ref.assert_torch_rmsprop_step(opt, topt, mirrors, step, before)


def _final(queue, options, shapes=((20,), (5,)), steps=6, dtype=np.float32):
    rng = np.random.default_rng(7)
    params = [netcl.Parameter(cla.to_device(queue, rng.standard_normal(s).astype(dtype)))
              for s in shapes]
    opt = RMSProp(params, **options)
    for t in range(1, steps + 1):
        opt.param_groups[0]["lr"] = schedule(options.get("lr", 1e-2), t)
        for p in params:
            p.grad = cla.to_device(queue, gradient(rng, p.data.shape, dtype, t))
        opt.step()
    return [p.data.get() for p in params] + [
        opt.state[id(p)][name].get() for p in params for name in sorted(opt.state[id(p)])
        if name != "step"]


@pytest.mark.parametrize("base,noop", [
    (dict(momentum=0.0), dict(lr_in_momentum=True)),
    (dict(momentum=0.0), dict(nesterov=True)),
    (dict(centered=False), dict(clamp_variance=True)),
    (dict(weight_decay=0.0), dict(decoupled_weight_decay=True)),
    (dict(centered=True, momentum=0.9), dict(clamp_variance=True)),  # never triggers here
], ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
def test_noop_options(ctx_factory, base, noop):
    """Options that cannot act are exact no-ops and build no kernel of their own."""
    queue = make_queue(ctx_factory)
    before = _final(queue, base)
    built = len(_kernels._programs[queue.context])
    after = _final(queue, dict(base, **noop))
    for a, b in zip(before, after):
        assert np.array_equal(a, b)
    if "clamp_variance" not in noop or not base.get("centered"):
        assert len(_kernels._programs[queue.context]) == built


def test_lr_in_momentum_with_constant_lr_is_torch_form(ctx_factory):
    """The two forms differ only by rounding while lr stays put: the buffer
    holds lr times torch's buffer."""
    queue = make_queue(ctx_factory)
    rng = np.random.default_rng(8)
    host = rng.standard_normal(100).astype(np.float32)
    grads = [rng.standard_normal(100).astype(np.float32) for _ in range(STEPS)]
    runs = []
    for inside in (False, True):
        p = netcl.Parameter(cla.to_device(queue, host))
        opt = RMSProp([p], lr=1e-2, momentum=0.9, lr_in_momentum=inside)
        for g in grads:
            p.grad = cla.to_device(queue, g)
            opt.step()
        runs.append((p.data.get(), opt.state[id(p)]["momentum_buffer"].get()))
    assert_close(runs[1][0], runs[0][0], "params", nulp=32)
    assert_close(runs[1][1], (1e-2 * runs[0][1].astype(np.float64)).astype(np.float32), "buffer",
                 nulp=32)


def test_lr_and_step_changes_never_rebuild(ctx_factory):
    queue = make_queue(ctx_factory)
    options = dict(CROSS_BASE, momentum=0.9, centered=True, eps_in_sqrt=True, initial_scale=1.0,
                   lr_in_momentum=True, nesterov=True, bias_correction=True,
                   decoupled_weight_decay=True, clamp_variance=True)
    run_against_oracle(queue, np.float32, SMALL, options, steps=2)
    built = len(_kernels._programs[queue.context])
    run_against_oracle(queue, np.float32, SMALL, options)
    assert len(_kernels._programs[queue.context]) == built


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("eps_in_sqrt", [True, False])
def test_centered_bias_correction_from_zero(ctx_factory, dtype, eps_in_sqrt):
    """The degenerate corner left out of CROSS: at step 1 the corrected
    averages are g^2 and g, so the variance is rounding noise only.

    Its value is not reproducible across dtypes or operation orders, so the
    oracle comparison is loose (float64, eps inside the root, where the noise
    is far below eps), and otherwise the clamp's promise is checked: the run
    stays finite."""
    queue = make_queue(ctx_factory, dtype)
    options = dict(lr=1e-3, alpha=0.9, eps=1e-8, centered=True, momentum=0.9,
                   bias_correction=True, eps_in_sqrt=eps_in_sqrt, clamp_variance=True)
    if dtype == np.float64 and eps_in_sqrt:
        run_against_oracle(queue, dtype, SMALL, options, rtol=1e-6)
        return
    for value in _final(queue, options, steps=STEPS, dtype=dtype):
        assert np.all(np.isfinite(value))


@pytest.mark.parametrize("clamp", [False, True])
def test_clamp_variance_on_negative_and_nan_variance(ctx_factory, clamp):
    """A negative centered variance becomes 0 with the clamp (NaN without it);
    a NaN variance stays NaN either way. 20 elements: vector body and tail."""
    queue = make_queue(ctx_factory)
    n = 20
    p = netcl.Parameter(cla.to_device(queue, np.ones(n, np.float32)),
                        cla.zeros(queue, n, np.float32))
    opt = RMSProp([p], centered=True, clamp_variance=clamp)
    opt.step()  # creates the state; a zero gradient leaves p at 1
    state = opt.state[id(p)]
    square_avg = np.zeros(n, np.float32)
    square_avg[1::2] = np.nan
    state["square_avg"].set(square_avg)
    state["grad_avg"].set(np.full(n, 10.0, np.float32))  # v - m^2 < 0 where v = 0
    opt.step()
    out = p.data.get()
    assert np.all(np.isnan(out[1::2])), "NaN variance must stay NaN"
    if clamp:
        assert np.array_equal(out[0::2], np.ones(n // 2, np.float32))
    else:
        assert np.all(np.isnan(out[0::2]))


def test_initial_scale_and_options_per_group(ctx_factory):
    """Options are per parameter group; initial_scale fills square_avg at the
    first step of each parameter."""
    queue = make_queue(ctx_factory)
    a = netcl.Parameter(cla.zeros(queue, 9, np.float32), cla.zeros(queue, 9, np.float32))
    b = netcl.Parameter(cla.zeros(queue, 9, np.float32), cla.zeros(queue, 9, np.float32))
    opt = RMSProp([{"params": [a]}, {"params": [b], **RMSProp.PRESETS["tf1"]}])
    opt.step()
    assert np.array_equal(opt.state[id(a)]["square_avg"].get(), np.zeros(9, np.float32))
    assert np.array_equal(opt.state[id(b)]["square_avg"].get(), np.full(9, 0.9, np.float32))


def test_state_dict_round_trip_keeps_options_and_step(ctx_factory):
    """bias_correction reads the step count: a reloaded run continues exactly."""
    queue = make_queue(ctx_factory)
    rng = np.random.default_rng(9)
    host = rng.standard_normal(40).astype(np.float32)
    grads = [rng.standard_normal(40).astype(np.float32) for _ in range(10)]

    def fresh(**overrides):
        p = netcl.Parameter(cla.to_device(queue, host))
        return p, RMSProp.from_preset("optax", [p], momentum=0.9, nesterov=True, **overrides)

    p1, opt1 = fresh(bias_correction=True, initial_scale=0.5)
    for g in grads[:5]:
        p1.grad = cla.to_device(queue, g)
        opt1.step()
    saved = opt1.state_dict()
    assert saved["param_groups"][0]["bias_correction"] is True
    assert saved["param_groups"][0]["initial_scale"] == 0.5
    p2, opt2 = fresh()
    p2.data.set(p1.data.get())
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["bias_correction"] is True
    for g in grads[5:]:
        for p, opt in ((p1, opt1), (p2, opt2)):
            p.grad = cla.to_device(queue, g)
            opt.step()
    assert np.array_equal(p1.data.get(), p2.data.get())


# ------------------------------------------------------------------------ presets
#: The hyperparameters each preset documents (wiki/RMSProp.md).
DOCUMENTED = {
    "torch": dict(lr=1e-2, alpha=0.99, eps=1e-8, eps_in_sqrt=False, initial_scale=0.0,
                  lr_in_momentum=False, decoupled_weight_decay=False, clamp_variance=False),
    "tf1": dict(lr=1e-3, alpha=0.9, eps=1e-10, eps_in_sqrt=True, initial_scale=1.0,
                lr_in_momentum=True, decoupled_weight_decay=False, clamp_variance=True),
    "keras": dict(lr=1e-3, alpha=0.9, eps=1e-7, eps_in_sqrt=True, initial_scale=0.0,
                  lr_in_momentum=True, decoupled_weight_decay=True, clamp_variance=True),
    "timm": dict(lr=1e-2, alpha=0.9, eps=1e-10, eps_in_sqrt=True, initial_scale=1.0,
                 lr_in_momentum=True, decoupled_weight_decay=False, clamp_variance=True),
    "optax": dict(lr=1e-3, alpha=0.9, eps=1e-8, eps_in_sqrt=True, initial_scale=0.0,
                  lr_in_momentum=True, decoupled_weight_decay=False, clamp_variance=True),
}
COMMON = dict(weight_decay=0.0, momentum=0.0, centered=False, maximize=False, nesterov=False,
              bias_correction=False)


def _param(ctx_factory):
    queue = shared_queue(ctx_factory, np.float32)
    return netcl.Parameter(cla.to_device(queue, np.zeros(3, np.float32)))


def test_library_presets_agree_with_the_reference():
    assert {name: dict(values) for name, values in RMSProp.PRESETS.items()} == ref.PRESETS


@pytest.mark.parametrize("name", list(DOCUMENTED))
def test_preset_hyperparameters(ctx_factory, name):
    opt = RMSProp.from_preset(name, [_param(ctx_factory)])
    assert opt.defaults == dict(DOCUMENTED[name], **COMMON, track_stats=False)
    assert opt.param_groups[0]["lr"] == DOCUMENTED[name]["lr"]


def test_torch_preset_is_the_constructor_default(ctx_factory):
    p = _param(ctx_factory)
    assert RMSProp.from_preset("torch", [p]).defaults == RMSProp([p]).defaults


def test_preset_overrides(ctx_factory):
    opt = RMSProp.from_preset("timm", [_param(ctx_factory)], momentum=0.9, lr=0.05,
                              clamp_variance=False)
    assert opt.defaults == dict(RMSProp.PRESETS["timm"], momentum=0.9, lr=0.05,
                                clamp_variance=False, track_stats=False)
    assert RMSProp.PRESETS["timm"]["momentum"] == 0.0  # the table is not changed


def test_presets_are_read_only():
    with pytest.raises(TypeError):
        RMSProp.PRESETS["tf1"]["lr"] = 1.0
    with pytest.raises(TypeError):
        RMSProp.PRESETS["mine"] = {}


@pytest.mark.parametrize("name", ["pytorch", "TF1", "", None, 3])
def test_unknown_preset(ctx_factory, name):
    with pytest.raises(ValueError, match="torch, tf1, keras, timm, optax") as info:
        RMSProp.from_preset(name, [_param(ctx_factory)])
    assert repr(name) in str(info.value)


def test_preset_rejects_unknown_and_bad_overrides(ctx_factory):
    p = _param(ctx_factory)
    with pytest.raises(TypeError, match="betas"):
        RMSProp.from_preset("keras", [p], betas=(0.9, 0.99))
    with pytest.raises(ValueError, match="initial_scale"):
        RMSProp.from_preset("tf1", [p], initial_scale=-1.0)


# ---------------------------------------------------------------- bad options
BAD_OPTIONS = [
    ("initial_scale", -1.0, ValueError),
    ("initial_scale", float("nan"), ValueError),
    ("initial_scale", float("inf"), ValueError),
    ("initial_scale", "1", ValueError),
    ("initial_scale", True, ValueError),
    ("initial_scale", None, ValueError),
] + [(name, value, TypeError) for name in
     ("eps_in_sqrt", "lr_in_momentum", "nesterov", "bias_correction",
      "decoupled_weight_decay", "clamp_variance") for value in (1, "yes", None)]


@pytest.mark.parametrize("name,value,error", BAD_OPTIONS)
def test_bad_option_raises_naming_the_value(ctx_factory, name, value, error):
    p = _param(ctx_factory)
    with pytest.raises(error, match=name) as info:
        RMSProp([p], **{name: value})
    assert repr(value) in str(info.value)
    # The same check guards add_param_group and a group edited before step().
    opt = RMSProp([p])
    q = netcl.Parameter(cla.to_device(p.data.queue, np.zeros(3, np.float32)))
    with pytest.raises(error, match=name):
        opt.add_param_group({"params": [q], name: value})
    assert len(opt.param_groups) == 1
    p.grad = cla.to_device(p.data.queue, np.ones(3, np.float32))
    opt.param_groups[0][name] = value
    with pytest.raises(error, match=name):
        opt.step()
    assert opt.state == {} and np.array_equal(p.data.get(), np.zeros(3, np.float32))


def test_bias_correction_needs_alpha_below_one(ctx_factory):
    p = _param(ctx_factory)
    RMSProp([p], alpha=1.0)  # torch accepts alpha = 1 ...
    with pytest.raises(ValueError, match="alpha"):  # ... but 1 - alpha^t would be 0
        RMSProp([p], alpha=1.0, bias_correction=True)
