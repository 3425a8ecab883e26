"""The tables of docs/WHEN_TO_USE_SOPHIA.md, recomputed from the committed results.

Every table in the guide sits between ``<!-- table:NAME -->`` and ``<!-- /table -->`` and is
this module's :func:`render` of NAME, so a figure and its data cannot drift apart
(tests/test_guide_tables.py checks each block). Comparisons are paired by seed (the same data
order and initialisation): the gap is ``loss(optimizer) − loss(reference)`` per seed, its mean
and a 95% Student-t interval over seeds; "not resolved" where that interval spans 0.

    python experiments/value/tables.py                 # print every table
    python experiments/value/tables.py --write GUIDE   # rewrite the guide's table blocks
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "WHEN_TO_USE_SOPHIA.md"
MAP = ROOT / "experiments" / "map"
VALUE = ROOT / "experiments" / "value"
OUTSIDE = VALUE / "outside_evidence.json"

# Two-sided 95% quantiles of Student's t with df degrees of freedom (df = seeds − 1).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131,
         16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086}


@dataclass(frozen=True)
class Run:
    """One finished run as a comparison's results.json records it."""

    optimizer: str
    variant: str  # "" or what sets the run apart within its optimizer (e.g. "no refresh")
    lr: float
    seed: int
    steps: int
    final: float
    evals: tuple[tuple[int, float], ...]  # (step, validation loss)

    @property
    def label(self) -> str:
        return f"{self.optimizer} ({self.variant})" if self.variant else self.optimizer


def load(paths: Iterable[Path]) -> list[Run]:
    """Every run of the results files, each (label, lr, seed, steps) once."""
    found: dict[tuple, Run] = {}
    for path in sorted(paths):
        results = json.loads(path.read_text())
        base = results["base_config"]["optimizer"]
        never = base["refresh_every"] >= results["base_config"]["run"]["max_steps"]
        for record in results["runs"]:
            variant = "never refreshed: h = 0" if never and record["optimizer"].startswith(
                "sophia") else ""
            run = Run(record["optimizer"], variant, record["lr"], record["seed"],
                      record["steps"], record["final_val_loss"],
                      tuple((e["step"], e["val_loss"]) for e in record["evals"]))
            found.setdefault((run.label, run.lr, run.seed, run.steps), run)
    return list(found.values())


@dataclass(frozen=True)
class Gap:
    """Paired per-seed gaps ``other − reference`` with their mean and 95% interval."""

    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    def interval(self) -> tuple[float, float] | None:
        if len(self.values) < 2:
            return None
        half = _T975[len(self.values) - 1] * statistics.stdev(self.values) / math.sqrt(
            len(self.values))
        return self.mean - half, self.mean + half

    def verdict(self) -> str:
        interval = self.interval()
        if interval is None:
            return "one seed"
        low, high = interval
        if low > 0:
            return "behind"
        if high < 0:
            return "ahead"
        return "not resolved"

    def text(self) -> str:
        interval = self.interval()
        shown = f"{self.mean:+.3f}"
        if interval is not None:
            shown += f" [{interval[0]:+.3f}, {interval[1]:+.3f}]"
        return shown


def paired(runs: list[Run], reference: list[Run]) -> Gap:
    """The per-seed gaps of ``runs`` to ``reference`` over the seeds both have."""
    by_seed = {r.seed: r.final for r in reference}
    return Gap(tuple(r.final - by_seed[r.seed] for r in sorted(runs, key=lambda r: r.seed)
                     if r.seed in by_seed))


def _finals(runs: list[Run]) -> str:
    values = [r.final for r in sorted(runs, key=lambda r: r.seed)]
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def _seeds(runs: list[Run]) -> str:
    return ",".join(str(r.seed) for r in sorted(runs, key=lambda r: r.seed))


def _best_lr_runs(runs: list[Run], label: str) -> list[Run]:
    """The runs of ``label`` at its grid's winner: the lr whose seed-0 run ended lowest (the
    protocol: the grid on seed 0, the other seeds at its best)."""
    mine = [r for r in runs if r.label == label]
    by_lr: dict[float, list[Run]] = {}
    for run in mine:
        by_lr.setdefault(run.lr, []).append(run)
    graded = {lr: min(r.final for r in group if r.seed == 0)
              for lr, group in by_lr.items() if any(r.seed == 0 for r in group)}
    return by_lr[min(graded, key=graded.__getitem__)]


def _lr_runs(runs: list[Run], label: str, lr: float) -> list[Run]:
    return [r for r in runs if r.label == label and math.isclose(r.lr, lr)]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the tables
