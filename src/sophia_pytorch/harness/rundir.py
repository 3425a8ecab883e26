"""The run folder: where it is, who may write it, and its ``log.jsonl``.

A run folder holds one run. The files a run writes there are named once, here
(:data:`RUN_FILES`, :data:`RUN_FOLDERS`, their temporary files and ``.lock``); a folder
holding a file of that name that a sophia run did not write (a Hugging Face output's
``config.json``) is refused outright, a sophia run's only unless asked to overwrite it, and
an overwrite removes the run's own files and nothing else. A second process on a folder in
use is refused by :class:`RunLock`. Only rank 0 of a data-parallel job writes here
(:func:`is_main_process`).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

from .distributed import is_main_process
from .errors import SophiaError, writing
from .jsonio import dumps, write_atomically

__all__ = ["RUN_FILES", "RUN_FOLDERS", "RunLock", "RunLog", "clear_run", "holds_run",
           "is_main_process", "is_sophia_run", "make_run_dir", "prepare_run_dir", "run_paths",
           "set_aside", "sharded_folder"]

RUN_FILES = ("checkpoint.pt", "log.jsonl", "config.json", "record.json", "stable.pt")
"""The files a run writes in its folder; each is written through a temporary file
``.<name>.<random>.tmp`` beside it and a rename."""
RUN_FOLDERS = ("tensorboard",)
"""The folders a run writes, besides the FSDP2 shard folders of :func:`sharded_folder`."""
_SHARDED = re.compile(r"checkpoint-\d{8}")
_CONFIG_SECTIONS = {"preset", "model", "data", "optimizer", "run"}
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # POSIX: opening a symlink fails with ELOOP


def sharded_folder(step: int) -> str:
    """The name of the FSDP2 shard folder of the checkpoint at ``step``:
    ``checkpoint-<step, 8 digits>`` (a Hugging Face ``checkpoint-500`` is not one)."""
    return f"checkpoint-{step:08d}"


def run_paths(folder: str | Path) -> list[Path]:
    """The files and folders in ``folder`` that a run writes, which exist: everything an
    overwrite removes (the ``.lock`` stays: another process may be taking it)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    temps = {f".{name}." for name in RUN_FILES}
    return sorted(
        child for child in folder.iterdir()
        if child.name in RUN_FILES or child.name in RUN_FOLDERS
        or _SHARDED.fullmatch(child.name) is not None
        or (child.name.endswith(".tmp") and any(child.name.startswith(t) for t in temps)))

try:
    import fcntl
except ImportError:  # Windows: the lock file's PID decides
    fcntl = None  # type: ignore[assignment]


def holds_run(folder: str | Path) -> bool:
    """Whether ``folder`` holds a file a run would write over: a checkpoint, log, config or
    record (a sophia run's or not, see :func:`is_sophia_run`)."""
    return any((Path(folder) / name).exists() for name in RUN_FILES)


def is_sophia_run(folder: str | Path) -> bool:
    """Whether every one of :data:`RUN_FILES` in ``folder`` is a sophia run's: a
    ``config.json`` with its sections, a ``checkpoint.pt`` or ``stable.pt`` whose pickle
    holds a training state, a ``log.jsonl`` of step and eval records, a ``record.json`` of a
    comparison. Reads only the small parts of each (not the checkpoint's tensors)."""
    folder = Path(folder)
    checks = {"config.json": _is_sophia_config, "checkpoint.pt": _is_sophia_checkpoint,
              "stable.pt": _is_sophia_checkpoint, "log.jsonl": _is_sophia_log,
              "record.json": _is_sophia_record}
    present = [name for name in RUN_FILES if (folder / name).exists()]
    return bool(present) and all(checks[name](folder / name) for name in present)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def _is_sophia_config(path: Path) -> bool:
    config = _read_json(path)
    return isinstance(config, dict) and _CONFIG_SECTIONS <= config.keys()


def _is_sophia_record(path: Path) -> bool:
    saved = _read_json(path)
    return isinstance(saved, dict) and {"record", "config"} <= saved.keys()


def _is_sophia_log(path: Path) -> bool:
    try:
        lines = path.read_bytes().splitlines()
    except OSError:
        return False
    records = [_record_of(line) for line in lines]
    return any(records) or not lines  # an empty log: a run stopped before its first step


def _is_sophia_checkpoint(path: Path) -> bool:
    # torch.save writes a zip; every sophia checkpoint's pickle names "data_position".
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            return bool(pickles) and b"data_position" in archive.read(pickles[0])
    except (OSError, zipfile.BadZipFile, KeyError):
        return False


