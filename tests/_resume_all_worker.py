"""The other process of tests/test_checkpoint_training_state.py.

``python _resume_all_worker.py DIR``: for every run in ``RUNS``, build the
optimizer, its schedulers and its GradScaler afresh (over parameters with
other values), load the parameter values and the one checkpoint the test
wrote to DIR after ``STEPS`` steps, take ``STEPS`` more steps and write the
result (``<run>.final.safetensors`` with schedulers and scaler,
``<run>.final.params.safetensors``).

The device comes from ``PYOPENCL_CTX`` (the test passes its own).
"""

import os
import sys

import numpy as np
import pyopencl.array as cla

import netcl
import netcl.amp
from netcl.optim import SGD, Adam, RMSProp, lr_scheduler as L

from _resume_worker import load_params, save_params

STEPS = 12
SHAPES = [(17,), (4, 5), (0,), (6,)]


class Warmup:
    """A callable object: LambdaLR saves its attributes (a lambda it does not)."""

    def __init__(self, steps):
        self.steps = steps
        self.calls = 0

    def __call__(self, epoch):
        self.calls += 1
        return min(1.0, (epoch + 1) / self.steps)


def adam_one_cycle(opt):
    # beta1 cycling, on top of a GradScaler that skips and backs off.
    return [L.OneCycleLR(opt, [0.02, 0.01], total_steps=2 * STEPS + 1)]


def sgd_warmup_cosine_chain(opt):
    warmup_cosine = L.SequentialLR(opt, [L.LinearLR(opt, 0.1, 1.0, 5),
                                         L.CosineAnnealingLR(opt, 2 * STEPS, 1e-4)], [5])
    return [L.ChainedScheduler([warmup_cosine, L.MultiStepLR(opt, [7, 15, 15], 0.5)])]


def rmsprop_cyclic_plateau(opt):
    # Two schedulers on one optimizer, one of them stepped with a metric.
    return [L.CyclicLR(opt, 1e-3, 1e-2, 4, mode="exp_range", gamma=0.97),
            L.ReduceLROnPlateau(opt, patience=2, factor=0.5, cooldown=1)]


def adam_lambda(opt):
    return [L.LambdaLR(opt, [Warmup(6), lambda epoch: 0.9 ** epoch])]


#: name -> (optimizer class, keyword arguments, schedulers, GradScaler kwargs or None)
RUNS = {
    "adam_one_cycle_scaler": (Adam, dict(lr=1e-2), adam_one_cycle,
                              dict(init_scale=2.0 ** 10, growth_interval=3)),
    "sgd_chain": (SGD, dict(lr=0.05, momentum=0.9), sgd_warmup_cosine_chain, None),
    "rmsprop_cyclic_plateau_scaler": (RMSProp, dict(lr=1e-2, momentum=0.5),
                                      rmsprop_cyclic_plateau,
                                      dict(init_scale=8.0, growth_interval=2)),
    "adam_lambda": (Adam, dict(lr=1e-2, amsgrad=True), adam_lambda, None),
}


def make(queue, run, seed=0):
    """Parameters (from ``seed``), the optimizer over two groups, its schedulers
    and its GradScaler (or None)."""
    params = [netcl.Parameter(cla.to_device(
        queue, np.random.default_rng([seed, i]).standard_normal(s).astype(np.float32)))
        for i, s in enumerate(SHAPES)]
    cls, kwargs, schedulers, scaler_kwargs = RUNS[run]
    opt = cls([{"params": params[:2]}, {"params": params[2:], "lr": kwargs["lr"] / 2}],
              **kwargs)
    scaler = None if scaler_kwargs is None else netcl.amp.GradScaler(queue, **scaler_kwargs)
    return params, opt, schedulers(opt), scaler


def metric(step):
    """A loss that improves, then stalls: ReduceLROnPlateau acts mid-run."""
    return max(1.0 / step, 0.2) + 0.01 * (step % 3)


def run(queue, params, opt, schedulers, scaler, first, last):
    """Steps ``first``..``last`` (1-based): gradients depend on (step, index)
    only; with a scaler they are scaled, and an infinity at steps 4 and 15
    makes it skip a step and back off."""
    for step in range(first, last + 1):
        for index, p in enumerate(params):
            grad = np.random.default_rng([step, index]).standard_normal(p.data.shape)
            if scaler is not None and step in (4, 15) and index == 1:
                grad[0, 0] = np.inf
            grad = cla.to_device(queue, grad.astype(np.float32))
            p.grad = scaler.scale(grad) if scaler is not None else grad
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        for scheduler in schedulers:
            if isinstance(scheduler, L.ReduceLROnPlateau):
                scheduler.step(metric(step))
            else:
                scheduler.step()


def resume(directory):
    queue = netcl.default_queue()
    for name in RUNS:
        base = os.path.join(directory, name)
        params, opt, schedulers, scaler = make(queue, name, seed=99)  # replaced by the load
        load_params(base + ".params.safetensors", params)
        netcl.optim.load(opt, base + ".safetensors", schedulers=schedulers, scaler=scaler)
        run(queue, params, opt, schedulers, scaler, STEPS + 1, 2 * STEPS)
        netcl.optim.save(opt, base + ".final.safetensors", schedulers=schedulers, scaler=scaler)
        save_params(base + ".final.params.safetensors", params)
    print("resumed", len(RUNS), flush=True)


if __name__ == "__main__":
    resume(sys.argv[1])