def batch_map() -> str:
    """The tiny preset's first 200 steps at 8-256 sequences a step: each optimizer at its
    grid's best lr against AdamW at its row's lr (3e-3), paired by seed."""
    rows, pooled = [], {}
    for batch in (8, 32, 128, 256):
        folders = [MAP / f"b{batch}-s200"]
        if batch == 256:
            folders.append(MAP / "b256-s200-adamw-x1")
        runs = load(folder / "results.json" for folder in folders)
        reference = _lr_runs(runs, "adamw", 3e-3)
        rows.append([str(batch), "adamw", "0.003", _seeds(reference), _finals(reference),
                     "—", "—"])
        for label in ("sophiag", "lion", "muon"):
            if not any(r.label == label for r in runs):
                continue
            mine = _best_lr_runs(runs, label)
            gap = paired(mine, reference)
            pooled.setdefault(label, []).extend(gap.values)
            rows.append([str(batch), label, f"{mine[0].lr:.3g}", _seeds(mine), _finals(mine),
                         gap.text(), gap.verdict()])
    for label, values in pooled.items():  # every (batch, seed) pair as one sample
        gap = Gap(tuple(values))
        behind = sum(value > 0 for value in values)
        rows.append(["all", label, "", f"{len(values)} pairs, {behind} behind AdamW", "",
                     gap.text(), gap.verdict()])
    return _table(["batch (sequences)", "optimizer", "lr", "seeds", "final val loss",
                   "gap to AdamW, mean [95% interval]", "verdict"], rows)


def _small_runs() -> list[Run]:
    return load([MAP / "small-2000" / "results.json",
                 *VALUE.glob("small-*/results*.json")])


def _grid_verdict(lrs: list[float], best: float) -> str:
    """Where ``best`` sits in the seed-0 grid ``lrs``: inside it, or at an edge to extend."""
    if len(lrs) == 1:
        return "one lr only"
    if math.isclose(best, lrs[0]):
        return "lowest: extend down"
    if math.isclose(best, lrs[-1]):
        return "highest: extend up"
    return "interior"


def small_grid() -> str:
    """The small preset's seed-0 lr grid at the 2000-step horizon: each optimizer's final
    validation loss at every lr run, its best, and whether that best is inside the grid."""
    runs = [r for r in _small_runs() if r.steps == 2000 and r.seed == 0 and not r.variant]
    rows = []
    for label in ("adamw", "sophiag", "lion", "sophiah", "muon"):
        mine = sorted((r for r in runs if r.label == label), key=lambda r: r.lr)
        if not mine:
            continue
        best = min(mine, key=lambda r: r.final)
        grid = ", ".join(f"{r.lr:.3g}: {r.final:.3f}" for r in mine)
        rows.append([label, grid, f"{best.lr:.3g}",
                     _grid_verdict([r.lr for r in mine], best.lr)])
    return _table(["optimizer", "seed-0 lr grid (lr: final val loss)", "best lr", "best is"],
                  rows)


def small_rung() -> str:
    """The small preset (5.3M, 2000 steps, fully decayed): every optimizer and control at
    every lr run, paired by seed with AdamW at its seed-0 grid's best lr once that lr has 3
    seeds (until then at its row's lr, 1e-3)."""
    runs = [r for r in _small_runs() if r.steps == 2000]
    tuned = _best_lr_runs(runs, "adamw")
    reference = tuned if len(tuned) >= 3 else _lr_runs(runs, "adamw", 1e-3)
    rows = []
    labels = sorted({r.label for r in runs}, key=lambda label: (label != "adamw", label))
    for label in labels:
        for lr in sorted({r.lr for r in runs if r.label == label}):
            mine = _lr_runs(runs, label, lr)
            gap = paired(mine, reference) if label != "adamw" else None
            rows.append([label, f"{lr:.3g}", _seeds(mine), _finals(mine),
                         gap.text() if gap and gap.values else "—",
                         gap.verdict() if gap and gap.values else "—"])
    return _table(["optimizer", "lr", "seeds", "final val loss",
                   f"gap to AdamW (lr {reference[0].lr:.3g}), same seeds, mean [95% interval]",
                   "verdict"], rows)


def small_control() -> str:
    """Sophia-G against its h = 0 limit, Lion (signed momentum), on the small preset: each at
    its seed-0 grid's best lr, paired by seed (gap: Sophia-G − Lion)."""
    runs = [r for r in _small_runs() if r.steps == 2000]
    sophia, lion = _best_lr_runs(runs, "sophiag"), _best_lr_runs(runs, "lion")
    gap = paired(sophia, lion)
    shared = sorted({r.seed for r in sophia} & {r.seed for r in lion})
    rows = [[str(seed), f"{_by_seed(sophia)[seed]:.3f}", f"{_by_seed(lion)[seed]:.3f}",
             f"{_by_seed(sophia)[seed] - _by_seed(lion)[seed]:+.3f}"] for seed in shared]
    rows.append(["all", "", "", f"{gap.text()} ({gap.verdict()})"])
    return _table(["seed", f"sophiag (lr {sophia[0].lr:.3g})", f"lion (lr {lion[0].lr:.3g})",
                   "sophiag − lion, mean [95% interval]"], rows)


