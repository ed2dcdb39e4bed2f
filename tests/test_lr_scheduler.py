"""netcl.optim.lr_scheduler against torch.optim.lr_scheduler.

The oracle is torch's scheduler driving a torch optimizer built with the same
groups: every learning rate (and every cycled momentum / beta1) netcl's
scheduler writes into a netcl optimizer must equal torch's exactly, step by
step, over 320 steps, for every scheduler, and again after a resume midway
from the scheduler's own state dict and from torch's. A run with real steps
checks that a schedule never builds a kernel and that the parameters follow
torch's.
"""

import copy
import inspect
import warnings

import numpy as np
import pyopencl as cl
import pyopencl.array as cla
import pytest

import netcl
import netcl.amp
from netcl import _kernels
from netcl.optim import lr_scheduler as N

from conftest import make_queue

torch = pytest.importorskip("torch")
T = torch.optim.lr_scheduler

STEPS = 320
RESUME_AT = 157

# (netcl optimizer, torch optimizer, hyperparameters): the three ways a
# scheduler can find momentum — 'momentum' (SGD, RMSProp) and 'betas' (Adam).
FAMILIES = {
    "sgd": (netcl.optim.SGD, torch.optim.SGD, dict(momentum=0.9)),
    "adam": (netcl.optim.Adam, torch.optim.Adam, dict()),
    "rmsprop": (netcl.optim.RMSProp, torch.optim.RMSprop, dict(momentum=0.5)),
}

# Each builds a scheduler from a module (torch's or netcl's) and an optimizer,
# so both sides run the very same construction.
SCHEDULERS = {
    "LambdaLR": lambda L, o: L.LambdaLR(o, [lambda e: 0.97 ** e, lambda e: 1 / (1 + e)]),
    "MultiplicativeLR": lambda L, o: L.MultiplicativeLR(o, lambda e: 0.99 if e % 3 else 1.01),
    "StepLR": lambda L, o: L.StepLR(o, 7, 0.7),
    "StepLR-default": lambda L, o: L.StepLR(o, 30),
    "MultiStepLR": lambda L, o: L.MultiStepLR(o, [10, 50, 50, 200], 0.5),
    "ConstantLR": lambda L, o: L.ConstantLR(o, 0.25, 40),
    "ConstantLR-default": lambda L, o: L.ConstantLR(o),
    "LinearLR": lambda L, o: L.LinearLR(o, 0.1, 0.9, 77),
    "LinearLR-default": lambda L, o: L.LinearLR(o),
    "ExponentialLR": lambda L, o: L.ExponentialLR(o, 0.99),
    "PolynomialLR": lambda L, o: L.PolynomialLR(o, 250, 2.0),
    "PolynomialLR-default": lambda L, o: L.PolynomialLR(o),
    "CosineAnnealingLR": lambda L, o: L.CosineAnnealingLR(o, 45, 0.001),
    "CosineAnnealingWarmRestarts": lambda L, o: L.CosineAnnealingWarmRestarts(o, 10, 2, 1e-3),
    "CosineAnnealingWarmRestarts-1": lambda L, o: L.CosineAnnealingWarmRestarts(o, 13),
    "CyclicLR-triangular2": lambda L, o: L.CyclicLR(o, 0.01, [0.1, 0.2], 20, 13, "triangular2"),
    "CyclicLR-exp_range": lambda L, o: L.CyclicLR(o, 0.01, 0.1, 17, mode="exp_range",
                                                  gamma=0.995, base_momentum=[0.7, 0.75]),
    "CyclicLR-triangular": lambda L, o: L.CyclicLR(o, [0.001, 0.002], 0.05, 31),
    "CyclicLR-no-momentum": lambda L, o: L.CyclicLR(o, 0.01, 0.1, 9, cycle_momentum=False),
    "OneCycleLR": lambda L, o: L.OneCycleLR(o, [0.1, 0.3], total_steps=STEPS + 1),
    "OneCycleLR-three-phase": lambda L, o: L.OneCycleLR(
        o, 0.1, epochs=8, steps_per_epoch=41, anneal_strategy="linear", three_phase=True,
        base_momentum=[0.8, 0.7], div_factor=10.0),
    "SequentialLR": lambda L, o: L.SequentialLR(
        o, [L.LinearLR(o, 0.1, 1.0, 20), L.CosineAnnealingLR(o, 100),
            L.ExponentialLR(o, 0.98)], [20, 150]),
    "ChainedScheduler-of-SequentialLR": lambda L, o: L.ChainedScheduler(
        [L.SequentialLR(o, [L.ConstantLR(o, 0.5, 10), L.ExponentialLR(o, 0.99)], [40]),
         L.StepLR(o, 25, 0.8)]),
    "ChainedScheduler": lambda L, o: L.ChainedScheduler(
        [L.ConstantLR(o, 0.5, 30), L.ExponentialLR(o, 0.99), L.StepLR(o, 40, 0.5)]),
    "ChainedScheduler-warmup-cosine": lambda L, o: L.ChainedScheduler(
        [L.LinearLR(o, 0.01, 1.0, 30), L.CosineAnnealingLR(o, STEPS, 1e-5)], optimizer=o),
}


