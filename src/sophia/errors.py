"""The one exception type for mistakes a user can fix (bad flag, missing file, bad checkpoint)."""

from __future__ import annotations

__all__ = ["SophiaError"]


class SophiaError(Exception):
    """A user error whose message names the problem and the fix.

    ``sophia.cli.main`` prints it as one line, ``error: <message>``, and exits with status 2;
    anything else that escapes is a bug and keeps its traceback.
    """
