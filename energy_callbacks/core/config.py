"""Plasticity rules as plain data, and back: for configs, YAML and saved models.

``to_config(Plasticity(units=TopUnits(0.1, path=True), synapses=0.05))`` gives a
dict of strings, numbers and lists (JSON-safe) that :func:`from_config` turns
back into an equal rule. The Keras adapter stores it in a saved optimizer.

Every rule is written as ``{"class": name, **its constructor arguments}``; the
arguments are read back from the attributes of the same names. ``Caching`` and
``Cost`` are written the same way (``tau=math.inf`` is the float ``inf``, which
``json`` writes as ``Infinity``). Configs of earlier releases, with
``joules_per_unit``/``cost_basis``, still load.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from .caching import Caching
from .costs import Cost, legacy_cost
from .plasticity import Plasticity
from .samples import Lazy, Margin, MemorizedMistakes, SampleGate
from .synapses import RandomSynapses, SynapseRule, Threshold, TopFraction
from .units import FixedSubnetwork, RandomUnits, TopUnits, UnitRule

RULES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        TopFraction,
        Threshold,
        RandomSynapses,
        TopUnits,
        RandomUnits,
        FixedSubnetwork,
        Lazy,
        Margin,
        MemorizedMistakes,
        Caching,
        Cost,
    )
}


def rule_config(rule: SynapseRule | UnitRule | SampleGate | Caching | Cost) -> dict[str, Any]:
    """``{"class": ..., **arguments}`` of one rule (nested gates become dicts)."""
    name = type(rule).__name__
    if RULES.get(name) is not type(rule):
        raise ValueError(
            f"to_config: {name} is not a built-in rule ({sorted(RULES)}); "
            "a custom rule cannot be written to a config"
        )
    out: dict[str, Any] = {"class": name}
    for arg in inspect.signature(type(rule)).parameters:
        value = getattr(rule, arg)
        if isinstance(value, (SynapseRule, UnitRule, SampleGate)):
            value = rule_config(value)
        out[arg] = value
    return out


def rule_from_config(config: Mapping[str, Any]) -> Any:
    """The rule a :func:`rule_config` dict describes."""
    kwargs = dict(config)
    name = kwargs.pop("class", None)
    if name not in RULES:
        raise ValueError(f"from_config: unknown rule class {name!r}; known: {sorted(RULES)}")
    cls = RULES[name]
    params = inspect.signature(cls).parameters
    positional = [p for p, v in params.items() if v.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    for key, value in kwargs.items():
        if isinstance(value, Mapping) and "class" in value:
            kwargs[key] = rule_from_config(value)
    args = [kwargs.pop(p) for p in positional if p in kwargs]
    return cls(*args, **kwargs)


def to_config(plasticity: Plasticity) -> dict[str, Any]:
    """A JSON-safe description of ``plasticity``'s rules and settings (not its state)."""
    return {
        "synapses": [rule_config(r) for r in plasticity.synapses],
        "units": None if plasticity.units is None else rule_config(plasticity.units),
        "samples": None if plasticity.samples is None else rule_config(plasticity.samples),
        "caching": None if plasticity.caching is None else rule_config(plasticity.caching),
        "cost": None if plasticity.cost is None else rule_config(plasticity.cost),
        "alpha": plasticity.alpha,
    }


CONFIG_KEYS = (
    "synapses",
    "units",
    "samples",
    "alpha",
    "caching",
    "cost",
    "joules_per_unit",
    "cost_basis",
)


def from_config(config: Mapping[str, Any]) -> Plasticity:
    """A fresh (not set up) :class:`Plasticity` from a :func:`to_config` dict."""
    unknown = [k for k in config if k not in CONFIG_KEYS]
    if unknown:
        raise ValueError(f"from_config: unknown keys {unknown}; a config holds {CONFIG_KEYS}")
    units, samples = config.get("units"), config.get("samples")
    caching, cost = config.get("caching"), config.get("cost")
    if cost is None:  # a config of an earlier release
        cost = legacy_cost(config.get("joules_per_unit"), config.get("cost_basis", "m1"))
    elif isinstance(cost, Mapping) and "class" in cost:
        cost = rule_from_config(cost)
    return Plasticity(
        synapses=[rule_from_config(r) for r in config.get("synapses", [])] or None,
        units=None if units is None else rule_from_config(units),
        samples=None if samples is None else rule_from_config(samples),
        caching=None if caching is None else rule_from_config(caching),
        cost=cost,
        alpha=config.get("alpha", 1.0),
    )
