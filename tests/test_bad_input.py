"""Bad input gets an exception that names the offending thing, and changes nothing."""

import numpy as np
import pyopencl as cl
import pyopencl.array as cla
import pytest

import netcl
from netcl.optim import RMSProp

from conftest import make_queue


@pytest.fixture
def queue(ctx_factory):
    return make_queue(ctx_factory)


def param(queue, n=6, seed=0, grad=True):
    rng = np.random.default_rng(seed)
    p = netcl.Parameter(cla.to_device(queue, rng.standard_normal(n).astype(np.float32)))
    if grad:
        p.grad = cla.to_device(queue, rng.standard_normal(n).astype(np.float32))
    return p


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1e-3), "learning rate.*-0.001"),
    (dict(eps=-1.0), "epsilon.*-1.0"),
    (dict(momentum=-0.5), "momentum.*-0.5"),
    (dict(weight_decay=-1e-4), "weight_decay.*-0.0001"),
    (dict(alpha=1.5), "alpha.*1.5"),
    (dict(alpha=-0.1), "alpha.*-0.1"),
    (dict(lr=float("nan")), "learning rate.*nan"),
    (dict(lr=float("inf")), "learning rate.*inf"),
])
def test_bad_hyperparameters(queue, kwargs, match):
    with pytest.raises(ValueError, match=match):
        RMSProp([param(queue)], **kwargs)


def test_bad_flag_type(queue):
    with pytest.raises(TypeError, match="centered"):
        RMSProp([param(queue)], centered="yes")


def test_bad_group_hyperparameter_names_nothing_added(queue):
    opt = RMSProp([param(queue)])
    with pytest.raises(ValueError, match="alpha"):
        opt.add_param_group({"params": [param(queue, seed=1)], "alpha": 2.0})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="unknown hyperparameter.*betas"):
        opt.add_param_group({"params": [param(queue, seed=1)], "betas": (0.9, 0.99)})


def test_hyperparameter_set_out_of_range_later_fails_at_step_unchanged(queue):
    p = param(queue)
    before = p.data.get()
    opt = RMSProp([p])
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="learning rate"):
        opt.step()
    assert np.array_equal(p.data.get(), before) and not opt.state


def test_params_not_arrays(queue):
    class Fake:
        data = np.zeros(3, np.float32)
        grad = None

    with pytest.raises(TypeError, match="parameter 0.*pyopencl.array.Array.*ndarray"):
        RMSProp([Fake()])
    with pytest.raises(TypeError, match="iterable"):
        RMSProp(param(queue).data)
    with pytest.raises(TypeError, match="sets"):
        RMSProp({param(queue)})
    with pytest.raises(ValueError, match="empty"):
        RMSProp([])


def test_integer_dtype(queue):
    p = netcl.Parameter(cla.zeros(queue, 4, np.int32))
    with pytest.raises(TypeError, match="parameter 0.*int32"):
        RMSProp([p])


def test_non_contiguous_data(queue):
    a = cla.to_device(queue, np.zeros((4, 6), np.float32))
    p = netcl.Parameter(a.transpose())
    assert not p.data.flags.c_contiguous
    with pytest.raises(ValueError, match="parameter 0.*contiguous"):
        RMSProp([p])


def test_duplicates_and_shared_params(queue):
    p = param(queue)
    with pytest.raises(ValueError, match="duplicate"):
        RMSProp([p, p])
    opt = RMSProp([p])
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [p]})
    with pytest.raises(ValueError, match="empty"):
        opt.add_param_group({"params": []})
    assert len(opt.param_groups) == 1


def test_params_in_two_contexts(queue):
    # Keep the context: Intel's CPU runtime frees it with its last Python
    # handle even while a queue on it is in use.
    other_context = cl.Context(queue.context.devices)
    other = cl.CommandQueue(other_context)
    with pytest.raises(ValueError, match="parameter 1.*context"):
        RMSProp([param(queue), param(other)])