@pytest.fixture(scope="module")
def queue():
    return netcl.default_queue()


def groups(make_param):
    # Two groups with different learning rates: per-group values must not mix.
    return [{"params": [make_param()]}, {"params": [make_param()], "lr": 0.05}]


def netcl_optimizer(queue, family):
    cls, _, hyper = FAMILIES[family]
    return cls(groups(lambda: netcl.Parameter(cla.zeros(queue, 3, np.float32))), lr=0.1,
               **hyper)


def torch_optimizer(family):
    _, cls, hyper = FAMILIES[family]
    return cls(groups(lambda: torch.nn.Parameter(torch.zeros(3))), lr=0.1, **hyper)


def hyperparameters(optimizer):
    """What a scheduler may write: lr, momentum, beta1, as plain Python values."""
    return [(g["lr"], g.get("momentum"), tuple(g["betas"]) if "betas" in g else None)
            for g in optimizer.param_groups]


def assert_same(step, ours, theirs, scheduler, torch_scheduler):
    assert hyperparameters(ours) == hyperparameters(theirs), f"step {step}"
    assert scheduler.get_last_lr() == torch_scheduler.get_last_lr(), f"step {step}"
    assert getattr(scheduler, "last_epoch", None) == getattr(torch_scheduler, "last_epoch", None)


def resumed(queue, family, make, optimizer, saved):
    """A new optimizer and scheduler, resumed as a training script would."""
    fresh = netcl_optimizer(queue, family)
    scheduler = make(N, fresh)
    fresh.load_state_dict(optimizer.state_dict())
    scheduler.load_state_dict(copy.deepcopy(saved))
    return fresh, scheduler


def _cases():
    # Schedulers that cycle momentum run with each family (momentum, betas);
    # the others only write lr, and take the families in turn.
    families = sorted(FAMILIES)
    for index, name in enumerate(sorted(SCHEDULERS)):
        cycling = name.startswith(("CyclicLR", "OneCycleLR"))
        for family in families if cycling else [families[index % len(families)]]:
            yield name, family


@pytest.mark.parametrize("name, family", list(_cases()))
def test_sequence_matches_torch_and_resumes(queue, name, family):
    make = SCHEDULERS[name]
    theirs, ours = torch_optimizer(family), netcl_optimizer(queue, family)
    torch_scheduler, scheduler = make(T, theirs), make(N, ours)
    assert_same(0, ours, theirs, scheduler, torch_scheduler)
    assert [g.get("initial_lr") for g in ours.param_groups] == \
        [g.get("initial_lr") for g in theirs.param_groups]
    runs = {}
    for step in range(1, STEPS + 1):
        if step == RESUME_AT:
            # From our own state dict and from torch's: both continue identically.
            runs["own"] = resumed(queue, family, make, ours, scheduler.state_dict())
            runs["torch's"] = resumed(queue, family, make, ours, torch_scheduler.state_dict())
        theirs.step()
        torch_scheduler.step()
        for optimizer, sched in [(ours, scheduler), *runs.values()]:
            optimizer.step()
            sched.step()
            assert_same(step, optimizer, theirs, sched, torch_scheduler)
    if hasattr(torch_scheduler, "base_lrs"):
        assert scheduler.base_lrs == torch_scheduler.base_lrs


def test_every_torch_scheduler_exists_with_torch_signature():
    names = set(T.__all__) - {"_LRScheduler"}
    assert names <= set(N.__all__)
    for name in names:
        ours, theirs = getattr(N, name), getattr(T, name)
        for method in ("__init__", "step"):
            ours_sig = inspect.signature(getattr(ours, method))
            theirs_sig = inspect.signature(getattr(theirs, method))
            assert [(p.name, p.default, p.kind) for p in ours_sig.parameters.values()] == \
                [(p.name, p.default, p.kind) for p in theirs_sig.parameters.values()], \
                f"{name}.{method}"


