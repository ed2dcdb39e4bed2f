"""netcl.amp.GradScaler against torch.amp.GradScaler("cpu") driving torch's optimizers.

The same scaled gradients go to both sides; after every update the scale must
be the same float, the same steps skipped, and params and state equal to
float32 rounding. Sequences inject inf/NaN into one element and grow the
scale (growth_interval=3); unscale_ and clipping run in between.
"""

import gc
import pickle

import numpy as np
import pyopencl as cl
import pyopencl.array as cla
import pytest

import netcl
from netcl import amp
from netcl.nn.utils import clip_grad_norm_, clip_grad_value_
from netcl.optim import SGD, Adam, AdamW, RMSProp, _engine

from conftest import Mirror, assert_close, make_queue

torch = pytest.importorskip("torch")


FAMILIES = [
    (Adam, "Adam", dict(lr=1e-2)),
    (AdamW, "AdamW", dict(lr=1e-2, amsgrad=True, weight_decay=0.1)),
    (SGD, "SGD", dict(lr=1e-1, momentum=0.9, dampening=0.1)),
    (RMSProp, "RMSprop", dict(lr=1e-2, momentum=0.9, centered=True)),
]
SIZES = [(300,), (7,), (0,), (5, 9), (20000,), (1,)]
# step -> (tensor, element, value) injected into the scaled gradient
BAD = {3: (1, 3, np.inf), 7: (4, 17000, np.nan), 8: (0, 0, -np.inf), 12: (3, 4, np.nan)}


@pytest.fixture
def queue(ctx_factory):
    return make_queue(ctx_factory)


def mirrors(queue, sizes=SIZES, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return [Mirror(queue, rng.standard_normal(s).astype(dtype)) for s in sizes]


def scaled_grads(ms, step, scale, dtype, bad=BAD):
    rng = np.random.default_rng(100 + step)
    grads = [(0.1 * rng.standard_normal(m.tensor.shape) * scale).astype(dtype) for m in ms]
    if step in bad:
        i, j, value = bad[step]
        grads[i].reshape(-1)[j] = value
    return grads


def set_grads(queue, ms, grads):
    for m, g in zip(ms, grads):
        m.set_grad(queue, g)


def assert_matches(opt, topt, ms, step, nulp=None):
    """Params always; state where torch has state (a parameter whose every
    step so far was skipped has none in torch, and step 0 in netcl)."""
    for i, m in enumerate(ms):
        assert_close(m.param.data.get(), m.tensor.detach().numpy(), f"step {step} param {i}", nulp)
        theirs = topt.state.get(m.tensor, {})
        ours = opt.state.get(id(m.param), {})
        if not theirs:
            assert ours.get("step", 0) == 0, f"step {step} param {i}: stepped, torch did not"
            continue
        for name, value in theirs.items():
            if name == "step":
                assert ours["step"] == int(value.item()), f"step {step} param {i}: step count"
            elif value is not None:
                assert_close(ours[name].get(), value.numpy(), f"step {step} param {i} {name}",
                             nulp)


def torch_skipped(tscaler, topt):
    return sum(v.item() for v in tscaler._found_inf_per_device(topt).values()) > 0


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f[1])
@pytest.mark.parametrize("mode", ["step", "unscale", "unscale-clip", "unscale-clip-value"])
def test_scaler_matches_torch(queue, family, mode):
    run_against_torch(queue, family, mode, np.float32)


@pytest.mark.parametrize("family", [FAMILIES[0], FAMILIES[3]], ids=lambda f: f[1])
@pytest.mark.parametrize("mode", ["step", "unscale-clip"])
def test_scaler_matches_torch_float64(ctx_factory, family, mode):
    run_against_torch(make_queue(ctx_factory, np.float64), family, mode, np.float64)


