"""The run folder: where it is, who may write it, and its ``log.jsonl``.

A run folder holds one run. A new run into a folder that holds one (a checkpoint, log,
config or record) is refused unless asked to overwrite it; a second process on a folder in
use is refused by :class:`RunLock`. Only rank 0 of a data-parallel job writes here
(:func:`is_main_process`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from .distributed import is_main_process
from .errors import SophiaError, writing
from .jsonio import dumps

__all__ = ["RUN_FILES", "RunLock", "RunLog", "holds_run", "is_main_process", "make_run_dir",
           "prepare_run_dir"]

RUN_FILES = ("checkpoint.pt", "log.jsonl", "config.json", "record.json", "stable.pt")

try:
    import fcntl
except ImportError:  # Windows: the lock file's PID decides
    fcntl = None  # type: ignore[assignment]


def holds_run(folder: str | Path) -> bool:
    """Whether ``folder`` holds (part of) a run: a checkpoint, log, config or record."""
    return any((Path(folder) / name).exists() for name in RUN_FILES)


def make_run_dir(out_dir: str, preset: str, optimizer: str) -> Path:
    """``out_dir``, or a new ``runs/<preset>-<optimizer>-<time>[-N]`` when it is empty."""
    if out_dir:
        return Path(out_dir)
    stem = Path("runs") / f"{preset}-{optimizer}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder, number = stem, 1
    while holds_run(folder):
        number += 1
        folder = stem.with_name(f"{stem.name}-{number}")
    return folder


def prepare_run_dir(folder: Path, *, resuming_here: bool, overwrite: bool) -> None:
    """Make sure a run may write ``folder``: refuse one that holds another run, unless
    ``overwrite`` (then clear that run's files) or the run resumes from this very folder."""
    if resuming_here or not holds_run(folder):
        return
    if not overwrite:
        raise SophiaError(
            f"{str(folder)!r} already holds a run; continue it with --resume {folder}, replace "
            "it with --overwrite, or choose another --out-dir"
        )
    with writing("--out-dir", folder):
        for name in RUN_FILES:
            (folder / name).unlink(missing_ok=True)
        for old in [*folder.glob("checkpoint-*"), folder / "tensorboard"]:
            shutil.rmtree(old, ignore_errors=True)


class RunLock:
    """One process at a time in a run folder: an exclusive lock on ``<folder>/.lock``.

    On POSIX the lock is ``flock``'s, which the kernel drops when the holder exits or is
    killed, so a lock file a killed process left behind is stale and simply taken. Elsewhere
    the file holds the holder's PID and is taken over once no such process exists.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise SophiaError naming the process that holds it."""
        with writing("--out-dir", self.folder):
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        if not self._lock(fd):
            os.close(fd)
            raise SophiaError(
                f"run folder {str(self.folder)!r} is in use by process {self._holder()}; wait "
                "for it to finish, or choose another --out-dir"
            )
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def _lock(self, fd: int) -> bool:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True
        holder = self._holder()
        return holder is None or holder == os.getpid() or not _alive(holder)

    def _holder(self) -> int | None:
        try:
            return int(self.path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def release(self) -> None:
        """Let go of the lock (the file stays: removing it would race with a new taker)."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


class RunLog:
    """``log.jsonl`` (one JSON object a line) and, optionally, TensorBoard scalars.

    A new run starts an empty log; a resumed one (``keep_until_step`` set) keeps the lines of
    steps up to its checkpoint and drops what a crashed run wrote after it (a torn last line
    included). Non-finite numbers are written as null.
    """

    def __init__(self, run_dir: Path, *, keep_until_step: int | None, tensorboard: bool) -> None:
        self.path = run_dir / "log.jsonl"
        self.enabled = is_main_process()
        self.writer = None
        if not self.enabled:
            return
        with writing("--out-dir", run_dir):
            run_dir.mkdir(parents=True, exist_ok=True)
            if keep_until_step is not None and self.path.exists():
                kept = [line for line in self.path.read_text().splitlines()
                        if _step_of(line) is not None and _step_of(line) <= keep_until_step]
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
        with writing("--out-dir", self.path), self.path.open("a") as handle:
            handle.write(dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
