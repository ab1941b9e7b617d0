"""Energy accounting: M_alpha, M1, M0, the physical limit and the inefficiency.

For every recorded step ``t`` and synapse ``i`` with applied change ``dw``:

- ``M1 = sum |dw|`` (the plasticity energy), ``M_alpha = sum |dw| ** alpha``;
- ``M0`` = number of (synapse, step) pairs with ``dw != 0``;
- ``M1_min = sum_i |w_T - w_0|`` and ``M0_min`` = synapses with ``w_T != w_0``;
- ``inefficiency = M1 / M1_min`` (>= 1 by the triangle inequality).

The net displacement ``w_T - w_0`` is accumulated from the recorded changes in
float64, so the limit needs no access to the weights and ``inefficiency >= 1``
holds (up to float64 rounding). It equals ``sum |w_T - w_0|`` whenever every weight change is
recorded (this costs one float64 copy of the parameters). Totals are float64,
counts int64, whatever the parameter dtype.

With synaptic caching (:mod:`~energy_callbacks.core.caching`) the report also
carries the consolidation and maintenance energy; then ``energy`` is their sum,
``updates`` the consolidation writes, and the inefficiency ``energy / M1_min``.
The cost in joules (:mod:`~energy_callbacks.core.costs`) is added by
:meth:`Plasticity.report <energy_callbacks.core.plasticity.Plasticity.report>`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from .ops import Array, ArrayOps, numpy_ops
from .topology import TensorSpec


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return math.nan if num == 0 else math.inf


@dataclass(frozen=True)
class LayerEnergy:
    """Energy figures of one tensor."""

    name: str
    synapses: int
    m1: float
    m0: int
    m_alpha: float
    m1_min: float
    m0_min: int
    consolidation: float | None = None
    maintenance: float | None = None
    consolidations: int | None = None
    transient: float | None = None

    @property
    def energy(self) -> float:
        """The plasticity energy: M1, or consolidation + maintenance with caching."""
        return _energy(self.m1, self.consolidation, self.maintenance)

    @property
    def updates(self) -> int:
        """The synaptic updates: M0, or the consolidation writes with caching."""
        return self.m0 if self.consolidations is None else self.consolidations

    @property
    def inefficiency(self) -> float:
        """``energy / m1_min``: NaN when nothing moved, inf when it moved and came back."""
        return _ratio(self.energy, self.m1_min)


@dataclass(frozen=True)
class EnergyReport:
    """An immutable snapshot of the energy spent so far, in total and per tensor."""

    m1: float
    m0: int
    m1_min: float
    m0_min: int
    inefficiency: float
    per_layer: Mapping[str, LayerEnergy]
    steps: int
    samples_seen: int
    samples_learned: int
    alpha: float = 1.0
    m_alpha: float = 0.0
    skipped_steps: int = 0
    joules: float | None = None
    consolidation: float | None = None
    """Synaptic caching only (else None): ``sum |w_e|`` at consolidation."""
    maintenance: float | None = None
    """Synaptic caching only: ``maintenance_cost * sum |w_e|`` summed over steps."""
    consolidations: int | None = None
    """Synaptic caching only: consolidation writes (synapses with ``w_e != 0``)."""
    transient: float | None = None
    """Synaptic caching only: ``sum |w_e|`` still in the store (0 after the end of fit)."""

    @property
    def caching(self) -> bool:
        """True when the figures come from synaptic caching."""
        return self.consolidation is not None

    @property
    def energy(self) -> float:
        """``plasticity/energy``: M1, or consolidation + maintenance with caching."""
        return _energy(self.m1, self.consolidation, self.maintenance)

    @property
    def updates(self) -> int:
        """``plasticity/updates``: M0, or the consolidation writes with caching."""
        return self.m0 if self.consolidations is None else self.consolidations

    def metrics(self, prefix: str = "plasticity", per_layer: bool = False) -> dict[str, float]:
        """The figures under the logging keys both framework adapters use.

        With caching, ``energy`` and ``updates`` are the cached figures, and
        ``energy_consolidation``, ``energy_maintenance``, ``transient`` and the
        figures of the updates themselves (``energy_uncached`` = M1,
        ``updates_uncached`` = M0) are added.
        """
        out = {
            f"{prefix}/energy": self.energy,
            f"{prefix}/updates": float(self.updates),
            f"{prefix}/energy_min": self.m1_min,
            f"{prefix}/updates_min": float(self.m0_min),
            f"{prefix}/inefficiency": self.inefficiency,
        }
        if self.consolidation is not None:
            out[f"{prefix}/energy_consolidation"] = self.consolidation
            out[f"{prefix}/energy_maintenance"] = float(self.maintenance or 0.0)
            out[f"{prefix}/energy_uncached"] = self.m1
            out[f"{prefix}/updates_uncached"] = float(self.m0)
            out[f"{prefix}/transient"] = float(self.transient or 0.0)
        if self.alpha != 1.0:
            out[f"{prefix}/energy_alpha"] = self.m_alpha
        if self.joules is not None:
            out[f"{prefix}/joules"] = self.joules
        if self.samples_seen:
            out[f"{prefix}/samples_learned"] = self.samples_learned / self.samples_seen
        if per_layer:
            for name, layer in self.per_layer.items():
                out[f"{prefix}/energy/{name}"] = layer.energy
        return out

    def __str__(self) -> str:
        lines = [
            f"M1 {self.m1:.4g}  M0 {self.m0:.4g}  M1_min {self.m1_min:.4g}  "
            f"M0_min {self.m0_min:.4g}  inefficiency {self.inefficiency:.3g}  steps {self.steps}"
        ]
        if self.consolidation is not None:
            lines.append(
                f"caching: energy {self.energy:.4g} = consolidation {self.consolidation:.4g} "
                f"+ maintenance {self.maintenance or 0.0:.4g}  writes {self.updates:.4g}  "
                f"transient {self.transient or 0.0:.4g}"
            )
        if self.joules is not None:
            lines.append(f"joules {self.joules:.4g}")
        for layer in self.per_layer.values():
            lines.append(
                f"  {layer.name:<24} M1 {layer.m1:.4g}  M0 {layer.m0:.4g}  "
                f"M1_min {layer.m1_min:.4g}  inefficiency {layer.inefficiency:.3g}"
            )
        return "\n".join(lines)


class EnergyMeter:
    """Accumulates the energy of applied updates, per tensor, exactly.

    Call :meth:`record` with one array per tensor (``None`` for a tensor that did
    not change this step). A step holding a NaN or Inf is not added: it is
    counted in ``skipped_steps`` and a warning is issued.
    """

    def __init__(
        self,
        tensors: Sequence[TensorSpec],
        alpha: float = 1.0,
        *,
        ops: ArrayOps = numpy_ops,
    ) -> None:
        check_alpha(alpha)
        self.tensors = tuple(tensors)
        self.alpha = float(alpha)
        self.ops = ops
        self.reset()

    def reset(self) -> None:
        """Forget everything recorded; the current weights become ``w_0``."""
        n = len(self.tensors)
        self._m1 = np.zeros(n, dtype=np.float64)
        self._m_alpha = np.zeros(n, dtype=np.float64)
        self._m0 = np.zeros(n, dtype=np.int64)
        self._displacement = [self.ops.zeros_f64(t.shape) for t in self.tensors]
        self.steps = 0
        self.skipped_steps = 0

    def record(
        self,
        updates: Sequence[Array | None],
        *,
        check_finite: bool = True,
        displacement: bool = True,
        totals: Sequence[tuple[float, int] | None] | None = None,
    ) -> bool:
        """Add one step's applied changes. Returns False if the step was skipped.

        Finiteness is read off the step's M1 (NaN/Inf make it non-finite), so it
        costs no extra pass; ``check_finite=False`` skips even that. With
        ``displacement=False`` the caller supplies ``w_T - w_0`` itself through
        :meth:`add_displacement` (adapters fold it in lazily from the weights).
        ``totals`` gives each update's ``(sum |u|, count(u != 0))`` when the caller
        computed them already (a fused kernel); they are used for M1 and M0.
        """
        ops = self.ops
        if len(updates) != len(self.tensors):
            raise ValueError(
                f"EnergyMeter.record: got {len(updates)} arrays for {len(self.tensors)} tensors"
            )
        given = totals if totals is not None else [None] * len(updates)
        m1 = [
            None if u is None else (ops.total(u) if t is None else t[0])
            for u, t in zip(updates, given, strict=True)
        ]
        m0 = [None if t is None else t[1] for t in given]
        if check_finite and not all(v is None or math.isfinite(v) for v in m1):
            self.skip_nonfinite()
            return False
        for i, u in enumerate(updates):
            v = m1[i]
            if u is None or v is None:
                continue
            self._m1[i] += v
            self._m_alpha[i] += v if self.alpha == 1.0 else ops.total(u, self.alpha)
            count = m0[i]
            self._m0[i] += ops.count_nonzero(u) if count is None else count
            if displacement:
                self._displacement[i] = ops.add_f64(self._displacement[i], u)
        self.steps += 1
        return True

    def add_displacement(self, index: int, delta: Array) -> None:
        """Add a change of tensor ``index`` to its net displacement only (not to M1/M0)."""
        self._displacement[index] = self.ops.add_f64(self._displacement[index], delta)

    def skip_nonfinite(self) -> None:
        """Count (and warn about) a step whose updates held NaN or Inf."""
        self.skipped_steps += 1
        warnings.warn(
            f"plasticity: a step's updates hold NaN/Inf; it was skipped and not counted "
            f"({self.skipped_steps} skipped so far)",
            RuntimeWarning,
            stacklevel=3,
        )

    def totals(self) -> tuple[float, int]:
        """``(M1, M0)`` so far: cheap enough to log every step."""
        return float(self._m1.sum()), int(self._m0.sum())

    def report(self, samples_seen: int = 0, samples_learned: int = 0) -> EnergyReport:
        ops = self.ops
        per_layer = {}
        for i, t in enumerate(self.tensors):
            d = self._displacement[i]
            per_layer[t.name] = LayerEnergy(
                name=t.name,
                synapses=t.size,
                m1=float(self._m1[i]),
                m0=int(self._m0[i]),
                m_alpha=float(self._m_alpha[i]),
                m1_min=ops.total(d),
                m0_min=ops.count_nonzero(d),
            )
        m1 = float(self._m1.sum())
        m0 = int(self._m0.sum())
        m1_min = math.fsum(layer.m1_min for layer in per_layer.values())
        return EnergyReport(
            m1=m1,
            m0=m0,
            m1_min=m1_min,
            m0_min=sum(layer.m0_min for layer in per_layer.values()),
            inefficiency=_ratio(m1, m1_min),
            per_layer=MappingProxyType(per_layer),
            steps=self.steps,
            samples_seen=samples_seen,
            samples_learned=samples_learned,
            alpha=self.alpha,
            m_alpha=float(self._m_alpha.sum()),
            skipped_steps=self.skipped_steps,
        )

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers and NumPy arrays only."""
        return {
            "names": [t.name for t in self.tensors],
            "m1": self._m1.copy(),
            "m_alpha": self._m_alpha.copy(),
            "m0": self._m0.copy(),
            "displacement": [self.ops.to_numpy(d).copy() for d in self._displacement],
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        names = [t.name for t in self.tensors]
        if list(state["names"]) != names:
            raise ValueError(
                f"EnergyMeter.load_state_dict: saved tensors {list(state['names'])} do not match "
                f"this network's {names}"
            )
        displacement = []
        for t, d in zip(self.tensors, state["displacement"], strict=True):
            d = np.asarray(d, dtype=np.float64)
            if d.shape != t.shape:
                raise ValueError(
                    f"EnergyMeter.load_state_dict: {t.name!r} was saved with shape {d.shape}, "
                    f"the network has {t.shape}"
                )
            displacement.append(
                self.ops.add_f64(self.ops.zeros_f64(t.shape), self.ops.from_numpy(d))
            )
        self._m1 = np.array(state["m1"], dtype=np.float64)
        self._m_alpha = np.array(state["m_alpha"], dtype=np.float64)
        self._m0 = np.array(state["m0"], dtype=np.int64)
        self._displacement = displacement
        self.steps = int(state["steps"])
        self.skipped_steps = int(state["skipped_steps"])


def check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0 (1 gives M1), got {alpha!r}")


def _energy(m1: float, consolidation: float | None, maintenance: float | None) -> float:
    if consolidation is None:
        return m1
    return consolidation + (maintenance or 0.0)
