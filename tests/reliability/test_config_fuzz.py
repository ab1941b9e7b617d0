"""Bad configuration: every field of every rule, of Plasticity and of the Lightning
callback, fuzzed with hypothesis (wrong types, out-of-range values, unknown strings,
unhashable objects). Construction succeeds exactly when every value is valid, and
otherwise raises ValueError/TypeError naming a bad field. (The Keras callback's
fields: keras_cases.py, in a subprocess.)"""

from __future__ import annotations

import pytest
from config_spec import (
    CASES,
    Case,
    Field,
    _shorthand_cross,
    callable_or_none,
    callback_fields,
    check,
    count,
    draw_kwargs,
    is_bool,
    is_int,
    optional,
)
from config_spec import adjacency as valid_adjacency
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from energy_callbacks import Plasticity, RandomSynapses, TopFraction
from energy_callbacks.lightning import PlasticityCallback

EXAMPLES = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

LIGHTNING = Case(
    PlasticityCallback,
    callback_fields("PlasticityCallback")
    | {
        "targets": Field(callable_or_none, "PlasticityCallback.targets", (None, lambda b: b)),
        "outputs": Field(callable_or_none, "PlasticityCallback.outputs", (None,)),
        "sample_ids": Field(callable_or_none, "PlasticityCallback.sample_ids", (None,)),
        "adjacency": Field(
            valid_adjacency,
            "adjacency",
            (None, [], [["a", "b"]], [("a", "b", 2)], [["a", "b", 0]], [["a"]], "ab"),
        ),
        "ignore_index": Field(optional(is_int), "PlasticityCallback.ignore_index", (None, -100, 0)),
        "log_every_n_steps": Field(optional(count), "log_every_n_steps", (None, 1, 50, 0)),
        "skip_backward": Field(is_bool, "PlasticityCallback.skip_backward", (False, True)),
        "inputs": Field(callable_or_none, "PlasticityCallback.inputs", (None, lambda b: b)),
        "backward_batch": Field(
            optional(count), "PlasticityCallback.backward_batch", (None, 32, 1, 0, 2.0)
        ),
    },
    lambda kw: _shorthand_cross(kw) + _selective_cross(kw),
)


def _selective_cross(kw: dict) -> list[str]:
    """skip_backward=True needs a sample gate; inputs= and backward_batch= need
    skip_backward=True."""
    skip = kw.get("skip_backward") is True
    gate = kw.get("samples") is not None or getattr(kw.get("plasticity"), "samples", None)
    bad = ["skip_backward"] if skip and not gate else []
    if kw.get("inputs") is not None and not skip:
        bad.append("inputs=")
    if kw.get("backward_batch") is not None and not skip:
        bad.append("backward_batch=")
    return bad

ALL = CASES | {"lightning.PlasticityCallback": LIGHTNING}


@pytest.mark.parametrize("name", list(ALL))
@EXAMPLES
@given(data=st.data())
def test_every_field_fails_at_construction_naming_itself(name, data):
    case = ALL[name]
    check(case, draw_kwargs(data.draw, case))


@pytest.mark.parametrize("name", list(ALL))
def test_the_spec_accepts_the_defaults_and_refuses_an_object_in_each_field(name):
    """The oracle is not vacuous: each field's first example builds, object() fails."""
    case = ALL[name]
    valid = {n: case.fields[n].extra[0] for n in case.required}
    if name in ("TopUnits", "RandomUnits"):
        valid["q"] = 0.5  # one of q and k
    assert check(case, dict(valid)) == "ok"
    for field in case.fields:
        assert check(case, valid | {field: object()}) != "ok"


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: TopFraction(0.1, per_unit="yes"), "TopFraction.per_unit"),
        (lambda: RandomSynapses(0.1, seed=-1), "RandomSynapses.seed"),
        (lambda: RandomSynapses(0.1, seed=1.5), "RandomSynapses.seed"),
        (lambda: Plasticity(alpha=True), "alpha"),
        (lambda: Plasticity(cost_basis=["m1"]), "cost_basis"),
        (lambda: Plasticity(synapses=2.0), "synapses=2.0"),
        (lambda: PlasticityCallback(plasticity="lazy"), "PlasticityCallback.plasticity"),
        (lambda: PlasticityCallback(layers=[]), "PlasticityCallback.layers"),
        (lambda: PlasticityCallback(adjacency=[["a", "b", 0]]), "spread an integer >= 1"),
    ],
)
def test_values_that_used_to_pass_or_fail_later_now_fail_here(make, field):
    """Each of these was accepted before (and failed inside training, or did nothing)."""
    with pytest.raises(ValueError, match=field.replace(".", r"\.").replace("[", r"\[")):
        make()
