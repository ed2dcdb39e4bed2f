"""Parity of netcl's Adam, AdamW and SGD with torch.optim (torch's CPU path).

Every test drives a netcl optimizer and the torch optimizer of the same name
with the same parameters and gradients and compares parameters *and every
state buffer* after each step.

Tolerance. torch's CPU ``sqrt`` is not correctly rounded (about 0.7% of
float32 elements differ by one ulp from IEEE sqrt) while OpenCL's is, so after
a sqrt bit equality is impossible; everything else follows torch's operation
order and fma placement, so the differences stay at a few ulp. float32 allows
``RTOL32`` relative to each element plus a floor of ``FLOOR32`` times the
array's largest magnitude (for elements near zero after cancellation);
float64 allows ~1e-12 relative.

torch's dispatch path. That fma placement is torch's AVX2/AVX-512 kernels'
(``ATEN_CPU_CAPABILITY=avx2`` and ``avx512`` give bit-identical results);
its DEFAULT kernels (``ATEN_CPU_CAPABILITY=default``, CPUs without AVX2)
round the product of ``add(alpha=)``, ``addcmul`` and ``lerp`` before the
add. Where the rule cancels -- ``grad + wd*param`` near zero and then
divided by ``sqrt(v) + eps`` (Adam), a ``lerp`` or momentum update whose
terms are far larger than its result (Adam's ``exp_avg``, SGD's buffer) --
that one rounding grows to 10-700 float32 ulp of the element (up to ~12 ulp
of the array's largest), far beyond the tolerance. So an element outside
the tolerance is accepted only if it is what torch's rule (``_torch_adam_step``,
``_torch_sgd_step``) gives from netcl's own previous state under some
rounding, computed in interval arithmetic (``rmsprop_reference.Interval``);
torch's own value must lie in the interval computed from torch's state, which
checks the rule itself. Where the rule is well-conditioned the interval is a
few ulp wide, so a wrong operation still fails.

Devices: tests taking ``ctx_factory`` run on every OpenCL device through
``pytest_generate_tests_for_pyopencl``, which tests/conftest.py installs for
the whole folder (importing it here too would parametrize twice).

Test matrix. The full flag cross (Adam/AdamW: amsgrad x maximize x
weight_decay {0, 0.1}; SGD: momentum x dampening x nesterov x weight_decay x
maximize, invalid combinations skipped) runs on the small shapes: 0, 1 and 7
elements (scalar tail only), and a mix of shapes in one optimizer (vector body,
tail, and a tensor spanning two chunk-table rows). The 1000003-element shape
takes seconds per case on a 2-core PoCL device, and it exercises the same
kernels (the flags select code, the length only the chunk table), so it runs
on a representative subset: for each optimizer the richest variant (amsgrad
with weight decay, Nesterov with weight decay, dampened momentum with
maximize), plain SGD without state, and one float64 case each; its second
parameter group holds a 7-element tensor. Every case has two parameter groups
with different learning rates. Separately, betas with 1 - beta1 >= 0.5 (and
beta = 0) cover torch's second lerp form, which the default betas never reach.
"""

import inspect
import json
import os
import re

import numpy as np
import pyopencl as cl
import pyopencl.array as cla
import pytest
import torch

from netcl import Parameter
from netcl.optim import SGD, Adam, AdamW

try:  # works whether or not tests/ is imported as a package
    from tests import rmsprop_reference as ref
except ImportError:  # pragma: no cover
    import rmsprop_reference as ref

torch.set_num_threads(2)

RTOL32 = 4 * 2.0 ** -23        # four float32 ulp of the element
FLOOR32 = 2.0 ** -23           # about one float32 ulp of the array's largest element
RTOL64 = 1e-12
FLOOR64 = 1e-14
STEPS = 20
BIG = 1000003
MIX = [(3, 5), (0,), (16,), (1,), (33, 17), (20000,)]

# Worst differences seen per optimizer and dtype (see _record); written out as
# JSON when the environment variable NETCL_ULP_REPORT names a file.
_WORST = {}