@pytest.mark.parametrize("bad", ["shape", "dtype", "context", "type"])
def test_bad_grad_changes_nothing(queue, bad):
    good, victim = param(queue, seed=1), param(queue, seed=2)
    opt = RMSProp([good, victim], momentum=0.9)
    opt.step()  # state exists for both
    before = [good.data.get(), victim.data.get()]
    state_before = {k: v.get() for k, v in opt.state[id(good)].items() if k != "step"}
    if bad == "shape":
        victim.grad = cla.zeros(queue, 7, np.float32)
        error, match = ValueError, "parameter 1.*shape"
    elif bad == "dtype":
        victim.grad = cla.zeros(queue, 6, np.float64)
        error, match = TypeError, "parameter 1.*dtype"
    elif bad == "context":
        other_context = cl.Context(queue.context.devices)  # kept alive (Intel's runtime)
        other = cl.CommandQueue(other_context)
        victim.grad = cla.zeros(other, 6, np.float32)
        error, match = ValueError, "parameter 1.*context"
    else:
        victim.grad = np.zeros(6, np.float32)
        error, match = TypeError, "parameter 1.*grad"
    with pytest.raises(error, match=match):
        opt.step()
    assert np.array_equal(good.data.get(), before[0])
    assert np.array_equal(victim.data.get(), before[1])
    assert opt.state[id(good)]["step"] == 1 and opt.state[id(victim)]["step"] == 1
    for k, v in state_before.items():
        assert np.array_equal(opt.state[id(good)][k].get(), v)


def loaded_pair(queue):
    src = [param(queue, seed=1), param(queue, n=3, seed=2)]
    opt = RMSProp(src, momentum=0.9)
    opt.step()
    dst = [param(queue, seed=1), param(queue, n=3, seed=2)]
    return opt.state_dict(), RMSProp(dst, momentum=0.9), dst


def assert_untouched(opt):
    assert not opt.state
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["lr"] == 1e-2


def test_load_wrong_group_count(queue):
    sd, opt, _ = loaded_pair(queue)
    sd["param_groups"].append(dict(sd["param_groups"][0]))
    with pytest.raises(ValueError, match="2 parameter groups.*1"):
        opt.load_state_dict(sd)
    assert_untouched(opt)


def test_load_wrong_param_count(queue):
    sd, opt, _ = loaded_pair(queue)
    sd["param_groups"][0]["params"] = [0]
    with pytest.raises(ValueError, match="group 0.*1 parameters.*2"):
        opt.load_state_dict(sd)
    assert_untouched(opt)


def test_load_shape_mismatch(queue):
    sd, opt, _ = loaded_pair(queue)
    sd["state"][1]["square_avg"] = np.zeros(4, np.float32)
    sd["param_groups"][0]["lr"] = 0.5
    with pytest.raises(ValueError, match="parameter 1.*square_avg.*shape"):
        opt.load_state_dict(sd)
    assert_untouched(opt)


def test_load_dtype_mismatch(queue):
    sd, opt, _ = loaded_pair(queue)
    sd["state"][0]["momentum_buffer"] = sd["state"][0]["momentum_buffer"].astype(np.float64)
    with pytest.raises(TypeError, match="parameter 0.*momentum_buffer.*float64"):
        opt.load_state_dict(sd)
    assert_untouched(opt)


def test_load_missing_buffer_and_bad_hyperparameter(queue):
    sd, opt, _ = loaded_pair(queue)
    del sd["state"][0]["momentum_buffer"]
    with pytest.raises(ValueError, match="parameter 0.*expected.*momentum_buffer"):
        opt.load_state_dict(sd)
    sd, opt, _ = loaded_pair(queue)
    sd["param_groups"][0]["alpha"] = 7.0
    with pytest.raises(ValueError, match="group 0.*alpha"):
        opt.load_state_dict(sd)
    assert_untouched(opt)


def test_load_bad_step_and_index(queue):
    sd, opt, _ = loaded_pair(queue)
    sd["state"][0]["step"] = -3
    with pytest.raises(ValueError, match="step"):
        opt.load_state_dict(sd)
    sd, opt, _ = loaded_pair(queue)
    sd["state"][5] = sd["state"].pop(1)
    with pytest.raises(ValueError, match="index 5"):
        opt.load_state_dict(sd)
    assert_untouched(opt)
