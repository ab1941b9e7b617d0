"""Synapse competition: which proposed updates of a step are kept.

Every rule maps a step's proposed updates (one array per tensor) to one boolean
mask per tensor (``None`` means "keep all"). Selection is exact: a top fraction
``p`` of ``n`` entries keeps ``k = max(1, round_half_up(p * n))`` entries, so a
3-entry bias is never frozen by rounding. Ties in ``|dw|`` are frequent (changes
are rounded to the weight's precision) and go to the **lower flat index**
(row-major), so exactly ``k`` entries are kept.

Example::

    >>> import numpy as np
    >>> from energy_callbacks.core.topology import Topology
    >>> topo = Topology.mlp([3, 2])
    >>> dw = [np.array([[0.1, -0.5, 0.2], [0.3, 0.0, -0.1]]), np.array([0.2, 0.1])]
    >>> [m.astype(int).tolist() for m in TopFraction(0.5).masks(dw, topo)]
    [[[0, 1, 1], [1, 0, 0]], [1, 0]]
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import checks
from .ops import Array, ArrayOps, numpy_ops
from .topology import TensorSpec, Topology

Masks = list[Array | None]


def keep_count(fraction: float, n: int) -> int:
    """``max(1, round_half_up(fraction * n))``, capped at ``n``."""
    return min(n, max(1, math.floor(fraction * n + 0.5)))


def check_fraction(owner: str, field: str, value: Any) -> float:
    return checks.fraction(f"{owner}.{field}", value)


class SynapseRule(ABC):
    """Base class: ``masks(proposed, topology, ops, step) -> one mask per tensor``."""

    def setup(self, topology: Topology) -> None:  # noqa: B027 - optional hook
        """Check the rule against the network; raise ValueError on a misfit."""

    @abstractmethod
    def masks(
        self,
        proposed: Sequence[Array | None],
        topology: Topology,
        ops: ArrayOps = numpy_ops,
        step: int = 0,
    ) -> Masks:
        """One boolean mask (or None = keep all) per tensor."""


class TopFraction(SynapseRule):
    """Keep the top fraction ``p`` of each tensor's entries by ``|proposed dw|``.

    - ``per_unit=True``: the top fraction within each postsynaptic unit's
      incoming synapses (its kernel slice plus its bias entry). Tensors without
      a unit axis fall back to the whole tensor.
    - ``equal_count=True``: every tensor keeps the same count ``k``, where
      ``k = round(p * n)`` for the largest tensor (capped at each tensor's size).
      In a 784-N-10 MLP this is ``p_out = min(78.4 * p, 1)``.
    - ``largest=False``: the control that keeps the smallest updates instead.
    - ``approximate=True``: one comparison pass per tensor instead of an exact
      selection. A tensor of more than 16384 entries keeps ``|dw| >= t``, where
      ``t`` comes from a sample of about 16384 entries at a prime stride (so that
      columns of a structured tensor are all sampled). Proposals of size zero
      never count. For continuous ``|dw|`` the kept count is
      ``k * (1 +- 4 sqrt((1 - p) / (p * 16384)))`` with probability above 0.9999
      (``+-9%`` at ``p = 0.1``, ``+-3%`` at ``p = 0.5``); ties at ``t`` all go the
      same way. Smaller tensors are exact.
    """

    def __init__(
        self,
        p: float,
        *,
        per_unit: bool = False,
        equal_count: bool = False,
        largest: bool = True,
        approximate: bool = False,
    ) -> None:
        self.p = check_fraction("TopFraction", "p", p)
        per_unit = checks.flag("TopFraction.per_unit", per_unit)
        equal_count = checks.flag("TopFraction.equal_count", equal_count)
        largest = checks.flag("TopFraction.largest", largest)
        approximate = checks.flag("TopFraction.approximate", approximate)
        if per_unit and equal_count:
            raise ValueError("TopFraction: choose per_unit=True or equal_count=True, not both")
        if approximate and (per_unit or not largest):
            raise ValueError(
                "TopFraction.approximate works on whole tensors and the largest updates; "
                "drop per_unit=True / largest=False, or use the exact selection"
            )
        self.per_unit = per_unit
        self.equal_count = equal_count
        self.largest = largest
        self.approximate = approximate

    def __repr__(self) -> str:
        flags = "".join(
            f", {f}=True" for f in ("per_unit", "equal_count", "approximate") if getattr(self, f)
        ) + ("" if self.largest else ", largest=False")
        return f"TopFraction({self.p}{flags})"

    def masks(
        self,
        proposed: Sequence[Array | None],
        topology: Topology,
        ops: ArrayOps = numpy_ops,
        step: int = 0,
    ) -> Masks:
        if self.per_unit:
            return self._per_unit(proposed, topology, ops)
        n_max = max(t.size for t in topology.tensors)
        out: Masks = []
        for t, dw in zip(topology.tensors, proposed, strict=True):
            if dw is None:
                out.append(None)
                continue
            k = (
                min(t.size, keep_count(self.p, n_max))
                if self.equal_count
                else keep_count(self.p, t.size)
            )
            if self.approximate:
                flat = ops.top_magnitude_mask(ops.reshape(dw, (t.size,)), k, approximate=True)
                out.append(ops.reshape(flat, t.shape))
            else:
                out.append(_top_k(dw, t, k, ops, self.largest))
        return out

    def _per_unit(
        self, proposed: Sequence[Array | None], topology: Topology, ops: ArrayOps
    ) -> Masks:
        out: Masks = [None] * len(proposed)
        done: set[int] = set()
        for layer in topology.layers:
            idx = [layer.kernel, *layer.followers]
            done.update(idx)
            parts = [(i, topology.tensors[i]) for i in idx if proposed[i] is not None]
            if not parts:
                continue
            rows = [_unit_rows(proposed[i], t, ops) for i, t in parts]
            widths = [t.size // layer.n_units for _, t in parts]
            k = keep_count(self.p, sum(widths))
            sel = ops.split(ops.top_k_mask(ops.concat(rows, axis=1), k, self.largest), widths, 1)
            for (i, t), m in zip(parts, sel, strict=True):
                out[i] = _from_unit_rows(m, t, ops)
        for i, t in enumerate(topology.tensors):
            dw = proposed[i]
            if i in done or dw is None:
                continue
            if t.unit_axis is None:
                out[i] = _top_k(dw, t, keep_count(self.p, t.size), ops, self.largest)
            else:
                k = keep_count(self.p, t.size // t.shape[t.unit_axis])
                out[i] = _from_unit_rows(
                    ops.top_k_mask(_unit_rows(dw, t, ops), k, self.largest), t, ops
                )
        return out


class Threshold(SynapseRule):
    """Keep updates with ``|dw| >= theta`` (absolute threshold, finite theta >= 0)."""

    def __init__(self, theta: float) -> None:
        self.theta = checks.real(
            "Threshold.theta", theta, low=0.0, low_open=False, what="a finite number >= 0"
        )

    def __repr__(self) -> str:
        return f"Threshold({self.theta})"

    def masks(
        self,
        proposed: Sequence[Array | None],
        topology: Topology,
        ops: ArrayOps = numpy_ops,
        step: int = 0,
    ) -> Masks:
        return [
            None if dw is None else ops.greater_equal(ops.abs(dw), self.theta) for dw in proposed
        ]


class RandomSynapses(SynapseRule):
    """Control: a fixed random subset of ``k = round(p * n)`` synapses per tensor.

    The subset is drawn once per tensor from ``seed`` and the tensor's position,
    so it is the same after a checkpoint/resume and on every data-parallel rank.
    """

    def __init__(self, p: float, *, seed: int = 0) -> None:
        self.p = check_fraction("RandomSynapses", "p", p)
        self.seed = checks.seed("RandomSynapses.seed", seed)
        self._cache: dict[int, Array] = {}

    def __repr__(self) -> str:
        return f"RandomSynapses({self.p}, seed={self.seed})"

    def setup(self, topology: Topology) -> None:
        self._cache = {}

    def fixed_mask(self, index: int, tensor: TensorSpec) -> np.ndarray:
        """The host (NumPy) mask of tensor number ``index``."""
        rng = np.random.default_rng([self.seed, index])
        flat = np.zeros(tensor.size, dtype=bool)
        flat[rng.choice(tensor.size, keep_count(self.p, tensor.size), replace=False)] = True
        return flat.reshape(tensor.shape)

    def masks(
        self,
        proposed: Sequence[Array | None],
        topology: Topology,
        ops: ArrayOps = numpy_ops,
        step: int = 0,
    ) -> Masks:
        out: Masks = []
        for i, (t, dw) in enumerate(zip(topology.tensors, proposed, strict=True)):
            if dw is None:
                out.append(None)
                continue
            if i not in self._cache:
                self._cache[i] = ops.from_numpy(self.fixed_mask(i, t))
            out.append(self._cache[i])
        return out


def _top_k(dw: Array, t: TensorSpec, k: int, ops: ArrayOps, largest: bool) -> Array:
    if largest:
        return ops.reshape(ops.top_magnitude_mask(ops.reshape(dw, (t.size,)), k), t.shape)
    flat = ops.reshape(ops.magnitude(dw), (1, t.size))
    return ops.reshape(ops.top_k_mask(flat, k, largest), t.shape)


def _unit_rows(dw: Array, t: TensorSpec, ops: ArrayOps) -> Array:
    """``|dw|`` as a (units, incoming) matrix."""
    assert t.unit_axis is not None
    n = t.shape[t.unit_axis]
    return ops.reshape(ops.moveaxis(ops.abs(dw), t.unit_axis, 0), (n, t.size // n))


def _from_unit_rows(rows: Array, t: TensorSpec, ops: ArrayOps) -> Array:
    assert t.unit_axis is not None
    moved = (t.shape[t.unit_axis],) + tuple(s for a, s in enumerate(t.shape) if a != t.unit_axis)
    return ops.moveaxis(ops.reshape(rows, moved), 0, t.unit_axis)