def small_phase() -> str:
    """When in the run Sophia-G loses: its validation gap to Lion on each seed every 200
    steps (each at its grid's best lr), and the mean gap to AdamW (the small-rung table's
    reference) over the same seeds."""
    runs = [r for r in _small_runs() if r.steps == 2000 and not r.variant]
    sophia, lion = _best_lr_runs(runs, "sophiag"), _best_lr_runs(runs, "lion")
    tuned = _best_lr_runs(runs, "adamw")
    adamw = tuned if len(tuned) >= 3 else _lr_runs(runs, "adamw", 1e-3)
    curves = {name: {r.seed: dict(r.evals) for r in group}
              for name, group in (("sophiag", sophia), ("lion", lion), ("adamw", adamw))}
    seeds = sorted(set(curves["sophiag"]) & set(curves["lion"]))
    both = sorted(set(curves["sophiag"]) & set(curves["adamw"]))
    rows = []
    for step in range(200, 2001, 200):
        to_lion = [curves["sophiag"][s][step] - curves["lion"][s][step] for s in seeds]
        to_adamw = [curves["sophiag"][s][step] - curves["adamw"][s][step] for s in both]
        rows.append([str(step), *(f"{gap:+.3f}" for gap in to_lion),
                     f"{statistics.fmean(to_lion):+.3f}", f"{statistics.fmean(to_adamw):+.3f}"])
    return _table(["step", *(f"seed {s}: sophiag − lion" for s in seeds), "mean",
                   f"mean sophiag − adamw ({adamw[0].lr:.3g}), seeds {_seeds(adamw)}"], rows)


def _by_seed(runs: list[Run]) -> dict[int, float]:
    return {r.seed: r.final for r in runs}


def small_curve() -> str:
    """Seed 0's validation loss every 200 steps on the small preset, each optimizer at its
    seed-0 grid's best lr, and the gaps to AdamW."""
    small = [r for r in _small_runs() if r.steps == 2000 and not r.variant]
    labels = [label for label in ("adamw", "sophiag", "lion", "muon")
              if any(r.label == label for r in small)]
    runs = {label: next(r for r in _best_lr_runs(small, label) if r.seed == 0)
            for label in labels}
    curves = {label: dict(runs[label].evals) for label in labels}
    rows = []
    for step in range(200, 2001, 200):
        row = [str(step)] + [f"{curves[label][step]:.3f}" for label in labels]
        row += [f"{curves[label][step] - curves['adamw'][step]:+.3f}" for label in labels[1:]]
        rows.append(row)
    header = [f"{label} ({runs[label].lr:.3g})" for label in labels]
    return _table(["step", *header, *(f"{label} − adamw" for label in labels[1:])], rows)


def small_clip() -> str:
    """Where Sophia-G's clip binds on the small preset, seed 0 at its best lr, every 200 steps
    (experiments/value/clip_by_kind.py): per parameter kind the unclipped share and the mean
    step in units of the lr (Lion's is 1), beside the validation gap to Lion on the same seed."""
    path = VALUE / "small-diagnosis" / "sophiag-seed0.json"
    if not path.exists():
        return "(not run yet: `experiments/value/queue.sh diagnose-sophiag`)"
    diagnosis = json.loads(path.read_text())
    records = {r["step"]: r for r in diagnosis["records"]}
    runs = _small_runs()
    lion = {r.seed: r for r in _lr_runs(runs, "lion", diagnosis["lr"]) if r.steps == 2000}
    sophia = {r.seed: r for r in _lr_runs(runs, "sophiag", diagnosis["lr"])
              if r.steps == 2000 and not r.variant}
    seed = diagnosis["seed"]
    gaps = dict(sophia[seed].evals) if seed in sophia and seed in lion else {}
    kinds = [k for k in ("embedding+head", "position", "attention", "mlp", "norm", "bias")
             if k in records[max(records)]["kinds"]]
    rows = []
    for step in range(200, diagnosis["steps"] + 1, 200):
        if step not in records:
            continue
        kinds_at = records[step]["kinds"]
        gap = (f"{gaps[step] - dict(lion[seed].evals)[step]:+.3f}" if step in gaps else "")
        rows.append([str(step), f"{records[step]['lr']:.2e}", gap] + [
            f"{kinds_at[k]['unclipped']:.2f} / {kinds_at[k]['step/lr']:.2f}" for k in kinds])
    return _table(["step", "lr", "sophiag − lion (val)", *kinds], rows)


