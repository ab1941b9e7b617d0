"""The Keras reliability cases, run in a subprocess per backend:
``KERAS_BACKEND=jax python keras_cases.py OUT.json``. test_keras.py checks the JSON.

Faults (NaN steps, loss-scaler skips), bad batches (ids, targets), changes between
fits, every constructor field fuzzed, and the in-graph accumulators over 1e6 steps.
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback
import warnings

import keras
import numpy as np
from keras import ops

sys.path.insert(0, os.path.dirname(__file__))

BACKEND = keras.backend.backend()
RESULTS: dict[str, object] = {"backend": BACKEND}


def small_model(seed: int = 0, dtype: str | None = None) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inp = keras.Input((12,), name="features")
    hidden = keras.layers.Dense(16, activation="tanh", name="hidden", dtype=dtype)(inp)
    return keras.Model(inp, keras.layers.Dense(4, name="head", dtype=dtype)(hidden))


def data(n: int = 64):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 12)).astype("float32")
    return x, np.abs(x[:, :4]).argmax(1).astype("int32")


def compiled(model: keras.Model, optimizer=None) -> keras.Model:
    model.compile(
        optimizer=optimizer or keras.optimizers.Adam(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def fit(model, callback, x, y, ids=None, epochs: int = 1, extra=()):
    """Fit in order (batch 8); returns the plasticity warnings and the history."""
    inputs = {"features": x, "index": np.arange(len(x)) if ids is None else ids}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(
            inputs,
            y,
            batch_size=8,
            epochs=epochs,
            shuffle=False,
            verbose=0,
            callbacks=[callback, *extra],
        )
    said = [str(w.message) for w in caught if "plasticity" in str(w.message).lower()]
    return said, history.history


def report_dict(report) -> dict:
    return {
        "m1": report.m1,
        "m0": report.m0,
        "m1_min": report.m1_min,
        "steps": report.steps,
        "skipped": report.skipped_steps,
        "seen": report.samples_seen,
        "learned": report.samples_learned,
        "per_layer": {k: v.m1 for k, v in report.per_layer.items()},
    }


def error_of(fn) -> str:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the case records what was raised
        return f"{type(exc).__name__}: {exc}"
    return ""


class Weights(keras.callbacks.Callback):
    """The real change of the weights in every batch (sum |dw| in float64)."""

    def __init__(self) -> None:
        super().__init__()
        self.m1 = 0.0
        self.changed: list[bool] = []

    def on_train_batch_begin(self, batch, logs=None):
        self._before = [np.asarray(w, np.float64) for w in self.model.get_weights()]

    def on_train_batch_end(self, batch, logs=None):
        after = [np.asarray(w, np.float64) for w in self.model.get_weights()]
        moved = sum(float(np.abs(a - b).sum()) for a, b in zip(after, self._before))
        self.m1 += moved
        self.changed.append(moved > 0)


# -- faults ------------------------------------------------------------------------
def case_nan() -> None:
    from energy_callbacks.keras import PlasticityCallback

    x, y = data()
    bad = x.copy()
    bad[8:16] = np.nan  # batch 1
    bad[40:48] = np.inf  # batch 5
    model = compiled(small_model())
    callback = PlasticityCallback(synapses=0.5)
    said, history = fit(model, callback, bad, y, epochs=2)
    RESULTS["nan"] = {
        "report": report_dict(callback.report()),
        "warnings": said,
        "logged": history["plasticity/skipped_steps"],
        "finite": all(bool(np.isfinite(np.asarray(w)).all()) for w in model.get_weights()),
    }


def case_nonfinite_proposal() -> None:
    """Finite gradients, a proposal of Inf/NaN (an infinite learning rate): the weights
    stay and the step counts as skipped, on every backend; the optimizer's state (its
    step count) keeps its update where the update ran behind a branch on the gradients
    (TensorFlow, torch) and goes back with the weights on JAX."""
    from energy_callbacks.keras import PlasticityCallback

    x, y = data(32)
    out = {}
    for name, rule in (("measuring", {}), ("masking", {"synapses": 0.5})):
        model = compiled(small_model(), keras.optimizers.SGD(learning_rate=math.inf))
        before = [np.array(w) for w in model.get_weights()]
        callback = PlasticityCallback(**rule)
        said, _ = fit(model, callback, x, y)
        out[name] = {
            "report": report_dict(callback.report()),
            "unchanged": all(
                np.array_equal(a, np.asarray(b)) for a, b in zip(before, model.get_weights())
            ),
            "iterations": int(np.asarray(model.optimizer.iterations)),
            "warnings": said,
        }
    RESULTS["nonfinite_proposal"] = out


def case_loss_scaling() -> None:
    """mixed_float16: Keras wraps the optimizer in a LossScaleOptimizer, which skips the
    steps whose gradients overflow float16 at its loss scale and halves the scale."""
    from energy_callbacks.keras import PlasticityCallback

    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        x, y = data()
        x[16:24] *= 3e4  # batch 2 overflows in float16
        model = compiled(small_model(), keras.optimizers.SGD(0.01))
        inner = type(model.optimizer).__name__
        callback = PlasticityCallback(synapses=0.5)
        weights = Weights()
        said, history = fit(model, callback, x, y, extra=[weights])
        scale = float(np.asarray(model.optimizer.dynamic_scale))
        report = callback.report()
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    RESULTS["loss_scaling"] = {
        "inner": inner,
        "report": report_dict(report),
        "halvings": round(math.log2(32768.0 / scale)),
        "unchanged_batches": weights.changed.count(False),
        "measured_m1": weights.m1,
        "warnings": said,
        "logged": history["plasticity/skipped_steps"],
    }


# -- bad batches ---------------------------------------------------------------------
def case_ids() -> None:
    from energy_callbacks.core import MemorizedMistakes
    from energy_callbacks.keras import PlasticityCallback

    x, y = data()
    out = {}
    cases = {
        "fine": np.arange(64),
        "negative": np.r_[-1, -5, np.arange(2, 64)],
        "huge": np.r_[10**12, 2**40 + 3, np.arange(2, 64)],
        "beyond capacity": np.r_[100, 101, np.arange(2, 64)],
        "duplicated": np.r_[np.zeros(8, np.int64), np.arange(8, 64)],
    }
    for name, ids in cases.items():
        model = compiled(small_model())
        callback = PlasticityCallback(samples=MemorizedMistakes(capacity=64))
        said, _ = fit(model, callback, x, y, ids=ids.astype(np.int64), epochs=2)
        memory = np.asarray(callback.optimizer.gate.memory.value)
        out[name] = {
            "report": report_dict(callback.report()),
            "warnings": said,
            "flagged": np.flatnonzero(memory).tolist(),
        }
    model = compiled(small_model())
    callback = PlasticityCallback(samples="mistakes")
    out["float ids"] = error_of(
        lambda: fit(model, callback, x, y, ids=np.arange(64).astype("float32"))
    )
    RESULTS["ids"] = out


def case_targets() -> None:
    from energy_callbacks.keras import PlasticityCallback

    x, y = data()
    out = {}
    model = compiled(small_model())
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    one_hot3 = np.eye(3, dtype="float32")[np.minimum(y, 2)]
    out["one-hot of 3 classes"] = error_of(
        lambda: fit(model, PlasticityCallback(samples="lazy"), x, one_hot3)
    )
    cases = (
        ("label 7", 7, 40),  # a stray label in a later batch: judged as a mistake, warned
        ("label -1", -1, 40),
        ("label 7 in the first batch", 7, 3),  # refused: the first batch is checked
        ("fractional labels", None, None),  # regression targets: refused
    )
    for name, stray, where in cases:
        if stray is None:
            labels = y + 0.5
        else:
            labels = np.where(np.arange(64) == where, stray, y).astype("int32")
        model = compiled(small_model())
        callback = PlasticityCallback(samples="lazy")
        result: dict[str, object] = {}
        try:
            said, _ = fit(model, callback, x, labels)
            result = {"warnings": said, "report": report_dict(callback.report())}
        except Exception as exc:  # noqa: BLE001 - TF's loss refuses such labels itself
            result = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        out[name] = result
    RESULTS["targets"] = out


# -- changes between fits -----------------------------------------------------------------
def case_changes() -> None:
    from energy_callbacks.keras import PlasticityCallback

    x, y = data()
    out = {}
    model = compiled(small_model())
    model.get_layer("hidden").trainable = False
    model = compiled(model)
    callback = PlasticityCallback(synapses=0.5)
    fit(model, callback, x, y)
    first = report_dict(callback.report())
    model.get_layer("hidden").trainable = True
    out["unfrozen without compile"] = error_of(lambda: fit(model, callback, x, y))
    compiled(model, keras.optimizers.SGD(0.05))  # unfrozen, compiled again: carried on
    fit(model, callback, x, y)
    second = report_dict(callback.report())
    model.get_layer("hidden").trainable = False
    compiled(model)
    out["frozen and compiled"] = error_of(lambda: fit(model, callback, x, y))
    out["first"], out["second"] = first, second
    RESULTS["changes"] = out


# -- configuration ---------------------------------------------------------------------------
def case_config() -> None:
    from config_spec import Case, Field, _shorthand_cross, callback_fields, check, draw_kwargs
    from config_spec import units as valid_units
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from energy_callbacks.core import Plasticity, RandomUnits
    from energy_callbacks.core.config import from_config
    from energy_callbacks.keras import PlasticityCallback, PlasticityOptimizer

    keys = ("synapses", "units", "samples", "alpha", "joules_per_unit", "cost_basis")

    def in_graph_plasticity(v):
        """None, a Plasticity, or a to_config dict of known keys; never RandomUnits."""
        if isinstance(v, dict):
            if not all(k in keys for k in v):
                return False
            try:
                v = from_config(v)  # the values: fuzzed field by field in test_config_fuzz
            except ValueError:
                return False
        return v is None or isinstance(v, Plasticity) and not isinstance(v.units, RandomUnits)

    fields = callback_fields("PlasticityCallback")
    fields["units"] = Field(
        lambda v: valid_units(v) and not isinstance(v, RandomUnits), "units", fields["units"].extra
    )
    fields["sample_ids"] = Field(
        lambda v: v is None or callable(v), "PlasticityCallback.sample_ids", (None,)
    )
    callback = Case(PlasticityCallback, fields, _shorthand_cross)
    wrapper = Case(
        PlasticityOptimizer,
        {
            "inner_optimizer": Field(
                lambda v: isinstance(v, keras.optimizers.Optimizer),
                "PlasticityOptimizer.inner_optimizer",
                (keras.optimizers.SGD(0.1),),
            ),
            "plasticity": Field(
                in_graph_plasticity,
                "PlasticityOptimizer.plasticity",
                (None, {}, {"synapses": [{"class": "TopFraction", "p": 0.1}]}, {"alpha": -1}),
            ),
            "layers": fields["layers"],
        },
        required=("inner_optimizer",),
    )
    wrapper.fields["layers"] = Field(
        fields["layers"].valid, "PlasticityOptimizer.layers", fields["layers"].extra
    )
    counts = {"callback": {"ok": 0, "error": 0}, "optimizer": {"ok": 0, "error": 0}}

    def fuzzer(key: str, case: Case):
        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
        @given(data=st.data())
        def fuzz(data):
            outcome = check(case, draw_kwargs(data.draw, case))
            counts[key]["ok" if outcome == "ok" else "error"] += 1

        return fuzz

    for key, case in (("callback", callback), ("optimizer", wrapper)):
        fuzzer(key, case)()
    RESULTS["config"] = counts


# -- scale ---------------------------------------------------------------------------
def case_accumulators() -> None:
    """The optimizer's float32 (value, error) pairs and two-word int32 counts over 1e6
    steps of a small model's per-step totals, compiled, against exact sums."""
    from energy_callbacks.keras.optimizer import COUNT_BITS, carry_count, two_sum

    steps = 1_000_000
    rng = np.random.default_rng(0)
    # per-step M1 of a 1,000-synapse model: tiny late steps after large early ones
    x = (np.abs(rng.standard_normal(steps)) * np.geomspace(1.0, 1e-6, steps)).astype("float32")
    counts = rng.integers(0, 1000, steps).astype("int32")
    xs, cs = ops.convert_to_tensor(x), ops.convert_to_tensor(counts)

    def body(i, state):
        total, error, naive, low, high = state
        total, error = two_sum(total, error, xs[i])
        low, high = carry_count(low, high, cs[i])
        return total, error, naive + xs[i], low, high

    zero_f, zero_i = ops.zeros((), "float32"), ops.zeros((), "int32")
    loop = lambda: ops.fori_loop(0, steps, body, (zero_f, zero_f, zero_f, zero_i, zero_i))  # noqa: E731
    if BACKEND == "jax":
        loop = __import__("jax").jit(loop)
    elif BACKEND == "tensorflow":
        loop = __import__("tensorflow").function(loop, jit_compile=True)
    total, error, naive, low, high = (ops.convert_to_numpy(v) for v in loop())
    exact = math.fsum(x.astype(np.float64).tolist())
    RESULTS["accumulators"] = {
        "rel_error": abs(float(total) + float(error) - exact) / exact,
        "naive_rel_error": abs(float(naive) - exact) / exact,
        "count": (int(high) << COUNT_BITS) + int(low),
        "count_exact": int(counts.astype(np.int64).sum()),
    }


CASES = {
    "nan": case_nan,
    "nonfinite_proposal": case_nonfinite_proposal,
    "loss_scaling": case_loss_scaling,
    "ids": case_ids,
    "targets": case_targets,
    "changes": case_changes,
    "config": case_config,
    "accumulators": case_accumulators,
}


def main() -> None:
    out_path = sys.argv[1]
    only = sys.argv[2].split(",") if len(sys.argv) > 2 else list(CASES)
    if BACKEND == "torch" and len(sys.argv) <= 2:
        only.remove("accumulators")  # eager: 1e6 Python steps (the same float32 arithmetic)
    for name in only:
        try:
            CASES[name]()
        except Exception:  # noqa: BLE001 - report, and run the other cases
            RESULTS[name] = {"crashed": traceback.format_exc()}
    with open(out_path, "w") as f:
        json.dump(RESULTS, f, default=float)


if __name__ == "__main__":
    main()