@pytest.fixture(scope="module", autouse=True)
def _ulp_report():
    yield
    path = os.environ.get("NETCL_ULP_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(_WORST, f, indent=1, sort_keys=True)


# ---------------------------------------------------------------- helpers
_contexts = {}


def _get_queue(ctx_factory, dtype=np.float32):
    """One context and queue per device for the whole module.

    ``ctx_factory()`` makes a new context (after a full garbage collection) on
    every call; sharing one keeps each kernel built once per run.
    """
    key = ctx_factory.device.int_ptr
    if key not in _contexts:
        # The context itself is kept too: Intel's CPU runtime invalidates a
        # queue whose Python Context was freed (see conftest.ContextFactory).
        context = ctx_factory()
        _contexts[key] = (context, cl.CommandQueue(context))
    queue = _contexts[key][1]
    if dtype == np.float64 and not queue.device.double_fp_config:
        pytest.skip("the device has no float64")
    return queue


def _ulps(actual, expected, dtype):
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    spacing = np.spacing(np.abs(expected).astype(dtype)).astype(np.float64)
    return diff / spacing


def _record(key, actual, expected, fraction_of_tolerance):
    """Keep the worst ulp of the element (over elements within 2^-8 of the
    array's largest magnitude; smaller ones come out of cancellations), the
    worst error in ulp of the largest element and the worst error as a
    fraction of the tolerance."""
    dtype = actual.dtype
    e = np.abs(expected.astype(np.float64))
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    big = e >= e.max() * 2.0 ** -8
    element = float(_ulps(actual[big], expected[big], dtype).max()) if big.any() else 0.0
    of_max = float(diff.max() / np.spacing(dtype.type(e.max())))
    worst = _WORST.setdefault(key, dict.fromkeys(
        ("ulp_of_element", "ulp_of_array_max", "fraction_of_tolerance"), 0.0))
    worst["ulp_of_element"] = max(worst["ulp_of_element"], element)
    worst["ulp_of_array_max"] = max(worst["ulp_of_array_max"], of_max)
    worst["fraction_of_tolerance"] = max(worst["fraction_of_tolerance"], fraction_of_tolerance)


class _Closeness:
    """One buffer against torch's: the difference and the tolerance."""

    def __init__(self, actual, expected, what):
        assert actual.shape == expected.shape, what
        assert actual.dtype == expected.dtype, what
        rtol, floor = (RTOL32, FLOOR32) if actual.dtype == np.float32 else (RTOL64, FLOOR64)
        e = expected.astype(np.float64)
        self.actual, self.expected, self.what = actual, expected, what
        self.tol = rtol * np.abs(e) + (floor * np.abs(e).max() if e.size else 0.0)
        self.diff = np.abs(actual.astype(np.float64) - e)
        self.within = self.diff <= self.tol

    def check(self, record=None, accepted=None):
        """Raise unless every element is within the tolerance or ``accepted``
        (a mask: outside it, but passed compare's interval check); then add the
        elements within it to the ulp report."""
        if self.actual.size == 0:
            return
        actual, expected, dtype = self.actual, self.expected, self.actual.dtype
        bad = ~self.within if accepted is None else ~(self.within | accepted)
        if bad.any():
            i = np.flatnonzero(bad.ravel())[0]
            raise AssertionError(
                f"{self.what}: {bad.sum()} of {bad.size} elements differ, first at flat index "
                f"{i}: netcl {actual.ravel()[i]!r} torch {expected.ravel()[i]!r} "
                f"({_ulps(actual.ravel()[i:i + 1], expected.ravel()[i:i + 1], dtype)[0]:.1f} ulp)")
        if record is not None:
            key = f"{record} {np.dtype(dtype).name}"
            keep = self.within
            if not keep.all():
                worst = _WORST.setdefault(key, dict.fromkeys(
                    ("ulp_of_element", "ulp_of_array_max", "fraction_of_tolerance"), 0.0))
                worst["interval_fallbacks"] = (worst.get("interval_fallbacks", 0)
                                               + int((~keep).sum()))
            used = (self.tol > 0) & keep  # an all-zero expected array has no tolerance
            fraction = float((self.diff[used] / self.tol[used]).max()) if used.any() else 0.0
            if keep.any():
                _record(key, actual[keep], expected[keep], fraction)


def _torch_state(opt, tp):
    return {k: (v.numpy() if isinstance(v, torch.Tensor) else v)
            for k, v in opt.state.get(tp, {}).items()}


def _netcl_state(opt, p):
    return {k: (v.get() if isinstance(v, cla.Array) else v)
            for k, v in opt.state.get(id(p), {}).items()}


# ------------------------------------------------ torch's rules, in float64
def _torch_adam_step(param, grad, state, step, *, lr, betas, eps, weight_decay, amsgrad,
                     maximize, decoupled_weight_decay):
    """torch.optim.Adam / AdamW, ``_single_tensor_adam`` (torch 2.13, neither
    capturable nor differentiable), in its operation order; runs on float64
    arrays or on ``rmsprop_reference.Interval``. ``step`` is the count after
    the increment."""
    beta1, beta2 = betas
    p, g = param, (-grad if maximize else grad)
    if not state:
        state["exp_avg"], state["exp_avg_sq"] = np.zeros_like(p), np.zeros_like(p)
        if amsgrad:
            state["max_exp_avg_sq"] = np.zeros_like(p)
    if weight_decay != 0:
        if decoupled_weight_decay:
            p = p * (1 - lr * weight_decay)              # param.mul_(1 - lr*wd)
        else:
            g = g + weight_decay * p                     # grad.add(param, alpha=wd)
    state["exp_avg"] = ref._torch_lerp(state["exp_avg"], g, 1 - beta1)
    v = state["exp_avg_sq"] * beta2 + (1 - beta2) * g * g  # mul_(b2).addcmul_(g, g, 1-b2)
    state["exp_avg_sq"] = v
    step_size = lr / (1 - beta1 ** step)
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    if amsgrad:
        v = state["max_exp_avg_sq"] = np.maximum(state["max_exp_avg_sq"], v)
    denom = np.sqrt(v) / bias_correction2_sqrt + eps
    return p + (-step_size * state["exp_avg"]) / denom  # addcdiv_(m, denom, value=-step_size)


def _torch_sgd_step(param, grad, state, step, *, lr, momentum, dampening, weight_decay,
                    nesterov, maximize):
    """torch.optim.SGD, ``_single_tensor_sgd`` (torch 2.13), as _torch_adam_step."""
    p, g = param, (-grad if maximize else grad)
    if weight_decay != 0:
        g = g + weight_decay * p                         # grad.add(param, alpha=wd)
    if momentum != 0:
        if "momentum_buffer" not in state:               # first step: a clone of grad
            buf = g
        else:                                            # mul_(mu).add_(g, alpha=1-d)
            buf = state["momentum_buffer"] * momentum + (1 - dampening) * g
        state["momentum_buffer"] = buf
        g = g + momentum * buf if nesterov else buf      # grad.add(buf, alpha=mu)
    return p + (-lr) * g                                 # param.add_(g, alpha=-lr)


def _unchanged(param, grad, state, step, **hyper):
    return param


_RULES = {
    torch.optim.Adam: (_torch_adam_step, ("lr", "betas", "eps", "weight_decay", "amsgrad",
                                          "maximize", "decoupled_weight_decay")),
    torch.optim.SGD: (_torch_sgd_step, ("lr", "momentum", "dampening", "weight_decay",
                                        "nesterov", "maximize")),
}


def _buffers(nopt, topt, params, tparams, copy=True):
    """Per parameter: netcl's and torch's parameter and state (no step) on the
    host, and the gradient (None when unset). Taken before a step for compare
    (``copy``: torch's arrays are copied, not views of tensors that step()
    changes)."""
    out = []
    for p, tp in zip(params, tparams):
        ours = {k: v for k, v in _netcl_state(nopt, p).items() if k != "step"}
        theirs = {k: v for k, v in _torch_state(topt, tp).items() if k != "step"}
        ours["param"], theirs["param"] = p.data.get(), tp.detach().numpy()
        grad = None if tp.grad is None else tp.grad.numpy()
        if copy:
            theirs = {k: v.copy() for k, v in theirs.items()}
            grad = None if grad is None else grad.copy()
        out.append((ours, theirs, grad))
    return out


def compare(nopt, topt, params, tparams, what, record=None, before=None):
    """Parameters and every state buffer against torch after a step.

    With ``before`` (``_buffers`` taken just before the step), an element
    outside the tolerance passes if it is what torch's rule gives from
    netcl's previous state under some rounding, and torch's value is what the
    rule gives from torch's (rmsprop_reference.either_path_mismatches): the
    rounding torch does on its DEFAULT dispatch path and netcl's (torch's
    AVX2/AVX-512 one) are both inside. See the module docstring.
    """
    after = _buffers(nopt, topt, params, tparams, copy=False)
    rule, keys = next(v for c, v in _RULES.items() if isinstance(topt, c))
    groups = {id(t): g for g in topt.param_groups for t in g["params"]}
    for i, (p, tp) in enumerate(zip(params, tparams)):
        nstate, tstate = _netcl_state(nopt, p), _torch_state(topt, tp)
        assert set(nstate) == set(tstate), f"{what}: param {i} state keys"
        if "step" in tstate:
            assert nstate["step"] == int(tstate["step"]), f"{what}: param {i} step"
        ours, theirs, _ = after[i]
        close = {name: _Closeness(value, theirs[name],
                                  f"{what}: param {i}" + ("" if name == "param" else f" {name}"))
                 for name, value in ours.items()}
        accepted = {}
        if before is not None:
            ours0, theirs0, grad = before[i]
            hyper = {k: groups[id(tp)][k] for k in keys}
            step = int(tstate.get("step", 0))
            if grad is None:
                rule_i, grad = _unchanged, np.zeros_like(ours0["param"])
            else:
                rule_i = rule
            failures, _ = ref.either_path_mismatches(
                rule_i, step, hyper, grad, (ours0, ours), (theirs0, theirs),
                lambda name, a, e: close[name].within)
            assert not failures, f"{what}: param {i}: " + "; ".join(failures)
            # Every element outside the tolerance has passed the interval check.
            accepted = {name: ~c.within for name, c in close.items()}
        for name, c in close.items():
            c.check(record, accepted.get(name))


def make_params(queue, shapes, dtype, seed):
    rng = np.random.default_rng(seed)
    values = [rng.standard_normal(shape).astype(dtype) for shape in shapes]
    params = [Parameter(cla.to_device(queue, v)) for v in values]
    tparams = [torch.tensor(v.copy()) for v in values]
    return params, tparams


def set_grads(queue, params, tparams, rng, step):
    """Varied gradients: scales over five decades, sign flips, exact zeros."""
    for p, tp in zip(params, tparams):
        shape, dtype = p.data.shape, p.data.dtype
        scale = 10.0 ** rng.uniform(-3, 2)
        g = (rng.standard_normal(shape) * scale).astype(dtype)
        if g.size:
            g[rng.random(shape) < 0.05] = 0
            if step % 3 == 2:
                g = -g
        p.grad = cla.to_device(queue, g)
        tp.grad = torch.tensor(g.copy())


def run_parity(queue, ncls, tcls, kwargs, shapes, dtype, lrs, steps=STEPS, seed=0):
    """Two groups with different learning rates: one shape goes into both
    groups, several are split alternately between them."""
    groups_shapes = [shapes, shapes] if len(shapes) == 1 else [shapes[::2], shapes[1::2]]
    params, tparams = make_params(queue, groups_shapes[0] + groups_shapes[1], dtype, seed)
    n0 = len(groups_shapes[0])
    ngroups = [{"params": params[:n0], "lr": lrs[0]}, {"params": params[n0:], "lr": lrs[1]}]
    tgroups = [{"params": tparams[:n0], "lr": lrs[0]}, {"params": tparams[n0:], "lr": lrs[1]}]
    nopt, topt = ncls(ngroups, **kwargs), tcls(tgroups, **kwargs)
    rng = np.random.default_rng(seed + 1)
    for step in range(steps):
        set_grads(queue, params, tparams, rng, step)
        before = _buffers(nopt, topt, params, tparams)
        nopt.step()
        topt.step()
        compare(nopt, topt, params, tparams, f"{ncls.__name__} {kwargs} step {step + 1}",
                record=ncls.__name__, before=before)


# ------------------------------------------------------------ flag tables
def _adam_cases():
    for cls in (Adam, AdamW):
        for amsgrad in (False, True):
            for maximize in (False, True):
                for weight_decay in (0.0, 0.1):
                    yield cls, dict(amsgrad=amsgrad, maximize=maximize,
                                    weight_decay=weight_decay)


def _sgd_cases():
    for momentum in (0.0, 0.9):
        for dampening in (0.0, 0.5):
            for nesterov in (False, True):
                if nesterov and (momentum == 0 or dampening != 0):
                    continue
                for weight_decay in (0.0, 0.1):
                    for maximize in (False, True):
                        yield dict(momentum=momentum, dampening=dampening, nesterov=nesterov,
                                   weight_decay=weight_decay, maximize=maximize)


_TORCH = {Adam: torch.optim.Adam, AdamW: torch.optim.AdamW, SGD: torch.optim.SGD}
_SMALL = {"n0": [(0,)], "n1": [(1,)], "n7": [(7,)], "mix": MIX}
_DTYPES = {"f32": np.float32, "f64": np.float64}
ADAM_LRS = (3e-3, 1e-3)
SGD_LRS = (0.05, 0.01)


def _kw_id(kwargs):
    return "-".join(f"{k}={v}" for k, v in kwargs.items())


@pytest.mark.parametrize("dtype", _DTYPES.values(), ids=_DTYPES.keys())
@pytest.mark.parametrize("shapes", _SMALL.values(), ids=_SMALL.keys())
@pytest.mark.parametrize("cls,kwargs", list(_adam_cases()),
                         ids=[f"{c.__name__}-{_kw_id(k)}" for c, k in _adam_cases()])
def test_adam_parity(ctx_factory, cls, kwargs, shapes, dtype):
    queue = _get_queue(ctx_factory, dtype)
    run_parity(queue, cls, _TORCH[cls], kwargs, shapes, dtype, ADAM_LRS)


@pytest.mark.parametrize("dtype", _DTYPES.values(), ids=_DTYPES.keys())
@pytest.mark.parametrize("cls", [Adam, AdamW], ids=["Adam", "AdamW"])
@pytest.mark.parametrize("betas", [(0.3, 0.6), (0.5, 0.5), (0.0, 0.0)], ids=str)
def test_adam_small_betas(ctx_factory, cls, betas, dtype):
    """1 - beta1 >= 0.5 takes torch's other lerp form; beta = 0 is allowed."""
    queue = _get_queue(ctx_factory, dtype)
    run_parity(queue, cls, _TORCH[cls], dict(betas=betas, amsgrad=True, weight_decay=0.1),
               MIX, dtype, ADAM_LRS)


@pytest.mark.parametrize("dtype", _DTYPES.values(), ids=_DTYPES.keys())
@pytest.mark.parametrize("shapes", _SMALL.values(), ids=_SMALL.keys())
@pytest.mark.parametrize("kwargs", list(_sgd_cases()), ids=[_kw_id(k) for k in _sgd_cases()])
def test_sgd_parity(ctx_factory, kwargs, shapes, dtype):
    queue = _get_queue(ctx_factory, dtype)
    run_parity(queue, SGD, torch.optim.SGD, kwargs, shapes, dtype, SGD_LRS)


_BIG_CASES = [
    (Adam, dict(amsgrad=True, weight_decay=0.1), np.float32),
    (AdamW, dict(amsgrad=True, maximize=True, weight_decay=0.1), np.float32),
    (Adam, dict(), np.float64),
    (AdamW, dict(), np.float64),
    (SGD, dict(momentum=0.9, nesterov=True, weight_decay=0.1), np.float32),
    (SGD, dict(momentum=0.9, dampening=0.5, maximize=True), np.float32),
    (SGD, dict(), np.float32),
    (SGD, dict(momentum=0.9, weight_decay=0.1), np.float64),
]


@pytest.mark.parametrize(
    "cls,kwargs,dtype", _BIG_CASES,
    ids=[f"{c.__name__}-{_kw_id(k)}-{np.dtype(d).name}" for c, k, d in _BIG_CASES])
def test_big_parity(ctx_factory, cls, kwargs, dtype):
    queue = _get_queue(ctx_factory, dtype)
    lrs = SGD_LRS if cls is SGD else ADAM_LRS
    run_parity(queue, cls, _TORCH[cls], kwargs, [(BIG,), (7,)], dtype, lrs)


# ------------------------------------------------------------- behaviours
_BEHAVIOUR = [
    (Adam, dict(amsgrad=True, weight_decay=0.1)),
    (AdamW, dict(weight_decay=0.1)),
    (SGD, dict(momentum=0.9, dampening=0.5, weight_decay=0.1)),
    (SGD, dict(momentum=0.9, nesterov=True)),
    (SGD, dict()),
]
_BEHAVIOUR_IDS = [f"{c.__name__}-{_kw_id(k)}" for c, k in _BEHAVIOUR]


@pytest.mark.parametrize("cls,kwargs", _BEHAVIOUR, ids=_BEHAVIOUR_IDS)
def test_lr_change_mid_run(ctx_factory, cls, kwargs):
    queue = _get_queue(ctx_factory)
    params, tparams = make_params(queue, [(40,), (3, 7)], np.float32, 5)
    nopt = cls([{"params": params[:1]}, {"params": params[1:], "lr": 0.02}], lr=0.01, **kwargs)
    topt = _TORCH[cls]([{"params": tparams[:1]}, {"params": tparams[1:], "lr": 0.02}],
                       lr=0.01, **kwargs)
    rng = np.random.default_rng(6)
    for step in range(STEPS):
        if step == 8:
            for group in nopt.param_groups + topt.param_groups:
                group["lr"] *= 0.1
        if step == 14:
            nopt.param_groups[1]["lr"] = topt.param_groups[1]["lr"] = 0.5
        set_grads(queue, params, tparams, rng, step)
        before = _buffers(nopt, topt, params, tparams)
        nopt.step()
        topt.step()
        compare(nopt, topt, params, tparams, f"lr change step {step + 1}", record=cls.__name__,
                before=before)


@pytest.mark.parametrize("cls,kwargs", _BEHAVIOUR, ids=_BEHAVIOUR_IDS)
def test_none_grads_skipped(ctx_factory, cls, kwargs):
    """A parameter without a gradient gets no state, no decay and no step count."""
    queue = _get_queue(ctx_factory)
    params, tparams = make_params(queue, [(10,), (10,), (4,)], np.float32, 7)
    nopt = cls(params, lr=0.01, **kwargs)
    topt = _TORCH[cls](tparams, lr=0.01, **kwargs)
    rng = np.random.default_rng(8)
    never = params[2].data.get()
    for step in range(STEPS):
        set_grads(queue, params, tparams, rng, step)
        # Parameter 2 never has a gradient; parameter 1 has none on steps 3-7.
        params[2].grad = tparams[2].grad = None
        if 3 <= step <= 7:
            params[1].grad = tparams[1].grad = None
        before = _buffers(nopt, topt, params, tparams)
        nopt.step()
        topt.step()
        compare(nopt, topt, params, tparams, f"None grads step {step + 1}",
                record=cls.__name__, before=before)
        assert id(params[2]) not in nopt.state
        assert np.array_equal(params[2].data.get(), never)
    if "step" in _torch_state(topt, tparams[0]):
        assert nopt.state[id(params[1])]["step"] == STEPS - 5
    assert 2 not in nopt.state_dict()["state"]


def _run_steps(queue, opt, params, rng, steps):
    for step in range(steps):
        for p in params:
            p.grad = cla.to_device(queue, rng.standard_normal(p.data.shape).astype(p.data.dtype))
        opt.step()


def _host_state(sd):
    return {i: {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in entry.items()}
            for i, entry in sd["state"].items()}


@pytest.mark.parametrize("dtype", _DTYPES.values(), ids=_DTYPES.keys())
@pytest.mark.parametrize("cls,kwargs", _BEHAVIOUR, ids=_BEHAVIOUR_IDS)
def test_state_dict_round_trip(ctx_factory, cls, kwargs, dtype):
    """Save, load into a fresh optimizer, continue: bitwise equal to never stopping."""
    queue = _get_queue(ctx_factory, dtype)
    shapes = [(33,), (0,), (5, 4)]
    params, _ = make_params(queue, shapes, dtype, 9)
    copies, _ = make_params(queue, shapes, dtype, 9)
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.003}]  # noqa: E731
    opt = cls(groups(params), lr=0.01, **kwargs)
    _run_steps(queue, opt, params, np.random.default_rng(10), 6)
    saved = opt.state_dict()
    snapshot = _host_state(saved)

    # torch's layout: the same state keys (SGD: none without momentum, no step).
    tparams = [torch.zeros(s, dtype=torch.float64 if dtype == np.float64 else torch.float32)
               for s in shapes]
    topt = _TORCH[cls](groups(tparams), lr=0.01, **kwargs)
    for tp in tparams:
        tp.grad = torch.ones_like(tp)
    topt.step()
    tsd = topt.state_dict()
    assert set(saved["state"]) == set(tsd["state"])
    for i in saved["state"]:
        assert set(saved["state"][i]) == set(tsd["state"][i])
    for group, tgroup in zip(saved["param_groups"], tsd["param_groups"]):
        # Besides netcl's engine options (track_stats), torch's keys.
        assert set(group) - set(cls.engine_options) <= set(tgroup)
        assert group["params"] == tgroup["params"]

    for p, c in zip(params, copies):
        c.data.set(p.data.get())
    fresh = cls(groups(copies), lr=0.5, **kwargs)
    fresh.load_state_dict(saved)
    after_load = fresh.state_dict()
    assert set(after_load["state"]) == set(snapshot)
    for i, entry in snapshot.items():
        for name, value in entry.items():
            got = after_load["state"][i][name]
            assert np.array_equal(got, value) and np.asarray(got).dtype == np.asarray(value).dtype
    assert [g["lr"] for g in fresh.param_groups] == [0.01, 0.003]

    _run_steps(queue, opt, params, np.random.default_rng(11), 5)
    _run_steps(queue, fresh, copies, np.random.default_rng(11), 5)
    for p, c in zip(params, copies):
        assert np.array_equal(p.data.get(), c.data.get())
    end, end_fresh = opt.state_dict()["state"], fresh.state_dict()["state"]
    assert set(end) == set(end_fresh)
    for i in end:
        for name, value in end[i].items():
            assert np.array_equal(end_fresh[i][name], value), (i, name)


