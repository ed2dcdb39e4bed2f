"""Smoke tests of examples/: each runs briefly through its main(argv) and must
reach its real outcome (learns, compares, writes non-empty PNGs)."""

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytest.importorskip("matplotlib")


def _example(name):
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)


def _assert_png(path):
    path = Path(path)
    assert path.is_file() and path.stat().st_size > 5000
    assert path.read_bytes()[:8] == PNG_MAGIC


@pytest.fixture(scope="module")
def train_mlp():
    pytest.importorskip("sklearn")
    return _example("train_mlp")


@pytest.mark.parametrize("optim, flags", [
    ("rmsprop", []), ("adam", ["--lr", "3e-3"]),
    ("adamw", ["--lr", "3e-3", "--weight-decay", "0.05"]),
    ("sgd", ["--momentum", "0.9", "--nesterov", "--lr", "0.02"])])
def test_train_mlp_learns(train_mlp, tmp_path, optim, flags):
    result = train_mlp.main(["--optim", optim, "--steps", "100", "--hidden", "64",
                             "--out", str(tmp_path), "--no-progress"] + flags)
    assert result["steps"] == 100
    losses = result["losses"]
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])
    assert result["test_accuracy"] > 0.85  # chance is 0.10
    _assert_png(tmp_path / f"loss_{optim}.png")


def test_train_mlp_resume_is_exact(train_mlp, tmp_path, capsys):
    """30 steps, save, resume for 30 more == 60 steps straight (bit for bit),
    the warmup + cosine schedule included (its state is in the checkpoint)."""
    common = ["--optim", "sgd", "--lr", "0.02", "--momentum", "0.9", "--hidden", "32",
              "--batch-size", "50", "--out", str(tmp_path), "--no-progress",
              "--schedule-steps", "60", "--warmup-steps", "8"]
    checkpoint = tmp_path / "ck.npz"
    straight = train_mlp.main(common + ["--steps", "60"])
    train_mlp.main(common + ["--steps", "30", "--save", str(checkpoint)])
    resumed = train_mlp.main(common + ["--steps", "60", "--resume", str(checkpoint)])
    assert resumed["steps"] == 60 and resumed["losses"] == straight["losses"]
    assert resumed["lrs"] == straight["lrs"] and len(set(straight["lrs"])) == 60
    for a, b in zip(resumed["params"], straight["params"]):
        np.testing.assert_array_equal(a, b)
    # The checkpoint's schedule wins; going past its end or contradicting it is refused.
    for flags, message in [(["--steps", "61"], "the schedule spans 60 steps"),
                           (["--steps", "60", "--warmup-steps", "5"],
                            "--warmup-steps 5 differs from the checkpoint's 8")]:
        argv = [a for a in common if a not in ("--warmup-steps", "8")]
        with pytest.raises(SystemExit):
            train_mlp.main(argv + flags + ["--resume", str(checkpoint)])
        assert message in capsys.readouterr().err


def _torch_schedule(steps, warmup_steps, start_factor, lr):
    """The lr of each step under torch's LinearLR warmup then CosineAnnealingLR."""
    torch = pytest.importorskip("torch")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=start_factor, end_factor=1.0,
                                               total_iters=warmup_steps)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps - warmup_steps)
    schedule = torch.optim.lr_scheduler.SequentialLR(opt, [warmup, cosine], [warmup_steps])
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    return lrs


def _read_jsonl(path):
    """Each line parsed as strict JSON (no bare NaN/Infinity)."""
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


STATS_KEYS = {"grad_norm", "param_norm", "update_norm", "update_to_weight", "nonfinite",
              "zeros", "numel", "second_moment_rms", "lr_min", "lr_mean", "lr_max"}


def test_train_mlp_stats_and_schedule(train_mlp, tmp_path):
    """--stats: JSON lines with every documented statistic, finite except on the
    NaN-injected (skipped) step; the logged lr sequence is torch's warmup+cosine;
    the dashboard PNG is written."""
    steps, warmup, lr = 48, 6, 2e-3
    result = train_mlp.main(["--steps", str(steps), "--warmup-steps", str(warmup),
                             "--lr", str(lr), "--hidden", "32", "--stats", "--nan-at", "20",
                             "--out", str(tmp_path), "--no-progress"])
    expected = _torch_schedule(steps, warmup, train_mlp.WARMUP_START_FACTOR, lr)
    np.testing.assert_allclose(result["lrs"], expected, rtol=1e-13, atol=0)
    rows = _read_jsonl(tmp_path / "stats_rmsprop.jsonl")
    assert [row["step"] for row in rows] == list(range(1, steps + 1))
    np.testing.assert_allclose([row["groups"]["0"]["lr"] for row in rows], expected,
                               rtol=1e-13, atol=0)
    assert [row["step"] for row in rows if row["skipped"]] == [20] == result["skipped_steps"]
    for row in rows:
        assert {"step", "time", "optimizer_step", "skipped", "scalars", "global",
                "groups"} <= set(row)
        stats = row["global"]
        if row["skipped"]:
            assert stats["nonfinite"] > 0 and stats["update_norm"] == 0
            assert row["scalars"]["loss"] == "NaN"
            continue
        assert set(stats) == STATS_KEYS, row["step"]
        assert stats["nonfinite"] == 0 and stats["numel"] == 64 * 32 + 32 + 32 * 10 + 10
        for key, value in [*stats.items(), ("loss", row["scalars"]["loss"])]:
            assert isinstance(value, (int, float)) and np.isfinite(value), (row["step"], key)
        assert 0 < stats["lr_min"] <= stats["lr_mean"] <= stats["lr_max"]
        assert len(row["groups"]["0"]["params"]) == 4  # two Linear layers
    # The model still learned around the skipped step.
    assert np.mean(result["losses"][-5:]) < 0.5 * np.mean(result["losses"][:5])
    _assert_png(result["dashboard"])


