"""The logger shared by every exporter: when to read ``optimizer.stats()``,
what one written record holds, and the names of the statistics.

Nothing here imports an exporter's dependency.
"""

import importlib
import time

import numpy as np
import pyopencl.array as cla

#: Every statistic ``optimizer.stats()`` can report, with the one-line meaning
#: the exporters attach (TensorBoard descriptions, Prometheus help text).
#: wiki/Telemetry.md has the formulas, costs and runbook symptoms.
STAT_DESCRIPTIONS = {
    "grad_norm": "L2 norm of the gradient",
    "param_norm": "L2 norm of the parameters before the update",
    "update_norm": "L2 norm of the update applied to the parameters",
    "update_to_weight": "update_norm / param_norm",
    "nonfinite": "count of NaN or infinite gradient elements",
    "zeros": "count of exactly-zero gradient elements",
    "numel": "count of parameter elements",
    "second_moment_rms": "root mean square of the second-moment state",
    "lr_min": "smallest effective learning rate (the factor multiplying the gradient "
              "or first moment)",
    "lr_mean": "mean effective learning rate, weighted by element count",
    "lr_max": "largest effective learning rate",
    "momentum_norm": "L2 norm of the momentum buffer",
}

#: Names an extra scalar may not take: they would collide with a statistic or
#: with what every record carries.
RESERVED_NAMES = frozenset(STAT_DESCRIPTIONS) | {"step", "optimizer_step", "skipped", "lr",
                                                "time"}


def require(module, extra):
    """Import an exporter's optional dependency, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{module} is not installed: pip install 'netcl[{extra}]' "
                          f"(or pip install {module.replace('_', '-')})") from error


def to_float(name, value):
    """One Python float from a number, a one-element array (pyopencl, NumPy,
    torch) or a zero-argument callable returning one. Reading a device array
    waits for the device, so this runs only for records that are written."""
    if callable(value):
        value = value()
    if isinstance(value, cla.Array):
        value = value.get()
    elif hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"scalar {name!r}: {type(value).__name__} is not a number") from error
    if array.size != 1:
        raise ValueError(f"scalar {name!r} must hold one value, not {array.size}")
    return float(array.reshape(-1)[0])


class Record:
    """One written entry: the optimizer's ``stats()`` plus the extra scalars.

    ``step`` is the logger's step (the x axis of every exporter);
    ``optimizer_step`` the optimizer's own count of tracked steps.
    """

    __slots__ = ("step", "time", "stats", "scalars")

    def __init__(self, step, stats, scalars, wall_time=None):
        self.step = step
        self.time = time.time() if wall_time is None else wall_time
        self.stats = stats
        self.scalars = scalars

    @property
    def optimizer_step(self):
        return self.stats["step"]

    @property
    def skipped(self):
        return bool(self.stats["skipped"])

    def aggregates(self):
        """``(scope, key, value)`` for the global and per-group aggregates and
        each group's ``lr``; scope is ``"global"`` or the group index."""
        for key, value in self.stats["global"].items():
            yield "global", key, value
        for index, group in self.stats["groups"].items():
            yield index, "lr", group["lr"]
            for key, value in group["stats"].items():
                yield index, key, value

    def parameters(self):
        """``(group_index, parameter_key, {KEY: value})`` for every parameter."""
        for index, group in self.stats["groups"].items():
            for key, values in group["params"].items():
                yield index, key, values

    def __repr__(self):
        return (f"Record(step={self.step}, optimizer_step={self.optimizer_step}, "
                f"skipped={self.skipped}, scalars={self.scalars})")


class Telemetry:
    """Writes ``optimizer.stats()`` and extra scalars to exporters every ``every`` steps.

    ``writers``: objects with ``write(record)`` and ``close()``
    (:class:`JSONLinesWriter`, :class:`TensorBoardWriter`,
    :class:`PrometheusExporter`, or your own) receiving a :class:`Record`.

    Two ways to drive it:

    * ``telemetry.log(loss=loss)`` after each ``optimizer.step()`` (or with an
      explicit ``step=``);
    * ``telemetry.attach()``: ``log()`` runs from the optimizer's step post hook
      (``register_step_post_hook``), with the extra scalars taken from the
      constructor's ``scalars`` mapping of names to zero-argument callables,
      e.g. ``{"loss_scale": scaler.get_scale}``.

    Cost: a step that is not written costs a counter increment — no
    ``stats()`` call, no extra scalar read, no device wait. A written step
    calls ``optimizer.stats()`` once (one host read of the statistics) and
    reads each extra scalar once (a pyopencl array's ``get()`` waits for the
    device).

    The logger's step counts ``log()`` calls from 1 unless ``step=`` is given;
    a record is written when ``step % every == 0``.
    """

    def __init__(self, optimizer, writers, *, every=1, scalars=None, attach=False):
        if not hasattr(optimizer, "stats"):
            raise TypeError(f"{type(optimizer).__name__} has no stats(): telemetry needs a "
                            "netcl optimizer created with track_stats=True")
        writers = list(writers)
        if not writers:
            raise ValueError("writers must name at least one exporter")
        for writer in writers:
            if not (callable(getattr(writer, "write", None))
                    and callable(getattr(writer, "close", None))):
                raise TypeError(f"writer {writer!r} needs write(record) and close() methods")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        scalars = dict(scalars or {})
        for name, source in scalars.items():
            self._check_name(name)
            if not callable(source):
                raise TypeError(f"scalars[{name!r}] must be a zero-argument callable, "
                                f"got {type(source).__name__}")
        self.optimizer = optimizer
        self.writers = writers
        self.every = every
        self.scalars = scalars
        self.calls = 0
        self._handle = None
        if attach:
            self.attach()

    @staticmethod
    def _check_name(name):
        if not isinstance(name, str) or not name:
            raise ValueError(f"scalar name {name!r} must be a non-empty str")
        if name in RESERVED_NAMES:
            raise ValueError(f"scalar name {name!r} is taken by the optimizer's statistics; "
                             f"reserved: {sorted(RESERVED_NAMES)}")

    def log(self, step=None, **scalars):
        """Count one step; on a written step read everything and write it.

        Returns the written :class:`Record`, or ``None`` when this step is not
        written (then nothing was read: ``scalars`` values may be device
        arrays or callables, converted only when written).
        """
        for name in scalars:
            self._check_name(name)
        calls = self.calls + 1
        if step is None:
            step = calls
        elif isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        step = int(step)
        if step % self.every:
            self.calls = calls
            return None
        values = {name: to_float(name, source) for name, source in self.scalars.items()}
        values.update((name, to_float(name, value)) for name, value in scalars.items())
        record = Record(step, self.optimizer.stats(), values)
        self.calls = calls  # counted once everything was read: a rejected call counts nothing
        for writer in self.writers:
            writer.write(record)
        return record

    def attach(self):
        """Call :meth:`log` after every ``optimizer.step()`` through the step post hook."""
        if self._handle is not None:
            return self
        register = getattr(self.optimizer, "register_step_post_hook", None)
        if register is None:
            raise TypeError(f"{type(self.optimizer).__name__} has no register_step_post_hook: "
                            "call Telemetry.log() after each step instead")
        self._handle = register(self._after_step)
        return self

    def detach(self):
        """Stop logging from the step post hook."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _after_step(self, optimizer, args, kwargs):
        self.log()

    def close(self):
        """Detach and close every writer."""
        self.detach()
        for writer in self.writers:
            writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

