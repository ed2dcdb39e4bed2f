"""The step engine: device-resident step counts, the non-finite skip, fused
gradient clipping, and arguments bound once."""

import math

import numpy as np
import pyopencl as cl
import pyopencl.array as cla
import pytest

import netcl
from netcl import _kernels
from netcl.bench import workloads
from netcl.optim import SGD, Adam, AdamW, RMSProp

from conftest import assert_close, make_queue

# ResNet-50's 161 tensors, each cut to at most 3000 elements so that every
# family and variant runs in a second.
SHAPES = [min(math.prod(shape), 3000) for _, shape in workloads(["resnet50"])[0].shapes]
assert len(SHAPES) == 161

VARIANTS = [
    (RMSProp, dict(lr=1e-2)),
    (RMSProp, dict(lr=1e-2, momentum=0.9)),
    (RMSProp, dict(lr=1e-2, centered=True)),
    (RMSProp, dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=1e-2)),
    (RMSProp, dict(lr=1e-2, bias_correction=True, eps_in_sqrt=True)),
    (Adam, dict(lr=1e-2)),
    (Adam, dict(lr=1e-2, amsgrad=True, weight_decay=1e-2)),
    (AdamW, dict(lr=1e-2)),
    (SGD, dict(lr=1e-2)),
    (SGD, dict(lr=1e-2, momentum=0.9, dampening=0.1)),
    (SGD, dict(lr=1e-2, momentum=0.9, nesterov=True)),
]


def variant_id(v):
    cls, kw = v
    return cls.__name__ + "-" + "-".join(f"{k}={w}" for k, w in kw.items())


def make_params(queue, dtype, seed=0, sizes=SHAPES):
    rng = np.random.default_rng(seed)
    return [netcl.Parameter(cla.to_device(queue, rng.standard_normal(n).astype(dtype)))
            for n in sizes]


def grads_for(params, step, dtype):
    rng = np.random.default_rng(1000 + step)
    return [rng.standard_normal(p.data.size).astype(dtype) for p in params]


def set_grads(queue, params, host):
    for p, g in zip(params, host):
        p.grad = cla.to_device(queue, g)


def snapshot(opt, params):
    sd = opt.state_dict()
    return [p.data.get() for p in params], sd["state"]


def assert_same(a, b):
    params_a, state_a = a
    params_b, state_b = b
    for x, y in zip(params_a, params_b):
        assert np.array_equal(x, y, equal_nan=True)
    assert state_a.keys() == state_b.keys()
    for i in state_a:
        assert state_a[i].keys() == state_b[i].keys()
        for name in state_a[i]:
            assert np.array_equal(state_a[i][name], state_b[i][name]), (i, name)


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("first", [True, False], ids=["first-step", "later-step"])
def test_nan_gradient_skips_the_step(ctx_factory, variant, dtype, first):
    check_skip(ctx_factory, variant, dtype, first, np.nan)


@pytest.mark.parametrize("bad", [np.inf, -np.inf])
def test_infinite_gradient_skips_the_step(ctx_factory, bad):
    check_skip(ctx_factory, (Adam, dict(lr=1e-2)), np.float32, False, bad)


def check_skip(ctx_factory, variant, dtype, first, bad):
    """A NaN or infinity in one element of one of 161 tensors changes nothing:
    params, every state buffer and every step count stay bitwise as they
    were (a skipped first step leaves no state), and the next finite step is
    the one a run without it would take."""
    queue = make_queue(ctx_factory, dtype)
    cls, kw = variant
    params, twin_params = make_params(queue, dtype), make_params(queue, dtype)
    opt = cls(params, skip_nonfinite=True, **kw)
    twin = cls(twin_params, skip_nonfinite=True, **kw)
    warmup = 0 if first else 2
    for step in range(warmup):
        host = grads_for(params, step, dtype)
        set_grads(queue, params, host)
        set_grads(queue, twin_params, host)
        opt.step()
        twin.step()
    before = snapshot(opt, params)

    host = grads_for(params, 99, dtype)
    host[80][7] = bad
    set_grads(queue, params, host)
    opt.step()
    assert_same(before, snapshot(opt, params))
    assert opt.skipped_steps == 1

    host = grads_for(params, warmup, dtype)
    set_grads(queue, params, host)
    set_grads(queue, twin_params, host)
    opt.step()
    twin.step()
    assert_same(snapshot(twin, twin_params), snapshot(opt, params))
    assert opt.skipped_steps == 1 and twin.skipped_steps == 0


