"""Adam with L2 regularisation against AdamW: where does the weight decay go?

Softmax regression (netcl.nn.Linear + softmax cross-entropy, on the device) on
synthetic data with three groups of features:

* high-variance dense: N(0, 3^2)
* low-variance dense:  N(0, 0.2^2)
* sparse, bursty:      0 with probability 0.95, else N(0, 1)

The labels come from a random "teacher" in which every group carries the same
signal. The model is trained twice from the same start, on the same batches,
with the same lr and weight decay: once with Adam(weight_decay=wd) (L2: wd * p
is added to the gradient and then goes through Adam's per-weight scaling) and
once with AdamW(weight_decay=wd) (decoupled: p shrinks by lr * wd every step).

AdamW's per-step decay coefficient is lr * wd for every weight. Adam+L2's is
lr * wd / (sqrt(v_hat) + eps), with v_hat = exp_avg_sq / (1 - beta2^step) read
from the optimizer's state: it depends on each weight's gradient scale, so
weights with large gradients (high-variance features) are decayed least and
weights with small or rare gradients (low-variance, sparse) over ten times
more; the decay meant as one regulariser becomes a different one per group.

    python examples/adamw_vs_l2.py
    python examples/adamw_vs_l2.py --lr 3e-3 --weight-decay 0.5

Writes adamw_vs_l2.png to --out and prints the spread per group.
"""

import sys
import time
from pathlib import Path

import numpy as np

import netcl
import netcl.optim
from netcl import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

GROUPS = ("high-variance", "low-variance", "sparse")
COLORS = ("tab:red", "tab:blue", "tab:green")
SIGNAL = 2.0  # teacher logit scale per group: sets how learnable the labels are


def parse_args(argv=None):
    parser = _common.base_parser(__doc__.split("\n\n")[0], steps=1500)
    parser.add_argument("--lr", type=float, default=1e-2, help="learning rate of both")
    parser.add_argument("--weight-decay", type=float, default=0.1,
                        help="weight decay of both (biases are not decayed)")
    parser.add_argument("--features", type=int, default=16, help="features per group")
    parser.add_argument("--classes", type=int, default=4, help="number of classes")
    parser.add_argument("--batch-size", type=int, default=32, help="mini-batch size")
    parser.add_argument("--samples", type=int, default=4096, help="training samples")
    parser.add_argument("--record-every", type=int, default=25,
                        help="read the optimizer state every this many steps")
    args = parser.parse_args(argv)
    _common.positive(parser, args, "steps", "lr", "weight_decay", "features", "classes",
                     "batch_size", "samples", "record_every")
    return args


def make_data(rng, n, features, teacher):
    """Features of the three groups side by side, and labels drawn from the teacher."""
    high = rng.normal(0.0, 3.0, (n, features))
    low = rng.normal(0.0, 0.2, (n, features))
    sparse = rng.normal(0.0, 1.0, (n, features)) * (rng.random((n, features)) < 0.05)
    x = np.concatenate([high, low, sparse], axis=1)
    logits = x @ teacher
    labels = (logits + rng.gumbel(size=logits.shape)).argmax(1)  # a sample of softmax
    return x.astype(np.float32), labels.astype(np.int32)


def make_teacher(rng, features, classes):
    # Scale each group's teacher weights by 1/std of its features (the sparse
    # group's std is sqrt(0.05)), so every group moves the logits equally.
    scale = np.repeat([1 / 3.0, 1 / 0.2, 1 / np.sqrt(0.05)], features) * SIGNAL
    return rng.standard_normal((3 * features, classes)) * scale[:, None] / np.sqrt(features)


