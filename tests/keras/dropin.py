"""The Keras adapter on the Keras code people write, per backend, against an independent
witness: ``KERAS_BACKEND=jax python dropin.py OUT`` (run by tests/keras/test_<backend>.py).

The witness is a plain Keras callback that snapshots the weights around every batch
(``model.get_weights()``) and sums ``|dw|`` and the changed entries itself, and judges
each batch with the weights it started from. The custom ``train_step``s are those of
the keras.io guide "Customizing what happens in fit()", one per backend.
"""

from __future__ import annotations

import json
import sys
import warnings

import keras
import numpy as np

from energy_callbacks import FixedSubnetwork, Plasticity, TopFraction, TopUnits
from energy_callbacks.keras import PlasticityCallback, sample_weight

warnings.filterwarnings("ignore", message="The structure of `inputs`")
BACKEND = keras.backend.backend()
RESULTS: dict[str, object] = {"backend": BACKEND}
N, D, BATCH = 64, 8, 16
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def data(classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D)).astype("float32")
    return x, (np.abs(x[:, :classes]).argmax(1)).astype("int32")


class Witness(keras.callbacks.Callback):
    """Weights around each batch, the batch's samples judged by the weights it starts
    from, and the logs each batch showed (listed after the PlasticityCallback)."""

    def __init__(self, x=None, y=None, head=None) -> None:
        super().__init__()
        self.x, self.y, self.head = x, y, head
        self.m1, self.m0, self.steps, self.learned = 0.0, 0, 0, 0
        self.changed: list[list[int]] = []  # per step, per variable: entries changed
        self.units: list[list[int]] = []  # per step, per variable: last-axis units changed
        self.columns: list[list[tuple[int, ...]]] = []  # per step: which units changed
        self.logged: list[float] = []

    def on_train_batch_begin(self, batch, logs=None):
        self.before = [np.array(w, np.float64) for w in self.model.get_weights()]
        if self.x is not None:
            xb = self.x[batch * BATCH : (batch + 1) * BATCH]
            out = self.model(xb, training=False)
            if self.head is not None:
                out = out[self.head]
            wrong = np.argmax(keras.ops.convert_to_numpy(out), 1) != self.y_batch(batch)
            self.learned += int(wrong.sum())

    def y_batch(self, batch):
        return self.y[batch * BATCH : (batch + 1) * BATCH]

    def on_train_batch_end(self, batch, logs=None):
        after = [np.array(w, np.float64) for w in self.model.get_weights()]
        if len(after) != len(self.before):  # built by its first step (TensorFlow)
            self.before = None
            return
        diffs = [a - b for a, b in zip(after, self.before)]
        self.m1 += float(sum(np.abs(d).sum() for d in diffs))
        self.m0 += int(sum(np.count_nonzero(d) for d in diffs))
        self.steps += int(any(np.any(d != 0) for d in diffs))
        self.changed.append([int(np.count_nonzero(d)) for d in diffs])
        cols = [np.flatnonzero((d != 0).reshape(-1, d.shape[-1]).any(0)) for d in diffs]
        self.units.append([len(c) for c in cols])
        self.columns.append([tuple(int(i) for i in c) for c in cols])
        if "plasticity/energy" in logs:
            self.logged.append(float(logs["plasticity/energy"]))


def summary(cb: PlasticityCallback, witness: Witness | None = None) -> dict:
    r = cb.report()
    out = {
        "m1": r.m1,
        "m0": r.m0,
        "m1_min": r.m1_min,
        "steps": r.steps,
        "seen": r.samples_seen,
        "learned": r.samples_learned,
    }
    if witness is not None:
        out["witness"] = {
            "m1": witness.m1,
            "m0": witness.m0,
            "steps": witness.steps,
            "learned": witness.learned,
            "changed": witness.changed,
            "units": witness.units,
            "columns": witness.columns,
            "logged": witness.logged,
        }
    return out


def error_of(fn) -> str:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the message is what the test reads
        return f"{type(exc).__name__}: {exc}"
    return ""


# -- the keras.io guide's custom train_step, as each backend's version writes it ---------------
# own_loss: the loss comes from a loss object, not model.compute_loss; weighted: that loss
# takes energy_callbacks.keras.sample_weight; stateless (JAX): the loss through
# stateless_compute_loss, which the sample gate needs there.
STYLE = {"own_loss": False, "weighted": False, "stateless": False}


def guide_metrics(model, loss, y, y_pred) -> dict:
    """The guide's metric updates at the end of its stateful train_step."""
    for metric in model.metrics:
        if metric.name == "loss":
            metric.update_state(loss)
        else:
            metric.update_state(y, y_pred)
    return {m.name: m.result() for m in model.metrics}


