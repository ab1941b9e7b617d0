"""Energy against accuracy over training, from a Lightning or Keras ``CSVLogger`` file.

- :func:`read_curve` reads one metrics file into a :class:`Curve`: the accuracy at
  each evaluation and the energy spent up to it (``plasticity/energy``, M1, and
  ``plasticity/updates``, M0: Keras's columns, or Lightning's ``..._step`` and
  ``..._epoch`` ones).
- :func:`figure` draws curves on log-energy axes, one line per curve, and
  :func:`plot_curves` saves it as a PNG. ``energy-callbacks plot`` and the demo
  use them.

Two layouts are understood:

- **Lightning** ``CSVLogger`` (``metrics.csv``, with a ``step`` column): energy
  rows and evaluation rows are written separately; an evaluation at step ``s``
  is paired with the last energy logged at a step ``<= s``. With the trainer's
  ``log_every_n_steps=k`` that energy can lag the evaluation by up to ``k - 1``
  steps.
- **Keras** ``CSVLogger`` (one row per epoch, no ``step`` column): each row holds
  both, because the callback writes the energy into the epoch's logs (list it
  before ``CSVLogger``).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ENERGY = "plasticity/energy"
UPDATES = "plasticity/updates"
SUFFIXES = ("", "_epoch", "_step")
"""Lightning logs the energy on_step and on_epoch: ``plasticity/energy_step`` and
``_epoch`` columns; Keras logs ``plasticity/energy``. A row's first one present counts."""
ACCURACY_COLUMNS = (
    "val_accuracy",
    "val_acc",
    "val/accuracy",
    "val/acc",
    "test_accuracy",
    "test_acc",
    "accuracy",
    "acc",
    "train_accuracy",
    "train_acc",
)
"""Accuracy columns looked for, in this order (validation before training)."""


class MetricsFileError(ValueError):
    """A metrics file cannot be turned into a curve; the message says why and what to do."""


@dataclass(frozen=True)
class Curve:
    """One run: the energy spent up to each evaluation and the accuracy there.

    ``updates`` is None when the file has no ``plasticity/updates``. ``rule`` picks
    the line's colour and ``framework`` its style, so that the same rule run in two
    frameworks shares a colour.
    """

    label: str
    energy: tuple[float, ...]
    updates: tuple[float, ...] | None
    accuracy: tuple[float, ...]
    accuracy_column: str
    rule: str = ""
    framework: str = ""


def read_curve(
    path: str | Path,
    *,
    accuracy: str | None = None,
    label: str | None = None,
    rule: str | None = None,
    framework: str = "",
) -> Curve:
    """The curve in one ``CSVLogger`` file (Lightning or Keras layout).

    ``accuracy`` names the accuracy column (default: the first of
    :data:`ACCURACY_COLUMNS` present). Raises :class:`MetricsFileError` for a
    missing file, a file without ``plasticity/energy`` or an accuracy column, or
    one with no evaluation that has an energy before it.
    """
    path = Path(path)
    if not path.is_file():
        raise MetricsFileError(f"{path}: no such file; give the metrics.csv a CSVLogger wrote")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    if not any(ENERGY + sfx in columns for sfx in SUFFIXES):
        raise MetricsFileError(
            f"{path} has no {ENERGY} column (columns: {', '.join(columns) or 'none'}); log it "
            "with energy_callbacks' PlasticityCallback (in Keras, list it before the CSVLogger)"
        )
    column = accuracy or next((c for c in ACCURACY_COLUMNS if c in columns), None)
    if column is None or column not in columns:
        wanted = f"column {accuracy!r}" if accuracy else "accuracy column"
        raise MetricsFileError(
            f"{path} has no {wanted} (columns: {', '.join(columns)}); name one with --accuracy"
        )
    points = _lightning_points(rows, column) if "step" in columns else _epoch_points(rows, column)
    if not points:
        raise MetricsFileError(
            f"{path}: no row has both {column} and an energy logged at or before it"
        )
    has_updates = all(u is not None for _, _, u in points)
    name = label if label is not None else _default_label(path)
    return Curve(
        label=name,
        energy=tuple(e for _, e, _ in points),
        updates=tuple(float(u) for _, _, u in points if u is not None) if has_updates else None,
        accuracy=tuple(a for a, _, _ in points),
        accuracy_column=column,
        rule=rule if rule is not None else name,
        framework=framework,
    )


def _number(text: str | None) -> float | None:
    if text is None or text.strip() == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


Point = tuple[float, float, float | None]  # accuracy, energy, updates


