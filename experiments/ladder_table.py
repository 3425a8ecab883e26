"""The training-length ladder as one table, from the ``results.json`` of ``sophia compare`` runs.

Each folder is one rung (one ``sophia compare --max-steps N`` with the reference optimizer,
AdamW, among its optimizers). For every optimizer the table gives its tuned lr, its final
validation loss (mean and range over seeds), how many seeds reached the reference's final loss
and in what share of the reference's steps, and — read the other way — the share of the rung
the reference needed to reach this optimizer's final loss.

    python experiments/ladder_table.py runs/ladder-200 runs/ladder-800 runs/ladder-3200
    python experiments/ladder_table.py runs/small-2000 --curve 100   # and the curves
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _range(stats: dict | None, digits: int = 3) -> str:
    if not stats:
        return "—"
    return f"{stats['mean']:.{digits}f} ({stats['min']:.{digits}f}–{stats['max']:.{digits}f})"


def rows(folder: Path) -> list[str]:
    results = json.loads((folder / "results.json").read_text())
    steps = results["base_config"]["run"]["max_steps"] if "run" in results["base_config"] \
        else results["base_config"]["max_steps"]
    headline = results["headline"]
    reference = headline["reference"]
    out = []
    for name, entry in headline["optimizers"].items():
        reached = f"{entry['reached']}/{entry['seeds']}"
        ratio = "—" if name == reference else (
            _range(entry["step_ratio"], 2) if entry["step_ratio"] else "not reached")
        back = entry.get("reference_steps_to_final")
        back_share = "—" if name == reference or not back else \
            f"{back['mean'] / steps:.2f} ({back['min'] / steps:.2f}–{back['max'] / steps:.2f})"
        out.append(f"| {steps} | {name} | {entry['lr']:.3g} | {_range(entry['final_val_loss'])} "
                   f"| {reached} | {ratio} | {back_share} |")
    return out


def curve(folder: Path, every: int) -> list[str]:
    """Validation loss every ``every`` steps of each optimizer's tuned run (the first seed),
    and each one's difference to the reference (AdamW) at the same step."""
    results = json.loads((folder / "results.json").read_text())
    reference = results["headline"]["reference"]
    best, seed = results["best_multipliers"], results["seeds"][0]
    curves = {r["optimizer"]: {int(e["step"]): e["val_loss"] for e in r["evals"]}
              for r in results["runs"]
              if r["seed"] == seed and r["lr_multiplier"] == best[r["optimizer"]]}
    names = [n for n in results["optimizers"] if n in curves]
    others = [n for n in names if n != reference]
    lines = ["| step | " + " | ".join(names) + " | "
             + " | ".join(f"{n} − {reference}" for n in others) + " |",
             "|---" * (1 + len(names) + len(others)) + "|"]
    for step in sorted(curves[reference]):
        if step % every or step == 0:
            continue
        values = [curves[n].get(step) for n in names]
        gaps = [curves[n][step] - curves[reference][step] if step in curves[n] else None
                for n in others]
        lines.append(f"| {step} | " + " | ".join("—" if v is None else f"{v:.3f}" for v in values)
                     + " | " + " | ".join("—" if g is None else f"{g:+.3f}" for g in gaps) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("folders", nargs="+", type=Path, help="sophia compare output folders")
    parser.add_argument("--curve", type=int, default=0, metavar="N",
                        help="also print each folder's validation curves every N steps")
    args = parser.parse_args()
    print("| steps | optimizer | tuned lr | final val loss, mean (min–max) | seeds reaching "
          "AdamW's final loss | × AdamW's steps to it | AdamW's share of the rung to reach "
          "this final loss |")
    print("|---|---|---|---|---|---|---|")
    for folder in args.folders:
        for row in rows(folder):
            print(row)
    for folder in args.folders if args.curve else []:
        print(f"\n{folder}:\n")
        print("\n".join(curve(folder, args.curve)))


if __name__ == "__main__":
    main()