def run_against_torch(queue, family, mode, dtype):
    cls, torch_name, kw = family
    ms = mirrors(queue, dtype=dtype)
    opt = cls([m.param for m in ms], **kw)
    topt = getattr(torch.optim, torch_name)([m.tensor for m in ms], **kw)
    scaler = amp.GradScaler(queue, init_scale=2.0**10, growth_interval=3)
    tscaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    skipped = 0
    scales = []
    for step in range(14):
        tscaler.scale(torch.ones(()))
        grads = scaled_grads(ms, step, tscaler.get_scale(), dtype)
        set_grads(queue, ms, grads)
        if mode != "step":
            scaler.unscale_(opt)
            tscaler.unscale_(topt)
            # unscale_ is torch's formula element for element: bitwise equal
            for i, m in enumerate(ms):
                assert np.array_equal(m.param.grad.get(), m.tensor.grad.numpy(), equal_nan=True), \
                    f"step {step} grad {i} after unscale_"
            assert opt._control.get()[_engine.FOUND_INF] == float(torch_skipped(tscaler, topt))
        if mode == "unscale-clip":
            total = clip_grad_norm_([m.param for m in ms], 0.5)
            ttotal = torch.nn.utils.clip_grad_norm_([m.tensor for m in ms], 0.5)
            assert isinstance(total, cla.Array) and total.shape == ()
            if np.isfinite(ttotal.item()):
                assert_close(total.get(), ttotal.numpy(), f"step {step} total norm", nulp=64)
            else:
                assert not np.isfinite(total.get())
        if mode == "unscale-clip-value":
            clip_grad_value_([m.param for m in ms], 1e-2)
            torch.nn.utils.clip_grad_value_([m.tensor for m in ms], 1e-2)
        skipped += torch_skipped(tscaler, topt) if mode != "step" else 0
        scaler.step(opt)
        tscaler.step(topt)
        if mode == "step":
            skipped += torch_skipped(tscaler, topt)
        scaler.update()
        tscaler.update()
        scales.append(scaler.get_scale())
        assert scales[-1] == tscaler.get_scale(), f"step {step}: scale"
        assert opt.skipped_steps == skipped, f"step {step}: skipped steps"
        # The clipped runs differ from torch by the norm's summation order.
        assert_matches(opt, topt, ms, step, nulp=64 if mode == "unscale-clip" else None)
    assert skipped == len(BAD)
    # growth and backoff both happened
    assert max(scales) > 2.0**10 and min(scales) < 2.0**10
    assert scaler.state_dict() == tscaler.state_dict()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unscale_is_torch_bitwise_on_views_and_many_tensors(ctx_factory, dtype):
    """70 tensors (several launches), views at aligned and unaligned offsets,
    empty tensors, one chunk boundary: the unscaled gradients equal torch's."""
    queue = make_queue(ctx_factory, dtype)
    rng = np.random.default_rng(3)
    sizes = [int(n) for n in rng.integers(0, 300, 66)] + [0, 16384, 16385, 1]
    ms = [Mirror(queue, rng.standard_normal(n).astype(dtype)) for n in sizes]
    opt = Adam([m.param for m in ms])
    topt = torch.optim.Adam([m.tensor for m in ms])
    scale = 3.0 * 2**20  # 1/scale is not a power of two: real roundings
    scaler = amp.GradScaler(queue, init_scale=scale)
    tscaler = torch.amp.GradScaler("cpu", init_scale=scale)
    tscaler.scale(torch.ones(()))
    host = np.zeros(sum(sizes) + 11 * len(sizes), dtype)
    spans, at = [], 0
    for i, (m, n) in enumerate(zip(ms, sizes)):
        at += i % 11  # offsets 0..10 elements past the previous view
        host[at:at + n] = rng.standard_normal(n) * 1e4
        m.tensor.grad = torch.tensor(host[at:at + n].copy())
        spans.append((at, n))
        at += n
    big = cla.to_device(queue, host)
    for m, (at, n) in zip(ms, spans):
        m.param.grad = big[at:at + n]
    scaler.unscale_(opt)
    tscaler.unscale_(topt)
    for i, m in enumerate(ms):
        assert np.array_equal(m.param.grad.get(), m.tensor.grad.numpy()), f"grad {i}"
    assert opt._control.get()[_engine.FOUND_INF] == 0.0
    scaler.step(opt)
    tscaler.step(topt)
    scaler.update()
    tscaler.update()
    assert_matches(opt, topt, ms, 0)


