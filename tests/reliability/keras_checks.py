"""What every Keras backend must show in keras_cases.py (imported by test_keras_<backend>.py)."""

from __future__ import annotations

import pytest


def test_nan_steps_are_skipped_counted_logged_and_warned_once(keras_results):
    r = keras_results["nan"]
    assert r["report"]["skipped"] == 4 and r["report"]["steps"] == 12  # 2 bad batches x 2 epochs
    assert r["logged"] == [2.0, 4.0] and r["finite"]
    assert len(r["warnings"]) == 1 and "skipped_steps" in r["warnings"][0]


def test_a_nonfinite_proposal_from_finite_gradients_is_undone_in_the_weights(keras_results):
    for name, r in keras_results["nonfinite_proposal"].items():
        assert r["unchanged"], name
        assert r["report"]["skipped"] == 4 and r["report"]["steps"] == 0, name
        assert r["report"]["m1"] == 0 and r["report"]["m0"] == 0, name
        # every backend decides the optimizer's state on the gradients (TF and torch
        # branch, JAX selects in the update's pass), so the state keeps its updates
        assert r["iterations"] == 4, name
        assert len(r["warnings"]) == 1 and "skipped_steps" in r["warnings"][0], name


def test_loss_scaler_skips_cost_nothing_and_count_as_skipped(keras_results):
    r = keras_results["loss_scaling"]
    assert r["inner"] == "LossScaleOptimizer"
    rep = r["report"]
    assert rep["skipped"] == r["halvings"] == r["unchanged_batches"] >= 1
    assert rep["steps"] + rep["skipped"] == 8 and r["logged"] == [float(rep["skipped"])]
    assert rep["m1"] == pytest.approx(r["measured_m1"], rel=1e-6)  # the skipped steps cost 0
    assert r["warnings"] == []  # the scaler's own business


def test_ids_outside_the_memory_are_judged_counted_never_remembered(keras_results):
    r = keras_results["ids"]
    assert r["fine"]["warnings"] == []
    for name in ("negative", "beyond capacity") + (
        () if keras_results["backend"] == "jax" else ("huge",)  # JAX: ids wrap to int32
    ):
        got = r[name]
        assert len(got["warnings"]) == 1 and "outside [0, 64)" in got["warnings"][0], name
        assert min(got["flagged"]) >= 2 and got["report"]["seen"] == 128, name
    if keras_results["backend"] != "jax":
        assert r["huge"] == r["negative"]  # any id outside is the same: not remembered
    assert r["duplicated"]["report"]["seen"] == 128 and r["duplicated"]["warnings"] == []
    assert "must be integers" in r["float ids"]


def test_targets_that_do_not_fit_are_refused_and_stray_labels_are_reported(keras_results):
    r = keras_results["targets"]
    assert "shape" in r["one-hot of 3 classes"]
    for name in ("label 7", "label -1"):
        got = r[name]
        if "error" in got:  # TensorFlow's and torch's losses refuse such labels themselves
            assert keras_results["backend"] != "jax"
        else:
            assert len(got["warnings"]) == 1 and "not class ids" in got["warnings"][0]
    # the first batch's targets are checked: what is no class id is refused, as in torch
    for name in ("label 7 in the first batch", "fractional labels"):
        got = r[name]["error"]
        if "not class ids of the outputs" not in got:  # the loss refused them first
            assert keras_results["backend"] != "jax" and name != "fractional labels", got
        else:
            assert "samples=None" in got, got


def test_changes_between_fits_carry_on_or_say_what_to_do(keras_results):
    r = keras_results["changes"]
    assert "model.compile(...) again" in r["unfrozen without compile"]
    assert "would be lost" in r["frozen and compiled"]
    first, second = r["first"], r["second"]
    assert set(first["per_layer"]) == {"head/kernel", "head/bias"}
    assert second["steps"] == 16 and second["seen"] == 128
    assert second["per_layer"]["head/kernel"] > first["per_layer"]["head/kernel"]
    assert second["per_layer"]["hidden/kernel"] > 0
    assert second["m1"] > first["m1"]


def test_every_constructor_field_is_checked_at_construction(keras_results):
    r = keras_results["config"]
    assert r["callback"]["ok"] > 0 and r["callback"]["error"] > 0
    assert r["optimizer"]["error"] > 0 and sum(r["optimizer"].values()) == 300


def test_the_in_graph_totals_stay_exact_over_1e6_steps(keras_results):
    """Compiled on JAX and TensorFlow (torch runs the same float32 arithmetic eagerly)."""
    if keras_results["backend"] == "torch":
        pytest.skip("eager torch would take 1e6 Python steps; JAX and TensorFlow compile them")
    r = keras_results["accumulators"]
    assert r["rel_error"] < 1e-12 < 1e-4 < r["naive_rel_error"]
    assert r["count"] == r["count_exact"] > 2**28
