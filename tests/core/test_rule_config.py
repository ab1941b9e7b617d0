"""Rules as plain data: to_config/from_config round-trips, and clear errors."""

import json
import math

import numpy as np
import pytest

from energy_callbacks.core import (
    Caching,
    Cost,
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
from energy_callbacks.core.config import from_config, rule_config, to_config
from energy_callbacks.core.synapses import SynapseRule

CASES = [
    Plasticity(),
    Plasticity(synapses=0.1, units=0.5, samples="lazy", alpha=2.0),
    Plasticity(
        synapses=[TopFraction(0.05, equal_count=True), Threshold(1e-4)],
        units=TopUnits(k=3, path=True, largest=False),
        samples=MemorizedMistakes(Margin(0.8, from_logits=False), capacity=1000),
        cost=Cost(2.5, per="update"),
    ),
    Plasticity(synapses=RandomSynapses(0.2, seed=3), units=FixedSubnetwork(4, seed=1)),
    Plasticity(synapses=TopFraction(0.1, per_unit=True), units=RandomUnits(0.3, seed=2)),
    Plasticity(synapses=TopFraction(0.1, approximate=True), samples=Lazy()),
    Plasticity(synapses=0.2, caching=Caching(0.01, 50.0, 1e-3, scope="layer_sum"), cost="sram"),
    Plasticity(caching=Caching(0.5, math.inf, 0.0), cost=Cost(1e-9, per="unit", name="mine")),
]


@pytest.mark.parametrize("plasticity", CASES, ids=repr)
def test_round_trip_is_json_and_equal(plasticity):
    config = to_config(plasticity)
    assert json.loads(json.dumps(config)) == config
    again = from_config(config)
    assert repr(again) == repr(plasticity)
    assert to_config(again) == config


def test_round_trip_rules_behave_the_same():
    from energy_callbacks.core import Topology

    rule = CASES[2]
    again = from_config(to_config(rule))
    topo = Topology.mlp([6, 5, 3])
    rng = np.random.default_rng(0)
    dw = [rng.standard_normal(t.shape) for t in topo.tensors]
    a = rule.setup(topo).masks(dw)
    b = again.setup(topo).masks(dw)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert again.samples.capacity == 1000


def test_custom_rule_and_unknown_class_are_refused():
    class Mine(SynapseRule):
        def masks(self, proposed, topology, ops=None, step=0):
            return [None] * len(proposed)

    with pytest.raises(ValueError, match="custom rule"):
        rule_config(Mine())
    with pytest.raises(ValueError, match="unknown rule class 'Nope'"):
        from_config({"synapses": [{"class": "Nope"}]})


def test_memorized_mistakes_capacity():
    with pytest.raises(ValueError, match="capacity must be an integer >= 1"):
        MemorizedMistakes(capacity=0)
    gate = MemorizedMistakes(capacity=4)
    out = np.array([[1.0, 0.0], [0.0, 1.0]])
    gate.gate(out, np.array([1, 1]), np.array([0, 3]))
    with pytest.raises(ValueError, match="sample id 4 is not below capacity=4"):
        gate.gate(out, np.array([1, 1]), np.array([0, 4]))
