"""Train an MLP classifier on handwritten digits, entirely on the OpenCL device.

The data are scikit-learn's bundled 8x8 digits (1797 images, no download),
standardised with the training set's statistics and split 80/20 with a fixed
seed. Everything that touches the data after loading runs on the device: the
mini-batch gather, forward and backward passes (netcl.nn) and the optimizer
step (netcl.optim). The host only draws each epoch's shuffle and reads the loss
back for the progress bar and the plot.

    python examples/train_mlp.py                        # RMSProp, defaults
    python examples/train_mlp.py --optim adamw --lr 3e-3 --weight-decay 0.05
    python examples/train_mlp.py --optim sgd --lr 0.05 --momentum 0.9 --nesterov
    python examples/train_mlp.py --epochs 10 --save ck.safetensors
    python examples/train_mlp.py --epochs 20 --resume ck.safetensors   # continues to epoch 20
    mpiexec -n 2 python examples/train_mlp.py --distributed   # data parallel over 2 ranks
    mpiexec -n 2 python examples/train_mlp.py --zero          # ... with sharded state

Under mpiexec (netcl[mpi]) every rank takes its slice of each mini-batch and
the gradients are averaged (netcl.distributed), so the run follows the
single-process one to float32 rounding; rank 0 prints and plots.

Writes ``loss_<optim>.png`` (training loss per step, test accuracy per epoch)
to --out and prints the held-out accuracy.
"""

import sys
import time
from pathlib import Path

import numpy as np

import netcl
from netcl import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

# Learning rates when --lr is not given: torch's defaults, except SGD's (1e-3
# is far too small for this problem) and RMSProp's (1e-2 overshoots early on).
DEFAULT_LR = {"rmsprop": 1e-3, "adam": 1e-3, "adamw": 1e-3, "sgd": 0.05}


def parse_args(argv=None):
    parser = _common.base_parser(__doc__.split("\n\n")[0], steps=None,
                                 steps_help="optimizer steps (default: --epochs' worth)")
    parser.add_argument("--epochs", type=int, default=20,
                        help="passes over the training set (--steps overrides it)")
    parser.add_argument("--batch-size", type=int, default=64, help="mini-batch size")
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 128],
                        help="hidden layer widths")
    parser.add_argument("--save", type=Path, metavar="PATH",
                        help="write a checkpoint (parameters, optimizer state, step) at the end")
    parser.add_argument("--resume", type=Path, metavar="PATH",
                        help="continue from a checkpoint (its hyperparameters win); "
                        "--epochs/--steps count from step 0")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--distributed", action="store_true",
                      help="data parallel under mpiexec: average gradients over the ranks")
    mode.add_argument("--zero", action="store_true",
                      help="as --distributed, with the optimizer state sharded (ZeRO-1)")
    _common.add_optimizer_args(parser, default_lr=DEFAULT_LR)
    args = parser.parse_args(argv)
    _common.positive(parser, args, "epochs", "batch_size", "steps")
    if any(h <= 0 for h in args.hidden):
        parser.error("--hidden widths must be positive")
    return parser, args


