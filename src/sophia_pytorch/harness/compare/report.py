"""A comparison's outputs: ``report.md``, ``results.json`` and PNG plots.

The headline measures the paper's claim. The reference is AdamW (or, without it, the first
optimizer) at its tuned lr. For each seed s, the target is the reference's final validation
loss with seed s; for every optimizer (at its tuned lr, seed s) we find the first point
where its validation curve reaches the target, interpolating linearly between evaluations,
and report those steps and training seconds, and their ratio to the reference's own. The
spread is over seeds (mean, min-max). "Seconds" count training only, evaluation excluded.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import statistics
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..errors import require
from ..jsonio import write_json
from .records import CompareSummary

__all__ = ["reach", "seed_band", "tokens_per_step", "write_report"]

PLOTS = (("step", "steps", "val_loss_vs_steps.png"),
         ("seconds", "training wall-clock (s)", "val_loss_vs_seconds.png"),
         ("tokens", "tokens", "val_loss_vs_tokens.png"))
# Under the seconds plot and in report.md: a busy machine reads as a slow optimizer.
SECONDS_CAPTION = ("Seconds are this machine's wall-clock of training (evaluation excluded); "
                   "other work on it slows a run without changing its steps. Read speed from "
                   "the steps plot, or from benchmarks/step_time.py on a quiet machine.")


def reach(evals: list[dict[str, float]], target: float, key: str) -> float | None:
    """The ``key`` (step, seconds or tokens) at which val_loss first reaches ``target``.

    Linear interpolation between the last evaluation above the target and the first at or
    below it; None if the curve never reaches it.
    """
    previous = None
    for row in evals:
        if row["val_loss"] <= target:
            if previous is None or previous["val_loss"] == row["val_loss"]:
                return float(row[key])
            fraction = (previous["val_loss"] - target) / (previous["val_loss"] - row["val_loss"])
            return float(previous[key] + fraction * (row[key] - previous[key]))
        previous = row
    return None


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _headline(records: list[Any], best: dict[str, float], optimizers: list[str],
              seeds: list[int]) -> dict[str, Any]:
    reference = "adamw" if "adamw" in optimizers else optimizers[0]
    chosen = {(r.optimizer, r.seed): r for r in records if r.lr_multiplier == best[r.optimizer]}
    rows: dict[str, Any] = {"reference": reference, "optimizers": {}}
    targets = {s: chosen[(reference, s)].final_val_loss for s in seeds if (reference, s) in chosen}
    for optimizer in optimizers:
        per_seed = []
        for seed, target in targets.items():
            run, ref = chosen.get((optimizer, seed)), chosen[(reference, seed)]
            if run is None or not math.isfinite(target):
                continue
            entry = {"seed": seed, "target": target, "final_val_loss": run.final_val_loss,
                     # The other way round, defined even when the target is missed: the
                     # reference's steps to reach this optimizer's final loss.
                     "reference_steps_to_final": reach(ref.evals, run.final_val_loss, "step")}
            for key in ("step", "seconds", "tokens"):
                mine, theirs = reach(run.evals, target, key), reach(ref.evals, target, key)
                entry[key] = mine
                entry[f"{key}_ratio"] = mine / theirs if mine is not None and theirs else None
            per_seed.append(entry)
        reached = [e for e in per_seed if e["step"] is not None]
        summary: dict[str, Any] = {
            "lr": chosen[(optimizer, seeds[0])].lr if (optimizer, seeds[0]) in chosen else None,
            "seeds": len(per_seed), "reached": len(reached), "per_seed": per_seed,
            "final_val_loss": _spread([e["final_val_loss"] for e in per_seed]) if per_seed
            else None,
        }
        for key in ("step", "seconds", "step_ratio", "seconds_ratio"):
            values = [e[key] for e in reached if e[key] is not None]
            summary[key] = _spread(values) if values else None
        backwards = [e["reference_steps_to_final"] for e in per_seed
                     if e["reference_steps_to_final"] is not None]
        summary["reference_steps_to_final"] = _spread(backwards) if backwards else None
        rows["optimizers"][optimizer] = summary
    return rows


def _fmt(spread: dict[str, float] | None, digits: int = 0, suffix: str = "") -> str:
    if spread is None:
        return "not reached"
    if spread["min"] == spread["max"]:
        return f"{spread['mean']:.{digits}f}{suffix}"
    return (f"{spread['mean']:.{digits}f}{suffix} "
            f"({spread['min']:.{digits}f}-{spread['max']:.{digits}f})")


def package_provenance() -> dict[str, str]:
    """The installed sophia-pytorch's ``version`` and, where it is imported from a git
    checkout that tracks it, that checkout's ``commit`` (``+dirty`` when the package's files
    differ from it); "unknown" otherwise. Never the current folder's repository."""
    import sophia_pytorch

    try:
        version = importlib.metadata.version("sophia-pytorch")
    except importlib.metadata.PackageNotFoundError:
        version = getattr(sophia_pytorch, "__version__", "unknown")
    package = Path(sophia_pytorch.__file__).resolve().parent
    commit = "unknown"
    try:
        git = ["git", "-C", str(package)]
        tracked = subprocess.run([*git, "ls-files", "--error-unmatch", "__init__.py"],
                                 capture_output=True, text=True, timeout=5).returncode == 0
        if tracked:  # not a site-packages copy that merely lies inside some repository
            head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                                  text=True, timeout=5).stdout.strip()
            dirty = subprocess.run([*git, "status", "--porcelain", "--", "."],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            commit = (head + ("+dirty" if dirty else "")) if head else "unknown"
    except (OSError, subprocess.SubprocessError):
        pass
    return {"version": version, "commit": commit}


def _machine() -> dict[str, Any]:
    provenance = package_provenance()
    return {"platform": platform.platform(), "processor": platform.processor() or "unknown",
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "sophia_pytorch": provenance["version"], "commit": provenance["commit"]}


def tokens_per_step(records: list[Any]) -> list[float]:
    """The distinct tokens per optimizer step among ``records`` (runs with steps), sorted."""
    return sorted({r.tokens / r.steps for r in records if r.steps})


def seed_band(runs: list[Any], key: str) -> tuple[list[float], list[float], list[float],
                                                  list[float]]:
    """Across ``runs`` (one optimizer at one lr, several seeds): at each evaluated step, the
    mean ``key`` (step, seconds or tokens), and the mean, min and max validation loss over
    the seeds evaluated there (a diverged seed drops out where its loss stops being finite).
    """
    by_step: dict[float, list[tuple[float, float]]] = {}
    for run in runs:
        for row in run.evals:
            if math.isfinite(row["val_loss"]):
                by_step.setdefault(row["step"], []).append((row[key], row["val_loss"]))
    steps = sorted(by_step)
    losses = [[loss for _, loss in by_step[s]] for s in steps]
    return ([statistics.fmean(x for x, _ in by_step[s]) for s in steps],
            [statistics.fmean(v) for v in losses], [min(v) for v in losses],
            [max(v) for v in losses])


def _title(base_config: dict[str, Any], seeds: list[int]) -> str:
    run, model = base_config["run"], base_config["model"]
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else \
        f"{len(seeds)} seeds ({', '.join(map(str, seeds))})"
    return (f"preset {base_config['preset']}: {run['batch_size'] * run['grad_accum']} x "
            f"{model['block_size']} tokens a step, {seed_text}")


def _plot(out: Path, records: list[Any], best: dict[str, float], optimizers: list[str],
          headline: dict[str, Any], base_config: dict[str, Any], seeds: list[int]) -> list[Path]:
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot")
    colors = {name: f"C{i}" for i, name in enumerate(optimizers)}
    targets = [e["target"] for o in headline["optimizers"].values() for e in o["per_seed"]]
    title = _title(base_config, seeds)
    paths = []
    for key, label, filename in PLOTS:
        if key == "tokens" and len(tokens_per_step(records)) < 2:
            continue  # one batch size: the same curves as the steps plot, rescaled
        figure, axes = plt.subplots(figsize=(7, 4.8 if key == "seconds" else 4.5))
        for optimizer in optimizers:
            runs = [r for r in records
                    if r.optimizer == optimizer and r.lr_multiplier == best[optimizer]]
            if not runs:
                continue
            x, mean, low, high = seed_band(runs, key)
            if not x:
                continue
            several = len(runs) > 1
            axes.plot(x, mean, color=colors[optimizer], marker="." if len(x) < 30 else None,
                      label=f"{optimizer} (lr {runs[0].lr:.2g})"
                            + (f", mean of {len(runs)} seeds" if several else ""))
            if several:
                axes.fill_between(x, low, high, color=colors[optimizer], alpha=0.2,
                                  linewidth=0)
        if targets:
            axes.axhline(statistics.fmean(targets), color="gray", linestyle="--", linewidth=1,
                         label=f"{headline['reference']} final (target)")
        axes.set_title(title + (", band: min-max over seeds" if len(seeds) > 1 else ""),
                       fontsize=9.5)
        axes.set_xlabel(label)
        axes.set_ylabel("validation loss (nats/token)")
        axes.grid(alpha=0.3)
        axes.legend()
        if key == "seconds":
            figure.text(0.01, 0.01, SECONDS_CAPTION, fontsize=7, wrap=True, va="bottom")
            figure.tight_layout(rect=(0, 0.07, 1, 1))
        else:
            figure.tight_layout()
        figure.savefig(out / filename, dpi=110)
        plt.close(figure)
        paths.append(out / filename)
    if len({r.lr_multiplier for r in records}) > 1:
        figure, axes = plt.subplots(figsize=(6, 4))
        for optimizer in optimizers:
            grid = sorted((r.lr, r.final_val_loss) for r in records
                          if r.optimizer == optimizer and r.seed == records[0].seed)
            axes.plot(*zip(*grid, strict=True), marker="o", color=colors[optimizer],
                      label=optimizer)
        axes.set_title(f"{_title(base_config, [records[0].seed])}: the lr grid", fontsize=9.5)
        axes.set_xscale("log")
        axes.set_xlabel("peak learning rate")
        axes.set_ylabel("final validation loss")
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        figure.savefig(out / "lr_grid.png", dpi=110)
        plt.close(figure)
        paths.append(out / "lr_grid.png")
    return paths


def write_report(out: Path, *, records: list[Any], best_multipliers: dict[str, float],
                 base_config: dict[str, Any], optimizers: list[str], lr_multipliers: list[float],
                 seeds: list[int], total_seconds: float):
    """Write report.md, results.json and the plots into ``out``; return a CompareSummary."""
    out.mkdir(parents=True, exist_ok=True)
    headline = _headline(records, best_multipliers, optimizers, seeds)
    results = {
        "preset": base_config["preset"], "base_config": base_config, "optimizers": optimizers,
        "lr_multipliers": lr_multipliers, "seeds": seeds, "best_multipliers": best_multipliers,
        "headline": headline, "machine": _machine(), "total_seconds": total_seconds,
        "runs": [asdict(r) for r in records],
    }
    results_path = out / "results.json"
    write_json(results_path, results)
    plot_paths = _plot(out, records, best_multipliers, optimizers, headline, base_config,
                       seeds)
    reference, settings = headline["reference"], base_config["run"]
    lines = [
        f"# Optimizer comparison: preset `{base_config['preset']}`",
        "",
        f"{settings['max_steps']} steps of {settings['batch_size'] * settings['grad_accum']} x "
        f"{base_config['model']['block_size']} tokens, data `{base_config['data']['source']}`, "
        f"seeds {seeds}, "
        f"lr grid x{lr_multipliers}; {total_seconds / 60:.1f} min in all on "
        f"{results['machine']['cpu_count']} CPUs"
        f"{', ' + results['machine']['cuda'] if results['machine']['cuda'] else ''}, "
        f"torch {results['machine']['torch']}, sophia-pytorch "
        f"{results['machine'].get('sophia_pytorch', 'unknown')} (commit "
        f"{results['machine']['commit']}).",
        "",
        f"## Steps and time to reach {reference}'s final validation loss",
        "",
        f"Target: {reference}'s final validation loss at its tuned lr, per seed. Mean "
        "(min-max) over seeds; ratios are to "
        f"{reference}'s own steps/seconds to the same target (lower is better). The last column "
        f"reads the other way: the steps {reference} needed to match each optimizer's final "
        f"loss (not reached: that optimizer ended below {reference}).",
        "",
        "| optimizer | tuned lr | final val loss | steps to target | x steps | "
        f"seconds to target | x seconds | seeds reached | {reference} steps to match |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for optimizer, row in headline["optimizers"].items():
        lines.append(
            f"| {optimizer} | {row['lr']:.3g} | {_fmt(row['final_val_loss'], 4)} | "
            f"{_fmt(row['step'])} | {_fmt(row['step_ratio'], 2)} | {_fmt(row['seconds'], 1)} | "
            f"{_fmt(row['seconds_ratio'], 2)} | {row['reached']}/{row['seeds']} | "
            f"{_fmt(row['reference_steps_to_final'])} |"
        )
    lines += ["", "## Plots", "",
              "Each optimizer at its tuned lr, from the evaluation at step 0; with several "
              "seeds, the line is their mean and the band their min-max.", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plot_paths]
    lines += ["", SECONDS_CAPTION]
    per_step = tokens_per_step(records)
    if len(per_step) == 1:
        lines += ["", f"Every run took {per_step[0]:.0f} tokens a step, so tokens are steps "
                      f"x {per_step[0]:.0f}: no separate tokens plot."]
    lines += ["", "## Every run", "",
              "| optimizer | lr | seed | final val loss | steps | train s | Hessian s | "
              "skipped |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        mark = " (tuned)" if r.lr_multiplier == best_multipliers[r.optimizer] else ""
        final = "diverged" if r.diverged else f"{r.final_val_loss:.4f}"
        lines.append(f"| {r.optimizer} | {r.lr:.3g}{mark} | {r.seed} | {final} | "
                     f"{r.steps} | {r.train_seconds:.1f} | {r.hessian_seconds:.1f} | "
                     f"{r.skipped_steps} |")
    lines += ["", "Seconds count training steps and Hessian refreshes, not evaluation. "
              "Logs: `runs/*/log.jsonl`; everything above: `results.json`.", ""]
    report_path = out / "report.md"
    report_path.write_text("\n".join(lines))
    match = f"{reference} steps to match"
    text = [f"{'optimizer':10s} {'tuned lr':>9s} {'final val':>10s} {'steps to target':>16s} "
            f"{'x steps':>8s} {'x seconds':>9s} {match:>26s}"]
    for optimizer, row in headline["optimizers"].items():
        ratio = f"{row['step_ratio']['mean']:.2f}" if row["step_ratio"] else "-"
        seconds_ratio = f"{row['seconds_ratio']['mean']:.2f}" if row["seconds_ratio"] else "-"
        steps = f"{row['step']['mean']:.0f}" if row["step"] else "not reached"
        final_loss = row["final_val_loss"]["mean"] if row["final_val_loss"] else math.nan
        backwards = row["reference_steps_to_final"]
        backwards = f"{backwards['mean']:.0f}" if backwards else "not reached"
        text.append(f"{optimizer:10s} {row['lr']:9.3g} {final_loss:10.4f} {steps:>16s} "
                    f"{ratio:>8s} {seconds_ratio:>9s} {backwards:>26s}")
    text += [f"target: {reference}'s final val loss, per seed; x steps, x seconds: to the "
             f"target, over {reference}'s own;",
             f"{match}: the steps {reference} took to reach this optimizer's final val loss"]
    return CompareSummary(out_dir=out, report_path=report_path, results_path=results_path,
                          plot_paths=plot_paths, headline="\n".join(text), results=results)
