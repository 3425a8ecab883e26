"""Turn a committed ``results.json`` back into a comparison folder that ``sophia compare`` extends.

A comparison's ``results.json`` holds every run's record (its final loss and validation
curve), but not the run folders, which are too large to commit. This writes, for each run in
it, ``<out>/runs/<optimizer>-x<multiplier>-seed<seed>/record.json`` with the settings that
``sophia compare`` would give that run today. A later ``sophia compare --out <out>`` with the
same flags then reads those runs back instead of training them, and trains only what is new
(another optimizer, lr multiplier or seed); its report covers old and new runs alike.

Settings are rebuilt from the report's ``base_config``, so a run is only reused where today's
settings for it equal those it was trained with (compare checks; a mismatch retrains it, it is
never mixed in silently). The numbers are those of the code that trained them: the report's
``machine.commit``.

    python experiments/map_restore.py experiments/map/b256-s200/results.json runs/map/b256-s200
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sophia_pytorch.harness.compare.runner import RECORD, _Runs
from sophia_pytorch.harness.config import flatten, make_config, to_dict
from sophia_pytorch.harness.jsonio import write_json


def restore(results_path: Path, out: Path) -> list[Path]:
    """Write one ``record.json`` per run of ``results_path`` under ``out/runs``; return them.

    A run folder that already exists is left alone (it may hold a newer run)."""
    results = json.loads(results_path.read_text())
    base_values = flatten(results["base_config"])
    base = make_config(base_values.pop("preset", results["preset"]), base_values)
    runs = _Runs(base, {}, out, overwrite=False)  # compare's own folder names and settings
    written = []
    for record in results["runs"]:
        key = (record["optimizer"], record["lr_multiplier"], record["seed"])
        folder = runs.folder(*key)
        if folder.exists():
            continue
        folder.mkdir(parents=True)
        write_json(folder / RECORD, {"record": record, "config": to_dict(runs.config(*key))})
        written.append(folder / RECORD)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("results", type=Path, help="a comparison's results.json")
    parser.add_argument("out", type=Path, help="the comparison folder to restore into")
    args = parser.parse_args()
    written = restore(args.results, args.out)
    print(f"{len(written)} run records restored into {args.out / 'runs'}")


if __name__ == "__main__":
    main()
