"""Energy accounting: M_alpha, M1, M0, the physical limit and the inefficiency.

For every recorded step ``t`` and synapse ``i`` with applied change ``dw``:

- ``M1 = sum |dw|`` (the plasticity energy), ``M_alpha = sum |dw| ** alpha``;
- ``M0`` = number of (synapse, step) pairs with ``dw != 0``;
- ``M1_min = sum_i |w_T - w_0|`` and ``M0_min`` = synapses with ``w_T != w_0``;
- ``inefficiency = M1 / M1_min`` (>= 1 by the triangle inequality).

The net displacement ``w_T - w_0`` comes one of two ways. The reference path
accumulates the recorded changes in float64 (one float64 copy of the
parameters), so the limit needs no access to the weights. The adapters keep
``w_0`` itself instead and give the meter ``(M1_min, M0_min)`` per tensor when
they are read (:meth:`EnergyMeter.set_net`, :func:`net_change`): half that
memory for float32 weights, and exact. Either way ``inefficiency >= 1`` holds
(up to float64 rounding). Totals are float64, counts int64, whatever the
parameter dtype.

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
from typing import Any, Protocol

import numpy as np

from . import checks
from .ops import Array, ArrayOps, numpy_ops
from .topology import TensorSpec

NET_CHUNK = 1 << 20
"""Entries per float64 temporary of :func:`net_change` (8 MiB)."""


def net_change(
    after: Any, before: Any | None, chunk: int | None = None, read: Any = np.asarray
) -> tuple[float, int]:
    """``(sum |after - before|, count(after != before))`` of two flat arrays, in
    float64, through temporaries of at most ``chunk`` entries (NaN/Inf make the sum
    non-finite); ``before=None`` is zero. ``after`` and ``before`` may be any
    sliceable arrays whose slices ``read`` brings to the host as NumPy arrays (a
    framework's tensors)."""
    size, chunk = len(after), chunk or NET_CHUNK
    acc = 0.0
    count = 0
    for start in range(0, size, chunk):
        a = np.asarray(read(after[start : start + chunk]), dtype=np.float64)
        if before is None:
            d = a if a.base is None else a.copy()  # a new chunk, not a view of ``after``
        else:
            b = np.asarray(read(before[start : start + chunk]), dtype=np.float64)
            d = np.subtract(a, b)  # a new chunk: ``a`` may be a view of the weights
        count += int(np.count_nonzero(d))
        acc += float(np.abs(d, out=d).sum())
    return acc, count


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


class Shares(Protocol):
    """The processes of sharded training: each holds one share (a block of rows) of
    every measured tensor and records the energy of its share."""

    @property
    def first(self) -> bool:
        """True on the process that carries a resumed total (one process does)."""
        ...

    def sum(self, values: np.ndarray) -> np.ndarray:
        """``values`` summed over the processes, element by element (a collective)."""
        ...


class EnergyMeter:
    """Accumulates the energy of applied updates, per tensor, exactly.

    Call :meth:`record` with one array per tensor (``None`` for a tensor that did
    not change this step). A step holding a NaN or Inf is not added: it is
    counted in ``skipped_steps``, and the first one warns.

    Under sharded training (``shares`` set) each process records its own share of
    every tensor; the figures that sum over synapses are summed over the processes
    when they are read (:meth:`totals`, :meth:`report`, :meth:`state_dict`, all
    collectives then), never at a step. Steps are counted alike on every process.
    """

    shares: Shares | None = None

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
        # accumulated w_T - w_0 (float64, made on first use), or the caller's net totals
        self._displacement: list[Array | None] = [None] * n
        self._net: list[tuple[float, int] | None] = [None] * n
        self.steps = 0
        self.skipped_steps = 0
        self._warned: set[str] = set()  # causes of skipped steps warned about
        self._pending: list[Array] | None = None  # device totals not read yet
        self._pending_steps = 0

    def rebind(self, tensors: Sequence[TensorSpec], ops: ArrayOps | None = None) -> None:
        """Measure a new set of tensors from now on, keeping everything recorded so far.

        Every tensor measured now must be among ``tensors`` (same name and shape);
        its totals and displacement carry over, and new tensors start at zero.
        """
        self.flush()
        new = tuple(tensors)
        by_name = {t.name: t for t in new}
        lost = [t.name for t in self.tensors if by_name.get(t.name, None) is None]
        changed = [
            t.name for t in self.tensors if t.name in by_name and by_name[t.name].shape != t.shape
        ]
        if lost or changed:
            raise ValueError(
                f"EnergyMeter.rebind: tensors {lost + changed} would be dropped or change shape; "
                "their energy so far cannot be carried over"
            )
        old = {t.name: i for i, t in enumerate(self.tensors)}
        old_ops, self.ops = self.ops, ops or self.ops
        m1, m_alpha, m0, displacement = self._m1, self._m_alpha, self._m0, self._displacement
        net = self._net
        steps, skipped, warned = self.steps, self.skipped_steps, self._warned
        self.tensors = new
        self.reset()
        self.steps, self.skipped_steps, self._warned = steps, skipped, warned
        for i, t in enumerate(new):
            j = old.get(t.name)
            if j is None:
                continue
            self._m1[i], self._m_alpha[i], self._m0[i] = m1[j], m_alpha[j], m0[j]
            self._net[i] = net[j]
            d = displacement[j]
            if d is not None and old_ops is not self.ops:
                d = self.ops.from_numpy(np.asarray(old_ops.to_numpy(d), dtype=np.float64))
            self._displacement[i] = d

    def record_deferred(self, m1: Array, m_alpha: Array, m0: Array, skipped: Array) -> None:
        """Add one step's per-tensor totals computed on a device, without reading them.

        ``m1``, ``m_alpha`` (float64) and ``m0`` (int64) hold one entry per tensor
        (zeros for tensors that did not change); ``skipped`` is an int64 scalar, 1 if
        the step held NaN/Inf and was undone (its totals are then zeros). They are
        read to the host by :meth:`flush`, which :meth:`totals`, :meth:`report` and
        :meth:`state_dict` call: a step costs no device synchronization.
        """
        if self._pending is None:
            self._pending = [m1, m_alpha, m0, skipped]
        else:
            self._pending = [
                a + b for a, b in zip(self._pending, (m1, m_alpha, m0, skipped), strict=True)
            ]
        self._pending_steps += 1

    def flush(self) -> None:
        """Read the device totals of :meth:`record_deferred` into the host totals."""
        if self._pending is None:
            return
        m1, m_alpha, m0, skipped = (np.asarray(self.ops.to_numpy(a)) for a in self._pending)
        steps = self._pending_steps
        self._pending, self._pending_steps = None, 0
        self._m1 += m1.astype(np.float64)
        self._m_alpha += m_alpha.astype(np.float64)
        self._m0 += m0.astype(np.int64)
        lost = int(skipped)
        self.steps += steps - lost
        if lost:
            self.skip_nonfinite(lost)

    def pending_totals(self) -> tuple[Array, Array] | None:
        """``(M1, M0)`` including unread device totals, as device scalars (no host read);
        None when nothing is pending, or when the totals are summed over shares."""
        if self._pending is None or self.shares is not None:
            return None
        m1, _, m0, _ = self._pending
        return m1.sum() + float(self._m1.sum()), m0.sum() + int(self._m0.sum())

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
                self.add_displacement(i, u)
        self.steps += 1
        return True

    def add_displacement(self, index: int, delta: Array) -> None:
        """Add a change of tensor ``index`` to its net displacement only (not to M1/M0)."""
        if self._net[index] is not None:
            raise RuntimeError(
                f"EnergyMeter: the net change of {self.tensors[index].name!r} is measured "
                "against a w_0 kept by the caller (set_net), so changes cannot be added to it"
            )
        acc = self._displacement[index]
        if acc is None:
            acc = self.ops.zeros_f64(self.tensors[index].shape)
        self._displacement[index] = self.ops.add_f64(acc, delta)

    def set_net(self, index: int, m1_min: float, m0_min: int) -> None:
        """Give tensor ``index``'s ``(sum |w_T - w_0|, count(w_T != w_0))`` as measured by
        a caller that keeps ``w_0`` (see :func:`net_change`); it replaces the accumulated
        displacement in reports and states."""
        self._net[index] = (float(m1_min), int(m0_min))
        self._displacement[index] = None

    def _net_of(self, index: int) -> tuple[float, int]:
        net = self._net[index]
        if net is not None:
            return net
        d = self._displacement[index]
        if d is None:
            return 0.0, 0
        return self.ops.total(d), self.ops.count_nonzero(d)

    def skip_nonfinite(self, steps: int = 1, *, reason: str | None = None) -> None:
        """Count ``steps`` skipped steps (they cost nothing) and warn, once per cause.

        ``reason`` says why, for the warning; by default the steps' updates held NaN
        or Inf. ``reason=""`` counts without a warning (a loss scaler's own skips).
        The first step skipped for a cause warns; later ones are only counted in
        ``report().skipped_steps``.
        """
        self.skipped_steps += steps
        if reason == "":
            return
        if reason is None:
            reason = (
                "a step's updates hold NaN/Inf (NaN/Inf gradients?): it was skipped, the "
                "weights were left as before and nothing was counted"
            )
        if reason in self._warned:
            return
        self._warned.add(reason)
        warnings.warn(
            f"plasticity: {reason}. Later skipped steps are counted in report().skipped_steps "
            f"without another warning ({self.skipped_steps} skipped so far).",
            RuntimeWarning,
            stacklevel=3,
        )

    def totals(self) -> tuple[float, int]:
        """``(M1, M0)`` so far: cheap enough to log every step."""
        self.flush()
        m1, m0 = np.array([self._m1.sum()]), np.array([self._m0.sum()])
        if self.shares is not None:
            m1, m0 = self.shares.sum(m1), self.shares.sum(m0)
        return float(m1[0]), int(m0[0])

    def _figures(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per tensor: M1, M_alpha, M0, M1_min, M0_min (summed over the shares)."""
        self.flush()
        net = [self._net_of(i) for i in range(len(self.tensors))]
        floats = np.stack(
            [self._m1, self._m_alpha, np.array([m for m, _ in net], dtype=np.float64)]
        ).reshape(3, len(self.tensors))
        counts = np.stack([self._m0, np.array([c for _, c in net], dtype=np.int64)]).reshape(
            2, len(self.tensors)
        )
        if self.shares is not None:
            floats, counts = self.shares.sum(floats), self.shares.sum(counts)
        return floats[0], floats[1], counts[0], floats[2], counts[1]

    def report(self, samples_seen: int = 0, samples_learned: int = 0) -> EnergyReport:
        m1s, m_alphas, m0s, m1_mins, m0_mins = self._figures()
        per_layer = {}
        for i, t in enumerate(self.tensors):
            per_layer[t.name] = LayerEnergy(
                name=t.name,
                synapses=t.size,
                m1=float(m1s[i]),
                m0=int(m0s[i]),
                m_alpha=float(m_alphas[i]),
                m1_min=float(m1_mins[i]),
                m0_min=int(m0_mins[i]),
            )
        m1 = float(m1s.sum())
        m0 = int(m0s.sum())
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
            m_alpha=float(m_alphas.sum()),
            skipped_steps=self.skipped_steps,
        )

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers and NumPy arrays only. ``displacement`` holds the accumulated
        ``w_T - w_0`` (None for a tensor whose net totals a caller gave with
        :meth:`set_net`); ``m1_min`` and ``m0_min`` the net totals of every tensor.
        Under sharded training the figures are the sums over the shares (the same on
        every process), and there is no displacement."""
        m1, m_alpha, m0, m1_min, m0_min = self._figures()
        return {
            "names": [t.name for t in self.tensors],
            "m1": m1.copy(),
            "m_alpha": m_alpha.copy(),
            "m0": m0.copy(),
            "displacement": [
                None if d is None else self.ops.to_numpy(d).copy() for d in self._displacement
            ],
            "m1_min": m1_min.copy(),
            "m0_min": m0_min.copy(),
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`. Tensors are matched by name: the saved ones
        must all be measured here (same shapes); tensors measured here but not saved
        (they joined training after that checkpoint) start at zero. Under sharded
        training the first share carries the saved totals and the others start at
        zero, so that their sum is the saved one."""
        saved = [str(n) for n in state["names"]]
        index = {t.name: i for i, t in enumerate(self.tensors)}
        unknown = [n for n in saved if n not in index]
        if unknown or len(set(saved)) != len(saved):
            raise ValueError(
                f"EnergyMeter.load_state_dict: saved tensors {saved} do not match this "
                f"network's {list(index)} (not measured here: {unknown})"
            )
        m1 = np.zeros(len(self.tensors), dtype=np.float64)
        m_alpha = np.zeros(len(self.tensors), dtype=np.float64)
        m0 = np.zeros(len(self.tensors), dtype=np.int64)
        displacement: list[Array | None] = [None] * len(self.tensors)
        net: list[tuple[float, int] | None] = [None] * len(self.tensors)
        saved_d = state.get("displacement") or [None] * len(saved)
        for j, name in enumerate(saved):
            i = index[name]
            t = self.tensors[i]
            if saved_d[j] is None:  # no change yet, or net totals from a w_0 kept elsewhere
                given = (float(state["m1_min"][j]), int(state["m0_min"][j]))
                net[i] = given if given != (0.0, 0) else None
            else:
                d = np.asarray(saved_d[j], dtype=np.float64)
                if d.shape != t.shape:
                    raise ValueError(
                        f"EnergyMeter.load_state_dict: {t.name!r} was saved with shape "
                        f"{d.shape}, the network has {t.shape}"
                    )
                displacement[i] = self.ops.add_f64(
                    self.ops.zeros_f64(t.shape), self.ops.from_numpy(d)
                )
            m1[i] = state["m1"][j]
            m_alpha[i] = state["m_alpha"][j]
            m0[i] = state["m0"][j]
        if self.shares is not None and not self.shares.first:
            m1[:], m_alpha[:], m0[:] = 0.0, 0.0, 0
            net = [None] * len(self.tensors)
        self._pending, self._pending_steps = None, 0
        self._m1, self._m_alpha, self._m0 = m1, m_alpha, m0
        self._displacement, self._net = displacement, net
        self.steps = int(state["steps"])
        self.skipped_steps = int(state["skipped_steps"])


def check_alpha(alpha: float) -> None:
    checks.real("alpha", alpha, low=0.0, low_open=True, what="a finite number > 0 (1 gives M1)")


def _energy(m1: float, consolidation: float | None, maintenance: float | None) -> float:
    if consolidation is None:
        return m1
    return consolidation + (maintenance or 0.0)
