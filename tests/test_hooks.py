"""torch.optim's optimizer hooks: the same calls, in the same order, with the
same arguments and return-value handling as torch's, checked by driving a
torch optimizer and a netcl optimizer side by side."""

import numpy as np
import pyopencl.array as cla
import pytest

import netcl
from netcl.amp import GradScaler
from netcl.optim import SGD, Adam
from netcl.optim.hooks import (register_optimizer_step_post_hook,
                               register_optimizer_step_pre_hook)

from conftest import make_queue

torch = pytest.importorskip("torch")
torch_optimizer = pytest.importorskip("torch.optim.optimizer")


def pair(queue):
    host = np.arange(6, dtype=np.float32)
    p = netcl.Parameter(cla.to_device(queue, host))
    t = torch.tensor(host, requires_grad=True)
    return Adam([p], lr=0.1), torch.optim.Adam([t], lr=0.1), p, t


def record(log, tag):
    def hook(optimizer, *rest):
        log.append((tag, type(optimizer).__module__.split(".")[0],
                    tuple(type(r).__name__ for r in rest)))
    return hook


def calls(opt, module_hooks, step, state_dict_roundtrip):
    log = []
    handles = [module_hooks[0](record(log, "global-pre")),
               module_hooks[1](record(log, "global-post")),
               opt.register_step_pre_hook(record(log, "pre")),
               opt.register_step_post_hook(record(log, "post")),
               opt.register_state_dict_pre_hook(record(log, "sd-pre")),
               opt.register_state_dict_post_hook(record(log, "sd-post")),
               opt.register_state_dict_post_hook(record(log, "sd-post-first"), prepend=True),
               opt.register_load_state_dict_pre_hook(record(log, "load-pre")),
               opt.register_load_state_dict_post_hook(record(log, "load-post"))]
    step()
    state_dict_roundtrip()
    for handle in handles:
        handle.remove()
    step()
    state_dict_roundtrip()
    return [(tag, args) for tag, _, args in log]


def test_hooks_are_called_like_torchs(ctx_factory):
    queue = make_queue(ctx_factory)
    opt, topt, p, t = pair(queue)
    p.grad = cla.to_device(queue, np.ones(6, np.float32))
    t.grad = torch.ones(6)

    ours = calls(opt, (register_optimizer_step_pre_hook, register_optimizer_step_post_hook),
                 opt.step, lambda: opt.load_state_dict(opt.state_dict()))
    theirs = calls(topt, (torch_optimizer.register_optimizer_step_pre_hook,
                          torch_optimizer.register_optimizer_step_post_hook),
                   topt.step, lambda: topt.load_state_dict(topt.state_dict()))
    assert ours == theirs
    assert [tag for tag, _ in ours] == [
        "global-pre", "pre", "post", "global-post", "sd-pre", "sd-post-first", "sd-post",
        "load-pre", "load-post"]


def test_hook_return_values_replace_arguments_and_dicts(ctx_factory):
    queue = make_queue(ctx_factory)
    opt, _, p, _ = pair(queue)
    p.grad = cla.to_device(queue, np.ones(6, np.float32))
    closure_calls = []
    opt.register_step_pre_hook(
        lambda o, args, kwargs: ((lambda: closure_calls.append(1) or 5.0,), {}))
    assert opt.step() == 5.0 and closure_calls == [1]

    opt.register_state_dict_post_hook(lambda o, sd: dict(sd, extra="tag"))
    assert opt.state_dict()["extra"] == "tag"

    seen = []
    def strip(o, sd):
        seen.append(sd.pop("extra"))
        return sd
    opt.register_load_state_dict_pre_hook(strip)
    state = opt.state_dict()
    opt.load_state_dict(state)
    assert seen == ["tag"] and state["extra"] == "tag"  # the caller's dict is untouched


def test_bad_pre_hook_result_raises_before_the_step(ctx_factory):
    queue = make_queue(ctx_factory)
    opt, _, p, _ = pair(queue)
    p.grad = cla.to_device(queue, np.ones(6, np.float32))
    opt.register_step_pre_hook(lambda o, args, kwargs: "nonsense")
    with pytest.raises(RuntimeError, match="must return None or a tuple"):
        opt.step()
    assert np.array_equal(p.data.get(), np.arange(6, dtype=np.float32))
    with pytest.raises(TypeError, match="callable"):
        opt.register_step_post_hook(3)


def test_grad_scaler_step_runs_the_step_hooks(ctx_factory):
    queue = make_queue(ctx_factory)
    p = netcl.Parameter(cla.to_device(queue, np.ones(4, np.float32)))
    opt = SGD([p], lr=0.1)
    log = []
    opt.register_step_pre_hook(lambda o, a, k: log.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: log.append("post"))
    scaler = GradScaler(queue)
    p.grad = cla.to_device(queue, np.ones(4, np.float32))
    scaler.step(opt)
    scaler.update()
    assert log == ["pre", "post"]
