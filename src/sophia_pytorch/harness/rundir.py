"""The run folder: where it is, and its ``log.jsonl`` (plus optional TensorBoard scalars).

Only rank 0 of a data-parallel job writes here (:func:`is_main_process`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from .errors import SophiaError

__all__ = ["RunLog", "is_main_process", "make_run_dir"]


def is_main_process() -> bool:
    """True on rank 0 of a data-parallel job, and always without one: it writes files."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def make_run_dir(out_dir: str, preset: str, optimizer: str) -> Path:
    """``out_dir``, or ``runs/<preset>-<optimizer>-<time>`` when it is empty."""
    if out_dir:
        return Path(out_dir)
    return Path("runs") / f"{preset}-{optimizer}-{time.strftime('%Y%m%d-%H%M%S')}"


class RunLog:
    """``log.jsonl`` (one JSON object a line) and, optionally, TensorBoard scalars.

    A new run starts an empty log; a resumed one (``keep_until_step`` set) keeps the lines of
    steps up to its checkpoint and drops what a crashed run wrote after it.
    """

    def __init__(self, run_dir: Path, *, keep_until_step: int | None, tensorboard: bool) -> None:
        self.path = run_dir / "log.jsonl"
        self.enabled = is_main_process()
        self.writer = None
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if keep_until_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= keep_until_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif keep_until_step is None:
            self.path.write_text("")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise SophiaError(
                    "--tensorboard needs the tensorboard package; run: pip install tensorboard"
                ) from None
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (with ``kind`` and ``step`` keys) as one line."""
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