@pytest.mark.parametrize("cls,kwargs", _BEHAVIOUR, ids=_BEHAVIOUR_IDS)
def test_load_torch_state_then_continue(ctx_factory, cls, kwargs):
    """torch's own state_dict, loaded mid-run, continues in step with torch.

    For SGD this checks that a loaded momentum buffer is not taken for a first
    step; for Adam that the loaded step count drives bias correction.
    """
    queue = _get_queue(ctx_factory)
    params, tparams = make_params(queue, [(50,), (6, 3)], np.float32, 12)
    topt = _TORCH[cls](tparams, lr=0.01, **kwargs)
    rng = np.random.default_rng(13)
    for step in range(4):
        for tp in tparams:
            tp.grad = torch.tensor(rng.standard_normal(tuple(tp.shape)).astype(np.float32))
        topt.step()
    tsd = topt.state_dict()
    converted = {
        "state": {i: {k: v.numpy().copy() for k, v in entry.items()}
                  for i, entry in tsd["state"].items()},
        "param_groups": tsd["param_groups"]}
    for p, tp in zip(params, tparams):
        p.data.set(tp.detach().numpy())
    nopt = cls(params, lr=0.01, **kwargs)
    nopt.load_state_dict(converted)
    for step in range(4, STEPS):
        set_grads(queue, params, tparams, rng, step)
        before = _buffers(nopt, topt, params, tparams)
        nopt.step()
        topt.step()
        compare(nopt, topt, params, tparams, f"after torch state step {step + 1}",
                record=cls.__name__, before=before)


