"""A plain Keras training script with the energy callback dropped in.

The model, data and compile call are ordinary Keras; the only addition is
``PlasticityCallback`` in the callback list, before ``CSVLogger`` and
``TensorBoard`` so that the energy keys reach the CSV file and the event files
(``tensorboard --logdir OUT/tensorboard``). Runs on any backend::

    KERAS_BACKEND=jax python integrations/keras_fit/train.py --epochs 3 --out /tmp/run
"""

from __future__ import annotations

import argparse
import os
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from energy_callbacks.data import load_digits, paper_inputs  # noqa: E402
from energy_callbacks.keras import PlasticityCallback  # noqa: E402


def build_model(n_inputs: int, n_hidden: int, n_classes: int) -> keras.Model:
    inputs = keras.Input((n_inputs,), name="pixels")
    hidden = keras.layers.Dense(n_hidden, activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.Dense(n_classes)(hidden))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--out", default="keras_run")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="The structure of `inputs`")
    os.makedirs(args.out, exist_ok=True)

    keras.utils.set_random_seed(0)
    ds = load_digits(seed=0)
    x_train, mean = paper_inputs(ds.train.images)
    x_test, _ = paper_inputs(ds.test.images, mean)
    model = build_model(x_train.shape[1], args.hidden, ds.n_classes)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    # --8<-- [start:fit]
    energy = PlasticityCallback(units=0.5, synapses=0.1, samples="mistakes")
    history = model.fit(
        {"pixels": x_train, "index": np.arange(len(x_train))},  # ids for the mistake memory
        ds.train.labels,
        validation_data=(x_test, ds.test.labels),
        batch_size=32,
        epochs=args.epochs,
        verbose=2,
        callbacks=[
            energy,  # first: the callbacks after it see the plasticity/* keys
            keras.callbacks.CSVLogger(os.path.join(args.out, "log.csv")),
            keras.callbacks.TensorBoard(os.path.join(args.out, "tensorboard")),
            keras.callbacks.ModelCheckpoint(os.path.join(args.out, "model.keras")),
        ],
    )
    print(energy.report())
    # --8<-- [end:fit]
    return history.history


if __name__ == "__main__":
    main()
