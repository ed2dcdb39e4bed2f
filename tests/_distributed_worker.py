"""The MPI ranks of tests/test_distributed.py (run under ``mpiexec -n N``).

``python _distributed_worker.py SCENARIO DIR``; every rank writes what it saw
to ``DIR/<scenario>.rank<r>.npz`` and the test compares the ranks with each
other and with single-process oracles. The device comes from ``PYOPENCL_CTX``.

Scenarios:

``train``
    An MLP (netcl.nn) trained for ``STEPS`` steps on a global batch of
    ``BATCH`` rows, each rank taking its slice, under every variant in
    ``VARIANTS`` (DistributedOptimizer with several families, ``deterministic``,
    ZeRO); at ``NAN_STEP`` the last rank's gradient gets a NaN. After
    ``SAVE_AT`` steps the checkpoints are written (consolidated and sharded)
    with the parameters. Also: a GradScaler run, and a deliberate parameter
    mismatch for ``check_consistency``.
``resume``
    New processes: each checkpoint is loaded and training continues to
    ``STEPS``; a single-process-format file is loaded into ZeRO and saved
    again; the torn sharded set left by ``killsave`` must be refused.
``raise``
    Rank 1 raises after one step; rank 0 goes on to the next all-reduce and
    must fail within ``TIMEOUT`` seconds.
``killsave``
    A complete sharded save, then a second one during which rank 1 is killed
    (SIGKILL) before its file is renamed into place.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pyopencl.array as cla

import netcl
from netcl import nn
from netcl.amp import GradScaler
from netcl.distributed import (ConsistencyError, DistributedOptimizer,
                               ZeroRedundancyOptimizer)
from netcl.optim import SGD, Adam, AdamW, RMSProp
from netcl.optim.checkpoint_file import CheckpointError, read_tensors, write_tensors

SIZES = [8, 16, 4]
BATCH = 12  # divisible by 2 and 3
STEPS = 5
SAVE_AT = 3
NAN_STEP = 2
MAX_GRAD_NORM = 0.05
TIMEOUT = 4.0
SEED = 3

#: name -> (kind, class, hyperparameters, wrapper options)
VARIANTS = {
    "dp_adam": ("dp", Adam, dict(lr=1e-2, skip_nonfinite=True, max_grad_norm=MAX_GRAD_NORM),
                {}),
    "dp_adam_det": ("dp", Adam, dict(lr=1e-2, skip_nonfinite=True,
                                     max_grad_norm=MAX_GRAD_NORM), dict(deterministic=True)),
    "dp_rmsprop": ("dp", RMSProp, dict(lr=1e-2, momentum=0.9, centered=True,
                                       skip_nonfinite=True), {}),
    "dp_sgd": ("dp", SGD, dict(lr=0.05, momentum=0.9, nesterov=True, skip_nonfinite=True),
               dict(bucket_bytes=1024)),  # several messages
    "zero_adam": ("zero", Adam, dict(lr=1e-2, skip_nonfinite=True,
                                     max_grad_norm=MAX_GRAD_NORM), {}),
    "zero_adamw": ("zero", AdamW, dict(lr=1e-2, weight_decay=0.1, skip_nonfinite=True), {}),
    # Compressed state through the sharded and consolidated checkpoints.
    "zero_adam_bf16_state": ("zero", Adam, dict(lr=1e-2, skip_nonfinite=True,
                                                state_dtype="bfloat16"), {}),
}
#: Checkpoints written after SAVE_AT steps: file stem -> (variant, sharded).
CHECKPOINTS = {"dp_adam": ("dp_adam", False), "zero_adamw": ("zero_adamw", False),
               "zero_adamw_sharded": ("zero_adamw", True),
               "zero_adam_bf16_state": ("zero_adam_bf16_state", False),
               "zero_adam_bf16_state_sharded": ("zero_adam_bf16_state", True)}


def batch(step):
    rng = np.random.default_rng([SEED, step])
    x = rng.standard_normal((BATCH, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], BATCH).astype(np.int32)
    return x, y


def build_model(queue):
    layers = []
    for i, (n_in, n_out) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        layers.append(nn.Linear(n_in, n_out, queue=queue, seed=SEED * 10 + i))
        if i < len(SIZES) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def local_grads(queue, model, x, y, scale=None):
    """Backward of the mean loss over rows ``x``/``y`` into the params' ``.grad``."""
    for p in model.parameters():
        p.grad = None
    logits = model(cla.to_device(queue, x))
    _, grad = nn.softmax_cross_entropy(logits, cla.to_device(queue, y))
    if scale is not None:
        grad = scale(grad)
    model.backward(grad, input_grad=False)


def inject_nan(params):
    grad = params[0].grad.get()
    grad.flat[3] = np.nan
    params[0].grad.set(grad)


def make(queue, name, comm_options):
    kind, cls, hyper, options = VARIANTS[name]
    model = build_model(queue)
    params = model.parameters()
    if kind == "dp":
        opt = DistributedOptimizer(cls(params, **hyper), **options, **comm_options)
    else:
        opt = ZeroRedundancyOptimizer(params, cls, **options, **comm_options, **hyper)
    return model, params, opt


def train(queue, model, params, opt, rank, size, start, stop, record):
    rows = BATCH // size
    for step in range(start, stop):
        x, y = batch(step)
        local_grads(queue, model, x[rank * rows:(rank + 1) * rows],
                    y[rank * rows:(rank + 1) * rows])
        if step == NAN_STEP and rank == size - 1:
            inject_nan(params)
        opt.step()
        record.append(np.concatenate([p.data.get().ravel() for p in params]))


