"""The batch-size map as tables and one plot, from ``sophia compare`` folders.

Reads every ``b<BATCH>-s<STEPS>/results.json`` under the map folder that
``experiments/batch_map.sh`` fills, and prints, per batch size and length, each optimizer's
tuned lr (and whether it sat at the edge of its grid), its final validation loss (mean,
min–max over seeds), its gap to AdamW's final loss paired by seed, how many seeds reached
AdamW's final loss and in what multiple of AdamW's steps, and — read the other way — the share
of the run AdamW needed to reach this optimizer's final loss. Two views: equal steps (every
batch size for the same number of steps) and equal tokens (runs grouped by batch × steps).

    python experiments/batch_map_table.py runs/map [--plot docs/img/batch_map.png]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

TOKENS_PER_ROW = 64  # the tiny preset's context


def _spread(values: list[float], digits: int = 3) -> str:
    if not values:
        return "—"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def load(folder: Path) -> dict:
    """One rung: batch, steps, and per optimizer its tuned runs' figures."""
    match = re.fullmatch(r"b(\d+)-s(\d+)", folder.name)
    if match is None or not (folder / "results.json").exists():
        raise FileNotFoundError(folder)
    batch, steps = int(match[1]), int(match[2])
    results = json.loads((folder / "results.json").read_text())
    headline = results["headline"]
    runs = results["runs"]
    rung = {"batch": batch, "steps": steps, "tokens": batch * steps * TOKENS_PER_ROW,
            "commit": results.get("machine", {}).get("commit", "unknown"), "optimizers": {},
            "curves": {}}
    for name, entry in headline["optimizers"].items():
        first_seed = min(r["seed"] for r in runs if r["optimizer"] == name)
        grid = sorted({r["lr_multiplier"] for r in runs
                       if r["optimizer"] == name and r["seed"] == first_seed})
        best = next(r["lr_multiplier"] for r in runs
                    if r["optimizer"] == name and r["lr"] == entry["lr"])
        edge = len(grid) > 1 and best in (grid[0], grid[-1])
        per_seed = entry["per_seed"]
        rung["curves"][name] = {r["seed"]: {e["tokens"]: e["val_loss"] for e in r["evals"]}
                                for r in runs if r["optimizer"] == name and r["lr"] == entry["lr"]}
        rung["optimizers"][name] = {
            "lr": entry["lr"], "multiplier": best, "edge": edge,
            "final": [e["final_val_loss"] for e in per_seed],
            "gap": [e["final_val_loss"] - e["target"] for e in per_seed],
            "reached": entry["reached"], "seeds": entry["seeds"],
            "step_ratio": [e["step_ratio"] for e in per_seed if e["step_ratio"] is not None],
            "share": [e["reference_steps_to_final"] / steps for e in per_seed
                      if e["reference_steps_to_final"] is not None],
        }
    return rung