@pytest.mark.parametrize("unscale_first", [False, True])
def test_scaler_with_fused_max_grad_norm(queue, unscale_first):
    """max_grad_norm fuses torch's unscale_ + clip_grad_norm_ + step."""
    ms = mirrors(queue)
    opt = Adam([m.param for m in ms], lr=1e-2, max_grad_norm=0.5)
    topt = torch.optim.Adam([m.tensor for m in ms], lr=1e-2)
    scaler = amp.GradScaler(queue, init_scale=2.0**8, growth_interval=3)
    tscaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=3)
    for step in range(8):
        tscaler.scale(torch.ones(()))
        set_grads(queue, ms, scaled_grads(ms, step, tscaler.get_scale(), np.float32))
        if unscale_first:
            scaler.unscale_(opt)
        tscaler.unscale_(topt)
        torch.nn.utils.clip_grad_norm_([m.tensor for m in ms], 0.5)
        scaler.step(opt)
        tscaler.step(topt)
        scaler.update()
        tscaler.update()
        assert scaler.get_scale() == tscaler.get_scale(), f"step {step}"
        assert_matches(opt, topt, ms, step, nulp=64)
    assert opt.skipped_steps == sum(1 for s in BAD if s < 8)


def test_two_optimizers_share_a_scaler(queue):
    """An inf in one optimizer's gradients skips that optimizer only; the
    scale backs off for both, as torch."""
    ms = mirrors(queue, [(50,), (8,), (33,)])
    a, b = ms[:2], ms[2:]
    opt_a = SGD([m.param for m in a], lr=0.1, momentum=0.9)
    opt_b = RMSProp([m.param for m in b], lr=1e-2)
    topt_a = torch.optim.SGD([m.tensor for m in a], lr=0.1, momentum=0.9)
    topt_b = torch.optim.RMSprop([m.tensor for m in b], lr=1e-2)
    scaler = amp.GradScaler(queue, init_scale=4.0, growth_interval=2)
    tscaler = torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=2)
    for step in range(6):
        tscaler.scale(torch.ones(()))
        bad = {1: (0, 5, np.inf), 4: (1, 0, np.nan)}
        set_grads(queue, ms, scaled_grads(ms, step, tscaler.get_scale(), np.float32, bad))
        if step % 2:
            scaler.unscale_(opt_b)
            tscaler.unscale_(topt_b)
        for s, o in ((scaler, opt_a), (scaler, opt_b)):
            s.step(o)
        tscaler.step(topt_a)
        tscaler.step(topt_b)
        scaler.update()
        tscaler.update()
        assert scaler.get_scale() == tscaler.get_scale(), f"step {step}"
        assert_matches(opt_a, topt_a, a, step)
        assert_matches(opt_b, topt_b, b, step)
    assert (opt_a.skipped_steps, opt_b.skipped_steps) == (2, 0)


@pytest.mark.parametrize("settings", [
    dict(init_scale=2.0**127, growth_interval=1),                 # growth would overflow
    dict(init_scale=3.0, growth_factor=1.7, backoff_factor=0.3, growth_interval=2),
    dict(init_scale=1e-3, growth_factor=1.0001, backoff_factor=0.999, growth_interval=1),
])
def test_scale_sequence_is_torch_bitwise(queue, settings):
    ms = mirrors(queue, [(4,)])
    opt = SGD([ms[0].param], lr=0.0)
    topt = torch.optim.SGD([ms[0].tensor], lr=0.0)
    scaler = amp.GradScaler(queue, **settings)
    tscaler = torch.amp.GradScaler("cpu", **settings)
    tscaler.scale(torch.ones(()))
    pattern = [0, 0, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0]
    for step, bad in enumerate(pattern):
        g = np.ones(4, np.float32)
        if bad:
            g[2] = np.inf
        ms[0].set_grad(queue, g)
        scaler.step(opt)
        tscaler.step(topt)
        scaler.update()
        tscaler.update()
        assert scaler.state_dict() == tscaler.state_dict(), f"step {step}"


