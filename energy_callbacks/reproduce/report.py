"""Tables and plots of finished runs: mean ± sd over seeds, markdown, PNG (Agg).

The helpers take the CSV rows of a sweep (dicts) so that a table can be remade
from the CSV alone, after a resume or on another machine.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

Row = dict[str, Any]


def values(rows: Sequence[Row], column: str) -> list[float]:
    """The numeric values of ``column`` (blank cells skipped)."""
    return [float(r[column]) for r in rows if r.get(column, "") != ""]


def seeds_phrase(rows: Sequence[Row]) -> str:
    """ "1 seed" / "3 seeds": how many seeds the rows cover."""
    n = len({r["seed"] for r in rows})
    return f"{n} seed{'s' if n > 1 else ''}"


def mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value, NaN for none)."""
    if not xs:
        return math.nan, math.nan
    a = np.asarray(xs, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def fmt(x: float, digits: int = 3) -> str:
    """``3.09e5`` style for large/small numbers, plain otherwise; '-' for NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    text = f"{x:.{digits}g}" if x == 0 or 1e-2 <= abs(x) < 1e3 else f"{x:.{digits - 1}e}"
    return text.replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def cell(rows: Sequence[Row], column: str, digits: int = 3) -> str:
    """``mean ± sd`` over the rows (just the value for one row)."""
    xs = values(rows, column)
    m, s = mean_sd(xs)
    if len(xs) < 2:
        return fmt(m, digits)
    return f"{fmt(m, digits)} ± {fmt(s, 2)}"


def group(rows: Sequence[Row], *columns: str) -> dict[tuple[Any, ...], list[Row]]:
    """Rows grouped by the values of ``columns``, in first-seen order."""
    out: dict[tuple[Any, ...], list[Row]] = {}
    for r in rows:
        out.setdefault(tuple(r[c] for c in columns), []).append(r)
    return out


def markdown(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(_escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_escape(str(c)) for c in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def power_law(ns: Sequence[float], ys: Sequence[float]) -> float:
    """The exponent ``a`` of a least-squares fit ``y = c * n**a`` in log-log (NaN if < 2 n)."""
    pts = [(n, y) for n, y in zip(ns, ys, strict=True) if n > 0 and y > 0]
    if len({n for n, _ in pts}) < 2:
        return math.nan
    x = np.log([n for n, _ in pts])
    y = np.log([y for _, y in pts])
    return float(np.polyfit(x, y, 1)[0])


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


@dataclass(frozen=True)
class Summary:
    """An experiment's table (markdown) and its plot (``draw(figure)`` fills a figure)."""

    text: str
    draw: Callable[[Any], None]

    def write(self, out: Path, stem: str) -> Path:
        """Write ``<stem>.md`` and ``<stem>.png`` into ``out``; return the PNG's path."""
        return write_outputs(out, stem, self.text, self.draw)


def write_outputs(out: Path, experiment: str, text: str, draw: Callable[[Any], None]) -> Path:
    """Write ``<experiment>.md`` and ``<experiment>.png`` (``draw(figure)`` fills the figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / f"{experiment}.md").write_text(text)
    figure = plt.figure(figsize=(11, 4.5))
    try:
        draw(figure)
        figure.tight_layout()
        png = out / f"{experiment}.png"
        figure.savefig(png, dpi=110)
    finally:
        plt.close(figure)
    return png