# ---------------------------------------------------------- API and checks
def test_signatures_match_torch():
    for cls in (Adam, AdamW, SGD):
        ours = inspect.signature(cls.__init__).parameters
        theirs = inspect.signature(_TORCH[cls].__init__).parameters
        for name, parameter in ours.items():
            if name in ("self", "params"):
                continue
            if name == "options":  # netcl's engine options, keyword-only, to the base class
                assert parameter.kind == inspect.Parameter.VAR_KEYWORD
                continue
            if name == "precision":  # the low-precision options, passed to Optimizer
                assert parameter.kind == inspect.Parameter.VAR_KEYWORD
                continue
            assert name in theirs, (cls.__name__, name)
            assert parameter.default == theirs[name].default, (cls.__name__, name)
            assert parameter.kind == theirs[name].kind, (cls.__name__, name)
    assert inspect.signature(SGD.__init__).parameters["lr"].default == 1e-3


def test_adamw_is_decoupled_adam(ctx_factory):
    queue = _get_queue(ctx_factory)
    a, _ = make_params(queue, [(300,)], np.float32, 14)
    b, _ = make_params(queue, [(300,)], np.float32, 14)
    adamw = AdamW(a, lr=0.01, weight_decay=0.2, amsgrad=True)
    adam = Adam(b, lr=0.01, weight_decay=0.2, amsgrad=True, decoupled_weight_decay=True)
    assert isinstance(adamw, Adam)
    assert adamw.defaults["decoupled_weight_decay"] is True
    assert AdamW(a).defaults["weight_decay"] == 1e-2
    _run_steps(queue, adamw, a, np.random.default_rng(15), 5)
    _run_steps(queue, adam, b, np.random.default_rng(15), 5)
    assert np.array_equal(a[0].data.get(), b[0].data.get())
    # Loading a state saved by coupled Adam keeps AdamW decoupled, as torch does.
    adamw.load_state_dict(Adam(a, weight_decay=0.2, amsgrad=True).state_dict())
    assert all(g["decoupled_weight_decay"] for g in adamw.param_groups)


