"""netcl.distributed under ``mpiexec -n 2`` and ``-n 3`` (uneven ZeRO shards).

The ranks run tests/_distributed_worker.py on the device under test; this
process checks what they wrote against single-process oracles: netcl on one
process adding the ranks' slice gradients (bitwise where the reduction
order is fixed: two ranks, or ``deterministic=True``; to float32 rounding
otherwise) and torch on the whole batch.

Skipped when mpi4py or mpiexec is missing, unless ``NETCL_REQUIRE_MPI=1``
(CI sets it), which makes that a failure.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyopencl as cl
import pyopencl.array as cla
import pytest

from netcl.optim.checkpoint_file import read_tensors


def _missing_mpi():
    try:
        import mpi4py  # noqa: F401
    except ImportError as exc:
        return f"mpi4py is not installed ({exc}); pip install \"netcl[mpi]\""
    if _mpiexec() is None:
        return "mpiexec is not on PATH (pip install \"netcl[mpi]\" brings MPICH's)"
    return None


def _mpiexec():
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


_REASON = _missing_mpi()
if _REASON is not None:
    if os.environ.get("NETCL_REQUIRE_MPI", "") not in ("", "0"):
        raise RuntimeError(f"NETCL_REQUIRE_MPI is set but {_REASON}")
    pytest.skip(_REASON, allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _distributed_worker as worker  # noqa: E402

from netcl.distributed import partition_parameters  # noqa: E402
from netcl.optim import load as load_checkpoint  # noqa: E402

WORKER = Path(worker.__file__).resolve()


def _ctx_string(device):
    platforms = cl.get_platforms()
    p = [q.int_ptr for q in platforms].index(device.platform.int_ptr)
    d = [e.int_ptr for e in platforms[p].get_devices()].index(device.int_ptr)
    return f"{p}:{d}"


def launch(device, ranks, scenario, directory, timeout=240):
    env = dict(os.environ, PYOPENCL_CTX=_ctx_string(device), PYTHONUNBUFFERED="1")
    started = time.monotonic()
    done = subprocess.run([_mpiexec(), "-n", str(ranks), sys.executable, str(WORKER), scenario,
                           str(directory)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    return done, time.monotonic() - started


def rank_outputs(directory, scenario, ranks):
    return [dict(np.load(directory / f"{scenario}.rank{r}.npz")) for r in range(ranks)]


# ------------------------------------------------------------------ oracles
def oracle(queue, name, ranks, start=0, opt=None, params=None, model=None):
    """One process: each step adds the ranks' slice gradients in rank order,
    multiplies by float32(1/N) and steps the plain optimizer."""
    _, cls, hyper, _ = worker.VARIANTS[name]
    if model is None:
        model = worker.build_model(queue)
        params = model.parameters()
        opt = cls(params, **hyper)
    rows = worker.BATCH // ranks
    record = []
    for step in range(start, worker.STEPS):
        x, y = worker.batch(step)
        total = None
        for r in range(ranks):
            worker.local_grads(queue, model, x[r * rows:(r + 1) * rows],
                               y[r * rows:(r + 1) * rows])
            if step == worker.NAN_STEP and r == ranks - 1:
                worker.inject_nan(params)
            grads = [p.grad.get() for p in params]
            total = grads if total is None else [t + g for t, g in zip(total, grads)]
        for p, t in zip(params, total):
            p.grad = cla.to_device(queue, t * np.float32(1.0 / ranks))
        opt.step()
        record.append(np.concatenate([p.data.get().ravel() for p in params]))
    return np.stack(record), opt


def torch_whole_batch(queue):
    """dp_adam's run in torch on the whole batch: Adam, clip_grad_norm_, and
    no step where a gradient is non-finite."""
    import torch

    init = [p.data.get() for p in worker.build_model(queue).parameters()]
    tensors = [torch.tensor(v, requires_grad=True) for v in init]
    opt = torch.optim.Adam(tensors, lr=1e-2)
    record, norms = [], []
    for step in range(worker.STEPS):
        x, y = worker.batch(step)
        hidden = torch.relu(torch.from_numpy(x) @ tensors[0].T + tensors[1])
        loss = torch.nn.functional.cross_entropy(hidden @ tensors[2].T + tensors[3],
                                                 torch.from_numpy(y).long())
        opt.zero_grad()
        loss.backward()
        if step == worker.NAN_STEP:
            tensors[0].grad.view(-1)[3] = float("nan")
        norm = torch.nn.utils.clip_grad_norm_(tensors, worker.MAX_GRAD_NORM)
        norms.append(float(norm))
        if np.isfinite(norms[-1]):
            opt.step()
        record.append(np.concatenate([t.detach().numpy().ravel() for t in tensors]))
    return np.stack(record), norms


def assert_params(actual, expected, bitwise, what):
    if bitwise:
        mismatch = np.argwhere(actual != expected)
        assert mismatch.size == 0, f"{what}: not bitwise equal at (step, element) {mismatch[0]}"
    else:
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6, err_msg=what)


# -------------------------------------------------------------------- tests
def test_partition_is_torchs_greedy_largest_first():
    class P:
        def __init__(self, n):
            self.data = np.zeros(n)

    groups = [{"params": [P(5), P(10), P(3)]}, {"params": [P(7), P(1)]}]
    # Group 0 largest first: 10 -> r0, 5 -> r1, 3 -> r1 (5 < 10); counts carry
    # over: group 1: 7 -> r1 (8 < 10), then 1 -> r0 (10 < 15).
    assert partition_parameters(groups, 2) == [1, 0, 1, 1, 0]
    # Three ranks: 10 -> r0, 5 -> r1, 3 -> r2; then 7 -> r2 (3), 1 -> r1 (5).
    assert partition_parameters(groups, 3) == [1, 0, 2, 2, 1]
    assert partition_parameters(groups, 1) == [0] * 5


def assert_state_bytes(measured, sizes):
    """Adam's two float32 buffers per tensor, each tensor's region rounded
    up to the packed-state alignment at most."""
    from netcl.optim._arena import ALIGN
    exact = 2 * 4 * sum(sizes)
    assert exact <= measured <= exact + 2 * 4 * (ALIGN - 1) * len(sizes), (measured, sizes)


@pytest.mark.parametrize("ranks", [2, 3])
def test_data_parallel_zero_checkpoints_and_torn_saves(ctx_factory, ranks, tmp_path):
    context = ctx_factory()
    device = context.devices[0]
    for scenario in ("train", "killsave", "resume"):
        done, _ = launch(device, ranks, scenario, tmp_path)
        if scenario == "killsave":  # rank 1 is killed mid-save; the job ends
            # (its last words may not get through mpiexec before the cleanup)
            assert done.returncode != 0, done.stdout + done.stderr
            assert "finished the save" not in done.stdout, done.stdout + done.stderr
        else:
            assert done.returncode == 0, done.stdout + done.stderr
    outs = rank_outputs(tmp_path, "train", ranks)
    resumed = rank_outputs(tmp_path, "resume", ranks)
    for key in outs[0]:
        for r in range(1, ranks):  # every rank saw the same (also: params after every step)
            if not (key.startswith("zero_") and key.endswith(".state_bytes")):
                np.testing.assert_array_equal(outs[r][key], outs[0][key], err_msg=key)
    for key in resumed[0]:
        for r in range(1, ranks):
            np.testing.assert_array_equal(resumed[r][key], resumed[0][key], err_msg=key)
    out = outs[0]
    queue = cl.CommandQueue(context)

    # Data parallel == one process adding the slices' gradients; bitwise
    # where the order of the sum is fixed.
    expected = {}
    for name, (kind, _, _, options) in worker.VARIANTS.items():
        expected[name], _ = oracle(queue, name, ranks)
        bitwise = ranks == 2 or options.get("deterministic", False)
        if kind == "zero" and "max_grad_norm" in worker.VARIANTS[name][2]:
            bitwise = False  # the clip norm is summed over other launches
        assert_params(out[f"{name}.params"], expected[name], bitwise, name)
        assert int(out[f"{name}.skipped"]) == 1, f"{name}: the NaN on one rank skips everywhere"
        skipped = out[f"{name}.params"]
        np.testing.assert_array_equal(skipped[worker.NAN_STEP], skipped[worker.NAN_STEP - 1])

    # ...and == torch on the whole batch, to float32 rounding; the clip is
    # active, so its norm is the global one.
    theirs, norms = torch_whole_batch(queue)
    assert min(n for n in norms if np.isfinite(n)) > 2 * worker.MAX_GRAD_NORM
    np.testing.assert_allclose(out["dp_adam.params"], theirs, rtol=1e-4, atol=1e-5)

    # ZeRO: torch's partition; each rank's state only for its parameters.
    sizes = [16 * 8, 16, 4 * 16, 4]
    owners = {2: [0, 1, 1, 1], 3: [0, 2, 1, 2]}[ranks]  # largest first to the least loaded
    np.testing.assert_array_equal(out["zero_owners"], owners)
    per_rank = [int(o["zero_adam.state_bytes"]) for o in outs]
    for r in range(ranks):
        owned = [s for s, o in zip(sizes, owners) if o == r]
        assert_state_bytes(per_rank[r], owned)
    assert_state_bytes(int(out["dp_adam.state_bytes"]), sizes)
    # bfloat16 state: half the bytes, still only the rank's own shard.
    assert [int(o["zero_adam_bf16_state.state_bytes"]) for o in outs] == [b // 2 for b in per_rank]

    # check_consistency caught the parameter changed on one rank, on every rank.
    message = str(out["consistency_error"])
    assert "parameter 1" in message and "differ" in message, message

    # GradScaler: the NaN on one rank backs the scale off on every rank
    # (torch's rule, growth_interval=2: grow after two clean steps, halve on inf).
    np.testing.assert_array_equal(out["amp.scales"], [1024.0, 2048.0, 1024.0, 1024.0, 2048.0])
    assert int(out["amp.skipped"]) == 1

    # Resumed in new processes: bit-exact continuation.
    for stem, (name, _) in worker.CHECKPOINTS.items():
        np.testing.assert_array_equal(resumed[0][f"{stem}.params"],
                                      out[f"{name}.params"][worker.SAVE_AT:], err_msg=stem)
    # The consolidated ZeRO file loads into a single-process optimizer and
    # continues as the ranks did.
    _, cls, hyper, _ = worker.VARIANTS["zero_adamw"]
    model = worker.build_model(queue)
    params = model.parameters()
    single = cls(params, **hyper)
    load_checkpoint(single, tmp_path / "zero_adamw.safetensors")
    saved, _ = read_tensors(tmp_path / "zero_adamw.params.safetensors")
    for i, p in enumerate(params):
        p.data.set(saved[f"p{i}"])
    continued, _ = oracle(queue, "zero_adamw", ranks, worker.SAVE_AT, single, params, model)
    assert_params(continued, out["zero_adamw.params"][worker.SAVE_AT:], ranks == 2,
                  "single process from the consolidated ZeRO checkpoint")
    # A single-process file into ZeRO and consolidated back: the same tensors.
    original, meta = read_tensors(tmp_path / "dp_adam.safetensors")
    roundtrip, meta2 = read_tensors(tmp_path / "zero_roundtrip.safetensors")
    assert meta2["optimizer"] == "Adam" and sorted(roundtrip) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(roundtrip[key], value, err_msg=key)

    # The killed save: every file is complete; the mixed set is refused.
    for r in range(ranks):
        read_tensors(tmp_path / f"torn.rank{r}-of-{ranks}.safetensors")
    assert "different saves" in str(resumed[0]["torn_error"])


def test_failed_rank_stops_the_others_within_the_timeout(device, tmp_path):
    done, seconds = launch(device, 2, "raise", tmp_path, timeout=120)
    assert done.returncode != 0
    assert "rank 1 fails on purpose" in done.stderr
    assert "rank 0 was not stopped" not in done.stdout
    assert f"rank 0 of 2: the gradient all-reduce (layout check) did not complete within " \
           f"{worker.TIMEOUT:g} s" in done.stderr, done.stderr
    assert seconds < worker.TIMEOUT + 60


def test_train_mlp_example_distributed_matches_one_process(ctx_factory, tmp_path):
    """examples/train_mlp.py under mpiexec -n 2, with and without ZeRO, reaches
    the single-process accuracy."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    device = ctx_factory().devices[0]
    example = Path(__file__).resolve().parent.parent / "examples" / "train_mlp.py"
    # 40 steps of the default warmup + cosine at lr 1e-3 undertrain (76%); 5e-3 reaches 92%.
    flags = ["--steps", "40", "--hidden", "32", "--lr", "5e-3", "--no-progress",
             "--out", str(tmp_path)]
    env = dict(os.environ, PYOPENCL_CTX=_ctx_string(device))
    accuracy = {}
    for mode, prefix in [("single", []), ("distributed", [_mpiexec(), "-n", "2"]),
                         ("zero", [_mpiexec(), "-n", "2"])]:
        argv = prefix + [sys.executable, str(example)] + flags + (
            [f"--{mode}"] if prefix else [])
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stdout + done.stderr
        lines = [line for line in done.stdout.splitlines() if "held-out accuracy" in line]
        assert len(lines) == 1, done.stdout  # rank 0 reports, once
        accuracy[mode] = float(lines[0].split("held-out accuracy ")[1].split("%")[0]) / 100
        if prefix:
            assert "2 ranks" in lines[0], lines[0]
    assert accuracy["single"] > 0.85, accuracy  # chance is 0.10
    for mode in ("distributed", "zero"):
        # float32 rounding of the gradient sums may flip an image or two
        assert abs(accuracy[mode] - accuracy["single"]) <= 0.01, accuracy
