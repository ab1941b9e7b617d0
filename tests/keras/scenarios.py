"""Keras scenarios, run in a subprocess per backend: ``KERAS_BACKEND=jax python scenarios.py OUT``.

Keras fixes its backend per process, so tests/keras/test_<backend>.py run this
script once per backend and checks the JSON it writes. Every scenario compares
the adapter with the NumPy core on the same numbers.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import tempfile
import warnings

import keras
import numpy as np
from keras import ops

from energy_callbacks.core import (
    Caching,
    FixedSubnetwork,
    Plasticity,
    Threshold,
    TopFraction,
    Topology,
    TopUnits,
)
from energy_callbacks.data import load_digits, paper_inputs
from energy_callbacks.keras import PlasticityCallback, PlasticityOptimizer
from energy_callbacks.keras.layers import describe
from energy_callbacks.reference import PaperMLP

warnings.filterwarnings("ignore", message="The structure of `inputs`")
BACKEND = keras.backend.backend()
RESULTS: dict[str, object] = {"backend": BACKEND}


def paper_loss(y_true, y_pred):
    return 0.5 * ops.sum(ops.square(y_pred - y_true), axis=-1)


def paper_model(ref: PaperMLP) -> keras.Model:
    """The reference MLP in Keras, with the NumPy model's weights (kernels transposed)."""
    n_in, n_hidden, n_out = ref.sizes
    inp = keras.Input((n_in,), name="features")
    hidden = keras.layers.LeakyReLU(negative_slope=ref.slope)(keras.layers.Dense(n_hidden)(inp))
    model = keras.Model(inp, keras.layers.Dense(n_out)(hidden))
    w1, b1, w2, b2 = ref.params
    model.set_weights([w1.T, b1, w2.T, b2])
    return model


def weights_as_ref(model: keras.Model) -> list[np.ndarray]:
    w1, b1, w2, b2 = (np.asarray(w) for w in model.get_weights())
    return [w1.T, b1, w2.T, b2]


def report_dict(report) -> dict[str, float]:
    return {
        "m1": report.m1,
        "m0": report.m0,
        "m1_min": report.m1_min,
        "steps": report.steps,
        "skipped": report.skipped_steps,
        "seen": report.samples_seen,
        "learned": report.samples_learned,
        "energy": report.energy,
        "updates": report.updates,
        "consolidation": report.consolidation,
        "maintenance": report.maintenance,
        "transient": report.transient,
        "joules": report.joules,
    }


# -- 1. the paper MLP, batch 1, SGD, against the NumPy reference loop -----------
PAPER_RULES = {
    "backprop": dict(),
    "top-fraction": dict(synapses=0.1),
    "equal-count": dict(synapses=TopFraction(0.05, equal_count=True)),
    "per-unit": dict(synapses=TopFraction(0.1, per_unit=True)),
    "path": dict(units=TopUnits(0.2, path=True)),
    "fixed": dict(units=FixedSubnetwork(5, seed=1)),
    "combined": dict(units=TopUnits(0.2, path=True), synapses=0.1),
    "approximate": dict(synapses=TopFraction(0.1, approximate=True)),
    "lazy": dict(samples="lazy"),
    "mistakes": dict(samples="mistakes"),
}


def paper_oracle(ref: PaperMLP, rule: dict, x, y, order, lr=0.01):
    plasticity = Plasticity(**rule).setup(ref.topology())
    eye = np.eye(10, dtype=np.float32)
    for i in order:
        ids = np.array([i])
        gate = plasticity.gate(ref.forward(x[ids])[2], y[ids], ids)
        if not gate.any:
            continue
        plasticity.step([-lr * g for g in ref.gradients(x[ids], eye[y[ids]])], ref.params)
    if plasticity.caching is not None:
        plasticity.consolidate()  # as the callback's on_train_end
    return plasticity.report()


def scenario_paper(rules: dict | None = None, key: str = "paper") -> None:
    ds = load_digits(seed=0)
    x, mean = paper_inputs(ds.train.images)
    y = ds.train.labels
    order = np.random.default_rng(1).integers(0, len(x), 150)
    out = {}
    for name, rule in (rules or PAPER_RULES).items():
        ref = PaperMLP(64, 30, 10, seed=3)
        model = paper_model(ref)
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss=paper_loss)
        cb = PlasticityCallback(**copy.deepcopy(rule))
        inputs = {"features": x[order], "index": order}
        model.fit(
            inputs,
            np.eye(10, dtype=np.float32)[y[order]],
            batch_size=1,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[cb],
        )
        expected = paper_oracle(ref, rule, x, y, order)
        got = weights_as_ref(model)
        out[name] = {
            "keras": report_dict(cb.report()),
            "oracle": report_dict(expected),
            "max_weight_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(got, ref.params)),
        }
    RESULTS[key] = out