def train(queue, name, args, data, batches):
    """Train one softmax regression; return final weights, records and accuracy."""
    x_train, y_train, x_test, y_test = data
    features = x_train.shape[1]
    model = nn.Linear(features, args.classes, queue=queue, seed=args.seed)
    groups = [{"params": [model.weight]}, {"params": [model.bias], "weight_decay": 0.0}]
    opt = getattr(netcl.optim, name)(groups, lr=args.lr, weight_decay=args.weight_decay)
    beta2 = opt.param_groups[0]["betas"][1]
    eps = opt.param_groups[0]["eps"]
    xd, yd = _common.to_device(queue, x_train), _common.to_device(queue, y_train)
    order = _common.to_device(queue, batches.ravel(), np.int32)
    batch = batches.shape[1]

    losses, coefficient_steps, coefficients = [], [], []
    progress = _common.Progress(args.steps, f"{name:8s}", args.progress)
    for step in range(1, args.steps + 1):
        index = order[(step - 1) * batch:step * batch]
        opt.zero_grad()
        loss, grad = nn.softmax_cross_entropy(model(nn.take_rows(xd, index)),
                                              nn.take_rows(yd, index))
        model.backward(grad, input_grad=False)
        opt.step()
        if step % args.record_every == 0 or step == args.steps:
            losses.append((step, float(loss.get())))
            state = opt.state[id(model.weight)]
            v_hat = state["exp_avg_sq"].get().astype(np.float64) / (1 - beta2 ** state["step"])
            coefficients.append(decay_coefficient(name, args, v_hat, eps))
            coefficient_steps.append(step)
        progress.update()
    progress.close()
    logits = model(_common.to_device(queue, x_test)).get()
    return {"weight": model.weight.data.get().astype(np.float64),
            "losses": losses, "steps": coefficient_steps,
            "coefficients": np.array(coefficients), "v_hat": v_hat,
            "test_accuracy": float(np.mean(logits.argmax(1) == y_test))}


def decay_coefficient(name, args, v_hat, eps):
    """Fraction of each weight removed by the decay term in one step."""
    if name == "AdamW":
        return np.full(v_hat.shape, args.lr * args.weight_decay)
    return args.lr * args.weight_decay / (np.sqrt(v_hat) + eps)


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    queue = netcl.default_queue()
    rng = np.random.default_rng(args.seed)
    teacher = make_teacher(rng, args.features, args.classes)
    x_train, y_train = make_data(rng, args.samples, args.features, teacher)
    x_test, y_test = make_data(rng, 1024, args.features, teacher)
    # The same batches, drawn with replacement, for both runs.
    batches = rng.integers(0, args.samples, (args.steps, min(args.batch_size, args.samples)))
    data = (x_train, y_train, x_test, y_test)

    runs = {name: train(queue, name, args, data, batches) for name in ("Adam", "AdamW")}
    seconds = time.perf_counter() - start
    group_of = np.repeat(np.arange(3), args.features)  # feature -> group

    summary = {}
    for name, run in runs.items():
        coefficient = run["coefficients"][-1]  # (classes, features)
        amount = coefficient * np.abs(run["weight"])  # decay removed per step
        summary[name] = {
            group: {"coefficient_min": float(coefficient[:, group_of == g].min()),
                    "coefficient_median": float(np.median(coefficient[:, group_of == g])),
                    "coefficient_max": float(coefficient[:, group_of == g].max()),
                    "decay_amount": float(amount[:, group_of == g].mean()),
                    "mean_abs_weight": float(np.abs(run["weight"][:, group_of == g]).mean())}
            for g, group in enumerate(GROUPS)}

    plot = plot_results(runs, summary, group_of, args)
    uniform = args.lr * args.weight_decay
    print(f"softmax regression, {args.steps} steps, lr {args.lr:g}, weight decay "
          f"{args.weight_decay:g}, on {queue.device.name.strip()} ({seconds:.1f} s)")
    for name, run in runs.items():
        print(f"  {name:6s} final loss {run['losses'][-1][1]:.3f}, "
              f"held-out accuracy {run['test_accuracy']:.1%}")
    print(f"per-step decay coefficient after {args.steps} steps "
          f"(AdamW: lr * wd = {uniform:.2g} for every weight):")
    print(f"  {'group':14s} {'Adam+L2 min':>12s} {'median':>10s} {'max':>10s} "
          f"{'max/min':>8s} {'median/AdamW':>13s}")
    for group in GROUPS:
        s = summary["Adam"][group]
        print(f"  {group:14s} {s['coefficient_min']:12.3g} {s['coefficient_median']:10.3g} "
              f"{s['coefficient_max']:10.3g} {s['coefficient_max'] / s['coefficient_min']:8.1f} "
              f"{s['coefficient_median'] / uniform:13.2f}")
    medians = [summary["Adam"][g]["coefficient_median"] for g in GROUPS]
    print(f"  Adam+L2 medians span {max(medians) / min(medians):.0f}x across groups; "
          "AdamW's span 1x")
    print("decay removed per step, mean |coefficient * w| (and mean |w|):")
    for group in GROUPS:
        print(f"  {group:14s} " + "   ".join(
            f"{name} {summary[name][group]['decay_amount']:.2e} "
            f"(|w| {summary[name][group]['mean_abs_weight']:.3f})" for name in runs))
    print(f"plot: {plot}")
    return {"summary": summary, "seconds": seconds, "plot": plot,
            "losses": {name: run["losses"] for name, run in runs.items()},
            "test_accuracy": {name: run["test_accuracy"] for name, run in runs.items()}}