def test_skip_is_off_by_default(ctx_factory):
    queue = make_queue(ctx_factory)
    params = make_params(queue, np.float32, sizes=[10, 20])
    opt = Adam(params)
    host = grads_for(params, 0, np.float32)
    host[1][3] = np.nan
    set_grads(queue, params, host)
    opt.step()
    assert np.isnan(params[1].data.get()[3])
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("variant", [
    (Adam, "Adam", dict(lr=1e-2)), (AdamW, "AdamW", dict(lr=1e-2, amsgrad=True)),
    (SGD, "SGD", dict(lr=1e-1, momentum=0.9)),
    (RMSProp, "RMSprop", dict(lr=1e-2, momentum=0.9, centered=True))],
    ids=lambda v: v[1])
@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_max_grad_norm_matches_torch_clip_then_step(ctx_factory, variant, max_norm):
    torch = pytest.importorskip("torch")
    queue = make_queue(ctx_factory)
    cls, torch_name, kw = variant
    sizes = [300, 7, 4096, 1]
    params = make_params(queue, np.float32, sizes=sizes)
    tensors = [torch.tensor(p.data.get(), requires_grad=True) for p in params]
    opt = cls(params, max_grad_norm=max_norm, **kw)
    topt = getattr(torch.optim, torch_name)(tensors, **kw)
    for step in range(4):
        host = [0.1 * g for g in grads_for(params, step, np.float32)]
        set_grads(queue, params, host)
        for t, g in zip(tensors, host):
            t.grad = torch.tensor(g)
        torch.nn.utils.clip_grad_norm_(tensors, max_norm, foreach=True)
        opt.step()
        topt.step()
        for i, (p, t) in enumerate(zip(params, tensors)):
            # The norm's summation order differs from torch's: the coefficient
            # may differ in its last bits.
            assert_close(p.data.get(), t.detach().numpy(), f"step {step} param {i}", nulp=64)
    total = np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in host))
    assert opt._control.get()[3] == pytest.approx(total, rel=1e-6)


def test_step_counts_live_on_the_device(ctx_factory):
    queue = make_queue(ctx_factory)
    params = make_params(queue, np.float32, sizes=[5, 6])
    opt = Adam(params)
    for step in range(3):
        set_grads(queue, params, grads_for(params, step, np.float32))
        if step == 2:
            params[1].grad = None
        opt.step()
    assert [opt.state[id(p)]["step"] for p in params] == [3, 2]
    opt.state[id(params[1])]["step"] = 7
    assert opt.state_dict()["state"][1]["step"] == 7
    with pytest.raises(ValueError, match="step"):
        opt.state[id(params[1])]["step"] = -1
    assert opt.state[id(params[1])]["step"] == 7


class _SetArgCounter:
    """Counts clSetKernelArg calls made through pyopencl's Kernel methods."""

    def __init__(self, monkeypatch):
        self.calls = 0
        for name, per_call in (("set_arg", lambda args: 1), ("_set_arg_buf", lambda args: 1),
                               ("set_args", len)):
            real = getattr(cl.Kernel, name)

            def counting(kernel, *args, real=real, per_call=per_call):
                self.calls += per_call(args)
                return real(kernel, *args)

            monkeypatch.setattr(cl.Kernel, name, counting)


