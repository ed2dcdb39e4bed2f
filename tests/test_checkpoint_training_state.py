"""One checkpoint resumes everything: netcl.optim.save/load with LR schedulers
and a GradScaler beside the optimizer — bit-exact in a new process, checked
before anything changes, and existing optimizer-only calls unchanged."""

import copy
import json
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyopencl.array as cla
import pytest

import netcl
import netcl.amp
from netcl.optim import Adam, CheckpointError, SGD, checkpoint, lr_scheduler as L
from netcl.optim.checkpoint_file import read_tensors, write_tensors

from conftest import make_queue
from _new_process import resume_and_compare

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _resume_all_worker as worker  # noqa: E402



def test_one_file_resumes_everything_in_a_new_process(ctx_factory, tmp_path):
    """STEPS steps, one save, load into fresh objects in a new process, STEPS
    more == 2*STEPS uninterrupted: params, optimizer state, lrs, momenta,
    scheduler states and the loss scale, byte for byte."""
    queue = make_queue(ctx_factory)
    n = worker.STEPS
    for name in worker.RUNS:
        base = tmp_path / name
        params, opt, schedulers, scaler = worker.make(queue, name)
        worker.run(queue, params, opt, schedulers, scaler, 1, n)
        netcl.optim.save(opt, f"{base}.safetensors", schedulers=schedulers, scaler=scaler)
        worker.save_params(f"{base}.params.safetensors", params)
        if scaler is not None:  # the run did skip, back off and grow
            assert scaler.get_scale() != worker.RUNS[name][3]["init_scale"]

        ref_params, ref, ref_schedulers, ref_scaler = worker.make(queue, name)
        worker.run(queue, ref_params, ref, ref_schedulers, ref_scaler, 1, 2 * n)
        netcl.optim.save(ref, f"{base}.expected.safetensors", schedulers=ref_schedulers,
                         scaler=ref_scaler)
        worker.save_params(f"{base}.expected.params.safetensors", ref_params)

    resume_and_compare([worker.__file__, tmp_path], queue, tmp_path, worker.RUNS)
    for name in worker.RUNS:
        _, meta = read_tensors(f"{tmp_path / name}.final.safetensors")
        saved = json.loads(meta["schedulers"])
        assert [s["class"] for s in saved] == \
            [type(s).__name__ for s in worker.make(queue, name)[2]]
        assert ("grad_scaler" in meta) == (worker.RUNS[name][3] is not None)


def test_scheduler_state_round_trips_exactly(ctx_factory, tmp_path):
    """Counter milestones, infinities, tuples and callable objects come back
    equal and of the same types; plain lambdas are not saved (as torch)."""
    queue = make_queue(ctx_factory)
    p = netcl.Parameter(cla.zeros(queue, 3, np.float32))
    opt = SGD([p], lr=0.1, momentum=0.9)
    warmup = worker.Warmup(4)
    schedulers = [L.MultiStepLR(opt, (3, 5, 5)), L.ReduceLROnPlateau(opt, mode="max"),
                  L.LambdaLR(opt, warmup),
                  L.SequentialLR(opt, [L.ConstantLR(opt), L.ExponentialLR(opt, 0.9)], (2,))]
    for step in range(4):
        opt.step()
        schedulers[0].step()
        schedulers[1].step(float(step % 2))
        schedulers[2].step()
        schedulers[3].step()
    path = tmp_path / "all.safetensors"
    netcl.optim.save(opt, path, schedulers=schedulers)
    _, info = checkpoint.read(path)
    for scheduler, (name, state) in zip(schedulers, info["schedulers"]):
        assert name == type(scheduler).__name__
        assert _typed(state) == _typed(scheduler.state_dict())
    assert type(info["schedulers"][0][1]["milestones"]) is Counter
    assert info["schedulers"][1][1]["mode_worse"] == -math.inf
    assert info["schedulers"][2][1]["lr_lambdas"] == [{"steps": 4, "calls": warmup.calls}]
    assert info["grad_scaler"] is None

    fresh = SGD([p], lr=0.1, momentum=0.9)
    other = worker.Warmup(4)
    restored = [L.MultiStepLR(fresh, (3, 5, 5)), L.ReduceLROnPlateau(fresh, mode="max"),
                L.LambdaLR(fresh, other),
                L.SequentialLR(fresh, [L.ConstantLR(fresh), L.ExponentialLR(fresh, 0.9)], (2,))]
    netcl.optim.load(fresh, path, schedulers=restored)
    for a, b in zip(restored, schedulers):
        assert _typed(a.state_dict()) == _typed(b.state_dict())
    assert other.calls == warmup.calls
    assert fresh.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert fresh.param_groups[0]["initial_lr"] == opt.param_groups[0]["initial_lr"]


