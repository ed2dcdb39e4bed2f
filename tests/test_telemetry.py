"""netcl.telemetry: the logger's schedule and every exporter read back through
a reader of its format (json, TensorBoard's event reader, prometheus_client's
text parser over loopback).

The exporter tests drive a stand-in optimizer whose ``stats()`` returns
synthetic dicts in the documented shape (NaN and infinity included), so what
was written can be compared with what was given; the tests at the end use a
real netcl optimizer with ``track_stats=True``.
"""

import gc
import json
import math
import subprocess
import sys
import urllib.request

import numpy as np
import pyopencl as cl
import pyopencl.array as cla
import pytest

from netcl.telemetry import (JSONLinesWriter, PrometheusExporter, Record, Telemetry,
                             TensorBoardWriter)
from netcl.telemetry._core import require

STATS_KEYS = ("grad_norm", "param_norm", "update_norm", "update_to_weight", "nonfinite",
              "zeros", "numel", "second_moment_rms", "lr_min", "lr_mean", "lr_max")


def synthetic_stats(step, rng, nonfinite=False):
    """A stats() dict of the documented shape: group 0 named, group 1 indexed."""
    def values():
        v = {k: float(rng.uniform(0.1, 2.0)) for k in STATS_KEYS}
        v["nonfinite"] = int(rng.integers(0, 3))
        v["zeros"] = int(rng.integers(0, 10))
        v["numel"] = int(rng.integers(1, 100))
        return v

    groups = {0: {"lr": 1e-3, "params": {"fc1.weight": values(), "fc1.bias": values()}},
              1: {"lr": 2e-3, "params": {0: values(), 1: values()}}}
    if nonfinite:
        groups[0]["params"]["fc1.weight"]["grad_norm"] = math.inf
        groups[1]["params"][0]["grad_norm"] = math.nan
    for group in groups.values():
        group["stats"] = values()
    return {"step": step, "skipped": nonfinite, "global": values(), "groups": groups}


class FakeOptimizer:
    """Counts stats() calls (each one a device read on a real optimizer) and
    runs step post hooks with torch's signature."""

    def __init__(self, nonfinite_at=()):
        self.rng = np.random.default_rng(0)
        self.steps = 0
        self.nonfinite_at = set(nonfinite_at)
        self.returned = []
        self.hooks = {}

    def stats(self):
        s = synthetic_stats(self.steps, self.rng, self.steps in self.nonfinite_at)
        self.returned.append(s)
        return s

    def step(self):
        self.steps += 1
        for hook in list(self.hooks.values()):
            hook(self, (), {})

    def register_step_post_hook(self, hook):
        key = object()
        self.hooks[key] = hook
        owner = self

        class Handle:
            def remove(self):
                owner.hooks.pop(key, None)
        return Handle()


class ListWriter:
    def __init__(self):
        self.records, self.closed = [], False

    def write(self, record):
        self.records.append(record)

    def close(self):
        self.closed = True


# ------------------------------------------------------------------ logger

def test_reads_stats_and_scalars_only_on_written_steps():
    opt, out = FakeOptimizer(), ListWriter()
    reads = []

    def loss_scale():
        reads.append(1)
        return 1024.0

    t = Telemetry(opt, [out], every=5, scalars={"loss_scale": loss_scale})
    lazily = []
    for i in range(12):
        opt.step()
        record = t.log(loss=lambda i=i: lazily.append(i) or 0.5 * i)
        assert (record is None) == ((i + 1) % 5 != 0)
    assert len(opt.returned) == 2 and len(reads) == 2 and lazily == [4, 9]
    assert [r.step for r in out.records] == [5, 10]
    assert out.records[1].scalars == {"loss_scale": 1024.0, "loss": 4.5}
    assert out.records[1].stats is opt.returned[1]


def test_explicit_step_decides_what_is_written():
    opt, out = FakeOptimizer(), ListWriter()
    t = Telemetry(opt, [out], every=100)
    written = [s for s in range(0, 350, 50) if t.log(step=s) is not None]
    assert written == [0, 100, 200, 300] and len(opt.returned) == 4


def test_step_post_hook_drives_the_logger_until_detached():
    opt, out = FakeOptimizer(), ListWriter()
    t = Telemetry(opt, [out], every=2, scalars={"loss": lambda: 3.0}, attach=True)
    for _ in range(4):
        opt.step()
    assert [r.step for r in out.records] == [2, 4]
    assert out.records[0].optimizer_step == 2 and out.records[0].scalars == {"loss": 3.0}
    t.close()
    assert not opt.hooks and out.closed
    opt.step()
    assert len(out.records) == 2