def test_train_mlp_tensorboard(train_mlp, tmp_path):
    """--tensorboard DIR: event files tensorboard's own reader parses, with the
    loss, the aggregates and the scheduled lr every --stats-every steps."""
    pytest.importorskip("tensorboardX")
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    steps, warmup, lr, every = 20, 4, 1e-3, 5
    logdir = tmp_path / "tb"
    result = train_mlp.main(["--steps", str(steps), "--warmup-steps", str(warmup),
                             "--hidden", "16", "--tensorboard", str(logdir),
                             "--stats-every", str(every), "--out", str(tmp_path),
                             "--no-progress"])
    assert list(logdir.glob("events.out.tfevents.*"))
    events = accumulator.EventAccumulator(str(logdir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "global/grad_norm", "global/lr_mean", "group0/lr", "skipped"} <= tags
    logged = events.Scalars("group0/lr")
    assert [e.step for e in logged] == list(range(every, steps + 1, every))
    expected = _torch_schedule(steps, warmup, train_mlp.WARMUP_START_FACTOR, lr)
    np.testing.assert_allclose([e.value for e in logged], expected[every - 1::every],
                               rtol=1e-6)  # stored as float32
    losses = [e.value for e in events.Scalars("loss")]
    np.testing.assert_allclose(losses, result["losses"][every - 1::every], rtol=1e-6)
    assert (tmp_path / "stats_rmsprop.jsonl").is_file()  # --tensorboard implies --stats
    _assert_png(result["dashboard"])


def test_train_mlp_rejects_flags_of_other_optimizers(train_mlp, capsys):
    with pytest.raises(SystemExit):
        train_mlp.main(["--optim", "adam", "--centered"])
    assert "--centered does not apply to --optim adam" in capsys.readouterr().err


def test_noisy_valley(tmp_path):
    valley = _example("noisy_valley")
    result = valley.main(["--steps", "240", "--out", str(tmp_path), "--no-progress"])
    tail = result["tail_mean_loss"]
    assert set(tail) == {"SGD", "RMSProp", "Adam"}
    for name, losses in result["losses"].items():
        assert len(losses) == 241 and losses[0] == pytest.approx(result["start_loss"], rel=1e-6)
        assert tail[name] < result["start_loss"] / 10, name
    # SGD at lr 0.16 keeps bouncing across the steep p1 wall; the adaptive
    # optimizers settle an order of magnitude lower.
    assert result["lowest"] in ("RMSProp", "Adam")
    assert max(tail["RMSProp"], tail["Adam"]) < tail["SGD"] / 5
    _assert_png(result["plot"])


def test_adamw_vs_l2(tmp_path):
    example = _example("adamw_vs_l2")
    lr, wd = 0.01, 0.1
    result = example.main(["--steps", "200", "--record-every", "50", "--lr", str(lr),
                           "--weight-decay", str(wd), "--out", str(tmp_path), "--no-progress"])
    adam, adamw = result["summary"]["Adam"], result["summary"]["AdamW"]
    for group in ("high-variance", "low-variance", "sparse"):
        for key in ("coefficient_min", "coefficient_median", "coefficient_max"):
            assert adamw[group][key] == pytest.approx(lr * wd)
    # Adam+L2's decay follows the gradient scale: small-gradient groups decay more.
    high = adam["high-variance"]["coefficient_median"]
    assert adam["low-variance"]["coefficient_median"] > 5 * high
    assert adam["sparse"]["coefficient_median"] > 3 * high
    for name, losses in result["losses"].items():
        assert losses[-1][1] < losses[0][1] * 1.05 and losses[-1][1] < np.log(4), name
    assert min(result["test_accuracy"].values()) > 0.35  # chance is 0.25
    _assert_png(result["plot"])


def test_low_precision(tmp_path):
    """bfloat16 weights rounded to nearest stall far above what bfloat16 can
    hold; stochastic rounding, master weights and Kahan get near it; Adam's
    int8 and bfloat16 state end within 1% of float32 Adam's loss."""
    pytest.importorskip("ml_dtypes")
    result = _example("low_precision").main(["--steps", "200", "--adam-steps", "60",
                                             "--out", str(tmp_path), "--plot"])
    sgd, floor = result["sgd"], result["bfloat16_floor"]
    assert sgd["float32"][-1] < floor
    assert sgd["bfloat16 nearest"][-1] > 20 * floor
    for name in ("bfloat16 stochastic rounding", "bfloat16 master weights", "bfloat16 Kahan"):
        assert sgd[name][-1] < 4 * floor, name
    adam = result["adam"]
    for name in ("int8 state", "bfloat16 state"):
        assert abs(adam[name][-1] - adam["float32 state"][-1]) < 0.01 * adam["float32 state"][-1]
    _assert_png(tmp_path / "low_precision.png")
