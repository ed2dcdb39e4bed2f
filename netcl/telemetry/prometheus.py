"""A Prometheus scrape endpoint (``pip install 'netcl[prometheus]'``)."""

import re

from ._core import STAT_DESCRIPTIONS, require

_INVALID = re.compile(r"[^a-zA-Z0-9_]")


def metric_name(namespace, name):
    """``namespace_name`` with every character Prometheus does not allow as ``_``."""
    name = f"{namespace}_{name}" if namespace else name
    name = _INVALID.sub("_", name)
    return "_" + name if name[0].isdigit() else name


class PrometheusExporter:
    """Serves the latest record as Prometheus gauges on ``http://addr:port/metrics``.

    Gauges (with the default ``namespace="netcl"``):

    * ``netcl_KEY{group="all"}`` for the global aggregates and
      ``netcl_KEY{group="N"}`` for group N's; ``netcl_lr{group="N"}``;
    * ``netcl_step`` (the logger's step), ``netcl_optimizer_step``,
      ``netcl_skipped`` (1 when the last written step was skipped),
      ``netcl_last_write_time_seconds`` (Unix time of the last write: alert
      when it goes stale);
    * ``netcl_NAME`` for each extra scalar (``netcl_loss``, ``netcl_loss_scale``);
    * with ``per_param=True`` also ``netcl_param_KEY{group="N",param="NAME"}``
      for every parameter (one series per parameter and statistic: mind the
      cardinality on large models).

    The server runs in a daemon thread of this process and binds ``addr``
    (loopback by default: pass ``addr="0.0.0.0"`` for a scraper on another
    machine). ``port=0`` picks a free port, then :attr:`port` says which.
    Metrics live in this exporter's own registry, so several exporters (or a
    process that already uses prometheus_client) do not collide.
    """

    def __init__(self, port, addr="127.0.0.1", *, per_param=False, namespace="netcl"):
        prometheus_client = require("prometheus_client", "prometheus")
        self._client = prometheus_client
        self.namespace = namespace
        self.per_param = per_param
        self.registry = prometheus_client.CollectorRegistry()
        self._gauges = {}
        self._server, self._thread = prometheus_client.start_http_server(
            port, addr=addr, registry=self.registry)
        self.addr = addr
        self.port = self._server.server_port

    @property
    def url(self):
        return f"http://{self.addr}:{self.port}/metrics"

    def _gauge(self, name, documentation, labels=(), kind="stat"):
        gauge = self._gauges.get((kind, name))
        if gauge is None:
            gauge = self._client.Gauge(metric_name(self.namespace, name), documentation,
                                       labelnames=labels, registry=self.registry)
            self._gauges[kind, name] = gauge
        return gauge

    def write(self, record):
        for scope, key, value in record.aggregates():
            documentation = STAT_DESCRIPTIONS.get(key, "learning rate of the group")
            group = "all" if scope == "global" else str(scope)
            self._gauge(key, documentation, ("group",)).labels(group=group).set(value)
        if self.per_param:
            for index, name, values in record.parameters():
                for key, value in values.items():
                    self._gauge(f"param_{key}", f"per parameter: {STAT_DESCRIPTIONS.get(key, key)}",
                                ("group", "param")).labels(group=str(index),
                                                           param=str(name)).set(value)
        self._gauge("step", "the telemetry logger's step").set(record.step)
        self._gauge("optimizer_step", "tracked optimizer steps").set(record.optimizer_step)
        self._gauge("skipped", "1 when the last written step was skipped "
                    "(non-finite gradient)").set(float(record.skipped))
        self._gauge("last_write_time_seconds", "Unix time of the last written "
                    "record").set(record.time)
        for name, value in record.scalars.items():
            try:
                gauge = self._gauge(name, f"extra scalar {name}", kind="scalar")
            except ValueError as error:  # the registry refuses a taken metric name
                raise ValueError(f"scalar {name!r}: its metric name "
                                 f"{metric_name(self.namespace, name)!r} is taken") from error
            gauge.set(value)

    def close(self):
        """Stop serving (the port is free again)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = None
