"""The one exception type for mistakes a user can fix (bad flag, missing file, bad checkpoint)."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["SophiaError", "require"]


class SophiaError(Exception):
    """A user error whose message names the problem and the fix.

    ``sophia_pytorch.harness.cli.main`` prints it as one line, ``error: <message>``, and
    exits with status 2; anything else that escapes is a bug and keeps its traceback.
    """


def require(module: str) -> Any:
    """Import a harness-only dependency, or say in one line how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SophiaError(
            f"the harness needs {module.split('.')[0]}; run: pip install 'sophia-pytorch[harness]'"
        ) from None
