"""``sophia compare``: several optimizers on one preset, the same data order and seeds.

For each optimizer: first its lr grid (multipliers of the preset's lr, min_lr scaled
alike) with the first seed; the multiplier with the lowest final validation loss is its
tuned lr; then the remaining seeds at that lr. Runs are sequential in this process, each in
``<out>/runs/<optimizer>-x<multiplier>-seed<seed>/``; the report goes to ``<out>/report.md``,
``<out>/results.json`` and ``<out>/*.png`` (see ``sophia_pytorch.harness.compare.report``).

A comparison folder can be run into again. A run folder whose ``record.json`` shows a
finished run with the same settings is read back, not retrained; one killed mid-training
resumes from its checkpoint (or, without one, trains again). So a comparison killed midway
picks up where it stopped, and a second ``sophia compare --out DIR`` with more optimizers,
lr multipliers or seeds trains only what is new; the report covers every finished run with
these settings found in the folder for the requested optimizers.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..checkpoint import CHECKPOINT, load_checkpoint
from ..config import (
    OPTIMIZERS,
    PRESETS,
    ROW_FIELDS,
    Config,
    base_optimizer,
    flatten,
    identity,
    make_config,
    optimizer_names,
    to_dict,
)
from ..errors import DivergedError, SophiaError, did_you_mean, writing
from ..jsonio import write_json
from ..rundir import RunLock, clear_run, holds_run, is_sophia_run
from ..trainer import train
from .records import CompareSummary, RunRecord
from .report import write_report

__all__ = ["compare", "default_out_dir"]

RECORD = "record.json"


def _run_config(base: Config, overrides: dict[str, Any], optimizer: str, multiplier: float,
                seed: int, run_dir: Path) -> Config:
    """``base`` with this optimizer's preset row (lr and min_lr scaled by ``multiplier``);
    ``overrides`` may not fix a row field (see :func:`refuse_shared_rows`)."""
    refuse_shared_rows(overrides)
    values = {k: v for k, v in flatten(to_dict(base)).items() if k not in ROW_FIELDS}
    if not OPTIMIZERS[optimizer].takes_options:
        values["sophia_options"] = {}
    row = PRESETS[base.preset].optimizers[base_optimizer(optimizer)]
    values.update(optimizer=optimizer, seed=seed, out_dir=str(run_dir),
                  lr=row.lr * multiplier, min_lr=row.min_lr * multiplier)
    return make_config(base.preset, values)


def refuse_shared_rows(overrides: dict[str, Any], where: str = "the overrides") -> None:
    """Refuse a row field (lr, min_lr, betas, weight decay, rho) given once for every
    compared optimizer: it would silently make the comparison unfair (one lr for AdamW and
    Muon). Each optimizer takes its preset row, its lr scaled by the lr grid."""
    given = [k for k in ROW_FIELDS if overrides.get(k) is not None]
    if given:
        raise SophiaError(
            f"{given[0]} from {where} would apply to every compared optimizer; compare gives "
            f"each optimizer its own preset row (lr scaled by --lr-grid): drop {given[0]}, "
            "or train one optimizer with it through `sophia train`"
        )


def multiplier_name(multiplier: float) -> str:
    """``multiplier`` as a run folder names it: ``:g`` (``1``, ``0.5``) where that is exact,
    else the shortest repr that is (``0.1234567``), so two grid points never share a
    folder."""
    short = f"{multiplier:g}"
    return short if float(short) == multiplier else repr(float(multiplier))


def _final(record: RunRecord) -> float:
    return record.final_val_loss if math.isfinite(record.final_val_loss) else math.inf


def _differences(wanted: dict[str, Any], found: dict[str, Any]) -> str:
    keys = sorted(k for k in wanted.keys() | found.keys() if wanted.get(k) != found.get(k))
    return ", ".join(f"{k} {found.get(k)!r} (now {wanted.get(k)!r})" for k in keys[:3])


class _Runs:
    """The comparison folder's runs: each trained, resumed or read back, and remembered."""

    def __init__(self, base: Config, overrides: dict[str, Any], out: Path,
                 overwrite: bool) -> None:
        self.base, self.overrides, self.out, self.overwrite = base, overrides, out, overwrite
        self.records: dict[tuple[str, float, int], RunRecord] = {}

    def folder(self, optimizer: str, multiplier: float, seed: int) -> Path:
        return self.out / "runs" / f"{optimizer}-x{multiplier_name(multiplier)}-seed{seed}"

    def config(self, optimizer: str, multiplier: float, seed: int) -> Config:
        return _run_config(self.base, self.overrides, optimizer, multiplier, seed,
                           self.folder(optimizer, multiplier, seed))

    def found(self, optimizer: str) -> list[tuple[float, int]]:
        """(multiplier, seed) of the finished runs of ``optimizer`` with these settings."""
        pairs = []
        for path in sorted((self.out / "runs").glob(f"{optimizer}-x*-seed*/{RECORD}")):
            saved = _read_record(path)
            if saved is None or saved["record"]["optimizer"] != optimizer:
                continue
            multiplier, seed = saved["record"]["lr_multiplier"], saved["record"]["seed"]
            if identity(saved["config"]) == identity(self.config(optimizer, multiplier, seed)):
                pairs.append((multiplier, seed))
        return pairs

    def run(self, optimizer: str, multiplier: float, seed: int) -> RunRecord:
        """The finished run (optimizer, multiplier, seed): read back, resumed or trained."""
        key = (optimizer, multiplier, seed)
        if key in self.records:
            return self.records[key]
        config = self.config(*key)
        folder, wanted = self.folder(*key), identity(config)
        saved = _read_record(folder / RECORD)
        if saved is not None and identity(saved["config"]) == wanted:
            record, verb = RunRecord.from_dict(saved["record"]), "found"
        else:
            resume = self._resumable(folder, wanted, saved)
            try:
                record = RunRecord.from_result(train(config, resume=resume), multiplier)
            except DivergedError as exc:  # a grid point too hot: recorded, not the best
                print(f"{optimizer} x{multiplier:g} seed={seed}: {exc.problem}; recorded as "
                      "diverged (never the tuned lr)", file=sys.stderr)
                record = RunRecord.from_result(exc.result, multiplier, diverged=True)
            with writing("--out", folder):
                write_json(folder / RECORD, {"record": asdict(record),
                                             "config": to_dict(config)})
            verb = "resumed" if resume else "trained"
        self.records[key] = record
        print(f"{optimizer} lr={record.lr:.3g} seed={seed} ({verb}): final val loss "
              f"{record.final_val_loss:.4f} after {record.steps} steps, "
              f"{record.train_seconds:.1f} s", file=sys.stderr, flush=True)
        return record

    def check(self, keys: list[tuple[str, float, int]]) -> None:
        """Refuse, before any run trains, a comparison one of whose runs ``keys`` (optimizer,
        multiplier, seed) would be refused once reached: settings that do not validate, or a
        folder holding a run with other settings or files no sophia run wrote. (Refused
        halfway, a comparison would leave a run trained with the mistaken settings, which
        then blocks the corrected command.)"""
        for key in keys:
            folder, wanted = self.folder(*key), identity(self.config(*key))
            saved = _read_record(folder / RECORD)
            if saved is None or identity(saved["config"]) != wanted:
                self._plan(folder, wanted, saved)

    def _plan(self, folder: Path, wanted: dict[str, Any],
              saved: dict[str, Any] | None) -> Path | None:
        """The checkpoint in ``folder`` to resume (None: clear the folder and train anew),
        or a SophiaError when the folder may not be trained into."""
        found = saved["config"] if saved is not None else _checkpoint_config(folder)
        if found is not None and identity(found) != wanted and not self.overwrite:
            raise SophiaError(
                f"{folder} holds a run with other settings ({_differences(wanted, identity(found))}"
                f"); compare into another --out, or pass --overwrite to train it again"
            )
        if found is not None and identity(found) == wanted and saved is None:
            return folder  # killed mid-training, after a checkpoint
        if folder.exists() and holds_run(folder) and not is_sophia_run(folder):
            raise SophiaError(
                f"{folder} holds files that no sophia run wrote; compare into another --out"
            )
        return None

    def _resumable(self, folder: Path, wanted: dict[str, Any],
                   saved: dict[str, Any] | None) -> Path | None:
        """The checkpoint to resume, or None after clearing a folder this run may reuse."""
        resume = self._plan(folder, wanted, saved)
        if resume is None and folder.exists():  # killed before a checkpoint, or --overwrite
            with RunLock(folder), writing("--out", folder):  # not while another process runs
                clear_run(folder)
        return resume