def test_state_dict_round_trip_with_torch(queue):
    ms = mirrors(queue, [(16,)])
    opt = SGD([ms[0].param], lr=0.1)
    scaler = amp.GradScaler(queue, init_scale=1.5 * 2**10, growth_factor=3.0,
                            backoff_factor=0.25, growth_interval=5)
    for step in range(3):
        g = np.ones(16, np.float32)
        if step == 0:
            g[3] = np.nan
        ms[0].set_grad(queue, g)
        scaler.step(opt)
        scaler.update()
    saved = scaler.state_dict()
    assert saved == {"scale": 1.5 * 2**8, "growth_factor": 3.0, "backoff_factor": 0.25,
                     "growth_interval": 5, "_growth_tracker": 2}
    assert all(type(saved[k]) is t for k, t in [("scale", float), ("growth_factor", float),
                                                 ("backoff_factor", float),
                                                 ("growth_interval", int),
                                                 ("_growth_tracker", int)])
    tscaler = torch.amp.GradScaler("cpu")
    tscaler.load_state_dict(saved)
    tscaler.scale(torch.ones(()))
    assert tscaler.state_dict() == saved
    # ... and back: torch's state dict (after some torch steps) into netcl
    topt = torch.optim.SGD([ms[0].tensor], lr=0.1)
    for step in range(4):
        ms[0].tensor.grad = torch.ones(16)
        tscaler.step(topt)
        tscaler.update()
    theirs = tscaler.state_dict()
    fresh = amp.GradScaler(queue)
    fresh.load_state_dict(theirs)
    assert fresh.state_dict() == theirs
    assert fresh.get_scale() == tscaler.get_scale() == 1.5 * 2**8 * 3.0
    # the loaded tracker and interval drive the next updates as torch's
    opt2 = SGD([ms[0].param], lr=0.1)
    for step in range(7):
        ms[0].set_grad(queue, np.ones(16, np.float32))
        fresh.step(opt2)
        tscaler.step(topt)
        fresh.update()
        tscaler.update()
        assert fresh.state_dict() == tscaler.state_dict(), f"step {step}"
    # pickling keeps the state (unpickled on netcl's default queue)
    clone = pickle.loads(pickle.dumps(fresh))
    assert clone.state_dict() == fresh.state_dict()
    assert clone.queue == netcl.default_queue()


def test_load_state_dict_checks_everything_first(queue):
    scaler = amp.GradScaler(queue, init_scale=8.0)
    good = amp.GradScaler(queue, init_scale=2.0).state_dict()
    with pytest.raises(RuntimeError, match="The source state dict is empty"):
        scaler.load_state_dict({})
    with pytest.raises(KeyError, match="_growth_tracker"):
        scaler.load_state_dict({k: v for k, v in good.items() if k != "_growth_tracker"})
    for key, bad in [("scale", float("nan")), ("scale", -1.0), ("growth_factor", 0.9),
                     ("backoff_factor", 1.5), ("growth_interval", 0),
                     ("growth_interval", 2**24), ("_growth_tracker", 2.5),
                     ("_growth_tracker", -1)]:
        with pytest.raises(ValueError, match=key.lstrip("_")):
            scaler.load_state_dict(dict(good, **{key: bad}))
    assert scaler.state_dict() == dict(good, scale=8.0)
    scaler.load_state_dict(dict(good, scale=np.float32(0.25), _growth_tracker=torch.tensor(3)))
    assert scaler.get_scale() == 0.25 and scaler.state_dict()["_growth_tracker"] == 3


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scale_outputs(ctx_factory, dtype):
    queue = make_queue(ctx_factory, dtype)
    scaler = amp.GradScaler(queue, init_scale=3.0 * 2**-5)
    tscaler = torch.amp.GradScaler("cpu", init_scale=3.0 * 2**-5)
    host = np.random.default_rng(0).standard_normal(21).astype(dtype)
    x = cla.to_device(queue, host)
    expected = tscaler.scale(torch.tensor(host)).numpy()
    for out, ref in [(scaler.scale(x), expected), (scaler.scale(x[3:17]), expected[3:17]),
                     (scaler.scale(x[5]), expected[5])]:
        assert isinstance(out, cla.Array) and out.dtype == dtype
        assert np.array_equal(out.get(), ref)
    nested = scaler.scale([x[:2], (x[2:4], x[4:6])])
    assert isinstance(nested, list) and isinstance(nested[1], tuple)
    assert np.array_equal(nested[1][1].get(), expected[4:6])
    lazy = scaler.scale(iter([x[:3]]))
    assert not isinstance(lazy, (list, tuple))
    assert np.array_equal(next(lazy).get(), expected[:3])
    assert scaler.scale(2.5) == 2.5 * 3.0 * 2**-5
    assert scaler.scale(x[:0]).shape == (0,)
    with pytest.raises(ValueError, match="outputs must be"):
        scaler.scale(object())
    with pytest.raises(TypeError, match="int32"):
        scaler.scale(cla.zeros(queue, 3, np.int32))
    off = amp.GradScaler(queue, enabled=False)
    assert off.scale(x) is x and off.get_scale() == 1.0 and not off.is_enabled()


