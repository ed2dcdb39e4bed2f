"""TensorBoard event files through tensorboardX (``pip install 'netcl[tensorboard]'``)."""

import math

import numpy as np

from ._core import require


def scope_tag(scope):
    """``"global"`` or ``"group0"``, ``"group1"``, …: the tag prefix of an aggregate."""
    return scope if scope == "global" else f"group{scope}"


class TensorBoardWriter:
    """Writes each record to a TensorBoard log directory.

    Scalars (tag: meaning):

    * ``global/KEY``: the aggregate over every parameter;
    * ``groupN/KEY`` and ``groupN/lr``: the aggregate over group N, its lr;
    * ``skipped``: 1 when the step was skipped (non-finite gradient), else 0;
    * each extra scalar under its own name (``loss``, ``loss_scale``, …);
    * with ``param_scalars=True`` also ``param/NAME/KEY`` for every parameter
      (NAME is ``gG.KEY`` where the group was built without names).

    Histograms (``histograms=True``): ``params/KEY``, the distribution of each
    statistic across parameters — per-layer gradient norms, update-to-weight
    ratios, effective learning rates. Non-finite values are left out of a
    histogram (``nonfinite`` counts them); a histogram with no finite value is
    not written.

    The event files are written by tensorboardX's background thread, flushed
    every ``flush_secs`` and on :meth:`close`.
    """

    def __init__(self, logdir, *, histograms=True, param_scalars=False, flush_secs=30):
        tensorboardX = require("tensorboardX", "tensorboard")
        self.logdir = str(logdir)
        self.histograms = histograms
        self.param_scalars = param_scalars
        self.writer = tensorboardX.SummaryWriter(logdir=self.logdir, flush_secs=flush_secs)

    def write(self, record):
        step, wall = record.step, record.time
        add = self.writer.add_scalar
        for scope, key, value in record.aggregates():
            add(f"{scope_tag(scope)}/{key}", value, step, walltime=wall)
        add("skipped", float(record.skipped), step, walltime=wall)
        for name, value in record.scalars.items():
            add(name, value, step, walltime=wall)
        across = {}
        for index, name, values in record.parameters():
            label = name if isinstance(name, str) else f"g{index}.{name}"
            for key, value in values.items():
                across.setdefault(key, []).append(value)
                if self.param_scalars:
                    add(f"param/{label}/{key}", value, step, walltime=wall)
        if self.histograms:
            for key, values in across.items():
                finite = np.array([v for v in values if math.isfinite(v)], dtype=np.float64)
                if finite.size:
                    self.writer.add_histogram(f"params/{key}", finite, step, walltime=wall)

    def flush(self):
        self.writer.flush()

    def close(self):
        self.writer.close()