def load_digits(seed, test_fraction=0.2):
    """Standardised digits features and labels, split with a fixed seed (stratified)."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data.astype(np.float64), digits.target, test_size=test_fraction,
        random_state=seed, stratify=digits.target)
    mean, std = x_train.mean(0), x_train.std(0)
    std[std == 0] = 1.0  # the always-blank corner pixels
    return ((x_train - mean) / std).astype(np.float32), y_train.astype(np.int32), \
        ((x_test - mean) / std).astype(np.float32), y_test.astype(np.int32)


def build_model(queue, sizes, seed):
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out, queue=queue, seed=seed * 100 + i))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def accuracy(model, x, y):
    logits = model(x).get()
    return float(np.mean(logits.argmax(1) == y))


def main(argv=None):
    parser, args = parse_args(argv)
    start = time.perf_counter()
    queue = netcl.default_queue()
    x_train, y_train, x_test, y_test = load_digits(args.seed)
    n_train, batch = len(x_train), min(args.batch_size, len(x_train))
    steps_per_epoch = n_train // batch  # the last partial batch is dropped
    total_steps = args.steps if args.steps is not None else args.epochs * steps_per_epoch

    # The whole data set lives on the device; batches are gathered there.
    xd_train, yd_train = _common.to_device(queue, x_train), _common.to_device(queue, y_train)
    xd_test = _common.to_device(queue, x_test)
    model = build_model(queue, [x_train.shape[1], *args.hidden, 10], args.seed)
    params = model.parameters()
    opt = _common.make_optimizer(parser, args, params, DEFAULT_LR,
                                 distributed="zero" if args.zero else args.distributed)
    rank, ranks = getattr(opt, "rank", 0), getattr(opt, "world_size", 1)
    if batch % ranks:
        parser.error(f"--batch-size {batch} must divide evenly over {ranks} ranks")
    rows = batch // ranks  # this rank's slice of every mini-batch

    step, history = 0, {"loss": [], "test_accuracy": []}
    if args.resume:
        extra = _common.load_checkpoint(args.resume, opt, params)
        step, history = extra["step"], extra["history"]
        if rank == 0:
            print(f"resumed from {args.resume} at step {step}", file=sys.stderr)

    progress = _common.Progress(total_steps, f"{args.optim:8s}", args.progress and rank == 0)
    progress.update(min(step, total_steps))
    order = None
    while step < total_steps:
        epoch, position = divmod(step, steps_per_epoch)
        if order is None or position == 0:
            # Each epoch's shuffle depends on (seed, epoch) only, so a resumed
            # run sees exactly the batches an uninterrupted one would.
            permutation = np.random.default_rng([args.seed, epoch]).permutation(n_train)
            order = _common.to_device(queue, permutation, np.int32)
        first = position * batch + rank * rows
        index = order[first:first + rows]
        xb, yb = nn.take_rows(xd_train, index), nn.take_rows(yd_train, index)

        opt.zero_grad()
        loss, grad = nn.softmax_cross_entropy(model(xb), yb)
        model.backward(grad, input_grad=False)
        opt.step()
        step += 1

        history["loss"].append(float(loss.get()))
        if step % steps_per_epoch == 0 or step == total_steps:
            history["test_accuracy"].append((step, accuracy(model, xd_test, y_test)))
        progress.update(loss=history["loss"][-1], epoch=step // steps_per_epoch)
    progress.close()

    test_accuracy = accuracy(model, xd_test, y_test)
    train_accuracy = accuracy(model, xd_train, y_train)
    seconds = time.perf_counter() - start
    if args.save:
        _common.save_checkpoint(args.save, opt, params, {"step": step, "history": history})
    name = type(opt).__name__ if ranks == 1 else \
        f"{type(opt.optim).__name__} ({type(opt).__name__}, {ranks} ranks)"
    if rank != 0:
        return {"optimizer": name, "steps": step, "seconds": seconds,
                "test_accuracy": test_accuracy, "train_accuracy": train_accuracy}
    plot = plot_history(history, args, steps_per_epoch)
    print(f"{name} on {queue.device.name.strip()}: {step} steps "
          f"({step / steps_per_epoch:.1f} epochs of {batch}) in {seconds:.1f} s; "
          f"train accuracy {train_accuracy:.2%}, held-out accuracy {test_accuracy:.2%} "
          f"({len(y_test)} images)")
    print(f"loss curve: {plot}")
    return {"optimizer": name, "steps": step, "seconds": seconds,
            "test_accuracy": test_accuracy, "train_accuracy": train_accuracy,
            "losses": history["loss"], "plot": plot,
            "params": [p.data.get() for p in params]}


def plot_history(history, args, steps_per_epoch):
    plt = _common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    losses = np.array(history["loss"])
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=0.8, label="loss per step")
    window = min(len(losses), steps_per_epoch)
    if window > 1:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, color="tab:blue", label="mean over an epoch")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy)")
    if history["test_accuracy"]:
        twin = ax.twinx()
        at, acc = zip(*history["test_accuracy"])
        twin.plot(at, np.array(acc) * 100, "o-", color="tab:orange", ms=3,
                  label="held-out accuracy")
        twin.set_ylabel("held-out accuracy (%)")
        twin.set_ylim(min(80, min(acc) * 100), 100)
        lines = ax.get_lines() + twin.get_lines()
        ax.legend(lines, [line.get_label() for line in lines], loc="center right")
    else:
        ax.legend(loc="center right")
    ax.set_title(f"MLP on digits, {args.optim}")
    fig.tight_layout()
    return _common.save_figure(fig, args.out, f"loss_{args.optim}.png")


if __name__ == "__main__":
    main()
