"""netcl.nn.utils' clipping against torch.nn.utils.

The total norm is compared with the exact norm (float64 over every element,
rounded once) within a few ulp, and with torch's, whose float32 per-tensor
norms carry their own summation error, within a wider margin. The clipped
gradients must equal torch's formula applied with netcl's total, bit for bit
(``grad * clamp(max_norm / (total + 1e-6), max=1)`` in torch's arithmetic),
and torch's own clipped gradients within the norm's difference.
"""

import gc
import math
import warnings

import numpy as np
import pyopencl as cl
import pyopencl.array as cla
import pytest

import netcl
from netcl.nn import utils
from netcl.nn.utils import (clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_,
                            get_total_norm)

from conftest import assert_close, make_queue

torch = pytest.importorskip("torch")


INF = math.inf
# Views at odd offsets, an empty tensor, a multi-chunk tensor, a 2-D one.
SHAPES = [(7,), (0,), (33, 5), (20000,), (1,), (300,)]


class Pair:
    """A netcl parameter whose gradient is a view into a shared buffer, and
    a torch parameter with the same gradient."""

    def __init__(self, param, tensor):
        self.param, self.tensor = param, tensor


def make_pairs(queue, shapes=SHAPES, dtype=np.float32, seed=0, scale=3.0, dtypes=None):
    rng = np.random.default_rng(seed)
    dtypes = dtypes or [dtype] * len(shapes)
    pairs = []
    for shape, dt in zip(shapes, dtypes):
        n = math.prod(shape)
        offset = int(rng.integers(0, 9))
        host = np.zeros(n + offset + 3, dt)
        host[offset:offset + n] = rng.standard_normal(n) * scale
        g = host[offset:offset + n].reshape(shape)
        param = netcl.Parameter(cla.to_device(queue, np.zeros(shape, dt)))
        param.grad = cla.to_device(queue, host)[offset:offset + n].reshape(shape)
        tensor = torch.nn.Parameter(torch.zeros(shape, dtype=torch.from_numpy(g).dtype))
        tensor.grad = torch.tensor(g.copy())
        pairs.append(Pair(param, tensor))
    return pairs


def exact_norm(grads, norm_type):
    flat = np.concatenate([g.ravel().astype(np.float64) for g in grads] + [np.zeros(0)])
    a = np.abs(flat)
    if norm_type == INF:
        return a.max()
    if norm_type == -INF:
        return a.min()
    if norm_type == 0:
        return float(sum(np.count_nonzero(g) > 0 for g in grads))
    with np.errstate(divide="ignore"):
        return (a ** norm_type).sum() ** (1.0 / norm_type)


def torch_clip_with(tensors_grads, max_norm, total):
    """torch's _clip_grads_with_norm_ arithmetic applied with a given total."""
    coef = torch.clamp(max_norm / (torch.from_numpy(np.asarray(total)) + 1e-6), max=1.0)
    return [g * coef for g in tensors_grads]


