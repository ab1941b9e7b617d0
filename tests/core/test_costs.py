"""Cost models: joules per unit of |dw| or per update, presets, the old arguments."""

from __future__ import annotations

import math

import numpy as np
import pytest

from energy_callbacks import Caching, Cost, Plasticity, TensorSpec
from energy_callbacks.core import PRESETS
from energy_callbacks.core.config import from_config, to_config

W = [TensorSpec("w", (3,))]


def stepped(**kwargs):
    rule = Plasticity(**kwargs).setup(W)
    rule.step([np.array([0.5, -0.25, 0.0])])
    rule.step([np.array([0.25, 0.0, 0.0])])
    return rule.report()  # M1 = 1.0, M0 = 3


def test_per_unit_and_per_update():
    assert stepped(cost=Cost(2.0, per="unit")).joules == 2.0
    assert stepped(cost=Cost(2.0, per="update")).joules == 6.0
    assert stepped().joules is None
    assert "plasticity/joules" not in stepped().metrics()
    assert stepped(cost="sram").metrics()["plasticity/joules"] == pytest.approx(3 * 5e-12)


def test_presets_state_their_figures():
    assert PRESETS["biology"] == Cost(10e-3, per="update", name="biology")
    assert PRESETS["sram"] == Cost(5e-12, per="update", name="sram")
    assert PRESETS["dram"] == Cost(640e-12, per="update", name="dram")
    assert Cost.from_value(" DRAM ") is PRESETS["dram"]
    assert stepped(cost="biology").joules == pytest.approx(3 * 10e-3)


def test_with_caching_joules_follow_the_cached_energy_and_writes():
    caching = Caching(theta=10.0, tau=math.inf, maintenance_cost=0.1)
    unit = stepped(caching=caching, cost=Cost(1.0, per="unit"))
    assert unit.joules == pytest.approx(unit.energy) == pytest.approx(0.1 * (0.75 + 1.0))
    update = stepped(caching=Caching(0.3, math.inf, 0.0), cost=Cost(1.0, per="update"))
    assert update.joules == update.consolidations == 1  # 0.5 reaches theta; the rest waits


def test_user_figures_from_mappings_and_yaml_style_values():
    assert Cost.from_value({"joules": 1e-12, "per": "update"}) == Cost(1e-12)
    assert Cost.from_value({"class": "Cost", "joules": 3.0, "per": "unit", "name": "x"}) == Cost(
        3.0, per="unit", name="x"
    )
    assert Cost.from_value(None) is None


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (1e-12, TypeError, "does not say what it is per"),
        ([1.0], TypeError, "cost must be None, a Cost"),
        ("flash", ValueError, "unknown preset 'flash'"),
        ({"per": "unit"}, ValueError, "needs 'joules'"),
        ({"joules": 1.0, "watts": 2}, ValueError, "needs 'joules'"),
        ({"joules": math.nan}, ValueError, "Cost.joules"),
        ({"joules": 1.0, "per": "m1"}, ValueError, "Cost.per"),
        ({"joules": 1.0, "name": ""}, ValueError, "Cost.name"),
    ],
)
def test_bad_costs_name_the_field(value, error, match):
    with pytest.raises(error, match=match):
        Plasticity(cost=value)


def test_the_old_arguments_still_work_with_a_warning():
    with pytest.warns(DeprecationWarning, match="cost=Cost"):
        rule = Plasticity(joules_per_unit=2.0, cost_basis="m0")
    assert rule.cost == Cost(2.0, per="update")
    with pytest.warns(DeprecationWarning):
        assert Plasticity(joules_per_unit=2.0).cost == Cost(2.0, per="unit")
    with pytest.raises(ValueError, match="not both"):
        Plasticity(joules_per_unit=2.0, cost="sram")
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="cost_basis"):
        Plasticity(joules_per_unit=1.0, cost_basis="m2")
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="joules_per_unit"):
        Plasticity(joules_per_unit=-1.0)


def test_configs_of_earlier_releases_load():
    old = {"synapses": [], "units": None, "samples": None, "alpha": 1.0,
           "joules_per_unit": 1e-3, "cost_basis": "m0"}  # fmt: skip
    rule = from_config(old)
    assert rule.cost == Cost(1e-3, per="update")
    assert to_config(rule)["cost"] == {"class": "Cost", "joules": 1e-3, "per": "update",
                                       "name": "custom"}  # fmt: skip
    assert from_config({**old, "joules_per_unit": None}).cost is None
    assert from_config({"cost": "biology"}).cost == PRESETS["biology"]
