"""Synaptic caching in the Keras optimizer wrapper: the transient store as optimizer variables.

The core rule (:class:`~energy_callbacks.core.caching.Caching`) runs in-graph
through ``keras_ops``, in the same order as the NumPy reference: the step's
applied change enters the store, consolidation, maintenance, decay. The decay
goes into the new weight values the wrapper assigns, so the network uses
``w_c + w_e``. The store and the totals are optimizer variables: they are
saved with the optimizer (``model.save``, ``ModelCheckpoint``,
``BackupAndRestore``) and flow through the JAX trainer state. A skipped step
(no sample passed the gate, NaN/Inf) leaves them as they were.

``consolidate`` (the callback calls it in ``on_train_end``) empties the store
on the host: it costs ``sum |w_e|`` and moves no weight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from ..core.caching import Caching
from .ops import keras_ops
from .totals import (
    carry_count,
    read_count,
    read_total,
    split_count,
    split_total,
    two_sum_update,
)

_TOTALS = (
    ("consolidation", "float32"),
    ("consolidation_error", "float32"),
    ("maintenance", "float32"),
    ("maintenance_error", "float32"),
    ("consolidations_low", "int32"),
    ("consolidations_high", "int32"),
)


class CachingVariables:
    """The transient store (one variable per covered weight) and the caching totals."""

    def __init__(self, optimizer: Any, caching: Caching, covered: Sequence[Any]) -> None:
        self.caching = caching
        self.store = [
            optimizer.add_variable(
                tuple(v.shape), initializer="zeros", dtype=_store_dtype(v), name="transient"
            )
            for v in covered
        ]
        n = len(covered)
        self.totals = {
            name: optimizer.add_variable((n,), initializer="zeros", dtype=dtype, name=name)
            for name, dtype in _TOTALS
        }

    # -- in the train step -----------------------------------------------------
    def step(
        self,
        final: list[Any],
        covered: Sequence[int],
        kept: Sequence[Any],
        store: Sequence[Any],
        go: Any,
    ) -> tuple[list[Any], list[Any], tuple[Any, Any, Any]]:
        """The cached step as a pure function of tensors.

        ``final`` are the new values of all variables, ``kept`` the applied change of
        each covered one, ``store`` the store's values. Returns ``final`` with the
        decay added, the new store values, and per tensor the consolidation energy,
        writes and maintenance of the step (zeros when it does not go ahead).
        """
        final = list(final)
        new_store, consolidated, writes, upkeep = [], [], [], []
        for j, i in enumerate(covered):
            zeros = ops.zeros_like(store[j])
            applied = ops.where(go, ops.cast(kept[j], store[j].dtype), zeros)
            out = self.caching.transient(ops.add(store[j], applied), keras_ops)
            new_store.append(ops.where(go, out.store, store[j]))
            if out.decay is not None:
                decay = ops.where(go, out.decay, zeros)
                final[i] = final[i] + ops.cast(decay, final[i].dtype)
            consolidated.append(ops.cast(out.consolidated, "float32"))
            writes.append(ops.cast(out.consolidations, "int32"))
            upkeep.append(ops.cast(out.maintenance, "float32"))
        n = len(covered)
        zero_f, zero_i = ops.zeros((n,), "float32"), ops.zeros((n,), "int32")
        figures = (
            ops.where(go, ops.stack(consolidated), zero_f),
            ops.where(go, ops.stack(writes), zero_i),
            ops.where(go, ops.stack(upkeep), zero_f),
        )
        return final, new_store, figures

    def metered(self, new_store: Sequence[Any], figures: tuple[Any, Any, Any]) -> list[Any]:
        """The ``(variable, new value)`` assignments of a step's :meth:`step` outputs."""
        consolidated, writes, upkeep = figures
        acc = self.totals
        out = list(zip(self.store, new_store, strict=True))
        out += two_sum_update(acc["consolidation"], acc["consolidation_error"], consolidated)
        out += two_sum_update(acc["maintenance"], acc["maintenance_error"], upkeep)
        low, high = carry_count(
            acc["consolidations_low"].value, acc["consolidations_high"].value, writes
        )
        return out + [(acc["consolidations_low"], low), (acc["consolidations_high"], high)]

    # -- on the host -----------------------------------------------------------------
    def read(self, read: Callable[[Any], np.ndarray]) -> dict[str, np.ndarray]:
        """The totals in float64 / int64, through ``read(variable) -> array``."""
        t = {k: read(v) for k, v in self.totals.items()}
        return {
            "consolidation": read_total(t["consolidation"], t["consolidation_error"]),
            "maintenance": read_total(t["maintenance"], t["maintenance_error"]),
            "consolidations": read_count(t["consolidations_low"], t["consolidations_high"]),
        }

    def host_totals(self, read: Callable[[Any], np.ndarray]) -> tuple[float, int]:
        """``(energy, writes)`` so far, on the host."""
        t = self.read(read)
        energy = float(np.sum(t["consolidation"]) + np.sum(t["maintenance"]))
        return energy, int(np.sum(t["consolidations"]))

    def state(self, names: Sequence[str], read: Callable[[Any], np.ndarray]) -> dict[str, Any]:
        """The core :meth:`Caching.state_dict` of the variables."""
        return {"names": list(names), "store": [read(s) for s in self.store], **self.read(read)}

    def consolidate(self) -> None:
        """Empty the store into the consolidation totals (the end of fit)."""
        read = lambda v: np.asarray(v.numpy())  # noqa: E731
        totals = self.read(read)
        held = [read(s) for s in self.store]
        consolidation = totals["consolidation"] + [np.abs(h.astype(np.float64)).sum() for h in held]
        writes = totals["consolidations"] + [np.count_nonzero(h) for h in held]
        value, error = split_total(consolidation)
        low, high = split_count(writes)
        for name, x in (
            ("consolidation", value),
            ("consolidation_error", error),
            ("consolidations_low", low),
            ("consolidations_high", high),
        ):
            self.totals[name].assign(x)
        for s, h in zip(self.store, held, strict=True):
            s.assign(np.zeros_like(h))


def _store_dtype(variable: Any) -> str:
    """The store holds the weight's dtype, at least float32 (as the torch adapter)."""
    dtype = keras.backend.standardize_dtype(variable.dtype)
    return dtype if dtype in ("float32", "float64") else "float32"
