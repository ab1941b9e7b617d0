"""Sample gates inside the compiled Keras train step.

:class:`GateState` is a Keras metric: its variables travel with the trainer's
metric state on every backend (JAX included), its result is the fraction of
this epoch's samples that learned (``plasticity/samples_learned``), and it holds
the mistake memory of :class:`~energy_callbacks.core.MemorizedMistakes` as one
int8 flag per sample id. :func:`gated_compute_loss` wraps a model's
``compute_loss``: gated-out samples get sample weight 0 (the loss keeps its
normalization by the full batch), and a batch with no gated-in sample gets a loss
of exactly ``0 * loss``, so its gradient is all zero and the optimizer wrapper
skips the step.

Sample ids (for memorized mistakes) come with the inputs: give ``x`` as a dict
with the ids under ``index``/``idx``/``sample_id`` next to the model's named
inputs (a functional model takes its inputs by name and leaves the ids; Keras
warns that the dict has an extra key), or pass ``sample_ids=fn(x, y)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import keras
from keras import ops

from ..core.samples import MemorizedMistakes, SampleGate
from .distribute import gather
from .ops import keras_ops

ID_KEYS = ("index", "idx", "sample_id")
DEFAULT_CAPACITY = 1 << 20
"""Sample ids the in-graph mistake memory holds unless ``MemorizedMistakes(capacity=)``."""

SampleIds = Callable[[Any, Any], Any]


class GateState(keras.metrics.Metric):
    """Sample counts (this epoch and in total) and the mistake memory, as metric state."""

    def __init__(self, gate: SampleGate | None = None, name: str = "plasticity/samples_learned"):
        super().__init__(name=name)
        self.sample_gate = gate
        self.epoch_counts = self.add_variable(
            (2,), initializer="zeros", dtype="int32", aggregation="sum", name="epoch_counts"
        )
        # seen, learned, ids not remembered (outside [0, capacity)), targets outside the classes
        self.total_counts = self.add_variable(
            (4,), initializer="zeros", dtype="int32", aggregation="sum", name="total_counts"
        )
        self.memory = None
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

    # Keras metrics are not saved; this one is: it travels with the optimizer wrapper
    def save_own_variables(self, store: Any) -> None:
        for i, v in enumerate(self.variables):
            store[str(i)] = keras.ops.convert_to_numpy(v.value)

    def load_own_variables(self, store: Any) -> None:
        if len(store.keys()) != len(self.variables):
            raise ValueError(
                f"GateState: the checkpoint holds {len(store.keys())} gate variables, this "
                f"sample gate has {len(self.variables)}; resume with the same samples= rule"
            )
        for i, v in enumerate(self.variables):
            v.assign(store[str(i)])

    def reset_state(self) -> None:
        """Start a new epoch: the totals and the memory stay."""
        self.epoch_counts.assign(ops.zeros((2,), dtype="int32"))

    def update_state(
        self, seen: Any, learned: Any, unremembered: Any = 0, bad_targets: Any = 0
    ) -> None:
        step = ops.stack([ops.cast(seen, "int32"), ops.cast(learned, "int32")])
        self.epoch_counts.assign(self.epoch_counts.value + step)
        odd = ops.stack([ops.cast(unremembered, "int32"), ops.cast(bad_targets, "int32")])
        self.total_counts.assign(self.total_counts.value + ops.concatenate([step, odd]))

    def result(self) -> Any:
        seen, learned = self.epoch_counts.value[0], self.epoch_counts.value[1]
        return ops.cast(learned, "float32") / ops.cast(ops.maximum(seen, 1), "float32")

    def decide(self, outputs: Any, targets: Any, ids: Any) -> Any:
        """The gate's mask for a batch (all True without a gate); updates the memory.

        Checked when the step is traced: targets that cannot fit the outputs, ids that
        are not integers. Counted in the step (it cannot raise): targets outside the
        classes (they count as mistakes: the loss decides what they mean) and ids
        outside ``[0, capacity)`` (judged, never remembered).
        """
        gate = self.sample_gate
        if gate is None:
            return ops.ones((ops.shape(outputs)[0],), dtype="bool")
        targets, self._bad_targets = _class_targets(targets, outputs)
        if not isinstance(gate, MemorizedMistakes):
            return gate.gate(outputs, targets, ids, keras_ops)
        if ids is None:
            raise ValueError(
                "MemorizedMistakes needs sample ids: give x as a dict with an 'index' entry "
                "next to the model's named inputs, or pass PlasticityCallback(sample_ids=fn(x, y))"
            )
        assert self.memory is not None
        wrong = gate.base.gate(outputs, targets, ids, keras_ops)
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

    def counts(self) -> tuple[int, int, int, int]:
        """``(seen, learned, ids not remembered, targets outside the classes)`` so far."""
        seen, learned, lost, bad = (
            int(x) for x in keras.ops.convert_to_numpy(self.total_counts.value)
        )
        return seen, learned, lost, bad

    def flagged(self) -> int:
        """How many sample ids the mistake memory holds."""
        if self.memory is None:
            return 0
        return int(keras.ops.convert_to_numpy(ops.sum(ops.cast(self.memory.value, "int32"))))


def _class_targets(targets: Any, outputs: Any) -> tuple[Any, Any]:
    """Class indices as int32 (Keras labels come as int64, float or shape (batch, 1));
    one-hot or probability rows are left as they are. Also how many class ids are not
    ids of the outputs' classes (negative, too large, or not whole numbers)."""
    targets = ops.convert_to_tensor(targets)
    classes = outputs.shape[-1]
    if len(targets.shape) == 2 and targets.shape[1] == 1:
        targets = ops.reshape(targets, (-1,))
    if len(targets.shape) == 1:
        ok = ops.logical_and(ops.greater_equal(targets, 0), ops.less(targets, classes))
        if "float" in keras.backend.standardize_dtype(targets.dtype):
            ok = ops.logical_and(ok, ops.equal(targets, ops.floor(targets)))
        return ops.cast(targets, "int32"), ops.sum(ops.cast(ops.logical_not(ok), "int32"))
    fits = len(targets.shape) == 2 and targets.shape[1] in (None, classes)
    if not fits or len(outputs.shape) != 2:
        raise ValueError(
            f"sample gate: targets of shape {tuple(targets.shape)} do not fit outputs of shape "
            f"{tuple(outputs.shape)}: give class ids of shape (batch,) or one-hot/probability "
            "rows of shape (batch, classes). The gates judge one class prediction per sample; "
            "for regression use samples=None."
        )
    return targets, 0


