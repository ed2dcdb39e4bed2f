"""Self-check of tests/rmsprop_reference.py (pure NumPy; torch only for (a)).

(a) netcl's generic rule with every new flag at its default equals the torch
    oracle and real torch.optim.RMSprop (float64, 25 steps, rtol 1e-12).
(b) netcl's rule with each framework's preset reproduces that framework's
    oracle (25 steps, random gradients, a decaying lr so that the place where
    lr enters the momentum buffer is observable, rtol 1e-12).
(c) every netcl flag changes the trajectory (so (b) cannot pass by a flag
    being silently ignored).
(d) the rounding intervals (``Interval``, ``either_path_mismatches``) the
    torch parity tests fall back on: they hold torch's rule rounded as
    torch's AVX2/AVX-512 kernels do (fused) and as its DEFAULT ones do
    (unfused), and real torch on this process's dispatch path; they stay a
    few ulp wide where nothing cancels; a wrong rule still fails.

The float64 comparisons with real torch in (a) hold on every dispatch path
(``ATEN_CPU_CAPABILITY=avx2``, ``avx512``, ``default``): the worst relative
difference measured is 2.5e-13 on each, against RTOL = 1e-12.
"""

import itertools

import numpy as np
import pytest

try:  # works whether or not tests/ is a package
    from tests import rmsprop_reference as ref
except ImportError:  # pragma: no cover
    import rmsprop_reference as ref

STEPS = 25
SHAPE = (7, 5)
RTOL = 1e-12


def _data(seed):
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(SHAPE)
    grads = [rng.standard_normal(SHAPE) * (0.5 + rng.random()) for _ in range(STEPS)]
    return p0, grads


def _schedule(lr0, t):
    """A decaying learning rate, t = 1..STEPS."""
    return lr0 * (1.0 - 0.03 * (t - 1))


def _run(step_fn, p0, grads, lr_key, lr0, schedule=True, **hp):
    p, state, traj = p0.copy(), {}, []
    for t, g in enumerate(grads, start=1):
        lr = _schedule(lr0, t) if schedule else lr0
        p = step_fn(p, g, state, t, **{lr_key: lr}, **hp)
        traj.append(p)
    return np.array(traj), state


def _netcl(preset, p0, grads, schedule=True, **overrides):
    kw = dict(ref.PRESETS[preset])
    kw.update(overrides)
    lr0 = kw.pop("lr")
    return _run(ref.netcl_rmsprop_step, p0, grads, "lr", lr0, schedule, **kw)


def _close(a, b):
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=0)


# ---------------------------------------------------------------------------
# (a) torch
# ---------------------------------------------------------------------------
TORCH_COMBOS = list(itertools.product([0.0, 0.9], [False, True], [0.0, 0.1], [False, True]))


@pytest.mark.parametrize("momentum,centered,weight_decay,maximize", TORCH_COMBOS)
def test_netcl_defaults_equal_torch_oracle(momentum, centered, weight_decay, maximize):
    p0, grads = _data(1)
    hp = dict(momentum=momentum, centered=centered, weight_decay=weight_decay,
              maximize=maximize)
    want, st_t = _run(ref.torch_rmsprop_step, p0, grads, "lr", 1e-2, False, **hp)
    got, st_n = _netcl("torch", p0, grads, False, **hp)
    _close(got, want)
    assert set(st_n) == set(st_t)
    for k in st_t:
        _close(st_n[k], st_t[k])


def test_torch_preset_is_netcl_defaults():
    assert ref.PRESETS["torch"] == ref.NETCL_DEFAULTS


