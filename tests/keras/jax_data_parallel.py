"""keras.distribution.DataParallel over 2 host CPU devices (JAX) vs one device.

Run in a subprocess: the device count must be set before JAX starts.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import keras  # noqa: E402
import numpy as np  # noqa: E402

from energy_callbacks.keras import PlasticityCallback  # noqa: E402

warnings.filterwarnings("ignore", message="The structure of `inputs`")


def run() -> tuple[dict, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 12)).astype("float32")
    y = np.abs(x[:, :4]).argmax(1).astype("int32")
    keras.utils.set_random_seed(0)
    inp = keras.Input((12,), name="features")
    model = keras.Model(inp, keras.layers.Dense(4)(keras.layers.Dense(16, activation="tanh")(inp)))
    model.compile(
        optimizer=keras.optimizers.Adam(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    cb = PlasticityCallback(units=0.5, synapses=0.2, samples="mistakes")
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
    return (
        {
            "m1": rep.m1,
            "m0": rep.m0,
            "steps": rep.steps,
            "seen": rep.samples_seen,
            "learned": rep.samples_learned,
            "flagged": cb.optimizer.gate.flagged(),
        },
        [np.asarray(w) for w in model.get_weights()],
    )


def main() -> None:
    single, w_single = run()
    devices = keras.distribution.list_devices()
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    multi, w_multi = run()
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(w_multi, w_single))
    out = {"devices": len(devices), "single": single, "data_parallel": multi, "weight_diff": diff}
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
