"""Helpers shared by the examples: paths, a tiny progress bar, optimizer flags,
checkpoints and matplotlib setup. Only NumPy, pyopencl and netcl here."""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyopencl.array as cla

import netcl.optim

DEFAULT_OUT = Path(__file__).resolve().parent / "out"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the uninformative None and on/off switches."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help or ""
        return super()._get_help_string(action)


def base_parser(description, steps, steps_help="optimizer steps", out=DEFAULT_OUT):
    """An ArgumentParser with the flags every example has: --steps, --out, --seed."""
    parser = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    parser.add_argument("--steps", type=int, default=steps, help=steps_help)
    parser.add_argument("--out", type=Path, default=out, help="folder for the plots")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="do not draw the progress bar")
    return parser


def positive(parser, args, *names):
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")


def pyplot():
    """matplotlib.pyplot on the Agg backend (writes files, needs no display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, out, name, dpi=90):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


class Progress:
    """A one-line progress bar on stderr, redrawn at most ten times a second."""

    def __init__(self, total, label="", enabled=True, width=28):
        self.total, self.label, self.width = max(1, total), label, width
        self.enabled = enabled
        self.done, self.start, self.last = 0, time.perf_counter(), 0.0

    def update(self, n=1, **info):
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self.last >= 0.1 or self.done >= self.total):
            self.last = now
            filled = int(self.width * min(1.0, self.done / self.total))
            extra = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in info.items())
            sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] "
                             f"{self.done}/{self.total} {now - self.start:5.1f}s  {extra}\033[K")
            sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


# --------------------------------------------------------------- optimizers
# Which command-line hyperparameters each optimizer takes (torch.optim names).
OPTIMIZERS = {
    "rmsprop": ("RMSProp", ("lr", "alpha", "eps", "weight_decay", "momentum", "centered")),
    "adam": ("Adam", ("lr", "betas", "eps", "weight_decay", "amsgrad")),
    "adamw": ("AdamW", ("lr", "betas", "eps", "weight_decay", "amsgrad")),
    "sgd": ("SGD", ("lr", "momentum", "dampening", "weight_decay", "nesterov")),
}


def add_optimizer_args(parser, default="rmsprop", default_lr=None):
    """--optim and the torch.optim hyperparameters; unset ones keep the class default
    (the learning rate: ``default_lr[optim]`` where given)."""
    group = parser.add_argument_group("optimizer (unset values keep torch.optim's defaults)")
    group.add_argument("--optim", choices=sorted(OPTIMIZERS), default=default,
                       help="the netcl.optim class")
    lr_help = "learning rate"
    if default_lr:
        lr_help += " (unset: " + ", ".join(f"{k} {v:g}" for k, v in default_lr.items()) + ")"
    group.add_argument("--lr", type=float, help=lr_help)
    group.add_argument("--momentum", type=float, help="rmsprop, sgd")
    group.add_argument("--weight-decay", type=float, help="all")
    group.add_argument("--alpha", type=float, help="rmsprop smoothing constant")
    group.add_argument("--eps", type=float, help="rmsprop, adam, adamw")
    group.add_argument("--centered", action="store_true", default=None, help="rmsprop")
    group.add_argument("--betas", type=float, nargs=2, metavar=("B1", "B2"),
                       help="adam, adamw")
    group.add_argument("--amsgrad", action="store_true", default=None, help="adam, adamw")
    group.add_argument("--dampening", type=float, help="sgd")
    group.add_argument("--nesterov", action="store_true", default=None, help="sgd")


def make_optimizer(parser, args, params, default_lr=None):
    """Build ``args.optim`` over ``params`` from the flags that were given.

    A flag the chosen optimizer does not take is an error rather than being
    silently ignored; ``default_lr`` maps an optimizer name to the lr this
    example uses when --lr is not given.
    """
    class_name, accepted = OPTIMIZERS[args.optim]
    given = {name: getattr(args, name) for name in
             ("lr", "momentum", "weight_decay", "alpha", "eps", "centered", "betas",
              "amsgrad", "dampening", "nesterov") if getattr(args, name) is not None}
    wrong = sorted(set(given) - set(accepted))
    if wrong:
        flags = ", ".join("--" + name.replace("_", "-") for name in wrong)
        verb = "does" if len(wrong) == 1 else "do"
        parser.error(f"{flags} {verb} not apply to --optim {args.optim}")
    if "betas" in given:
        given["betas"] = tuple(given["betas"])
    if "lr" not in given and default_lr and args.optim in default_lr:
        given["lr"] = default_lr[args.optim]
    try:
        return getattr(netcl.optim, class_name)(params, **given)
    except (TypeError, ValueError) as exc:
        parser.error(f"{class_name}: {exc}")


# -------------------------------------------------------------- checkpoints
# The one place the examples save and resume training. netcl.optim.save/load
# are not there yet; until they are, a checkpoint is an .npz holding the
# parameters, the optimizer's state_dict() (buffers as arrays, everything else
# as JSON) and the example's own counters. Swap the bodies of these two
# functions for netcl.optim.save(opt, path) / netcl.optim.load(opt, path)
# (plus the parameters) when they exist.

def save_checkpoint(path, optimizer, params, extra):
    """Write ``params``' values, ``optimizer``'s state and ``extra`` (a JSON-able dict)."""
    state_dict = optimizer.state_dict()
    arrays = {f"param.{i}": p.data.get() for i, p in enumerate(params)}
    scalars = {}
    for index, entry in state_dict["state"].items():
        for name, value in entry.items():
            if isinstance(value, np.ndarray):
                arrays[f"state.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    meta = {"param_groups": state_dict["param_groups"], "state_scalars": scalars,
            "n_params": len(params), "extra": extra}
    arrays["meta"] = np.array(json.dumps(meta, default=_json_value))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp.npz")
    np.savez(temporary, **arrays)
    os.replace(temporary, path)  # never leaves a half-written checkpoint behind
    return path


def load_checkpoint(path, optimizer, params):
    """Restore what :func:`save_checkpoint` wrote into ``params``/``optimizer``; return extra."""
    with np.load(path, allow_pickle=False) as archive:
        meta = json.loads(str(archive["meta"]))
        if meta["n_params"] != len(params):
            raise ValueError(f"{path}: holds {meta['n_params']} parameters, "
                             f"the model has {len(params)}")
        values = [archive[f"param.{i}"] for i in range(len(params))]
        for i, (p, value) in enumerate(zip(params, values)):
            if value.shape != p.shape or value.dtype != p.dtype:
                raise ValueError(f"{path}: parameter {i} is {value.dtype}{list(value.shape)}, "
                                 f"the model's is {p.dtype}{list(p.shape)}")
        state = {}
        for key in archive.files:
            if key.startswith("state."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = archive[key]
    for index, entry in meta["state_scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" and k != "param_names"
               else v for k, v in group.items()} for group in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    for p, value in zip(params, values):
        p.data.set(np.ascontiguousarray(value))
    return meta["extra"]


def _json_value(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


def to_device(queue, array, dtype=None):
    return cla.to_device(queue, np.ascontiguousarray(array, dtype=dtype))
