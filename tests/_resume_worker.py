"""The other process of tests/test_checkpoint.py.

``python _resume_worker.py resume DIR``: for every variant in ``VARIANTS``,
rebuild the optimizer over fresh parameters, load the parameter values and
the optimizer checkpoint the test wrote to DIR after ``STEPS`` steps, take
``STEPS`` more steps and write the result (``<variant>.final.safetensors``,
``<variant>.final.params.safetensors``).

``python _resume_worker.py kill DIR``: save a small real checkpoint (and a
reference copy of its state), then start saving a much larger one to the same
path with ``os.fsync`` held, so the test can SIGKILL it mid-save.

The device comes from ``PYOPENCL_CTX`` (the test passes its own).
"""

import os
import sys
import time

import numpy as np
import pyopencl.array as cla

import netcl
from netcl.optim import SGD, Adam, AdamW, RMSProp
from netcl.optim.checkpoint_file import read_tensors, write_tensors

STEPS = 5
SHAPES = [("w1", (17,)), ("empty", (0,)), ("w2", (4, 5)), ("late", (6,))]

#: name -> (class, keyword arguments). Each group-1 lr is half the group-0 lr.
VARIANTS = {
    "rmsprop": (RMSProp, dict(lr=1e-2)),
    "rmsprop_momentum": (RMSProp, dict(lr=1e-2, momentum=0.9)),
    "rmsprop_centered": (RMSProp, dict(lr=1e-2, centered=True, weight_decay=0.1)),
    "rmsprop_centered_momentum": (RMSProp, dict(lr=1e-2, centered=True, momentum=0.8)),
    "rmsprop_tf1": (RMSProp, dict(RMSProp.PRESETS["tf1"], momentum=0.9, centered=True)),
    "rmsprop_keras_decoupled": (RMSProp, dict(RMSProp.PRESETS["keras"], momentum=0.9,
                                              weight_decay=0.05)),
    "rmsprop_optax_bias_nesterov": (RMSProp, dict(RMSProp.PRESETS["optax"], momentum=0.9,
                                                  nesterov=True, bias_correction=True,
                                                  centered=True, initial_scale=0.5)),
    "adam": (Adam, dict(lr=1e-2)),
    "adam_amsgrad": (Adam, dict(lr=1e-2, amsgrad=True, weight_decay=0.1)),
    "adamw": (AdamW, dict(lr=1e-2)),
    "adamw_amsgrad_maximize": (AdamW, dict(lr=1e-2, amsgrad=True, maximize=True)),
    "sgd": (SGD, dict(lr=0.05, weight_decay=0.01)),
    "sgd_momentum": (SGD, dict(lr=0.05, momentum=0.9, dampening=0.1)),
    "sgd_nesterov": (SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
}


def dtype_of(queue, index):
    # The last parameter is float64 where the device has it: mixed dtypes.
    if index == len(SHAPES) - 1 and "cl_khr_fp64" in queue.device.extensions:
        return np.dtype(np.float64)
    return np.dtype(np.float32)


def make(queue, variant, seed=0):
    """Parameters (from ``seed``) and the variant's optimizer over two named groups."""
    params = []
    for index, (_, shape) in enumerate(SHAPES):
        host = np.random.default_rng([seed, index]).standard_normal(shape)
        params.append(netcl.Parameter(cla.to_device(queue, host.astype(dtype_of(queue, index)))))
    cls, kwargs = VARIANTS[variant]
    named = [(name, p) for (name, _), p in zip(SHAPES, params)]
    groups = [{"params": named[:2]}, {"params": named[2:], "lr": kwargs["lr"] / 2}]
    return params, cls(groups, **kwargs)


def run(queue, params, opt, first, last, seed=1):
    """Steps ``first``..``last`` (1-based) with gradients that depend on (seed, step, index)
    only. Parameter 0 skips every third step and parameter 3 the first STEPS, so
    step counts differ per parameter and one parameter has no state at the save."""
    for step in range(first, last + 1):
        for index, p in enumerate(params):
            if (index == 0 and step % 3 == 0) or (index == 3 and step <= STEPS):
                p.grad = None
                continue
            grad = np.random.default_rng([seed, step, index]).standard_normal(p.data.shape)
            p.grad = cla.to_device(queue, grad.astype(p.data.dtype))
        opt.step()
        if step == 2:  # a hyperparameter changed mid-run must be restored too
            opt.param_groups[0]["lr"] *= 0.5


def save_params(path, params):
    write_tensors(path, {f"param.{i}": p.data.get() for i, p in enumerate(params)}, {})


def load_params(path, params):
    tensors, _ = read_tensors(path)
    for i, p in enumerate(params):
        p.data.set(tensors[f"param.{i}"])


def resume(directory):
    queue = netcl.default_queue()
    for variant in VARIANTS:
        base = os.path.join(directory, variant)
        params, opt = make(queue, variant, seed=99)  # values replaced by the load
        load_params(base + ".params.safetensors", params)
        netcl.optim.load(opt, base + ".safetensors")
        run(queue, params, opt, STEPS + 1, 2 * STEPS)
        opt.save(base + ".final.safetensors")
        save_params(base + ".final.params.safetensors", params)
    print("resumed", len(VARIANTS), flush=True)


def make_small(queue):
    params = [netcl.Parameter(cla.to_device(queue, np.linspace(-1, 1, n, dtype=np.float32)))
              for n in (7, 12)]
    return params, RMSProp([("a", params[0]), ("b", params[1])], lr=0.01, momentum=0.9,
                           centered=True)


def kill(directory):
    queue = netcl.default_queue()
    path = os.path.join(directory, "opt.safetensors")
    params, opt = make_small(queue)
    for step in range(3):
        for p in params:
            p.grad = cla.to_device(queue, np.full(p.data.shape, step + 1.5, np.float32))
        opt.step()
    sd = opt.state_dict()
    reference = {f"{i}.{name}": np.asarray(value) for i, entry in sd["state"].items()
                 for name, value in entry.items()}
    write_tensors(os.path.join(directory, "reference.safetensors"), reference, {})
    netcl.optim.save(opt, path)
    print("A-saved", flush=True)

    big = netcl.Parameter(cla.zeros(queue, 1 << 23, np.float32))  # 3 x 32 MiB of state
    big.grad = cla.zeros(queue, 1 << 23, np.float32) + 1
    big_opt = RMSProp([big], momentum=0.9, centered=True)
    big_opt.step()
    os.fsync = lambda fd: time.sleep(3600)  # hold the writer before its rename
    netcl.optim.save(big_opt, path)
    print("B-saved", flush=True)


if __name__ == "__main__":
    {"resume": resume, "kill": kill}[sys.argv[1]](sys.argv[2])
