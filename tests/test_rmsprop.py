"""RMSProp against torch.optim.RMSprop, step by step, params and every state buffer.

Each element must be within 8 ulp (float32; 64 for float64) of torch's, as
conftest's ``assert_close`` -- netcl fuses where torch's AVX2/AVX-512 kernels
do, so there almost every element is bit for bit torch's. torch's DEFAULT
kernels (``ATEN_CPU_CAPABILITY=default``) do not fuse, and where weight decay
cancels the gradient the two roundings end up 10^2 ulp apart; such an element
passes only if it is a value torch's rule gives from netcl's previous state
under some rounding (``rmsprop_reference.assert_torch_rmsprop_step``).
"""

import itertools

import numpy as np
import pyopencl.array as cla
import pytest

import netcl
from netcl import _kernels
from netcl.optim import RMSProp, RMSprop

from conftest import Mirror, assert_close, make_queue

try:  # works whether or not tests/ is imported as a package
    from tests import rmsprop_reference as ref
except ImportError:  # pragma: no cover
    import rmsprop_reference as ref

torch = pytest.importorskip("torch")

FLAGS = [dict(momentum=m, centered=c, weight_decay=wd, maximize=mx)
         for m, c, wd, mx in itertools.product((0.0, 0.9), (False, True), (0.0, 0.1),
                                               (False, True))]
SMALL_SHAPES = [(0,), (1,), (7,), (3, 5), (2, 3, 4), (13,)]
LARGE_SHAPE = (1000003,)


def flag_id(flags):
    return "-".join(f"{k}={v}" for k, v in flags.items())


def gradient(rng, shape, dtype, step):
    # Scale varies over steps so the averages see both growth and decay.
    scale = 10.0 ** rng.uniform(-2, 1) * (1 + step % 3)
    return (scale * rng.standard_normal(shape)).astype(dtype)


def run_parity(queue, dtype, shapes_per_group, lrs, flags, steps=20, seed=0,
               change_lr_at=None):
    rng = np.random.default_rng(seed)
    groups, torch_groups, mirrors = [], [], []
    for shapes, lr in zip(shapes_per_group, lrs):
        ms = [Mirror(queue, rng.standard_normal(s).astype(dtype)) for s in shapes]
        mirrors.extend(ms)
        groups.append({"params": [m.param for m in ms], "lr": lr})
        torch_groups.append({"params": [m.tensor for m in ms], "lr": lr})
    opt = RMSProp(groups, **flags)
    topt = torch.optim.RMSprop(torch_groups, foreach=False, **flags)
    for step in range(1, steps + 1):
        if step == change_lr_at:
            for g, tg in zip(opt.param_groups, topt.param_groups):
                g["lr"] *= 0.25
                tg["lr"] *= 0.25
        for m in mirrors:
            m.set_grad(queue, gradient(rng, m.tensor.shape, dtype, step))
        before = ref.mirror_buffers(opt, topt, mirrors)
        opt.step()
        topt.step()
        # Within 8 ulp of torch, or (where torch's own rounding depends on its
        # CPU dispatch path) a value torch's rule can give: see
        # rmsprop_reference.assert_torch_rmsprop_step.
        ref.assert_torch_rmsprop_step(opt, topt, mirrors, step, before)
    return opt, mirrors


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("flags", FLAGS, ids=flag_id)
def test_parity_small_shapes_two_groups(ctx_factory, dtype, flags):
    queue = make_queue(ctx_factory, dtype)
    run_parity(queue, dtype, [SMALL_SHAPES[:3], SMALL_SHAPES[3:]], [1e-2, 3e-3], flags)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("flags", FLAGS, ids=flag_id)
def test_parity_large_tensor(ctx_factory, dtype, flags):
    queue = make_queue(ctx_factory, dtype)
    run_parity(queue, dtype, [[LARGE_SHAPE], [(1,), (7,)]], [1e-2, 3e-3], flags)


@pytest.mark.parametrize("flags", [FLAGS[0], FLAGS[-1]], ids=flag_id)
def test_parity_many_tensors_several_launches(ctx_factory, flags):
    # More tensors than one kernel launch takes, with lengths around the
    # vector width and the chunk size, exercises the launch split and tails.
    queue = make_queue(ctx_factory)
    rng = np.random.default_rng(1)
    lengths = [int(n) for n in rng.integers(1, 40, size=50)] + [16, 17, 16383, 16384, 16385, 0]
    run_parity(queue, np.float32, [[(n,) for n in lengths]], [1e-2], flags, steps=5)


def test_lr_change_mid_run_matches_and_never_rebuilds(ctx_factory):
    queue = make_queue(ctx_factory)
    flags = dict(momentum=0.9, centered=True)
    shapes = [[(7,), (100,)], [(3, 3)]]
    run_parity(queue, np.float32, shapes, [1e-2, 5e-3], flags, steps=2)  # warm the cache
    built = len(_kernels._programs[queue.context])
    run_parity(queue, np.float32, shapes, [1e-2, 5e-3], flags, steps=20, change_lr_at=10)
    assert len(_kernels._programs[queue.context]) == built


