"""Checks of dropin.py's results, imported by tests/keras/test_<backend>.py.

Every "exact" claim is checked against the witness: weights snapshotted around each
batch by a plain Keras callback (sum |dw|, changed entries, steps), and each batch
judged by the weights it started from.
"""

from __future__ import annotations

import pytest

from energy_callbacks.core import keep_count

M1_RTOL = 1e-6


def assert_exact(run: dict) -> None:
    """The report equals the witness: M0 and steps exactly, M1 to float32 summation."""
    w = run["witness"]
    assert run["m0"] == w["m0"] and run["steps"] == w["steps"]
    assert run["m1"] == pytest.approx(w["m1"], rel=M1_RTOL)
    assert run["m1_min"] <= run["m1"] * (1 + M1_RTOL)


def test_the_guides_custom_train_step_is_measured_and_masked_exactly(dropin):
    g = dropin["guide"]
    for name in ("measure", "top 10%"):
        run = g[name]
        assert_exact(run)
        assert run["seen"] == 128  # counted by the metric update of the guide's step
        # the progress bar showed the energy at every batch, the last one the total
        logged = run["witness"]["logged"]
        assert len(logged) == 8 and logged == sorted(logged)
        assert logged[-1] == pytest.approx(run["m1"], rel=M1_RTOL)
    for step in g["top 10%"]["witness"]["changed"]:
        assert step == [keep_count(0.1, n) for n in g["sizes"]]


def test_the_gate_in_a_custom_train_step_is_exact_or_refused_with_the_fix(dropin):
    gated = dropin["guide"]["gated"]
    ways = ["stateless_compute_loss"] if dropin["backend"] == "jax" else [
        "compute_loss", "sample_weight"]  # fmt: skip
    for way in ways:
        run = gated[way]
        assert_exact(run)
        assert run["seen"] == 128 and run["learned"] == run["witness"]["learned"] < 128, way
    if dropin["backend"] == "jax":  # the guide's JAX step calls compute_loss unmapped
        assert "stateless_compute_loss" in gated["compute_loss"]
    said = gated["own loss"]
    assert said.startswith("RuntimeError") and "did not judge the loss" in said
    assert "sample_weight(self, y, y_pred, x)" in said


def test_models_that_fit_builds_equal_the_same_models_built_before(dropin):
    for name, (lazy, built) in dropin["built_by_fit"].items():
        for key in ("m0", "steps", "seen"):
            assert lazy[key] == built[key], (name, key)
        for key in ("m1", "m1_min"):  # w_0 is the weights of the first step, not zeros
            assert lazy[key] == pytest.approx(built[key], rel=1e-9), (name, key)
        assert lazy["weights"] == built["weights"], name


def test_the_gate_judges_the_output_outputs_names(dropin):
    out = dropin["outputs"]
    for name in ("dict a", "list 1", "dict b"):
        run = out[name]
        assert_exact(run)
        assert run["learned"] == run["witness"]["learned"] < run["seen"] == 64, name
    assert "outputs='name'" in out["no outputs="] and "['a', 'b']" in out["no outputs="]
    assert "names no output" in out["unknown name"]


def test_units_on_two_heads_keep_both_heads_whole(dropin):
    run = dropin["outputs"]["units on two heads"]
    assert_exact(run)
    assert run["outputs"] == ["a", "b"]
    paths = run["paths"]
    for units in run["witness"]["units"]:
        got = dict(zip(paths, units))
        assert got["hidden/kernel"] == got["hidden/bias"] == 8  # half of 16 hidden units
        assert got["a/kernel"] == 3 and got["b/kernel"] == 4  # every unit of both heads


def test_units_on_a_nested_model_find_the_head(dropin):
    run = dropin["outputs"]["units on a nested model"]
    assert_exact(run)
    assert run["outputs"] == ["head"]
    for units in run["witness"]["units"]:
        got = dict(zip(run["paths"], units))
        assert got["head/kernel"] == 3  # the output keeps its units
        hidden = [n for p, n in got.items() if p.endswith("kernel") and p != "head/kernel"]
        assert hidden == [8, 6]  # the trunk's two hidden layers, half of 16 and of 12


@pytest.mark.parametrize("kind, gates", [("lstm", 4), ("gru", 3)])
def test_recurrent_units_cover_kernel_recurrent_kernel_and_bias(dropin, kind, gates):
    run = dropin["recurrent"][kind]
    assert_exact(run)
    paths = run["paths"]
    kernel, recurrent, bias = (paths.index(f"rnn/{kind}_cell/{n}")
                               for n in ("kernel", "recurrent_kernel", "bias"))  # fmt: skip
    for columns in run["witness"]["columns"]:
        chosen = columns[kernel]
        assert len(chosen) == keep_count(0.5, 6 * gates)  # gate units: half of them
        assert columns[recurrent] == columns[bias] == chosen  # the unit's every synapse
    said = dropin["recurrent"]["mha"]
    assert "no unit axis" in said and "Drop units=" in said


def test_misuse_is_refused_at_fit_start(dropin):
    r = dropin["refused"]
    assert "already measured another model" in r["second model"]
    assert "'hidden' (16 units)" in r["k = units"] and "Give k below 16" in r["k = units"]
    assert "keeps every unit" in r["top k = units"]


def test_the_step_without_xla_is_as_exact(dropin):
    for run in dropin["eager"].values():
        assert_exact(run)
        assert run["m0"] == 4 * sum(keep_count(0.1, n) for n in (128, 16, 48, 3))


def test_the_logs_are_complete_whatever_the_callback_order(dropin):
    r = dropin["order"]  # CSVLogger and a user callback listed before the PlasticityCallback
    for key in ("energy", "updates", "energy_min", "inefficiency", "samples_learned"):
        assert f"plasticity/{key}" in r["columns"], key
    assert not [c for c in r["columns"] if c.startswith("val_plasticity")]
    assert r["energy"][-1] == pytest.approx(r["m1"], rel=M1_RTOL)
    assert {"plasticity/energy", "plasticity/samples_learned"} <= set(r["batch_keys"])


def test_a_checkpoint_fitted_without_the_callback_trains_as_its_own_optimizer(dropin):
    r = dropin["checkpoint"]
    assert r["optimizer"] == "PlasticityOptimizer"  # the state is there for a callback
    assert len(r["warnings"]) >= 1 and "trains as its inner SGD" in r["warnings"][0]
    for step in r["changed"]:  # plain SGD: every weight changes, no top 10% any more
        assert step == r["sizes"]
    said = r["without import"]  # loading without the package names the class to import
    assert "PlasticityOptimizer" in said and "energy_callbacks" in said