# ------------------------------------------------------------- closed forms
CLOSED_FORM = ["StepLR", "MultiStepLR", "ConstantLR", "LinearLR", "ExponentialLR",
               "PolynomialLR", "CosineAnnealingLR", "LambdaLR", "CyclicLR-triangular2"]


@pytest.mark.parametrize("name", CLOSED_FORM)
def test_deprecated_epoch_argument_uses_the_closed_form(queue, name):
    make = SCHEDULERS[name]
    theirs, ours = torch_optimizer("sgd"), netcl_optimizer(queue, "sgd")
    torch_scheduler, scheduler = make(T, theirs), make(N, ours)
    epochs = [0, 3, 3, 9, 2, 40, 41, 100, 77, 250, 300, 5]
    for epoch in epochs:
        theirs.step()
        ours.step()
        with warnings.catch_warnings(record=True) as caught_torch:
            warnings.simplefilter("always")
            torch_scheduler.step(epoch)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scheduler.step(epoch)
        assert_same(epoch, ours, theirs, scheduler, torch_scheduler)
        assert first_sentences(caught) == first_sentences(caught_torch)
        assert any("epoch parameter" in str(w.message) for w in caught)


def test_warm_restarts_fractional_epochs(queue):
    theirs, ours = torch_optimizer("adam"), netcl_optimizer(queue, "adam")
    make = SCHEDULERS["CosineAnnealingWarmRestarts"]
    torch_scheduler, scheduler = make(T, theirs), make(N, ours)
    for epoch in [0.5, 1.25, 9.99, 10, 29.5, 31, 70.1, 200, 3, 0]:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # neither warns for epoch here
            torch_scheduler.step(epoch)
            scheduler.step(epoch)
        assert_same(epoch, ours, theirs, scheduler, torch_scheduler)
        assert (scheduler.T_cur, scheduler.T_i) == (torch_scheduler.T_cur, torch_scheduler.T_i)
    with pytest.raises(ValueError, match="non-negative epoch"):
        scheduler.step(-1)


