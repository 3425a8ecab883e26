"""The scripts in examples/ train and refresh as they say: each ``main()`` at its default length
(in this process, so that the test does not pay for importing torch and the frameworks again),
and one script run as a user runs it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _skip_without_lightning() -> None:
    for name in ("lightning", "pytorch_lightning"):
        try:
            importlib.import_module(name)
            return
        except ImportError:
            continue
    pytest.skip("neither lightning nor pytorch_lightning is installed")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_plain_loop_learns_and_refreshes_every_k_steps(precision):
    """fp16: autocast and a GradScaler, whose scale update_hessian undoes."""
    example = _example("plain_loop")
    result = example.main(["--precision", precision])
    losses = result["losses"]
    assert len(losses) == 200 and result["refreshes"] == 200 // 10
    assert _mean(losses[-10:]) < 0.5 * _mean(losses[:10]), losses
    low, high = example.UNCLIPPED_BAND
    assert (low, high) == (0.1, 0.5)  # the official "win rate" advice
    assert low <= result["unclipped"] <= high


def test_plain_loop_exits_with_advice_when_rho_leaves_the_unclipped_band(monkeypatch):
    example = _example("plain_loop")
    monkeypatch.setitem(example.HYPERPARAMETERS, "rho", 0.003)  # almost every step clipped
    with pytest.raises(SystemExit, match=r"unclipped fraction 0\.\d+ is outside 0\.1-0\.5.*"
                                         r"raise rho"):
        example.main([])


def test_hf_trainer_example_learns_and_refreshes_every_k_steps():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    result = _example("hf_trainer").main([])
    assert result["refreshes"] == 150 // 10
    assert result["losses"][-1] < 0.6 * result["losses"][0], result["losses"]


@pytest.mark.parametrize("optimizer", ["sophiag", "sophiah"])
def test_lightning_example_learns_and_refreshes_every_k_steps(optimizer):
    _skip_without_lightning()
    result = _example("lightning_module").main(["--optimizer", optimizer])
    losses = result["losses"]
    assert result["steps"] == 150 and result["refreshes"] == 150 // 10
    assert _mean(losses[-10:]) < 0.5 * _mean(losses[:10]), losses


def test_lightning_example_counts_optimizer_steps_under_accumulation_in_bf16():
    _skip_without_lightning()
    result = _example("lightning_module").main(
        ["--steps", "20", "--accumulate-grad-batches", "2", "--precision", "bf16-mixed"])
    # 7 batches an epoch: steps of 2, 2, 2 and 1 (Lightning steps at the end of an epoch)
    assert len(result["losses"]) == 20 // 4 * 7
    assert result["steps"] == 20 and result["refreshes"] == 2


def test_plain_loop_runs_as_a_script():
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "plain_loop.py"), "--steps", "20", "--refresh-every", "5"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "20 steps, 4 Hessian refreshes" in done.stdout
