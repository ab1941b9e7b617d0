"""Run a sweep: one CSV row per finished run, resumable, with a progress bar.

Every run has a ``key`` that names its experiment, data set and settings. A
finished run is appended to ``<out>/<experiment>.csv`` (and its test curve to
``<experiment>_curves.csv``) the moment it ends; a rerun with the same arguments
skips every key already in the CSV. The run in progress keeps a mid-run
checkpoint in ``<out>/<experiment>.partial/`` (see :mod:`.resume`), so an
interrupted sweep loses at most the last few minutes of it.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .paper import Curve

COLUMNS = (
    "key",
    "experiment",
    "dataset",
    "setting",
    "rule",
    "label",
    "n_hidden",
    "seed",
    "loss",
    "target",
    "max_samples",
    "samples",
    "epochs",
    "reached",
    "accuracy",
    "m1",
    "m0",
    "m1_min",
    "m0_min",
    "inefficiency",
    "samples_learned",
    "samples_to_target",
    "m1_to_target",
    "m0_to_target",
    "seconds_to_target",
    "samples_sustained",
    "m1_sustained",
    "m0_sustained",
    "train_seconds",
    "seconds",
    "accuracy_old_after_first",
    "accuracy_old",
    "forgetting",
    "replay_buffer",
    "framework",
)
CURVE_COLUMNS = ("key", "samples", "accuracy", "seconds", "m1", "m0")


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: its unique ``key``, a ``title`` for the progress bar, its params,
    and the file its training resumes from (set by :meth:`Sweep.run`)."""

    key: str
    title: str
    params: dict[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None


@dataclass
class RunResult:
    """A finished run: its CSV row (a subset of :data:`COLUMNS`) and its test curve."""

    row: dict[str, Any]
    curve: Curve | None = None


def parse(value: str) -> Any:
    """A CSV cell back to int, float, bool or str ('' stays '')."""
    if value in ("True", "False"):
        return value == "True"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            continue
    return value


def read_table(path: Path, columns: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of a CSV written by :class:`Sweep`; [] when absent. A foreign header raises."""
    if not path.exists():
        return []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != tuple(columns):
            raise ValueError(
                f"{path} has columns {reader.fieldnames}, not this release's {list(columns)}; "
                "pass another --out directory or move the old file away"
            )
        return [{k: parse(v) for k, v in row.items()} for row in reader]


def append_rows(path: Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
    """Append rows (missing columns empty), writing the header to a new file first."""
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="raise")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in row.items()})


def _cell(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "" if math.isnan(value) else value
    return value


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-fit chatter (device info, tips, deprecations)."""
    names = ("lightning.pytorch", "lightning.fabric", "lightning")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="lightning")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


class Sweep:
    """The runs of one experiment in ``out``: what is done, and running the rest."""

    def __init__(self, out: Path, experiment: str, columns: Sequence[str] = COLUMNS) -> None:
        self.out = Path(out)
        self.experiment = experiment
        self.columns = tuple(columns)
        self.csv = self.out / f"{experiment}.csv"
        self.curves_csv = self.out / f"{experiment}_curves.csv"
        self.partial = self.out / f"{experiment}.partial"

    def checkpoint(self, key: str) -> Path:
        """The mid-run checkpoint of the run ``key`` (there while it is unfinished)."""
        return self.partial / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"

    def rows(self) -> list[dict[str, Any]]:
        return read_table(self.csv, self.columns)

    def curves(self) -> dict[str, Curve]:
        curves: dict[str, Curve] = {}
        for r in read_table(self.curves_csv, CURVE_COLUMNS):
            c = curves.setdefault(r["key"], Curve())
            c.samples.append(r["samples"])
            c.accuracy.append(r["accuracy"])
            c.seconds.append(r["seconds"])
            c.m1.append(r["m1"])
            c.m0.append(r["m0"])
        return curves

    def run(
        self,
        specs: Sequence[RunSpec],
        execute: Callable[[RunSpec], RunResult],
        *,
        show_progress: bool = True,
    ) -> list[dict[str, Any]]:
        """Run every spec whose key is not in the CSV yet.

        Returns the CSV rows of this experiment, data set and mode: the runs of
        ``specs`` and any others recorded earlier (e.g. other sizes), so that
        tables cover every finished run.
        """
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        keys = [s.key for s in specs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"{self.experiment}: two runs share a key; keys must be unique")
        self.out.mkdir(parents=True, exist_ok=True)
        done = {r["key"] for r in self.rows()}
        self._drop_stale_curves(done)
        todo = [s for s in specs if s.key not in done]
        console = Console(stderr=True)
        progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=not show_progress,
        )
        with progress, quiet_lightning():
            finished = len(done & set(keys))
            task = progress.add_task(self.experiment, total=len(specs), completed=finished)
            for spec in todo:
                progress.update(task, description=f"{self.experiment}: {spec.title}")
                checkpoint = self.checkpoint(spec.key)
                if show_progress and checkpoint.exists():
                    console.print(
                        f"{self.experiment}: {spec.title} resumes from {checkpoint}", soft_wrap=True
                    )
                result = execute(replace(spec, checkpoint=checkpoint))
                row = {"key": spec.key, "experiment": self.experiment, **result.row}
                if result.curve is not None:
                    c = result.curve
                    append_rows(
                        self.curves_csv,
                        CURVE_COLUMNS,
                        (
                            {
                                "key": spec.key,
                                "samples": s,
                                "accuracy": a,
                                "seconds": t,
                                "m1": m1,
                                "m0": m0,
                            }
                            for s, a, t, m1, m0 in zip(
                                c.samples, c.accuracy, c.seconds, c.m1, c.m0, strict=True
                            )
                        ),
                    )
                append_rows(self.csv, self.columns, [row])  # the row last: it marks the run done
                checkpoint.unlink(missing_ok=True)
                progress.advance(task)
                if show_progress and not console.is_terminal:  # a log file: one line per run
                    console.print(
                        f"{self.experiment}: {spec.title} done in {row.get('seconds', 0):.0f} s, "
                        f"accuracy {row.get('accuracy', float('nan')):.3f}"
                    )
            progress.update(task, description=f"{self.experiment}: done")
        return self.related(keys)

    def related(self, keys: Sequence[str]) -> list[dict[str, Any]]:
        """The rows of ``keys`` plus every earlier row of the same experiment, data set and
        mode (the part of the key before the first ``=``), in CSV order."""
        prefixes = {k.split("=", 1)[0].rsplit("|", 1)[0] + "|" for k in keys}
        return [r for r in self.rows() if any(str(r["key"]).startswith(p) for p in prefixes)]

    def _drop_stale_curves(self, done: set[str]) -> None:
        """Remove curve points of runs that were interrupted before their row was written."""
        points = read_table(self.curves_csv, CURVE_COLUMNS)
        kept = [p for p in points if p["key"] in done]
        if len(kept) != len(points):
            self.curves_csv.unlink()
            append_rows(self.curves_csv, CURVE_COLUMNS, kept)
