"""Configuration: shorthands, errors that name the field, state that is plain data."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from energy_callbacks import (
    Cost,
    FixedSubnetwork,
    Lazy,
    Margin,
    MemorizedMistakes,
    Plasticity,
    RandomSynapses,
    RandomUnits,
    TensorSpec,
    Threshold,
    TopFraction,
    Topology,
    TopUnits,
)


def test_core_imports_no_framework():
    code = (
        "import sys, energy_callbacks, energy_callbacks.core, energy_callbacks.reference\n"
        "names = ('torch', 'keras', 'tensorflow', 'jax', 'lightning')\n"
        "bad = [m for m in names if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_shorthands():
    p = Plasticity(synapses=0.1, units=0.5, samples="lazy")
    assert isinstance(p.synapses[0], TopFraction) and p.synapses[0].p == 0.1
    assert isinstance(p.units, TopUnits) and p.units.q == 0.5 and not p.units.path
    assert isinstance(p.samples, Lazy)
    assert isinstance(Plasticity(samples="mistakes").samples, MemorizedMistakes)
    assert isinstance(Plasticity(samples="Memorized-Mistakes").samples, MemorizedMistakes)
    assert Plasticity(units=1).units.q == 1.0
    rules = Plasticity(synapses=[Threshold(0.1), TopFraction(0.5)]).synapses
    assert [type(r) for r in rules] == [Threshold, TopFraction]
    assert not Plasticity().restricts and Plasticity(synapses=0.2).restricts


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: TopFraction(0), "TopFraction.p"),
        (lambda: TopFraction(1.5), "TopFraction.p"),
        (lambda: TopFraction(math.nan), "TopFraction.p"),
        (lambda: TopFraction(0.1, per_unit=True, equal_count=True), "per_unit"),
        (lambda: RandomSynapses(-0.1), "RandomSynapses.p"),
        (lambda: TopUnits(0), "TopUnits.q"),
        (lambda: TopUnits(k=0), "TopUnits.k"),
        (lambda: TopUnits(k=2.5), "TopUnits.k"),
        (lambda: TopUnits(), "exactly one of q"),
        (lambda: TopUnits(0.1, k=3), "exactly one of q"),
        (lambda: RandomUnits(q=2.0), "RandomUnits.q"),
        (lambda: FixedSubnetwork(0), "FixedSubnetwork.k"),
        (lambda: Threshold(math.inf), "Threshold.theta"),
        (lambda: Threshold(math.nan), "Threshold.theta"),
        (lambda: Threshold(-1.0), "Threshold.theta"),
        (lambda: Margin(0.0), "Margin.threshold"),
        (lambda: Margin(1.5), "Margin.threshold"),
        (lambda: MemorizedMistakes(MemorizedMistakes()), "MemorizedMistakes.base"),
        (lambda: Plasticity(alpha=0), "alpha"),
        (lambda: Plasticity(alpha=-1.0), "alpha"),
        (lambda: Plasticity(alpha=math.inf), "alpha"),
        (lambda: Plasticity(samples="sometimes"), "samples must be one of"),
        (lambda: Plasticity(synapses="big"), "synapses must be"),
        (lambda: Plasticity(synapses=2.0), "TopFraction.p"),
        (lambda: Plasticity(units=100), "TopUnits.q"),
        (lambda: Plasticity(units="half"), "units must be"),
        (lambda: Plasticity(cost={"joules": -1.0}), "Cost.joules"),
        (lambda: Plasticity(cost={"joules": 1.0, "per": "bit"}), "Cost.per"),
        (lambda: Plasticity(cost="flash"), "unknown preset 'flash'"),
    ],
)
def test_bad_configuration_names_the_field(make, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        make()


def test_topology_errors_say_what_to_change():
    with pytest.raises(ValueError, match="unit_axis=2 is out of range"):
        TensorSpec("w", (3, 4), unit_axis=2)
    with pytest.raises(ValueError, match="exactly one kernel"):
        Topology([TensorSpec("b", (3,), 0, None, "fc")])
    with pytest.raises(ValueError, match="has 4 units on its unit axis"):
        Topology([TensorSpec("w", (3, 5), 0, 1, "fc"), TensorSpec("b", (4,), 0, None, "fc")])
    with pytest.raises(ValueError, match="unique"):
        Topology([TensorSpec("w", (3,)), TensorSpec("w", (3,))])
    with pytest.raises(ValueError, match="unknown layer 'nope'"):
        Topology(Topology.mlp([4, 3, 2]).tensors, adjacency=[("layer0", "nope")])
    # conv (8 channels) -> flatten -> dense (8*4*4 inputs): the path rule cannot link them.
    conv_dense = [
        TensorSpec("conv.weight", (8, 1, 3, 3), 0, 1, "conv"),
        TensorSpec("fc.weight", (10, 128), 0, 1, "fc"),
    ]
    Plasticity(units=TopUnits(0.5)).setup(conv_dense)  # without a path: fine
    with pytest.raises(ValueError, match="adjacency= without that edge"):
        Plasticity(units=TopUnits(0.5, path=True)).setup(conv_dense)
    rule = Plasticity(units=TopUnits(0.5, path=True)).setup(conv_dense, adjacency=[])
    assert rule.topology.hidden == ()  # no edge: no hidden layer, every unit plastic


def test_use_before_setup_is_an_error():
    with pytest.raises(RuntimeError, match=r"setup\(tensors\)"):
        Plasticity().step([np.zeros(3)])


def test_memorized_mistakes_needs_ids():
    rule = Plasticity(samples="mistakes").setup(Topology.mlp([2, 2]))
    with pytest.raises(ValueError, match="sample ids"):
        rule.gate(np.eye(2), np.array([1, 0]))


def _plain(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    return isinstance(value, int | float | str | bool | np.ndarray) and (
        not isinstance(value, np.ndarray) or value.dtype != object
    )


def test_state_dict_is_plain_data_and_resumes_exactly():
    topo = Topology.mlp([6, 5, 4, 3])

    def run(rule, steps, start=0):
        for t in range(start, start + steps):
            r = np.random.default_rng(t)
            out, y, ids = r.normal(size=(4, 3)), r.integers(0, 3, 4), r.integers(0, 50, 4)
            if rule.gate(out, y, ids).any:
                rule.step([r.normal(size=s.shape) for s in topo.tensors])
        return rule

    def make():
        return Plasticity(
            units=RandomUnits(0.5, path=True), synapses=0.3, samples="mistakes", alpha=1.5
        ).setup(topo)

    straight = run(make(), 20)
    first = run(make(), 10)
    state = first.state_dict()
    assert _plain(state)
    resumed = make()
    resumed.load_state_dict(state)
    run(resumed, 10, start=10)
    assert resumed.report() == straight.report()
    assert resumed.samples.memory.state_dict()["size"] == straight.samples.memory.size
    np.testing.assert_array_equal(
        resumed.samples.memory.flagged(), straight.samples.memory.flagged()
    )


def test_state_dict_rejects_another_network():
    rule = Plasticity().setup(Topology.mlp([4, 3, 2]))
    rule.step([np.ones((3, 4)), np.ones(3), np.ones((2, 3)), np.ones(2)])
    state = rule.state_dict()
    with pytest.raises(ValueError, match="do not match"):  # saved tensors it does not measure
        Plasticity().setup(Topology.mlp([4, 3])).load_state_dict(state)
    with pytest.raises(ValueError, match="shape"):
        Plasticity().setup(Topology.mlp([4, 3, 5])).load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        Plasticity().setup(Topology.mlp([4, 3, 2])).load_state_dict({**state, "version": 99})


def test_state_dict_of_fewer_tensors_loads_into_a_grown_network():
    """Tensors that joined training after the checkpoint start at zero; the rest resume."""
    small = Plasticity().setup(Topology.mlp([4, 3]))
    small.step([np.full((3, 4), 0.5), np.ones(3)])
    grown = Plasticity().setup(Topology.mlp([4, 3, 2]))
    grown.load_state_dict(small.state_dict())
    report = grown.report()
    assert report.m1 == small.report().m1 == 9.0
    assert report.per_layer["layer1.weight"].m1 == 0.0 and report.steps == 1


def test_report_metrics_and_cost():
    rule = Plasticity(alpha=2.0, cost=Cost(1e-3, per="update")).setup(Topology.mlp([2, 2]))
    rule.gate(np.eye(2), np.array([0, 0]))
    rule.step([np.array([[0.5, 0.0], [0.0, -0.25]]), np.array([0.0, 0.0])])
    rule.step([np.array([[-0.5, 0.0], [0.0, 0.0]]), None])
    report = rule.report()
    assert report.m1 == 1.25 and report.m0 == 3 and report.m_alpha == 0.5625
    assert report.m1_min == 0.25 and report.m0_min == 1 and report.inefficiency == 5.0
    assert report.joules == pytest.approx(3e-3)
    m = report.metrics(per_layer=True)
    assert m["plasticity/energy"] == 1.25 and m["plasticity/updates"] == 3.0
    assert m["plasticity/samples_learned"] == 1.0
    assert m["plasticity/energy_alpha"] == 0.5625
    assert m["plasticity/energy/layer0.weight"] == 1.25
    with pytest.raises(AttributeError):
        report.m1 = 0.0  # immutable
    with pytest.raises(TypeError):
        report.per_layer["layer0.weight"] = None


def test_inefficiency_edge_cases():
    rule = Plasticity().setup([TensorSpec("w", (2,))])
    assert math.isnan(rule.report().inefficiency)  # nothing moved
    rule.step([np.array([1.0, 0.0])])
    rule.step([np.array([-1.0, 0.0])])
    assert rule.report().inefficiency == math.inf  # moved and came back
