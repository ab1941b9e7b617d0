"""The checks every Keras backend must pass (imported by test_<backend>.py).

Each compares the adapter with the NumPy core on the same numbers; see scenarios.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from scenarios import CACHING_RULES, PAPER_RULES

M1_RTOL = 1e-6


@pytest.mark.parametrize("rule", list(PAPER_RULES))
def test_paper_mlp_batch1_sgd_matches_the_numpy_reference(results, rule):
    r = results["paper"][rule]
    keras_, oracle = r["keras"], r["oracle"]
    assert keras_["m0"] == oracle["m0"]
    assert keras_["steps"] == oracle["steps"]
    assert (keras_["seen"], keras_["learned"]) == (150, oracle["learned"])
    # float32 weights: masks can differ only on a near-tie, so energies agree closely
    tol = 1e-5 if rule == "equal-count" else M1_RTOL
    assert keras_["m1"] == pytest.approx(oracle["m1"], rel=tol)
    assert keras_["m1_min"] == pytest.approx(oracle["m1_min"], rel=1e-4)
    assert r["max_weight_diff"] < (5e-4 if rule == "equal-count" else 1e-5)


def test_batched_adam_matches_a_replay_with_numpy_masks(results):
    for name, r in results["adam"].items():
        keras_, oracle = r["keras"], r["oracle"]
        assert keras_["m0"] == oracle["m0"], name
        assert keras_["steps"] == oracle["steps"] == r["iterations"], name
        assert (keras_["seen"], keras_["learned"]) == (oracle["seen"], oracle["learned"]), name
        assert keras_["m1"] == pytest.approx(oracle["m1"], rel=M1_RTOL), name
        assert r["max_weight_diff"] < 1e-6, name
    # the lazy gate skipped the first two batches: no step, no Adam iteration
    for name in ("combined+lazy/plain", "lazy, measure only/plain"):
        assert results["adam"][name]["iterations"] == 10, name


def test_rules_on_long_tensors_match_a_replay_with_numpy_masks(results):
    """Selections past the short-tensor paths; on torch, the fused CPU step took them."""
    for name, r in results["wide"].items():
        keras_, oracle = r["keras"], r["oracle"]
        assert keras_["m0"] == oracle["m0"], name
        assert keras_["steps"] == oracle["steps"], name
        assert (keras_["seen"], keras_["learned"]) == (oracle["seen"], oracle["learned"]), name
        # float32 sums of 51 200 entries a step (TensorFlow's Threshold: 9.5e-7 off)
        assert keras_["m1"] == pytest.approx(oracle["m1"], rel=5e-6), name
        assert r["max_weight_diff"] == 0.0, name  # the same masks: the same weights
        assert r["host_step"] == (results["backend"] == "torch"), name
    assert results["wide"]["exact"]["keras"]["m0"] < results["wide"]["tracking"]["keras"]["m0"]


def test_resume_from_checkpoint_and_backup_is_exact(results):
    r = results["resume"]
    straight = r["straight"]
    for how in ("checkpoint", "backup"):
        got = r[how]
        for key in ("m0", "steps", "seen", "learned", "flagged"):
            assert got[key] == straight[key], (how, key)
        assert got["m1"] == pytest.approx(straight["m1"], rel=1e-12), how
        for a, b in zip(got["weights"], straight["weights"]):
            np.testing.assert_array_equal(a, b)
    assert straight["flagged"] > 0
    assert r["loaded_optimizer"] == "PlasticityOptimizer"


def test_fit_restores_the_users_optimizer_and_recovers_after_a_raise(results):
    r = results["resume"]
    assert r["left_installed"] == "PlasticityOptimizer"  # fit raised: on_train_end never ran
    assert r["restored_optimizer"] == "Adam"
    assert r["compute_loss_restored"]
    assert r["metrics_after"] == ["loss"]


def test_logged_keys_reach_history_and_csv(results):
    r = results["logs"]
    keys = {
        "plasticity/energy",
        "plasticity/updates",
        "plasticity/energy_min",
        "plasticity/inefficiency",
        "plasticity/samples_learned",
    }
    assert keys <= set(r["history"]) and keys <= set(r["csv"])
    # validation runs the same metrics: their copies of the totals are dropped
    assert not [k for k in r["history"] if k.startswith("val_plasticity")]
    assert any(k.startswith("plasticity/energy/") for k in r["history"])
    assert r["energy"][0] < r["energy"][1] == pytest.approx(r["report_m1"])
    # every batch: the running totals, exact at the last one
    energy, updates = r["batch_energy"], r["batch_updates"]
    assert len(energy) == 12 and energy == sorted(energy) and updates == sorted(updates)
    assert energy[-1] == pytest.approx(r["report_m1"], rel=1e-6)
    assert updates[-1] == r["report_m0"]


@pytest.mark.parametrize("key", ["nan", "nan, measure only"])
def test_nan_step_is_skipped_and_leaves_no_trace(results, key):
    r = results[key]
    assert r["report"]["skipped"] == 1
    assert r["report"]["steps"] == 11 == r["iterations"]
    assert r["finite"]


def test_only_trainable_variables_count(results):
    assert results["trainable_only"] == ["bn/beta", "bn/gamma", "head/bias", "head/kernel"]


def test_wrapper_serializes_with_its_rules(results):
    assert results["serialize"] == {
        "class": "PlasticityOptimizer",
        "inner": "AdamW",
        "same_config": True,
    }


def test_the_slice_loop_steps_every_slice_and_frees_its_buffers_at_once(results):
    r = results["slice_loop"]
    assert r["written"] and r["total"] == sum(range(1050))
    assert r["freed"]  # no reference cycle holds the carry until the collector runs


def test_gradient_accumulation_updates_only_on_window_ends(results):
    r = results["accumulation"]
    assert r["steps"] == 12
    assert r["m0"] == 6 * r["per_step_cap"]


def test_long_selections_equal_the_numpy_oracle(results):
    """Exact top-k (bisection over float bits) and the approximate threshold, compiled."""
    failed = [case for case, ok in results["selection"].items() if not ok]
    assert not failed
    assert (
        len(results["selection"]) == {"torch": 53, "jax": 54, "tensorflow": 57}[results["backend"]]
    )


def test_totals_stay_exact_over_1e5_steps(results):
    r = results["accumulators"]
    # the issue asks for 1e-6 relative over 1e5 steps; float32 alone drifts far beyond
    assert r["two_sum_rel_error"] < 1e-7 < 1e-6 < r["naive_rel_error"]
    assert r["count"] == r["count_exact"] > 2**35  # beyond int32, exactly


@pytest.mark.parametrize("rule", list(CACHING_RULES))
def test_caching_matches_the_numpy_reference(results, rule):
    """The store, its decay and the consolidation in-graph equal the NumPy core."""
    r = results["caching"][rule]
    keras_, oracle = r["keras"], r["oracle"]
    for key in ("updates", "m0", "steps", "learned"):
        assert keras_[key] == oracle[key], key
    assert keras_["transient"] == 0.0 == oracle["transient"]  # on_train_end consolidated
    assert keras_["energy"] == pytest.approx(oracle["energy"], rel=1e-6)
    for key in ("consolidation", "maintenance"):
        assert keras_[key] == pytest.approx(oracle[key], abs=1e-6 * oracle["energy"]), key
    assert keras_["energy"] < keras_["m1"]
    assert keras_["joules"] == oracle["joules"]
    assert r["max_weight_diff"] < 1e-5


def test_caching_resumes_exactly_from_a_checkpoint(results):
    r = results["caching_resume"]
    straight, resumed = r["straight"], r["checkpoint"]
    assert r["loaded_store"] > 0  # the checkpoint carried a transient store
    for key in ("m0", "updates", "steps", "seen", "learned", "flagged"):
        assert resumed[key] == straight[key], key
    for key in ("m1", "energy", "consolidation", "maintenance"):
        assert resumed[key] == pytest.approx(straight[key], rel=1e-12), key
    for a, b in zip(resumed["weights"], straight["weights"]):
        np.testing.assert_array_equal(a, b)


def test_caching_logs(results):
    r = results["caching_resume"]
    for key in ("plasticity/energy_consolidation", "plasticity/energy_maintenance"):
        assert key in r["history"], key
    energy = r["batch_energy"]
    assert energy == sorted(energy) and energy[-1] == pytest.approx(r["epoch_energy"][-1])
    # the end of fit consolidates what the store still held: the report adds it
    assert r["straight"]["energy"] > r["epoch_energy"][-1]


def test_a_model_saved_before_the_layout_change_loads_and_continues(results):
    import json
    from pathlib import Path

    saved = json.loads((Path(__file__).parent / "data" / "saved_wrapper.json").read_text())
    r = results["saved_file"]
    assert r["wrapper"] == "PlasticityOptimizer" and r["adopted"]
    assert r["m0"] == saved["state_m0"]
    assert r["continued"]["steps"] == saved["steps"] + 4
    assert r["continued"]["seen"] == saved["samples_seen"] + 64
    assert r["continued"]["m0"] > saved["m0"]
    assert r["continued"]["m1"] > saved["m1"]


def test_counts_past_float32_reach_the_logs_exactly(results):
    r = results["big_counts"]
    assert r["m0"] > 2**40 and float(np.float32(r["m0"])) != r["m0"]  # float32 would round
    assert r["history"] == r["batch"][-1] == r["m0"]
    assert len(set(r["batch"])) == len(r["batch"])  # each batch logs its own total
    assert r["past_read"] == r["past"] > 2**44  # beyond the packed readout: read in full