def test_disabled_scaler_steps_plainly(queue):
    ms = mirrors(queue, [(6,)])
    opt = SGD([ms[0].param], lr=0.5)
    scaler = amp.GradScaler(queue, enabled=False)
    ms[0].set_grad(queue, np.full(6, 2.0, np.float32))
    before = ms[0].param.data.get()
    scaler.unscale_(opt)  # a no-op
    assert scaler.step(opt) is None
    scaler.update()
    assert np.allclose(ms[0].param.data.get(), before - 1.0)
    assert scaler.state_dict() == {} and scaler.get_scale() == 1.0
    scaler.load_state_dict({})  # a no-op, as torch's
    assert scaler.step(opt, lambda: 3.0) == 3.0  # closures go to optimizer.step()


def test_update_with_new_scale(queue):
    ms = mirrors(queue, [(4,)])
    opt = SGD([ms[0].param], lr=0.1)
    scaler = amp.GradScaler(queue, growth_interval=4)
    tscaler = torch.amp.GradScaler("cpu", growth_interval=4)
    tscaler.scale(torch.ones(()))
    topt = torch.optim.SGD([ms[0].tensor], lr=0.1)
    for new in [None, 100.0, None, cla.to_device(queue, np.array([0.3], np.float32)), None]:
        ms[0].set_grad(queue, np.ones(4, np.float32))
        scaler.step(opt)
        tscaler.step(topt)
        scaler.update(new)
        # torch 2.13 copies a 0-d tensor only (its scale is 0-d); netcl takes either
        tscaler.update(torch.tensor(new.get()[0]) if isinstance(new, cla.Array) else new)
        assert scaler.state_dict() == tscaler.state_dict()
    if _has_fp64(queue):
        scaler.update(cla.to_device(queue, np.array([0.1], np.float64)))
        assert scaler.get_scale() == float(np.float32(0.1))
    for bad in [0.0, float("inf"), -2.0, "2"]:
        with pytest.raises(ValueError, match="new_scale"):
            scaler.update(bad)
    with pytest.raises(ValueError, match="1-element"):
        scaler.update(cla.zeros(queue, 2, np.float32))


def _has_fp64(queue):
    from netcl import _kernels
    return _kernels.supports_fp64(queue.device)