def hybrids() -> str:
    """Muon beside Sophia-G against Muon beside AdamW on the tiny preset, 800 steps: each
    tuned on the part that differs, then 5 seeds at the best; AdamW alone for scale."""
    runs = load(VALUE.glob("tiny-800/results*.json"))
    if not runs:
        return "(no runs committed yet)"
    reference = _best_lr_runs(runs, "muon-adamw") if any(
        r.label == "muon-adamw" for r in runs) else []
    rows = []
    for label in ("muon-adamw", "muon-sophiag", "adamw"):
        if not any(r.label == label for r in runs):
            continue
        grid = sorted({r.lr for r in runs if r.label == label and r.seed == 0})
        grid_text = ", ".join(f"{lr:.3g}: {_lr_runs(runs, label, lr)[0].final:.3f}"
                              for lr in grid if any(r.seed == 0 for r in
                                                    _lr_runs(runs, label, lr)))
        mine = _best_lr_runs(runs, label)
        gap = paired(mine, reference) if label != "muon-adamw" and reference else None
        rows.append([label, grid_text, f"{mine[0].lr:.3g}", _seeds(mine), _finals(mine),
                     gap.text() if gap and gap.values else "—",
                     gap.verdict() if gap and gap.values else "—"])
    return _table(["optimizer", "seed-0 lr grid (lr: final)", "best lr", "seeds",
                   "final val loss", "gap to muon-adamw, same seeds, mean [95% interval]",
                   "verdict"], rows)


def small_hybrids() -> str:
    """The hybrids on the small preset, seed 0, 2000 steps: Muon beside Sophia-G and beside
    AdamW, each part at ×3.33 of its row (the tiny preset's best for both), with Muon alone and
    tuned AdamW on the same seed for scale."""
    runs = [r for r in _small_runs() if r.steps == 2000 and r.seed == 0 and not r.variant]
    hybrids = {r.label: r for r in runs if r.label in ("muon-adamw", "muon-sophiag")}
    if not hybrids:
        return "(not run yet: `experiments/value/queue.sh hybrid-adamw-x3.33`, " \
            "`hybrid-sophiag-x3.33`)"
    shown = [*(hybrids[label] for label in ("muon-adamw", "muon-sophiag") if label in hybrids),
             *(_best_lr_runs(runs, label)[0] for label in ("muon", "adamw")
               if any(r.label == label for r in runs))]
    reference = hybrids.get("muon-adamw")
    rows = [[r.label, f"{r.lr:.3g}", f"{r.final:.3f}",
             f"{r.final - reference.final:+.3f}" if reference and r is not reference else "—"]
            for r in shown]
    return _table(["optimizer", "lr (hybrids: of the part that differs)", "seed-0 final val loss",
                   "gap to muon-adamw"], rows)


def outside() -> str:
    """The outside evidence: final losses from other groups' tuned comparisons, with sources
    (experiments/value/outside_evidence.json)."""
    evidence = json.loads(OUTSIDE.read_text())
    rows = [[row["study"], row["model"], row["data"], f"{row['adamw']:.3f}",
             f"{row['sophia']:.3f}", f"{row['sophia'] - row['adamw']:+.3f}", row["source"]]
            for row in evidence["rows"]]
    return _table(["study", "model", "tokens", "AdamW", "Sophia", "Sophia − AdamW", "source"],
                  rows)


TABLES: dict[str, Callable[[], str]] = {
    "outside": outside, "batch-map": batch_map, "small-grid": small_grid,
    "small-rung": small_rung, "small-control": small_control, "small-phase": small_phase,
    "small-curve": small_curve, "small-clip": small_clip, "hybrids": hybrids,
    "small-hybrids": small_hybrids,
}
# A block's body never holds another block's marker, so an empty or unclosed block cannot
# swallow the text up to the next block's end.
_BLOCK = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>(?:(?!<!-- ).)*?)"
                    r"(\n<!-- /table -->)", re.S)


def render(name: str) -> str:
    """The markdown of table ``name`` (a key of :data:`TABLES`)."""
    return TABLES[name]()


def blocks(text: str) -> dict[str, str]:
    """The table blocks of a guide's text: name -> body."""
    return {m["name"]: m["body"] for m in _BLOCK.finditer(text)}


def rewrite(text: str) -> str:
    """``text`` with every table block replaced by its fresh :func:`render`."""
    return _BLOCK.sub(lambda m: m.group(1) + render(m["name"]) + m.group(4), text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--write", type=Path, metavar="GUIDE",
                        help="rewrite the table blocks of GUIDE in place")
    args = parser.parse_args()
    if args.write:
        fresh = rewrite(args.write.read_text())
        temporary = args.write.with_suffix(".tmp")
        temporary.write_text(fresh)
        temporary.replace(args.write)
        return
    for name in TABLES:
        print(f"## {name}\n\n{render(name)}\n")


if __name__ == "__main__":
    main()