@pytest.mark.parametrize("norm_type", [2.0, 1.0, INF, 3.0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("max_norm", [0.5, 1e7])
def test_clip_grad_norm_matches_torch(ctx_factory, norm_type, dtype, max_norm):
    queue = make_queue(ctx_factory, dtype)
    # torch raises for the infinity norm of an empty tensor (tested below)
    shapes = [s for s in SHAPES if math.prod(s) or norm_type != INF]
    pairs = make_pairs(queue, shapes, dtype)
    before = [p.tensor.grad.clone() for p in pairs]
    total = clip_grad_norm_([p.param for p in pairs], max_norm, norm_type)
    ttotal = torch.nn.utils.clip_grad_norm_([p.tensor for p in pairs], max_norm, norm_type)
    assert isinstance(total, cla.Array) and total.shape == () and total.dtype == dtype
    ours = total.get()
    exact = exact_norm([b.numpy() for b in before], norm_type)
    assert_close(ours, np.asarray(exact, dtype), "total vs exact", nulp=4)
    # torch's float32 norms sum in float32: up to tens of ulp away from exact
    assert_close(ours, ttotal.numpy(), "total vs torch", nulp=64 if dtype == np.float32 else 8)
    expected = torch_clip_with(before, max_norm, ours)
    for i, (p, e) in enumerate(zip(pairs, expected)):
        got = p.param.grad.get()
        assert np.array_equal(got, e.numpy()), f"grad {i}: not torch's formula with our norm"
        assert_close(got, p.tensor.grad.numpy(), f"grad {i} vs torch", nulp=64)


@pytest.mark.parametrize("norm_type", [0.5, 0.0, -INF, -2.0, 7.0])
def test_other_norm_types(ctx_factory, norm_type):
    queue = make_queue(ctx_factory)
    shapes = [(7,), (33, 5), (20000,), (3,)]
    pairs = make_pairs(queue, shapes, seed=1)
    pairs[3].param.grad.fill(0.0)  # a tensor without non-zero elements (norm 0)
    pairs[3].tensor.grad.zero_()
    before = [p.tensor.grad.clone() for p in pairs]
    total = clip_grad_norm_([p.param for p in pairs], 2.0, norm_type)
    ttotal = torch.nn.utils.clip_grad_norm_([p.tensor for p in pairs], 2.0, norm_type)
    exact = exact_norm([b.numpy() for b in before], norm_type)
    assert_close(total.get(), np.float32(exact), "total vs exact", nulp=8)
    assert_close(total.get(), ttotal.numpy(), "total vs torch", nulp=256)
    for i, (p, e) in enumerate(zip(pairs, torch_clip_with(before, 2.0, total.get()))):
        assert np.array_equal(p.param.grad.get(), e.numpy()), f"grad {i}"


def test_many_tensors_mixed_dtypes(ctx_factory):
    """More tensors than one launch holds, float32 and float64 together: the
    total is float64, as torch's stack of per-dtype norms promotes."""
    queue = make_queue(ctx_factory, np.float64)
    rng = np.random.default_rng(5)
    shapes = [(int(n),) for n in rng.integers(0, 200, 90)]
    dtypes = [np.float32 if i % 3 else np.float64 for i in range(len(shapes))]
    pairs = make_pairs(queue, shapes, dtypes=dtypes, seed=2)
    before = [p.tensor.grad.clone() for p in pairs]
    total = clip_grad_norm_([p.param for p in pairs], 1.0)
    ttotal = torch.nn.utils.clip_grad_norm_([p.tensor for p in pairs], 1.0)
    assert total.dtype == np.float64 and ttotal.dtype == torch.float64
    exact = exact_norm([b.numpy() for b in before], 2.0)
    assert_close(total.get(), np.float64(exact), "total vs exact", nulp=8)
    # torch's float32 tensors contribute float32 norms: float32 precision
    assert total.get() == pytest.approx(ttotal.item(), rel=1e-6)
    for i, (p, e) in enumerate(zip(pairs, torch_clip_with(before, 1.0, total.get()))):
        assert np.array_equal(p.param.grad.get(), e.numpy()), f"grad {i}"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, INF])
def test_nonfinite_gradients(ctx_factory, bad, norm_type):
    queue = make_queue(ctx_factory)
    pairs = make_pairs(queue, [(40,), (20000,)])
    for g in (pairs[1].tensor.grad,):
        g[17000] = float(bad)
    host = pairs[1].param.grad.get()
    host[17000] = bad
    pairs[1].param.grad.set(host)
    before = [p.param.grad.get() for p in pairs]
    with pytest.raises(RuntimeError, match=r"The total norm of order .* is non-finite"):
        clip_grad_norm_([p.param for p in pairs], 1.0, norm_type, error_if_nonfinite=True)
    for p, b in zip(pairs, before):  # nothing clipped
        assert np.array_equal(p.param.grad.get(), b, equal_nan=True)
    total = clip_grad_norm_([p.param for p in pairs], 1.0, norm_type)
    ttotal = torch.nn.utils.clip_grad_norm_([p.tensor for p in pairs], 1.0, norm_type)
    assert np.array_equal(total.get(), ttotal.numpy(), equal_nan=True)
    for p in pairs:
        assert np.array_equal(p.param.grad.get(), p.tensor.grad.numpy(), equal_nan=True)