def ids_from(x: Any) -> Any:
    """The sample ids in a dict input ``x`` (keys ``index``/``idx``/``sample_id``), or None."""
    if isinstance(x, Mapping):
        return next((x[k] for k in ID_KEYS if k in x), None)
    return None


def gated_compute_loss(
    model: Any, original: Callable[..., Any], state: GateState, sample_ids: SampleIds | None
) -> Callable[..., Any]:
    """``model.compute_loss`` with the sample gate applied in training."""
    takes_training = model._compute_loss_has_training_arg

    def compute_loss(x=None, y=None, y_pred=None, sample_weight=None, training=True):  # type: ignore[no-untyped-def]
        kwargs = {"training": training} if takes_training else {}
        if not training:
            return original(x, y, y_pred, sample_weight, **kwargs)
        ids = ids_from(x) if sample_ids is None else sample_ids(x, y)
        outputs = y_pred
        while isinstance(outputs, (list, tuple)):
            outputs = outputs[0]
        if isinstance(outputs, Mapping):
            outputs = next(iter(outputs.values()))
        state._unremembered = state._bad_targets = 0
        mask = state.decide(ops.stop_gradient(outputs), y, ids)
        if state.sample_gate is not None:
            w = ops.cast(mask, "float32")
            if sample_weight is None:
                sample_weight = w
            else:
                sw = ops.cast(sample_weight, "float32")
                sample_weight = sw * ops.reshape(w, (-1,) + (1,) * (len(sw.shape) - 1))
        loss = original(x, y, y_pred, sample_weight, **kwargs)
        learned = ops.sum(ops.cast(mask, "int32"))
        state.update_state(ops.shape(mask)[0], learned, state._unremembered, state._bad_targets)
        if state.sample_gate is not None:
            loss = ops.where(learned > 0, loss, loss * 0)
        return loss

    return compute_loss