# --------------------------------------------------------- ReduceLROnPlateau
def metric_sequence(seed):
    """Improving, flat, noisy and worsening stretches."""
    rng = np.random.default_rng(seed)
    values, level = [], 10.0
    for step in range(STEPS):
        phase = (step // 40) % 4
        level *= [0.97, 1.0, 1.0, 1.01][phase]
        noise = [0.0, 0.0, 0.05, 0.0][phase] * rng.standard_normal()
        values.append(level + noise)
    return values


PLATEAU = {
    "default": dict(),
    "min-rel": dict(factor=0.5, patience=3, threshold=1e-3),
    "min-abs-cooldown": dict(factor=0.7, patience=2, threshold=0.01, threshold_mode="abs",
                             cooldown=4, min_lr=[1e-3, 0.01]),
    "max-rel": dict(mode="max", factor=0.3, patience=5, min_lr=1e-4),
    "max-abs-eps": dict(mode="max", threshold_mode="abs", patience=1, eps=1e-3, min_lr=0.004),
}


@pytest.mark.parametrize("config", sorted(PLATEAU))
def test_reduce_on_plateau_matches_torch_and_resumes(queue, config):
    kwargs = PLATEAU[config]
    metrics = metric_sequence(len(config))
    theirs, ours = torch_optimizer("sgd"), netcl_optimizer(queue, "sgd")
    torch_scheduler = T.ReduceLROnPlateau(theirs, **kwargs)
    scheduler = N.ReduceLROnPlateau(ours, **kwargs)
    attributes = ("best", "num_bad_epochs", "cooldown_counter", "last_epoch")
    runs = []
    for step, metric in enumerate(metrics):
        if step == RESUME_AT:
            fresh = netcl_optimizer(queue, "sgd")
            again = N.ReduceLROnPlateau(fresh, **kwargs)
            fresh.load_state_dict(ours.state_dict())
            again.load_state_dict(copy.deepcopy(torch_scheduler.state_dict()))
            runs.append((fresh, again))
        torch_scheduler.step(metric)
        for optimizer, sched in [(ours, scheduler), *runs]:
            sched.step(np.float64(metric) if step % 2 else metric)  # anything float() takes
            assert hyperparameters(optimizer) == hyperparameters(theirs), f"step {step}"
            assert sched.get_last_lr() == torch_scheduler.get_last_lr()
            assert [getattr(sched, a) for a in attributes] == \
                [getattr(torch_scheduler, a) for a in attributes]
    assert theirs.param_groups[0]["lr"] < 0.1  # the metrics did trigger a reduction


# ----------------------------------------------------------------- warnings
def first_sentences(caught):
    return [(w.category, str(w.message).split(". ")[0].rstrip(".")) for w in caught]


def scenario_step_before_optimizer(L, optimizer):
    scheduler = L.ExponentialLR(optimizer, 0.9)
    scheduler.step()


def scenario_right_order(L, optimizer):
    scheduler = L.StepLR(optimizer, 2)
    for _ in range(3):
        optimizer.step()
        scheduler.step()


def scenario_step_replaced(L, optimizer):
    scheduler = L.LinearLR(optimizer)
    optimizer.step = lambda *a, **k: None
    scheduler.step()


def scenario_get_lr_outside_step(L, optimizer):
    scheduler = L.CosineAnnealingLR(optimizer, 10)
    optimizer.step()
    scheduler.step()
    scheduler.get_lr()


def scenario_sequential_before_optimizer(L, optimizer):
    scheduler = L.SequentialLR(optimizer, [L.ConstantLR(optimizer), L.StepLR(optimizer, 3)], [4])
    for _ in range(6):
        scheduler.step()


@pytest.mark.parametrize("scenario", [scenario_step_before_optimizer, scenario_right_order,
                                      scenario_step_replaced, scenario_get_lr_outside_step,
                                      scenario_sequential_before_optimizer])
def test_warnings_where_torch_warns(queue, scenario):
    caught = {}
    for key, L, optimizer in [("torch", T, torch_optimizer("sgd")),
                              ("netcl", N, netcl_optimizer(queue, "sgd"))]:
        with warnings.catch_warnings(record=True) as caught[key]:
            warnings.simplefilter("always")
            scenario(L, optimizer)
    assert first_sentences(caught["netcl"]) == first_sentences(caught["torch"])


def test_grad_scaler_step_counts_as_optimizer_step(ctx_factory):
    queue = make_queue(ctx_factory)
    p = netcl.Parameter(cla.zeros(queue, 4, np.float32), grad=cla.zeros(queue, 4, np.float32))
    optimizer = netcl.optim.Adam([p])
    scheduler = N.ExponentialLR(optimizer, 0.5)
    scaler = netcl.amp.GradScaler(queue)
    scaler.step(optimizer)
    scaler.update()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 1e-3 * 0.5


# --------------------------------------------------------- errors and state
def test_bad_input_names_the_culprit(queue):
    with pytest.raises(TypeError, match="list is not an Optimizer"):
        N.StepLR([], 3)
    with pytest.raises(TypeError, match="lr_lambda should be a function"):
        N.MultiplicativeLR(netcl_optimizer(queue, "sgd"), [lambda e: 1.0, 0.5])
    with pytest.raises(ValueError, match="Expected 2 lr_lambdas"):
        N.LambdaLR(netcl_optimizer(queue, "sgd"), [lambda e: 1.0])
    with pytest.raises(KeyError, match=r"initial_lr.*param_groups\[0\]"):
        N.ExponentialLR(netcl_optimizer(queue, "sgd"), 0.9, last_epoch=4)
    no_momentum = netcl.optim.SGD([netcl.Parameter(cla.zeros(queue, 2, np.float32))])
    del no_momentum.defaults["momentum"]
    with pytest.raises(ValueError, match="momentum or beta1"):
        N.OneCycleLR(no_momentum, 0.1, total_steps=10)
    optimizer = netcl_optimizer(queue, "sgd")
    with pytest.raises(ValueError, match="ReduceLROnPlateau"):
        N.ChainedScheduler([N.ReduceLROnPlateau(optimizer)])
    with pytest.raises(ValueError, match="same optimizer"):
        N.SequentialLR(optimizer, [N.StepLR(optimizer, 2),
                                   N.StepLR(netcl_optimizer(queue, "sgd"), 2)], [3])
    optimizer = netcl_optimizer(queue, "sgd")
    one_cycle = N.OneCycleLR(optimizer, 0.1, total_steps=2)
    optimizer.step()
    one_cycle.step()
    one_cycle.step()
    with pytest.raises(ValueError, match="Tried to step 3 times"):
        one_cycle.step()


def test_bad_state_dict_changes_nothing(queue):
    optimizer = netcl_optimizer(queue, "adam")
    scheduler = N.SequentialLR(optimizer, [N.ConstantLR(optimizer), N.StepLR(optimizer, 3)],
                               [4])
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    good = scheduler.state_dict()
    before = copy.deepcopy(good)
    broken = copy.deepcopy(good)
    del broken["_schedulers"][1]["gamma"]
    with pytest.raises(KeyError, match=r"StepLR state_dict lacks \['gamma'\]"):
        scheduler.load_state_dict(broken)
    broken = copy.deepcopy(good)
    broken["_schedulers"] = broken["_schedulers"][:1]
    with pytest.raises(ValueError, match="must hold 2 state dicts"):
        scheduler.load_state_dict(broken)
    with pytest.raises(ValueError, match="unknown keys"):
        scheduler.load_state_dict({**copy.deepcopy(good), "stray": 1})
    with pytest.raises(TypeError, match="must be a dict"):
        scheduler.load_state_dict([1])
    assert scheduler.state_dict() == before


def test_drives_any_object_with_param_groups():
    # A torch optimizer, through netcl's scheduler, follows torch's scheduler.
    theirs, other = torch_optimizer("adam"), torch_optimizer("adam")
    make = SCHEDULERS["OneCycleLR"]
    torch_scheduler, scheduler = make(T, theirs), make(N, other)
    for step in range(50):
        theirs.step()
        other.step()
        torch_scheduler.step()
        scheduler.step()
        assert hyperparameters(other) == hyperparameters(theirs)


# ------------------------------------------------------ real steps, no builds
REAL = {
    "adam-onecycle": ("adam", lambda L, o: L.OneCycleLR(o, [0.01, 0.02], total_steps=60)),
    "rmsprop-cyclic": ("rmsprop", lambda L, o: L.CyclicLR(o, 1e-3, 1e-2, 7)),
    "sgd-warmup-cosine": ("sgd", lambda L, o: L.SequentialLR(
        o, [L.LinearLR(o, 0.1, 1.0, 10), L.CosineAnnealingLR(o, 50)], [10])),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_lr_changes_never_build_a_kernel(ctx_factory, monkeypatch, name):
    family, make = REAL[name]
    queue = make_queue(ctx_factory)
    rng = np.random.default_rng(7)
    shapes = [(37,), (5, 3)]
    hosts = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    params = [netcl.Parameter(cla.to_device(queue, h)) for h in hosts]
    tensors = [torch.nn.Parameter(torch.tensor(h)) for h in hosts]
    cls, torch_cls, hyper = FAMILIES[family]
    ours = cls([{"params": [params[0]]}, {"params": [params[1]], "lr": 0.05}], lr=0.01, **hyper)
    theirs = torch_cls([{"params": [tensors[0]]}, {"params": [tensors[1]], "lr": 0.05}],
                       lr=0.01, **hyper)
    scheduler, torch_scheduler = make(N, ours), make(T, theirs)

    # Count program builds and kernel objects made: neither may happen after
    # the first step, whatever the schedule writes into the groups.
    builds = []
    build, new_kernel = cl.Program.build, _kernels.new_kernel
    monkeypatch.setattr(cl.Program, "build",
                        lambda self, *a, **k: builds.append("build") or build(self, *a, **k))
    monkeypatch.setattr(_kernels, "new_kernel",
                        lambda *a, **k: builds.append("kernel") or new_kernel(*a, **k))
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(60)]
    for step, step_grads in enumerate(grads):
        for p, t, g in zip(params, tensors, step_grads):
            p.grad = cla.to_device(queue, g)
            t.grad = torch.tensor(g)
        ours.step()
        theirs.step()
        scheduler.step()
        torch_scheduler.step()
        if step == 0:
            first_step_builds = len(builds)
            assert "kernel" in builds  # the counters do see the first step's kernels
        assert hyperparameters(ours) == hyperparameters(theirs)
    assert len(builds) == first_step_builds, "a learning-rate change built a kernel"
    for p, t in zip(params, tensors):
        np.testing.assert_allclose(p.data.get(), t.detach().numpy(), rtol=2e-5, atol=2e-6)


def test_optimizer_state_dict_carries_scheduler_group_keys(queue):
    """As torch's load_state_dict, netcl's restores the keys schedulers add to
    the groups, so a scheduler resumed with last_epoch >= 0 finds
    'initial_lr'; torch's own options (foreach, ...) are not copied in."""
    optimizer = netcl_optimizer(queue, "adam")
    N.StepLR(optimizer, step_size=3)
    saved = optimizer.state_dict()
    saved["param_groups"][0]["foreach"] = None
    fresh = netcl_optimizer(queue, "adam")
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["initial_lr"] == optimizer.param_groups[0]["initial_lr"]
    assert "foreach" not in fresh.param_groups[0]
    N.StepLR(fresh, step_size=3, last_epoch=4)  # torch raises KeyError without initial_lr