@pytest.mark.parametrize("norm_type", [INF, -INF, -1.0])
def test_empty_tensor_raises_as_torch(queue_f32, norm_type):
    pairs = make_pairs(queue_f32, [(4,), (0,)])
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.utils.clip_grad_norm_([p.tensor for p in pairs], 1.0, norm_type, foreach=False)
    with pytest.raises(RuntimeError) as ours:
        clip_grad_norm_([p.param for p in pairs], 1.0, norm_type)
    assert str(ours.value) == str(theirs.value)


@pytest.fixture
def queue_f32(ctx_factory):
    return make_queue(ctx_factory)


def test_no_gradients(queue_f32):
    p = netcl.Parameter(cla.to_device(queue_f32, np.ones(3, np.float32)))
    total = clip_grad_norm_([p], 1.0)
    assert total.shape == () and total.dtype == np.float32 and total.get() == 0.0
    assert clip_grad_norm_([], 1.0).get() == 0.0
    assert get_total_norm([]).get() == 0.0
    with pytest.warns(UserWarning, match="empty generator"):
        clip_grad_norm_((q for q in []), 1.0)
    assert clip_grad_value_([p], 1.0) is None
    assert clip_grads_with_norm_([p], 1.0, total) is None


def test_single_parameter_and_the_two_halves(queue_f32):
    pairs = make_pairs(queue_f32, [(50,), (9,)], seed=4)
    before = [p.tensor.grad.clone() for p in pairs]
    total = get_total_norm([p.param.grad for p in pairs], 2.0)
    ttotal = torch.nn.utils.get_total_norm([p.tensor.grad for p in pairs], 2.0)
    assert_close(total.get(), ttotal.numpy(), "get_total_norm", nulp=16)
    clip_grads_with_norm_([p.param for p in pairs], 0.25, total)
    torch.nn.utils.clip_grads_with_norm_([p.tensor for p in pairs], 0.25, ttotal)
    for p, e in zip(pairs, torch_clip_with(before, 0.25, total.get())):
        assert np.array_equal(p.param.grad.get(), e.numpy())
        assert_close(p.param.grad.get(), p.tensor.grad.numpy(), "clip_grads_with_norm_", nulp=16)
    # a single parameter (not in a list), as torch accepts a single tensor
    single = pairs[0]
    t = clip_grad_norm_(single.param, 1e-3)
    tt = torch.nn.utils.clip_grad_norm_(single.tensor, 1e-3)
    assert t.shape == ()
    assert_close(t.get(), tt.numpy(), "single", nulp=16)
    assert_close(single.param.grad.get(), single.tensor.grad.numpy(), "single grad", nulp=16)
    assert_close(get_total_norm(single.param.grad, INF).get(),
                 torch.nn.utils.get_total_norm(single.tensor.grad, INF).numpy(), "one array")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("clip_value", [0.3, 2.5, -0.5])
def test_clip_grad_value_matches_torch(ctx_factory, dtype, clip_value):
    queue = make_queue(ctx_factory, dtype)
    pairs = make_pairs(queue, SHAPES, dtype)
    host = pairs[0].param.grad.get()
    host[2], host[4] = np.nan, -np.inf
    pairs[0].param.grad.set(host)
    pairs[0].tensor.grad = torch.tensor(host.copy())
    assert clip_grad_value_([p.param for p in pairs], clip_value) is None
    torch.nn.utils.clip_grad_value_([p.tensor for p in pairs], clip_value)
    for i, p in enumerate(pairs):
        assert np.array_equal(p.param.grad.get(), p.tensor.grad.numpy(), equal_nan=True), i


