"""The plasticity rules the experiments compare, by name.

Each entry builds a fresh :class:`~energy_callbacks.Plasticity` for a hidden
size ``n`` and a seed. Unit rules select ``k = min(100, n // 10)`` units: 10%
of the units up to ``N = 1000`` (the issue's fidelity table), then the same 100
plastic units at every larger size, as the papers found plasticity to
concentrate in roughly 60-100 units.

The combined rule (SCIENCE.md 2b, "unit/path restriction, then top fraction of
|dw| within each layer") keeps, per layer, 10% of the selected units' incoming
synapses: ``TopFraction(p, equal_count=True)`` with ``p = 0.1 * k / N``, since a
whole-tensor fraction counts the unselected units' zeros. With equal count the
output layer keeps as many entries as the hidden layer, which is all of its
path synapses (the paper's ``p_out = min(78.4 p, 1)``). Ranking within each
unit (``per_unit=True``) selects almost the same synapses but cost 8 ms a step
against about 4 ms here.

``combined-20`` and ``combined-30`` keep 20% and 30% of the selected units'
synapses instead (``p = 0.2 k / N``, ``0.3 k / N``): the 10% rule stalled
below 85% at N = 1000 (docs/results.md). At N = 1000 a step then changes
``fraction * 78 400`` hidden weights, the 100 units' biases and the 1010 output
path synapses: 8 950, 16 790 and 24 630 updates.

``combined-nopath`` is the 10% rule with the unit rule but without the path: the
output layer stays plastic for every hidden unit, and equal count keeps as many
of its entries as of the hidden layer (7 840 of 10 000 at N = 1000, 15 790
updates a step in all). The path rule alone stalls at N = 1000
(docs/results.md), and this variant tells the path apart from the synapse rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..core import (
    FixedSubnetwork,
    Plasticity,
    RandomSynapses,
    RandomUnits,
    TopFraction,
    TopUnits,
)

UNITS_K = 100


def units_k(n_hidden: int) -> int:
    """The number of plastic hidden units of the unit rules: ``min(100, N // 10)``, >= 1."""
    return max(1, min(UNITS_K, n_hidden // 10))


@dataclass(frozen=True)
class Rule:
    """A named rule: ``label`` for tables, ``build(n_hidden, seed)`` for a fresh Plasticity."""

    name: str
    label: str
    build: Callable[[int, int], Plasticity]


def _combined(
    samples: str | None, fraction: float = 0.1, path: bool = True
) -> Callable[[int, int], Plasticity]:
    def build(n: int, seed: int) -> Plasticity:
        return Plasticity(
            units=TopUnits(k=units_k(n), path=path),
            synapses=TopFraction(fraction * units_k(n) / n, equal_count=True),
            samples=samples,
        )

    return build


RULES: dict[str, Rule] = {
    r.name: r
    for r in [
        Rule("backprop", "backprop", lambda n, s: Plasticity()),
        Rule("top-fraction", "top 10% |dw| per layer", lambda n, s: Plasticity(synapses=0.1)),
        Rule(
            "equal-count",
            "top 5% |dw| per layer, equal count",
            lambda n, s: Plasticity(synapses=TopFraction(0.05, equal_count=True)),
        ),
        Rule(
            "top-units",
            "top 10% (<= 100) hidden units by error, incoming synapses",
            lambda n, s: Plasticity(units=TopUnits(k=units_k(n))),
        ),
        Rule(
            "top-units-path",
            "top 10% (<= 100) hidden units by error, path",
            lambda n, s: Plasticity(units=TopUnits(k=units_k(n), path=True)),
        ),
        Rule(
            "fixed",
            "fixed subnetwork, k = 10% (<= 100)",
            lambda n, s: Plasticity(units=FixedSubnetwork(units_k(n), seed=s)),
        ),
        Rule(
            "combined",
            "top 10% (<= 100) units, path, + top 10% of their |dw|, equal count",
            _combined(None),
        ),
        Rule(
            "combined-20",
            "top 10% (<= 100) units, path, + top 20% of their |dw|, equal count",
            _combined(None, 0.2),
        ),
        Rule(
            "combined-30",
            "top 10% (<= 100) units, path, + top 30% of their |dw|, equal count",
            _combined(None, 0.3),
        ),
        Rule(
            "combined-nopath",
            "top 10% (<= 100) units, no path, + top 10% of their |dw|, equal count",
            _combined(None, 0.1, path=False),
        ),
        Rule(
            "random-units",
            "control: 10% (<= 100) random units, path, redrawn every step",
            lambda n, s: Plasticity(units=RandomUnits(k=units_k(n), seed=s, path=True)),
        ),
        Rule(
            "random-synapses",
            "control: fixed random 5% of synapses",
            lambda n, s: Plasticity(synapses=RandomSynapses(0.05, seed=s)),
        ),
        Rule(
            "smallest",
            "control: smallest 5% |dw| per layer, equal count",
            lambda n, s: Plasticity(synapses=TopFraction(0.05, equal_count=True, largest=False)),
        ),
        Rule("lazy", "lazy (learn on mistakes)", lambda n, s: Plasticity(samples="lazy")),
        Rule(
            "mistakes",
            "memorized mistakes",
            lambda n, s: Plasticity(samples="mistakes"),
        ),
        Rule("combined+lazy", "combined + lazy", _combined("lazy")),
        Rule("combined+mistakes", "combined + memorized mistakes", _combined("mistakes")),
    ]
}


def get_rule(name: str) -> Rule:
    """The rule called ``name``; a ValueError lists the known names."""
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown rule {name!r}; choose from {', '.join(RULES)}") from None
