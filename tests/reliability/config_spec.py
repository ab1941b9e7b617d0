"""What every configuration field accepts, as predicates, and hypothesis strategies that
draw any value at all for it: right ones, wrong types, out-of-range numbers, unknown
strings and unhashable objects.

:func:`check` builds one constructor from drawn arguments. It must succeed exactly when
every argument is valid, and otherwise raise ValueError or TypeError naming one of the
bad fields. Shared by test_config_fuzz.py and the Keras script (keras_cases.py).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any

import numpy as np
from hypothesis import strategies as st

from energy_callbacks import (
    FixedSubnetwork,
    Lazy,
    Margin,
    MemorizedMistakes,
    Plasticity,
    RandomSynapses,
    RandomUnits,
    Threshold,
    TopFraction,
    TopUnits,
)
from energy_callbacks.core import Caching, Cost
from energy_callbacks.core.costs import PRESETS
from energy_callbacks.core.samples import SampleGate
from energy_callbacks.core.synapses import SynapseRule
from energy_callbacks.core.units import UnitRule

ODD = [
    object(),
    np.float32(0.5),
    np.float64(0.25),
    np.int64(3),
    np.int8(-2),
    np.bool_(True),
    np.array([0.5, 0.1]),
    np.array(0.3),
    np.array(["m1"]),
    float("nan"),
    float("inf"),
    -0.0,
    1e308,
    2**64,
    Fraction(1, 3),
    Decimal("0.5"),
    complex(0.5, 0),
    "lazy",
    "mistakes",
    " Lazy ",
    "Memorized-Mistakes",
    "m1",
    "m0",
    "0.1",
    "",
    b"m1",
    lambda *a: None,
    print,
    TopFraction(0.1),
    Threshold(0.0),
    TopUnits(0.5),
    FixedSubnetwork(2),
    Lazy(),
    Margin(0.9),
    MemorizedMistakes(),
    Plasticity(),
    [TopFraction(0.1), Threshold(1e-3)],
    (TopFraction(0.5),),
    [TopFraction(0.1), 0.5],
    [],
    (),
    {},
    set(),
    frozenset({1}),
    ["net.0", "net.2"],
    ("net.0",),
    [1],
    [["a", "b"], ["b", "c", 4]],
    [("a", "b", 0)],
    [["a", "b", True]],
    [["a"]],
    ["ab"],
    {"class": "TopFraction", "p": 0.1},
]

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0.0, max_value=2.0),
    st.text(max_size=6),
    st.binary(max_size=3),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.sets(st.integers(), max_size=2),
    st.tuples(st.text(max_size=2), st.text(max_size=2)),
    st.sampled_from(ODD),
)


def is_bool(v: Any) -> bool:
    return isinstance(v, (bool, np.bool_))


def is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not is_bool(v)


def is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not is_bool(v)


def fraction(v: Any) -> bool:
    return is_real(v) and 0 < float(v) <= 1


def nonneg(v: Any) -> bool:
    return is_real(v) and math.isfinite(float(v)) and float(v) >= 0


def positive(v: Any) -> bool:
    return is_real(v) and math.isfinite(float(v)) and float(v) > 0


def count(v: Any) -> bool:
    return is_int(v) and int(v) >= 1


def seed(v: Any) -> bool:
    return is_int(v) and int(v) >= 0


def optional(pred: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or pred(v)


def names(v: Any) -> bool:
    return (
        v is None
        or isinstance(v, str)
        or (isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(n, str) for n in v))
    )


def edge(e: Any) -> bool:
    return (
        isinstance(e, Sequence)
        and not isinstance(e, str)
        and len(e) in (2, 3)
        and all(isinstance(n, str) for n in e[:2])
        and (len(e) == 2 or (isinstance(e[2], int) and not is_bool(e[2]) and e[2] >= 1))
    )


def adjacency(v: Any) -> bool:
    if v is None:
        return True
    return isinstance(v, Sequence) and not isinstance(v, str) and all(edge(e) for e in v)


def synapses(v: Any) -> bool:
    if v is None or isinstance(v, SynapseRule):
        return True
    if isinstance(v, (list, tuple)):
        return all(isinstance(r, SynapseRule) for r in v)
    return fraction(v)


def units(v: Any) -> bool:
    return v is None or isinstance(v, UnitRule) or fraction(v)


def samples(v: Any) -> bool:
    if v is None or isinstance(v, SampleGate):
        return True
    key = v.strip().lower().replace("-", "_") if isinstance(v, str) else None
    return key in ("lazy", "mistakes", "memorized_mistakes")


def callable_or_none(v: Any) -> bool:
    return v is None or callable(v)


@dataclass(frozen=True)
class Field:
    """One argument: whether a value is valid, and the words its error must name."""

    valid: Callable[[Any], bool]
    label: str
    extra: tuple[Any, ...] = ()  # more values worth drawing for this field


@dataclass(frozen=True)
class Case:
    """A constructor and its fields; ``cross`` names the fields whose combination is bad."""

    build: Callable[..., Any]
    fields: dict[str, Field]
    cross: Callable[[dict[str, Any]], list[str]] = lambda kw: []
    required: tuple[str, ...] = ()


def _flags(owner: str, *names_: str) -> dict[str, Field]:
    return {n: Field(is_bool, f"{owner}.{n}", (True, False)) for n in names_}


def _true(kw: dict[str, Any], name: str, default: bool) -> bool:
    v = kw.get(name, default)
    return is_bool(v) and bool(v)


def _top_fraction_cross(kw: dict[str, Any]) -> list[str]:
    per_unit, equal = _true(kw, "per_unit", False), _true(kw, "equal_count", False)
    bad = ["per_unit"] if per_unit and equal else []
    if _true(kw, "approximate", False) and (per_unit or not _true(kw, "largest", True)):
        bad.append("approximate")
    return bad


def _units_cross(kw: dict[str, Any]) -> list[str]:
    return ["exactly one of q"] if (kw.get("q") is None) == (kw.get("k") is None) else []


def _shorthand_cross(kw: dict[str, Any]) -> list[str]:
    if kw.get("plasticity") is None:
        return []
    given = any(
        kw.get(n) is not None for n in ("synapses", "units", "samples", "caching", "cost")
    )
    alpha = kw.get("alpha", 1.0)
    return ["not both"] if given or (positive(alpha) and float(alpha) != 1.0) else []


def _legacy_cost_cross(kw: dict[str, Any]) -> list[str]:
    """``cost=`` and the deprecated ``joules_per_unit=``/``cost_basis=`` together are refused."""
    basis = kw.get("cost_basis", "m1")
    legacy = kw.get("joules_per_unit") is not None or not (isinstance(basis, str) and basis == "m1")
    return ["not both"] if legacy and kw.get("cost") is not None else []


def caching(v: Any) -> bool:
    return v is None or isinstance(v, Caching)


def tau(v: Any) -> bool:
    return is_real(v) and not math.isnan(float(v)) and float(v) >= 1


def per(v: Any) -> bool:
    return isinstance(v, str) and v in ("unit", "update")


def label(v: Any) -> bool:
    return isinstance(v, str) and len(v) > 0


def cost(v: Any) -> bool:
    if v is None or isinstance(v, Cost):
        return True
    if isinstance(v, str):
        return v.strip().lower() in PRESETS
    if isinstance(v, Mapping):
        keys = set(v) - {"class"}
        return (
            "joules" in keys
            and keys <= {"joules", "per", "name"}
            and nonneg(v["joules"])
            and per(v.get("per", "update"))
            and label(v.get("name", "custom"))
        )
    return False


CORE_SHORTHANDS = {
    "caching": Field(caching, "caching", (None, Caching(0.01, math.inf, 0.0))),
    "cost": Field(
        cost, "cost", (None, "dram", "SRAM", {"joules": 1e-12, "per": "unit"}, {"per": "update"}, 5)
    ),
    "synapses": Field(synapses, "synapses", (0.1, 1, TopFraction(0.2), [Threshold(0.0)])),
    "units": Field(units, "units", (0.5, TopUnits(k=2), RandomUnits(0.5))),
    "samples": Field(samples, "samples", ("lazy", "mistakes", Lazy(), None)),
    "alpha": Field(positive, "alpha", (1.0, 2, 0.5, 1e-9)),
}

CASES: dict[str, Case] = {
    "TopFraction": Case(
        TopFraction,
        {"p": Field(fraction, "TopFraction.p", (0.1, 1, 1.0))}
        | _flags("TopFraction", "per_unit", "equal_count", "largest", "approximate"),
        _top_fraction_cross,
        required=("p",),
    ),
    "Threshold": Case(
        Threshold, {"theta": Field(nonneg, "Threshold.theta", (0, 1e-4))}, required=("theta",)
    ),
    "RandomSynapses": Case(
        RandomSynapses,
        {
            "p": Field(fraction, "RandomSynapses.p", (0.3,)),
            "seed": Field(seed, "RandomSynapses.seed", (0, 7, -1, 2**40)),
        },
        required=("p",),
    ),
    "TopUnits": Case(
        TopUnits,
        {
            "q": Field(optional(fraction), "TopUnits.q", (0.5, None)),
            "k": Field(optional(count), "TopUnits.k", (3, None, 0)),
        }
        | _flags("TopUnits", "path", "largest"),
        _units_cross,
    ),
    "RandomUnits": Case(
        RandomUnits,
        {
            "q": Field(optional(fraction), "RandomUnits.q", (0.5, None)),
            "k": Field(optional(count), "RandomUnits.k", (3, None)),
            "seed": Field(seed, "RandomUnits.seed", (0, 5, -3)),
        }
        | _flags("RandomUnits", "path"),
        _units_cross,
    ),
    "FixedSubnetwork": Case(
        FixedSubnetwork,
        {
            "k": Field(count, "FixedSubnetwork.k", (1, 4)),
            "seed": Field(seed, "FixedSubnetwork.seed", (0, 2, -1)),
        },
        required=("k",),
    ),
    "Margin": Case(
        Margin,
        {"threshold": Field(fraction, "Margin.threshold", (0.9, 1))}
        | _flags("Margin", "from_logits"),
        required=("threshold",),
    ),
    "MemorizedMistakes": Case(
        MemorizedMistakes,
        {
            "base": Field(
                lambda v: (
                    v is None
                    or (isinstance(v, SampleGate) and not isinstance(v, MemorizedMistakes))
                ),
                "MemorizedMistakes.base",
                (Lazy(), Margin(0.5), None, MemorizedMistakes()),
            ),
            "capacity": Field(optional(count), "MemorizedMistakes.capacity", (None, 100, 0)),
        },
    ),
    "Caching": Case(
        Caching,
        {
            "theta": Field(positive, "Caching.theta", (0.01, 1)),
            "tau": Field(tau, "Caching.tau", (math.inf, 1, 100.0, 0.5)),
            "maintenance_cost": Field(nonneg, "Caching.maintenance_cost", (0, 1e-3)),
            "scope": Field(
                lambda v: isinstance(v, str) and v in ("synapse", "layer_max", "layer_sum"),
                "Caching.scope",
                ("synapse", "layer_max", "layer_sum"),
            ),
        },
        required=("theta", "tau", "maintenance_cost"),
    ),
    "Cost": Case(
        Cost,
        {
            "joules": Field(nonneg, "Cost.joules", (0, 1e-12)),
            "per": Field(per, "Cost.per", ("unit", "update")),
            "name": Field(label, "Cost.name", ("custom", "")),
        },
        required=("joules",),
    ),
    "Plasticity": Case(
        Plasticity,
        CORE_SHORTHANDS
        | {
            "joules_per_unit": Field(optional(nonneg), "joules_per_unit", (None, 1e-12, 0)),
            "cost_basis": Field(
                lambda v: isinstance(v, str) and v in ("m1", "m0"), "cost_basis", ("m1", "m0")
            ),
        },
        _legacy_cost_cross,
    ),
}


def callback_fields(owner: str) -> dict[str, Field]:
    """The fields both framework callbacks share."""
    return {
        "plasticity": Field(
            lambda v: v is None or isinstance(v, Plasticity), f"{owner}.plasticity", (Plasticity(),)
        ),
        **CORE_SHORTHANDS,
        "layers": Field(names, f"{owner}.layers", (None, "net.0", ["net.0"], [], [1])),
        "per_layer": Field(is_bool, f"{owner}.per_layer", (True, False)),
    }


def draw_kwargs(draw: Any, case: Case) -> dict[str, Any]:
    """Some of the case's fields (its required ones always), each any value."""
    kwargs = {}
    for name, field in case.fields.items():
        if name in case.required or draw(st.booleans()):
            values = st.sampled_from(field.extra) if field.extra else st.nothing()
            kwargs[name] = draw(st.one_of(values, JUNK) if field.extra else JUNK)
    return kwargs


def check(case: Case, kwargs: dict[str, Any]) -> str:
    """Build ``case`` from ``kwargs``; assert it fails exactly when a field is bad, and
    then with ValueError/TypeError naming a bad one. Returns "ok" or the error."""
    bad = [case.fields[n].label for n, v in kwargs.items() if not case.fields[n].valid(v)]
    bad += case.cross(kwargs)
    positional = [kwargs.pop(n) for n in case.required]
    try:
        case.build(*positional, **kwargs)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        assert bad, f"valid arguments {positional} {kwargs} were refused: {message}"
        assert any(label in message for label in bad), f"{message!r} names none of {bad}"
        return message
    assert not bad, f"{bad} accepted: {positional} {kwargs}"
    return "ok"
