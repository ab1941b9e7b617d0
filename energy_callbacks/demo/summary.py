"""The demo's results table (rich) and its energy-vs-accuracy plot."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from rich.table import Table

from ..plot import plot_curves, read_curve
from ..reproduce.rules import RULES
from .result import RunResult


def savings(results: Sequence[RunResult]) -> dict[tuple[str, str], tuple[float, float]]:
    """``(framework, rule) -> (M1 saved, M0 saved)``: backprop's figure over the rule's,
    in the same framework (NaN without a backprop run there)."""
    base = {r.framework: r.report for r in results if r.rule == "backprop"}
    out = {}
    for r in results:
        b = base.get(r.framework)
        out[(r.framework, r.rule)] = (
            (_ratio(b.m1, r.report.m1), _ratio(b.m0, r.report.m0)) if b else (math.nan, math.nan)
        )
    return out


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.inf


def _factor(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}x"


def results_table(results: Sequence[RunResult], title: str) -> Table:
    """One row per run: accuracy, M1, M0, M1_min, inefficiency and the saving vs backprop."""
    table = Table(title=title)
    columns = (
        "framework",
        "rule",
        "test acc",
        "M1",
        "M0",
        "M1_min",
        "inefficiency",
        "M1 saved",
        "M0 saved",
        "learned",
        "time",
    )
    for col in columns:
        table.add_column(col, justify="left" if col in ("framework", "rule") else "right")
    saved = savings(results)
    for r in results:
        rep = r.report
        m1_saved, m0_saved = saved[(r.framework, r.rule)]
        table.add_row(
            r.framework,
            r.rule,
            f"{r.accuracy:.3f}",
            f"{rep.m1:.3g}",
            f"{rep.m0:.3g}",
            f"{rep.m1_min:.3g}",
            f"{rep.inefficiency:.2f}",
            _factor(m1_saved),
            _factor(m0_saved),
            f"{rep.samples_learned / max(rep.samples_seen, 1):.0%}",
            f"{r.seconds:.1f} s",
        )
    return table


def legend(rules: Sequence[str]) -> str:
    """What each rule name means, and what the columns are."""
    lines = [f"  {name}: {RULES[name].label}" for name in dict.fromkeys(rules)]
    return "\n".join(
        [
            "M1 = sum |dw| (plasticity energy), M0 = synaptic updates, M1_min = sum |w_T - w_0| "
            "(the physical limit), inefficiency = M1 / M1_min; saved = backprop's figure over "
            "the rule's; learned = share of samples that passed the sample gate.",
            *lines,
        ]
    )


def save_plot(results: Sequence[RunResult], path: Path, title: str) -> Path:
    """Energy vs accuracy over training, one line per run, read back from the CSV logs."""
    curves = [
        read_curve(r.log, label=f"{r.rule} ({r.framework})", rule=r.rule, framework=r.framework)
        for r in results
    ]
    return plot_curves(curves, path, title=title)
