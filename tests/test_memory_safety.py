"""A step never touches memory it does not own, and a step that fails changes nothing.

Each test here reproduces a finding of issue 10 and failed before its fix.
"""

import threading

import numpy as np
import pyopencl.array as cla
import pytest

import netcl
from netcl import _kernels
from netcl.optim import SGD, Adam, AdamW, RMSProp, _engine

from conftest import make_queue


@pytest.fixture
def queue(ctx_factory):
    return make_queue(ctx_factory)


def param(queue, n, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    p = netcl.Parameter(cla.to_device(queue, rng.standard_normal(n).astype(dtype)))
    p.grad = cla.to_device(queue, rng.standard_normal(n).astype(dtype))
    return p


def snapshot(opt, params):
    state = {}
    for key, entry in opt.state.items():
        state[key] = {name: value.get() if isinstance(value, cla.Array) else value
                      for name, value in entry.items()}
    return [p.data.get() for p in params], state


def assert_unchanged(before, after):
    (params_a, state_a), (params_b, state_b) = before, after
    for a, b in zip(params_a, params_b):
        assert np.array_equal(a, b)
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert state_a[key].keys() == state_b[key].keys()
        for name, value in state_a[key].items():
            if isinstance(value, np.ndarray):
                assert np.array_equal(value, state_b[key][name]), name
            else:
                assert value == state_b[key][name], name


@pytest.mark.parametrize("make", [
    lambda ps: RMSProp(ps, lr=1e-3, momentum=0.9, centered=True),
    lambda ps: Adam(ps, amsgrad=True),
    lambda ps: SGD(ps, lr=0.1, momentum=0.9),
])
def test_replaced_data_with_larger_array_raises_and_writes_nowhere(queue, make):
    small = param(queue, 1000)
    neighbour = cla.to_device(queue, np.full(65536, 7.0, np.float32))
    opt = make([small])
    opt.step()
    state_before = snapshot(opt, [])
    # A larger array (and a matching grad) in place of the one the state was made for.
    small.data = cla.to_device(queue, np.ones(50000, np.float32))
    small.grad = cla.to_device(queue, np.ones(50000, np.float32))
    with pytest.raises(ValueError, match=r"parameter 0.*shape \(1000,\).*\(50000,\)"):
        opt.step()
    queue.finish()
    assert np.all(neighbour.get() == 7.0)
    assert_unchanged(state_before, snapshot(opt, []))
    assert np.all(small.data.get() == 1.0)


def test_replaced_data_with_float64_raises(queue):
    if not _kernels.supports_fp64(queue.device):
        pytest.skip("no float64 on this device")
    p = param(queue, 64)
    opt = Adam([p])
    opt.step()
    p.data = cla.to_device(queue, np.ones(64, np.float64))
    p.grad = cla.to_device(queue, np.ones(64, np.float64))
    with pytest.raises(ValueError, match="dtype float32.*float64"):
        opt.step()
    assert np.all(p.data.get() == 1.0)
    assert opt.state[id(p)]["step"] == 1


def test_replaced_state_buffer_raises(queue):
    p = param(queue, 64)
    opt = RMSProp([p])
    opt.step()
    opt.state[id(p)]["square_avg"] = cla.zeros(queue, 32, np.float32)
    before = p.data.get()
    with pytest.raises(ValueError, match="square_avg"):
        opt.step()
    assert np.array_equal(p.data.get(), before)


def test_oversized_tensor_in_a_later_group_changes_nothing(queue, monkeypatch):
    """A tensor too large for 32-bit indexing raises before any group steps."""
    first, big = param(queue, 100, seed=1), param(queue, 300, seed=2)
    opt = Adam([{"params": [first]}, {"params": [big], "lr": 1e-2}])
    before = snapshot(opt, [first, big])
    monkeypatch.setattr(_engine, "_UINT_LIMIT", 200)  # as if big had 2**32 elements
    with pytest.raises(ValueError, match="too large"):
        opt.step()
    queue.finish()
    assert_unchanged(before, snapshot(opt, [first, big]))
    assert opt.state == {}


def test_oversized_offset_in_a_later_group_changes_nothing(queue, monkeypatch):
    first = param(queue, 100, seed=1)
    base = cla.to_device(queue, np.arange(400, dtype=np.float32))
    view = netcl.Parameter(base[250:300])
    view.grad = cla.to_device(queue, np.ones(50, np.float32))
    opt = SGD([{"params": [first]}, {"params": [view]}], lr=0.1, momentum=0.9)
    opt.step()
    before = snapshot(opt, [first, view])
    monkeypatch.setattr(_engine, "_UINT_LIMIT", 200)  # as if the offset were >= 2**32
    view.data = base[250:300]  # a new view: its offset is checked again
    with pytest.raises(ValueError, match="offset"):
        opt.step()
    queue.finish()
    assert_unchanged(before, snapshot(opt, [first, view]))


def test_failed_kernel_build_changes_nothing_first_step_included(queue, monkeypatch):
    first, second = param(queue, 100, seed=1), param(queue, 100, seed=2, dtype=np.float32)
    opt = RMSProp([{"params": [first]}, {"params": [second], "centered": True}])

    real = _kernels.get_program

    def failing(context, template, kernel_name, **flags):
        if flags.get("centered"):
            raise _kernels.KernelBuildError("simulated build failure")
        return real(context, template, kernel_name, **flags)

    monkeypatch.setattr(_kernels, "get_program", failing)
    before = snapshot(opt, [first, second])
    with pytest.raises(_kernels.KernelBuildError):
        opt.step()
    queue.finish()
    assert_unchanged(before, snapshot(opt, [first, second]))
    assert opt.state == {}


def test_optimizers_never_share_kernel_objects(queue):
    a, b = param(queue, 100, seed=1), param(queue, 100, seed=2)
    opt_a, opt_b = RMSProp([a]), RMSProp([b])
    opt_a.step()
    opt_b.step()
    ours = {id(b.kernel) for b in opt_a._program.updates}
    theirs = {id(b.kernel) for b in opt_b._program.updates}
    assert ours and theirs and not ours & theirs


def test_two_threads_stepping_two_optimizers_match_sequential(queue):
    """Setting arguments and enqueueing is not atomic: shared kernel objects race."""
    sizes = [1000, 37, 4096]

    def make(seed):
        return [param(queue, n, seed=seed + i) for i, n in enumerate(sizes)]

    def run(params, steps=200):
        opt = Adam(params, lr=1e-3)
        for _ in range(steps):
            opt.step()
        queue.finish()

    sequential = [make(0), make(10)]
    for params in sequential:
        run(params)
    threaded = [make(0), make(10)]
    threads = [threading.Thread(target=run, args=(params,)) for params in threaded]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seq, thr in zip(sequential, threaded):
        for p, q in zip(seq, thr):
            assert np.array_equal(p.data.get(), q.data.get())


def test_zero_grad_validates_before_zeroing(queue):
    ps = [param(queue, 10, seed=i) for i in range(3)]
    opt = SGD(ps, lr=0.1)
    ps[2].grad = np.ones(10, np.float32)  # not a device array
    before = ps[0].grad.get()
    with pytest.raises(TypeError, match="parameter 2"):
        opt.zero_grad(set_to_none=False)
    assert np.array_equal(ps[0].grad.get(), before)


@pytest.mark.parametrize("make, kwargs", [
    (RMSProp, dict(lr=np.float32(5e-4), alpha=np.float64(0.9), momentum=np.float32(0.5))),
    (Adam, dict(lr=np.float32(5e-4), betas=(np.float32(0.8), np.float64(0.99)))),
    (AdamW, dict(lr=np.float32(5e-4), weight_decay=np.float32(1e-2))),
    (SGD, dict(lr=np.float32(5e-4), momentum=np.int64(0), dampening=np.float32(0.1))),
])
def test_numpy_scalar_hyperparameters_step_like_python_floats(queue, make, kwargs):
    p, q = param(queue, 100), param(queue, 100)
    make([p], **kwargs).step()
    plain = {k: (tuple(float(b) for b in v) if isinstance(v, tuple) else float(v))
             for k, v in kwargs.items()}
    make([q], **plain).step()
    assert np.array_equal(p.data.get(), q.data.get())


def test_numpy_bool_is_not_a_number(queue):
    with pytest.raises(ValueError, match="learning rate"):
        SGD([param(queue, 4)], lr=np.bool_(True))


def test_tensors_at_different_step_counts_share_a_launch(queue):
    ps = [param(queue, 100 + i, seed=i) for i in range(3)]
    opt = Adam(ps)
    grads = [p.grad for p in ps]
    for k in range(3):  # parameter i misses the first i steps: counts 3, 2, 1
        for i, p in enumerate(ps):
            p.grad = grads[i] if k >= i else None
        opt.step()
    assert [opt.state[id(p)]["step"] for p in ps] == [3, 2, 1]
    for p, g in zip(ps, grads):
        p.grad = g
    opt.step()
    assert len(opt._program.updates) == 1
    assert [opt.state[id(p)]["step"] for p in ps] == [4, 3, 2]


def test_plan_cache_is_bounded_with_randomly_missing_grads(queue):
    rng = np.random.default_rng(0)
    ps = [param(queue, 10 + i, seed=i) for i in range(12)]
    grads = [p.grad for p in ps]
    opt = Adam(ps)
    for _ in range(200):
        for p, g in zip(ps, grads):
            p.grad = g if rng.random() < 0.5 else None
        opt.step()
    assert len(opt._plans) <= 32


def test_dropping_a_context_frees_it_after_every_kind_of_kernel(device):
    """Kernel caches are per context but must not keep the context alive: on a
    GPU each context holds device and pinned host memory, and a process that
    makes contexts one after another (a test suite, a notebook) ran out of it."""
    import gc
    import weakref

    import pyopencl as cl

    from netcl.amp import GradScaler
    from netcl.nn import Linear, ReLU, Sequential, softmax_cross_entropy
    from netcl.nn.utils import clip_grad_norm_, clip_grad_value_

    def use_everything():
        context = cl.Context([device])
        queue = cl.CommandQueue(context)
        params = [param(queue, 37, seed) for seed in range(2)]
        scaler = GradScaler(queue, growth_interval=1)
        tracked = RMSProp(params[:1], momentum=0.9, centered=True, track_stats=True)
        guarded = Adam(params[1:], max_grad_norm=1.0, skip_nonfinite=True)
        for opt in (tracked, guarded):
            scaler.step(opt)
        tracked.stats()
        guarded.state_dict()
        scaler.update()
        clip_grad_norm_(params, 1.0).get()
        clip_grad_value_(params, 0.5)
        model = Sequential(Linear(4, 3, queue=queue), ReLU(queue))
        x = cla.to_device(queue, np.ones((2, 4), np.float32))
        logits = model(x)
        softmax_cross_entropy(logits, np.array([0, 2]))
        queue.finish()
        return weakref.ref(context)

    alive = use_everything()
    gc.collect()
    assert alive() is None, "a kernel cache kept the OpenCL context alive"