def test_attach_without_hooks_names_the_way_out():
    class NoHooks:
        def stats(self):
            raise AssertionError("not read")

    with pytest.raises(TypeError, match="register_step_post_hook.*log"):
        Telemetry(NoHooks(), [ListWriter()], attach=True)


def test_scalars_from_arrays(ctx_factory):
    queue = cl.CommandQueue(ctx_factory())
    t = Telemetry(FakeOptimizer(), [ListWriter()])
    record = t.log(loss=cla.to_device(queue, np.array([2.5], np.float32)),
                   n=np.int64(7), x=np.float32(0.25))
    assert record.scalars == {"loss": 2.5, "n": 7.0, "x": 0.25}
    torch = pytest.importorskip("torch")
    assert t.log(loss=torch.tensor(1.5)).scalars == {"loss": 1.5}


@pytest.mark.parametrize("kwargs, error, match", [
    ({"every": 0}, ValueError, "every"),
    ({"every": 2.0}, ValueError, "every"),
    ({"scalars": {"grad_norm": lambda: 1.0}}, ValueError, "grad_norm"),
    ({"scalars": {"loss": 1.0}}, TypeError, "loss"),
])
def test_bad_arguments_name_the_culprit(kwargs, error, match):
    with pytest.raises(error, match=match):
        Telemetry(FakeOptimizer(), [ListWriter()], **kwargs)


def test_bad_writers_and_scalars():
    with pytest.raises(ValueError, match="writers"):
        Telemetry(FakeOptimizer(), [])
    with pytest.raises(TypeError, match="write"):
        Telemetry(FakeOptimizer(), [object()])
    with pytest.raises(TypeError, match="stats"):
        Telemetry(object(), [ListWriter()])
    opt = FakeOptimizer()
    t = Telemetry(opt, [ListWriter()])
    with pytest.raises(ValueError, match="'loss'.*3"):
        t.log(loss=np.ones(3))
    with pytest.raises(ValueError, match="'loss'"):
        t.log(loss="high")
    with pytest.raises(ValueError, match="'skipped'"):
        t.log(skipped=1.0)
    assert t.calls == 0 and not opt.returned  # a rejected call counts nothing


def test_missing_dependency_names_the_extra(monkeypatch, tmp_path):
    with pytest.raises(ImportError, match=r"netcl\[nope\]"):
        require("netcl_no_such_module", "nope")
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # importing it now fails
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ImportError, match=r"netcl\[tensorboard\]"):
        TensorBoardWriter(tmp_path)
    with pytest.raises(ImportError, match=r"netcl\[prometheus\]"):
        PrometheusExporter(0)