def test_sgd_no_state_without_momentum(ctx_factory):
    queue = _get_queue(ctx_factory)
    params, _ = make_params(queue, [(9,), (2, 2)], np.float32, 16)
    opt = SGD(params, lr=0.1, dampening=0.3, weight_decay=0.1)
    _run_steps(queue, opt, params, np.random.default_rng(17), 3)
    assert opt.state == {}
    assert opt.state_dict()["state"] == {}
    # Turning momentum on later starts the buffer as the gradient, as torch.
    opt.param_groups[0]["momentum"] = 0.9
    _run_steps(queue, opt, params, np.random.default_rng(18), 1)
    assert set(opt.state_dict()["state"][0]) == {"momentum_buffer"}


_BAD = [
    (Adam, "lr", -1e-3),
    (Adam, "eps", -1e-8),
    (Adam, "betas", (1.0, 0.999)),
    (Adam, "betas", (0.9, -0.25)),
    (Adam, "betas", (0.9, 1.5)),
    (Adam, "weight_decay", -0.125),
    (AdamW, "weight_decay", -0.375),
    (AdamW, "betas", (-0.5, 0.999)),
    (SGD, "lr", -0.5),
    (SGD, "momentum", -0.75),
    (SGD, "weight_decay", -0.0625),
    (SGD, "dampening", float("nan")),
]