def _logged(row: dict[str, str], key: str) -> float | None:
    """``key`` in a row, as Keras (``key``) or Lightning (``key_epoch``/``key_step``) wrote it."""
    return next(
        (v for v in (_number(row.get(key + sfx)) for sfx in SUFFIXES) if v is not None), None
    )


def _epoch_points(rows: list[dict[str, str]], column: str) -> list[Point]:
    points = []
    for row in rows:
        acc, energy = _number(row.get(column)), _logged(row, ENERGY)
        if acc is not None and energy is not None:
            points.append((acc, energy, _logged(row, UPDATES)))
    return points


def _lightning_points(rows: list[dict[str, str]], column: str) -> list[Point]:
    logged: list[tuple[float, int, float, float | None]] = []  # step, order, energy, updates
    evals: list[tuple[float, float]] = []  # step, accuracy
    for order, row in enumerate(rows):
        step = _number(row.get("step"))
        if step is None:
            continue
        energy, acc = _logged(row, ENERGY), _number(row.get(column))
        if energy is not None:
            logged.append((step, order, energy, _logged(row, UPDATES)))
        if acc is not None:
            evals.append((step, acc))
    logged.sort()
    points = []
    for step, acc in evals:
        before = [entry for entry in logged if entry[0] <= step]
        if before:
            _, _, energy, updates = before[-1]
            points.append((acc, energy, updates))
    return points


def _default_label(path: Path) -> str:
    """``runs/lazy/metrics.csv`` -> ``lazy``; ``log.csv`` -> ``log``."""
    return path.parent.name if path.stem == "metrics" and path.parent.name else path.stem


def distinct_labels(paths: Sequence[str | Path]) -> list[str]:
    """Short labels that tell files apart: the path parts they do not share.

    ``a/backprop/metrics.csv`` and ``a/lazy/metrics.csv`` give ``backprop`` and
    ``lazy`` (Lightning's file name ``metrics`` is dropped first); a single file
    gets :func:`read_curve`'s default label.
    """
    if len(paths) < 2:
        return [_default_label(Path(p)) for p in paths]
    parts = [_without_metrics(Path(p).with_suffix("").parts) for p in paths]
    head = 0
    while all(len(p) > head + 1 for p in parts) and len({p[head] for p in parts}) == 1:
        head += 1
    tail = 0
    while all(len(p) > head + tail + 1 for p in parts) and len({p[-1 - tail] for p in parts}) == 1:
        tail += 1
    labels = ["/".join(p[head : len(p) - tail]) for p in parts]
    return labels if len(set(labels)) == len(labels) else [str(p) for p in paths]


def _without_metrics(parts: tuple[str, ...]) -> tuple[str, ...]:
    return parts[:-1] if len(parts) > 1 and parts[-1] == "metrics" else parts


def figure(curves: Sequence[Curve], *, title: str | None = None) -> Figure:
    """Accuracy against M1 (and against M0 when every curve has it), one line per curve.

    The energy axes are logarithmic (points with zero energy are left out). Each
    distinct ``rule`` gets a colour, each distinct ``framework`` a line style.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no display

    if not curves:
        raise ValueError("plot: no curves to draw")
    with_updates = all(c.updates is not None for c in curves)
    fig = Figure(figsize=(11 if with_updates else 6, 4.5), layout="constrained")
    axes = fig.subplots(1, 2 if with_updates else 1, sharey=True, squeeze=False)[0]
    colours = {rule: f"C{i % 10}" for i, rule in enumerate(dict.fromkeys(c.rule for c in curves))}
    styles = dict(
        zip(dict.fromkeys(c.framework for c in curves), ("-", "--", ":", "-."), strict=False)
    )
    panels = [("energy", "plasticity energy M1 = sum |dw|")]
    if with_updates:
        panels.append(("updates", "synaptic updates M0"))
    for ax, (field, xlabel) in zip(axes, panels, strict=True):
        for c in curves:
            kept = [(x, a) for x, a in zip(getattr(c, field), c.accuracy, strict=True) if x > 0]
            ax.plot(
                [x for x, _ in kept],
                [a for _, a in kept],
                marker="o",
                markersize=3,
                color=colours[c.rule],
                linestyle=styles.get(c.framework, "-"),
                label=c.label,
            )
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel(" / ".join(dict.fromkeys(c.accuracy_column for c in curves)))
    axes[0].legend(fontsize="small")
    fig.suptitle(title or "Accuracy against the energy spent so far")
    return fig


def plot_curves(curves: Sequence[Curve], path: str | Path, *, title: str | None = None) -> Path:
    """Save :func:`figure` of ``curves`` as a PNG at ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure(curves, title=title).savefig(path, dpi=110)
    return path
