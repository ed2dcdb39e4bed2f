"""Helpers shared by the examples: paths, a progress bar (tqdm), optimizer flags,
checkpoints and matplotlib setup. Only NumPy, pyopencl, netcl and tqdm here."""

import argparse
import hashlib
import inspect
import json
from pathlib import Path

import numpy as np
import pyopencl.array as cla

import netcl.optim
from netcl.optim import families
from netcl.optim.checkpoint_file import CheckpointError, read_tensors, write_tensors

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
    """A tqdm progress bar on stderr with the latest values (``update(loss=...)``)
    after it; none when disabled or when tqdm (the ``examples`` extra) is missing."""

    def __init__(self, total, label="", enabled=True):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=max(1, total), desc=label, mininterval=0.1, dynamic_ncols=True)

    def update(self, n=1, **info):
        if self.bar is not None:
            if info:
                self.bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v
                                      for k, v in info.items()}, refresh=False)
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------- optimizers
# The torch.optim hyperparameters the examples take on the command line; each
# optimizer accepts those its constructor has.
CLI_HYPERPARAMETERS = ("lr", "momentum", "weight_decay", "alpha", "eps", "centered", "betas",
                       "amsgrad", "dampening", "nesterov")


def _optimizers():
    """--optim name -> (netcl.optim class name, the CLI hyperparameters it takes)."""
    out = {}
    for name, cls in families().items():
        taken = inspect.signature(cls.__init__).parameters
        out[name.lower()] = (name, tuple(p for p in CLI_HYPERPARAMETERS if p in taken))
    return out


OPTIMIZERS = _optimizers()


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
    group.add_argument("--nesterov", action="store_true", default=None, help="rmsprop, sgd")


def make_optimizer(parser, args, params, default_lr=None, distributed=False,
                   **engine_options):
    """Build ``args.optim`` over ``params`` from the flags that were given.

    A flag the chosen optimizer does not take is an error rather than being
    silently ignored; ``default_lr`` maps an optimizer name to the lr this
    example uses when --lr is not given. ``distributed``: True wraps it in
    :class:`netcl.distributed.DistributedOptimizer`, ``"zero"`` builds a
    :class:`netcl.distributed.ZeroRedundancyOptimizer` of it (run under mpiexec).
    ``engine_options`` (``track_stats``, ``skip_nonfinite``, ``max_grad_norm``)
    go to the constructor as they are.
    """
    class_name, accepted = OPTIMIZERS[args.optim]
    given = {name: getattr(args, name) for name in CLI_HYPERPARAMETERS
             if getattr(args, name) is not None}
    wrong = sorted(set(given) - set(accepted))
    if wrong:
        flags = ", ".join("--" + name.replace("_", "-") for name in wrong)
        verb = "does" if len(wrong) == 1 else "do"
        parser.error(f"{flags} {verb} not apply to --optim {args.optim}")
    if "betas" in given:
        given["betas"] = tuple(given["betas"])
    if "lr" not in given and default_lr and args.optim in default_lr:
        given["lr"] = default_lr[args.optim]
    given.update(engine_options)
    optimizer_class = getattr(netcl.optim, class_name)
    if distributed:
        try:
            import netcl.distributed as dist
        except ImportError as exc:
            parser.error(str(exc))
    try:
        if distributed == "zero":
            return dist.ZeroRedundancyOptimizer(params, optimizer_class, **given)
        optimizer = optimizer_class(params, **given)
        return dist.DistributedOptimizer(optimizer) if distributed else optimizer
    except (TypeError, ValueError) as exc:
        parser.error(f"{class_name}: {exc}")


# -------------------------------------------------------------- checkpoints
# The one place the examples save and resume training. A checkpoint is two
# safetensors files: PATH holds the optimizer (netcl.optim.save: state, step
# counts, hyperparameters) and <stem>.params<suffix> beside it the parameter
# values and the example's own counters. The optimizer file is written first
# and the parameter file records its SHA-256, so a pair torn apart by a crash
# between the two writes is refused rather than resumed from mismatched halves.
# LR schedulers go into the optimizer file (netcl.optim.save's schedulers=);
# netcl.distributed's consolidated checkpoint has no place for them, so there
# their state dicts travel in ``extra`` under "schedulers".

def params_path(path):
    """Where :func:`save_checkpoint` puts the parameters that go with ``path``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.params{path.suffix}")


def save_checkpoint(path, optimizer, params, extra, schedulers=()):
    """Write ``optimizer``'s state, its LR ``schedulers``, ``params``' values and
    ``extra`` (a JSON-able dict)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    schedulers = list(schedulers)
    if hasattr(optimizer, "world_size"):  # netcl.distributed: collective, rank 0 writes
        optimizer.save(path)
        if optimizer.rank != 0:
            return path  # the parameters are the same on every rank
        if schedulers:
            extra = dict(extra, schedulers=[s.state_dict() for s in schedulers])
    else:
        netcl.optim.save(optimizer, path, schedulers=schedulers or None)
    tensors = {f"param.{i}": p.data.get() for i, p in enumerate(params)}
    write_tensors(params_path(path), tensors,
                  {"optimizer_sha256": _sha256(path),
                   "extra": json.dumps(extra, default=_json_value)})
    return path


def checkpoint_extra(path):
    """The ``extra`` dict :func:`save_checkpoint` stored with ``path``."""
    return json.loads(read_tensors(params_path(path))[1]["extra"])


def load_checkpoint(path, optimizer, params, schedulers=()):
    """Restore what :func:`save_checkpoint` wrote into ``params``/``optimizer``
    and its LR ``schedulers`` (built as for the saved run); return extra.

    Everything is checked before the optimizer or a parameter changes (under
    netcl.distributed, the schedulers' states are checked after the optimizer's).
    """
    path = Path(path)
    schedulers = list(schedulers)
    tensors, metadata = read_tensors(params_path(path))
    if metadata.get("optimizer_sha256") != _sha256(path):
        raise CheckpointError(f"{path} and {params_path(path)} are not from the same save "
                              "(was a save interrupted between the two files?)")
    if len(tensors) != len(params):
        raise ValueError(f"{params_path(path)}: holds {len(tensors)} parameters, "
                         f"the model has {len(params)}")
    values = [tensors.get(f"param.{i}") for i in range(len(params))]
    for i, (p, value) in enumerate(zip(params, values)):
        if value is None or value.shape != p.shape or value.dtype != p.dtype:
            found = "nothing" if value is None else f"{value.dtype}{list(value.shape)}"
            raise ValueError(f"{params_path(path)}: parameter {i} is {found}, "
                             f"the model's is {p.dtype}{list(p.shape)}")
    extra = json.loads(metadata["extra"])
    # Checks the optimizer file before changing anything (collective when distributed).
    if hasattr(optimizer, "world_size"):
        saved = extra.pop("schedulers", [])
        if len(saved) != len(schedulers):
            raise ValueError(f"{path}: holds {len(saved)} LR schedulers, this run has "
                             f"{len(schedulers)}")
        optimizer.load(path)
        for scheduler, state in zip(schedulers, saved):
            scheduler.load_state_dict(state)
    else:
        netcl.optim.load(optimizer, path, schedulers=schedulers or None)
    for p, value in zip(params, values):
        p.data.set(value)
    return extra


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _json_value(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


def to_device(queue, array, dtype=None):
    return cla.to_device(queue, np.ascontiguousarray(array, dtype=dtype))