def test_params_that_are_views_into_one_buffer(ctx_factory):
    queue = make_queue(ctx_factory)
    rng = np.random.default_rng(2)
    host = rng.standard_normal(100).astype(np.float32)
    flat = cla.to_device(queue, host)
    flat_grad = cla.to_device(queue, rng.standard_normal(100).astype(np.float32))
    a, b = netcl.Parameter(flat[3:40]), netcl.Parameter(flat[40:97])
    a.grad, b.grad = flat_grad[10:47], flat_grad[0:57]
    opt = RMSProp([a, b], lr=1e-2, momentum=0.9)
    ta = torch.tensor(host[3:40], requires_grad=True)
    tb = torch.tensor(host[40:97], requires_grad=True)
    ta.grad = torch.tensor(flat_grad.get()[10:47])
    tb.grad = torch.tensor(flat_grad.get()[0:57])
    topt = torch.optim.RMSprop([ta, tb], lr=1e-2, momentum=0.9)
    for _ in range(5):
        opt.step()
        topt.step()
    out = flat.get()
    assert_close(out[3:40], ta.detach().numpy(), "view a")
    assert_close(out[40:97], tb.detach().numpy(), "view b")
    assert np.array_equal(out[:3], host[:3]) and np.array_equal(out[97:], host[97:]), \
        "elements outside the views were written"


def test_grad_none_is_skipped(ctx_factory):
    queue = make_queue(ctx_factory)
    rng = np.random.default_rng(3)
    host = [rng.standard_normal(9).astype(np.float32) for _ in range(2)]
    ms = [Mirror(queue, h) for h in host]
    opt = RMSProp([m.param for m in ms], lr=1e-2, weight_decay=0.1, momentum=0.9)
    topt = torch.optim.RMSprop([m.tensor for m in ms], lr=1e-2, weight_decay=0.1, momentum=0.9)
    for step in range(1, 7):
        ms[0].set_grad(queue, gradient(rng, (9,), np.float32, step))
        ms[1].set_grad(queue, None if step < 4 else gradient(rng, (9,), np.float32, step))
        before = ref.mirror_buffers(opt, topt, ms)
        opt.step()
        topt.step()
        if step < 4:
            assert id(ms[1].param) not in opt.state
            assert np.array_equal(ms[1].param.data.get(), host[1]), "skipped param changed"
        ref.assert_torch_rmsprop_step(opt, topt, ms, step, before)


def test_zero_grad(ctx_factory):
    queue = make_queue(ctx_factory)
    p = netcl.Parameter(cla.zeros(queue, 4, np.float32), cla.to_device(queue, np.ones(4, np.float32)))
    opt = RMSProp([p])
    opt.zero_grad(set_to_none=False)
    assert np.array_equal(p.grad.get(), np.zeros(4, np.float32))
    opt.zero_grad()
    assert p.grad is None


def test_state_dict_round_trip_is_bit_exact(ctx_factory):
    queue = make_queue(ctx_factory)
    rng = np.random.default_rng(4)
    host = rng.standard_normal(1000).astype(np.float32)
    grads = [rng.standard_normal(1000).astype(np.float32) for _ in range(10)]

    def fresh():
        p = netcl.Parameter(cla.to_device(queue, host))
        return p, RMSProp([p], lr=1e-2, momentum=0.9, centered=True)

    p1, opt1 = fresh()
    for g in grads[:5]:
        p1.grad = cla.to_device(queue, g)
        opt1.step()
    saved = opt1.state_dict()
    assert saved["state"][0]["step"] == 5
    assert set(saved["state"][0]) == {"step", "square_avg", "momentum_buffer", "grad_avg"}
    assert saved["param_groups"][0]["params"] == [0]

    p2, opt2 = fresh()
    p2.data.set(p1.data.get())
    opt2.load_state_dict(saved)
    for g in grads[5:]:
        for p, opt in ((p1, opt1), (p2, opt2)):
            p.grad = cla.to_device(queue, g)
            opt.step()
    assert np.array_equal(p1.data.get(), p2.data.get())
    for name in ("square_avg", "momentum_buffer", "grad_avg"):
        assert np.array_equal(opt1.state[id(p1)][name].get(), opt2.state[id(p2)][name].get())
    assert opt2.state[id(p2)]["step"] == 10


def test_named_parameters_are_kept_in_groups(ctx_factory):
    queue = make_queue(ctx_factory)
    w = netcl.Parameter(cla.zeros(queue, 3, np.float32))
    b = netcl.Parameter(cla.zeros(queue, 1, np.float32))
    opt = RMSProp([("fc.weight", w), ("fc.bias", b)])
    assert opt.param_groups[0]["param_names"] == ["fc.weight", "fc.bias"]
    assert opt.state_dict()["param_groups"][0]["param_names"] == ["fc.weight", "fc.bias"]


def test_alias_and_defaults_match_torch():
    import inspect

    assert RMSprop is RMSProp
    ours = inspect.signature(RMSProp).parameters
    theirs = inspect.signature(torch.optim.RMSprop).parameters
    for name in ("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "maximize"):
        assert ours[name].default == theirs[name].default, name
