"""One demo run through Keras 3 ``model.fit`` with the energy callback.

The same MLP as the Lightning run, from the same initial weights, on the same
batches in the same order, on whatever backend ``KERAS_BACKEND`` selects. The
energy lands in ``<out>/keras/<rule>.csv`` (``CSVLogger``, listed after the
energy callback so that it sees the energy keys).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from ..core import MemorizedMistakes, Plasticity  # noqa: E402
from ..keras import PlasticityCallback  # noqa: E402
from .config import (  # noqa: E402
    DemoConfig,
    DemoData,
    batches_per_epoch,
    epoch_order,
    initial_weights,
)
from .result import RunResult  # noqa: E402


def framework_name() -> str:
    """``keras/<backend>``, e.g. ``keras/tensorflow``."""
    return f"keras/{keras.backend.backend()}"


class EpochBatches(keras.utils.PyDataset):  # type: ignore[misc]
    """Training batches in :func:`~energy_callbacks.demo.config.epoch_order`.

    With ``with_ids`` the inputs are ``{"pixels": x, "index": ids}``, the ids the
    mistake memory keys on. :class:`EpochStart` sets the epoch from the fit
    loop's own count: the dataset's ``on_epoch_begin``/``on_epoch_end`` also run
    around the peek at the first batches that some backends make before training.
    """

    def __init__(
        self, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, with_ids: bool
    ) -> None:
        super().__init__()
        self.x, self.y, self.batch_size, self.seed, self.with_ids = x, y, batch_size, seed, with_ids
        self.order = epoch_order(len(y), seed, 0)

    def __len__(self) -> int:
        return batches_per_epoch(len(self.y), self.batch_size)

    def __getitem__(self, i: int) -> tuple[Any, np.ndarray]:
        idx = self.order[i * self.batch_size : (i + 1) * self.batch_size]
        if self.with_ids:
            return {"pixels": self.x[idx], "index": idx.astype(np.int64)}, self.y[idx]
        return self.x[idx], self.y[idx]

    def set_epoch(self, epoch: int) -> None:
        self.order = epoch_order(len(self.y), self.seed, epoch)


class EpochStart(keras.callbacks.Callback):  # type: ignore[misc]
    """Tells the batches which epoch starts, and calls ``tick()`` after every batch
    (the demo's progress bar)."""

    def __init__(self, batches: EpochBatches, tick: Callable[[], None]) -> None:
        super().__init__()
        self.batches, self.tick = batches, tick

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.batches.set_epoch(epoch)

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self.tick()


def build_model(weights: tuple[np.ndarray, ...]) -> keras.Model:
    """The demo MLP with the given torch-layout weights (Keras kernels are transposed)."""
    w1, b1, w2, b2 = weights
    inputs = keras.Input((w1.shape[1],), name="pixels")
    hidden = keras.layers.Dense(w1.shape[0], activation="relu")
    outputs = keras.layers.Dense(w2.shape[0])
    model = keras.Model(inputs, outputs(hidden(inputs)))
    hidden.set_weights([w1.T, b1])
    outputs.set_weights([w2.T, b2])
    return model


def check_rule(plasticity: Plasticity) -> None:
    """Raise the Keras adapter's ValueError for a rule it refuses, before any training."""
    PlasticityCallback(plasticity)


def run_keras(
    config: DemoConfig,
    data: DemoData,
    rule: str,
    plasticity: Plasticity,
    tick: Callable[[], None],
) -> RunResult:
    """Train the demo MLP with ``plasticity`` through ``model.fit``; its figures and log."""
    weights = initial_weights(data.x_train.shape[1], config.hidden, data.n_classes, config.seed)
    model = build_model(weights)
    model.compile(
        optimizer=keras.optimizers.SGD(config.lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    energy = PlasticityCallback(plasticity)
    log = Path(config.out) / "keras" / f"{rule}.csv"
    log.parent.mkdir(parents=True, exist_ok=True)
    with_ids = isinstance(plasticity.samples, MemorizedMistakes)
    batches = EpochBatches(data.x_train, data.y_train, config.batch_size, config.seed, with_ids)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The structure of `inputs`")  # the ids
        model.fit(
            batches,
            validation_data=(data.x_test, data.y_test),
            epochs=config.epochs,
            shuffle=False,  # the batches come in epoch_order already
            verbose=0,
            callbacks=[energy, keras.callbacks.CSVLogger(str(log)), EpochStart(batches, tick)],
        )
    seconds = time.perf_counter() - start
    logits = model.predict(data.x_test, batch_size=1000, verbose=0)
    return RunResult(
        framework=framework_name(),
        rule=rule,
        accuracy=float(np.mean(np.argmax(logits, axis=1) == data.y_test)),
        report=energy.report(),
        seconds=seconds,
        log=log,
    )
