"""``compare``: the grid-then-seeds protocol, the headline measure, the files it writes."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from sophia_pytorch.harness import trainer
from sophia_pytorch.harness.compare import runner
from sophia_pytorch.harness.compare.records import RunRecord
from sophia_pytorch.harness.compare.report import (
    SECONDS_CAPTION,
    reach,
    seed_band,
    tokens_per_step,
    write_report,
)
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
    for name in ("val_loss_vs_steps.png", "val_loss_vs_seconds.png", "lr_grid.png"):
        assert (tmp_path / "cmp" / name).stat().st_size > 1000
    # One batch for every run: tokens are steps times it, and no third plot repeats the first.
    assert not (tmp_path / "cmp" / "val_loss_vs_tokens.png").exists()
    assert f"tokens are steps x {base.tokens_per_step}" in report
    assert all(run["evals"][0]["step"] == 0 for run in runs)  # the curves start untrained
    assert "adamw steps to match" in summary.headline


def _record(optimizer: str, seed: int, losses: list[float], *, every: int = 10,
            tokens_per_step: int = 100, seconds_per_step: float = 0.5) -> RunRecord:
    evals = [{"step": i * every, "val_loss": loss, "seconds": i * every * seconds_per_step,
              "tokens": i * every * tokens_per_step} for i, loss in enumerate(losses)]
    steps = evals[-1]["step"]
    return RunRecord(optimizer=optimizer, lr=1e-3, lr_multiplier=1.0, seed=seed,
                     final_val_loss=losses[-1], steps=steps, train_seconds=steps * 0.5,
                     hessian_seconds=0.0, tokens=steps * tokens_per_step, skipped_steps=0,
                     run_dir="", evals=evals)


def test_seed_band_is_the_mean_and_the_min_max_over_seeds_at_each_step():
    runs = [_record("adamw", 0, [5.0, 3.0, 2.0]), _record("adamw", 1, [5.0, 4.0, 2.5]),
            _record("adamw", 2, [5.0, 3.5, math.nan])]  # seed 2 diverged at the last point
    x, mean, low, high = seed_band(runs, "step")
    assert x == [0, 10, 20]
    assert mean == pytest.approx([5.0, 3.5, 2.25])
    assert low == [5.0, 3.0, 2.0] and high == [5.0, 4.0, 2.5]


def _base_config(batch_size: int = 4) -> dict:
    return {"preset": "tiny", "model": {"block_size": 16},
            "data": {"source": "slice.txt"},
            "run": {"batch_size": batch_size, "grad_accum": 2, "max_steps": 20}}


def _written_figures(monkeypatch) -> dict[str, dict]:
    """Capture each saved figure's title, caption and line labels by file name."""
    import matplotlib.figure

    seen: dict[str, dict] = {}
    real = matplotlib.figure.Figure.savefig

    def savefig(figure, path, *args, **kwargs):
        axes = figure.axes[0]
        seen[Path(path).name] = {"title": axes.get_title(),
                                 "caption": " ".join(t.get_text() for t in figure.texts),
                                 "bands": len(axes.collections),
                                 "first_x": [line.get_xdata()[0] for line in axes.lines
                                             if len(line.get_xdata()) > 2]}
        return real(figure, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return seen


def test_plots_are_titled_banded_over_seeds_and_start_at_step_0(tmp_path, monkeypatch):
    seen = _written_figures(monkeypatch)
    records = [_record("adamw", s, [5.0, 3.0 + s / 10, 2.0 + s / 10]) for s in (0, 1, 2)]
    records += [_record("sophiag", s, [5.0, 3.5 + s / 10, 2.5 + s / 10]) for s in (0, 1, 2)]
    write_report(tmp_path, records=records, best_multipliers={"adamw": 1.0, "sophiag": 1.0},
                 base_config=_base_config(), optimizers=["sophiag", "adamw"],
                 lr_multipliers=[1.0], seeds=[0, 1, 2], total_seconds=1.0)
    assert set(seen) == {"val_loss_vs_steps.png", "val_loss_vs_seconds.png"}
    for figure in seen.values():
        assert figure["title"].startswith("preset tiny: 8 x 16 tokens a step, 3 seeds (0, 1, 2)")
        assert figure["bands"] == 2  # one min-max band per optimizer
        assert figure["first_x"] == [0, 0]  # both curves from the untrained model
    assert "other work on it slows a run" in seen["val_loss_vs_seconds.png"]["caption"]
    assert seen["val_loss_vs_steps.png"]["caption"] == ""
    assert SECONDS_CAPTION in (tmp_path / "report.md").read_text()


def test_the_tokens_plot_is_drawn_only_where_the_batches_differ(tmp_path, monkeypatch):
    seen = _written_figures(monkeypatch)
    records = [_record("adamw", 0, [5.0, 3.0, 2.0], tokens_per_step=100),
               _record("sophiag", 0, [5.0, 3.5, 2.5], tokens_per_step=400)]
    write_report(tmp_path, records=records, best_multipliers={"adamw": 1.0, "sophiag": 1.0},
                 base_config=_base_config(), optimizers=["sophiag", "adamw"],
                 lr_multipliers=[1.0], seeds=[0], total_seconds=1.0)
    assert "val_loss_vs_tokens.png" in seen and seen["val_loss_vs_tokens.png"]["bands"] == 0
    assert tokens_per_step(records) == [100, 400]
    assert "no separate tokens plot" not in (tmp_path / "report.md").read_text()


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
