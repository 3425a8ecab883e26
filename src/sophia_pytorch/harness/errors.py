"""The exception types for mistakes a user can fix (bad flag, missing file, bad checkpoint,
a full disk) and for a run that diverged."""

from __future__ import annotations

import contextlib
import difflib
import errno
import importlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["DivergedError", "Interrupted", "SophiaError", "did_you_mean", "os_error_message",
           "require", "writing"]


class SophiaError(Exception):
    """A user error whose message names the problem and the fix.

    ``sophia_pytorch.harness.cli.main`` prints it as one line, ``error: <message>``, and
    exits with status 2; anything else that escapes is a bug and keeps its traceback.
    """


class DivergedError(SophiaError):
    """A run whose loss, gradient, weights or validation loss stopped being finite.

    ``result`` is the run's :class:`~.trainer.TrainResult` up to that point (its evaluations
    so far), so a comparison can record the run as diverged and go on; ``problem`` is the
    message without its advice (a comparison gives its own).
    """

    def __init__(self, message: str, result: Any = None, problem: str | None = None) -> None:
        super().__init__(message)
        self.result = result
        self.problem = problem or message


class Interrupted(SophiaError):
    """A run stopped by SIGINT (Ctrl-C) or SIGTERM; the message says what was saved and the
    command that continues it. ``signum`` is the signal's number (the CLI exits with
    128 + it, as a shell does)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


_FIXES = {
    errno.ENOSPC: "free some disk space",
    errno.EDQUOT: "free some disk space",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "make it writable",
    errno.EPERM: "make it writable",
    errno.ENOTDIR: "a file is in the way",
    errno.EEXIST: "a file is in the way",
    errno.EISDIR: "a folder is in the way",
    errno.ENAMETOOLONG: "shorten the path",
    errno.EFBIG: "the file is larger than this file system or limit allows",
}


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'adamw'?)`` for the choice closest to ``name`` (difflib's ratio of
    at least 0.6), or ``""`` when none is close; appended to an "unknown NAME" message."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def os_error_message(exc: OSError, option: str, path: str | Path | None = None) -> str | None:
    """A one-line message for an OSError a user can fix (a full disk, no permission, a file
    where a folder should be), naming ``option`` as where to point elsewhere; None for other
    OSErrors."""
    if exc.errno not in _FIXES:
        return None
    where = exc.filename if exc.filename is not None else path
    return (f"cannot write {str(where)!r} ({exc.strerror or exc}); {_FIXES[exc.errno]}, or "
            f"point {option} at another folder")


@contextlib.contextmanager
def writing(option: str, path: str | Path | None = None) -> Iterator[None]:
    """Turn a user-fixable OSError inside the block into a one-line SophiaError naming
    ``option`` (e.g. ``--out-dir``); other OSErrors, and those about files outside
    ``path`` (a folder or file), pass through."""
    try:
        yield
    except OSError as exc:
        message = os_error_message(exc, option, path)
        if message is None or not _inside(exc.filename, path):
            raise
        raise SophiaError(message) from None


def _inside(filename: Any, path: str | Path | None) -> bool:
    if filename is None or path is None:
        return True
    filename, path = Path(str(filename)).absolute(), Path(path).absolute()
    return filename == path or path in filename.parents


def require(module: str) -> Any:
    """Import a harness-only dependency, or say in one line how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SophiaError(
            f"the harness needs {module.split('.')[0]}; run: pip install 'sophia-pytorch[harness]'"
        ) from None