def _typed(value):
    """A value with every element's type attached: equal only if types match."""
    if isinstance(value, dict):
        return type(value), {k: _typed(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value), [_typed(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return float, "nan"
    return type(value), value


# ------------------------------------------------ validation, nothing changes
def _setup(queue, *, scale=4.0):
    p = netcl.Parameter(cla.to_device(queue, np.arange(5, dtype=np.float32)))
    opt = Adam([p], lr=0.01)
    schedulers = [L.OneCycleLR(opt, 0.05, total_steps=20)]
    scaler = netcl.amp.GradScaler(queue, init_scale=scale, growth_interval=2)
    for step in range(3):
        p.grad = scaler.scale(cla.to_device(queue, np.full(5, step + 0.5, np.float32)))
        scaler.step(opt)
        scaler.update()
        schedulers[0].step()
    return p, opt, schedulers, scaler


def _everything(p, opt, schedulers, scaler):
    return (p.data.get().tobytes(), copy.deepcopy(opt.state_dict()["param_groups"]),
            {i: {k: np.asarray(v).tobytes() for k, v in e.items()}
             for i, e in opt.state_dict()["state"].items()},
            [copy.deepcopy(s.state_dict()) for s in schedulers], scaler.state_dict())


def _rewrite(path, target, **changes):
    """Copy a checkpoint with metadata entries replaced (valid checksums)."""
    tensors, meta = read_tensors(path)
    meta.update(changes)
    write_tensors(target, tensors, meta)


@pytest.mark.parametrize("case", [
    "wrong-class", "too-few", "no-schedulers-in-file", "missing-key", "bad-scaler",
    "no-scaler-in-file", "bad-json", "bad-tag", "corrupt-byte"])
def test_bad_checkpoint_changes_nothing(ctx_factory, tmp_path, case):
    queue = make_queue(ctx_factory)
    source = worker_setup = _setup(queue)
    path = tmp_path / "ok.safetensors"
    netcl.optim.save(source[1], path, schedulers=source[2], scaler=source[3])
    _, meta = read_tensors(path)
    saved = json.loads(meta["schedulers"])
    bad = tmp_path / "bad.safetensors"

    p, opt, schedulers, scaler = target = _setup(queue, scale=2.0)
    opt.param_groups[0]["weight_decay"] = 0.5  # differs from the file
    before = _everything(*target)
    kwargs = dict(schedulers=schedulers, scaler=scaler)
    expected, match = ValueError, None
    if case == "wrong-class":
        kwargs["schedulers"] = [L.StepLR(opt, 3)]
        match = r"schedulers\[0\]: the checkpoint holds a OneCycleLR, this is a StepLR"
    elif case == "too-few":
        kwargs["schedulers"] = schedulers + [L.ExponentialLR(opt, 0.9)]
        match = "holds 1 scheduler state"
    elif case == "no-schedulers-in-file":
        netcl.optim.save(worker_setup[1], bad, scaler=worker_setup[3])
        match = "holds no scheduler state"
    elif case == "missing-key":
        del saved[0]["state"]["total_steps"]
        _rewrite(path, bad, schedulers=json.dumps(saved))
        expected, match = KeyError, r"OneCycleLR state_dict lacks \['total_steps'\]"
    elif case == "bad-scaler":
        _rewrite(path, bad, grad_scaler=json.dumps({**json.loads(meta["grad_scaler"]),
                                                    "growth_factor": 0.5}))
        match = "GradScaler: .*growth_factor"
    elif case == "no-scaler-in-file":
        netcl.optim.save(worker_setup[1], bad, schedulers=worker_setup[2])
        match = "holds no GradScaler state"
    elif case == "bad-json":
        _rewrite(path, bad, schedulers="[{")
        expected, match = CheckpointError, "'schedulers' is not valid JSON"
    elif case == "bad-tag":
        saved[0]["state"]["total_steps"] = {"__netcl__": "float", "value": "1e400"}
        _rewrite(path, bad, schedulers=json.dumps(saved))
        expected, match = CheckpointError, "not one netcl writes"
    elif case == "corrupt-byte":
        raw = bytearray(path.read_bytes())
        at = raw.index(b"OneCycleLR")
        raw[at] ^= 0x20
        bad.write_bytes(bytes(raw))
        expected, match = CheckpointError, "header"
    with pytest.raises(expected, match=match):
        netcl.optim.load(opt, bad if bad.exists() else path, **kwargs)
    assert _everything(*target) == before


def test_bad_arguments_name_the_culprit(ctx_factory, tmp_path):
    queue = make_queue(ctx_factory)
    p, opt, schedulers, scaler = _setup(queue)
    path = tmp_path / "x.safetensors"
    with pytest.raises(TypeError, match=r"schedulers\[1\] is a str"):
        netcl.optim.save(opt, path, schedulers=[schedulers[0], "cosine"])
    with pytest.raises(TypeError, match="scaler must be a netcl.amp.GradScaler"):
        netcl.optim.save(opt, path, scaler=object())
    other = Adam([netcl.Parameter(cla.zeros(queue, 2, np.float32))])
    with pytest.raises(ValueError, match="drives another optimizer"):
        netcl.optim.save(opt, path, schedulers=L.ExponentialLR(other, 0.9))
    schedulers[0].custom = lambda: None  # a value JSON cannot hold
    with pytest.raises(TypeError, match=r"schedulers\[0\] \(OneCycleLR\).*function"):
        netcl.optim.save(opt, path, schedulers=schedulers)
    assert not path.exists()


def test_optimizer_only_calls_keep_working(ctx_factory, tmp_path):
    """A full checkpoint loads into the optimizer alone; an optimizer-only
    checkpoint has no extra entries."""
    queue = make_queue(ctx_factory)
    p, opt, schedulers, scaler = _setup(queue)
    full, plain = tmp_path / "full.safetensors", tmp_path / "plain.safetensors"
    netcl.optim.save(opt, full, schedulers=schedulers, scaler=scaler)
    netcl.optim.save(opt, plain)
    assert {"schedulers", "grad_scaler"}.isdisjoint(read_tensors(plain)[1])
    for path in (full, plain):
        q, fresh, _, _ = _setup(queue, scale=2.0)
        netcl.optim.load(fresh, path)
        assert fresh.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