def save_params(path, params):
    write_tensors(path, {f"p{i}": p.data.get() for i, p in enumerate(params)}, {})


def load_params(path, params):
    tensors, _ = read_tensors(path)
    for i, p in enumerate(params):
        p.data.set(tensors[f"p{i}"])


def scenario_train(queue, out, rank, size):
    results = {}
    comm_options = dict(timeout=60.0)
    for name in VARIANTS:
        model, params, opt = make(queue, name, comm_options)
        record = []
        train(queue, model, params, opt, rank, size, 0, SAVE_AT, record)
        for stem, (variant, sharded) in CHECKPOINTS.items():
            if variant == name:
                path = out / f"{stem}.safetensors"
                (opt.save_sharded if sharded else opt.save)(path)
                if rank == 0:
                    save_params(out / f"{stem}.params.safetensors", params)
        train(queue, model, params, opt, rank, size, SAVE_AT, STEPS, record)
        opt.check_consistency()
        results[f"{name}.params"] = np.stack(record)
        results[f"{name}.skipped"] = np.array(opt.skipped_steps)
        results[f"{name}.state_bytes"] = np.array(opt.state_bytes())
        if name == "zero_adam":
            results["zero_owners"] = np.array(opt.owners)
        if name == "dp_adam":
            # A parameter changed on one rank only must be caught on every rank.
            if rank == size - 1:
                value = params[1].data.get()
                value[0] += 1.0
                params[1].data.set(value)
            try:
                opt.check_consistency()
                results["consistency_error"] = np.array("")
            except ConsistencyError as exc:
                results["consistency_error"] = np.array(str(exc))

    # GradScaler: scale sequence and skip agree on every rank.
    model = build_model(queue)
    params = model.parameters()
    opt = DistributedOptimizer(SGD(params, lr=0.05, momentum=0.9), check_consistency=True,
                               **comm_options)
    scaler = GradScaler(queue, init_scale=2.0**10, growth_interval=2)
    rows = BATCH // size
    scales, record = [], []
    for step in range(STEPS):
        x, y = batch(step)
        local_grads(queue, model, x[rank * rows:(rank + 1) * rows],
                    y[rank * rows:(rank + 1) * rows], scale=scaler.scale)
        if step == NAN_STEP and rank == size - 1:
            inject_nan(params)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        record.append(np.concatenate([p.data.get().ravel() for p in params]))
    results["amp.scales"] = np.array(scales)
    results["amp.params"] = np.stack(record)
    results["amp.skipped"] = np.array(opt.skipped_steps)
    np.savez(out / f"train.rank{rank}.npz", **results)


def scenario_resume(queue, out, rank, size):
    results = {}
    comm_options = dict(timeout=60.0)
    for stem, (name, sharded) in CHECKPOINTS.items():
        model, params, opt = make(queue, name, comm_options)
        load_params(out / f"{stem}.params.safetensors", params)
        (opt.load_sharded if sharded else opt.load)(out / f"{stem}.safetensors")
        record = []
        train(queue, model, params, opt, rank, size, SAVE_AT, STEPS, record)
        results[f"{stem}.params"] = np.stack(record)
    # A single process's checkpoint format (the DistributedOptimizer's
    # consolidated file) into ZeRO, and back out through consolidation.
    model, params, opt = make(queue, "zero_adam", comm_options)
    opt.load(out / "dp_adam.safetensors")
    opt.save(out / "zero_roundtrip.safetensors")
    # The torn set left by killsave must be refused on every rank.
    model, params, opt = make(queue, "zero_adamw", comm_options)
    try:
        opt.load_sharded(out / "torn.safetensors")
        results["torn_error"] = np.array("")
    except CheckpointError as exc:
        results["torn_error"] = np.array(str(exc))
    np.savez(out / f"resume.rank{rank}.npz", **results)


def scenario_raise(queue, out, rank, size):
    model, params, opt = make(queue, "dp_adam", dict(timeout=60.0))
    train(queue, model, params, opt, rank, size, 0, 1, [])  # builds the kernels
    opt.comm.timeout = TIMEOUT
    print(f"rank {rank} stepped", flush=True)
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    train(queue, model, params, opt, rank, size, 1, 2, [])
    print(f"rank {rank} was not stopped", flush=True)


def scenario_killsave(queue, out, rank, size):
    from netcl.optim import checkpoint_file

    model, params, opt = make(queue, "zero_adamw", dict(timeout=60.0))
    train(queue, model, params, opt, rank, size, 0, 1, [])
    opt.save_sharded(out / "torn.safetensors")
    train(queue, model, params, opt, rank, size, 1, 2, [])
    if rank == 1:
        replace = os.replace
        first = out / f"torn.rank0-of-{size}.safetensors"
        before = first.stat().st_ino  # the atomic rename gives rank 0's new file a new inode

        def die_before_rename(source, target):
            # Die once rank 0's new file is in place: the set is then torn.
            deadline = time.monotonic() + 60
            while first.stat().st_ino == before and time.monotonic() < deadline:
                time.sleep(0.01)
            print("rank 1 dies mid-save", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
            replace(source, target)

        checkpoint_file.os.replace = die_before_rename
    opt.save_sharded(out / "torn.safetensors")
    print(f"rank {rank} finished the save", flush=True)


def main():
    scenario, out = sys.argv[1], Path(sys.argv[2])
    queue = netcl.default_queue()
    from netcl.distributed import Communicator
    comm = Communicator()
    globals()[f"scenario_{scenario}"](queue, out, comm.rank, comm.size)
    if scenario in ("train", "resume"):
        comm.barrier()
    print(json.dumps({"rank": comm.rank, "done": scenario}), flush=True)


if __name__ == "__main__":
    main()