def table(rungs: list[dict]) -> list[str]:
    lines = ["| batch (rows) | steps | tokens | optimizer | tuned lr (× row) | final val loss, "
             "mean (min–max) | gap to AdamW, same seed | seeds reaching AdamW's final loss "
             "| × AdamW's steps to it | AdamW's share of the run to reach this loss |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for rung in rungs:
        for name, row in rung["optimizers"].items():
            adamw = name == "adamw"
            lr = f"{row['lr']:.3g} (×{row['multiplier']:g}{', edge' if row['edge'] else ''})"
            ratio = "—" if adamw else (_spread(row["step_ratio"], 2) if row["step_ratio"]
                                       else "not reached")
            reached = "—" if adamw else f"{row['reached']}/{row['seeds']}"
            lines.append(
                f"| {rung['batch']} | {rung['steps']} | {rung['tokens'] / 1e6:.2f}M | {name} "
                f"| {lr} | {_spread(row['final'])} | {'—' if adamw else _spread(row['gap'])} "
                f"| {reached} | {ratio} "
                f"| {'—' if adamw else _spread(row['share'], 2)} |")
    return lines


def equal_tokens(rungs: list[dict]) -> list[str]:
    """At each rung's final token count, every rung whose validation curve has a point there:
    the larger batches mid-run (their lr schedule not finished), paired by seed."""
    lines = ["| tokens | batch (rows) | at step | AdamW val loss | Sophia-G val loss | "
             "Sophia-G − AdamW, same seed | point |", "|---|---|---|---|---|---|---|"]
    for tokens in sorted({r["tokens"] for r in rungs}):
        for rung in sorted(rungs, key=lambda r: r["batch"]):
            curves = rung["curves"]
            if "adamw" not in curves or "sophiag" not in curves:
                continue
            seeds = sorted(set(curves["adamw"]) & set(curves["sophiag"]))
            pairs = [(curves["adamw"][s].get(tokens), curves["sophiag"][s].get(tokens))
                     for s in seeds]
            pairs = [(a, g) for a, g in pairs if a is not None and g is not None]
            if not pairs:
                continue
            step = tokens // (rung["batch"] * TOKENS_PER_ROW)
            lines.append(
                f"| {tokens / 1e6:.2f}M | {rung['batch']} | {step} of {rung['steps']} "
                f"| {_spread([a for a, _ in pairs])} | {_spread([g for _, g in pairs])} "
                f"| {_spread([g - a for a, g in pairs])} "
                f"| {'end of run' if step == rung['steps'] else 'mid-run'} |")
    return lines


def reference_checks(folder: Path, rungs: list[dict],
                     gathered: list[tuple[int, int, list[float]]]) -> list[str]:
    """Sophia-G against AdamW at another lr on every seed: ``b<B>-s<S>-adamw-x<M>`` folders
    (``sophia compare --optimizers adamw --lr-grid M --seeds 3``), paired by seed with the
    rung's tuned Sophia-G runs. Where the grid's seed-0 winner is unstable on other seeds,
    this is the steadier baseline. Appends (batch, steps, gaps by seed) to ``gathered``."""
    lines = ["| batch (rows) | steps | AdamW lr | AdamW final val loss | Sophia-G final val loss "
             "| Sophia-G − AdamW, same seed | seeds where Sophia-G is lower |",
             "|---|---|---|---|---|---|---|"]
    by_rung = {(r["batch"], r["steps"]): r for r in rungs}
    for child in sorted(folder.iterdir()):
        match = re.fullmatch(r"b(\d+)-s(\d+)-adamw-x([\d.]+)", child.name)
        if match is None or not (child / "results.json").exists():
            continue
        rung = by_rung.get((int(match[1]), int(match[2])))
        if rung is None or "sophiag" not in rung["curves"]:
            continue
        runs = json.loads((child / "results.json").read_text())["runs"]
        adamw = {r["seed"]: r["final_val_loss"] for r in runs if r["optimizer"] == "adamw"}
        sophia = {s: curve[max(curve)] for s, curve in rung["curves"]["sophiag"].items()}
        seeds = sorted(set(adamw) & set(sophia))
        gaps = [sophia[s] - adamw[s] for s in seeds]
        lr = next(r["lr"] for r in runs if r["optimizer"] == "adamw")
        gathered.append((rung["batch"], rung["steps"], gaps))
        lines.append(
            f"| {rung['batch']} | {rung['steps']} | {lr:.3g} (×{match[3]}) "
            f"| {_spread([adamw[s] for s in seeds])} | {_spread([sophia[s] for s in seeds])} "
            f"| {_spread(gaps)} | {sum(g < 0 for g in gaps)}/{len(gaps)} |")
    return lines if len(lines) > 2 else []


def plot(rungs: list[dict], path: Path, checks: list[tuple[int, int, list[float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps_view = sorted({r["steps"] for r in rungs},
                        key=lambda s: -sum(r["steps"] == s for r in rungs))[0]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = sorted({n for r in rungs for n in r["optimizers"] if n != "adamw"})
    for name in names:
        same = sorted((r for r in rungs if r["steps"] == steps_view and name in r["optimizers"]),
                      key=lambda r: r["batch"])
        xs = [r["batch"] for r in same]
        gaps = [r["optimizers"][name]["gap"] for r in same]
        means = [statistics.fmean(g) for g in gaps]
        left.errorbar(xs, means, yerr=[[m - min(g) for m, g in zip(means, gaps)],
                                       [max(g) - m for m, g in zip(means, gaps)]],
                      marker="o", capsize=3, label=name)
    for batch, steps, gaps in checks:
        if steps == steps_view:
            mean = statistics.fmean(gaps)
            left.errorbar([batch * 1.06], [mean], yerr=[[mean - min(gaps)], [max(gaps) - mean]],
                          marker="D", mfc="white", capsize=3, color="black",
                          label="sophiag vs AdamW at its steadier lr")
    left.axhline(0, color="black", lw=0.8)
    left.set(xscale="log", xlabel="batch (sequences of 64 tokens per step)",
             ylabel="final val loss − AdamW's (nats, same seed)",
             title=f"equal steps ({steps_view} each)")
    left.set_xticks(sorted({r["batch"] for r in rungs}),
                    [str(b) for b in sorted({r["batch"] for r in rungs})])
    left.legend(fontsize=8, loc="upper left", ncol=2)
    for tokens in sorted({r["tokens"] for r in rungs}):
        xs, gaps = [], []
        for rung in sorted(rungs, key=lambda r: r["batch"]):
            curves = rung["curves"]
            if "adamw" not in curves or "sophiag" not in curves:
                continue
            pairs = [(curves["adamw"][s].get(tokens), curves["sophiag"][s].get(tokens))
                     for s in set(curves["adamw"]) & set(curves["sophiag"])]
            pairs = [g - a for a, g in pairs if a is not None and g is not None]
            if pairs:
                xs.append(rung["batch"])
                gaps.append(statistics.fmean(pairs))
        if len(xs) >= 2:
            right.plot(xs, gaps, marker="o", label=f"sophiag, {tokens / 1e6:.2f}M tokens")
    right.axhline(0, color="black", lw=0.8)
    right.set(xscale="log", xlabel="batch (sequences per step)",
              ylabel="val loss − AdamW's at these tokens (nats, seed mean)",
              title="equal tokens (read off the curves; larger batches mid-run)")
    right.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("folder", type=Path, help="the map folder (runs/map)")
    parser.add_argument("--plot", type=Path, default=None, help="write the plot here (PNG)")
    args = parser.parse_args()
    rungs = []
    for child in sorted(args.folder.iterdir()):
        try:
            rungs.append(load(child))
        except FileNotFoundError:
            continue
    rungs.sort(key=lambda r: (r["steps"] * r["batch"], r["batch"]))
    print("\n".join(table(rungs)))
    print("\nEqual tokens, read off the validation curves:\n")
    print("\n".join(equal_tokens(rungs)))
    gathered: list[tuple[int, int, list[float]]] = []
    checks = reference_checks(args.folder, rungs, gathered)
    if checks:
        print("\nAgainst AdamW at another lr, on every seed:\n")
        print("\n".join(checks))
    print("\ncommits:", ", ".join(sorted({r["commit"] for r in rungs})))
    if args.plot:
        plot(rungs, args.plot, gathered)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