def test_torch_errors_for_misuse(queue):
    ms = mirrors(queue, [(4,)])
    opt = Adam([ms[0].param])
    scaler = amp.GradScaler(queue)
    with pytest.raises(AssertionError, match="No inf checks were recorded prior to update"):
        scaler.update()
    with pytest.raises(AssertionError, match="No inf checks were recorded for this optimizer"):
        scaler.step(opt)  # no gradient anywhere
    ms[0].set_grad(queue, np.ones(4, np.float32))
    with pytest.raises(RuntimeError, match="Closure use is not currently supported"):
        scaler.step(opt, closure=lambda: 0.0)
    with pytest.raises(RuntimeError, match="Closure use is not currently supported"):
        scaler.step(opt, lambda: 0.0)
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match=r"unscale_\(\) has already been called on this "
                                           r"optimizer since the last update\(\)"):
        scaler.unscale_(opt)
    scaler.step(opt)
    with pytest.raises(RuntimeError, match=r"unscale_\(\) is being called after step\(\)"):
        scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match=r"step\(\) has already been called since the last "
                                           r"update\(\)"):
        scaler.step(opt)
    with pytest.raises(AssertionError, match="pickled"):
        pickle.dumps(scaler)
    scaler.update()
    scaler.unscale_(opt)  # a new iteration
    with pytest.raises(TypeError, match="netcl.optim optimizers"):
        scaler.step(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
    ms[0].param.grad = cla.zeros(queue, 4, np.int32)
    scaler.update()
    with pytest.raises(TypeError, match="parameter 0"):
        scaler.unscale_(opt)


@pytest.mark.parametrize("name, value", [
    ("init_scale", 0.0), ("init_scale", -1.0), ("init_scale", float("inf")),
    ("init_scale", float("nan")), ("init_scale", "1"), ("init_scale", 1e39),
    ("growth_factor", 1.0), ("growth_factor", 0.5), ("growth_factor", float("inf")),
    ("backoff_factor", 1.0), ("backoff_factor", 0.0), ("backoff_factor", -0.5),
    ("growth_interval", 0), ("growth_interval", 2**24), ("growth_interval", 1.5),
    ("growth_interval", True),
])
def test_constructor_checks_arguments(queue, name, value):
    with pytest.raises(ValueError, match=name) as info:
        amp.GradScaler(queue, **{name: value})
    assert repr(value) in str(info.value)


def test_constructor_types(queue):
    with pytest.raises(TypeError, match="enabled"):
        amp.GradScaler(queue, enabled="yes")
    with pytest.raises(TypeError, match="'cuda'"):
        amp.GradScaler("cuda")
    scaler = amp.GradScaler(queue.context)
    assert scaler.get_scale() == 2.0**16 and scaler.queue.context == queue.context
    assert (scaler.get_growth_factor(), scaler.get_backoff_factor(),
            scaler.get_growth_interval(), scaler.is_enabled()) == (2.0, 0.5, 2000, True)
    scaler.set_growth_factor(4.0)
    scaler.set_backoff_factor(0.125)
    scaler.set_growth_interval(7)
    assert scaler.state_dict()["growth_factor"] == 4.0
    for setter, bad in [(scaler.set_growth_factor, 1.0), (scaler.set_backoff_factor, 2.0),
                        (scaler.set_growth_interval, 0)]:
        with pytest.raises(ValueError, match=repr(bad)):
            setter(bad)


def test_scaler_on_another_queue_is_ordered(queue):
    """The scaler's state on one queue, the optimizer on another: markers and
    barriers order them without a host wait, and the result is torch's."""
    other = cl.CommandQueue(queue.context)
    ms = mirrors(queue, [(64,), (9,)])
    opt = Adam([m.param for m in ms], lr=1e-2)
    topt = torch.optim.Adam([m.tensor for m in ms], lr=1e-2)
    scaler = amp.GradScaler(other, init_scale=16.0, growth_interval=2)
    tscaler = torch.amp.GradScaler("cpu", init_scale=16.0, growth_interval=2)
    for step in range(6):
        tscaler.scale(torch.ones(()))
        set_grads(queue, ms, scaled_grads(ms, step, tscaler.get_scale(), np.float32,
                                          {3: (0, 1, np.nan)}))
        if step % 2:
            scaler.unscale_(opt)
            tscaler.unscale_(topt)
        scaler.step(opt)
        tscaler.step(topt)
        scaler.update()
        tscaler.update()
        assert scaler.get_scale() == tscaler.get_scale()
        assert_matches(opt, topt, ms, step)


def test_no_host_sync(queue, monkeypatch):
    """scale(Array), unscale_, clipping, step and update never wait for the device."""
    ms = mirrors(queue, [(100,), (7,)])
    params = [m.param for m in ms]
    opt = Adam(params, lr=1e-2)
    scaler = amp.GradScaler(queue)
    loss = cla.to_device(queue, np.ones((), np.float32))

    def iteration():
        set_grads(queue, ms, [np.ones(100, np.float32), np.ones(7, np.float32)])
        scaler.scale(loss)
        scaler.unscale_(opt)
        clip_grad_norm_(params, 1.0)
        clip_grad_value_(params, 0.5)
        scaler.step(opt)
        scaler.update()

    iteration()  # builds everything
    queue.finish()

    def forbidden(*args, **kwargs):
        raise AssertionError("a host sync")

    # Garbage left by earlier tests must not be collected while the sync
    # methods raise: a finaliser that waits would then abort the process.
    gc.collect()
    gc.disable()
    try:
        monkeypatch.setattr(cla.Array, "get", forbidden)
        monkeypatch.setattr(cla.Array, "get_async", forbidden)
        monkeypatch.setattr(cl, "wait_for_events", forbidden)
        monkeypatch.setattr(cl.Event, "wait", forbidden, raising=False)
        monkeypatch.setattr(cl.CommandQueue, "finish", forbidden, raising=False)
        iteration()
        iteration()
    finally:
        monkeypatch.undo()
        gc.enable()
    assert opt.state[id(params[0])]["step"] == 3
