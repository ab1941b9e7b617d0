"""Unit competition: plasticity restricted to selected units, or to a path.

On each step every hidden layer (a layer that feeds another) selects some of
its postsynaptic units; only the incoming synapses of selected units (kernel
slice and bias entry) keep their updates. Output layers keep all their units.

With ``path=True`` a synapse from unit ``j`` to unit ``i`` is plastic only if
both are selected, so the plastic synapses form a path through the network.
Inputs and outputs count as always selected.

Scores: a unit's score is the L1 norm of its row of proposed updates (kernel
slice plus bias). For a dense layer and one sample this ranks units exactly as
``|backpropagated error|`` does. Ties go to the lower unit index.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from . import checks
from .ops import Array, ArrayOps, numpy_ops
from .synapses import Masks, check_fraction, keep_count
from .topology import Layer, Topology


class UnitRule(ABC):
    """Base class: pick units per hidden layer, then mask the tensors.

    A count ``k`` must be below every hidden layer's number of units: a ``k`` that
    keeps a whole layer would change nothing there, and ``setup`` refuses it.
    """

    path: bool = False

    def __init__(self, q: float | None, k: int | None, *, path: bool) -> None:
        name = type(self).__name__
        if (q is None) == (k is None):
            raise ValueError(f"{name}: give exactly one of q (a fraction) or k (a unit count)")
        if q is not None:
            q = check_fraction(name, "q", q)
        if k is not None:
            k = checks.count(f"{name}.k", k)
        self.q, self.k, self.path = q, k, checks.flag(f"{name}.path", path)

    def __repr__(self) -> str:
        size = f"q={self.q}" if self.q is not None else f"k={self.k}"
        return f"{type(self).__name__}({size}, path={self.path})"

    def count(self, layer: Layer) -> int:
        """How many units ``layer`` selects."""
        if self.q is not None:
            return keep_count(self.q, layer.n_units)
        assert self.k is not None
        return min(self.k, layer.n_units)

    def setup(self, topology: Topology) -> None:
        """Check the wiring the path rule needs, and that ``k`` leaves every hidden layer
        something to select from (raises ValueError)."""
        if self.path:
            for layer in topology.layers:
                topology.presynaptic(layer)
        if self.k is not None:
            full = [(lyr.name, lyr.n_units) for lyr in topology.hidden if self.k >= lyr.n_units]
            if full:
                names = ", ".join(f"{name!r} ({n} units)" for name, n in full)
                raise ValueError(
                    f"{self!r}: k={self.k} keeps every unit of the hidden layer(s) {names}, so "
                    f"the rule would change nothing there. Give k below "
                    f"{min(n for _, n in full)}, a fraction q=, or leave those layers out "
                    "(layers=)."
                )

    @abstractmethod
    def select(
        self, proposed: Sequence[Array | None], topology: Topology, ops: ArrayOps, step: int
    ) -> dict[str, Array]:
        """A boolean unit mask per hidden layer name."""

    def masks(
        self,
        proposed: Sequence[Array | None],
        topology: Topology,
        ops: ArrayOps = numpy_ops,
        step: int = 0,
    ) -> Masks:
        """Per-tensor masks implied by the selection (None for tensors outside layers)."""
        return unit_masks(self.select(proposed, topology, ops, step), topology, ops, self.path)


def unit_masks(selected: dict[str, Array], topology: Topology, ops: ArrayOps, path: bool) -> Masks:
    """Expand unit selections to tensor masks; ``path`` also gates presynaptic units."""
    out: Masks = [None] * len(topology.tensors)
    for layer in topology.layers:
        post = selected.get(layer.name)
        pre_layer = topology.presynaptic(layer) if path else None
        pre = None if pre_layer is None else selected.get(pre_layer.name)
        for i in (layer.kernel, *layer.followers):
            t = topology.tensors[i]
            mask = None
            if post is not None:
                assert t.unit_axis is not None
                mask = ops.expand_units(post, t.shape, t.unit_axis)
            if pre is not None and t.input_axis is not None:
                assert pre_layer is not None
                fed = pre
                spread = topology.spread(pre_layer.name, layer.name)
                if spread > 1:  # unit c feeds inputs c * spread ... (c + 1) * spread - 1
                    n = pre_layer.n_units
                    fed = ops.reshape(ops.expand_units(pre, (n, spread), 0), (n * spread,))
                pre_mask = ops.expand_units(fed, t.shape, t.input_axis)
                mask = pre_mask if mask is None else ops.logical_and(mask, pre_mask)
            out[i] = mask
    return out


def unit_scores(
    proposed: Sequence[Array | None], layer: Layer, topology: Topology, ops: ArrayOps
) -> Array | None:
    """Row L1 norm of each unit's proposed updates (kernel + bias); None if no updates."""
    score = None
    for i in (layer.kernel, *layer.followers):
        dw = proposed[i]
        if dw is None:
            continue
        axis = topology.tensors[i].unit_axis
        assert axis is not None
        s = ops.row_l1(dw, axis)
        score = s if score is None else score + s
    return score