# -- 2. batched Adam, replayed by hand with the NumPy masks ----------------------
ADAM_RULES = {
    "combined+lazy": dict(units=TopUnits(0.5, path=True), synapses=0.2, samples="lazy"),
    "per-unit": dict(synapses=TopFraction(0.1, per_unit=True)),
    "mistakes": dict(synapses=0.3, samples="mistakes"),
    "lazy, measure only": dict(samples="lazy"),
}


def small_model(seed: int = 0, features: int = 12, width: int = 16) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inp = keras.Input((features,), name="features")
    hidden = keras.layers.Dense(width, activation="tanh")(inp)
    return keras.Model(inp, keras.layers.Dense(4)(hidden))


def small_data(n: int = 96, features: int = 12):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, features)).astype("float32")
    y = (np.abs(x[:, :4]).argmax(1)).astype("int32")
    return x, y


def fit_with_ids(model, rule: dict, x, y, batch_size: int, epochs: int) -> PlasticityCallback:
    """Fit in order with sample ids in a dict ``x``; returns the fresh callback used."""
    cb = PlasticityCallback(**copy.deepcopy(rule))
    model.fit(
        {"features": x, "index": np.arange(len(x))},
        y,
        batch_size=batch_size,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=[cb],
    )
    return cb


def fit_small_twice(model, rule: dict, skip_first: bool = False) -> tuple[dict, list[np.ndarray]]:
    """Two epochs of 128 samples, batch 16, ids in x; the callback's figures and the weights.

    Shared by the data-parallel scripts (mirrored.py, jax_data_parallel.py), which
    compare a distributed run with one device. ``skip_first`` labels the first batch
    with the initial model's predictions, so that a lazy gate skips its first step.
    """
    x, y = small_data(128)
    if skip_first:
        y[:16] = ops.convert_to_numpy(small_model()(x[:16])).argmax(1)
    cb = fit_with_ids(model, rule, x, y, batch_size=16, epochs=2)
    rep = cb.report()
    summary = {
        "m1": rep.m1,
        "energy": rep.energy,
        "m0": rep.m0,
        "steps": rep.steps,
        "seen": rep.samples_seen,
        "learned": rep.samples_learned,
        "flagged": cb.optimizer.gate.flagged(),
    }
    return summary, [np.asarray(w) for w in model.get_weights()]