@pytest.mark.parametrize("guarded", [False, True])
def test_arguments_are_set_only_where_arrays_changed(ctx_factory, monkeypatch, guarded):
    queue = make_queue(ctx_factory)
    params = make_params(queue, np.float32, sizes=[100] * 50)
    opt = RMSProp(params, momentum=0.9, skip_nonfinite=guarded)
    set_grads(queue, params, grads_for(params, 0, np.float32))
    opt.step()
    opt.step()
    counter = _SetArgCounter(monkeypatch)
    for _ in range(3):  # same arrays, same hyperparameters
        opt.step()
    assert counter.calls == 0
    opt.param_groups[0]["lr"] = 1e-3  # one scalar per launch
    opt.step()
    launches = len(opt._program.updates)
    assert counter.calls == launches
    passes = 2 if guarded else 1  # the update, and the statistics pass
    counter.calls = 0
    set_grads(queue, params, grads_for(params, 1, np.float32))  # every grad new
    opt.step()
    # at the same offsets (0): one buffer argument per gradient and pass
    assert counter.calls == len(params) * passes
    # views at other (still vector-aligned) offsets: the buffer argument
    # again; the offsets go to each launch's offsets buffer, not arguments
    host = grads_for(params, 2, np.float32)
    whole = cla.zeros(queue, 128 * (len(params) + 1), np.float32)
    counter.calls = 0
    for k, (p, g) in enumerate(zip(params, host)):
        p.grad = whole[128 * (k + 1):128 * (k + 1) + g.size]
    opt.step()
    assert counter.calls == len(params) * passes


@pytest.mark.parametrize("guarded", [False, True])
def test_replaced_gradients_step_like_torch(ctx_factory, guarded):
    """Gradients replaced between steps by new arrays (the re-bind that sets
    only their buffers), by views at new offsets, by arrays in place, and
    missing for a step: every step matches torch's."""
    torch = pytest.importorskip("torch")
    queue = make_queue(ctx_factory)
    sizes = [300, 7, 4096, 1, 64]
    params = make_params(queue, np.float32, sizes=sizes)
    tensors = [torch.tensor(p.data.get(), requires_grad=True) for p in params]
    opt = Adam(params, lr=1e-2, skip_nonfinite=guarded)
    topt = torch.optim.Adam(tensors, lr=1e-2)
    for step, how in enumerate(["new", "new", "in place", "views", "new", "one missing",
                                "new", "views"]):
        host = grads_for(params, step, np.float32)
        if how == "new":
            set_grads(queue, params, host)
        elif how == "in place":
            for p, g in zip(params, host):
                p.grad.set(g)
        elif how == "views":
            whole = cla.to_device(queue, np.concatenate([np.zeros(step, np.float32)] + host))
            start = step
            for p, g in zip(params, host):
                p.grad = whole[start:start + g.size]
                start += g.size
        else:
            set_grads(queue, params, host)
            params[1].grad = None
        for i, (t, g) in enumerate(zip(tensors, host)):
            t.grad = None if how == "one missing" and i == 1 else torch.tensor(g)
        opt.step()
        topt.step()
        for i, (p, t) in enumerate(zip(params, tensors)):
            assert_close(p.data.get(), t.detach().numpy(), f"step {step} ({how}) param {i}",
                         nulp=4)


def test_replaced_gradient_of_another_dtype_is_refused(ctx_factory):
    queue = make_queue(ctx_factory)
    params = make_params(queue, np.float32, sizes=[10, 20])
    opt = SGD(params, lr=0.1)
    set_grads(queue, params, grads_for(params, 0, np.float32))
    opt.step()
    before = [p.data.get() for p in params]
    params[1].grad = cla.zeros(queue, 20, np.float64)
    with pytest.raises(TypeError, match="parameter 1.*dtype"):
        opt.step()
    for p, b in zip(params, before):
        assert np.array_equal(p.data.get(), b)