def test_core_imports_without_any_exporter_dependency():
    blocked = ["tensorboardX", "tensorboard", "prometheus_client", "tqdm"]
    code = ("import sys\n"
            f"for name in {blocked!r}: sys.modules[name] = None\n"
            "import netcl.telemetry, netcl.optim, netcl.bench\n"
            "assert not any(sys.modules.get(n) for n in " + repr(blocked) + ")\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def all_values(stats):
    """(scope, key, value) of every aggregate, and ((group, param), key, value)."""
    out = [("global", k, v) for k, v in stats["global"].items()]
    for g, group in stats["groups"].items():
        out.append((g, "lr", group["lr"]))
        out += [(g, k, v) for k, v in group["stats"].items()]
        for name, values in group["params"].items():
            out += [((g, name), k, v) for k, v in values.items()]
    return out


def same(a, b, rel=0.0):
    return (math.isnan(a) and math.isnan(b)) or a == b or abs(a - b) <= rel * abs(b)


# ------------------------------------------------------------------ JSON lines

def test_json_lines_round_trip(tmp_path):
    path = tmp_path / "run" / "stats.jsonl"
    opt = FakeOptimizer(nonfinite_at={2})
    with Telemetry(opt, [JSONLinesWriter(path)]) as t:
        for _ in range(3):
            opt.step()
            t.log(loss=0.25)

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    lines = [json.loads(line, parse_constant=no_constants)
             for line in path.read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    for line, stats in zip(lines, opt.returned):
        assert line["optimizer_step"] == stats["step"]
        assert line["skipped"] is stats["skipped"]
        assert line["scalars"] == {"loss": 0.25}
        for scope, key, value in all_values(stats):
            if scope == "global":
                got = line["global"][key]
            elif isinstance(scope, tuple):
                got = line["groups"][str(scope[0])]["params"][str(scope[1])][key]
            elif key == "lr":
                got = line["groups"][str(scope)]["lr"]
            else:
                got = line["groups"][str(scope)]["stats"][key]
            assert same(float(got), value), (scope, key)
            assert type(got) is type(value) or isinstance(got, str)
    assert lines[1]["groups"]["0"]["params"]["fc1.weight"]["grad_norm"] == "Infinity"
    assert lines[1]["groups"]["1"]["params"]["0"]["grad_norm"] == "NaN"

    # Appends, and per_param=False leaves the per-parameter entries out.
    with Telemetry(opt, [JSONLinesWriter(path, per_param=False)]) as t:
        t.log(step=9)
    last = json.loads(path.read_text().splitlines()[-1])
    assert len(path.read_text().splitlines()) == 4 and last["step"] == 9
    assert "params" not in last["groups"]["0"] and "grad_norm" in last["groups"]["0"]["stats"]


# ------------------------------------------------------------------ TensorBoard

def test_tensorboard_event_files_read_back(tmp_path):
    pytest.importorskip("tensorboardX")
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator")
    opt = FakeOptimizer(nonfinite_at={2})
    writer = TensorBoardWriter(tmp_path, param_scalars=True)
    with Telemetry(opt, [writer]) as t:
        for _ in range(3):
            opt.step()
            t.log(loss=0.5, loss_scale=65536.0)

    acc = event_accumulator.EventAccumulator(
        str(tmp_path), size_guidance={event_accumulator.SCALARS: 0,
                                      event_accumulator.HISTOGRAMS: 0})
    acc.Reload()
    tags = acc.Tags()

    def scalar(tag, step):
        events = [e for e in acc.Scalars(tag) if e.step == step]
        assert len(events) == 1, tag
        return events[0].value

    for step, stats in enumerate(opt.returned, start=1):
        for scope, key, value in all_values(stats):
            if scope == "global":
                tag = f"global/{key}"
            elif isinstance(scope, tuple):
                g, name = scope
                tag = f"param/{name if isinstance(name, str) else f'g{g}.{name}'}/{key}"
            else:
                tag = f"group{scope}/{key}"
            assert same(scalar(tag, step), value, rel=1e-6), tag  # stored as float32
        assert scalar("skipped", step) == float(stats["skipped"])
        assert scalar("loss", step) == 0.5 and scalar("loss_scale", step) == 65536.0

        for key in STATS_KEYS:
            finite = [values[key] for g in stats["groups"].values()
                      for values in g["params"].values() if math.isfinite(values[key])]
            histogram = [e for e in acc.Histograms(f"params/{key}") if e.step == step]
            assert len(histogram) == 1, key
            h = histogram[0].histogram_value
            assert h.num == len(finite) and sum(h.bucket) == len(finite)
            assert same(h.min, min(finite), 1e-12) and same(h.max, max(finite), 1e-12)
            assert same(h.sum, sum(finite), 1e-9)
    assert "params/grad_norm" in tags["histograms"]


# ------------------------------------------------------------------ Prometheus

def scrape(exporter):
    parser = pytest.importorskip("prometheus_client.parser")
    assert exporter.url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(exporter.url, timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in parser.text_string_to_metric_families(text) for s in family.samples}


def test_prometheus_gauges_scraped_over_loopback():
    pytest.importorskip("prometheus_client")
    opt = FakeOptimizer(nonfinite_at={2})
    exporter = PrometheusExporter(0, per_param=True)
    try:
        t = Telemetry(opt, [exporter])
        for step in (1, 2):
            opt.step()
            record = t.log(loss=0.75)
            stats, samples = opt.returned[-1], scrape(exporter)
            for scope, key, value in all_values(stats):
                if scope == "global":
                    name, labels = f"netcl_{key}", (("group", "all"),)
                elif isinstance(scope, tuple):
                    name = f"netcl_param_{key}"
                    labels = (("group", str(scope[0])), ("param", str(scope[1])))
                else:
                    name, labels = f"netcl_{key}", (("group", str(scope)),)
                assert same(samples[name, labels], value), (name, labels)
            assert samples["netcl_step", ()] == step
            assert samples["netcl_optimizer_step", ()] == stats["step"]
            assert samples["netcl_skipped", ()] == float(stats["skipped"])
            assert samples["netcl_loss", ()] == 0.75
            assert samples["netcl_last_write_time_seconds", ()] == record.time
    finally:
        exporter.close()
    with pytest.raises(OSError):  # the port is closed again
        urllib.request.urlopen(exporter.url, timeout=2)


def test_prometheus_scalar_taking_a_statistic_name():
    pytest.importorskip("prometheus_client")
    exporter = PrometheusExporter(0, per_param=True)
    try:
        t = Telemetry(FakeOptimizer(), [exporter])
        t.log()
        with pytest.raises(ValueError, match="param_grad_norm"):
            t.log(param_grad_norm=1.0)
    finally:
        exporter.close()


def test_record_lists_aggregates_then_parameters():
    stats = synthetic_stats(3, np.random.default_rng(1))
    record = Record(7, stats, {}, wall_time=0.0)
    assert record.step == 7 and record.optimizer_step == 3 and not record.skipped
    expected = [v for v in all_values(stats) if not isinstance(v[0], tuple)]
    got = list(record.aggregates())
    assert sorted(map(repr, got)) == sorted(map(repr, expected))
    assert [(g, n) for g, n, _ in record.parameters()] == [
        (0, "fc1.weight"), (0, "fc1.bias"), (1, 0), (1, 1)]


# ------------------------------------------------------------------ a real optimizer

def real_adam(ctx_factory, every, writers):
    from netcl import Parameter
    from netcl.optim import Adam

    queue = cl.CommandQueue(ctx_factory())
    rng = np.random.default_rng(3)
    host = {"w": rng.standard_normal((6, 5)).astype(np.float32),
            "b": rng.standard_normal(5).astype(np.float32)}
    params = {k: Parameter(cla.to_device(queue, v)) for k, v in host.items()}
    opt = Adam(list(params.items()), lr=1e-2, track_stats=True)
    telemetry = Telemetry(opt, writers, every=every)
    grads = []

    def set_grads():
        g = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in host.items()}
        for k, p in params.items():
            p.grad = cla.to_device(queue, g[k])
        grads.append(g)

    return queue, opt, telemetry, set_grads, grads


def test_real_optimizer_through_the_step_post_hook(ctx_factory, tmp_path):
    path = tmp_path / "stats.jsonl"
    queue, opt, telemetry, set_grads, grads = real_adam(ctx_factory, 2, [JSONLinesWriter(path)])
    telemetry.attach()
    for _ in range(4):
        set_grads()
        opt.step()
    telemetry.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4]
    assert [line["optimizer_step"] for line in lines] == [2, 4]
    for line, g in zip(lines, (grads[1], grads[3])):
        # float64 oracle: the global norm of the gradients the step read
        expected = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in g.values()))
        assert line["global"]["grad_norm"] == pytest.approx(expected, rel=1e-5)
        assert line["global"]["numel"] == 35 and line["skipped"] is False
        params = line["groups"]["0"]["params"]
        assert set(params) == {"w", "b"}
        assert params["w"]["grad_norm"] == pytest.approx(float(np.linalg.norm(
            g["w"].astype(np.float64))), rel=1e-5)


