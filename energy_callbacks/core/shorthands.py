"""The shorthand values ``Plasticity(...)`` accepts for its rules.

``synapses=0.1`` is ``TopFraction(0.1)``, ``units=0.5`` is ``TopUnits(0.5)``,
``samples="lazy"`` / ``"mistakes"`` are ``Lazy()`` / ``MemorizedMistakes()``.
Anything else raises a ValueError that lists what is accepted.
"""

from __future__ import annotations

import numbers
from typing import Any

from .samples import Lazy, MemorizedMistakes, SampleGate
from .synapses import SynapseRule, TopFraction
from .units import TopUnits, UnitRule

SAMPLE_SHORTHANDS = {
    "lazy": Lazy,
    "mistakes": MemorizedMistakes,
    "memorized_mistakes": MemorizedMistakes,
}


def synapse_rules(value: Any) -> list[SynapseRule]:
    if value is None:
        return []
    if isinstance(value, SynapseRule):
        return [value]
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            return [TopFraction(float(value))]
        except ValueError as exc:
            raise ValueError(f"synapses={value!r}: {exc}") from None
    if isinstance(value, (list, tuple)) and all(isinstance(v, SynapseRule) for v in value):
        return list(value)
    raise ValueError(
        f"synapses must be a fraction in (0, 1] (TopFraction), a SynapseRule such as "
        f"TopFraction/Threshold/RandomSynapses, or a list of them; got {value!r}"
    )


def unit_rule(value: Any) -> UnitRule | None:
    if value is None or isinstance(value, UnitRule):
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            return TopUnits(float(value))
        except ValueError as exc:
            raise ValueError(f"units={value!r}: {exc}") from None
    raise ValueError(
        f"units must be a fraction in (0, 1] (TopUnits), or a UnitRule such as "
        f"TopUnits(k=...)/FixedSubnetwork/RandomUnits; got {value!r}"
    )


def sample_gate(value: Any) -> SampleGate | None:
    if value is None or isinstance(value, SampleGate):
        return value
    if isinstance(value, str):
        gate: SampleGate
        key = value.strip().lower().replace("-", "_")
        if key in SAMPLE_SHORTHANDS:
            gate = SAMPLE_SHORTHANDS[key]()
            return gate
    raise ValueError(
        f"samples must be one of {sorted(SAMPLE_SHORTHANDS)} or a SampleGate such as "
        f"Lazy()/Margin(0.9)/MemorizedMistakes(); got {value!r}"
    )