def test_unguarded_step_after_a_skipped_scaled_step_counts(ctx_factory):
    """An unguarded step never reads the found-inf a GradScaler left behind."""
    from netcl.amp import GradScaler

    queue = make_queue(ctx_factory)
    params = make_params(queue, np.float32, sizes=[8])
    opt = Adam(params, lr=0.1)
    scaler = GradScaler(queue)
    host = grads_for(params, 0, np.float32)
    host[0][2] = np.inf
    set_grads(queue, params, host)
    scaler.step(opt)
    scaler.update()
    assert opt.skipped_steps == 1
    set_grads(queue, params, grads_for(params, 1, np.float32))
    scaler.unscale_(opt)  # writes found-inf into the optimizer's control buffer
    opt.step()            # unguarded
    assert opt.state[id(params[0])]["step"] == 1
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("variant", [(Adam, dict(lr=1e-2)),
                                     (SGD, dict(lr=1e-1, momentum=0.9)),
                                     (RMSProp, dict(lr=1e-2, centered=True))],
                         ids=variant_id)
def test_shards_together_take_the_unsharded_step(ctx_factory, variant):
    """Two optimizers over the same parameters, each updating its own half
    (ZeRO's shards), clip with the norm of every gradient and skip on a NaN
    outside their shard: together they take exactly the unsharded steps, and
    each keeps state only for its shard."""
    queue = make_queue(ctx_factory)
    cls, kw = variant
    sizes = [300, 7, 4096, 1, 50]
    params, whole_params = make_params(queue, np.float32, sizes=sizes), \
        make_params(queue, np.float32, sizes=sizes)
    options = dict(kw, skip_nonfinite=True, max_grad_norm=0.5)
    shards = [cls(params, **options), cls(params, **options)]
    shards[0]._set_shard(params[0::2])
    shards[1]._set_shard(params[1::2])
    whole = cls(whole_params, **options)
    for step in range(4):
        host = grads_for(params, step, np.float32)
        if step == 2:
            host[1][3] = np.nan  # in shard 1 only: shard 0 must skip too
        set_grads(queue, params, host)
        set_grads(queue, whole_params, host)
        for opt in shards + [whole]:
            opt.step()
        for i, (p, q) in enumerate(zip(params, whole_params)):
            assert np.array_equal(p.data.get(), q.data.get()), (step, i)
    assert [s.skipped_steps for s in shards] == [1, 1] and whole.skipped_steps == 1
    for s, owned in zip(shards, (params[0::2], params[1::2])):
        assert set(s.state) == {id(p) for p in owned}
        assert sorted(s.state_dict()["state"]) == sorted(
            i for i, p in enumerate(params) if any(p is q for q in owned))
    full = whole.state_dict()["state"]
    for s in shards:
        for i, entry in s.state_dict()["state"].items():
            assert entry.keys() == full[i].keys()
            for name in entry:
                assert np.array_equal(entry[name], full[i][name]), (i, name)


def test_shard_must_name_own_parameters(ctx_factory):
    queue = make_queue(ctx_factory)
    params = make_params(queue, np.float32, sizes=[5, 6])
    stranger = make_params(queue, np.float32, sizes=[5])
    opt = Adam(params)
    with pytest.raises(ValueError, match="not in this optimizer"):
        opt._set_shard(stranger)
    assert opt._shard is None


def _regions_are_disjoint_and_aligned(placed, lengths, sizes, cap):
    from netcl.optim._arena import ALIGN
    spans = {}
    for (arena, start), n in zip(placed, sizes):
        assert start % ALIGN == 0
        assert start + n <= lengths[arena]
        spans.setdefault(arena, []).append((start, start + n))
    for arena, parts in spans.items():
        parts.sort()
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(parts, parts[1:]))
        # Over the cap only when a single tensor needs it.
        assert lengths[arena] <= cap or len(parts) == 1