def _checkpoint_config(folder: Path) -> dict[str, Any] | None:
    """The settings of the checkpoint in run folder ``folder`` (None: it has none): its
    ``config.json``, written when the run started and beside each checkpoint since, so the
    checkpoint itself is read only where config.json is missing or unreadable (the resume
    reads it once more, then, in full)."""
    if not (folder / CHECKPOINT).exists():
        return None
    try:
        found = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        found = None
    return found if isinstance(found, dict) else load_checkpoint(folder)["config"]


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and {"record", "config"} <= saved.keys() else None


def default_out_dir(preset: str) -> Path:
    """``runs/compare-<preset>-<time>``: where a comparison goes without ``--out``."""
    return Path("runs") / f"compare-{preset}-{time.strftime('%Y%m%d-%H%M%S')}"


def compare(base: Config, *, optimizers: list[str] | tuple[str, ...] = ("sophiag", "adamw"),
            lr_multipliers: list[float] | tuple[float, ...] = (1.0,),
            seeds: list[int] | tuple[int, ...] = (0,), out_dir: str | Path | None = None,
            overrides: dict[str, Any] | None = None, overwrite: bool = False) -> CompareSummary:
    """Run the comparison (reusing finished runs in ``out_dir``) and write its report.

    A run that diverges is recorded as such (never the tuned lr); an optimizer that diverges
    at every multiplier is a SophiaError once the report is written.

    Args:
        base: settings shared by every run (model, data, steps, batch); its optimizer
            fields are ignored, each optimizer takes the preset's row instead.
        optimizers: names from ``sophia_pytorch.harness.config.optimizer_names()``.
        lr_multipliers: the lr grid, as multiples of each optimizer's preset lr.
        seeds: model-initialisation and data-order seeds; the grid uses the first.
        out_dir: the comparison folder (default ``runs/compare-<preset>-<time>``).
        overrides: the flat settings the user gave; a row field (lr, min_lr, beta1,
            beta2, weight_decay, rho) among them is refused (:func:`refuse_shared_rows`).
        overwrite: retrain a run whose folder holds a run with other settings (default:
            refuse, naming the difference).
    """
    refuse_shared_rows(overrides or {})
    for name in optimizers:
        if name not in optimizer_names():
            raise SophiaError(f"unknown optimizer {name!r}{did_you_mean(name, optimizer_names())} "
                              f"in --optimizers; choose from "
                              f"{', '.join(optimizer_names())}")
    if not seeds or not lr_multipliers:
        raise SophiaError("compare needs at least one seed and one lr multiplier")
    if any(not 0 < m < math.inf for m in lr_multipliers):
        raise SophiaError(f"lr multipliers must be positive and finite, got "
                          f"{list(lr_multipliers)}; fix --lr-grid")
    out = Path(out_dir) if out_dir else default_out_dir(base.preset)
    runs = _Runs(base, overrides or {}, out, overwrite)
    started = time.perf_counter()
    best: dict[str, float] = {}
    all_seeds = list(dict.fromkeys(seeds))
    # Any multiplier may turn out best, so the later seeds' folders are checked at each.
    runs.check([(optimizer, multiplier, seed) for optimizer in optimizers
                for multiplier in dict.fromkeys(lr_multipliers)
                for seed in dict.fromkeys(seeds)])
    for optimizer in optimizers:
        found = runs.found(optimizer)
        grid = list(dict.fromkeys([*lr_multipliers, *(m for m, s in found if s == seeds[0])]))
        best[optimizer] = min((runs.run(optimizer, m, seeds[0]) for m in grid),
                              key=_final).lr_multiplier
        extra = [s for m, s in found if m == best[optimizer] and s not in seeds]
        for seed in [*seeds[1:], *extra]:
            runs.run(optimizer, best[optimizer], seed)
        for multiplier, seed in found:  # other finished runs are reported too
            runs.run(optimizer, multiplier, seed)
        all_seeds += [s for s in extra if s not in all_seeds]
    with writing("--out", out):
        summary = write_report(
            out, records=list(runs.records.values()), best_multipliers=best,
            base_config=to_dict(base), optimizers=list(optimizers),
            lr_multipliers=sorted({r.lr_multiplier for r in runs.records.values()}),
            seeds=all_seeds, total_seconds=time.perf_counter() - started,
        )
    hopeless = [name for name in optimizers
                if runs.records[(name, best[name], seeds[0])].diverged]
    if hopeless:
        raise SophiaError(
            f"{', '.join(hopeless)} diverged at every lr of the grid (report: "
            f"{summary.report_path}); use smaller --lr-grid multipliers"
        )
    return summary
