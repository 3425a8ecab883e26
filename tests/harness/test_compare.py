"""``compare``: the grid-then-seeds protocol, the headline measure, the files it writes."""

from __future__ import annotations

import json

import pytest

from sophia_pytorch.harness.compare.report import reach
from sophia_pytorch.harness.compare.runner import compare
from tests.harness.helpers import tiny_config


def test_reach_interpolates_between_evaluations():
    evals = [{"step": 0, "val_loss": 5.0}, {"step": 10, "val_loss": 3.0},
             {"step": 20, "val_loss": 2.0}]
    assert reach(evals, 2.5, "step") == pytest.approx(15.0)
    assert reach(evals, 3.0, "step") == 10.0
    assert reach(evals, 1.0, "step") is None


def test_compare_runs_the_grid_then_seeds_and_writes_the_report(tmp_path):
    base = tiny_config(tmp_path, max_steps=6, eval_every=2)
    summary = compare(base, optimizers=["sophiag", "adamw"], lr_multipliers=[0.5, 2.0],
                      seeds=[0, 1], out_dir=tmp_path / "cmp")
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    runs = results["runs"]
    assert len(runs) == 2 * 2 + 2 * 1  # the grid at seed 0, then seed 1 at the best lr
    for name in ("sophiag", "adamw"):
        grid = [r for r in runs if r["optimizer"] == name and r["seed"] == 0]
        best = min(grid, key=lambda r: r["final_val_loss"])["lr_multiplier"]
        assert results["best_multipliers"][name] == best
        assert [r["lr_multiplier"] for r in runs if r["optimizer"] == name and r["seed"] == 1] \
            == [best]
    adamw = results["headline"]["optimizers"]["adamw"]
    assert results["headline"]["reference"] == "adamw"
    assert adamw["reached"] == 2 and adamw["step_ratio"]["mean"] == pytest.approx(1.0)
    for entry in results["headline"]["optimizers"]["sophiag"]["per_seed"]:
        best = results["best_multipliers"]["adamw"]
        adamw_run = next(r for r in runs if r["optimizer"] == "adamw"
                         and r["seed"] == entry["seed"] and r["lr_multiplier"] == best)
        assert entry["reference_steps_to_final"] == reach(adamw_run["evals"],
                                                          entry["final_val_loss"], "step")
    report = summary.report_path.read_text()
    assert "steps to target" in report and "sophiag" in report
    for name in ("val_loss_vs_steps.png", "val_loss_vs_seconds.png", "val_loss_vs_tokens.png",
                 "lr_grid.png"):
        assert (tmp_path / "cmp" / name).stat().st_size > 1000


def test_compare_runs_a_variant_beside_its_base_under_its_own_name(tmp_path):
    base = tiny_config(tmp_path, max_steps=2, eval_every=2)
    summary = compare(base, optimizers=["sophiag", "sophiag-official"], out_dir=tmp_path / "cmp")
    names = [run["optimizer"] for run in summary.results["runs"]]
    assert names == ["sophiag", "sophiag-official"]
    assert (tmp_path / "cmp" / "runs" / "sophiag-official-x1-seed0" / "checkpoint.pt").exists()
    saved = json.loads((tmp_path / "cmp" / "runs" / "sophiag-official-x1-seed0" /
                        "config.json").read_text())
    assert saved["optimizer"]["name"] == "sophiag-official"
