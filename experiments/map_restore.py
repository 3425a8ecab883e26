"""Turn a committed ``results.json`` back into a comparison folder that ``sophia compare`` extends.

A comparison's ``results.json`` holds every run's record (its final loss and validation
curve), but not the run folders, which are too large to commit. This writes, for each run in
it, ``<out>/runs/<optimizer>-x<multiplier>-seed<seed>/record.json`` with the settings that
``sophia compare`` would give that run today. A later ``sophia compare --out <out>`` with the
same flags then reads those runs back instead of training them, and trains only what is new
(another optimizer, lr multiplier or seed); its report covers old and new runs alike.

Settings are rebuilt from the report's ``base_config`` and today's preset rows, then checked
against what the report recorded of each run: a run whose recorded lr differs from the lr
today's row and its multiplier give (the row was retuned since), or whose optimizer's betas,
weight decay, rho or lr floor in ``base_config`` differ from today's row, is not restored (it is
listed, with the difference), so compare trains it anew at today's settings instead of reading
back a run trained at others. Row fields the report does not record for an optimizer (those of
optimizers other than ``base_config``'s) are assumed unchanged. The numbers are those of the
code that trained them: the report's ``machine.commit``.

    python experiments/map_restore.py experiments/map/b256-s200/results.json runs/map/b256-s200
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from sophia_pytorch.harness.compare.runner import RECORD, _Runs
from sophia_pytorch.harness.config import flatten, make_config, to_dict
from sophia_pytorch.harness.jsonio import write_json


def restore(results_path: Path, out: Path) -> tuple[list[Path], list[str]]:
    """Write one ``record.json`` per run of ``results_path`` under ``out/runs``.

    Returns ``(written, refused)``: the records written, and one line per run not restored
    because today's settings for it differ from those it was trained with (see the module's
    docstring). A run folder that already exists is left alone (it may hold a newer run)."""
    results = json.loads(results_path.read_text())
    base_values = flatten(results["base_config"])
    base = make_config(base_values.pop("preset", results["preset"]), base_values)
    runs = _Runs(base, {}, out, overwrite=False)  # compare's own folder names and settings
    recorded_row = results["base_config"]["optimizer"]
    written, refused = [], []
    for record in results["runs"]:
        key = (record["optimizer"], record["lr_multiplier"], record["seed"])
        config = runs.config(*key)
        difference = _difference(record, recorded_row, config.optimizer)
        if difference:
            refused.append(f"{runs.folder(*key).name}: {difference}")
            continue
        folder = runs.folder(*key)
        if folder.exists():
            continue
        folder.mkdir(parents=True)
        write_json(folder / RECORD, {"record": record, "config": to_dict(config)})
        written.append(folder / RECORD)
    return written, refused


def _difference(record: dict[str, Any], recorded_row: dict[str, Any], today: Any) -> str:
    """How today's optimizer settings for ``record``'s run differ from what the report says it
    trained with ("" when they agree as far as the report tells)."""
    if not math.isclose(record["lr"], today.lr, rel_tol=1e-9):
        return f"trained at lr {record['lr']:g}, today's row gives {today.lr:g}"
    if recorded_row.get("name") != record["optimizer"]:
        return ""
    lr_floor = recorded_row["min_lr"] / recorded_row["lr"] * record["lr"]
    recorded = {"beta1": recorded_row["beta1"], "beta2": recorded_row["beta2"],
                "weight_decay": recorded_row["weight_decay"], "rho": recorded_row["rho"],
                "min_lr": lr_floor}
    now = {"beta1": today.betas[0], "beta2": today.betas[1],
           "weight_decay": today.weight_decay, "rho": today.rho, "min_lr": today.min_lr}
    changed = [f"{name} {recorded[name]:g} (today {now[name]:g})" for name in recorded
               if not math.isclose(recorded[name], now[name], rel_tol=1e-9)]
    return f"trained with {', '.join(changed)}" if changed else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("results", type=Path, help="a comparison's results.json")
    parser.add_argument("out", type=Path, help="the comparison folder to restore into")
    args = parser.parse_args()
    written, refused = restore(args.results, args.out)
    print(f"{len(written)} run records restored into {args.out / 'runs'}")
    for line in refused:
        print(f"not restored (compare trains it at today's settings): {line}")


if __name__ == "__main__":
    main()