def test_netcl_and_oracle_match_real_torch():
    torch = pytest.importorskip("torch")
    p0, grads = _data(2)
    for momentum, centered, weight_decay, maximize in TORCH_COMBOS:
        hp = dict(momentum=momentum, centered=centered,
                  weight_decay=weight_decay, maximize=maximize)
        w = torch.tensor(p0, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.RMSprop([w], lr=1e-2, foreach=False, **hp)
        real = []
        for g in grads:
            w.grad = torch.tensor(g, dtype=torch.float64)
            opt.step()
            real.append(w.detach().numpy().copy())
        real = np.array(real)
        oracle, _ = _run(ref.torch_rmsprop_step, p0, grads, "lr", 1e-2, False, **hp)
        netcl, st = _netcl("torch", p0, grads, False, **hp)
        _close(oracle, real)
        _close(netcl, real)
        tstate = opt.state[w]
        for k in st:
            _close(st[k], tstate[k].numpy())


def test_real_torch_with_lr_schedule():
    """torch reads group['lr'] each step: lr stays outside the buffer."""
    torch = pytest.importorskip("torch")
    p0, grads = _data(3)
    hp = dict(momentum=0.9, centered=True, weight_decay=0.1)
    w = torch.tensor(p0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.RMSprop([w], lr=1e-2, foreach=False, **hp)
    real = []
    for t, g in enumerate(grads, start=1):
        opt.param_groups[0]["lr"] = _schedule(1e-2, t)
        w.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        real.append(w.detach().numpy().copy())
    netcl, _ = _netcl("torch", p0, grads, True, **hp)
    _close(netcl, np.array(real))


# ---------------------------------------------------------------------------
# (b) other frameworks
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("momentum,centered", list(itertools.product([0.0, 0.9], [False, True])))
def test_tf1_preset(momentum, centered):
    p0, grads = _data(10)
    lr0 = ref.PRESETS["tf1"]["lr"]
    want, st = _run(ref.tf1_rmsprop_step, p0, grads, "learning_rate", lr0,
                    momentum=momentum, centered=centered)
    got, st_n = _netcl("tf1", p0, grads, momentum=momentum, centered=centered)
    _close(got, want)
    _close(st_n["square_avg"], st["rms"])
    if centered:
        _close(st_n["grad_avg"], st["mg"])
    if momentum > 0:
        _close(st_n["momentum_buffer"], st["momentum"])


@pytest.mark.parametrize("momentum,centered,weight_decay",
                         list(itertools.product([0.0, 0.9], [False, True], [None, 0.1])))
def test_keras_preset(momentum, centered, weight_decay):
    p0, grads = _data(11)
    lr0 = ref.PRESETS["keras"]["lr"]
    want, st = _run(ref.keras_rmsprop_step, p0, grads, "learning_rate", lr0,
                    momentum=momentum, centered=centered, weight_decay=weight_decay)
    got, st_n = _netcl("keras", p0, grads, momentum=momentum, centered=centered,
                       weight_decay=weight_decay or 0.0)
    _close(got, want)
    _close(st_n["square_avg"], st["velocity"])
    if centered:
        _close(st_n["grad_avg"], st["average_gradient"])
    if momentum > 0:
        _close(st_n["momentum_buffer"], st["momentum"])


@pytest.mark.parametrize(
    "momentum,centered,weight_decay,decoupled,lr_in_momentum",
    list(itertools.product([0.0, 0.9], [False, True], [0.0, 0.1], [False, True], [True, False])))
def test_timm_preset(momentum, centered, weight_decay, decoupled, lr_in_momentum):
    p0, grads = _data(12)
    lr0 = ref.PRESETS["timm"]["lr"]
    want, st = _run(ref.timm_rmsprop_tf_step, p0, grads, "lr", lr0,
                    momentum=momentum, centered=centered, weight_decay=weight_decay,
                    decoupled_decay=decoupled, lr_in_momentum=lr_in_momentum)
    got, st_n = _netcl("timm", p0, grads, momentum=momentum, centered=centered,
                       weight_decay=weight_decay, decoupled_weight_decay=decoupled,
                       lr_in_momentum=lr_in_momentum)
    _close(got, want)
    assert set(st_n) == set(st)
    for k in st:
        _close(st_n[k], st[k])


OPTAX_COMBOS = [c for c in itertools.product(
    [None, 0.0, 0.9],      # momentum
    [False, True],         # nesterov
    [False, True],         # centered
    [False, True],         # bias_correction
    [True, False],         # eps_in_sqrt
    [0.0, 1.0],            # initial_scale
) if not (c[0] is None and c[1])]  # optax ignores nesterov without a trace


@pytest.mark.filterwarnings("ignore:invalid value encountered in sqrt:RuntimeWarning")
@pytest.mark.parametrize("momentum,nesterov,centered,bias_correction,eps_in_sqrt,initial_scale",
                         OPTAX_COMBOS)
def test_optax_preset(momentum, nesterov, centered, bias_correction, eps_in_sqrt,
                      initial_scale):
    p0, grads = _data(13)
    lr0 = ref.PRESETS["optax"]["lr"]
    want, st = _run(ref.optax_rmsprop_step, p0, grads, "learning_rate", lr0,
                    momentum=momentum, nesterov=nesterov, centered=centered,
                    bias_correction=bias_correction, eps_in_sqrt=eps_in_sqrt,
                    initial_scale=initial_scale)
    got, st_n = _netcl("optax", p0, grads, momentum=momentum or 0.0, nesterov=nesterov,
                       centered=centered, bias_correction=bias_correction,
                       eps_in_sqrt=eps_in_sqrt, initial_scale=initial_scale)
    if centered and bias_correction and initial_scale == 0.0:
        # Degenerate corner: at t=1 the corrected averages are g^2 and g, so the
        # variance is exactly 0 and what is left is rounding noise.  With eps in
        # the root the noise is divided by eps (~1e-8 relative error); with eps
        # outside, optax takes the root of the noise (NaN when it is negative).
        if eps_in_sqrt:
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
        else:
            assert np.all(np.isfinite(got))  # netcl's clamp keeps it finite
        return
    _close(got, want)
    _close(st_n["square_avg"], st["nu"])
    if centered:
        _close(st_n["grad_avg"], st["mu"])
    if momentum:
        # optax's trace accumulates the negative step (-lr already applied)
        _close(st_n["momentum_buffer"], -st["trace"])


# ---------------------------------------------------------------------------
# (c) every flag matters; init and clamp details
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("flag,value,base", [
    ("eps_in_sqrt", True, {"eps": 1e-2}),
    ("initial_scale", 1.0, {}),
    ("lr_in_momentum", True, {"momentum": 0.9}),
    ("nesterov", True, {"momentum": 0.9}),
    ("bias_correction", True, {}),
    ("decoupled_weight_decay", True, {"weight_decay": 0.1}),
    ("maximize", True, {}),
    ("centered", True, {}),
])
def test_each_flag_changes_the_result(flag, value, base):
    p0, grads = _data(20)
    a, _ = _netcl("torch", p0, grads, **base)
    b, _ = _netcl("torch", p0, grads, **base, **{flag: value})
    assert np.max(np.abs(a - b)) > 1e-9


def test_lr_in_momentum_is_invisible_with_constant_lr():
    p0, grads = _data(21)
    a, _ = _netcl("torch", p0, grads, False, momentum=0.9)
    b, _ = _netcl("torch", p0, grads, False, momentum=0.9, lr_in_momentum=True)
    np.testing.assert_allclose(a, b, rtol=1e-10)


def test_nesterov_without_momentum_is_noop():
    p0, grads = _data(22)
    a, st_a = _netcl("optax", p0, grads)
    b, st_b = _netcl("optax", p0, grads, nesterov=True)
    np.testing.assert_array_equal(a, b)
    assert "momentum_buffer" not in st_b


def test_init_state_layout():
    p = np.zeros(3)
    st = ref.netcl_rmsprop_init_state(p, centered=False, momentum=0.0, initial_scale=1.0)
    assert set(st) == {"square_avg"} and np.all(st["square_avg"] == 1.0)
    st = ref.netcl_rmsprop_init_state(p, centered=True, momentum=0.5, initial_scale=0.0)
    assert set(st) == {"square_avg", "grad_avg", "momentum_buffer"}
    with pytest.raises(ValueError):
        ref.netcl_rmsprop_init_state(p, centered=False, momentum=0.0, initial_scale=-1.0)


def test_clamp_variance_only_acts_on_negative_variance():
    # a state with v - m^2 < 0 (only reachable through rounding in practice)
    kw = dict(ref.PRESETS["torch"], centered=True)
    for clamp in (False, True):
        st = {"square_avg": np.array([0.0]), "grad_avg": np.array([10.0])}
        with np.errstate(invalid="ignore"):
            out = ref.netcl_rmsprop_step(np.array([1.0]), np.array([0.0]), st, 1,
                                         **dict(kw, clamp_variance=clamp))
        assert np.isnan(out[0]) != clamp
    # random gradients: the clamp never triggers, results are identical
    p0, grads = _data(23)
    a, _ = _netcl("torch", p0, grads, centered=True)
    b, _ = _netcl("torch", p0, grads, centered=True, clamp_variance=True)
    np.testing.assert_array_equal(a, b)
    # NaN is kept, not clamped to 0
    st = {"square_avg": np.array([np.nan]), "grad_avg": np.array([0.0])}
    kw = dict(ref.PRESETS["tf1"], centered=True)
    out = ref.netcl_rmsprop_step(np.array([1.0]), np.array([1.0]), st, 1, **kw)
    assert np.isnan(out[0])


def test_bias_correction_first_step_is_normalised():
    """With initial_scale 0 and bias correction, step 1 moves by lr*g/(|g|+eps)."""
    p0 = np.zeros(3)
    g = np.array([2.0, -0.5, 1e-3])
    kw = dict(ref.PRESETS["torch"], bias_correction=True)
    out = ref.netcl_rmsprop_step(p0, g, {}, 1, **kw)
    np.testing.assert_allclose(out, -kw["lr"] * g / (np.abs(g) + kw["eps"]), rtol=1e-13)


# ---------------------------------------------------------------------------
# (d) the rounding intervals behind the torch parity tests
# ---------------------------------------------------------------------------
def _f32_torch_rmsprop(p, g, state, fused, *, lr=1e-2, alpha=0.99, eps=1e-8,
                       weight_decay=0.0, momentum=0.0, centered=False, bug=None):
    """torch's RMSprop rule in float32 as either dispatch path rounds it:
    ``fused`` like the AVX2/AVX-512 kernels (one rounding per multiply-add,
    emulated through float64), else like DEFAULT (the product rounded first).
    ``bug="eps_in_sqrt"`` is a wrong rule for the negative checks."""
    f = np.float32

    def mad(a, b, c):  # a*b + c
        if fused:
            return (np.float64(a) * b.astype(np.float64) + c).astype(f)
        return a * b + c

    state = {k: v.copy() for k, v in state.items()}
    for name in ["square_avg"] + ["grad_avg"] * centered + ["momentum_buffer"] * (momentum > 0):
        state.setdefault(name, np.zeros_like(p))
    if weight_decay:
        g = mad(f(weight_decay), p, g)
    v = state["square_avg"] = mad(f(1 - alpha) * g, g, state["square_avg"] * f(alpha))
    if centered:
        m = state["grad_avg"] = mad(f(1 - alpha), g - state["grad_avg"], state["grad_avg"])
        v = mad(-m, m, v)
    d = np.sqrt(v + f(eps)) if bug == "eps_in_sqrt" else np.sqrt(v) + f(eps)
    if momentum > 0:
        b = state["momentum_buffer"] = state["momentum_buffer"] * f(momentum) + g / d
        return mad(f(-lr), b, p), state
    return p + (f(-lr) * g) / d, state


def _cancelling_data(n, seed):
    """Parameters and gradients where ``grad + 0.1*param`` cancels to ~1e-7
    for a tenth of the elements (the case that splits torch's paths)."""
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    near = rng.random(n) < 0.1
    g[near] = (-0.1 * p[near].astype(np.float64)
               + 1e-7 * rng.standard_normal(near.sum())).astype(np.float32)
    return p, g


_INTERVAL_CASES = [dict(weight_decay=0.1), dict(weight_decay=0.1, momentum=0.9, centered=True)]


@pytest.mark.parametrize("hp", _INTERVAL_CASES, ids=["wd", "wd-momentum-centered"])
def test_interval_holds_both_roundings_and_is_narrow(hp):
    """From one state, the fused and the unfused float32 step both lie in the
    interval of torch_rmsprop_step; they differ far beyond 8 ulp where the
    gradient cancels; where it does not, the interval is a few ulp wide."""
    p, g = _cancelling_data(20000, 30)
    state = {}
    for t in range(1, 4):
        fused = _f32_torch_rmsprop(p, g, state, True, **hp)
        unfused = _f32_torch_rmsprop(p, g, state, False, **hp)
        point = {k: ref.Interval(v) for k, v in state.items()}
        bound = ref.torch_rmsprop_step(ref.Interval(p), ref.Interval(g), point, t, lr=1e-2, **hp)
        for (new_p, new_state) in (fused, unfused):
            assert bound.contains(new_p).all()
            for name, value in new_state.items():
                assert point[name].contains(value).all(), name
        split = ~ref.within_nulp(fused[0], unfused[0])
        width = (bound.hi - bound.lo) / np.spacing(np.abs(fused[0])).astype(np.float64)
        if t == 1:  # the paths split far beyond conftest's 8 ulp where g cancels ...
            assert split.any()
        # ... while elsewhere the interval is a few ulp of the element wide.
        assert np.median(width[~split]) <= 8
        p, state = fused
        g = np.roll(g, 1)  # no more cancellation after the first step


@pytest.mark.parametrize("hp", _INTERVAL_CASES, ids=["wd", "wd-momentum-centered"])
def test_either_path_mismatches_accepts_roundings_rejects_bugs(hp):
    p0, g = _cancelling_data(20000, 31)
    rule_hp = dict(dict(lr=1e-2, alpha=0.99, eps=1e-8, momentum=0.0, centered=False,
                        maximize=False), **hp)

    def one_step(bug):
        ours = _f32_torch_rmsprop(p0, g, {}, True, bug=bug, **hp)
        theirs = _f32_torch_rmsprop(p0, g, {}, False, **hp)
        return ref.either_path_mismatches(
            ref.torch_rmsprop_step, 1, rule_hp, g,
            ({"param": p0}, dict(ours[1], param=ours[0])),
            ({"param": p0}, dict(theirs[1], param=theirs[0])),
            lambda name, a, e: ref.within_nulp(a, e))

    failures, fallbacks = one_step(None)
    assert failures == [] and fallbacks > 0
    failures, _ = one_step("eps_in_sqrt")
    assert failures and "outside the tolerance" in failures[0]


def test_real_torch_float32_inside_the_interval():
    """torch.optim.RMSprop in float32 on whatever dispatch path this process
    has (ATEN_CPU_CAPABILITY) lies in the interval on every element."""
    torch = pytest.importorskip("torch")
    p, g = _cancelling_data(20000, 32)
    for hp in _INTERVAL_CASES:
        w = torch.tensor(p.copy())
        opt = torch.optim.RMSprop([w], lr=1e-2, foreach=False, **hp)
        point = {}
        start = p.copy()
        for t in range(1, 4):
            w.grad = torch.tensor(g)
            opt.step()
            bound = ref.torch_rmsprop_step(ref.Interval(start), ref.Interval(g), point, t,
                                           lr=1e-2, **hp)
            assert bound.contains(w.numpy()).all(), (hp, t)
            for name, value in opt.state[w].items():
                if name != "step":
                    assert point[name].contains(value.numpy()).all(), (hp, t, name)
            start = w.numpy().copy()
            point = {k: ref.Interval(v.numpy().copy()) for k, v in opt.state[w].items()
                     if k != "step"}