def loss_of(model, x, y, y_pred):
    if STYLE["own_loss"]:
        w = sample_weight(model, y, y_pred, x) if STYLE["weighted"] else None
        return LOSS(y, y_pred, sample_weight=w)
    return model.compute_loss(x=x, y=y, y_pred=y_pred)


if BACKEND == "tensorflow":
    import tensorflow as tf

    class GuideModel(keras.Model):
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                loss = loss_of(self, x, y, y_pred)
            trainable_vars = self.trainable_variables
            gradients = tape.gradient(loss, trainable_vars)
            self.optimizer.apply(gradients, trainable_vars)
            return guide_metrics(self, loss, y, y_pred)

elif BACKEND == "jax":
    import jax

    class GuideModel(keras.Model):
        def compute_loss_and_updates(
            self, trainable_variables, non_trainable_variables, metrics_variables, x, y,
            training=False,
        ):  # fmt: skip
            y_pred, non_trainable_variables = self.stateless_call(
                trainable_variables, non_trainable_variables, x, training=training
            )
            if STYLE["stateless"]:
                loss, (_, non_trainable_variables, metrics_variables) = (
                    self.stateless_compute_loss(
                        trainable_variables, non_trainable_variables, metrics_variables,
                        x=x, y=y, y_pred=y_pred,
                    )
                )  # fmt: skip
            else:
                loss = loss_of(self, x, y, y_pred)
            return loss, (y_pred, non_trainable_variables, metrics_variables)

        def train_step(self, state, data):
            trainable_variables, non_trainable_variables, optimizer_variables, metrics_variables = (
                state
            )
            x, y = data
            grad_fn = jax.value_and_grad(self.compute_loss_and_updates, has_aux=True)
            (loss, (y_pred, non_trainable_variables, metrics_variables)), grads = grad_fn(
                trainable_variables, non_trainable_variables, metrics_variables, x, y,
                training=True,
            )  # fmt: skip
            trainable_variables, optimizer_variables = self.optimizer.stateless_apply(
                optimizer_variables, grads, trainable_variables
            )
            new_metrics_vars, logs = [], {}
            for metric in self.metrics:
                n = len(new_metrics_vars)
                this = metrics_variables[n : n + len(metric.variables)]
                if metric.name == "loss":
                    this = metric.stateless_update_state(this, loss)
                else:
                    this = metric.stateless_update_state(this, y, y_pred)
                logs[metric.name] = metric.stateless_result(this)
                new_metrics_vars += this
            state = (trainable_variables, non_trainable_variables, optimizer_variables,
                     new_metrics_vars)  # fmt: skip
            return logs, state

else:
    import torch

    class GuideModel(keras.Model):
        def train_step(self, data):
            x, y = data
            self.zero_grad()
            y_pred = self(x, training=True)
            loss = loss_of(self, x, y, y_pred)
            loss.backward()
            trainable_weights = [v for v in self.trainable_weights]
            gradients = [v.value.grad for v in trainable_weights]
            with torch.no_grad():
                self.optimizer.apply(gradients, trainable_weights)
            return guide_metrics(self, loss, y, y_pred)


def guide_model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inp = keras.Input((D,))
    hidden = keras.layers.Dense(16, activation="relu", name="hidden")(inp)
    model = GuideModel(inp, keras.layers.Dense(3, name="out")(hidden))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS, metrics=["accuracy"])
    return model


def fit_guide(rule: dict, **style) -> dict:
    STYLE.update({"own_loss": False, "weighted": False, "stateless": False, **style})
    x, y = data()
    model = guide_model()
    cb = PlasticityCallback(**rule)
    witness = Witness(x, y)
    model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0,
              callbacks=[cb, witness])  # fmt: skip
    return summary(cb, witness)


def scenario_guide() -> None:
    out = {}
    for name, rule in (("measure", {}), ("top 10%", {"synapses": 0.1})):
        out[name] = fit_guide(rule)
    out["sizes"] = [int(np.prod(w.shape)) for w in guide_model().get_weights()]
    gated = {}
    if BACKEND == "jax":  # the guide's compute_loss runs outside a stateless scope there
        gated["compute_loss"] = error_of(lambda: fit_guide({"samples": "lazy"}))
        gated["stateless_compute_loss"] = fit_guide({"samples": "lazy"}, stateless=True)
    else:
        gated["compute_loss"] = fit_guide({"samples": "lazy"})
        gated["sample_weight"] = fit_guide({"samples": "lazy"}, own_loss=True, weighted=True)
    gated["own loss"] = error_of(lambda: fit_guide({"samples": "lazy"}, own_loss=True))
    out["gated"] = gated
    RESULTS["guide"] = out


# -- models that fit builds ---------------------------------------------------------------------
class Subclassed(keras.Model):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = keras.layers.Dense(16, activation="tanh")
        self.out = keras.layers.Dense(3)

    def call(self, x):
        return self.out(self.hidden(x))


