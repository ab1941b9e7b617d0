"""Classification targets for the sample gates, checked before any gate judges them.

The gates judge one class prediction per sample: outputs ``(batch, classes)``,
or ``(batch, tokens, classes)`` for sequence models, where every token is a
sample. Targets are either

- class ids with the outputs' leading shape (``(batch,)`` or ``(batch, tokens)``;
  a trailing axis of size 1 is dropped), integers (or integral floats) in
  ``[0, classes)``; the id ``ignore_index`` (``-100``, as in torch's
  ``cross_entropy``) marks entries that are neither judged nor counted; or
- one-hot or soft probability rows of the outputs' shape (each row ``>= 0`` and
  summing to 1); their argmax is the class.

Anything else (a regression target, one output column, probabilities that are
not probabilities) raises ``ValueError`` saying what to pass instead: a gate
that judged such targets would decide by an argmax that means nothing.

Example::

    >>> import numpy as np
    >>> t = class_targets((2, 3, 4), np.array([[1, 2, -100], [0, 3, 3]]))
    >>> t.labels.tolist(), t.counted.tolist(), t.batch_shape
    ([1, 2, 0, 0, 3, 3], [True, True, False, True, True, True], (2, 3))
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Any

import numpy as np

IGNORE_INDEX = -100
"""The target id that marks an entry nobody judges (torch's ``ignore_index`` default)."""

REGRESSION_HINT = (
    "The sample gates (lazy, margin, mistakes) judge classifications; for regression "
    "or other non-class outputs use samples=None (the energy is still measured)."
)


@dataclass(frozen=True)
class ClassTargets:
    """Targets as flat class ids, ready for a gate.

    ``labels`` holds one int64 class id per judged entry (``prod(batch_shape)`` of
    them; ignored entries hold 0). ``counted`` is False where the target was
    ``ignore_index`` (None when every entry counts). ``batch_shape`` is the
    outputs' shape without the class axis: ``(batch,)`` or ``(batch, tokens)``.
    """

    labels: np.ndarray
    counted: np.ndarray | None
    batch_shape: tuple[int, ...]

    @property
    def size(self) -> int:
        """How many entries are judged (ignored ones not included)."""
        return int(self.labels.size if self.counted is None else np.count_nonzero(self.counted))


def class_targets(
    output_shape: tuple[int, ...], targets: Any, *, ignore_index: int | None = IGNORE_INDEX
) -> ClassTargets:
    """Check ``targets`` against outputs of ``output_shape``; flat class ids or ValueError."""
    shape = tuple(int(s) for s in output_shape)
    if len(shape) not in (2, 3):
        raise ValueError(
            f"sample gate: outputs of shape {shape}; the gates judge one prediction per "
            "sample, (batch, classes), or per token, (batch, tokens, classes). Pass "
            "outputs=<callable forward output -> class scores> to pick them."
        )
    classes = shape[-1]
    if classes < 2:
        raise ValueError(
            f"sample gate: outputs of shape {shape} hold {classes} class score per sample, "
            "so argmax is always 0 and the gate decides nothing. For one binary logit z pass "
            "outputs=lambda out: torch.cat([-z, z], -1) (two class scores). " + REGRESSION_HINT
        )
    t = np.asarray(targets)
    batch = shape[:-1]
    if t.shape == batch + (1,) and t.shape != shape:
        t = t.reshape(batch)
    if t.shape == batch:
        labels, counted = _class_ids(t, classes, ignore_index, shape)
    elif t.shape == shape:
        labels, counted = _probability_rows(t, shape), None
    else:
        raise ValueError(
            f"sample gate: targets of shape {t.shape} do not fit outputs of shape {shape}: "
            f"give class ids of shape {batch} or one-hot/probability rows of shape {shape}. "
            "Pass targets=<callable batch -> targets> to pick them. " + REGRESSION_HINT
        )
    return ClassTargets(labels, counted, batch)


def _class_ids(
    t: np.ndarray, classes: int, ignore_index: int | None, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray | None]:
    if t.dtype == bool or not (
        np.issubdtype(t.dtype, np.integer) or np.issubdtype(t.dtype, np.floating)
    ):
        raise ValueError(
            f"sample gate: targets of dtype {t.dtype} are not class ids; give integer ids in "
            f"[0, {classes}). " + REGRESSION_HINT
        )
    flat = t.reshape(-1)
    if np.issubdtype(flat.dtype, np.floating):
        flat = flat.astype(np.float64)
        bad = ~np.isfinite(flat) | (flat != np.round(flat))
        if bad.any():
            raise ValueError(
                f"sample gate: targets hold {flat[bad][0]!r}, not a class id (outputs of shape "
                f"{shape} have {classes} classes). " + REGRESSION_HINT
            )
    ids = flat.astype(np.int64)
    ignored = None if ignore_index is None else ids == ignore_index
    valid = (ids >= 0) & (ids < classes)
    if ignored is not None:
        valid |= ignored
    if not valid.all():
        raise ValueError(
            f"sample gate: target class id {int(ids[~valid][0])} is outside [0, {classes}) for "
            f"outputs of shape {shape}"
            + ("" if ignore_index is None else f" (and is not ignore_index={ignore_index})")
            + ". Check the labels, or the number of output classes."
        )
    if ignored is None or not ignored.any():
        return ids, None
    return np.where(ignored, 0, ids), ~ignored


def _probability_rows(t: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    rows = t.reshape(-1, shape[-1])
    if not np.issubdtype(rows.dtype, np.floating) and not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"sample gate: targets of dtype {t.dtype} are not class probabilities")
    p = rows.astype(np.float64)
    tolerance = 1e-2 if rows.dtype.itemsize <= 2 else 1e-4
    sums = p.sum(axis=1)
    ok = np.isfinite(p).all(axis=1) & (p >= 0).all(axis=1) & (np.abs(sums - 1) <= tolerance)
    if not ok.all():
        r = int(np.flatnonzero(~ok)[0])
        raise ValueError(
            f"sample gate: targets of shape {t.shape} match the outputs but row {r} "
            f"({p[r][:6].tolist()}{'...' if p.shape[1] > 6 else ''}) is not a probability "
            "row (entries >= 0 summing to 1), so its argmax is no class. Give one-hot or "
            f"soft labels, or class ids of shape {shape[:-1]}. " + REGRESSION_HINT
        )
    return np.asarray(p.argmax(axis=1), dtype=np.int64)


def owners(batch_shape: tuple[int, ...], ids_shape: tuple[int, ...]) -> np.ndarray | None:
    """Which sample id each judged entry belongs to: None when there is one id per
    entry, else the row of each token (one id per sequence of ``(batch, tokens)``)."""
    n = prod(batch_shape)
    if ids_shape == batch_shape or (len(ids_shape) == 1 and ids_shape[0] == n):
        return None
    if len(batch_shape) == 2 and ids_shape in ((batch_shape[0],), (batch_shape[0], 1)):
        return np.repeat(np.arange(batch_shape[0]), batch_shape[1])
    raise ValueError(
        f"sample gate: sample ids of shape {ids_shape} fit neither the samples "
        f"{batch_shape[:1]} nor the judged entries {batch_shape}: give one id per sample "
        "(a sequence's tokens share its flag) or one id per token"
    )
