"""Smoke tests of examples/: each runs briefly through its main(argv) and must
reach its real outcome (learns, compares, writes non-empty PNGs)."""

import importlib
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


def test_train_mlp_resume_is_exact(train_mlp, tmp_path):
    """30 steps, save, resume for 30 more == 60 steps straight (bit for bit)."""
    common = ["--optim", "sgd", "--lr", "0.02", "--momentum", "0.9", "--hidden", "32",
              "--batch-size", "50", "--out", str(tmp_path), "--no-progress"]
    checkpoint = tmp_path / "ck.npz"
    straight = train_mlp.main(common + ["--steps", "60"])
    train_mlp.main(common + ["--steps", "30", "--save", str(checkpoint)])
    resumed = train_mlp.main(common + ["--steps", "60", "--resume", str(checkpoint)])
    assert resumed["steps"] == 60 and resumed["losses"] == straight["losses"]
    for a, b in zip(resumed["params"], straight["params"]):
        np.testing.assert_array_equal(a, b)


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