def plot_results(runs, summary, group_of, args):
    plt = _common.pyplot()
    uniform = args.lr * args.weight_decay
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.2))

    ax = axes[0, 0]
    coefficient = runs["Adam"]["coefficients"][-1]
    x = 0
    for g, group in enumerate(GROUPS):
        values = np.sort(coefficient[:, group_of == g].ravel())
        ax.plot(np.arange(x, x + values.size), values, ".", ms=3, color=COLORS[g], label=group)
        x += values.size
    ax.axhline(uniform, color="k", ls="--", lw=1, label=f"AdamW: lr*wd = {uniform:.2g}")
    ax.set_yscale("log")
    ax.set_xlabel(f"weight ({args.classes} x {args.features} per group, sorted within it)")
    ax.set_ylabel("per-step decay coefficient")
    ax.set_title(f"Adam+L2: lr*wd/(sqrt(v_hat)+eps), step {args.steps}")
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    steps = runs["Adam"]["steps"]
    for g, group in enumerate(GROUPS):
        per_step = runs["Adam"]["coefficients"][:, :, group_of == g]
        per_step = per_step.reshape(len(steps), -1)
        ax.plot(steps, np.median(per_step, 1), color=COLORS[g], label=f"{group} (median)")
        ax.fill_between(steps, per_step.min(1), per_step.max(1), color=COLORS[g], alpha=0.15)
    ax.axhline(uniform, color="k", ls="--", lw=1, label="AdamW")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("per-step decay coefficient")
    ax.set_title("Adam+L2 coefficient during training (band: min-max)")
    ax.legend(fontsize=8)

    from matplotlib.patches import Patch
    legend_patches = [Patch(facecolor="white", edgecolor="k", label="Adam+L2"),
                      Patch(facecolor="white", edgecolor="k", hatch="//", label="AdamW")]
    width = 0.38
    positions = np.arange(len(GROUPS))
    for ax, key, title in ((axes[1, 0], "decay_amount", "decay removed per step, mean |coef * w|"),
                           (axes[1, 1], "mean_abs_weight", "final mean |w|")):
        for i, (name, hatch) in enumerate((("Adam", ""), ("AdamW", "//"))):
            values = [summary[name][group][key] for group in GROUPS]
            ax.bar(positions + (i - 0.5) * width, values, width, color=COLORS, hatch=hatch,
                   edgecolor="k")
        ax.set_xticks(positions, GROUPS)
        ax.set_title(title)
        ax.legend(handles=legend_patches, fontsize=8)
    axes[1, 0].set_yscale("log")
    fig.suptitle(f"Adam+L2 vs AdamW, lr {args.lr:g}, weight decay {args.weight_decay:g}")
    fig.tight_layout()
    return _common.save_figure(fig, args.out, "adamw_vs_l2.png", dpi=80)


if __name__ == "__main__":
    main()
