"""Where a training run stands (:class:`TrainState`, saved in every checkpoint) and what a
finished one reports (:class:`TrainResult`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["TrainResult", "TrainState"]


@dataclass
class TrainResult:
    """What a finished run reports. ``evals`` rows: step, val_loss, seconds, tokens."""

    run_dir: Path
    config: dict[str, Any]
    evals: list[dict[str, float]]
    final_val_loss: float
    steps: int
    train_seconds: float
    tokens: int
    skipped_steps: int
    num_parameters: int
    hessian_seconds: float = 0.0
    final_train_loss: float = math.nan
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainState:
    """Where a run stands; saved in every checkpoint beside model, optimizer and RNGs.

    Attributes:
        step: optimizer steps done, skipped ones included.
        tokens: training tokens seen, summed over ranks.
        data_position: index of the next training micro-batch (the sampler is pure).
        train_seconds: time in steps and Hessian refreshes (not evaluation or saving).
        hessian_seconds: the part of ``train_seconds`` spent in Hessian refreshes.
        skipped_steps: steps skipped for a non-finite loss or gradient.
        bad_in_row: the current streak of skipped steps.
        evals: one row per evaluation: step, val_loss, seconds, tokens.
        eval_due: a signal stopped the evaluation due at ``step``: a resumed run does it
            (and the checkpoint after it) before its next step.
    """

    step: int = 0
    tokens: int = 0
    data_position: int = 0
    train_seconds: float = 0.0
    hessian_seconds: float = 0.0
    skipped_steps: int = 0
    bad_in_row: int = 0
    evals: list[dict[str, float]] = field(default_factory=list)
    eval_due: bool = False

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in fields(self):  # checkpoints before eval_due have none due
            setattr(self, f.name, state.get(f.name, False) if f.name == "eval_due"
                    else state[f.name])
        self.evals = [dict(row) for row in self.evals]