def unbuilt(kind: str) -> keras.Model:
    keras.utils.set_random_seed(0)
    if kind == "sequential":
        return keras.Sequential([keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(3)])
    return Subclassed()


def scenario_built_by_fit() -> None:
    x, y = data()
    out = {}
    for kind in ("sequential", "subclassed"):
        for name, rule in (("top 10%", {"synapses": 0.1}), ("units", {"units": 0.5})):
            runs = []
            for build_first in (False, True):
                model = unbuilt(kind)
                if build_first:  # the witness run: built before fit, the path that was exact
                    model(x[:1])
                model.compile(optimizer=keras.optimizers.Adam(0.01), loss=LOSS)
                cb = PlasticityCallback(**rule)
                model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0,
                          callbacks=[cb])  # fmt: skip
                runs.append(summary(cb) | {"weights": [w.ravel().tolist() for w in
                                                         model.get_weights()]})  # fmt: skip
            out[f"{kind}, {name}"] = runs
    RESULTS["built_by_fit"] = out


# -- several outputs ------------------------------------------------------------------------------
def two_heads(kind: str) -> keras.Model:
    keras.utils.set_random_seed(0)
    inp = keras.Input((D,))
    hidden = keras.layers.Dense(16, activation="relu", name="hidden")(inp)
    a = keras.layers.Dense(3, name="a")(hidden)
    b = keras.layers.Dense(4, name="b")(keras.layers.Dropout(0.0)(hidden))
    model = keras.Model(inp, {"a": a, "b": b} if kind == "dict" else [a, b])
    losses = {"a": LOSS, "b": LOSS} if kind == "dict" else [LOSS, LOSS]
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=losses)
    return model


def scenario_outputs() -> None:
    x, ya = data(3)
    _, yb = data(4, seed=1)
    out = {}
    for kind, which, head in (("dict", "a", "a"), ("list", 1, 1), ("dict", "b", "b")):
        model = two_heads(kind)
        targets = {"a": ya, "b": yb} if kind == "dict" else [ya, yb]
        cb = PlasticityCallback(samples="lazy", outputs=which)
        witness = Witness(x, ya if head in ("a", 0) else yb, head=head)
        model.fit(x, targets, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                  callbacks=[cb, witness])  # fmt: skip
        out[f"{kind} {which}"] = summary(cb, witness)
    model = two_heads("dict")
    out["no outputs="] = error_of(
        lambda: model.fit(x, {"a": ya, "b": yb}, batch_size=BATCH, epochs=1, verbose=0,
                          callbacks=[PlasticityCallback(samples="lazy")])  # fmt: skip
    )
    out["unknown name"] = error_of(
        lambda: model.fit(x, {"a": ya, "b": yb}, batch_size=BATCH, epochs=1, verbose=0,
                          callbacks=[PlasticityCallback(samples="lazy", outputs="c")])  # fmt: skip
    )
    # units on two heads: the hidden layer selects half its units, both heads keep all
    model = two_heads("dict")
    cb = PlasticityCallback(units=0.5)
    witness = Witness()
    model.fit(x, {"a": ya, "b": yb}, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
              callbacks=[cb, witness])  # fmt: skip
    out["units on two heads"] = summary(cb, witness) | {
        "paths": [v.path for v in model.trainable_variables],
        "outputs": list(cb.optimizer.plasticity.topology.outputs),
    }
    # a Sequential used as a layer, then a head: the head is the output, whatever the order
    keras.utils.set_random_seed(0)
    inner = keras.Sequential([keras.Input((D,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(12, activation="relu")], name="trunk")  # fmt: skip
    inp = keras.Input((D,))
    model = keras.Model(inp, keras.layers.Dense(3, name="head")(inner(inp)))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    cb = PlasticityCallback(units=0.5)
    witness = Witness()
    model.fit(x, ya, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
              callbacks=[cb, witness])  # fmt: skip
    out["units on a nested model"] = summary(cb, witness) | {
        "paths": [v.path for v in model.trainable_variables],
        "outputs": list(cb.optimizer.plasticity.topology.outputs),
    }
    RESULTS["outputs"] = out


# -- recurrent layers and attention under unit rules ---------------------------------------------
def scenario_recurrent() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 5, 4)).astype("float32")
    y = rng.integers(0, 3, N)
    out = {}
    for kind in ("lstm", "gru", "mha"):
        keras.utils.set_random_seed(0)
        inp = keras.Input((5, 4))
        if kind == "lstm":
            z = keras.layers.LSTM(6, name="rnn")(inp)
        elif kind == "gru":
            z = keras.layers.GRU(6, name="rnn")(inp)
        else:
            attended = keras.layers.MultiHeadAttention(2, 3, name="mha")(inp, inp)
            z = keras.layers.GlobalAveragePooling1D()(attended)
        model = keras.Model(inp, keras.layers.Dense(3, name="out")(z))
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
        cb = PlasticityCallback(units=0.5)
        witness = Witness()
        fit = lambda m=model, c=cb, w=witness: m.fit(  # noqa: E731
            x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[c, w]
        )
        if kind == "mha":
            out[kind] = error_of(fit)
            continue
        fit()
        out[kind] = summary(cb, witness) | {
            "paths": [v.path for v in model.trainable_variables],
            "shapes": [list(v.shape) for v in model.trainable_variables],
        }
    RESULTS["recurrent"] = out


