"""A griffe extension for the API reference: the docstrings' reST roles as code.

The package's docstrings use Sphinx roles (``:class:`~energy_callbacks.X```,
``:func:`f```, ``:data:`D```). mkdocstrings renders Markdown, where they would
show as ``:class:`` followed by code; this turns each role into inline code
(``~a.b.C`` shows as ``C``, as in Sphinx).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):`(~?)([^`]+)`")


def plain(text: str) -> str:
    """``:class:`~a.b.C``` -> ```C```; ``:func:`a.f``` -> ```a.f```."""
    return ROLE.sub(lambda m: f"`{m[2].rsplit('.', 1)[-1] if m[1] else m[2]}`", text)


class RstRoles(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = plain(obj.docstring.value)
