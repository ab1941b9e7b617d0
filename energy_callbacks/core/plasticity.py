"""Plasticity: one step = proposed updates -> masks -> applied updates + energy.

Example (NumPy, a 3-2 layer)::

    >>> import numpy as np
    >>> from energy_callbacks import Plasticity
    >>> from energy_callbacks.core import Topology
    >>> rule = Plasticity(synapses=0.5).setup(Topology.mlp([3, 2]))
    >>> dw = [np.array([[0.1, -0.5, 0.2], [0.3, 0.0, -0.1]]), np.array([0.2, 0.1])]
    >>> step = rule.step(dw)
    >>> float(step.applied[0].sum()), rule.report().m1
    (0.0, 1.2)

Order of the rules: the unit rule first, then each synapse rule in turn. Each
rule ranks the proposals left by the ones before it (dropped entries count as
zero), and the final mask is the AND of all masks. So ``units=0.5,
synapses=0.1`` keeps the largest updates *within* the selected units. Synaptic
caching (``caching=``) comes last: the masked, applied update enters its
transient store (:mod:`energy_callbacks.core.caching`).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .caching import Caching
from .costs import Cost, legacy_cost
from .energy import EnergyMeter, EnergyReport, check_alpha
from .ops import Array, ArrayOps, numpy_ops
from .samples import SampleGate
from .shorthands import sample_gate, synapse_rules, unit_rule
from .synapses import Masks, SynapseRule
from .targets import IGNORE_INDEX, class_targets, owners
from .topology import TensorSpec, Topology
from .units import UnitRule

STATE_VERSION = 1


@dataclass(frozen=True)
class Step:
    """What :meth:`Plasticity.step` did: the masks (None = kept all), the applied
    updates (None where nothing was proposed), whether the step was skipped, and
    with caching the decay of the transient store (None where there was none)."""

    masks: Masks
    applied: list[Array | None]
    skipped: bool = False
    decay: list[Array | None] | None = None


@dataclass(frozen=True)
class GateResult:
    """A sample gate's decision for one batch."""

    mask: Array
    seen: int
    learned: int

    @property
    def any(self) -> bool:
        """False when no sample passed: the caller must skip the whole step."""
        return self.learned > 0


