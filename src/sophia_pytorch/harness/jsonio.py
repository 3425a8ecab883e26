"""Files out of the harness: standard JSON only (a non-finite float is written as null),
whole files replaced atomically, permissions as the umask says."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["dumps", "umasked", "write_json"]


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
    """Write ``data`` to ``path`` through a temporary file ``.<name>.<random>.tmp`` beside it
    and a rename, so a reader sees the old file or the new one, never half of one;
    ``sync=True`` also flushes it to the disk before the rename."""
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
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
