"""Tests of the benchmark CLI: its workload shape data and one --quick run."""

import json
import math

import pytest

from netcl import bench


def _opencl_device_available():
    try:
        import pyopencl as cl
        return any(p.get_devices() for p in cl.get_platforms())
    except Exception:
        return False


def _netcl_optim_importable():
    try:
        import netcl
        from netcl.optim import SGD, Adam, AdamW, RMSProp  # noqa: F401
        netcl.default_queue()
        return True
    except Exception:
        return False


requires_opencl = pytest.mark.skipif(not _opencl_device_available(),
                                     reason="no OpenCL device")


# ---------------------------------------------------------------------------
# ResNet-50 written by hand from torch.nn, as torchvision defines it
# ---------------------------------------------------------------------------

def _torch_resnet50():
    nn = pytest.importorskip("torch").nn

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, inplanes, planes, stride=1, downsample=None):
            super().__init__()
            width = planes
            self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes * self.expansion)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = downsample

    class ResNet(nn.Module):
        def __init__(self, layers=(3, 4, 6, 3), num_classes=1000):
            super().__init__()
            self.inplanes = 64
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
            self.layer1 = self._make_layer(64, layers[0])
            self.layer2 = self._make_layer(128, layers[1], stride=2)
            self.layer3 = self._make_layer(256, layers[2], stride=2)
            self.layer4 = self._make_layer(512, layers[3], stride=2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)

        def _make_layer(self, planes, blocks, stride=1):
            downsample = None
            if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
                downsample = nn.Sequential(
                    nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1,
                              stride=stride, bias=False),
                    nn.BatchNorm2d(planes * Bottleneck.expansion))
            layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
            self.inplanes = planes * Bottleneck.expansion
            layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
            return nn.Sequential(*layers)

    return ResNet()


def test_resnet50_shapes_count():
    assert len(bench.RESNET50_SHAPES) == bench.RESNET50_TENSORS == 161
    assert bench.count_floats(bench.RESNET50_SHAPES) == bench.RESNET50_FLOATS == 25_557_032
    names = [name for name, _ in bench.RESNET50_SHAPES]
    assert len(set(names)) == len(names)


def test_resnet50_shapes_match_torch_nn_model():
    model = _torch_resnet50()
    expected = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    assert list(bench.RESNET50_SHAPES) == expected
    assert sum(p.numel() for p in model.parameters()) == 25_557_032


# ---------------------------------------------------------------------------
# BERT-base encoder
# ---------------------------------------------------------------------------

def test_bert_base_shapes_count_by_hand():
    hidden, ffn, layers = 768, 3072, 12
    embeddings = 30522 * hidden + 512 * hidden + 2 * hidden + 2 * hidden
    per_layer = (4 * (hidden * hidden + hidden)  # q, k, v, attention output
                 + 2 * hidden                      # attention LayerNorm
                 + hidden * ffn + ffn              # intermediate
                 + ffn * hidden + hidden           # output
                 + 2 * hidden)                     # output LayerNorm
    assert len(bench.BERT_BASE_SHAPES) == bench.BERT_BASE_TENSORS == 5 + layers * 16 == 197
    assert bench.count_floats(bench.BERT_BASE_SHAPES) == embeddings + layers * per_layer
    assert bench.BERT_BASE_FLOATS == embeddings + layers * per_layer == 108_891_648


def test_bert_base_shapes_match_torch_nn_model():
    nn = pytest.importorskip("torch").nn

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(768, 768) for _ in range(4))
            self.ln1 = nn.LayerNorm(768)
            self.ffn_in = nn.Linear(768, 3072)
            self.ffn_out = nn.Linear(3072, 768)
            self.ln2 = nn.LayerNorm(768)

    class Bert(nn.Module):
        def __init__(self):
            super().__init__()
            self.word = nn.Embedding(30522, 768)
            self.position = nn.Embedding(512, 768)
            self.token_type = nn.Embedding(2, 768)
            self.ln = nn.LayerNorm(768)
            self.layers = nn.ModuleList(Layer() for _ in range(12))

    # Layer above declares parameters in BERT's order, so shapes line up one to one.
    expected = [tuple(p.shape) for p in Bert().parameters()]
    assert [shape for _, shape in bench.BERT_BASE_SHAPES] == expected


def test_quick_bert_is_a_smaller_stack():
    shapes = bench.bert_base_shapes(layers=1, vocab=4096)
    assert len(shapes) == 5 + 16
    assert shapes[1:5] == bench.BERT_BASE_SHAPES[1:5]
    assert shapes[5:] == bench.BERT_BASE_SHAPES[5:21]


# ---------------------------------------------------------------------------
# CLI pieces that need no device
# ---------------------------------------------------------------------------

def test_workloads_and_optimizer_selection():
    loads = bench.workloads(["flat", "resnet50"], flat_size=1000)
    assert [w.name for w in loads] == ["flat", "resnet50", "resnet50-flat"]
    assert loads[0].floats == 1000
    assert loads[2].floats == bench.RESNET50_FLOATS and not loads[2].torch
    assert [c.name for c in bench.select_optimizers(["adam", "SGD-nesterov"])] == [
        "adam", "sgd-nesterov"]
    with pytest.raises(ValueError):
        bench.select_optimizers(["lamb"])
    words = {c.name: c.bytes_per_element() for c in bench.OPTIMIZERS}
    assert words == {"rmsprop": 20, "rmsprop-centered-mom": 36, "adam": 28, "adamw": 28,
                     "amsgrad": 36, "sgd-nesterov": 20}


def test_format_table_speedups_and_ratio():
    w = bench.Workload("resnet50", "", bench.RESNET50_SHAPES)
    wf = bench.Workload("resnet50-flat", "", (("flat", (bench.RESNET50_FLOATS,)),), torch=False)
    c = bench.OPTIMIZERS[0]
    rows = [bench._row(w, c, "netcl", [0.010, 0.011, 0.012]),
            bench._row(w, c, "torch-forloop", [0.040]),
            bench._row(w, c, "torch-foreach", [0.030]),
            bench._row(wf, c, "netcl", [0.010]),
            bench._row(wf, bench.OPTIMIZERS[2], "netcl", error="ImportError: nope")]
    bench.add_ceiling(rows, 20.0)
    bench.add_speedups(rows)
    assert rows[0]["ms"] == pytest.approx(11.0)
    assert rows[0]["speedup"] == pytest.approx(30.0 / 11.0)
    assert rows[0]["vs"] == "torch-foreach"
    assert rows[0]["gbps"] == pytest.approx(bench.RESNET50_FLOATS * 20 / 0.011 / 1e9)
    assert rows[0]["pct_ceiling"] == pytest.approx(100 * rows[0]["gbps"] / 20.0)
    assert rows[4]["pct_ceiling"] is None
    assert bench.flat_resnet_ratios(rows) == {"rmsprop": pytest.approx(1.1)}
    table = bench.format_table(rows)
    assert "2.73x (torch-foreach)" in table
    assert "unavailable: ImportError: nope" in table
    # header, rule, one line per row, a blank line between the two workloads
    assert len(table.splitlines()) == 2 + len(rows) + 1


def test_progress_is_silent_when_not_a_tty(capsys):
    p = bench.Progress(10)
    p.set_label("x")
    p.advance(5)
    p.close()
    assert capsys.readouterr().err == ""


def test_parse_args_quick_defaults():
    args = bench.parse_args(["--quick", "--optim", "adam", "--workload", "flat"])
    assert args.quick and args.steps < 20 and args.size < bench.FULL_FLAT_SIZE
    full = bench.parse_args([])
    assert full.steps >= 20 and full.warmup >= 3 and full.size >= 5e7
    with pytest.raises(SystemExit):
        bench.parse_args(["--optim", "lamb"])


# ---------------------------------------------------------------------------
# A real run
# ---------------------------------------------------------------------------

