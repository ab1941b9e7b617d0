"""Cost models: the plasticity energy in joules.

``Plasticity(cost=...)`` reports ``plasticity/joules``. A :class:`Cost` charges
``joules`` either per unit of ``|dw|`` (``per="unit"``: times the plasticity
energy, M1) or per synaptic update (``per="update"``: times M0). With synaptic
caching the energy is consolidation + maintenance and the updates are the
consolidation writes (see :mod:`energy_callbacks.core.caching`).

Example::

    >>> Cost.from_value("dram")
    Cost(6.4e-10, per='update', name='dram')
    >>> Cost(2e-12, per="update").joules_for(energy=0.5, updates=1000)
    2e-09

Presets (figures and sources in docs/science.md, "Cost in joules"):

- ``"biology"``: 10 mJ per synaptic update. Girard, Jiang & van Rossum
  (arXiv:2301.09565) estimate about 10 mJ per bit of long-term memory; we read
  one synaptic update as storing one bit.
- ``"sram"``: 5 pJ per update, one 32-bit SRAM access (8 KB cache, 45 nm);
- ``"dram"``: 640 pJ per update, one 32-bit DRAM access (45 nm).

The SRAM and DRAM figures are Horowitz's (ISSCC 2014, "Computing's energy
problem") per 64-bit access, halved per 32-bit word as Han et al. (NeurIPS 2015)
tabulate them. They are access energies; a write of one word costs the same
order. Give your own hardware's figure with ``Cost(joules, per="update")``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import checks

BIOLOGY_JOULES_PER_BIT = 10e-3
"""About 10 mJ per bit of biological long-term memory (Girard et al. 2023)."""

SRAM_JOULES_PER_WORD = 5e-12
"""One 32-bit SRAM cache access (8 KB, 45 nm): Horowitz 2014 via Han et al. 2015."""

DRAM_JOULES_PER_WORD = 640e-12
"""One 32-bit DRAM access (45 nm): Horowitz 2014 via Han et al. 2015."""

BASES = ("unit", "update")


class Cost:
    """``joules`` per unit of ``|dw|`` (``per="unit"``) or per synaptic update (``"update"``).

    ``name`` labels the figure (a preset's name, or ``"custom"``).
    """

    def __init__(self, joules: float, per: str = "update", name: str = "custom") -> None:
        joules = checks.real(
            "Cost.joules", joules, low=0.0, low_open=False, what="a finite number >= 0"
        )
        if not isinstance(per, str) or per not in BASES:
            raise ValueError(
                f"Cost.per must be 'unit' (joules per unit of |dw|, times M1) or 'update' "
                f"(joules per synaptic update, times M0), got {per!r}"
            )
        if not isinstance(name, str) or not name:
            raise ValueError(f"Cost.name must be a non-empty string, got {name!r}")
        self.joules = float(joules)
        self.per = per
        self.name = name

    def __repr__(self) -> str:
        return f"Cost({self.joules!r}, per={self.per!r}, name={self.name!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Cost):
            return NotImplemented
        return (self.joules, self.per, self.name) == (other.joules, other.per, other.name)

    def __hash__(self) -> int:
        return hash((self.joules, self.per, self.name))

    def joules_for(self, energy: float, updates: int) -> float:
        """The joules of a run that spent ``energy`` (sum of ``|dw|``) in ``updates`` writes."""
        return self.joules * (energy if self.per == "unit" else updates)

    @classmethod
    def preset(cls, name: str) -> Cost:
        """One of :data:`PRESETS` by name."""
        key = name.strip().lower()
        if key not in PRESETS:
            raise ValueError(
                f"cost: unknown preset {name!r}; choose from {sorted(PRESETS)}, or give "
                "Cost(joules, per='update' | 'unit') with your hardware's figure"
            )
        return PRESETS[key]

    @classmethod
    def from_value(cls, value: Any) -> Cost | None:
        """``cost=`` as given: None, a Cost, a preset name, or ``{"joules": ..., "per": ...}``."""
        if value is None or isinstance(value, Cost):
            return value
        if isinstance(value, str):
            return cls.preset(value)
        if isinstance(value, Mapping):
            args = {k: v for k, v in value.items() if k != "class"}
            unknown = sorted(set(args) - {"joules", "per", "name"})
            if unknown or "joules" not in args:
                raise ValueError(
                    f"cost: a mapping needs 'joules' (and 'per', 'name'), got keys {sorted(value)}"
                )
            return cls(**args)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise TypeError(
                f"cost={value!r} does not say what it is per: give Cost({value!r}, "
                "per='update') (joules per synaptic update) or Cost(..., per='unit') "
                "(joules per unit of |dw|), or a preset name"
            )
        raise TypeError(
            f"cost must be None, a Cost, a preset name {sorted(PRESETS)} or a mapping "
            f"{{'joules': ..., 'per': ...}}; got {value!r}"
        )


PRESETS: dict[str, Cost] = {
    "biology": Cost(BIOLOGY_JOULES_PER_BIT, per="update", name="biology"),
    "sram": Cost(SRAM_JOULES_PER_WORD, per="update", name="sram"),
    "dram": Cost(DRAM_JOULES_PER_WORD, per="update", name="dram"),
}
"""Named cost figures; docs/science.md states each source."""


def legacy_cost(joules_per_unit: float | None, cost_basis: str) -> Cost | None:
    """The :class:`Cost` of the old ``joules_per_unit=`` / ``cost_basis=`` arguments."""
    checks.choice("cost_basis", cost_basis, ("m1", "m0"))
    if joules_per_unit is None:
        return None
    joules_per_unit = checks.real(
        "joules_per_unit",
        joules_per_unit,
        low=0.0,
        low_open=False,
        what="a finite number >= 0 (or None)",
    )
    return Cost(joules_per_unit, per="unit" if cost_basis == "m1" else "update")
