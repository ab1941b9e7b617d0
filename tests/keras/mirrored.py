"""MirroredStrategy over 2 logical CPUs vs one device, same data: run in a subprocess.

Prints one JSON line: the reports of both runs, the largest weight difference
between them, and whether the two replicas hold identical weights.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

os.environ["KERAS_BACKEND"] = "tensorflow"
import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from energy_callbacks.keras import PlasticityCallback  # noqa: E402

warnings.filterwarnings("ignore", message="The structure of `inputs`")
RULE = dict(units=0.5, synapses=0.2, samples="mistakes")


def run(strategy):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 12)).astype("float32")
    y = np.abs(x[:, :4]).argmax(1).astype("int32")
    with strategy.scope():
        keras.utils.set_random_seed(0)
        inp = keras.Input((12,), name="features")
        hidden = keras.layers.Dense(16, activation="tanh")(inp)
        model = keras.Model(inp, keras.layers.Dense(4)(hidden))
        model.compile(
            optimizer=keras.optimizers.Adam(0.05),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    cb = PlasticityCallback(**RULE)
    model.fit(
        {"features": x, "index": np.arange(128)},
        y,
        batch_size=16,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[cb],
    )
    rep = cb.report()
    replicas_equal = all(
        all(np.array_equal(parts[0], p) for p in parts[1:])
        for parts in (
            [np.asarray(t) for t in strategy.experimental_local_results(v.value)]
            for v in model.trainable_variables
        )
    )
    summary = {
        "m1": rep.m1,
        "m0": rep.m0,
        "steps": rep.steps,
        "seen": rep.samples_seen,
        "learned": rep.samples_learned,
        "flagged": cb.optimizer.gate.flagged(),
    }
    return summary, [np.asarray(w) for w in model.get_weights()], replicas_equal


def main() -> None:
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    multi, w_multi, equal = run(mirrored)
    single, w_single, _ = run(tf.distribute.get_strategy())
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(w_multi, w_single))
    out = {
        "mirrored": multi,
        "single": single,
        "weight_diff": diff,
        "replicas_equal": equal,
        "replicas": mirrored.num_replicas_in_sync,
    }
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
