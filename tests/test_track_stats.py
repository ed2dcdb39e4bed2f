"""track_stats: the statistics each step computes inside its update pass,
against a float64 NumPy computation from the same inputs (the parameters
before the step, the gradients, and the parameters and state after it)."""

import math

import numpy as np
import pyopencl.array as cla
import pytest

import netcl
from netcl.amp import GradScaler
from netcl.optim import SGD, Adam, AdamW, RMSProp

from conftest import make_queue
from test_step_engine import VARIANTS, variant_id

SIZES = [300, 0, 1, 7, 40000, 33]  # empty and 1-element tensors; one spans chunks


def make(queue, dtype, cls, kw, seed=0, **options):
    rng = np.random.default_rng(seed)
    params = [netcl.Parameter(cla.to_device(queue, rng.standard_normal(n).astype(dtype)))
              for n in SIZES]
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    return params, cls(named, **dict(dict(kw, track_stats=True), **options))


def grads(params, seed, dtype):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(p.data.size).astype(dtype) for p in params]


def effective_lr(opt, group, state, t):
    """The factor that multiplies the gradient (RMSProp) or exp_avg (Adam)."""
    lr, eps = group["lr"], group["eps"]
    if isinstance(opt, Adam):
        v = state["max_exp_avg_sq" if group["amsgrad"] else "exp_avg_sq"].astype(np.float64)
        b1, b2 = group["betas"]
        return lr / (1 - b1 ** t) / (np.sqrt(v) / math.sqrt(1 - b2 ** t) + eps)
    v = state["square_avg"].astype(np.float64)
    m = state.get("grad_avg")
    if group["bias_correction"]:
        v = v / (1 - group["alpha"] ** t)
        m = None if m is None else m / (1 - group["alpha"] ** t)
    if group["centered"]:
        v = v - m.astype(np.float64) ** 2
    avg = np.sqrt(v + eps) if group["eps_in_sqrt"] else np.sqrt(v) + eps
    return lr / avg


def expected(opt, before, host_grads, after, state, t, skipped=False):
    group = opt.param_groups[0]
    out = {}
    for i, (p0, g, p1) in enumerate(zip(before, host_grads, after)):
        g64, p64 = g.astype(np.float64), p0.astype(np.float64)
        d = 0.0 if skipped else p1.astype(np.float64) - p64
        with np.errstate(invalid="ignore", over="ignore"):
            e = {"grad_norm": math.sqrt(np.sum(g64 * g64)), "param_norm": np.linalg.norm(p64),
                 "update_norm": float(np.linalg.norm(d)) if not skipped else 0.0,
                 "nonfinite": int(np.sum(~np.isfinite(g))), "zeros": int(np.sum(g == 0)),
                 "numel": g.size}
        if not skipped and g.size:
            s = state.get(i, {})
            if opt.stats_second_moment in s:
                v = s[opt.stats_second_moment].astype(np.float64)
                e["second_moment_rms"] = math.sqrt(np.mean(v * v))
            if opt.stats_momentum in s:
                e["momentum_norm"] = np.linalg.norm(s[opt.stats_momentum].astype(np.float64))
            if opt.stats_effective_lr:
                lr = effective_lr(opt, group, s, t)
                e.update(lr_min=lr.min(), lr_max=lr.max(), lr_mean=lr.mean())
        out[f"p{i}"] = e
    return out


def compare(got, want, rtol):
    for name, e in want.items():
        g = got[name]
        for key, value in e.items():
            if isinstance(value, int):
                assert g[key] == value, (name, key)
            elif math.isnan(value):
                assert math.isnan(g[key]), (name, key)
            else:
                assert g[key] == pytest.approx(value, rel=rtol, abs=1e-30), (name, key, g[key])
        expected_keys = set(e) | {"update_to_weight"}
        if e["numel"]:
            assert set(g) == expected_keys, name