def _is_empty_run(folder: Path) -> bool:
    """A sophia run that got no further than its config: no checkpoint, record or step."""
    if (folder / "checkpoint.pt").exists() or (folder / "record.json").exists():
        return False
    try:
        lines = (folder / "log.jsonl").read_bytes().splitlines()
    except FileNotFoundError:
        lines = []
    return not any(_record_of(line) for line in lines)


def clear_run(folder: str | Path) -> None:
    """Remove the files and folders a run wrote in ``folder`` (:func:`run_paths`), nothing
    else."""
    for path in run_paths(folder):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def set_aside(folder: Path, names: list[str]) -> Path:
    """Move the run files ``names`` of ``folder`` into a new folder beside them,
    ``set-aside-<time>[-N]``, with a copy of the whole ``log.jsonl``; return that folder.

    For a resume that branches off a run's history (``stable.pt`` resumed in its own folder
    after the run went further): what the other branch wrote is kept, out of the way of the
    live one. Each file is moved with a rename, and the folder is not one of
    :func:`run_paths`, so ``--overwrite`` keeps it.
    """
    stem = folder / f"set-aside-{time.strftime('%Y%m%d-%H%M%S')}"
    aside, number = stem, 1
    while aside.exists():
        number += 1
        aside = stem.with_name(f"{stem.name}-{number}")
    aside.mkdir()
    if (folder / "log.jsonl").exists():
        write_atomically(aside / "log.jsonl", (folder / "log.jsonl").read_bytes(), sync=True)
    for name in names:
        os.replace(folder / name, aside / name)
    return aside


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
    """Make sure a run may write ``folder``: refuse one that holds files a run would write
    over but a sophia run did not write; refuse one that holds another sophia run, unless
    ``overwrite`` (then remove that run's files, :func:`clear_run`) or the run resumes from
    this very folder."""
    if resuming_here or not holds_run(folder):
        return
    if not is_sophia_run(folder):
        names = ", ".join(name for name in RUN_FILES if (folder / name).exists())
        raise SophiaError(
            f"{str(folder)!r} holds {names} that no sophia run wrote; choose another "
            "--out-dir (--overwrite replaces only a sophia run)"
        )
    if overwrite or _is_empty_run(folder):  # an empty one: a run stopped before step 1
        pass
    elif (folder / "checkpoint.pt").exists():
        raise SophiaError(
            f"{str(folder)!r} already holds a run; continue it with --resume {folder}, replace "
            "it with --overwrite, or choose another --out-dir"
        )
    else:
        raise SophiaError(
            f"{str(folder)!r} already holds a run without a checkpoint (nothing to resume); "
            "replace it with --overwrite, or choose another --out-dir"
        )
    with writing("--out-dir", folder):
        clear_run(folder)


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
            fd = self._open()
        if not self._lock(fd):
            os.close(fd)
            raise SophiaError(
                f"run folder {str(self.folder)!r} is in use by process {self._holder()}; wait "
                "for it to finish, or choose another --out-dir"
            )
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def _open(self) -> int:
        """Open (or create) the lock file itself, never a file a symlink there points to:
        taking the lock truncates it and writes our PID, which would destroy that file."""
        if self.path.is_symlink():  # O_NOFOLLOW alone: Windows has none
            raise self._symlink_error()
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o666)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # made a symlink since the check above
                raise self._symlink_error() from None
            raise

    def _symlink_error(self) -> SophiaError:
        target = os.readlink(self.path) if self.path.is_symlink() else "?"
        return SophiaError(
            f"the lock file {str(self.path)!r} is a symlink (to {target!r}), not a file a "
            "sophia run made; locking would overwrite what it points to: remove the symlink, "
            "or choose another --out-dir"
        )

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
    steps up to its checkpoint and drops what a crashed run wrote after it, and every damaged
    line (torn, not UTF-8, not JSON, a non-finite step). That rewrite goes through a temporary
    file and a rename, so a kill during it leaves the old log or the new one. Non-finite
    numbers are written as null.
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
                kept = [line for line in self.path.read_bytes().splitlines()
                        if (record := _record_of(line)) is not None
                        and record["step"] <= keep_until_step]
                write_atomically(self.path, b"".join(line + b"\n" for line in kept), sync=True)
            elif keep_until_step is None:
                write_atomically(self.path, b"", sync=True)
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


def _record_of(line: bytes) -> dict[str, Any] | None:
    """The log record on ``line``, or None for a damaged line: torn, not UTF-8, not standard
    JSON (``Infinity``), or without a ``kind`` and a whole-number ``step``."""
    try:
        record = json.loads(line.decode("utf-8"), parse_constant=_not_json)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError included
        return None
    if not isinstance(record, dict) or not isinstance(record.get("kind"), str) \
            or type(record.get("step")) is not int:
        return None
    return record


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")

