"""The records a comparison keeps: one per finished run, and the summary of the whole."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..runstate import TrainResult

__all__ = ["CompareSummary", "RunRecord"]


@dataclass
class RunRecord:
    """One finished (or diverged) run of a comparison. ``evals`` rows: step, val_loss,
    seconds, tokens."""

    optimizer: str
    lr: float
    lr_multiplier: float
    seed: int
    final_val_loss: float
    steps: int
    train_seconds: float
    hessian_seconds: float
    tokens: int
    skipped_steps: int
    run_dir: str
    evals: list[dict[str, float]] = field(default_factory=list)
    diverged: bool = False  # stopped non-finite; final_val_loss is then NaN

    @classmethod
    def from_result(cls, result: TrainResult, multiplier: float,
                    diverged: bool = False) -> RunRecord:
        return cls(
            optimizer=result.config["optimizer"]["name"], lr=result.config["optimizer"]["lr"],
            lr_multiplier=multiplier, seed=result.config["run"]["seed"],
            final_val_loss=math.nan if diverged else result.final_val_loss,
            steps=result.steps,
            train_seconds=result.train_seconds, hessian_seconds=result.hessian_seconds,
            tokens=result.tokens, skipped_steps=result.skipped_steps,
            run_dir=str(result.run_dir), evals=result.evals, diverged=diverged,
        )


    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunRecord:
        """Read back ``asdict(record)`` from JSON, where a non-finite loss became null."""
        values = dict(values)
        if values["final_val_loss"] is None:
            values["final_val_loss"] = math.nan
        values["evals"] = [{k: math.nan if v is None else v for k, v in row.items()}
                           for row in values.get("evals", [])]
        return cls(**values)


@dataclass
class CompareSummary:
    """Where the report went, and its headline as text."""

    out_dir: Path
    report_path: Path
    results_path: Path
    plot_paths: list[Path]
    headline: str
    results: dict[str, Any]
