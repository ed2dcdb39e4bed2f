"""Training telemetry: the optimizer's in-step statistics to dashboards.

``Telemetry(optimizer, writers, every=N)`` reads ``optimizer.stats()`` (an
optimizer created with ``track_stats=True``) every N steps and hands one
:class:`Record` to each writer:

* :class:`JSONLinesWriter` — one JSON object per line, no dependency;
* :class:`TensorBoardWriter` — scalars and histograms (``netcl[tensorboard]``);
* :class:`PrometheusExporter` — gauges on a local scrape port (``netcl[prometheus]``).

Each exporter imports its dependency only when constructed; a missing one
raises ImportError naming the extra. See wiki/Telemetry.md.
"""

from ._core import STAT_DESCRIPTIONS, Record, Telemetry
from .jsonl import JSONLinesWriter
from .prometheus import PrometheusExporter
from .tensorboard import TensorBoardWriter

__all__ = ["Telemetry", "Record", "JSONLinesWriter", "TensorBoardWriter",
           "PrometheusExporter", "STAT_DESCRIPTIONS"]