def run(queue, opt, params, dtype, seed, poison=None):
    before = [p.data.get() for p in params]
    host = grads(params, seed, dtype)
    if poison is not None:
        host[4][123] = poison
    for p, g in zip(params, host):
        p.grad = cla.to_device(queue, g)
    opt.step()
    stats = opt.stats()
    after = [p.data.get() for p in params]
    return before, host, after, stats


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_statistics_match_numpy(ctx_factory, variant, dtype):
    queue = make_queue(ctx_factory, dtype)
    cls, kw = variant
    params, opt = make(queue, dtype, cls, kw)
    rtol = 5e-5 if dtype == np.float32 else 1e-9
    for step in range(1, 4):
        before, host, after, stats = run(queue, opt, params, dtype, step)
        state = opt.state_dict()["state"]
        want = expected(opt, before, host, after, state, step)
        assert stats["step"] == step and not stats["skipped"]
        compare(stats["groups"][0]["params"], want, rtol)
        aggregate = stats["global"]
        assert aggregate == stats["groups"][0]["stats"]
        assert stats["groups"][0]["lr"] == kw["lr"]
        assert aggregate["grad_norm"] == pytest.approx(
            math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in host)), rel=rtol)
        assert aggregate["numel"] == sum(SIZES)
        ratio = aggregate["update_norm"] / aggregate["param_norm"]
        assert aggregate["update_to_weight"] == pytest.approx(ratio, rel=1e-12)
        if "lr_min" in aggregate:
            lrs = [w for w in want.values() if "lr_min" in w]
            assert aggregate["lr_min"] == pytest.approx(min(w["lr_min"] for w in lrs), rel=rtol)
            assert aggregate["lr_max"] == pytest.approx(max(w["lr_max"] for w in lrs), rel=rtol)


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_tracking_changes_no_bit_of_the_step(ctx_factory, variant):
    queue = make_queue(ctx_factory)
    cls, kw = variant
    params, opt = make(queue, np.float32, cls, kw)
    twin_params, twin = make(queue, np.float32, cls, kw, track_stats=False)
    for step in range(3):
        host = grads(params, step, np.float32)
        for ps in (params, twin_params):
            for p, g in zip(ps, host):
                p.grad = cla.to_device(queue, g)
        opt.step()
        twin.step()
    for p, q in zip(params, twin_params):
        assert np.array_equal(p.data.get(), q.data.get())
    a, b = opt.state_dict()["state"], twin.state_dict()["state"]
    for i in a:
        for name in a[i]:
            assert np.array_equal(a[i][name], b[i][name])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_gradient_counted_and_skipped_step_reported(ctx_factory, bad):
    queue = make_queue(ctx_factory)
    params, opt = make(queue, np.float32, Adam, dict(lr=1e-2), skip_nonfinite=True)
    run(queue, opt, params, np.float32, 1)
    before, host, after, stats = run(queue, opt, params, np.float32, 2, poison=bad)
    assert stats["skipped"] and all(np.array_equal(a, b) for a, b in zip(before, after))
    want = expected(opt, before, host, after, None, 2, skipped=True)
    compare(stats["groups"][0]["params"], want, 5e-5)
    assert stats["global"]["nonfinite"] == 1
    assert "lr_min" not in stats["global"] and stats["global"]["update_norm"] == 0.0

    # Unguarded, the step applies it: counted, and the norms show it.
    params, opt = make(queue, np.float32, RMSProp, dict(lr=1e-2))
    _, _, _, stats = run(queue, opt, params, np.float32, 1, poison=bad)
    assert not stats["skipped"] and stats["global"]["nonfinite"] == 1
    assert not math.isfinite(stats["groups"][0]["params"]["p4"]["grad_norm"])


def test_grad_norm_is_unscaled_and_before_clipping(ctx_factory):
    queue = make_queue(ctx_factory)
    params, opt = make(queue, np.float32, SGD, dict(lr=0.1, momentum=0.9), max_grad_norm=1.0)
    scaler = GradScaler(queue, init_scale=1024.0)
    host = grads(params, 5, np.float32)
    for p, g in zip(params, host):
        p.grad = cla.to_device(queue, (g * np.float32(1024.0)).astype(np.float32))
    scaler.step(opt)
    scaler.update()
    stats = opt.stats()
    total = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in host))
    assert stats["global"]["grad_norm"] == pytest.approx(total, rel=5e-5)
    # The update used the clipped gradient: momentum is coef * g on a first step.
    assert stats["global"]["momentum_norm"] == pytest.approx(1.0, rel=1e-4)


def test_per_group_tracking_and_empty_stats(ctx_factory):
    queue = make_queue(ctx_factory)
    a, b = (netcl.Parameter(cla.to_device(queue, np.ones(n, np.float32))) for n in (5, 6))
    opt = AdamW([{"params": [a]}, {"params": [b], "track_stats": True}], lr=0.1)
    assert opt.stats() == {"step": 0, "skipped": False, "global": {}, "groups": {}}
    a.grad = cla.to_device(queue, np.ones(5, np.float32))
    b.grad = cla.to_device(queue, np.ones(6, np.float32))
    opt.step()
    stats = opt.stats()
    assert list(stats["groups"]) == [1] and list(stats["groups"][1]["params"]) == [1]
    assert stats["global"]["numel"] == 6
    with pytest.raises(TypeError, match="track_stats"):
        opt.param_groups[0]["track_stats"] = "yes"
        opt.step()


def test_tracking_switched_between_steps(ctx_factory):
    """track_stats is a group key: switching it between steps switches kernels
    (no rebuild after the first of each), leaves the steps' bits unchanged,
    and stats() reports the last tracked step."""
    queue = make_queue(ctx_factory)
    params, opt = make(queue, np.float32, Adam, dict(lr=1e-2), track_stats=False)
    twin_params, twin = make(queue, np.float32, Adam, dict(lr=1e-2), track_stats=False)
    for step in range(6):
        opt.param_groups[0]["track_stats"] = step % 2 == 1
        host = grads(params, step, np.float32)
        for ps in (params, twin_params):
            for p, g in zip(ps, host):
                p.grad = cla.to_device(queue, g)
        opt.step()
        twin.step()
        stats = opt.stats()
        assert stats["step"] == (step + 1) // 2
    for p, q in zip(params, twin_params):
        assert np.array_equal(p.data.get(), q.data.get())
    total = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in host))
    assert stats["global"]["grad_norm"] == pytest.approx(total, rel=5e-5)
