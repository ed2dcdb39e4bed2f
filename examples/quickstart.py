"""Quickstart: fit a linear least-squares problem with netcl's RMSProp.

The gradient is computed on the host with NumPy to keep the example short; the
optimizer and all of its state live on the OpenCL device. Run:

    python examples/quickstart.py
"""

import argparse

import numpy as np
import pyopencl.array as cla

import netcl
from netcl.optim import RMSProp


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args(argv)

    queue = netcl.default_queue()
    rng = np.random.default_rng(0)
    features = rng.standard_normal((512, 32)).astype(np.float32)
    true_w = rng.standard_normal(32).astype(np.float32)
    targets = features @ true_w

    w = netcl.Parameter(cla.zeros(queue, 32, np.float32))
    opt = RMSProp([w], lr=args.lr, momentum=0.9, centered=True)
    print(f"device: {queue.device.name.strip()} ({queue.device.platform.name.strip()})")
    losses = []
    for step in range(args.steps):
        residual = features @ w.data.get() - targets
        losses.append(float(np.mean(residual ** 2)))
        w.grad = cla.to_device(queue, (2 / len(targets) * features.T @ residual).astype(np.float32))
        opt.step()
        opt.zero_grad()
        if step % 50 == 0:
            print(f"step {step:4d}  loss {losses[-1]:.6f}")
    print(f"final loss {losses[-1]:.3g} (started at {losses[0]:.3g})")
    return {"losses": losses}


if __name__ == "__main__":
    main()
