"""Low precision: bfloat16 weights stall, stochastic rounding / master weights /
Kahan summation recover the float32 result, and Adam with int8 state matches
float32 Adam.

Two least-squares problems with noisy targets (the gradient is computed on
the host in float32 from the device weights, to keep the example short):

1. ``sgd``: 64 weights near 1, where bfloat16's spacing is 2**-7. Late
   updates are smaller than half that spacing, so bfloat16 weights rounded
   to nearest stop moving far above float32's loss; stochastic rounding,
   a float32 master copy or Kahan compensation keep the small updates and
   end near the best any bfloat16 weights can do (float32's solution
   rounded to bfloat16).
2. ``adam``: a 64 x 128 weight matrix (8192 elements: above the 4096 below
   which int8 state stays float32), float32 Adam against Adam with
   ``state_dtype="int8"`` and ``"bfloat16"``.

Run ``python examples/low_precision.py`` (add ``--plot`` for a figure).
"""

import ml_dtypes
import numpy as np
import pyopencl.array as cla

import netcl
from netcl.optim import SGD, Adam

from _common import base_parser, pyplot, save_figure

BF16 = np.dtype(ml_dtypes.bfloat16)

SGD_VARIANTS = {
    "float32": (np.float32, {}),
    "bfloat16 nearest": (BF16, {}),
    "bfloat16 stochastic rounding": (BF16, dict(stochastic_rounding=True)),
    "bfloat16 master weights": (BF16, dict(master_weights=True)),
    "bfloat16 Kahan": (BF16, dict(kahan=True)),
}
ADAM_VARIANTS = {
    "float32 state": dict(),
    "int8 state": dict(state_dtype="int8"),
    "bfloat16 state": dict(state_dtype="bfloat16"),
}


def problem(rng, rows, inputs, outputs, start, noise):
    features = rng.standard_normal((rows, inputs)).astype(np.float32)
    true_w = (start + 0.1 * rng.standard_normal((inputs, outputs))).astype(np.float32)
    targets = features @ true_w + noise * rng.standard_normal((rows, outputs)).astype(np.float32)
    return features, targets


def train(queue, features, targets, dtype, make_optimizer, steps, start):
    """Full-batch least squares from weights ``start``: the loss per step
    (float64, of the weights as stored) and the final weights."""
    shape = (features.shape[1], targets.shape[1])
    w = netcl.Parameter(cla.to_device(queue, np.full(shape, start, np.float32).astype(dtype)))
    opt = make_optimizer([w])
    losses = []
    for _ in range(steps):
        weights = w.data.get().astype(np.float32)
        residual = features @ weights - targets
        losses.append(loss(features, targets, weights))
        grad = (2.0 / residual.size) * features.T @ residual
        w.grad = cla.to_device(queue, grad.astype(np.float32).astype(dtype))
        opt.step()
    return losses, w.data.get().astype(np.float32)


def loss(features, targets, weights):
    residual = features.astype(np.float64) @ weights.astype(np.float64) - targets
    return float(np.mean(residual ** 2))


def main(argv=None):
    parser = base_parser(__doc__.splitlines()[0], steps=600)
    parser.add_argument("--adam-steps", type=int, default=300)
    parser.add_argument("--plot", action="store_true", help="write low_precision.png")
    args = parser.parse_args(argv)
    queue = netcl.default_queue()
    rng = np.random.default_rng(args.seed)

    features, targets = problem(rng, 256, 64, 1, start=1.0, noise=1e-3)
    sgd = {}
    for name, (dtype, options) in SGD_VARIANTS.items():
        sgd[name], final = train(queue, features, targets, dtype,
                                 lambda p: SGD(p, lr=0.05, seed=args.seed, **options),
                                 args.steps, start=1.0)
        print(f"SGD  {name:<30} final loss {sgd[name][-1]:.3e}")
        if name == "float32":
            # The best bfloat16 weights can do: float32's solution, rounded.
            floor = loss(features, targets, final.astype(BF16).astype(np.float32))
            print(f"SGD  {'float32 result in bfloat16':<30} final loss {floor:.3e}")

    features, targets = problem(rng, 512, 64, 128, start=0.0, noise=0.1)
    adam = {}
    for name, options in ADAM_VARIANTS.items():
        adam[name] = train(queue, features, targets, np.float32,
                           lambda p: Adam(p, lr=1e-2, **options), args.adam_steps,
                           start=0.0)[0]
        print(f"Adam {name:<30} final loss {adam[name][-1]:.4e}")

    if args.plot:
        plt = pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for name, losses in sgd.items():
            axes[0].semilogy(losses, label=name)
        axes[0].axhline(floor, color="gray", linestyle=":", label="float32 result in bfloat16")
        axes[0].set_title("SGD, weights near 1")
        for name, losses in adam.items():
            axes[1].semilogy(losses, label=name)
        axes[1].set_title("Adam, 64 x 128 weights")
        for ax in axes:
            ax.set_xlabel("step")
            ax.set_ylabel("mean squared error")
            ax.legend()
        save_figure(fig, args.out, "low_precision")
    return {"sgd": sgd, "adam": adam, "bfloat16_floor": floor}


if __name__ == "__main__":
    main()
