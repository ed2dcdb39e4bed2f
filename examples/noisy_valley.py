"""SGD, RMSProp and Adam on a noisy quadratic valley, on the OpenCL device.

The loss is L(p) = 1/2 (w0 p0^2 + w1 p1^2 + w2 p2^2) with curvatures
w = (1, 12, 3): a long, flat valley along p0 with steep walls along p1. Each
step's gradient is the exact one, w * p, plus Gaussian noise with standard
deviations (0.10, 0.9, 0.18); the third switches to 0.8 at the halfway step,
so the optimizers must cope with a change in the noise. Every optimizer sees
the same noise sequence (fixed seed).

The parameter is a 3-element netcl.Parameter: the host reads it, computes the
noisy gradient from the formula above and uploads it; the optimizer step runs
on the device.

    python examples/noisy_valley.py
    python examples/noisy_valley.py --steps 2000 --adam-lr 0.02

Writes noisy_valley.png (the (p0, p1) plane with the three trajectories, loss
against steps on linear and log axes, the last 100 steps) to --out and prints
which optimizer ends lowest (mean loss over the last 100 steps).
"""

import sys
import time
from pathlib import Path

import numpy as np
import pyopencl.array as cla

import netcl
import netcl.optim

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

CURVATURE = np.array([1.0, 12.0, 3.0])
NOISE = np.array([0.10, 0.9, 0.18])
NOISE_2_AFTER_HALFWAY = 0.8
START = np.array([-4.0, 1.2, 2.0])
TAIL = 100

# SGD's lr of 0.16 sits just under its stability limit 2 / w1 = 0.167: the
# steep p1 direction flips sign every step and only slowly settles, while the
# flat p0 direction still shrinks by (1 - 0.16) per step.
#
# RMSProp and Adam divide each coordinate's gradient by its running RMS, so once
# the noise dominates their step is about lr in every coordinate whatever its
# curvature: lr is a distance per step. 0.05 covers the 4 units from the start
# to the valley floor along p0 in about a hundred steps (the first sixth of the
# default run) while keeping the rattle around the minimum, which grows with
# lr, small; 0.02 halves the final loss but takes 300 steps to arrive, 0.2
# arrives in a few dozen but ends 5-10x higher. Both get the same lr so that
# the comparison is between the algorithms.
DEFAULT_LR = {"SGD": 0.16, "RMSProp": 0.05, "Adam": 0.05}


def parse_args(argv=None):
    parser = _common.base_parser(__doc__.split("\n\n")[0], steps=600)
    for name, lr in DEFAULT_LR.items():
        parser.add_argument(f"--{name.lower()}-lr", type=float, default=lr,
                            help=f"{name} learning rate")
    args = parser.parse_args(argv)
    _common.positive(parser, args, "steps", "sgd_lr", "rmsprop_lr", "adam_lr")
    return args


def loss(p):
    """The noise-free loss, for an (..., 3) array of points."""
    return 0.5 * np.sum(CURVATURE * np.asarray(p) ** 2, axis=-1)