def compile_small(model, optimizer=None, **kwargs):
    model.compile(
        optimizer=optimizer or keras.optimizers.Adam(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **kwargs,
    )


def adam_replay(rule: dict, x, y, batch: int, **shape):
    """Plain Adam step by step; the NumPy core masks each proposal (``shape``: of
    :func:`small_model`)."""
    model = small_model(**shape)
    compile_small(model)
    topology = Topology.chain(describe(model.trainable_variables))
    plasticity = Plasticity(**copy.deepcopy(rule)).setup(topology)
    ids_all = np.arange(len(x))
    for start in range(0, len(x), batch):
        ids = ids_all[start : start + batch]
        outputs = ops.convert_to_numpy(model(x[ids]))
        gate = plasticity.gate(outputs, y[ids], ids)
        if not gate.any:
            continue
        before = [np.asarray(w) for w in model.get_weights()]
        model.train_on_batch(x[ids], y[ids], sample_weight=gate.mask.astype("float32"))
        after = [np.asarray(w) for w in model.get_weights()]
        proposed = [a - b for a, b in zip(after, before)]
        step = plasticity.step(proposed)
        model.set_weights(
            [a if m is None else np.where(m, a, b) for a, b, m in zip(after, before, step.masks)]
        )
    return model, plasticity.report()


def scenario_adam() -> None:
    x, y = small_data()
    # the first two batches are what the initial model predicts: a lazy gate skips them
    y[:16] = ops.convert_to_numpy(small_model()(x[:16])).argmax(1)
    out = {}
    for name, rule in ADAM_RULES.items():
        settings = [("plain", {})]
        if BACKEND != "torch":
            settings.append(("jit+spe4", dict(jit_compile=True, steps_per_execution=4)))
        ref_model, expected = adam_replay(rule, x, y, 8)
        for label, kwargs in settings:
            model = small_model()
            compile_small(model, **kwargs)
            cb = fit_with_ids(model, rule, x, y, batch_size=8, epochs=1)
            got = cb.report()
            out[f"{name}/{label}"] = {
                "keras": report_dict(got),
                "host_step": cb.optimizer._host is not None,
                "oracle": report_dict(expected),
                "iterations": int(np.asarray(model.optimizer.iterations)),
                "max_weight_diff": max(
                    float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                    for a, b in zip(model.get_weights(), ref_model.get_weights())
                ),
            }
    RESULTS["adam"] = out


WIDE_RULES = {
    "tracking": {},
    "exact": dict(synapses=TopFraction(0.1)),
    "approximate": dict(synapses=TopFraction(0.1, approximate=True)),
    "threshold": dict(synapses=Threshold(1e-3)),
    "path+top": dict(units=TopUnits(0.25, path=True), synapses=0.2),
    "mistakes+top": dict(synapses=0.3, samples="mistakes"),
}
"""Rules on tensors long enough for the selections' long paths (51 200 entries)."""


def scenario_wide() -> None:
    """Adam on a 400-128-4 MLP against a NumPy replay, and which step the torch
    backend took (its fused CPU step where the rule allows)."""
    shape = dict(features=400, width=128)
    x, y = small_data(64, features=400)
    out = {}
    for name, rule in WIDE_RULES.items():
        ref_model, expected = adam_replay(rule, x, y, 16, **shape)
        model = small_model(**shape)
        compile_small(model)
        cb = fit_with_ids(model, rule, x, y, batch_size=16, epochs=1)
        out[name] = {
            "keras": report_dict(cb.report()),
            "oracle": report_dict(expected),
            "host_step": cb.optimizer._host is not None,
            "max_weight_diff": max(
                float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(model.get_weights(), ref_model.get_weights())
            ),
        }
    RESULTS["wide"] = out


# -- 3. resume from checkpoints ------------------------------------------------
RESUME_RULE = dict(synapses=0.3, samples="mistakes")


class Interrupt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            raise RuntimeError("interrupted")


def fit_resume(model, callbacks, epochs, initial_epoch=0):
    x, y = small_data()
    return model.fit(
        {"features": x, "index": np.arange(len(x))},
        y,
        batch_size=8,
        epochs=epochs,
        initial_epoch=initial_epoch,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )


def summary(cb, model) -> dict:
    rep = report_dict(cb.report())
    rep["flagged"] = cb.optimizer.gate.flagged()
    rep["weights"] = [np.asarray(w).ravel().tolist() for w in model.get_weights()]
    return rep


def scenario_resume(tmp: str) -> None:
    straight = small_model()
    compile_small(straight)
    cb = PlasticityCallback(**copy.deepcopy(RESUME_RULE))
    fit_resume(straight, [cb], 2)
    out = {"straight": summary(cb, straight)}

    # ModelCheckpoint after epoch 1, load_model, one more epoch with a new callback
    path = os.path.join(tmp, "ckpt.keras")
    first = small_model()
    compile_small(first)
    cb1 = PlasticityCallback(**copy.deepcopy(RESUME_RULE))
    fit_resume(first, [cb1, keras.callbacks.ModelCheckpoint(path)], 1)
    loaded = keras.models.load_model(path, custom_objects={"paper_loss": paper_loss})
    out["loaded_optimizer"] = type(loaded.optimizer).__name__
    cb2 = PlasticityCallback(**copy.deepcopy(RESUME_RULE))
    fit_resume(loaded, [cb2], 2, initial_epoch=1)
    out["checkpoint"] = summary(cb2, loaded)

    # BackupAndRestore: the first fit raises after epoch 1 (the wrapper stays installed);
    # the same model object fits again and resumes from the backup
    model = small_model()
    compile_small(model)
    backup = keras.callbacks.BackupAndRestore(os.path.join(tmp, "backup"))
    cb3 = PlasticityCallback(**copy.deepcopy(RESUME_RULE))
    try:
        fit_resume(model, [cb3, backup, Interrupt()], 2)
    except RuntimeError:
        pass
    out["left_installed"] = type(model.optimizer).__name__
    cb4 = PlasticityCallback(**copy.deepcopy(RESUME_RULE))
    fit_resume(model, [cb4, keras.callbacks.BackupAndRestore(os.path.join(tmp, "backup"))], 2)
    out["backup"] = summary(cb4, model)
    out["restored_optimizer"] = type(model.optimizer).__name__
    out["compute_loss_restored"] = "compute_loss" not in model.__dict__
    out["metrics_after"] = [m.name for m in model.metrics]
    RESULTS["resume"] = out


# -- 4. logs, NaN steps, non-trainable variables, serialization -----------------
class BatchLogs(keras.callbacks.Callback):
    """What the callbacks after PlasticityCallback see in every batch's logs."""

    def __init__(self) -> None:
        super().__init__()
        self.energy: list[float] = []
        self.updates: list[float] = []

    def on_train_batch_end(self, batch, logs=None):
        self.energy.append(float(logs["plasticity/energy"]))
        self.updates.append(float(logs["plasticity/updates"]))


def scenario_misc(tmp: str) -> None:
    x, y = small_data()
    model = small_model()
    compile_small(model, metrics=["accuracy"])
    csv = os.path.join(tmp, "log.csv")
    cb = PlasticityCallback(synapses=0.2, samples="lazy", per_layer=True)
    batches = BatchLogs()
    history = model.fit(
        x,
        y,
        batch_size=16,
        epochs=2,
        verbose=0,
        validation_data=(x[:32], y[:32]),
        callbacks=[cb, batches, keras.callbacks.CSVLogger(csv)],
    )
    with open(csv) as f:
        header = f.readline().strip().split(",")
    RESULTS["logs"] = {
        "history": sorted(history.history),
        "csv": sorted(header),
        "energy": history.history["plasticity/energy"],
        "report_m1": cb.report().m1,
        "report_m0": cb.report().m0,
        "batch_energy": batches.energy,
        "batch_updates": batches.updates,
    }

    # a NaN batch: skipped, counted, Adam's state untouched
    model = small_model()
    compile_small(model)
    bad = x.copy()
    bad[16:24] = np.nan
    for key, rule in (("nan", dict(synapses=0.5)), ("nan, measure only", {})):
        model = small_model()
        compile_small(model)
        cb = PlasticityCallback(**rule)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(bad, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
        RESULTS[key] = {
            "report": report_dict(cb.report()),
            "iterations": int(np.asarray(model.optimizer.iterations)),
            "finite": bool(all(np.isfinite(np.asarray(w)).all() for w in model.get_weights())),
        }

    # BatchNormalization and a frozen layer: only trainable variables count
    keras.utils.set_random_seed(0)
    inp = keras.Input((12,))
    h = keras.layers.Dense(8, name="frozen")(inp)
    h = keras.layers.BatchNormalization(name="bn")(h)
    model = keras.Model(inp, keras.layers.Dense(4, name="head")(h))
    model.get_layer("frozen").trainable = False
    compile_small(model)
    cb = PlasticityCallback(units=0.5)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[cb])
    RESULTS["trainable_only"] = sorted(cb.report().per_layer)

    # the wrapper serializes and reloads with its rules
    wrapper = PlasticityOptimizer(
        keras.optimizers.AdamW(0.01, clipnorm=1.0),
        Plasticity(units=TopUnits(0.1, path=True), synapses=0.05, samples="mistakes"),
    )
    again = keras.optimizers.deserialize(keras.optimizers.serialize(wrapper))
    RESULTS["serialize"] = {
        "class": type(again).__name__,
        "inner": type(again.inner_optimizer).__name__,
        "same_config": again.get_config() == wrapper.get_config(),
    }

    # gradient accumulation and clipnorm on the inner optimizer
    model = small_model()
    compile_small(model, keras.optimizers.SGD(0.1, clipnorm=0.5, gradient_accumulation_steps=2))
    cb = PlasticityCallback(synapses=0.25)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
    rep = cb.report()
    RESULTS["accumulation"] = {
        "steps": rep.steps,
        "m0": rep.m0,
        "per_step_cap": sum(
            max(1, round(0.25 * t.size)) for t in cb.optimizer.plasticity.topology.tensors
        ),
    }


# -- 5. selections on long tensors (the bisection search), inside a compiled function ----
def scenario_selection() -> None:
    from energy_callbacks.core.ops import numpy_ops
    from energy_callbacks.keras import ops as keras_ops_module
    from energy_callbacks.keras.ops import Difference as keras_ops_difference
    from energy_callbacks.keras.ops import keras_ops

    rng = np.random.default_rng(0)
    n = 100_003
    cases = {
        "normal": np.abs(rng.standard_normal(n)),
        "ties": rng.integers(0, 3, n) * 0.5,
        "mostly zero": np.where(rng.random(n) < 0.05, rng.random(n), 0),
        "heavy tail": np.abs(rng.standard_cauchy(n)),
    }
    compiled = {
        "tensorflow": lambda f: __import__("tensorflow").function(f, jit_compile=True),
        "jax": lambda f: __import__("jax").jit(f),
    }.get(BACKEND, lambda f: f)
    # compiled once each and called on every distribution (same shapes: no retrace)
    exact = {
        k: compiled(lambda s, k=k: keras_ops.top_k_mask(ops.reshape(s, (1, n)), k))
        for k in (1, 10_000, 50_001, n - 1)
    }
    approximate_top = compiled(lambda s: keras_ops.approx_top_mask(s, 10_000))
    magnitude = {
        a: compiled(lambda s, a=a: keras_ops.top_magnitude_mask(s, 10_000, a))
        for a in (False, True)
    }
    out = {}

    def of_a_change(k):
        """A step's proposal, unwritten: the selection reads after - before at each round,
        plain and masked by an earlier rule (kept unwritten: zero outside the mask)."""
        return compiled(
            lambda a, b, m: (
                keras_ops.top_magnitude_mask(keras_ops_difference(a, b), k),
                keras_ops.top_magnitude_mask(keras_ops.keep(keras_ops_difference(a, b), m), k),
            )
        )

    def check_change(label, select, signed, k):
        after = rng.standard_normal(len(signed)).astype("float32")
        before = (after - signed).astype("float32")
        keep = rng.random(len(signed)) < 0.3
        got = select(*(ops.convert_to_tensor(v) for v in (after, before, keep)))
        for key, mask, want in (
            ("difference", got[0], after - before),
            ("masked difference", got[1], np.where(keep, after - before, 0)),
        ):
            want = numpy_ops.top_magnitude_mask(want, k)
            out[f"{label}{key} k={k}"] = bool((ops.convert_to_numpy(mask) == want).all())

    difference = of_a_change(10_000)
    for name, x in cases.items():
        x = x.astype("float32")
        for k, fn in exact.items():
            got = ops.convert_to_numpy(fn(ops.convert_to_tensor(x)))[0]
            out[f"{name}/exact k={k}"] = bool((got == numpy_ops.top_k_mask(x[None], k)[0]).all())
        got = ops.convert_to_numpy(approximate_top(ops.convert_to_tensor(x)))
        out[f"{name}/approximate"] = bool((got == numpy_ops.approx_top_mask(x, 10_000)).all())
        # the rules' entry point: signed updates, ranked by magnitude
        signed = np.where(rng.random(n) < 0.5, -x, x)
        for approximate, fn in magnitude.items():
            got = ops.convert_to_numpy(fn(ops.convert_to_tensor(signed)))
            want = numpy_ops.top_magnitude_mask(signed, 10_000, approximate)
            out[f"{name}/magnitude approximate={approximate}"] = bool((got == want).all())
        # one k (one compile): the ties, bracket and count passes are the same code; each
        # count pass sums slices of 1000 entries here (a loop, and the tail)
        chunk, keras_ops_module.MEASURE_CHUNK = keras_ops_module.MEASURE_CHUNK, 1000
        try:
            check_change(f"{name}/", difference, signed, 10_000)
        finally:
            keras_ops_module.MEASURE_CHUNK = chunk
    # tensors too short for a strided sample: their bits searched by counts alone
    short, short_difference = 10_007, of_a_change(1000)
    for name, x in cases.items():
        signed = np.where(rng.random(short) < 0.5, -x[:short], x[:short]).astype("float32")
        check_change(f"{name}/short ", short_difference, signed, 1000)
    # how the adapter compiles: TensorFlow's measure-only step in its own kernels, its
    # masked step under XLA (where a pass reduces rows by XLA's variadic reduction)
    compilers = {"compiled": compiled}
    if BACKEND == "tensorflow":
        compilers = {
            "graph": __import__("tensorflow").function,
            "xla": keras_ops_module.xla_on_tensorflow,
        }
    # a pass's reductions (a sum, a count, a least and a greatest), in rows of 1000 and
    # a tail of 3, or slices of 1000 entries
    x = rng.standard_normal(n).astype("float32")
    levels = (x * 1000).astype("int32")

    def figures(a):
        scaled = ops.cast(a * 1000, "int32")
        return (ops.abs(a), ops.greater(a, 0.5), scaled, scaled)

    inits = (np.float32(0), np.int32(0), np.int32(2**31 - 1), np.int32(-(2**31)))
    chunk, keras_ops_module.MEASURE_CHUNK = keras_ops_module.MEASURE_CHUNK, 1000
    try:
        for how, compile_with in compilers.items():
            fn = compile_with(
                lambda a: keras_ops_module._reduce_over_slices(
                    figures,
                    (a,),
                    tuple(ops.convert_to_tensor(i) for i in inits),
                    1000,
                    (keras_ops_module.SUM,) * 2 + (keras_ops_module.MIN, keras_ops_module.MAX),
                )
            )
            total, count, least, greatest = (
                ops.convert_to_numpy(r) for r in fn(ops.convert_to_tensor(x))
            )
            out[f"reductions ({how})"] = bool(
                np.isclose(total, np.abs(x).sum(dtype=np.float64), rtol=1e-5)
                and count == (x > 0.5).sum()
                and least == levels.min()
                and greatest == levels.max()
            )
    finally:
        keras_ops_module.MEASURE_CHUNK = chunk
    # a step's totals, summed slice by slice (1000 entries a slice here)
    chunk, keras_ops_module.MEASURE_CHUNK = keras_ops_module.MEASURE_CHUNK, 1000
    try:
        after = rng.standard_normal(n).astype("float32")
        before = np.where(rng.random(n) < 0.3, after, rng.standard_normal(n)).astype("float32")
        keep = rng.random(n) < 0.4
        d = np.abs(after.astype(np.float64) - before)
        for masked in (False, True) if BACKEND != "torch" else (False,):  # torch: no mask
            for how, compile_with in compilers.items():
                fn = compile_with(
                    lambda a, b, m, masked=masked: keras_ops_module.change_totals(
                        a, b, 1.5, m if masked else None
                    )
                )
                m1, m0, m_alpha, whole = (
                    float(ops.convert_to_numpy(t))
                    for t in fn(*(ops.convert_to_tensor(v) for v in (after, before, keep)))
                )
                c = np.where(keep, d, 0) if masked else d
                out[f"change totals in slices, masked={masked} ({how})"] = bool(
                    m0 == np.count_nonzero(c)
                    and np.isclose(m1, c.sum(), rtol=1e-5)
                    and np.isclose(m_alpha, (c**1.5).sum(), rtol=1e-5)
                    and np.isclose(whole, d.sum(), rtol=1e-5)
                )
    finally:
        keras_ops_module.MEASURE_CHUNK = chunk
    # kernels, whose passes read rows the shape's trailing axes give, with ties at the
    # cut (a step's changes are multiples of the weights' rounding) and a unit rule's
    # mask along an axis: plain, and masked (what the combined rule ranks)
    for shape, axis in (((128, 300), 1), ((3, 3, 8, 40), 3), ((640, 7), 0)):
        size = int(np.prod(shape))
        step = (rng.integers(0, 6, shape) * 0.25).astype("float32")
        new = rng.standard_normal(shape).astype("float32")
        old = (new - np.where(rng.random(shape) < 0.5, -step, step)).astype("float32")
        units = rng.random(shape[axis]) < 0.3
        ranked = compiled(
            lambda a, b, u, shape=shape, axis=axis, size=size: (
                keras_ops.top_magnitude_mask(keras_ops_difference(a, b), size // 10),
                keras_ops.top_magnitude_mask(
                    keras_ops.keep(
                        keras_ops_difference(a, b), keras_ops.expand_units(u, shape, axis)
                    ),
                    size // 10,
                ),
            )
        )
        got = ranked(*(ops.convert_to_tensor(v) for v in (new, old, units)))
        view = [1] * len(shape)
        view[axis] = shape[axis]
        d = (new - old).reshape(-1)
        kept = np.where(np.broadcast_to(units.reshape(view), shape).reshape(-1), d, 0)
        for key, mask, want in (("kernel", got[0], d), ("kernel, unit mask", got[1], kept)):
            want = numpy_ops.top_magnitude_mask(want, size // 10)
            same = (ops.convert_to_numpy(mask).reshape(-1) == want).all()
            out[f"ties/{key} {shape}"] = bool(same)
    grads = [ops.convert_to_tensor(after), ops.convert_to_tensor(before)]
    bad = np.array(after)
    bad[n // 2] = np.inf
    out["all_finite"] = bool(ops.convert_to_numpy(keras_ops_module.all_finite(grads))) and not bool(
        ops.convert_to_numpy(keras_ops_module.all_finite([grads[0], ops.convert_to_tensor(bad)]))
    )
    RESULTS["selection"] = out


# -- the loop over slices -------------------------------------------------------------
def scenario_slice_loop() -> None:
    """The loop over slices that sums and steps big tensors: its result, and that its
    buffers go when the caller drops them, without the garbage collector (Keras's
    fori_loop on torch left them in reference cycles: 1.0x of a tensor per step)."""
    import gc
    import weakref

    from energy_callbacks.keras import ops as keras_ops_module

    chunk, keras_ops_module.MEASURE_CHUNK = keras_ops_module.MEASURE_CHUNK, 100
    gc.collect()
    gc.disable()
    try:
        x = ops.convert_to_tensor(np.arange(1050, dtype="float32"))

        def step(start, size, carry):
            buffer, total = carry
            part = keras_ops_module.cut(x, start, size)
            return keras_ops_module.put(buffer, start, part * 2), total + ops.sum(part)

        out = keras_ops_module.over_slices(1050, step, (ops.zeros_like(x), ops.zeros(())))
        written = ops.convert_to_numpy(out[0]).tolist()
        total = float(out[1])
        buffer = weakref.ref(out[0])
        del out
        freed = buffer() is None
    finally:
        gc.enable()
        keras_ops_module.MEASURE_CHUNK = chunk
    RESULTS["slice_loop"] = {
        "written": written == (2 * np.arange(1050)).tolist(),
        "total": total,
        "freed": freed,
    }


# -- 6. the accumulators over 1e5 steps ------------------------------------------------
def scenario_accumulators() -> None:
    from energy_callbacks.keras.optimizer import COUNT_BITS, carry_count, two_sum

    rng = np.random.default_rng(0)
    steps = 100_000
    x = np.abs(rng.standard_normal(steps)) * rng.choice([1e-4, 1.0, 1e3], steps)
    x = x.astype("float32")
    counts = rng.integers(0, 800_000, steps).astype("int32")
    xs, cs = ops.convert_to_tensor(x), ops.convert_to_tensor(counts)

    def body(i, state):
        total, error, naive, low, high = state
        total, error = two_sum(total, error, xs[i])
        low, high = carry_count(low, high, cs[i])
        return total, error, naive + xs[i], low, high

    zero_f, zero_i = ops.zeros((), "float32"), ops.zeros((), "int32")
    fn = lambda: ops.fori_loop(0, steps, body, (zero_f, zero_f, zero_f, zero_i, zero_i))  # noqa: E731
    if BACKEND == "jax":
        fn = __import__("jax").jit(fn)
    elif BACKEND == "tensorflow":
        fn = __import__("tensorflow").function(fn, jit_compile=True)
    total, error, naive, low, high = (ops.convert_to_numpy(v) for v in fn())
    exact = float(np.sum(x.astype(np.float64)))
    RESULTS["accumulators"] = {
        "two_sum_rel_error": abs(float(total) + float(error) - exact) / exact,
        "naive_rel_error": abs(float(naive) - exact) / exact,
        "count": (int(high) << COUNT_BITS) + int(low),
        "count_exact": int(counts.astype(np.int64).sum()),
    }


# -- 7. synaptic caching: the paper MLP against the NumPy reference; resume; logs -------
CACHING_RULES = {
    "synapse, decay": dict(caching=Caching(0.004, 40.0, 1e-3), cost="sram"),
    "layer_max + top 10%": dict(synapses=0.1, caching=Caching(0.01, 25.0, 1e-4, "layer_max")),
    "layer_sum + path": dict(
        units=TopUnits(0.2, path=True), caching=Caching(0.5, math.inf, 1e-3, "layer_sum")
    ),
    "lazy + synapse": dict(samples="lazy", caching=Caching(0.004, 10.0, 1e-3)),
    # no mask, no decay: the weights keep the update (restored for a skipped step)
    "mistakes + synapse, no decay": dict(
        samples="mistakes", caching=Caching(0.004, math.inf, 1e-3)
    ),
}
CACHING_RESUME = dict(synapses=0.3, samples="mistakes", caching=Caching(0.2, 30.0, 1e-3))


def scenario_caching(tmp: str) -> None:
    from energy_callbacks.keras import ops as keras_ops_module

    # compiled, the synapse scope steps a slice at a time: 500 entries here, so the
    # paper net's 64 x 30 weights take a loop of 3 slices and a tail
    chunk, keras_ops_module.MEASURE_CHUNK = keras_ops_module.MEASURE_CHUNK, 500
    try:
        _scenario_caching(tmp)
    finally:
        keras_ops_module.MEASURE_CHUNK = chunk


def _scenario_caching(tmp: str) -> None:
    scenario_paper(CACHING_RULES, "caching")

    straight = small_model()
    compile_small(straight)
    cb = PlasticityCallback(**copy.deepcopy(CACHING_RESUME))
    batches = BatchLogs()
    history = fit_resume(straight, [cb, batches], 2)
    out = {"straight": summary(cb, straight) | report_dict(cb.report())}
    out["history"] = sorted(history.history)
    out["batch_energy"] = batches.energy
    out["epoch_energy"] = history.history["plasticity/energy"]

    path = os.path.join(tmp, "caching.keras")
    first = small_model()
    compile_small(first)
    cb1 = PlasticityCallback(**copy.deepcopy(CACHING_RESUME))
    fit_resume(first, [cb1, keras.callbacks.ModelCheckpoint(path)], 1)
    loaded = keras.models.load_model(path, custom_objects={"paper_loss": paper_loss})
    out["loaded_store"] = float(
        sum(np.abs(s).sum() for s in loaded.optimizer.caching_state()["store"])
    )
    cb2 = PlasticityCallback(**copy.deepcopy(CACHING_RESUME))
    fit_resume(loaded, [cb2], 2, initial_epoch=1)
    out["checkpoint"] = summary(cb2, loaded) | report_dict(cb2.report())
    RESULTS["caching_resume"] = out


def scenario_saved_file() -> None:
    """A model checkpointed mid-fit by the package before its per-framework folders
    (tests/keras/data/make_saved_wrapper.py) loads and continues its totals."""
    from pathlib import Path

    from energy_callbacks import MemorizedMistakes, TopFraction

    here = Path(__file__).parent / "data"
    model = keras.models.load_model(here / "saved_wrapper.keras")
    wrapper = model.optimizer
    state = wrapper.energy_state()
    rule = Plasticity(synapses=TopFraction(0.2), samples=MemorizedMistakes(capacity=64))
    cb = PlasticityCallback(rule)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = rng.integers(0, 3, size=64)
    model.fit(
        {"features": x, "index": np.arange(64)},
        y,
        batch_size=16,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[cb],
    )
    RESULTS["saved_file"] = {
        "wrapper": type(wrapper).__name__,
        "m0": [int(v) for v in np.asarray(state["m0"]).ravel()],
        "adopted": cb.optimizer is wrapper,
        "continued": report_dict(cb.report()),
    }


def scenario_big_counts() -> None:
    """Counts past float32's 2**24 reach the batch logs and History exactly."""
    model = small_model()
    rule = Plasticity(synapses=TopFraction(0.5))
    wrapper = PlasticityOptimizer(keras.optimizers.Adam(0.05), rule)
    compile_small(model, wrapper)
    wrapper.build(model.trainable_variables)
    high = wrapper._totals["m0_high"]  # the carried word: 2**20 per unit
    high.assign(ops.ones(high.shape, high.dtype) * (2**21 + 1))
    batches = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            batches.append(logs["plasticity/updates"])

    cb = PlasticityCallback(synapses=TopFraction(0.5))
    x, y = small_data()
    history = model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[cb, Record()])
    report = cb.report()
    # past the packed readout's exact range the per-batch read falls back to the totals
    high.assign(ops.ones(high.shape, high.dtype) * (2**24 + 1))
    wrapper.refresh_readout()
    past = int(np.sum(np.asarray(wrapper.energy_state()["m0"], np.int64)))
    RESULTS["big_counts"] = {
        "m0": report.m0,
        "batch": [float(b) for b in batches],
        "history": float(history.history["plasticity/updates"][-1]),
        "past": past,
        "past_read": cb.optimizer.totals()[1],
    }


def main() -> None:
    out_path = sys.argv[1]
    only = sys.argv[2].split(",") if len(sys.argv) > 2 else None
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in [
            ("paper", scenario_paper),
            ("adam", scenario_adam),
            ("wide", scenario_wide),
            ("resume", lambda: scenario_resume(tmp)),
            ("misc", lambda: scenario_misc(tmp)),
            ("selection", scenario_selection),
            ("accumulators", scenario_accumulators),
            ("slice_loop", scenario_slice_loop),
            ("caching", lambda: scenario_caching(tmp)),
            ("saved_file", scenario_saved_file),
            ("big_counts", scenario_big_counts),
        ]:
            if only is None or name in only:
                fn()
    with open(out_path, "w") as f:
        json.dump(RESULTS, f)


if __name__ == "__main__":
    main()
