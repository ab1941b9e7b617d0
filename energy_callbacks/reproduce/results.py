"""``energy-callbacks reproduce report``: the results page, built from run data alone.

Reads what ``energy-callbacks reproduce`` wrote into a data folder
(``<experiment>.csv`` and ``<experiment>_curves.csv``, any number of calls merged)
and writes into an output folder, without training anything:

- ``claims.md``: one row per claim of the papers, with the paper's figure, ours, a
  verdict and the command that reruns it (:mod:`~energy_callbacks.reproduce.claims`);
- per experiment and settings, ``<experiment>.md`` and ``<experiment>.png`` (a run
  with other settings, such as ``--preprocessing reference``, gets
  ``<experiment>--prep-reference.md``): the same tables and plots as the run wrote,
  their headings two levels deeper, to sit under a page's sections.

Quick (smoke) runs are left out: they are no result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import Experiment
from .config import Config
from .paper import Curve
from .report import Summary
from .runner import Sweep

Row = dict[str, Any]


@dataclass(frozen=True)
class Runs:
    """The finished runs of one experiment and settings: CSV rows and test curves by key."""

    experiment: str
    settings: str
    rows: list[Row]
    curves: dict[str, Curve]

    @property
    def stem(self) -> str:
        """The file name of its table and plot (settings other than the defaults in it)."""
        data = self.settings.partition("|")[0]
        extra = data.split("/")[1:]
        return "--".join([self.experiment, *extra])


def settings_of(key: str) -> str:
    """The data set and mode part of a run key: ``fashion-mnist/prep-reference|full``."""
    parts = key.split("|")
    return "|".join(parts[1:3])


def load_runs(data: Path, experiments: dict[str, type[Experiment]]) -> list[Runs]:
    """Every full (not quick) run in ``data``, per experiment and settings, in CSV order."""
    found: list[Runs] = []
    for name, kind in experiments.items():
        sweep = Sweep(data, name, kind.columns)
        rows = [r for r in sweep.rows() if not settings_of(str(r["key"])).endswith("|quick")]
        if not rows:
            continue
        curves = sweep.curves()
        by_settings: dict[str, list[Row]] = {}
        for r in rows:
            by_settings.setdefault(settings_of(str(r["key"])), []).append(r)
        for settings, group in by_settings.items():
            mine = {r["key"] for r in group}
            found.append(
                Runs(name, settings, group, {k: c for k, c in curves.items() if k in mine})
            )
    return found


def build_report(data: Path, out: Path) -> list[Path]:
    """Write ``claims.md`` and every experiment's table and plot from the runs in
    ``data`` into ``out``; return the markdown files written."""
    from . import EXPERIMENTS
    from .claims import claims_table

    runs = load_runs(Path(data), EXPERIMENTS)
    if not runs:
        raise FileNotFoundError(
            f"no runs in {data}: it needs the <experiment>.csv files that "
            "`energy-callbacks reproduce EXPERIMENT --out DIR` writes"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for r in runs:
        experiment = EXPERIMENTS[r.experiment](Config.from_settings_key(r.settings))
        summary = experiment.summarize(r.rows, r.curves)
        Summary(demote(summary.text, 2), summary.draw).write(out, r.stem)
        written.append(out / f"{r.stem}.md")
    claims = out / "claims.md"
    claims.write_text(claims_table(runs))
    return [claims, *written]


def demote(markdown: str, levels: int) -> str:
    """Headings ``levels`` deeper (``#`` becomes ``###`` for 2), so that a table's own
    title sits under the section of the page that includes it."""
    return "\n".join(
        "#" * levels + line if line.startswith("#") else line for line in markdown.split("\n")
    )


def find(runs: Sequence[Runs], experiment: str, settings: str = "fashion-mnist|full") -> Runs:
    """The runs of ``experiment`` with ``settings``; empty when there are none."""
    for r in runs:
        if r.experiment == experiment and r.settings == settings:
            return r
    return Runs(experiment, settings, [], {})
