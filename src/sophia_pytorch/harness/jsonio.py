"""Files out of the harness: standard JSON only (a non-finite float is written as null),
whole files replaced atomically (:func:`atomic_file`, the one atomic writer: JSON, logs and
checkpoints all go through it), permissions as the umask says."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_file", "dumps", "umasked", "write_atomically", "write_json"]


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` with NaN and ±Infinity written as null (they are not JSON)."""
    return json.dumps(_finite(value), allow_nan=False, **kwargs)


def write_json(path: str | Path, value: Any) -> None:
    """Write ``value`` as indented JSON to ``path``, atomically (temp file, then rename)."""
    write_atomically(Path(path), (dumps(value, indent=1) + "\n").encode())


def write_atomically(path: Path, data: bytes, *, sync: bool = False) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_file`, so a reader sees the old file
    or the new one, never half of one; ``sync=True`` also flushes it to the disk before the
    rename."""
    with atomic_file(path, sync=sync) as file:
        file.write(data)


@contextlib.contextmanager
def atomic_file(path: Path, *, sync: bool = False) -> Iterator[IO[bytes]]:
    """A binary file to write ``path``'s new contents into: a temporary
    ``.<name>.<random>.tmp`` beside it, renamed over ``path`` when the block ends (removed,
    and ``path`` untouched, when it raises). ``sync=True`` flushes it to the disk before the
    rename. The file gets the umask's permissions, not ``mkstemp``'s owner-only ones."""
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            yield file
            if sync:
                file.flush()
                os.fsync(file.fileno())
        os.chmod(temp, umasked())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def umasked(mode: int = 0o666) -> int:
    """``mode`` less the process's umask: what ``open`` would give a new file (``mkstemp``
    and ``mkdtemp`` make owner-only files and folders; others should read ours too)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask
