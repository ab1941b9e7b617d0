"""Synaptic caching (Li & van Rossum, eLife 2020): a transient store in front of the weights.

Each synapse is a consolidated part ``w_c`` plus a transient part ``w_e``; the
network uses ``w_c + w_e``, which is what the weights hold. Every step that
goes ahead, per tensor, in this order:

1. the step's applied update ``u`` (after the masking rules) enters the
   store: ``w_e += u``;
2. **consolidate** where the threshold is reached (``scope`` below):
   ``w_c += w_e``, ``w_e = 0``. It costs ``|w_e|`` (consolidation energy) and
   one write per synapse with ``w_e != 0`` (the updates, M0, with caching);
3. **maintenance** of what stays transient costs ``maintenance_cost * sum |w_e|``;
4. **decay**: ``w_e *= 1 - 1/tau``. The transient change that decays is lost,
   so the effective weight moves by ``-w_e / tau``: :meth:`Caching.step`
   returns that change and the adapters add it to the weights.

Scopes: ``"synapse"`` consolidates each synapse whose ``|w_e| >= theta``;
``"layer_max"`` a whole tensor when ``max |w_e| >= theta``; ``"layer_sum"`` a
whole tensor when ``sum |w_e| >= theta`` (so theta scales with the tensor).
``tau`` counts steps (``math.inf``: no decay). :meth:`Caching.consolidate`
empties the store at the end of fit (consolidation energy ``sum |w_e|``, no
maintenance).

Example::

    >>> import numpy as np
    >>> from energy_callbacks.core import Plasticity, TensorSpec
    >>> rule = Plasticity(caching=Caching(theta=1.0, tau=math.inf, maintenance_cost=0.1))
    >>> _ = rule.setup([TensorSpec("w", (2,))])
    >>> for u in ([0.6, 0.3], [0.6, -0.3]):
    ...     _ = rule.step([np.array(u)])
    >>> r = rule.report()
    >>> r.consolidation, r.maintenance, r.consolidations  # 1.2 written once, 0.9*0.1 upkeep
    (1.2, 0.09, 1)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from . import checks
from .energy import EnergyReport, Shares, _ratio
from .ops import Array, ArrayOps, numpy_ops
from .topology import TensorSpec, Topology

SCOPES = ("synapse", "layer_max", "layer_sum")
BLOCK = 1 << 20
"""Entries per block of the host store's step (the synapse scope's temporaries)."""


@dataclass(frozen=True)
class Transient:
    """One tensor's caching step: the store after it and what the step cost.

    ``decay`` is the change to add to the weights (None when ``tau`` is inf).
    The figures are floats on NumPy/torch and scalar tensors in a Keras graph.
    """

    store: Array
    decay: Array | None
    consolidated: Any
    consolidations: Any
    maintenance: Any


class Caching:
    """Synaptic caching: updates wait in a decaying transient store until consolidated.

    - ``theta`` (> 0): the consolidation threshold on ``|w_e|`` (see ``scope``);
    - ``tau`` (>= 1, in steps; ``math.inf`` for none): the store's decay time;
    - ``maintenance_cost`` (>= 0): energy per step per unit of ``sum |w_e|`` held;
    - ``scope``: ``"synapse"``, ``"layer_max"`` or ``"layer_sum"`` (module docstring).

    With caching, ``plasticity/energy`` is consolidation + maintenance and
    ``plasticity/updates`` counts consolidation writes. The store is part of
    ``Plasticity.state_dict()``.

    Under sharded training (``shares`` set) each process keeps the store of its
    own share of every tensor (the synapse scope only: the layer scopes need a
    whole tensor) and its figures, which are summed over the processes when they
    are read, as the meter's are.
    """

    shares: Shares | None = None

    def __init__(
        self, theta: float, tau: float, maintenance_cost: float, scope: str = "synapse"
    ) -> None:
        checks.real("Caching.theta", theta, low=0.0, low_open=True, what="a finite number > 0")
        if not checks.is_real(tau) or math.isnan(tau) or tau < 1:
            raise ValueError(
                f"Caching.tau must be a number of steps >= 1 (math.inf: no decay), got {tau!r}"
            )
        checks.real(
            "Caching.maintenance_cost",
            maintenance_cost,
            low=0.0,
            low_open=False,
            what="a finite number >= 0",
        )
        checks.choice("Caching.scope", scope, SCOPES)
        self.theta = float(theta)
        self.tau = float(tau)
        self.maintenance_cost = float(maintenance_cost)
        self.scope = scope
        self.ops: ArrayOps = numpy_ops
        self._tensors: tuple[TensorSpec, ...] = ()
        self._store: list[Array | None] = []
        self._consolidation = np.zeros(0, dtype=np.float64)
        self._maintenance = np.zeros(0, dtype=np.float64)
        self._consolidations = np.zeros(0, dtype=np.int64)
        self._held: list[float] | None = None  # held figures of a store kept elsewhere

    def __repr__(self) -> str:
        return (
            f"Caching(theta={self.theta!r}, tau={self.tau!r}, "
            f"maintenance_cost={self.maintenance_cost!r}, scope={self.scope!r})"
        )

    # -- the rule, as pure functions of one tensor's store (NumPy or in-graph) ------
    def consolidation_mask(self, store: Array, ops: ArrayOps = numpy_ops) -> Array:
        """Where the store is consolidated this step (a mask of ``store``'s shape)."""
        if self.scope == "synapse":
            return ops.greater_equal(ops.abs(store), self.theta)
        shape = tuple(int(d) for d in store.shape)
        n = math.prod(shape)
        flat = ops.reshape(store, (1, n))
        score = ops.row_max(flat, 0) if self.scope == "layer_max" else ops.row_l1(flat, 0)
        whole = ops.expand_units(ops.greater_equal(score, self.theta), (1, n), 0)
        return ops.reshape(whole, shape)

    def transient(self, store: Array, ops: ArrayOps = numpy_ops) -> Transient:
        """Steps 2-4 of the module docstring on a store that holds this step's update."""
        mask = self.consolidation_mask(store, ops)
        kept = ops.keep(store, mask)
        rest = ops.keep(store, ops.logical_not(mask))
        maintenance = ops.total(rest) * self.maintenance_cost
        decay = None
        if math.isfinite(self.tau):
            decay = ops.scale(rest, -1.0 / self.tau)
            rest = ops.add(rest, decay)
        return Transient(rest, decay, ops.total(kept), ops.count_nonzero(kept), maintenance)

    # -- state on the host (NumPy, torch) ---------------------------------------
    def setup(self, topology: Topology | Sequence[TensorSpec], ops: ArrayOps = numpy_ops) -> None:
        """Bind to the network's tensors, with the store in ``ops``'s arrays; empties
        the store and the totals."""
        tensors = topology.tensors if isinstance(topology, Topology) else tuple(topology)
        self.ops = ops
        n = len(tensors)
        self._tensors = tuple(tensors)
        self._store = [None] * n
        self._consolidation = np.zeros(n, dtype=np.float64)
        self._maintenance = np.zeros(n, dtype=np.float64)
        self._consolidations = np.zeros(n, dtype=np.int64)
        self._held = None

    def step(self, applied: Sequence[Array | None]) -> list[Array | None]:
        """One step's applied updates (None: tensor not stepped) into the store.

        Returns per tensor the change the decay makes to the weights (None: none),
        which the caller must add to them.
        """
        if len(applied) != len(self._tensors):
            raise ValueError(
                f"Caching.step: got {len(applied)} arrays for {len(self._tensors)} tensors; "
                "call Plasticity.setup first"
            )
        ops = self.ops
        self._held = None
        decays: list[Array | None] = [None] * len(applied)
        for i, u in enumerate(applied):
            if u is None:
                continue
            held = self._store[i]
            if self.scope == "synapse":  # element by element: in place, a block at a time
                if held is None:
                    held = self._store[i] = ops.zeros_like(u)
                elif held.dtype != u.dtype:  # a resumed float32 store of wider updates
                    held = self._store[i] = ops.add(held, ops.zeros_like(u))
                decays[i] = self._step_blocks(i, held, u)
                continue
            base = ops.zeros_like(u) if held is None else held
            out = self.transient(ops.add(base, u), ops)
            self._store[i] = out.store
            self._add_figures(i, out)
            decays[i] = out.decay
        return decays

    def _step_blocks(self, i: int, held: Array, u: Array) -> Array | None:
        """The synapse scope's step on the store ``held`` (written in place) and the
        update ``u``, :data:`BLOCK` entries at a time, so that its temporaries stay
        the size of a block; the decay (None when ``tau`` is inf) in ``held``'s shape."""
        ops = self.ops
        decay = []
        for h, v in zip(ops.blocks(held, BLOCK), ops.blocks(u, BLOCK), strict=True):
            out = self.transient(ops.add(h, v), ops)
            ops.assign(h, out.store)
            self._add_figures(i, out)
            decay.append(out.decay)
        if not decay or decay[0] is None:
            return None
        return ops.reshape(ops.concat(decay, 0), tuple(int(d) for d in held.shape))

    def _add_figures(self, i: int, out: Transient) -> None:
        self._consolidation[i] += float(out.consolidated)
        self._consolidations[i] += int(out.consolidations)
        self._maintenance[i] += float(out.maintenance)

    def consolidate(self) -> None:
        """Consolidate the whole store (end of fit): costs ``sum |w_e|``; weights unchanged."""
        ops = self.ops
        self._held = None
        for i, held in enumerate(self._store):
            if held is None:
                continue
            self._consolidation[i] += ops.total(held)
            self._consolidations[i] += ops.count_nonzero(held)
            self._store[i] = ops.zeros_like(held)

    def held(self) -> list[float]:
        """``sum |w_e|`` per tensor: what the store holds, not yet paid for."""
        if self._held is not None:
            return list(self._held)
        return [0.0 if s is None else self.ops.total(s) for s in self._store]

    def load_figures(self, state: Mapping[str, Any], held: Sequence[float]) -> None:
        """The totals of a :meth:`state_dict` (its ``"store"`` is not read), and
        ``held``, :meth:`held` of a store an adapter keeps itself (Keras: optimizer
        variables), so that a report copies no store. Stepping or loading a store
        here again goes back to this one's."""
        names = [t.name for t in self._tensors]
        if [str(n) for n in state["names"]] != names or len(held) != len(names):
            raise ValueError(
                f"Caching.load_figures: figures of {list(state['names'])} for this "
                f"network's {names}"
            )
        self._consolidation = np.asarray(state["consolidation"], np.float64).copy()
        self._maintenance = np.asarray(state["maintenance"], np.float64).copy()
        self._consolidations = np.asarray(state["consolidations"], np.int64).copy()
        self._held = [float(h) for h in held]

    def _figures(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per tensor: consolidation, maintenance, consolidation writes (summed over
        the shares)."""
        floats = np.stack([self._consolidation, self._maintenance]).reshape(2, -1)
        counts = self._consolidations
        if self.shares is not None:
            floats, counts = self.shares.sum(floats), self.shares.sum(counts)
        return floats[0], floats[1], counts

    def totals(self) -> tuple[float, int]:
        """``(consolidation + maintenance, consolidation writes)`` so far."""
        consolidation, maintenance, consolidations = self._figures()
        energy = float(consolidation.sum()) + float(maintenance.sum())
        return energy, int(consolidations.sum())

    def annotate(self, report: EnergyReport) -> EnergyReport:
        """``report`` with the caching figures, per tensor and in total."""
        held = np.asarray(self.held(), dtype=np.float64)
        if self.shares is not None:
            held = self.shares.sum(held)
        consolidation, maintenance, consolidations = self._figures()
        layers = {}
        for i, (name, layer) in enumerate(report.per_layer.items()):
            layers[name] = dataclasses.replace(
                layer,
                consolidation=float(consolidation[i]),
                maintenance=float(maintenance[i]),
                consolidations=int(consolidations[i]),
                transient=float(held[i]),
            )
        annotated = dataclasses.replace(
            report,
            per_layer=MappingProxyType(layers),
            consolidation=math.fsum(consolidation),
            maintenance=math.fsum(maintenance),
            consolidations=int(consolidations.sum()),
            transient=math.fsum(held),
        )
        return dataclasses.replace(annotated, inefficiency=_ratio(annotated.energy, report.m1_min))

    def state_dict(self) -> dict[str, Any]:
        """The store and the totals: plain NumPy arrays (an unwritten store is zeros).
        Under sharded training the store is this process's share and the totals are
        summed over the shares."""
        consolidation, maintenance, consolidations = self._figures()
        return {
            "names": [t.name for t in self._tensors],
            "store": [
                np.zeros(t.shape, np.float32) if s is None else self.ops.to_numpy(s).copy()
                for t, s in zip(self._tensors, self._store, strict=True)
            ],
            "consolidation": consolidation.copy(),
            "maintenance": maintenance.copy(),
            "consolidations": consolidations.copy(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`, matching tensors by name: every saved one must be
        here (same shape); tensors here but not saved start with an empty store. Under
        sharded training each store is this process's share (the adapter hands it
        over), and the first share carries the saved totals."""
        saved = [str(n) for n in state["names"]]
        index = {t.name: i for i, t in enumerate(self._tensors)}
        unknown = [n for n in saved if n not in index]
        if unknown:
            raise ValueError(
                f"Caching.load_state_dict: saved tensors {saved} do not match this network's "
                f"{list(index)} (not here: {unknown})"
            )
        n = len(self._tensors)
        store: list[Array | None] = [None] * n
        consolidation = np.zeros(n, dtype=np.float64)
        maintenance = np.zeros(n, dtype=np.float64)
        consolidations = np.zeros(n, dtype=np.int64)
        for j, name in enumerate(saved):
            i = index[name]
            t = self._tensors[i]
            s = np.asarray(state["store"][j])
            if s.shape != t.shape and self.shares is None:
                raise ValueError(
                    f"Caching.load_state_dict: {t.name!r} was saved with shape {s.shape}, "
                    f"the network has {t.shape}"
                )
            store[i] = self.ops.from_numpy(s.copy())
            consolidation[i] = state["consolidation"][j]
            maintenance[i] = state["maintenance"][j]
            consolidations[i] = state["consolidations"][j]
        if self.shares is not None and not self.shares.first:
            consolidation[:], maintenance[:], consolidations[:] = 0.0, 0.0, 0
        self._store = store
        self._consolidation, self._maintenance = consolidation, maintenance
        self._consolidations = consolidations
        self._held = None

    def rebind(self, topology: Topology | Sequence[TensorSpec], ops: ArrayOps) -> None:
        """Bind to a new description of the same run (tensors joined): the store and the
        totals of the tensors bound now carry over."""
        state = self.state_dict()
        self.setup(topology, ops)
        self.load_state_dict(state)