@pytest.mark.parametrize("sizes, cap", [
    ([5, 64, 300, 1, 17, 0, 16], 10_000),
    ([100] * 50, 1000),          # several arenas
    ([5000, 3, 8000, 2], 4096),  # tensors bigger than the cap get arenas of their own
])
def test_state_arena_regions(sizes, cap):
    from netcl.optim._arena import ALIGN, regions
    placed, lengths = regions(sizes, cap)
    assert len(placed) == len(sizes)
    _regions_are_disjoint_and_aligned(placed, lengths, sizes, cap)
    # Every arena but the last is full enough that its next tensor did not fit.
    for arena in range(len(lengths) - 1):
        first_next = next(n for (a, _), n in zip(placed, sizes) if a == arena + 1)
        assert lengths[arena] + -(-first_next // ALIGN) * ALIGN > cap


def _bases(opt, p):
    return {name: buf.base_data for name, buf in opt._state_entries[id(p)].buffers().items()}


@pytest.mark.parametrize("variant", [VARIANTS[3], VARIANTS[6], VARIANTS[10]], ids=variant_id)
def test_state_that_starts_together_shares_buffers_and_steps_like_torch(ctx_factory, variant):
    """Parameters that start together get their state packed into one
    buffer per state name, and their launches pass it once; replacing one
    parameter's buffer moves it to a launch of its own; every step, before
    and after, matches torch."""
    torch = pytest.importorskip("torch")
    from netcl.optim._arena import ALIGN
    cls, kw = variant
    queue = make_queue(ctx_factory)
    sizes = [300, 7, 4096, 1, 64, 33]
    params = make_params(queue, np.float32, sizes=sizes)
    tensors = [torch.tensor(p.data.get(), requires_grad=True) for p in params]
    opt = cls(params, **kw)
    topt = getattr(torch.optim, {"RMSProp": "RMSprop"}.get(cls.__name__, cls.__name__))(
        tensors, **kw)
    for step in range(5):
        host = grads_for(params, step, np.float32)
        set_grads(queue, params, host)
        for t, g in zip(tensors, host):
            t.grad = torch.tensor(g)
        opt.step()
        topt.step()
        if step == 0:
            first = _bases(opt, params[0])
            assert first
            for p in params[1:]:
                assert all(_bases(opt, p)[name] is base for name, base in first.items())
            for p in params:
                for buf in opt._state_entries[id(p)].buffers().values():
                    assert (buf.offset // buf.dtype.itemsize) % ALIGN == 0
            assert all(b.shared_state for b in opt._program.updates)
            assert len(opt._program.updates) == 1
        if step == 2:  # a buffer of its own for one state of parameter 2, same values
            name = list(first)[-1]
            entry = opt.state[id(params[2])]
            entry[name] = entry[name].copy()
        for i, (p, t) in enumerate(zip(params, tensors)):
            assert_close(p.data.get(), t.detach().numpy(), f"step {step} param {i}", nulp=4)
    shared = [b.shared_state for b in opt._program.updates]
    assert sorted(shared) == [False, True]
    assert [len(b.params) for b in opt._program.updates if not b.shared_state] == [1]


def test_loaded_state_is_packed_and_resumes_exactly(ctx_factory):
    queue = make_queue(ctx_factory)
    sizes = [300, 7, 4096, 1, 64]
    params = make_params(queue, np.float32, sizes=sizes)
    opt = Adam(params, lr=1e-2, amsgrad=True)
    for step in range(2):
        set_grads(queue, params, grads_for(params, step, np.float32))
        opt.step()
    saved = opt.state_dict()
    twin_params = [netcl.Parameter(p.data.copy()) for p in params]
    twin = Adam(twin_params, lr=1e-2, amsgrad=True)
    twin.load_state_dict(saved)
    first = _bases(twin, twin_params[0])
    for p in twin_params[1:]:
        assert all(_bases(twin, p)[name] is base for name, base in first.items())
    for step in range(2, 4):
        host = grads_for(params, step, np.float32)
        set_grads(queue, params, host)
        set_grads(queue, twin_params, host)
        opt.step()
        twin.step()
    assert all(b.shared_state for b in twin._program.updates)
    for p, q in zip(params, twin_params):
        assert np.array_equal(p.data.get(), q.data.get())
    for a, b in zip(opt.state_dict()["state"].values(), twin.state_dict()["state"].values()):
        for name in a:
            assert np.array_equal(np.asarray(a[name]), np.asarray(b[name])), name


def test_new_data_array_with_new_gradients_is_bound(ctx_factory):
    """A step whose gradients are all new arrays and one parameter's .data
    was replaced too updates the new data array (and refuses one whose
    shape no longer fits the state, naming it)."""
    torch = pytest.importorskip("torch")
    queue = make_queue(ctx_factory)
    sizes = [300, 7, 64]
    params = make_params(queue, np.float32, sizes=sizes)
    tensors = [torch.tensor(p.data.get(), requires_grad=True) for p in params]
    opt = Adam(params, lr=1e-2)
    topt = torch.optim.Adam(tensors, lr=1e-2)
    old_data = None
    for step in range(4):
        host = grads_for(params, step, np.float32)
        set_grads(queue, params, host)
        if step == 2:
            old_data = params[1].data
            params[1].data = old_data.copy()
        for t, g in zip(tensors, host):
            t.grad = torch.tensor(g)
        opt.step()
        topt.step()
        for i, (p, t) in enumerate(zip(params, tensors)):
            assert_close(p.data.get(), t.detach().numpy(), f"step {step} param {i}", nulp=4)
    assert not np.array_equal(old_data.get(), params[1].data.get())  # left behind at step 2
    set_grads(queue, params, grads_for(params, 4, np.float32))
    params[2].data = cla.zeros(queue, 65, np.float32)
    params[2].grad = cla.zeros(queue, 65, np.float32)
    before = [p.data.get() for p in params[:2]]
    with pytest.raises(ValueError, match="parameter 2"):
        opt.step()
    for p, b in zip(params[:2], before):
        assert np.array_equal(p.data.get(), b)


def test_state_view_off_the_alignment_is_refused(ctx_factory):
    """A state buffer replaced by a view that starts neither where its
    parameter does nor on a 16-element boundary would be read misaligned:
    refused, naming the parameter and the state, and nothing changes."""
    queue = make_queue(ctx_factory)
    params = make_params(queue, np.float32, sizes=[64, 40])
    opt = Adam(params, lr=1e-2)
    set_grads(queue, params, grads_for(params, 0, np.float32))
    opt.step()
    before = [p.data.get() for p in params]
    states = {k: v.get() for k, v in opt.state[id(params[1])].buffers().items()}
    opt.state[id(params[1])]["exp_avg"] = cla.zeros(queue, 48, np.float32)[3:43]
    with pytest.raises(ValueError, match="parameter 1.*exp_avg"):
        opt.step()
    for p, b in zip(params, before):
        assert np.array_equal(p.data.get(), b)
    assert np.array_equal(opt.state[id(params[1])]["exp_avg_sq"].get(), states["exp_avg_sq"])
    assert opt.state[id(params[1])]["step"] == 1


def test_parameter_swapped_into_a_group_list_is_refused(ctx_factory):
    """A parameter put in place of another in a group's list (same list,
    same length) before a step with new gradients is refused with a clear
    error, and nothing changes; the old parameter is not updated behind
    the user's back."""
    queue = make_queue(ctx_factory)
    params = make_params(queue, np.float32, sizes=[32, 48])
    opt = SGD(params, lr=0.5)
    set_grads(queue, params, grads_for(params, 0, np.float32))
    opt.step()
    before = [p.data.get() for p in params]
    spare = netcl.Parameter(cla.to_device(queue, np.ones(48, np.float32)))
    opt.param_groups[0]["params"][1] = spare
    set_grads(queue, [params[0], spare], grads_for(params, 1, np.float32))
    with pytest.raises(ValueError, match="group 0, position 1.*add_param_group"):
        opt.step()
    for p, b in zip(params, before):
        assert np.array_equal(p.data.get(), b)
    assert np.array_equal(spare.data.get(), np.ones(48, np.float32))