# -- misuse refused at fit start ----------------------------------------------------------------
def small() -> keras.Model:
    keras.utils.set_random_seed(0)
    inp = keras.Input((D,))
    hidden = keras.layers.Dense(16, activation="relu", name="hidden")(inp)
    model = keras.Model(inp, keras.layers.Dense(3, name="out")(hidden))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    return model


def scenario_refused() -> None:
    x, y = data()
    out = {}

    def fit(model, cb):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[cb])

    cb = PlasticityCallback(synapses=0.5)
    fit(small(), cb)
    out["second model"] = error_of(lambda: fit(small(), cb))
    out["k = units"] = error_of(lambda: fit(small(), PlasticityCallback(units=FixedSubnetwork(16))))
    out["top k = units"] = error_of(lambda: fit(small(), PlasticityCallback(units=TopUnits(k=20))))
    RESULTS["refused"] = out


# -- a checkpoint written mid-fit, loaded and fitted without the callback ----------------------
def scenario_checkpoint() -> None:
    import os
    import subprocess
    import tempfile
    from pathlib import Path

    x, y = data()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "mid.keras")
        model = small()
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                  callbacks=[PlasticityCallback(synapses=0.1),
                             keras.callbacks.ModelCheckpoint(path)])  # fmt: skip
        loaded = keras.models.load_model(path)
        out["optimizer"] = type(loaded.optimizer).__name__
        witness = Witness()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                       callbacks=[witness])  # fmt: skip
        said = [str(w.message) for w in caught]
        out["warnings"] = [s for s in said if "PlasticityOptimizer" in s]
        out["changed"] = witness.changed
        out["sizes"] = [int(np.prod(w.shape)) for w in loaded.get_weights()]
        code = "import keras; keras.models.load_model(__import__('sys').argv[1])"
        env = dict(os.environ, KERAS_BACKEND=BACKEND, TF_CPP_MIN_LOG_LEVEL="2")
        proc = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                              env=env, timeout=300)  # fmt: skip
        out["without import"] = proc.stderr.strip().splitlines()[-1] if proc.returncode else ""
    RESULTS["checkpoint"] = out


# -- callback order: the keys reach callbacks listed before the PlasticityCallback -------------
def scenario_order() -> None:
    import csv
    import tempfile
    from pathlib import Path

    x, y = data()
    seen_keys: list[list[str]] = []

    class Before(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen_keys.append(sorted(logs))

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "log.csv"
        model = small()
        cb = PlasticityCallback(samples="lazy")
        model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0,
                  validation_data=(x, y),
                  callbacks=[keras.callbacks.CSVLogger(str(path)), Before(), cb])  # fmt: skip
        with open(path) as f:
            rows = list(csv.DictReader(f))
    report = cb.report()
    RESULTS["order"] = {
        "columns": sorted(rows[0]),
        "energy": [float(r["plasticity/energy"]) for r in rows],
        "m1": report.m1,
        "batch_keys": seen_keys[0],
    }


# -- the masked step outside XLA (jit_compile=False) equals the compiled one --------------------
def scenario_eager() -> None:
    x, y = data()
    out = {}
    for jit in (True, False):
        model = small()
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss=LOSS, jit_compile=jit)
        cb = PlasticityCallback(Plasticity(synapses=TopFraction(0.1)))
        witness = Witness()
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                  callbacks=[cb, witness])  # fmt: skip
        out[f"jit {jit}"] = summary(cb, witness)
    RESULTS["eager"] = out


SCENARIOS = {
    "guide": scenario_guide,
    "built_by_fit": scenario_built_by_fit,
    "outputs": scenario_outputs,
    "recurrent": scenario_recurrent,
    "refused": scenario_refused,
    "order": scenario_order,
    "checkpoint": scenario_checkpoint,
    "eager": scenario_eager,
}


def main() -> None:
    only = sys.argv[2].split(",") if len(sys.argv) > 2 else list(SCENARIOS)
    for name in only:
        SCENARIOS[name]()
    with open(sys.argv[1], "w") as f:
        json.dump(RESULTS, f)


if __name__ == "__main__":
    main()