def test_bad_inputs(queue_f32):
    p = netcl.Parameter(cla.to_device(queue_f32, np.ones(4, np.float32)))
    q = netcl.Parameter(cla.to_device(queue_f32, np.ones(4, np.float32)))
    q.grad = np.ones(4, np.float32)
    with pytest.raises(TypeError, match="parameter 1: .grad must be None or a pyopencl"):
        clip_grad_norm_([p, q], 1.0)
    q.grad = cla.zeros(queue_f32, 4, np.int32)
    with pytest.raises(TypeError, match="parameter 1: gradient dtype int32"):
        clip_grad_value_([p, q], 1.0)
    q.grad = cla.to_device(queue_f32, np.ones((4, 2), np.float32))[:, 0]
    with pytest.raises(ValueError, match="C-contiguous"):
        clip_grad_norm_([q], 1.0)
    with pytest.raises(TypeError, match="has no .grad"):
        clip_grad_norm_([object()], 1.0)
    with pytest.raises(TypeError, match="not a pyopencl Array"):
        clip_grad_norm_(p.data, 1.0)
    with pytest.raises(TypeError, match="foreach"):
        clip_grad_norm_([p], 1.0, foreach="yes")
    p.grad = cla.to_device(queue_f32, np.ones(4, np.float32))
    with pytest.raises(TypeError, match="total_norm must be a pyopencl Array"):
        clip_grads_with_norm_([p], 1.0, 3.0)
    with pytest.raises(ValueError, match="one-element"):
        clip_grads_with_norm_([p], 1.0, cla.zeros(queue_f32, 2, np.float32))
    other = cl.Context([queue_f32.device])
    r = netcl.Parameter(cla.to_device(cl.CommandQueue(other), np.ones(4, np.float32)))
    r.grad = cla.to_device(r.data.queue, np.ones(4, np.float32))
    with pytest.raises(ValueError, match="parameter 1: the gradient lives in another OpenCL"):
        clip_grad_norm_([p, r], 1.0)


def test_norm_type_as_string_int_or_nan(queue_f32):
    pairs = make_pairs(queue_f32, [(30,)], seed=6)
    # torch: a NaN order gives a NaN norm (and NaN gradients after clipping)
    assert np.isnan(get_total_norm([pairs[0].param.grad], float("nan")).get())
    assert math.isnan(torch.nn.utils.get_total_norm([pairs[0].tensor.grad], float("nan")).item())
    a = get_total_norm([pairs[0].param.grad], "inf").get()
    b = get_total_norm([pairs[0].param.grad], 2).get()
    assert a == np.abs(pairs[0].tensor.grad.numpy()).max()
    assert_close(b, torch.linalg.vector_norm(pairs[0].tensor.grad).numpy(), "int norm_type")


def test_no_host_sync(queue_f32, monkeypatch):
    pairs = make_pairs(queue_f32, [(100,), (7,)])
    params = [p.param for p in pairs]
    clip_grad_norm_(params, 1.0, 3.0)  # builds the kernels
    clip_grad_value_(params, 1.0)

    def forbidden(*args, **kwargs):
        raise AssertionError("a host sync")

    # Garbage left by earlier tests must not be collected while the sync
    # methods raise: a finaliser that waits would then abort the process.
    gc.collect()
    gc.disable()
    try:
        monkeypatch.setattr(cla.Array, "get", forbidden)
        monkeypatch.setattr(cl, "wait_for_events", forbidden)
        monkeypatch.setattr(cl.CommandQueue, "finish", forbidden, raising=False)
        for norm in (2.0, 1.0, INF, 3.0):
            clip_grad_norm_(params, 1.0, norm)
        clip_grad_value_(params, 1.0)
    finally:
        monkeypatch.undo()
        gc.enable()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert utils.get_total_norm([p.grad for p in params]).get() >= 0
