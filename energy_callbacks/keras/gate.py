"""Sample gates inside the compiled Keras train step.

:class:`GateState` is a Keras metric: its variables travel with the trainer's
metric state on every backend (JAX included); it counts the samples seen and
learned (the callback logs each epoch's share) and holds the mistake memory of
:class:`~energy_callbacks.core.MemorizedMistakes` as one int8 flag per sample
id. :func:`gated_compute_loss` wraps a model's ``compute_loss``: gated-out
samples get sample weight 0 (the loss keeps its normalization by the full
batch), and a batch with no gated-in sample gets a loss of exactly
``0 * loss``, so its gradient is all zero and the optimizer wrapper skips the
step.

Sample ids (for memorized mistakes) come with the inputs: give ``x`` as a dict
with the ids under ``index``/``idx``/``sample_id`` next to the model's named
inputs (a functional model takes its inputs by name and leaves the ids; Keras
warns that the dict has an extra key), or pass ``sample_ids=fn(x, y)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
from keras import ops

from ..core.samples import MemorizedMistakes, SampleGate
from ..core.targets import REGRESSION_HINT
from . import private
from .distribute import gather
from .ops import keras_ops

ID_KEYS = ("index", "idx", "sample_id")
DEFAULT_CAPACITY = 1 << 20
"""Sample ids the in-graph mistake memory holds unless ``MemorizedMistakes(capacity=)``."""

SampleIds = Callable[[Any, Any], Any]
Outputs = str | int | Callable[[Any, Any], tuple[Any, Any]] | None
HALF = ("float16", "bfloat16")


class GateState(keras.metrics.Metric):
    """Sample counts and the mistake memory, as metric state.

    The gated loss (:func:`gated_compute_loss`, :func:`sample_weight`) judges each
    batch and counts it. ``update_state(y_true, y_pred, sample_weight=None)`` is the
    metric call of a custom ``train_step`` that updates every metric: it counts a
    batch the loss did not judge (so a custom step without a gate still counts its
    samples), and with a gate it records that the loss was not gated, which the
    callback refuses after the first batch.
    """

    def __init__(self, gate: SampleGate | None = None, name: str = "plasticity/samples_learned"):
        super().__init__(name=name)
        self.sample_gate = gate
        # unused since the callback logs each epoch's share; kept so saved files load
        self.epoch_counts = self.add_variable(
            (2,), initializer="zeros", dtype="int32", aggregation="sum", name="epoch_counts"
        )
        # seen, learned, ids not remembered (outside [0, capacity)), targets outside the classes
        self.total_counts = self.add_variable(
            (4,), initializer="zeros", dtype="int32", aggregation="sum", name="total_counts"
        )
        self.memory = None
        # what the callback configures: which output is judged, where the ids come from
        self.outputs: Outputs = None
        self.output_names: Sequence[str] = ()
        self.sample_ids: SampleIds | None = None
        self._unremembered: Any = 0
        self._bad_targets: Any = 0
        if isinstance(gate, MemorizedMistakes):
            capacity = getattr(gate, "capacity", None) or DEFAULT_CAPACITY
            # replicas keep identical copies (they all see every id): read the first
            self.memory = self.add_variable(
                (capacity,),
                initializer="zeros",
                dtype="int8",
                aggregation="only_first_replica",
                name="memory",
            )
        # [1 when the loss judged this step's batch, samples counted outside the loss]
        self.outside_loss = self.add_variable(
            (2,),
            initializer="zeros",
            dtype="int32",
            aggregation="only_first_replica",
            name="outside_loss",
        )

    # Keras metrics are not saved; this one is: it travels with the optimizer wrapper
    def save_own_variables(self, store: Any) -> None:
        for i, v in enumerate(self.variables):
            store[str(i)] = keras.ops.convert_to_numpy(v.value)

    def load_own_variables(self, store: Any) -> None:
        # files saved before outside_loss existed hold one variable less: it starts at 0
        n = len(store.keys())
        if n not in (len(self.variables), len(self.variables) - 1):
            raise ValueError(
                f"GateState: the checkpoint holds {n} gate variables, this sample gate has "
                f"{len(self.variables)}; resume with the same samples= rule"
            )
        for i, v in enumerate(self.variables[:n]):
            v.assign(store[str(i)])

    def reset_state(self) -> None:
        """Nothing to reset: the counts run over the whole fit (the callback takes each
        epoch's share), and ``evaluate`` resets every metric."""

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        """A custom ``train_step``'s metric update: count the batch unless the loss did."""
        rows = ops.shape(keras.tree.flatten(y_pred)[0])[0]
        fresh = ops.cast(ops.equal(self.outside_loss.value[0], 0), "int32") * rows
        if self.sample_gate is None:  # nothing to gate: every sample counted learns
            self._count(fresh, fresh)
            self.outside_loss.assign(ops.zeros((2,), "int32"))
        else:  # a batch the gate never judged: its loss was not gated
            self.outside_loss.assign(ops.stack([0, self.outside_loss.value[1] + fresh]))

    def record(self, seen: Any, learned: Any, unremembered: Any = 0, bad_targets: Any = 0) -> None:
        """Count a batch the gated loss judged."""
        self._count(seen, learned, unremembered, bad_targets)
        self.outside_loss.assign(ops.stack([1, self.outside_loss.value[1]]))

    def _count(self, seen: Any, learned: Any, unremembered: Any = 0, bad_targets: Any = 0) -> None:
        step = ops.stack([ops.cast(seen, "int32"), ops.cast(learned, "int32")])
        odd = ops.stack([ops.cast(unremembered, "int32"), ops.cast(bad_targets, "int32")])
        self.total_counts.assign(self.total_counts.value + ops.concatenate([step, odd]))

    def result(self) -> dict[str, Any]:
        """No log entries of its own: the callback logs the gate's figures, so that
        validation does not copy them under ``val_`` names."""
        return {}

    def decide(self, outputs: Any, targets: Any, ids: Any) -> Any:
        """The gate's mask for a batch (all True without a gate); updates the memory.

        Checked when the step is traced: targets that cannot fit the outputs, ids that
        are not integers. Counted in the step (it cannot raise): targets that are no
        class (they learn as mistakes; the callback refuses them in the first batch)
        and ids outside ``[0, capacity)`` (judged, never remembered).
        """
        gate = self.sample_gate
        if gate is None:
            return ops.ones((ops.shape(outputs)[0],), dtype="bool")
        targets, bad = _class_targets(targets, outputs)
        self._bad_targets = ops.sum(ops.cast(bad, "int32"))
        if not isinstance(gate, MemorizedMistakes):
            return ops.logical_or(gate.gate(outputs, targets, ids, keras_ops), bad)
        if ids is None:
            raise ValueError(
                "MemorizedMistakes needs sample ids: give x as a dict with an 'index' entry "
                "next to the model's named inputs, or pass PlasticityCallback(sample_ids=fn(x, y))"
            )
        assert self.memory is not None
        wrong = ops.logical_or(gate.base.gate(outputs, targets, ids, keras_ops), bad)
        ids = ops.reshape(ops.convert_to_tensor(ids), (-1,))
        kind = keras.backend.standardize_dtype(ids.dtype)
        if "int" not in kind:
            raise ValueError(
                f"MemorizedMistakes: sample ids must be integers >= 0 (keys into the mistake "
                f"memory), got {kind}; give the dataset index"
            )
        # compared in their own dtype (int64 on TensorFlow and torch), then made int32
        valid = ops.logical_and(ops.greater_equal(ids, 0), ops.less(ids, self.capacity))
        safe = ops.cast(ops.where(valid, ids, ops.zeros_like(ids)), "int32")
        flagged = ops.logical_and(valid, ops.take(self.memory.value, safe) > 0)
        wrong_rows = ops.logical_and(valid, wrong)
        self._remember(gather(safe), gather(ops.cast(wrong_rows, "int32")) > 0)
        self._unremembered = ops.sum(ops.cast(ops.logical_not(valid), "int32"))
        return ops.logical_or(wrong, flagged)

    @property
    def capacity(self) -> int:
        assert self.memory is not None
        return int(self.memory.shape[0])

    def _remember(self, ids: Any, wrong: Any) -> None:
        """Flag the ``ids`` that are ``wrong`` (a repeated id: if any copy is wrong). Every
        row that shares an id writes the same value, so the scatter is deterministic."""
        same = ops.equal(ops.expand_dims(ids, 1), ops.expand_dims(ids, 0))
        wrong_any = ops.any(ops.logical_and(same, ops.expand_dims(wrong, 0)), axis=1)
        stored = ops.take(self.memory.value, ids)
        new = ops.maximum(stored, ops.cast(wrong_any, "int8"))
        self.memory.assign(ops.scatter_update(self.memory.value, ops.expand_dims(ids, 1), new))

    def ungated(self, values: Any = None) -> int:
        """Samples a custom ``train_step`` trained without the gate judging its loss."""
        value = self.outside_loss.value if values is None else values
        return int(keras.ops.convert_to_numpy(value)[1])

    def counts(self, values: Any = None) -> tuple[int, int, int, int]:
        """``(seen, learned, ids not remembered, targets outside the classes)`` so far
        (``values``: the current value of ``total_counts`` where it lives elsewhere)."""
        value = self.total_counts.value if values is None else values
        seen, learned, lost, bad = (int(x) for x in keras.ops.convert_to_numpy(value))
        return seen, learned, lost, bad

    def flagged(self) -> int:
        """How many sample ids the mistake memory holds."""
        if self.memory is None:
            return 0
        return int(keras.ops.convert_to_numpy(ops.sum(ops.cast(self.memory.value, "int32"))))


def _class_targets(targets: Any, outputs: Any) -> tuple[Any, Any]:
    """Class indices as int32 (Keras labels come as int64, float or shape (batch, 1));
    one-hot or probability rows are left as they are. Shapes that cannot be class
    targets raise when the step is traced; the values that are no class (fractional,
    negative or too large ids, rows that are no probabilities) are returned as a mask:
    the callback refuses them after the first batch, and they learn as mistakes."""
    targets = ops.convert_to_tensor(targets)
    classes = outputs.shape[-1]
    if len(outputs.shape) != 2 or classes is None or classes < 2:
        raise ValueError(
            f"sample gate: outputs of shape {tuple(outputs.shape)}; the gates judge one class "
            "prediction per sample, (batch, classes) with 2 classes or more, and argmax of "
            "one score is always 0. " + REGRESSION_HINT
        )
    if len(targets.shape) == 2 and targets.shape[1] == 1:
        targets = ops.reshape(targets, (-1,))
    if len(targets.shape) == 1:
        ok = ops.logical_and(ops.greater_equal(targets, 0), ops.less(targets, classes))
        if "float" in keras.backend.standardize_dtype(targets.dtype):
            ok = ops.logical_and(ok, ops.equal(targets, ops.floor(targets)))
        return ops.cast(targets, "int32"), ops.logical_not(ok)
    if len(targets.shape) != 2 or targets.shape[1] not in (None, classes):
        raise ValueError(
            f"sample gate: targets of shape {tuple(targets.shape)} do not fit outputs of shape "
            f"{tuple(outputs.shape)}: give class ids of shape (batch,) or one-hot/probability "
            "rows of shape (batch, classes). " + REGRESSION_HINT
        )
    rows = ops.cast(targets, "float32")
    tolerance = 1e-2 if keras.backend.standardize_dtype(targets.dtype) in HALF else 1e-4
    ok = ops.logical_and(
        ops.all(ops.greater_equal(rows, 0), axis=1),
        ops.less_equal(ops.abs(ops.sum(rows, axis=1) - 1), tolerance),
    )
    return targets, ops.logical_not(ok)


def ids_from(x: Any) -> Any:
    """The sample ids in a dict input ``x`` (keys ``index``/``idx``/``sample_id``), or None."""
    if isinstance(x, Mapping):
        return next((x[k] for k in ID_KEYS if k in x), None)
    return None


def pick_output(y: Any, y_pred: Any, outputs: Outputs, names: Sequence[str]) -> tuple[Any, Any]:
    """The ``(targets, class scores)`` the gate judges in a batch.

    ``outputs`` is None (a model with one output), an output's name or index in
    ``names`` (the model's ``output_names``), or ``fn(y, y_pred) -> (targets, scores)``.
    """
    if callable(outputs):
        return outputs(y, y_pred)  # type: ignore[no-any-return]
    if not isinstance(y_pred, (Mapping, list, tuple)):
        return y, y_pred
    flat = list(y_pred.values()) if isinstance(y_pred, Mapping) else list(y_pred)
    names = list(names) if len(names) == len(flat) else [str(i) for i in range(len(flat))]
    check_outputs(outputs, names)
    if outputs is None:
        return (y[0] if isinstance(y, (list, tuple)) else y), flat[0]
    index = names.index(outputs) if isinstance(outputs, str) else int(outputs)
    name = names[index]
    scores = y_pred[name] if isinstance(y_pred, Mapping) and name in y_pred else flat[index]
    if isinstance(y, Mapping):
        targets = y[name] if name in y else list(y.values())[index]
    elif isinstance(y, (list, tuple)):
        targets = y[index]
    else:
        targets = y
    return targets, scores


def check_outputs(outputs: Outputs, names: Sequence[str]) -> None:
    """Refuse at ``fit`` start an ``outputs=`` that names no output of a model with the
    output ``names``, or its absence where there are several."""
    if callable(outputs):
        return
    if outputs is None:
        if len(names) > 1:
            raise ValueError(
                f"sample gate: the model has {len(names)} outputs {list(names)}; say which one "
                "the gate judges: PlasticityCallback(outputs='name') (or an index, or "
                "fn(y, y_pred) -> (targets, scores))"
            )
    elif isinstance(outputs, str):
        if names and outputs not in names:
            raise ValueError(
                f"PlasticityCallback.outputs={outputs!r} names no output; the model's outputs "
                f"are {list(names)}"
            )
    elif names and not 0 <= int(outputs) < len(names):
        raise ValueError(
            f"PlasticityCallback.outputs={outputs!r} is no output index; the model has "
            f"{len(names)} outputs {list(names)}"
        )


def judge(state: GateState, x: Any, y: Any, y_pred: Any, ids: Any = None) -> Any:
    """Judge a batch with the gate of ``state``: count it and return the learners' mask
    (all True without a gate). ``ids`` default to those of ``x`` (or ``sample_ids``)."""
    if keras.backend.backend() == "jax" and not private.in_stateless_scope():
        raise ValueError(
            "sample gate: a custom JAX train_step computed its loss outside a stateless scope, "
            "where the gate can neither read its mistake memory nor count the batch. Compute "
            "the loss with self.stateless_compute_loss(trainable_variables, "
            "non_trainable_variables, metrics_variables, x, y, y_pred) and return its "
            "metrics_variables in the state, as Keras's own JAX train_step does."
        )
    targets, scores = pick_output(y, y_pred, state.outputs, state.output_names)
    if ids is None:
        ids = ids_from(x) if state.sample_ids is None else state.sample_ids(x, y)
    state._unremembered = 0
    state._bad_targets = ops.zeros((), "int32")
    mask = state.decide(ops.stop_gradient(scores), targets, ids)
    learned = ops.sum(ops.cast(mask, "int32"))
    state.record(ops.shape(mask)[0], learned, state._unremembered, state._bad_targets)
    return mask


def sample_weight(model: Any, y: Any, y_pred: Any, x: Any = None, ids: Any = None) -> Any:
    """The sample gate's per-sample weights for a custom ``train_step``'s own loss.

    ``loss = loss_fn(y, y_pred, sample_weight=sample_weight(self, y, y_pred, x))``:
    1.0 for the samples the gate lets learn, 0.0 for the others, and the batch is
    counted (``report().samples_seen``, ``samples_learned``, the mistake memory).
    None while no :class:`~energy_callbacks.keras.PlasticityCallback` with a sample
    gate is fitting the model, so the same step trains ungated without one. A batch
    in which no sample learns must give an all-zero gradient (a weighted sum does),
    so that the step is skipped. On JAX call it inside ``stateless_compute_loss``.
    """
    state = getattr(getattr(model, "optimizer", None), "gate", None)
    if not isinstance(state, GateState) or state.sample_gate is None:
        return None
    return ops.cast(judge(state, x, y, y_pred, ids), "float32")


def gated_compute_loss(
    model: Any, original: Callable[..., Any], state: GateState
) -> Callable[..., Any]:
    """``model.compute_loss`` with the sample gate applied in training."""
    takes_training = private.compute_loss_takes_training(model)

    def compute_loss(x=None, y=None, y_pred=None, sample_weight=None, training=True):  # type: ignore[no-untyped-def]
        kwargs = {"training": training} if takes_training else {}
        if not training:
            return original(x, y, y_pred, sample_weight, **kwargs)
        if state.sample_gate is None:
            if keras.backend.backend() != "jax" or private.in_stateless_scope():
                rows = ops.shape(keras.tree.flatten(y_pred)[0])[0]
                state.record(rows, rows)  # else the metric update of a custom step counts
            return original(x, y, y_pred, sample_weight, **kwargs)
        mask = judge(state, x, y, y_pred)
        w = ops.cast(mask, "float32")
        if sample_weight is None:
            sample_weight = w
        else:
            sw = ops.cast(sample_weight, "float32")
            sample_weight = sw * ops.reshape(w, (-1,) + (1,) * (len(sw.shape) - 1))
        loss = original(x, y, y_pred, sample_weight, **kwargs)
        return ops.where(ops.any(mask), loss, loss * 0)

    return compute_loss