def test_unwritten_steps_never_wait_for_the_device(ctx_factory):
    out = ListWriter()
    queue, opt, telemetry, set_grads, _ = real_adam(ctx_factory, 3, [out])
    loss = cla.to_device(queue, np.array([0.5], np.float32))
    set_grads()
    opt.step()
    telemetry.log(loss=loss)  # step 1: builds everything, writes nothing
    queue.finish()

    def forbidden(*args, **kwargs):
        raise AssertionError("a host sync")

    # Garbage left by earlier tests must not be collected while the sync
    # methods raise: a finaliser that waits would then abort the process.
    gc.collect()
    gc.disable()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cla.Array, "get", forbidden)
            mp.setattr(cla.Array, "get_async", forbidden)
            mp.setattr(cl, "wait_for_events", forbidden)
            mp.setattr(cl.Event, "wait", forbidden, raising=False)
            mp.setattr(cl.CommandQueue, "finish", forbidden, raising=False)
            set_grads()
            opt.step()
            assert telemetry.log(loss=loss) is None  # step 2
    finally:
        gc.enable()
    set_grads()
    opt.step()
    record = telemetry.log(loss=loss)  # step 3: written
    assert [r.step for r in out.records] == [3] and record.scalars == {"loss": 0.5}
    assert record.optimizer_step == 3
