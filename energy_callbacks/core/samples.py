"""Sample gates: which training samples of a batch may cause plasticity.

A gate looks at the network's outputs and the targets (class indices, or
one-hot/probability rows) and returns a boolean vector over the batch. A caller
removes the gated-out samples' terms from the loss. A batch where no sample
passes must change no weight at all (skip the optimizer step).

- :class:`Lazy`: learn only on samples misclassified now (``argmax != target``).
- :class:`Margin`: also learn on correct samples whose true-class probability
  is below ``threshold``.
- :class:`MemorizedMistakes`: learn if wrong now *or* ever wrong before. The
  flags live in a :class:`~energy_callbacks.core.memory.MistakeMemory` keyed by
  sample id (1 bit per sample, bounded in memory whatever the ids).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import numpy as np

from . import checks
from .memory import MistakeMemory
from .ops import Array, ArrayOps, numpy_ops


class SampleGate(ABC):
    """Base class: ``gate(outputs, targets, sample_ids) -> bool mask over the batch``."""

    needs_ids = False

    @abstractmethod
    def gate(
        self,
        outputs: Array,
        targets: Array,
        sample_ids: Array | None = None,
        ops: ArrayOps = numpy_ops,
        *,
        counted: Array | None = None,
        owner: np.ndarray | None = None,
    ) -> Array:
        """True for the samples that learn.

        ``counted`` is False for entries that neither learn nor count as mistakes
        (``ignore_index`` tokens). ``owner`` maps each row to its entry of
        ``sample_ids`` when several rows share one id (the tokens of a sequence).
        """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: B027 - stateless default
        pass


def _only(mask: Array, counted: Array | None, ops: ArrayOps) -> Array:
    return mask if counted is None else ops.logical_and(mask, counted)


def labels_of(targets: Array, ops: ArrayOps) -> Array:
    """Class indices from index vectors or one-hot/probability rows."""
    return ops.argmax(targets) if len(targets.shape) == 2 else targets


def mistakes(outputs: Array, targets: Array, ops: ArrayOps) -> Array:
    """True where ``argmax(outputs)`` differs from the target class."""
    return ops.argmax(outputs) != labels_of(targets, ops)


class Lazy(SampleGate):
    """Lazy learning: only misclassified samples learn (Pache & van Rossum)."""

    def __repr__(self) -> str:
        return "Lazy()"

    def gate(
        self,
        outputs: Array,
        targets: Array,
        sample_ids: Array | None = None,
        ops: ArrayOps = numpy_ops,
        *,
        counted: Array | None = None,
        owner: np.ndarray | None = None,
    ) -> Array:
        return _only(mistakes(outputs, targets, ops), counted, ops)


class Margin(SampleGate):
    """Learn on mistakes and on correct samples with true-class probability < threshold.

    ``from_logits=True`` applies a softmax to the outputs first.
    """

    def __init__(self, threshold: float, *, from_logits: bool = True) -> None:
        try:
            self.threshold = checks.fraction("Margin.threshold", threshold)
        except ValueError:
            raise ValueError(
                f"Margin.threshold must be a probability in (0, 1], got {threshold!r}"
            ) from None
        self.from_logits = checks.flag("Margin.from_logits", from_logits)

    def __repr__(self) -> str:
        return f"Margin({self.threshold})"

    def gate(
        self,
        outputs: Array,
        targets: Array,
        sample_ids: Array | None = None,
        ops: ArrayOps = numpy_ops,
        *,
        counted: Array | None = None,
        owner: np.ndarray | None = None,
    ) -> Array:
        labels = labels_of(targets, ops)
        unsure = ops.class_probability(outputs, labels, self.from_logits) < self.threshold
        return _only(ops.logical_or(ops.argmax(outputs) != labels, unsure), counted, ops)


class MemorizedMistakes(SampleGate):
    """Learn if wrong now (per ``base``, default :class:`Lazy`) or flagged before.

    Needs a sample id per sample (integers >= 0). Samples that are wrong now get
    flagged. ``capacity`` bounds the ids (``0 <= id < capacity``, larger ids raise):
    the memory is then one bitmap of that size, and an in-graph adapter (Keras)
    holds a fixed-size memory of that many flags, 2**20 by default there. Without
    it any id is accepted and the memory stays bounded (:mod:`~energy_callbacks.core.memory`).
    """

    needs_ids = True

    def __init__(self, base: SampleGate | None = None, *, capacity: int | None = None) -> None:
        base = Lazy() if base is None else base
        if isinstance(base, MemorizedMistakes) or not isinstance(base, SampleGate):
            raise ValueError(f"MemorizedMistakes.base must be Lazy() or Margin(...), got {base!r}")
        if capacity is not None:
            try:
                capacity = checks.count("MemorizedMistakes.capacity", capacity)
            except ValueError:
                raise ValueError(
                    f"MemorizedMistakes.capacity must be an integer >= 1 (the number of sample "
                    f"ids), got {capacity!r}"
                ) from None
        self.base = base
        self.capacity = capacity
        self.memory = MistakeMemory(capacity)

    def __repr__(self) -> str:
        return f"MemorizedMistakes({self.base!r})"

    def gate(
        self,
        outputs: Array,
        targets: Array,
        sample_ids: Array | None = None,
        ops: ArrayOps = numpy_ops,
        *,
        counted: Array | None = None,
        owner: np.ndarray | None = None,
    ) -> Array:
        """With ``owner`` (tokens sharing their sequence's id) a sequence is flagged when
        any of its counted tokens is wrong, and every counted token of a flagged
        sequence learns."""
        if sample_ids is None:
            raise ValueError(
                "MemorizedMistakes needs sample ids: give the batch an 'index' entry or pass "
                "sample_ids= (ids are keys into the mistake memory)"
            )
        wrong = self.base.gate(outputs, targets, sample_ids, ops, counted=counted)
        ids = np.asarray(ops.to_numpy(sample_ids)).reshape(-1)
        if self.capacity is not None and ids.size and int(ids.max()) >= self.capacity:
            raise ValueError(
                f"MemorizedMistakes: sample id {int(ids.max())} is not below capacity="
                f"{self.capacity}; raise capacity to the number of training samples"
            )
        flags = self.memory.get(ids)
        wrong_rows = np.asarray(ops.to_numpy(wrong), dtype=bool)
        if owner is None:
            self.memory.set(ids[wrong_rows])
        else:
            flags = flags[owner]
            self.memory.set(ids[np.unique(owner[wrong_rows])])
        return _only(ops.logical_or(wrong, ops.from_numpy(flags)), counted, ops)

    def state_dict(self) -> dict[str, Any]:
        return {"memory": self.memory.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.memory.load_state_dict(state["memory"])
