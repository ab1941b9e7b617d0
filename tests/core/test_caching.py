"""Synaptic caching in the core: the order within a step, scopes, energy, state."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from energy_callbacks import Caching, Plasticity, TensorSpec, Topology
from energy_callbacks.core.config import from_config, to_config
from energy_callbacks.reference import PaperMLP, train

W = [TensorSpec("w", (3,))]


def run(caching, updates, weights=None):
    rule = Plasticity(caching=caching).setup(W)
    steps = [rule.step([np.array(u, dtype=np.float64)], weights) for u in updates]
    return rule, steps


def test_one_step_adds_then_consolidates_then_charges_then_decays():
    caching = Caching(theta=1.0, tau=4.0, maintenance_cost=0.5)
    w = [np.zeros(3)]
    rule, steps = run(caching, [[0.4, -1.2, 0.0]], w)
    # -1.2 reaches theta on arrival: consolidated in full, before any decay
    r = rule.report()
    assert r.consolidation == pytest.approx(1.2) and r.consolidations == 1
    # 0.4 stays transient: maintenance on it, then it decays by 1/tau
    assert r.maintenance == pytest.approx(0.5 * 0.4)
    np.testing.assert_allclose(steps[0].decay[0], [-0.1, 0.0, 0.0])
    np.testing.assert_allclose(w[0], [0.3, -1.2, 0.0])  # w_c + w_e, decay written in
    assert r.transient == pytest.approx(0.3)
    assert r.m1 == pytest.approx(1.6) and r.m0 == 2  # the updates themselves
    assert r.energy == pytest.approx(1.2 + 0.2) and r.updates == 1


def test_transient_changes_that_decay_are_lost_and_cost_nothing():
    caching = Caching(theta=10.0, tau=1.0, maintenance_cost=0.0)  # tau = 1: gone next step
    w = [np.array([1.0, 2.0, 3.0])]
    rule, _ = run(caching, [[0.5, 0.5, 0.5], [0.25, 0.0, 0.0]], w)
    np.testing.assert_allclose(w[0], [1.0, 2.0, 3.0])  # back to the consolidated part
    rule.consolidate()
    r = rule.report()
    assert r.consolidation == 0.0 and r.energy == 0.0 and r.m1 == pytest.approx(1.75)
    assert r.m1_min == 0.0


def test_tau_inf_keeps_the_store_and_sums_updates_before_writing():
    caching = Caching(theta=1.0, tau=math.inf, maintenance_cost=0.1)
    rule, steps = run(caching, [[0.6, 0.3, 0.0], [0.6, -0.3, 0.0], [0.2, 0.0, 0.0]])
    assert all(s.decay == [None] for s in steps)
    r = rule.report()
    assert r.consolidation == pytest.approx(1.2) and r.consolidations == 1
    assert r.maintenance == pytest.approx(0.1 * (0.9 + 0.0 + 0.2))
    rule.consolidate()
    r = rule.report()
    assert r.consolidation == pytest.approx(1.4) and r.consolidations == 2
    assert r.transient == 0.0
    assert r.m1_min == pytest.approx(1.4)
    assert r.inefficiency == pytest.approx((1.4 + 0.11) / 1.4)


@pytest.mark.parametrize(
    ("scope", "theta", "writes"),
    [
        ("synapse", 0.5, 1),  # only the 0.5 entry
        ("layer_max", 0.5, 3),  # the max reaches theta: the whole tensor
        ("layer_max", 0.6, 0),
        ("layer_sum", 0.875, 3),  # 0.5 + 0.25 + 0.125
        ("layer_sum", 0.876, 0),
    ],
)
def test_scopes(scope, theta, writes):
    rule, _ = run(Caching(theta, math.inf, 0.0, scope=scope), [[0.5, -0.25, 0.125]])
    r = rule.report()
    assert r.consolidations == writes
    assert r.transient == pytest.approx(0.875 - r.consolidation)


def test_scope_is_per_tensor():
    rule = Plasticity(caching=Caching(0.5, math.inf, 0.0, scope="layer_max"))
    rule.setup(Topology.mlp([2, 2]))
    rule.step([np.array([[0.6, 0.0], [0.1, 0.1]]), np.array([0.2, 0.2])])
    r = rule.report()
    assert r.per_layer["layer0.weight"].consolidations == 3
    assert r.per_layer["layer0.bias"].consolidations == 0
    assert r.per_layer["layer0.bias"].transient == pytest.approx(0.4)
    m = r.metrics(per_layer=True)
    assert m["plasticity/energy/layer0.weight"] == pytest.approx(0.8)


updates = st.lists(
    st.lists(st.floats(-1, 1, allow_nan=False, width=32), min_size=3, max_size=3),
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(updates)
def test_a_tiny_threshold_consolidates_every_update(us):
    """theta below every nonzero |update|: the same weights and energy as no caching."""
    w_cached, w_plain = [np.ones(3)], [np.ones(3)]
    cached, _ = run(Caching(1e-300, 5.0, 0.7), us, w_cached)
    plain = Plasticity().setup(W)
    for u in us:
        plain.step([np.array(u, dtype=np.float64)], w_plain)
    np.testing.assert_array_equal(w_cached[0], w_plain[0])
    a, b = cached.report(), plain.report()
    assert a.energy == pytest.approx(b.energy, rel=1e-12, abs=1e-300)
    assert a.updates == b.updates and a.maintenance == 0.0 and a.transient == 0.0


@settings(max_examples=60, deadline=None)
@given(
    updates,
    st.floats(1e-3, 2.0),
    st.sampled_from([1.0, 3.0, math.inf]),
    st.sampled_from(["synapse", "layer_max", "layer_sum"]),
)
def test_consolidation_lies_between_the_limit_and_m1(us, theta, tau, scope):
    """After the end-of-fit consolidation: M1_min <= consolidation <= M1, and the
    effective weights moved by exactly what was consolidated."""
    w = [np.zeros(3)]
    rule, _ = run(Caching(theta, tau, 0.1, scope=scope), us, w)
    rule.consolidate()
    r = rule.report()
    assert r.m1_min <= r.consolidation * (1 + 1e-9) + 1e-12
    assert r.consolidation <= r.m1 * (1 + 1e-9) + 1e-12
    assert r.energy == pytest.approx(r.consolidation + r.maintenance)
    assert r.transient == 0.0
    if r.m1_min > 0:
        assert r.inefficiency >= 1 - 1e-9
    np.testing.assert_allclose(np.abs(w[0]).sum(), r.m1_min, rtol=1e-9, atol=1e-12)


def test_skipped_steps_leave_the_store_alone():
    rule, _ = run(Caching(1.0, 2.0, 0.1), [[0.4, 0.0, 0.0]])
    before = rule.state_dict()["caching"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        step = rule.step([np.array([np.nan, 0.0, 0.0])])
    assert step.skipped and step.decay is None
    after = rule.state_dict()["caching"]
    np.testing.assert_array_equal(before["store"][0], after["store"][0])
    assert before["maintenance"] == after["maintenance"]


def test_state_dict_carries_the_store_and_resumes_exactly():
    topo = Topology.mlp([5, 4, 3])

    def make():
        return Plasticity(synapses=0.5, caching=Caching(0.05, 20.0, 0.01)).setup(topo)

    def go(rule, weights, start, n):
        for t in range(start, start + n):
            r = np.random.default_rng(t)
            rule.step([r.normal(scale=0.02, size=s.shape) for s in topo.tensors], weights)

    init = [np.random.default_rng(99).normal(size=s.shape) for s in topo.tensors]
    w_straight = [x.copy() for x in init]
    straight = make()
    go(straight, w_straight, 0, 30)

    w = [x.copy() for x in init]
    first = make()
    go(first, w, 0, 12)
    state = json.loads(json.dumps(_lists(first.state_dict())))  # survives plain data
    resumed = make()
    resumed.load_state_dict(_arrays(state))
    go(resumed, w, 12, 18)
    assert resumed.report() == straight.report()
    for a, b in zip(w, w_straight):
        np.testing.assert_array_equal(a, b)
    assert straight.report().transient > 0  # the store really carried something


def test_figures_of_a_store_kept_elsewhere_report_as_the_store_itself():
    topo = Topology.mlp([5, 4, 3])
    rule = Plasticity(caching=Caching(0.05, 20.0, 0.01)).setup(topo)
    for t in range(6):
        r = np.random.default_rng(t)
        rule.step([r.normal(scale=0.02, size=s.shape) for s in topo.tensors])
    state = rule.caching.state_dict()
    held = [float(np.abs(s).sum()) for s in state["store"]]
    elsewhere = Plasticity(caching=Caching(0.05, 20.0, 0.01)).setup(topo)
    elsewhere.caching.load_figures(state, held)
    elsewhere.meter.load_state_dict(rule.meter.state_dict())
    assert elsewhere.report() == rule.report()
    assert elsewhere.report().transient > 0
    elsewhere.caching.load_state_dict(state)  # its own store again
    assert elsewhere.caching.held() == rule.caching.held()
    with pytest.raises(ValueError, match="load_figures"):
        elsewhere.caching.load_figures(state, held[:1])


def test_state_must_match_the_rules():
    with_cache = Plasticity(caching=Caching(1.0, 2.0, 0.0)).setup(W)
    without = Plasticity().setup(W)
    with pytest.raises(ValueError, match="without synaptic caching"):
        with_cache.load_state_dict(without.state_dict())
    with pytest.raises(ValueError, match="with synaptic caching"):
        without.load_state_dict(with_cache.state_dict())


def test_caching_and_consolidate_need_caching():
    rule = Plasticity().setup(W)
    with pytest.raises(RuntimeError, match="no synaptic caching"):
        rule.consolidate()
    with pytest.raises(RuntimeError, match="caching=Caching"):
        rule.cache([np.zeros(3)])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(theta=0.0, tau=1.0, maintenance_cost=0.0), "Caching.theta"),
        (dict(theta=-1.0, tau=1.0, maintenance_cost=0.0), "Caching.theta"),
        (dict(theta=math.inf, tau=1.0, maintenance_cost=0.0), "Caching.theta"),
        (dict(theta=math.nan, tau=1.0, maintenance_cost=0.0), "Caching.theta"),
        (dict(theta=True, tau=1.0, maintenance_cost=0.0), "Caching.theta"),
        (dict(theta=1.0, tau=0.5, maintenance_cost=0.0), "Caching.tau"),
        (dict(theta=1.0, tau=math.nan, maintenance_cost=0.0), "Caching.tau"),
        (dict(theta=1.0, tau=2.0, maintenance_cost=-0.1), "Caching.maintenance_cost"),
        (dict(theta=1.0, tau=2.0, maintenance_cost=math.inf), "Caching.maintenance_cost"),
        (dict(theta=1.0, tau=2.0, maintenance_cost=0.0, scope="unit"), "Caching.scope"),
    ],
)
def test_bad_caching_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        Caching(**kwargs)


def test_plasticity_refuses_a_caching_of_the_wrong_type():
    with pytest.raises(TypeError, match="caching must be a Caching"):
        Plasticity(caching=0.1)


def test_config_round_trip_and_json_with_inf():
    rule = Plasticity(caching=Caching(0.2, math.inf, 1e-4, scope="layer_max"), cost="dram")
    config = to_config(rule)
    assert config["caching"] == {
        "class": "Caching",
        "theta": 0.2,
        "tau": math.inf,
        "maintenance_cost": 1e-4,
        "scope": "layer_max",
    }
    again = from_config(json.loads(json.dumps(config)))
    assert repr(again) == repr(rule) and to_config(again) == config


def test_metrics_keys_with_caching():
    rule, _ = run(Caching(1.0, 2.0, 0.5), [[0.4, -1.2, 0.0]])
    m = rule.report().metrics()
    assert m["plasticity/energy"] == pytest.approx(
        m["plasticity/energy_consolidation"] + m["plasticity/energy_maintenance"]
    )
    assert m["plasticity/energy_uncached"] == pytest.approx(1.6)
    assert m["plasticity/updates"] == 1.0 and m["plasticity/updates_uncached"] == 2.0
    assert m["plasticity/transient"] == pytest.approx(0.2)
    assert rule.totals() == (pytest.approx(1.2 + 0.2), 1)
    assert "plasticity/energy_consolidation" not in Plasticity().setup(W).report().metrics()
    assert "caching: energy" in str(rule.report())


def test_the_reference_experiment_consolidates_at_the_end():
    """Without decay the network learns exactly as backprop does; only the energy differs."""
    from energy_callbacks.data import load_digits, paper_inputs

    ds = load_digits()
    x, mean = paper_inputs(ds.train.images)
    xt, _ = paper_inputs(ds.test.images, mean)
    args = (x, ds.train.labels, xt, ds.test.labels)
    kw = dict(max_samples=1000, eval_every=500)
    plain = train(PaperMLP(64, 20, seed=0), Plasticity(), *args, **kw)
    model = PaperMLP(64, 20, seed=0)
    cached = train(model, Plasticity(caching=Caching(0.01, math.inf, 1e-4)), *args, **kw)
    assert cached.history == plain.history
    r = cached.report
    assert r.transient == 0.0 and 0 < r.consolidation < r.m1 == plain.report.m1
    assert r.m1_min == pytest.approx(plain.report.m1_min, rel=1e-9)
    assert r.m1_min <= r.consolidation * (1 + 1e-6)
    assert r.energy < r.m1 / 2  # caching saves energy here


def _lists(state):
    if isinstance(state, np.ndarray):
        return {"__array__": state.tolist(), "dtype": str(state.dtype)}
    if isinstance(state, dict):
        return {k: _lists(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_lists(v) for v in state]
    return state


def _arrays(state):
    if isinstance(state, dict) and "__array__" in state:
        return np.array(state["__array__"], dtype=state["dtype"])
    if isinstance(state, dict):
        return {k: _arrays(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_arrays(v) for v in state]
    return state


@pytest.mark.parametrize("tau", [math.inf, 3.0])
def test_the_synapse_scope_steps_a_block_at_a_time_as_on_the_whole_tensor(monkeypatch, tau):
    """The synapse scope updates its store in place in blocks of ``BLOCK`` entries; with
    7-entry blocks (crossing rows and ragged at the end) the store, the decay and the
    figures are those of one whole-tensor step."""
    from energy_callbacks.core import caching as module

    rng = np.random.default_rng(3)
    specs = [TensorSpec("w", (5, 9)), TensorSpec("b", (5,)), TensorSpec("s", (), unit_axis=None)]
    steps = [[rng.normal(0, 0.01, s.shape) for s in specs] for _ in range(6)]

    def run_with(block):
        monkeypatch.setattr(module, "BLOCK", block)
        rule = Caching(0.02, tau, 0.1)
        rule.setup(specs)
        decays = [rule.step([u.copy() for u in us]) for us in steps]
        return rule, decays

    whole, whole_decays = run_with(1 << 20)
    blocked, blocked_decays = run_with(7)
    for a, b in zip(whole.state_dict()["store"], blocked.state_dict()["store"]):
        np.testing.assert_array_equal(a, b)
    for da, db in zip(whole_decays, blocked_decays):
        for a, b in zip(da, db):
            assert (a is None) == (b is None) == math.isinf(tau)
            if a is not None:
                np.testing.assert_array_equal(a, b)
    assert blocked.totals()[1] == whole.totals()[1] > 0
    assert blocked.totals()[0] == pytest.approx(whole.totals()[0], rel=1e-12)


def test_a_resumed_float32_store_widens_to_float64_updates():
    """An empty store is saved as float32 zeros; resumed under float64 updates it
    steps in float64, as a store that was never saved does."""
    spec = [TensorSpec("w", (3, 4))]
    fresh, resumed = Caching(1.0, math.inf, 0.1), Caching(1.0, math.inf, 0.1)
    fresh.setup(spec)
    resumed.setup(spec)
    resumed.load_state_dict(fresh.state_dict())
    u = np.full((3, 4), 0.1 + 1e-12)
    fresh.step([u])
    resumed.step([u])
    assert resumed.state_dict()["store"][0].dtype == np.float64
    np.testing.assert_array_equal(resumed.state_dict()["store"][0], fresh.state_dict()["store"][0])
