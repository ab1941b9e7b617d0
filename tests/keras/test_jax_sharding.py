"""keras.distribution.ModelParallel (JAX, Dense kernels sharded over 2 host CPU devices)
vs one device: the callback's masks are the same at every step, and so are M0, M0_min,
steps and the gate's counts; weights, M1 and M1_min agree to float32 rounding.

Why not bit-equal: the model's own matmuls contract over sharded axes (the hidden
kernel is split along its inputs), which XLA sums per device and then across them, so
plain Keras training without the callback ends 6e-8 apart too. The callback adds no
arithmetic of its own there (with it, measuring only, the sharded weights are bit-equal
to plain training), and its masked step on identical inputs gives bit-equal weights and
counts; only the M1 sum of a sharded tensor may differ in its last bit (per-device sums).

A 33-unit axis cannot be sharded over 2 devices at all: JAX refuses the variable when
the layer is built (IndivisibleError), before any callback runs; the 33-unit layer is
sharded along its other axis. The hidden kernel (20 x 33 = 660 entries) takes the
bit-search selection of TopFraction, the output kernel the top_k one.

The comparison runs in a subprocess (this file as a script): the device count must be
set before JAX starts. Checked with Keras 3.15.1, JAX 0.10.2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

UNITS, CLASSES = 33, 4
LAYOUT = {  # the hidden kernel split along its first axis, the output layer along its last
    "hidden/kernel": ("model", None),
    "out/kernel": (None, "model"),
    "out/bias": ("model",),
}


def _rules() -> dict:
    from energy_callbacks import TopFraction, TopUnits

    return {
        "track": {},
        "top-fraction": {"synapses": TopFraction(0.1)},
        "units+synapses": {"units": TopUnits(0.25), "synapses": 0.2},
        "lazy": {"samples": "lazy"},
    }


def _model(units: int = UNITS):
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((20,))
    hidden = keras.layers.Dense(units, activation="tanh", name="hidden")(inp)
    model = keras.Model(inp, keras.layers.Dense(CLASSES, name="out")(hidden))
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _fit(rule: dict | None) -> dict:
    """Two epochs, batch 16, in order; the figures, the weights, each step's written
    entries and the callback (None: plain training)."""
    import keras
    import numpy as np

    from energy_callbacks.keras import PlasticityCallback

    class Steps(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.last, self.written = self.model.get_weights(), []

        def on_train_batch_end(self, batch, logs=None):
            now = self.model.get_weights()
            self.written.append([a != b for a, b in zip(now, self.last, strict=True)])
            self.last = now

    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 20)).astype("float32")
    y = np.abs(x[:, :CLASSES]).argmax(1).astype("int32")
    model, steps = _model(), Steps()
    callback = None if rule is None else PlasticityCallback(**rule)
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[steps] if callback is None else [callback, steps],
    )
    out = {"model": model, "callback": callback, "written": steps.written}
    out["weights"] = [np.asarray(w) for w in model.get_weights()]
    if callback is not None:
        r = callback.report()
        names = ("m1", "m0", "m1_min", "m0_min", "steps", "samples_seen", "samples_learned")
        out["report"] = {k: getattr(r, k) for k in names}
    return out


def _sharding(variables, paths=None) -> dict:
    """path (``paths``, default the variables'): (fully replicated, the shape of one
    device's shard, devices spanned)."""
    return {
        path: (
            v.value.sharding.is_fully_replicated,
            list(v.value.sharding.shard_shape(tuple(v.shape))),
            len(v.value.sharding.device_set),
        )
        for path, v in zip(paths or [v.path for v in variables], variables, strict=True)
    }


def _masked_step_alike(single, multi) -> dict:
    """Both optimizers' masked step on the same random before/after, unsharded and sharded
    as the model's variables: (final weights bit-equal, M0 equal, M1's relative gap)."""
    import jax
    import numpy as np

    rng = np.random.default_rng(1)
    variables = multi.optimizer._trainable_variables
    before = [rng.standard_normal(v.shape).astype("float32") for v in variables]
    after = [b + 0.01 * rng.standard_normal(b.shape).astype("float32") for b in before]
    yes = jax.numpy.asarray(True)
    one = single.optimizer._masked_step_fn(before, after, yes, yes, None)
    put = [v.value.sharding for v in variables]
    sharded = [
        [jax.device_put(a, s) for a, s in zip(xs, put, strict=True)] for xs in (before, after)
    ]
    two = multi.optimizer._masked_step_fn(*sharded, yes, yes, None)
    m1_one, m1_two = np.asarray(one[1], np.float64), np.asarray(two[1], np.float64)
    return {
        "final_equal": all(
            np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(one[0], two[0], strict=True)
        ),
        "m0_equal": np.array_equal(np.asarray(one[2]), np.asarray(two[2])),
        "m1_rel": float(np.max(np.abs(m1_one - m1_two) / m1_one)),
    }


def main() -> None:
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import copy

    import keras
    import numpy as np

    rules = _rules()
    single = {name: _fit(copy.deepcopy(rule)) for name, rule in rules.items()}
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((1, 2), ("batch", "model"), devices)

    def distribute(layout: dict) -> None:
        layout_map = keras.distribution.LayoutMap(mesh)
        for key, axes in layout.items():
            layout_map[key] = axes
        keras.distribution.set_distribution(
            keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
        )

    distribute({"hidden/kernel": (None, "model")})  # 33 units over 2 devices
    try:
        _model()
        uneven = None
    except ValueError as exc:
        uneven = type(exc).__name__
    distribute(LAYOUT)
    multi = {name: _fit(copy.deepcopy(rule)) for name, rule in rules.items()}
    plain = _fit(None)
    out: dict = {
        "devices": len(devices),
        "uneven_refused": uneven,
        "sharding": _sharding(multi["track"]["model"].weights),
        "initial_sharding": _sharding(  # the callback's w_0, by the weights' paths
            multi["track"]["callback"].optimizer._initial,
            [v.path for v in multi["track"]["model"].trainable_variables],
        ),
        "track_equals_plain": all(
            np.array_equal(a, b)
            for a, b in zip(multi["track"]["weights"], plain["weights"], strict=True)
        ),
        "rules": {},
    }
    for name in rules:
        one, two = single[name], multi[name]
        out["rules"][name] = {
            "single": one["report"],
            "multi": two["report"],
            "steps_seen": len(two["written"]),
            "masks_equal": all(
                np.array_equal(a, b)
                for s, t in zip(one["written"], two["written"], strict=True)
                for a, b in zip(s, t, strict=True)
            ),
            "weight_diff": max(
                float(np.max(np.abs(a - b)))
                for a, b in zip(one["weights"], two["weights"], strict=True)
            ),
        }
        if name != "track" and name != "lazy":
            step = _masked_step_alike(one["callback"], two["callback"])
            out["rules"][name]["masked_step"] = step
    sys.stdout.write(json.dumps(out) + "\n")


@pytest.mark.slow
def test_jax_model_parallel_matches_one_device():
    proc = subprocess.run(
        [sys.executable, __file__],
        env=dict(
            os.environ,
            KERAS_BACKEND="jax",
            XLA_FLAGS="--xla_force_host_platform_device_count=2",
            TF_CPP_MIN_LOG_LEVEL="2",
        ),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["devices"] == 2
    assert r["uneven_refused"], "JAX now shards a 33-unit axis over 2: add it to LAYOUT"
    # the kernels (and the callback's copies of w_0) really are split over both devices
    split = {"hidden/kernel": [10, UNITS], "out/kernel": [UNITS, 2], "out/bias": [2]}
    for sharding in (r["sharding"], r["initial_sharding"]):
        for path, (replicated, shard, spanned) in sharding.items():
            assert spanned == 2, path
            assert (not replicated, shard) == (path in split, split.get(path, shard)), path
    # measuring only, the callback leaves the sharded arithmetic alone
    assert r["track_equals_plain"]
    for name, c in r["rules"].items():
        one, two = c["single"], c["multi"]
        assert c["steps_seen"] == 16 and c["masks_equal"], name
        for key in ("m0", "m0_min", "steps", "samples_seen", "samples_learned"):
            assert two[key] == one[key], (name, key)
        # float32 rounding of the sharded matmuls (plain training differs as much)
        assert c["weight_diff"] < 1e-6, name
        assert two["m1"] == pytest.approx(one["m1"], rel=1e-6), name
        assert two["m1_min"] == pytest.approx(one["m1_min"], rel=1e-6), name
        if "masked_step" in c:
            step = c["masked_step"]
            assert step["final_equal"] and step["m0_equal"], name
            assert step["m1_rel"] < 1e-6, name
    rules = r["rules"]
    every = rules["track"]["multi"]["m0"]
    assert rules["top-fraction"]["multi"]["m0"] < rules["units+synapses"]["multi"]["m0"] < every
    lazy = rules["lazy"]["multi"]
    assert lazy["samples_learned"] < lazy["samples_seen"] == 256


if __name__ == "__main__":
    main()
