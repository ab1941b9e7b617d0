"""A Keras run for test_kill_resume.py: ``python kill_keras.py MODE WORKDIR [STEP]``
(with ``KERAS_BACKEND`` set).

- ``straight``: 3 epochs of 8 batches, never interrupted;
- ``run``: the same with ``ModelCheckpoint(save_freq=3)`` writing the whole model
  (weights, the optimizer wrapper with its energy totals, the mistake memory) every 3
  batches; at batch ``STEP`` (counted over the run) it writes ``WORKDIR/ready`` and waits
  to be killed (the test sends SIGKILL);
- ``resume``: a new process loads the newest checkpoint, fits the rest of its epoch (the
  batches after it), then the remaining epochs.

Keras 3 restores a mid-epoch ``BackupAndRestore`` backup at the start of its epoch (it
saves the batch but restores only the epoch), so the batches before the backup would be
trained again; resuming exactly needs the batch, which the checkpoint's name carries.
``straight`` and ``resume`` write ``WORKDIR/<mode>.json``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from energy_callbacks.core import TopFraction  # noqa: E402
from energy_callbacks.keras import PlasticityCallback  # noqa: E402

N, BATCH, EPOCHS = 64, 8, 3
STEPS = N // BATCH


def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, 12)).astype("float32")
    y = np.abs(x[:, :4]).argmax(1).astype("int32")
    y[::5] = (y[::5] + 1) % 4  # some hard samples: mistakes to remember
    return {"features": x, "index": np.arange(N)}, y


def model() -> keras.Model:
    keras.utils.set_random_seed(0)
    inp = keras.Input((12,), name="features")
    hidden = keras.layers.Dense(16, activation="tanh", name="hidden")(inp)
    net = keras.Model(inp, keras.layers.Dense(4, name="head")(hidden))
    net.compile(
        optimizer=keras.optimizers.Adam(0.02),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return net


def callback() -> PlasticityCallback:
    return PlasticityCallback(synapses=TopFraction(0.5), samples="mistakes")


class WaitToBeKilled(keras.callbacks.Callback):
    def __init__(self, step: int, workdir: Path) -> None:
        super().__init__()
        self.step, self.workdir, self.seen = step, workdir, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.step:
            (self.workdir / "ready").write_text(str(self.seen))
            while True:
                time.sleep(1)


def fit(net, energy, x, y, epochs: int, initial_epoch: int = 0, extra=()):
    net.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=epochs,
        initial_epoch=initial_epoch,
        shuffle=False,
        verbose=0,
        callbacks=[energy, *extra],
    )


def newest(ckpts: Path) -> tuple[Path, int, int]:
    """The newest checkpoint and its (epoch, batches done in it), from e{epoch}-b{batch}."""
    found = []
    for p in ckpts.glob("*.keras"):
        epoch, batch = (int(v) for v in re.fullmatch(r"e(\d+)-b(\d+)\.keras", p.name).groups())
        found.append(((epoch - 1) * STEPS + batch, p, epoch - 1, batch))  # names are 1-based
    _, path, epoch, done = max(found)
    return path, epoch, done


def main() -> None:
    mode, workdir = sys.argv[1], Path(sys.argv[2])
    ckpts = workdir / "ckpt"
    x, y = data()
    energy = callback()
    resumed_from = None
    if mode in ("straight", "run"):
        net = model()
        extra = []
        if mode == "run":
            ckpts.mkdir(parents=True, exist_ok=True)
            path = str(ckpts / "e{epoch}-b{batch}.keras")
            extra = [
                keras.callbacks.ModelCheckpoint(path, save_freq=3),
                WaitToBeKilled(int(sys.argv[3]), workdir),
            ]
        fit(net, energy, x, y, EPOCHS, extra=extra)
    else:
        path, epoch, done = newest(ckpts)
        resumed_from = path.name
        net = keras.models.load_model(path)
        if done < STEPS:  # the rest of the checkpoint's epoch
            rest = {k: v[done * BATCH :] for k, v in x.items()}
            fit(net, energy, rest, y[done * BATCH :], epoch + 1, initial_epoch=epoch)
        fit(net, energy, x, y, EPOCHS, initial_epoch=epoch + 1)
    report = energy.report()
    memory = np.asarray(energy.optimizer.gate.memory.value)
    result = {
        "m1": report.m1,
        "m0": report.m0,
        "m1_min": report.m1_min,
        "steps": report.steps,
        "seen": report.samples_seen,
        "learned": report.samples_learned,
        "per_layer": {k: [v.m1, v.m0, v.m1_min] for k, v in report.per_layer.items()},
        "flagged": np.flatnonzero(memory).tolist(),
        "weights": [np.asarray(w).ravel().tolist() for w in net.get_weights()],
        "iterations": int(np.asarray(net.optimizer.iterations)),
        "resumed_from": resumed_from,
    }
    (workdir / f"{mode}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
