"""A griffe extension for the site: the docstrings' few reStructuredText habits, as Markdown.

The library's docstrings are read by ``help()`` as often as by the site, and use Sphinx roles
(``:func:`sophia_pytorch.sampled_cross_entropy```) and ``::`` before literal blocks. The site
renders a role as inline code of the name it points to (``~`` and leading dots dropped) and a
trailing ``::`` as ``:``; the docstrings themselves are not changed.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc|const):`(~?)\.*([^`]+)`")
_LITERAL_MARKER = re.compile(r"\s?::$", flags=re.MULTILINE)


def markdown_of(text: str) -> str:
    """``text`` with Sphinx roles as inline code and a line-ending ``::`` as ``:``."""
    def code(role: re.Match[str]) -> str:
        short, target = role.groups()
        return f"`{target.rpartition('.')[2] if short else target}`"

    return _LITERAL_MARKER.sub(":", _ROLE.sub(code, text))


class SphinxRoles(griffe.Extension):
    """Rewrite each object's docstring with :func:`markdown_of` as griffe loads it."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown_of(obj.docstring.value)