class Plasticity:
    """Energy-saving plasticity rules plus the energy meter, framework-free.

    Arguments (all optional; none of them means "measure only"):

    - ``synapses``: a :class:`SynapseRule`, a list of them (applied in order),
      or a float ``p`` meaning ``TopFraction(p)``.
    - ``units``: a :class:`UnitRule`, or a float ``q`` meaning ``TopUnits(q)``.
    - ``samples``: a :class:`SampleGate`, or ``"lazy"`` / ``"mistakes"``.
    - ``caching``: a :class:`~energy_callbacks.core.caching.Caching` store in
      front of the weights (then ``energy`` = consolidation + maintenance).
    - ``cost``: joules per unit of ``|dw|`` or per update, reported as
      ``plasticity/joules``: a :class:`~energy_callbacks.core.costs.Cost`, a
      preset (``"biology"``, ``"sram"``, ``"dram"``) or ``{"joules": J, "per": ...}``.
    - ``alpha``: exponent of ``M_alpha`` (> 0; M1 is always reported too).
    - ``joules_per_unit`` / ``cost_basis``: deprecated, ``cost=Cost(J, per="unit"
      | "update")`` replaces them (``"m1"`` is per unit, ``"m0"`` per update).

    Call :meth:`setup` with the network's tensors before the first step.
    """

    def __init__(
        self,
        synapses: SynapseRule | Sequence[SynapseRule] | float | None = None,
        units: UnitRule | float | None = None,
        samples: SampleGate | str | None = None,
        *,
        caching: Caching | None = None,
        cost: Cost | str | Mapping[str, Any] | None = None,
        alpha: float = 1.0,
        joules_per_unit: float | None = None,
        cost_basis: str = "m1",
        ops: ArrayOps = numpy_ops,
    ) -> None:
        check_alpha(alpha)
        if joules_per_unit is not None or not (isinstance(cost_basis, str) and cost_basis == "m1"):
            if cost is not None:
                raise ValueError(
                    "Plasticity: give cost=Cost(...) or the deprecated joules_per_unit=/"
                    "cost_basis=, not both"
                )
            warnings.warn(
                "Plasticity(joules_per_unit=, cost_basis=) is deprecated: use "
                "cost=Cost(joules, per='unit') (for 'm1') or per='update' (for 'm0')",
                DeprecationWarning,
                stacklevel=2,
            )
            cost = legacy_cost(joules_per_unit, cost_basis)
        if caching is not None and not isinstance(caching, Caching):
            raise TypeError(
                f"caching must be a Caching(theta, tau, maintenance_cost, scope=...) or None, "
                f"got {caching!r}"
            )
        self.synapses = synapse_rules(synapses)
        self.units = unit_rule(units)
        self.samples = sample_gate(samples)
        self.caching = caching
        self.cost = Cost.from_value(cost)
        self.alpha = float(alpha)
        self.ops = ops
        self._topology: Topology | None = None
        self._meter: EnergyMeter | None = None
        self._ranked_buffers: dict[int, Array] = {}
        self.step_count = 0
        self.samples_seen = 0
        self.samples_learned = 0

    def __repr__(self) -> str:
        extra = "".join(
            f", {name}={value!r}"
            for name, value in (("caching", self.caching), ("cost", self.cost))
            if value is not None
        )
        return (
            f"Plasticity(synapses={self.synapses!r}, units={self.units!r}, "
            f"samples={self.samples!r}{extra}, alpha={self.alpha})"
        )

    @property
    def restricts(self) -> bool:
        """True when a unit or synapse rule masks updates (False: measure only)."""
        return self.units is not None or bool(self.synapses)

    @property
    def is_setup(self) -> bool:
        """True once :meth:`setup` has bound the rules to a network."""
        return self._topology is not None

    @property
    def topology(self) -> Topology:
        if self._topology is None:
            raise RuntimeError("Plasticity.setup(tensors) must be called before use")
        return self._topology

    @property
    def meter(self) -> EnergyMeter:
        if self._meter is None:
            raise RuntimeError("Plasticity.setup(tensors) must be called before use")
        return self._meter

    def setup(
        self,
        tensors: Topology | Sequence[TensorSpec],
        adjacency: Sequence[tuple[str, str]] | None = None,
        *,
        ops: ArrayOps | None = None,
    ) -> Plasticity:
        """Bind to a network; check every rule against it. Resets the energy totals.

        ``ops`` switches the array backend (an adapter passes its own).
        """
        if ops is not None:
            self.ops = ops
        topology = tensors if isinstance(tensors, Topology) else Topology(tensors, adjacency)
        for rule in self._rules():
            rule.setup(topology)
        self._topology = topology
        self._ranked_buffers = {}
        self._meter = EnergyMeter(topology.tensors, self.alpha, ops=self.ops)
        if self.caching is not None:
            self.caching.setup(topology, self.ops)
        return self

    def rebind(
        self,
        tensors: Topology | Sequence[TensorSpec],
        adjacency: Sequence[tuple[str, str]] | None = None,
        *,
        ops: ArrayOps | None = None,
    ) -> Plasticity:
        """Bind to a new description of the network mid-run: its observed wiring, or
        tensors that joined training. Every tensor bound now must still be there, with
        its shape; the energy totals, the counters and the sample memory carry over
        (new tensors start at zero). Before :meth:`setup`, this is :meth:`setup`.
        """
        if self._meter is None:
            return self.setup(tensors, adjacency, ops=ops)
        topology = tensors if isinstance(tensors, Topology) else Topology(tensors, adjacency)
        for rule in self._rules():
            rule.setup(topology)
        self.meter.rebind(topology.tensors, ops)
        if ops is not None:
            self.ops = ops
        if self.caching is not None:
            self.caching.rebind(topology, self.ops)
        self._topology = topology
        self._ranked_buffers = {}
        return self

    def _rules(self) -> list[UnitRule | SynapseRule]:
        return ([self.units] if self.units is not None else []) + list(self.synapses)

    # -- samples -----------------------------------------------------------
    def gate(
        self,
        outputs: Array,
        targets: Array,
        sample_ids: Array | None = None,
        *,
        ignore_index: int | None = IGNORE_INDEX,
    ) -> GateResult:
        """Decide which samples of a batch learn, and count them.

        ``outputs`` are class scores ``(batch, classes)``, or ``(batch, tokens,
        classes)`` where every token is a sample; ``targets`` class ids or
        probability rows, checked by :func:`~energy_callbacks.core.targets.class_targets`
        (a ValueError says what to pass instead). Entries whose target is
        ``ignore_index`` neither learn nor count. The mask has the outputs' shape
        without the class axis. Without a sample gate every sample learns.
        """
        ops = self.ops
        if self.samples is None:
            n = int(outputs.shape[0])
            self.count_samples(n)
            return GateResult(ops.ones_mask((n,)), n, n)
        host = targets if isinstance(targets, np.ndarray) else ops.to_numpy(targets)
        checked = class_targets(tuple(outputs.shape), host, ignore_index=ignore_index)
        shape = checked.batch_shape
        flat = ops.reshape(outputs, (checked.labels.size, int(outputs.shape[-1])))
        counted = None if checked.counted is None else ops.from_numpy(checked.counted)
        owner = None
        if sample_ids is not None:
            ids_shape = tuple(int(s) for s in sample_ids.shape)
            owner = owners(shape, ids_shape)
            if owner is None:
                sample_ids = ops.reshape(sample_ids, (checked.labels.size,))
        mask = self.samples.gate(
            flat, ops.from_numpy(checked.labels), sample_ids, ops, counted=counted, owner=owner
        )
        learned = ops.count_nonzero(mask)
        seen = checked.size
        self.samples_seen += seen
        self.samples_learned += learned
        return GateResult(ops.reshape(mask, shape), seen, learned)

    def count_samples(self, n: int) -> None:
        """Count ``n`` samples that all learn (no sample gate, no outputs needed)."""
        self.samples_seen += n
        self.samples_learned += n

    # -- updates -----------------------------------------------------------
    def masks(self, proposed: Sequence[Array | None]) -> Masks:
        """The combined mask per tensor for this step's proposals (None = keep all)."""
        ops, topology = self.ops, self.topology
        if len(proposed) != len(topology.tensors):
            raise ValueError(
                f"Plasticity: got {len(proposed)} proposed arrays for "
                f"{len(topology.tensors)} tensors"
            )
        combined: Masks = [None] * len(proposed)
        current = list(proposed)
        rules = self._rules()
        for r, rule in enumerate(rules):
            for i, m in enumerate(rule.masks(current, topology, ops, self.step_count)):
                dw = proposed[i]
                if m is None or dw is None:
                    continue
                prev = combined[i]
                combined[i] = m if prev is None else ops.logical_and(prev, m)
                if r + 1 < len(rules):  # the next rule ranks what this one left
                    out = None if ops.deferred(dw) else self._ranked(i, dw)
                    current[i] = ops.keep(dw, combined[i], out=out)
        return combined

    def _ranked(self, i: int, like: Array) -> Array:
        """A reusable buffer for tensor ``i``'s proposals as the next rule ranks them."""
        buf = self._ranked_buffers.get(i)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
            buf = self._ranked_buffers[i] = self.ops.zeros_like(like)
        return buf

    def step(
        self, proposed: Sequence[Array | None], weights: Sequence[Array] | None = None
    ) -> Step:
        """Mask one step's proposed updates, record the applied ones, return both.

        With ``weights`` (one array per tensor) the masked updates are added to
        them in place and the energy is the real change ``w_after - w_before``,
        as SCIENCE.md defines it: an update below the weight's precision costs
        nothing. Without, the masked proposals themselves are recorded.

        A step whose proposals hold NaN/Inf is skipped: nothing is applied or
        counted and ``report().skipped_steps`` grows (the first one warns).

        With caching, the applied updates then enter the transient store; its decay
        is added to ``weights`` (and returned in ``Step.decay`` for callers
        without weights, who must add it themselves).
        """
        ops = self.ops
        if not all(dw is None or ops.isfinite_all(dw) for dw in proposed):
            self.meter.skip_nonfinite()
            zeros = [None if dw is None else ops.zeros_like(dw) for dw in proposed]
            return Step([None] * len(proposed), zeros, skipped=True)
        masks = self.masks(proposed)
        applied = [
            dw if m is None or dw is None else ops.keep(dw, m)
            for dw, m in zip(proposed, masks, strict=True)
        ]
        if weights is not None:
            applied = [
                None if a is None else ops.apply_update(w, a)
                for w, a in zip(weights, applied, strict=True)
            ]
        self.step_count += 1
        self.meter.record(applied, check_finite=False)
        if self.caching is None:
            return Step(masks, applied)
        decay = self.cache(applied)
        for i, d in enumerate(decay):
            if d is not None:
                real = d if weights is None else ops.apply_update(weights[i], d)
                self.meter.add_displacement(i, real)
        return Step(masks, applied, decay=decay)

    def record(
        self,
        applied: Sequence[Array | None],
        *,
        check_finite: bool = True,
        displacement: bool = True,
        totals: Sequence[tuple[float, int] | None] | None = None,
    ) -> bool:
        """Record changes measured elsewhere (``w_after - w_before``) after :meth:`masks`.

        Adapters that apply the masks themselves call this so that the energy is
        the real weight change. Returns False if the step held NaN/Inf. See
        :meth:`EnergyMeter.record` for ``check_finite``, ``displacement`` and ``totals``.
        """
        self.step_count += 1
        return self.meter.record(
            applied, check_finite=check_finite, displacement=displacement, totals=totals
        )

    def cache(self, applied: Sequence[Array | None]) -> list[Array | None]:
        """Synaptic caching after :meth:`record`: the step's applied changes (None for
        tensors not stepped) enter the transient store.

        Returns per tensor the decay's change to the weights (None: none), which the
        caller adds to them (the network uses ``w_c + w_e``). Needs ``caching=``.
        """
        return self._caching("cache").step(applied)

    def consolidate(self) -> None:
        """Consolidate the whole transient store, as at the end of fit. Needs ``caching=``."""
        self._caching("consolidate").consolidate()

    def _caching(self, what: str) -> Caching:
        if self.caching is None:
            raise RuntimeError(
                f"Plasticity.{what}(): this Plasticity has no synaptic caching; pass "
                "caching=Caching(theta, tau, maintenance_cost) to use it"
            )
        return self.caching

    def totals(self) -> tuple[float, int]:
        """``(plasticity/energy, plasticity/updates)`` so far, cheap enough for every step:
        ``(M1, M0)``, or with caching ``(consolidation + maintenance, writes)``."""
        if self.caching is not None:
            return self.caching.totals()
        return self.meter.totals()

    def report(self) -> EnergyReport:
        """The energy so far: the meter's figures, the caching figures and the joules."""
        report = self.meter.report(self.samples_seen, self.samples_learned)
        if self.caching is not None:
            report = self.caching.annotate(report)
        if self.cost is not None:
            report = dataclasses.replace(
                report, joules=self.cost.joules_for(report.energy, report.updates)
            )
        return report

    # -- checkpointing -----------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain numbers and NumPy arrays only: safe for ``torch.save(weights_only)``."""
        return {
            "version": STATE_VERSION,
            "step_count": self.step_count,
            "samples_seen": self.samples_seen,
            "samples_learned": self.samples_learned,
            "energy": self.meter.state_dict(),
            "samples": self.samples.state_dict() if self.samples is not None else {},
            "caching": self.caching.state_dict() if self.caching is not None else {},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state.get("version", -1)) != STATE_VERSION:
            raise ValueError(
                f"Plasticity.load_state_dict: state version {state.get('version')!r} is not "
                f"{STATE_VERSION}; it was written by another energy_callbacks release"
            )
        saved_caching = state.get("caching") or {}
        if (self.caching is not None) != bool(saved_caching):
            raise ValueError(
                "Plasticity.load_state_dict: the state was saved "
                f"{'with' if saved_caching else 'without'} synaptic caching and this "
                f"Plasticity has caching={self.caching!r}; resume with the same rules"
            )
        self.meter.load_state_dict(state["energy"])
        if self.caching is not None:
            self.caching.load_state_dict(saved_caching)
        if self.samples is not None:
            self.samples.load_state_dict(state["samples"])
        self.step_count = int(state["step_count"])
        self.samples_seen = int(state["samples_seen"])
        self.samples_learned = int(state["samples_learned"])


def from_shorthands(
    plasticity: Plasticity | None,
    *,
    synapses: Any = None,
    units: Any = None,
    samples: Any = None,
    alpha: float = 1.0,
    owner: str = "PlasticityCallback",
    caching: Caching | None = None,
    cost: Any = None,
) -> Plasticity:
    """``plasticity``, or a new one from the shorthands; refuses both at once.

    The framework callbacks take either a ready :class:`Plasticity` or the shorthand
    arguments; this is their shared check.
    """
    check_alpha(alpha)
    if plasticity is not None and not isinstance(plasticity, Plasticity):
        raise ValueError(
            f"{owner}.plasticity must be a Plasticity(...) (or None, with the shorthands "
            f"synapses=/units=/samples=), got {plasticity!r}"
        )
    shorthand = any(v is not None for v in (synapses, units, samples, caching, cost))
    if plasticity is not None and (shorthand or alpha != 1.0):
        raise ValueError(
            f"{owner}: give plasticity=Plasticity(...) or the shorthands "
            "synapses=/units=/samples=/caching=/cost=/alpha=, not both"
        )
    if plasticity is None:
        return Plasticity(
            synapses=synapses, units=units, samples=samples, caching=caching, cost=cost, alpha=alpha
        )
    return plasticity