def noise_sequence(steps, seed):
    sigma = np.tile(NOISE, (steps, 1))
    sigma[steps // 2:, 2] = NOISE_2_AFTER_HALFWAY
    return np.random.default_rng(seed).standard_normal((steps, 3)) * sigma


def run(queue, name, lr, noise, progress):
    """Optimize from START with the given noise; return the trajectory (steps + 1, 3)."""
    p = netcl.Parameter(cla.to_device(queue, START.astype(np.float32)))
    p.grad = cla.zeros(queue, 3, np.float32)
    opt = getattr(netcl.optim, name)([p], lr=lr)
    trajectory = [p.data.get()]
    for step_noise in noise:
        gradient = CURVATURE * trajectory[-1] + step_noise
        p.grad.set(gradient.astype(np.float32))
        opt.step()
        trajectory.append(p.data.get())
        progress.update()
    return np.array(trajectory, dtype=np.float64)


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    queue = netcl.default_queue()
    noise = noise_sequence(args.steps, args.seed)
    lrs = {"SGD": args.sgd_lr, "RMSProp": args.rmsprop_lr, "Adam": args.adam_lr}

    progress = _common.Progress(args.steps * len(lrs), "valley  ", args.progress)
    trajectories = {name: run(queue, name, lr, noise, progress) for name, lr in lrs.items()}
    progress.close()
    losses = {name: loss(t) for name, t in trajectories.items()}
    tail = min(TAIL, args.steps)
    tail_mean = {name: float(l[-tail:].mean()) for name, l in losses.items()}
    lowest = min(tail_mean, key=tail_mean.get)
    seconds = time.perf_counter() - start

    plot = plot_results(trajectories, losses, lrs, args, tail)
    print(f"noisy valley, {args.steps} steps on {queue.device.name.strip()} "
          f"({seconds:.1f} s); start loss {loss(START):.3f}")
    print(f"mean loss over the last {tail} steps:")
    for name, value in sorted(tail_mean.items(), key=lambda item: item[1]):
        print(f"  {name:8s} lr {lrs[name]:<6g} {value:.4g}")
    print(f"lowest: {lowest}")
    print(f"plot: {plot}")
    return {"tail_mean_loss": tail_mean, "lowest": lowest, "start_loss": float(loss(START)),
            "losses": {name: l.tolist() for name, l in losses.items()},
            "seconds": seconds, "plot": plot}


def plot_results(trajectories, losses, lrs, args, tail):
    plt = _common.pyplot()
    colors = {"SGD": "tab:red", "RMSProp": "tab:blue", "Adam": "tab:green"}
    labels = {name: f"{name} (lr {lrs[name]:g})" for name in lrs}
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.2))
    ax = axes[0, 0]
    every = np.concatenate([t[:, :2] for t in trajectories.values()])
    hi = np.maximum(np.abs(every).max(0) * 1.1, [0.5, 0.5])
    g0, g1 = np.meshgrid(np.linspace(-hi[0], hi[0], 200), np.linspace(-hi[1], hi[1], 200))
    surface = 0.5 * (CURVATURE[0] * g0 ** 2 + CURVATURE[1] * g1 ** 2)
    ax.contour(g0, g1, surface, levels=np.geomspace(surface.max() * 1e-3, surface.max(), 12),
               colors="0.75", linewidths=0.7)
    for name, t in trajectories.items():
        ax.plot(t[:, 0], t[:, 1], "-", color=colors[name], lw=0.6, alpha=0.8,
                zorder=2 if name == "SGD" else 3, label=labels[name])
    ax.plot(*START[:2], "k*", ms=10, label="start")
    ax.plot(0, 0, "k+", ms=12)
    ax.set_xlabel("p0 (curvature 1)")
    ax.set_ylabel("p1 (curvature 12)")
    ax.set_title("trajectories in the (p0, p1) plane")
    ax.legend(fontsize=8, loc="lower right")

    steps = np.arange(args.steps + 1)
    for ax, scale in ((axes[0, 1], "linear"), (axes[1, 0], "log")):
        for name, l in losses.items():
            ax.plot(steps, l, color=colors[name], lw=0.7, label=labels[name])
        ax.axvline(args.steps // 2, color="0.5", ls=":", lw=1)
        ax.set_yscale(scale)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (noise-free)")
        ax.set_title(f"loss, {scale} axis (dotted: p2 noise 0.18 -> 0.8)")
    axes[0, 1].set_ylim(0, loss(START) * 1.05)
    axes[1, 0].legend(fontsize=8)

    ax = axes[1, 1]
    for name, l in losses.items():
        ax.plot(steps[-tail:], l[-tail:], color=colors[name], lw=0.8, label=labels[name])
        ax.axhline(l[-tail:].mean(), color=colors[name], ls="--", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(f"last {tail} steps (dashed: their mean)")
    fig.suptitle("noisy quadratic valley, w = (1, 12, 3), same noise for every optimizer")
    fig.tight_layout()
    return _common.save_figure(fig, args.out, "noisy_valley.png", dpi=80)


if __name__ == "__main__":
    main()