@requires_opencl
def test_quick_run_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--json", str(out), "--no-progress"])
    printed = capsys.readouterr()
    assert "ms/step" in printed.out
    assert printed.err.count("\r") == 0  # --no-progress

    data = json.loads(out.read_text())
    machine = data["machine"]
    for key in ("device", "device_version", "cpu_count", "torch", "ceiling_gbps", "date",
                "ceiling_gbps_start", "ceiling_gbps_end"):
        assert key in machine
    assert math.isfinite(machine["ceiling_gbps"]) and machine["ceiling_gbps"] > 0

    rows = data["rows"]
    assert rows
    ok = [r for r in rows if r["status"] == "ok"]
    for r in ok:
        assert math.isfinite(r["ms"]) and r["ms"] > 0
        assert math.isfinite(r["gbps"]) and r["gbps"] > 0
    for r in rows:
        assert r["status"] == "ok" or r["status"].startswith("unavailable: ")

    expected_workloads = {"flat", "resnet50", "resnet50-flat", "bert"}
    assert {r["workload"] for r in rows} == expected_workloads
    assert {r["optimizer"] for r in rows} == set(bench.OPTIMIZER_NAMES)
    if _netcl_optim_importable():
        netcl_rows = [r for r in rows if r["impl"] == "netcl"]
        assert netcl_rows and all(r["status"] == "ok" for r in netcl_rows), [
            (r["workload"], r["optimizer"], r["status"]) for r in netcl_rows
            if r["status"] != "ok"]
        assert set(data["flat_resnet_ratio"]) == set(bench.OPTIMIZER_NAMES)
    if machine["torch"]:
        assert any(r["impl"].startswith("torch-") and r["status"] == "ok" for r in rows)


@requires_opencl
@pytest.mark.parametrize("n", [1, 15, 16, 37, 4096 + 5, 2 * 16 * 1024 + 37])
def test_ceiling_kernel_updates_every_element(n):
    import numpy as np
    import pyopencl as cl
    import pyopencl.array as cla

    context = cl.create_some_context(interactive=False)  # kept alive (Intel's runtime)
    queue = cl.CommandQueue(context)
    kernel = bench.ceiling_kernel(context)
    rng = np.random.default_rng(n)
    a0, b0, c0 = (rng.random(n, dtype=np.float32) for _ in range(3))
    a, b, c = (cla.to_device(queue, x) for x in (a0, b0, c0))
    bench.launch_ceiling(kernel, queue, a, b, c, 0.5, n)
    np.testing.assert_allclose(a.get(), a0 + np.float32(0.5) * c0, rtol=1e-6)
    np.testing.assert_allclose(b.get(), b0 * np.float32(0.5) + c0, rtol=1e-6)
    np.testing.assert_array_equal(c.get(), c0)


def test_progress_draws_on_a_terminal():
    import io

    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    p = bench.Progress(4, stream=stream)
    p.set_label("flat adam netcl")
    p.advance(4)
    p.close()
    text = stream.getvalue()
    assert "100%" in text and "flat adam netcl" in text and text.endswith("\r")


def test_progress_counts_silently_without_tqdm(monkeypatch):
    import io
    import sys

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    stream = Tty()
    p = bench.Progress(4, stream=stream)
    p.set_label("x")
    p.advance(3)
    p.advance(3)
    p.close()
    assert p.done == 4 and stream.getvalue() == ""


@requires_opencl
def test_rows_say_unavailable_when_netcl_cannot_load(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "load_netcl",
                        lambda: (None, None, None, "ImportError: no netcl.optim"))
    result = bench.main(["--no-torch", "--no-progress", "--workload", "flat", "--optim", "adam",
                         "--size", "1000", "--ceiling-size", "100000", "--steps", "2",
                         "--warmup", "0", "--json", str(tmp_path / "b.json")])
    (row,) = result["rows"]
    assert row["status"] == "unavailable: ImportError: no netcl.optim"
    assert row["ms"] is None
    assert result["machine"]["ceiling_gbps"] > 0
