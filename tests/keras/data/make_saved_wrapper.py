"""Write saved_wrapper.keras: a model checkpointed mid-fit by energy_callbacks 0.1.0.

The file was written by the package before its modules moved into per-framework
folders (``energy_callbacks/keras/``); the layout test loads it with the current
package, so models saved by earlier versions keep loading. Rerun only to make a
new fixture: ``KERAS_BACKEND=tensorflow python tests/keras/data/make_saved_wrapper.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np

from energy_callbacks import MemorizedMistakes, Plasticity, TopFraction
from energy_callbacks.keras import PlasticityCallback

HERE = Path(__file__).parent


def main() -> None:
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = rng.integers(0, 3, size=64)
    inputs = {"features": x, "index": np.arange(64)}
    feats = keras.Input((8,), name="features")
    ids = keras.Input((), name="index", dtype="int32")
    hidden = keras.layers.Dense(16, activation="relu", name="hidden")(feats)
    out = keras.layers.Dense(3, name="out")(hidden)
    model = keras.Model({"features": feats, "index": ids}, out)
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rule = Plasticity(synapses=TopFraction(0.2), samples=MemorizedMistakes(capacity=64))
    callback = PlasticityCallback(rule)
    path = HERE / "saved_wrapper.keras"
    checkpoint = keras.callbacks.ModelCheckpoint(str(path))
    model.fit(inputs, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
              callbacks=[callback, checkpoint])
    loaded = keras.models.load_model(path)
    state = loaded.optimizer.energy_state()
    report = callback.report()
    (HERE / "saved_wrapper.json").write_text(
        json.dumps(
            {
                "package": "energy_callbacks 0.1.0, keras " + keras.__version__,
                "m1": report.m1,
                "m0": report.m0,
                "steps": report.steps,
                "samples_seen": report.samples_seen,
                "samples_learned": report.samples_learned,
                "state_m0": [int(v) for v in np.asarray(state["m0"]).ravel()],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
