"""``sophia compare``: several optimizers on one preset, the same data order and seeds.

For each optimizer: first its lr grid (multipliers of the preset's lr, min_lr scaled
alike) with the first seed; the multiplier with the lowest final validation loss is its
tuned lr; then the remaining seeds at that lr. Runs are sequential in this process, each in
``<out>/runs/<optimizer>-lr<lr>-seed<seed>/``; the report goes to ``<out>/report.md``,
``<out>/results.json`` and ``<out>/*.png`` (see ``sophia_pytorch.harness.compare.report``).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

from ..config import (
    PRESETS,
    ROW_FIELDS,
    SOPHIA,
    Config,
    base_optimizer,
    flatten,
    make_config,
    optimizer_names,
    to_dict,
)
from ..errors import SophiaError
from ..trainer import train
from .records import CompareSummary, RunRecord
from .report import write_report

__all__ = ["compare"]

def _run_config(base: Config, overrides: dict[str, Any], optimizer: str, multiplier: float,
                seed: int, run_dir: Path) -> Config:
    """``base`` with this optimizer's preset row (lr scaled by ``multiplier``), except the
    row fields the user fixed in ``overrides`` (flat names)."""
    values = {k: v for k, v in flatten(to_dict(base)).items() if k not in ROW_FIELDS}
    values.update({k: overrides[k] for k in ROW_FIELDS if overrides.get(k) is not None})
    if base_optimizer(optimizer) not in SOPHIA:
        values["sophia_options"] = {}
    row = PRESETS[base.preset].optimizers[base_optimizer(optimizer)]
    values.update(optimizer=optimizer, seed=seed, out_dir=str(run_dir),
                  lr=values.get("lr", row.lr) * multiplier,
                  min_lr=values.get("min_lr", row.min_lr) * multiplier)
    return make_config(base.preset, values)


def _final(record: RunRecord) -> float:
    return record.final_val_loss if math.isfinite(record.final_val_loss) else math.inf


def compare(base: Config, *, optimizers: list[str] | tuple[str, ...] = ("sophiag", "adamw"),
            lr_multipliers: list[float] | tuple[float, ...] = (1.0,),
            seeds: list[int] | tuple[int, ...] = (0,), out_dir: str | Path | None = None,
            overrides: dict[str, Any] | None = None) -> CompareSummary:
    """Run the comparison and write its report.

    Args:
        base: settings shared by every run (model, data, steps, batch); its optimizer
            fields are ignored, each optimizer takes the preset's row instead.
        optimizers: names from ``sophia_pytorch.harness.config.optimizer_names()``.
        lr_multipliers: the lr grid, as multiples of each optimizer's preset lr.
        seeds: model-initialisation and data-order seeds; the grid uses the first.
        out_dir: the comparison folder (default ``runs/compare-<preset>-<time>``).
        overrides: optimizer hyperparameters the user fixed for every optimizer (e.g. lr).
    """
    for name in optimizers:
        if name not in optimizer_names():
            raise SophiaError(f"unknown optimizer {name!r} in --optimizers; choose from "
                              f"{', '.join(optimizer_names())}")
    if not seeds or not lr_multipliers:
        raise SophiaError("compare needs at least one seed and one lr multiplier")
    if any(not m > 0 for m in lr_multipliers):
        raise SophiaError(f"lr multipliers must be positive, got {list(lr_multipliers)}")
    out = Path(out_dir) if out_dir else \
        Path("runs") / f"compare-{base.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = overrides or {}
    records: list[RunRecord] = []
    started = time.perf_counter()

    def run(optimizer: str, multiplier: float, seed: int) -> RunRecord:
        folder = out / "runs" / f"{optimizer}-x{multiplier:g}-seed{seed}"
        config = _run_config(base, overrides, optimizer, multiplier, seed, folder)
        record = RunRecord.from_result(train(config), multiplier)
        records.append(record)
        print(f"{optimizer} lr={record.lr:.3g} seed={seed}: final val loss "
              f"{record.final_val_loss:.4f} after {record.steps} steps, "
              f"{record.train_seconds:.1f} s", file=sys.stderr, flush=True)
        return record

    best: dict[str, float] = {}
    for optimizer in optimizers:
        grid = [run(optimizer, m, seeds[0]) for m in lr_multipliers]
        best[optimizer] = min(grid, key=_final).lr_multiplier
        for seed in seeds[1:]:
            run(optimizer, best[optimizer], seed)
    return write_report(
        out, records=records, best_multipliers=best, base_config=to_dict(base),
        optimizers=list(optimizers), lr_multipliers=list(lr_multipliers), seeds=list(seeds),
        total_seconds=time.perf_counter() - started,
    )