def _named_value(key, value):
    if key == "betas":
        return next(repr(b) for b in value if not 0 <= b < 1)
    return repr(value)


@pytest.mark.parametrize("cls,key,value", _BAD,
                         ids=[f"{c.__name__}-{k}={v}" for c, k, v in _BAD])
def test_bad_hyperparameters(ctx_factory, cls, key, value):
    """Rejected with the value named, at construction, in add_param_group and
    at step(); a failing step changes no parameter and no state."""
    queue = _get_queue(ctx_factory)
    params, _ = make_params(queue, [(8,), (8,)], np.float32, 19)
    named = re.escape(_named_value(key, value))

    with pytest.raises(ValueError, match=named):
        cls(params, **{key: value})

    opt = cls(params[:1], lr=0.01, momentum=0.9) if cls is SGD else cls(params[:1], lr=0.01)
    with pytest.raises(ValueError, match=named):
        opt.add_param_group({"params": params[1:], key: value})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": params[1:]})

    _run_steps(queue, opt, params, np.random.default_rng(20), 2)
    before_params = [p.data.get() for p in params]
    before = _host_state(opt.state_dict())
    good = opt.param_groups[1][key]
    opt.param_groups[1][key] = value  # the second group: the first must not move either
    for p in params:
        p.grad = cla.to_device(queue, np.ones(8, np.float32))
    with pytest.raises(ValueError, match=named):
        opt.step()
    for p, value_before in zip(params, before_params):
        assert np.array_equal(p.data.get(), value_before)
    after = _host_state(opt.state_dict())
    assert set(after) == set(before) == {0, 1}
    for i in before:
        assert set(after[i]) == set(before[i])
        for name, v in before[i].items():
            assert np.array_equal(after[i][name], v)
    opt.param_groups[1][key] = good
    opt.step()


