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

import math
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from ..core.caching import Caching
from ..core.energy import net_change
from .ops import cut, keras_ops, one_slice, over_slices, put
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
        final: list[Any] | None,
        covered: Sequence[int],
        kept: Sequence[Any],
        store: Sequence[Any],
        go: Any,
    ) -> tuple[list[Any] | None, list[Any], tuple[Any, Any, Any]]:
        """The cached step as a pure function of tensors.

        ``final`` are the new values of all variables (tensors of the step's own; None
        when no rule masks and the store does not decay: the weights keep the update),
        ``kept`` the applied change of each covered one (a tensor, or compiled a
        ``(Difference, mask or None)`` that is read a slice at a time), ``store`` the
        store's values. Returns ``final``
        with the decay added, the new store values, and per tensor the consolidation
        energy, writes and maintenance of the step (zeros when it does not go ahead).
        """
        final = None if final is None else list(final)
        new_store, consolidated, writes, upkeep = [], [], [], []
        for j, i in enumerate(covered):
            w = None if final is None else final[i]
            if self.caching.scope == "synapse":  # element by element: in slices
                new, w, figures = self._in_slices(w, kept[j], store[j], go)
            else:
                new, w, figures = self._tensor_step(w, _dense(kept[j]), store[j], go)
            if final is not None:
                final[i] = w
            new_store.append(new)
            consolidated.append(figures[0])
            writes.append(figures[1])
            upkeep.append(figures[2])
        n = len(covered)
        zero_f, zero_i = ops.zeros((n,), "float32"), ops.zeros((n,), "int32")
        figures = (
            ops.where(go, ops.stack(consolidated), zero_f),
            ops.where(go, ops.stack(writes), zero_i),
            ops.where(go, ops.stack(upkeep), zero_f),
        )
        return final, new_store, figures

    def _tensor_step(self, final: Any, kept: Any, store: Any, go: Any) -> tuple[Any, Any, tuple]:
        """One tensor's (or slice's) step: the new store, ``final`` with the decay
        added (None stays None: no decay), and its figures."""
        zeros = ops.zeros_like(store)
        applied = ops.where(go, ops.cast(kept, store.dtype), zeros)
        out = self.caching.transient(ops.add(store, applied), keras_ops)
        if out.decay is not None:
            final = final + ops.cast(ops.where(go, out.decay, zeros), final.dtype)
        figures = (
            ops.cast(out.consolidated, "float32"),
            ops.cast(out.consolidations, "int32"),
            ops.cast(out.maintenance, "float32"),
        )
        return ops.where(go, out.store, store), final, figures

    def _in_slices(self, final: Any, kept: Any, store: Any, go: Any) -> tuple[Any, Any, tuple]:
        """:meth:`_tensor_step` of the synapse scope (element by element), a slice of
        the flat tensor at a time: the new store (and with a decay, the weights, a
        tensor of the step's own) are written in place, in the loop's carry where
        compiled, and no temporary of the whole tensor's size (the store plus the
        update, the masks, the sums' written inputs) lives."""
        shape, n = tuple(store.shape), int(np.prod(store.shape))
        flat_store = ops.reshape(store, (-1,))
        decays = math.isfinite(self.caching.tau)
        weights = ops.reshape(final, (-1,)) if decays else ops.zeros(())

        # On JAX the new store is written over the old one in the loop's carry: each
        # slice is read there before it is written, so XLA updates the donated store in
        # place (3.41x of the weights' bytes at the peak against 4.38x). TensorFlow
        # then holds the variable and the carry both (4.42x against 3.73x), and eager
        # torch writes a buffer in place: they get a buffer of their own.
        in_place = one_slice(n) or keras.backend.backend() == "jax"
        buffer = flat_store if in_place else ops.zeros_like(flat_store)

        def one(start: Any, size: int, carry: tuple) -> tuple:
            new_store, weights, *sums = carry
            new, w, figures = self._tensor_step(
                cut(weights, start, size) if decays else None,
                _kept_slice(kept, start, size),
                cut(new_store if in_place else flat_store, start, size),
                go,
            )
            return (
                put(new_store, start, new),
                put(weights, start, w) if decays else weights,
                *(ops.add(s, f) for s, f in zip(sums, figures, strict=True)),
            )

        zero = ops.zeros((), "float32")
        carry = (buffer, weights, zero, ops.zeros((), "int32"), zero)
        new_store, weights, *sums = over_slices(n, one, carry)
        final = ops.reshape(weights, tuple(final.shape)) if decays else final
        return ops.reshape(new_store, shape), final, tuple(sums)

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

    def figures(
        self, names: Sequence[str], read: Callable[[Any], np.ndarray]
    ) -> tuple[dict[str, Any], list[float]]:
        """The totals (:meth:`state` without the store) and ``sum |w_e|`` per tensor,
        for :meth:`Caching.load_figures`: a report copies no store."""
        return {"names": list(names), **self.read(read)}, [h for h, _ in self._held()]

    def _held(self) -> list[tuple[float, int]]:
        """``(sum |w_e|, count(w_e != 0))`` per tensor, read a slice at a time (float64
        sums on the host, no copy of a whole tensor)."""
        return [
            net_change(ops.reshape(s.value, (-1,)), None, read=ops.convert_to_numpy)
            for s in self.store
        ]

    def consolidate(self) -> None:
        """Empty the store into the consolidation totals (the end of fit)."""
        read = lambda v: np.asarray(v.numpy())  # noqa: E731
        totals = self.read(read)
        consolidation, writes = totals["consolidation"], totals["consolidations"]
        for j, (held, count) in enumerate(self._held()):
            consolidation[j] += held
            writes[j] += count
        value, error = split_total(consolidation)
        low, high = split_count(writes)
        for name, x in (
            ("consolidation", value),
            ("consolidation_error", error),
            ("consolidations_low", low),
            ("consolidations_high", high),
        ):
            self.totals[name].assign(x)
        for s in self.store:
            s.assign(ops.zeros(s.shape, s.dtype))


def _dense(kept: Any) -> Any:
    """A covered tensor's applied change, written (compiled, from its Difference)."""
    if not isinstance(kept, tuple):
        return kept
    change, mask = kept
    d = change.dense()
    return d if mask is None else ops.where(mask, d, ops.zeros_like(d))


def _kept_slice(kept: Any, start: Any, size: int) -> Any:
    """``size`` entries of the flat applied change from ``start``."""
    if not isinstance(kept, tuple):
        return cut(ops.reshape(kept, (-1,)), start, size)
    change, mask = kept
    after, before, keep = (change if mask is None else change.masked(mask)).flat()
    d = cut(after, start, size) - cut(before, start, size)
    if keep is None:
        return d
    return ops.where(cut(keep, start, size), d, ops.zeros_like(d))


def _store_dtype(variable: Any) -> str:
    """The store holds the weight's dtype, at least float32 (as the torch adapter)."""
    dtype = keras.backend.standardize_dtype(variable.dtype)
    return dtype if dtype in ("float32", "float64") else "float32"