class TopUnits(UnitRule):
    """Keep the units with the largest proposed-update row norm (top ``q`` or ``k``).

    ``largest=False`` is the control that keeps the units with the smallest norms.
    """

    def __init__(
        self,
        q: float | None = None,
        *,
        k: int | None = None,
        path: bool = False,
        largest: bool = True,
    ) -> None:
        super().__init__(q, k, path=path)
        self.largest = checks.flag("TopUnits.largest", largest)

    def select(
        self, proposed: Sequence[Array | None], topology: Topology, ops: ArrayOps, step: int
    ) -> dict[str, Array]:
        selected = {}
        for layer in topology.hidden:
            score = unit_scores(proposed, layer, topology, ops)
            if score is None:
                continue
            row = ops.reshape(score, (1, layer.n_units))
            selected[layer.name] = ops.reshape(
                ops.top_k_mask(row, self.count(layer), self.largest), (layer.n_units,)
            )
        return selected


class RandomUnits(UnitRule):
    """Control: a random set of units per hidden layer, redrawn every step.

    Draws come from ``numpy.random.default_rng([seed, step, layer])``, so a run
    is reproducible and resumes exactly from a checkpoint.
    """

    def __init__(
        self, q: float | None = None, *, k: int | None = None, seed: int = 0, path: bool = False
    ) -> None:
        super().__init__(q, k, path=path)
        self.seed = checks.seed("RandomUnits.seed", seed)

    def select(
        self, proposed: Sequence[Array | None], topology: Topology, ops: ArrayOps, step: int
    ) -> dict[str, Array]:
        return {
            layer.name: ops.from_numpy(
                _random_units(layer, self.count(layer), [self.seed, step, li])
            )
            for li, layer in enumerate(topology.layers)
            if layer in topology.hidden
        }


class FixedSubnetwork(UnitRule):
    """A fixed random set of ``k`` units per hidden layer, chosen once from ``seed``.

    Only synapses between selected units (inputs and outputs count as selected)
    are plastic: the incoming and outgoing synapses of the subnetwork.
    """

    def __init__(self, k: int, *, seed: int = 0) -> None:
        super().__init__(None, checks.count("FixedSubnetwork.k", k), path=True)
        self.seed = checks.seed("FixedSubnetwork.seed", seed)
        self._cache: dict[str, Array] = {}

    def __repr__(self) -> str:
        return f"FixedSubnetwork(k={self.k}, seed={self.seed})"

    def setup(self, topology: Topology) -> None:
        """Bind to a network; a layer that was bound before keeps its units (a network
        that grows mid-run keeps its subnetwork)."""
        super().setup(topology)
        sizes = {layer.name: layer.n_units for layer in topology.hidden}
        self._cache = {
            name: units for name, units in self._cache.items() if sizes.get(name) == units.shape[0]
        }

    def select(
        self, proposed: Sequence[Array | None], topology: Topology, ops: ArrayOps, step: int
    ) -> dict[str, Array]:
        for li, layer in enumerate(topology.layers):
            if layer in topology.hidden and layer.name not in self._cache:
                units = _random_units(layer, self.count(layer), [self.seed, li])
                self._cache[layer.name] = ops.from_numpy(units)
        return self._cache


def _random_units(layer: Layer, k: int, key: list[int]) -> np.ndarray:
    mask = np.zeros(layer.n_units, dtype=bool)
    mask[np.random.default_rng(key).choice(layer.n_units, k, replace=False)] = True
    return mask