@pytest.mark.parametrize("kwargs", [dict(nesterov=True), dict(nesterov=True, momentum=0.0),
                                    dict(nesterov=True, momentum=0.9, dampening=0.1)])
def test_sgd_nesterov_validation(ctx_factory, kwargs):
    queue = _get_queue(ctx_factory)
    params, _ = make_params(queue, [(3,)], np.float32, 21)
    with pytest.raises(ValueError, match="Nesterov momentum requires a momentum and zero "
                                         "dampening"):
        SGD(params, **kwargs)
    with pytest.raises(ValueError, match="Nesterov"):
        torch.optim.SGD([torch.zeros(3)], **kwargs)


def test_engine_options_reach_every_family(ctx_factory):
    """Each family takes the engine's keyword-only options through to the base
    class, and the family registry lists every family with its torch name."""
    from netcl.optim import RMSProp, families
    queue = _get_queue(ctx_factory)
    assert {name: cls.torch_name for name, cls in families().items()} == {
        "RMSProp": "RMSprop", "Adam": "Adam", "AdamW": "AdamW", "SGD": "SGD"}
    for cls in (RMSProp, Adam, AdamW, SGD):
        a, _ = make_params(queue, [(3,)], np.float32, 1)
        opt = cls(a, skip_nonfinite=True, max_grad_norm=2.0, track_stats=True)
        assert opt.skip_nonfinite and opt.max_grad_norm == 2.0
        assert opt.param_groups[0]["track_stats"] is True
        with pytest.raises(TypeError, match="track_stats"):
            cls(a, track_stats="yes")
        with pytest.raises(TypeError):
            cls(a, not_an_option=1)
