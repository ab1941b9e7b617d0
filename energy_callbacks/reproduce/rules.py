"""The plasticity rules the experiments compare, by name.

Each entry builds a fresh :class:`~energy_callbacks.Plasticity` for a hidden
size ``n`` and a seed. Unit rules select ``k = min(100, n // 10)`` units: 10%
of the units up to ``N = 1000`` (the issue's fidelity table), then the same 100
plastic units at every larger size, as the papers found plasticity to
concentrate in roughly 60-100 units.

The combined rule is the authors' form (their reference code, frugal_24
runnet.py): a fixed path of ``k`` hidden units (``FixedSubnetwork(k)``: the
incoming and outgoing synapses of ``k`` units drawn once) plus the largest
updates over each whole layer, ``TopFraction(p, equal_count=True)`` with
``p = 0.1 * k / N`` (p < k/N, or the synapse rule keeps the whole path). At
N = 1000 that is the top 1% of the first layer: 785 of the 78 500 path synapses
of the hidden layer and as many of the 1010 output path synapses. Their code has
no competitive path: its "path" is always a fixed subnetwork.

``competitive*`` is this package's extension: the ``k`` units that change most
this step (``TopUnits(k, path=True)``), then the same synapse rule. It stalls
(docs/results.md): each unit's output weights learn only on the samples where
that unit ranks top, so the output layer sees a different, small slice of the
hidden code at every step. ``competitive-20`` and ``competitive-30`` keep 20%
and 30% of the selected units' synapses (``p = 0.2 k / N``, ``0.3 k / N``);
``competitive-nopath`` drops the path (the output layer stays plastic for every
hidden unit, and equal count keeps as many of its entries as of the hidden
layer), which tells the path apart from the synapse rule.
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


def _synapse_share(fraction: float, n: int) -> TopFraction:
    """``fraction`` of the path's synapses, as a whole-layer fraction with equal count."""
    return TopFraction(fraction * units_k(n) / n, equal_count=True)


def _combined(samples: str | None) -> Callable[[int, int], Plasticity]:
    """The authors' combined rule: a fixed path of k units, then the top 10% of its |dw|."""

    def build(n: int, seed: int) -> Plasticity:
        return Plasticity(
            units=FixedSubnetwork(units_k(n), seed=seed),
            synapses=_synapse_share(0.1, n),
            samples=samples,
        )

    return build


def _competitive(
    samples: str | None, fraction: float = 0.1, path: bool = True
) -> Callable[[int, int], Plasticity]:
    """Our extension: the k units that change most this step, then a share of their |dw|."""

    def build(n: int, seed: int) -> Plasticity:
        return Plasticity(
            units=TopUnits(k=units_k(n), path=path),
            synapses=_synapse_share(fraction, n),
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
            "fixed path, k = 10% (<= 100), + top 10% of its |dw|, equal count (authors')",
            _combined(None),
        ),
        Rule(
            "competitive",
            "ours: top 10% (<= 100) units, path, + top 10% of their |dw|, equal count",
            _competitive(None),
        ),
        Rule(
            "competitive-20",
            "ours: top 10% (<= 100) units, path, + top 20% of their |dw|, equal count",
            _competitive(None, 0.2),
        ),
        Rule(
            "competitive-30",
            "ours: top 10% (<= 100) units, path, + top 30% of their |dw|, equal count",
            _competitive(None, 0.3),
        ),
        Rule(
            "competitive-nopath",
            "ours: top 10% (<= 100) units, no path, + top 10% of their |dw|, equal count",
            _competitive(None, 0.1, path=False),
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
        Rule("combined+lazy", "combined (authors') + lazy", _combined("lazy")),
        Rule(
            "combined+mistakes", "combined (authors') + memorized mistakes", _combined("mistakes")
        ),
        Rule("competitive+lazy", "ours: competitive + lazy", _competitive("lazy")),
    ]
}


def get_rule(name: str) -> Rule:
    """The rule called ``name``; a ValueError lists the known names."""
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown rule {name!r}; choose from {', '.join(RULES)}") from None
