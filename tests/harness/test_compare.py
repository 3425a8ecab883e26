"""``compare``: the grid-then-seeds protocol, the headline measure, the files it writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sophia_pytorch.harness import trainer
from sophia_pytorch.harness.compare import runner
from sophia_pytorch.harness.compare.report import reach
from sophia_pytorch.harness.compare.runner import compare
from sophia_pytorch.harness.errors import SophiaError
from sophia_pytorch.harness.jsonio import write_json
from sophia_pytorch.harness.rundir import RunLock
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


def _counting_train(monkeypatch, crash_at: dict | None = None) -> list[str]:
    """Wrap compare's train: record each run folder trained; optionally crash one run."""
    trained = []
    real = trainer.train

    def counting(config, resume=None):
        trained.append(Path(config.run.out_dir).name + (" (resumed)" if resume else ""))
        step = (crash_at or {}).get(Path(config.run.out_dir).name)
        if step is None:
            return real(config, resume=resume)

        def crash(record):
            if record["step"] == step:
                raise KeyboardInterrupt

        return real(config, resume=resume, on_step=crash)

    monkeypatch.setattr(runner, "train", counting)
    return trained


def test_a_second_compare_into_the_folder_trains_only_the_new_optimizer(tmp_path, monkeypatch):
    base = tiny_config(tmp_path, max_steps=2, eval_every=2)
    trained = _counting_train(monkeypatch)
    compare(base, optimizers=["adamw"], out_dir=tmp_path / "cmp")
    first = json.loads((tmp_path / "cmp" / "runs" / "adamw-x1-seed0" / "record.json").read_text())
    summary = compare(base, optimizers=["lion", "adamw"], out_dir=tmp_path / "cmp")
    assert trained == ["adamw-x1-seed0", "lion-x1-seed0"]
    runs = {run["optimizer"]: run for run in summary.results["runs"]}
    assert set(runs) == {"lion", "adamw"}
    assert runs["adamw"]["evals"] == first["record"]["evals"]  # read back, not retrained
    assert set(summary.results["headline"]["optimizers"]) == {"lion", "adamw"}


def test_more_lr_multipliers_add_to_the_grid_already_run(tmp_path, monkeypatch):
    base = tiny_config(tmp_path, max_steps=2, eval_every=2)
    trained = _counting_train(monkeypatch)
    compare(base, optimizers=["adamw"], lr_multipliers=[1.0], out_dir=tmp_path / "cmp")
    summary = compare(base, optimizers=["adamw"], lr_multipliers=[0.5], out_dir=tmp_path / "cmp")
    assert trained == ["adamw-x1-seed0", "adamw-x0.5-seed0"]
    assert sorted(run["lr_multiplier"] for run in summary.results["runs"]) == [0.5, 1.0]


def test_a_comparison_killed_midway_resumes_where_it_stopped(tmp_path, monkeypatch):
    settings = dict(max_steps=6, eval_every=2, checkpoint_every=2)
    whole = compare(tiny_config(tmp_path / "a", **settings), optimizers=["sophiag", "adamw"],
                    out_dir=tmp_path / "a" / "cmp")
    base = tiny_config(tmp_path / "b", **settings)
    _counting_train(monkeypatch, crash_at={"adamw-x1-seed0": 5})
    with pytest.raises(KeyboardInterrupt):  # killed after adamw's step 5, checkpoint at 4
        compare(base, optimizers=["sophiag", "adamw"], out_dir=tmp_path / "b" / "cmp")
    trained = _counting_train(monkeypatch)
    again = compare(base, optimizers=["sophiag", "adamw"], out_dir=tmp_path / "b" / "cmp")
    assert trained == ["adamw-x1-seed0 (resumed)"]
    for ours, theirs in zip(again.results["runs"], whole.results["runs"], strict=True):
        assert [e["val_loss"] for e in ours["evals"]] == [e["val_loss"] for e in theirs["evals"]]


def test_a_run_folder_with_other_settings_is_refused_unless_overwrite(tmp_path, monkeypatch):
    compare(tiny_config(tmp_path, max_steps=2, eval_every=2), optimizers=["adamw"],
            out_dir=tmp_path / "cmp")
    longer = tiny_config(tmp_path, max_steps=3, eval_every=2)
    with pytest.raises(SophiaError, match=r"holds a run with other settings \(max_steps 2 "
                                          r"\(now 3\)\).*--overwrite") as raised:
        compare(longer, optimizers=["adamw"], out_dir=tmp_path / "cmp")
    assert "\n" not in str(raised.value)
    trained = _counting_train(monkeypatch)
    summary = compare(longer, optimizers=["adamw"], out_dir=tmp_path / "cmp", overwrite=True)
    assert trained == ["adamw-x1-seed0"] and summary.results["runs"][0]["steps"] == 3


def test_write_json_replaces_the_file_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "record.json"
    write_json(path, {"a": 1, "loss": float("nan")})
    assert json.loads(path.read_text()) == {"a": 1, "loss": None}  # NaN is not JSON: null

    def fails(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fails)
    with pytest.raises(OSError):
        write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1, "loss": None}
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]  # no temp file left


def test_a_run_folder_another_process_is_training_in_is_left_alone(tmp_path):
    folder = tmp_path / "cmp" / "runs" / "adamw-x1-seed0"
    folder.mkdir(parents=True)
    (folder / "log.jsonl").write_text('{"kind": "step", "step": 1}\n')
    with RunLock(folder), pytest.raises(SophiaError, match="in use by process"):
        compare(tiny_config(tmp_path, max_steps=2), optimizers=["adamw"],
                out_dir=tmp_path / "cmp")
    assert (folder / "log.jsonl").read_text() == '{"kind": "step", "step": 1}\n'
