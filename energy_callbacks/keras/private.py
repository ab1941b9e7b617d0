"""The Keras internals the adapter touches, in one place.

Keras offers no public way to do these, so each is a single function here, checked
against Keras 3.15.1 (``keras/src/trainers/trainer.py``, ``compile_utils.py``, the JAX
trainer's ``_jax_state``, ``backend/common/stateless_scope.py``) on the TensorFlow,
JAX and torch backends; the tests in tests/keras run them on all three.
"""

from __future__ import annotations

import sys
from typing import Any

import keras
from keras.src.backend.common.stateless_scope import in_stateless_scope  # noqa: F401


def add_metric(model: Any, metric: Any) -> None:
    """Track ``metric`` as one of the model's own metrics (``model.metrics``), so its
    variables travel in the trainer's metric state (JAX) and its result in the logs."""
    model._metrics.append(metric)


def remove_metrics(model: Any, kind: type) -> None:
    """Stop tracking the model's own metrics of type ``kind``."""
    model._metrics[:] = [m for m in model._metrics if not isinstance(m, kind)]


def compiled_optimizer(model: Any) -> Any:
    """The optimizer ``compile`` recorded (what ``model.save`` writes as the optimizer)."""
    return model._compile_config.config.get("optimizer")


def set_compiled_optimizer(model: Any, optimizer: Any) -> None:
    model._compile_config.config["optimizer"] = optimizer


def compute_loss_takes_training(model: Any) -> bool:
    """Whether the trainer passes ``training=`` to ``model.compute_loss``."""
    return bool(model._compute_loss_has_training_arg)


def set_compute_loss_takes_training(model: Any, value: bool) -> None:
    model._compute_loss_has_training_arg = value


def forget_train_function(model: Any) -> None:
    """Drop the compiled train step so the next ``fit`` traces the current setup."""
    model.train_function = None


def live_state(model: Any, key: str) -> list[Any] | None:
    """JAX: the trainer's current values of ``optimizer_variables`` or
    ``metrics_variables`` mid-epoch (the variables themselves are synced only at
    epoch ends); None on other backends or when the variables are current."""
    state = getattr(model, "_jax_state", None)
    if state and not getattr(model, "_jax_state_synced", True):
        return state.get(key)  # type: ignore[no-any-return]
    return None


def live_value(model: Any, metric_variable: Any) -> Any:
    """The current value of one of the model's metric variables: on JAX mid-epoch from
    the trainer's state, elsewhere the variable's own value."""
    live = live_state(model, "metrics_variables")
    if live is None:
        return metric_variable.value
    index = next(i for i, v in enumerate(model.metrics_variables) if v is metric_variable)
    return live[index]


def sublayers(model: Any) -> list[Any]:
    """Every layer inside ``model`` (nested ones too), outer layers first."""
    return list(model._flatten_layers(include_self=False, recursive=True))


def graph_outputs(model: Any) -> list[Any] | None:
    """A functional (or Sequential) model's output tensors; None for a subclassed
    model, which has no graph to read."""
    try:
        outputs = model.outputs
    except (AttributeError, ValueError):
        return None
    if not outputs:
        return None
    import keras

    return list(keras.tree.flatten(outputs))


def producer(tensor: Any) -> tuple[Any, list[Any]] | None:
    """The layer that made a symbolic tensor, and that call's input tensors."""
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        return None
    layer, node_index = history[0], history[1]
    node = layer._inbound_nodes[node_index]
    return layer, list(node.input_tensors)


def inbound_tensors(layer: Any) -> list[list[Any]]:
    """The input tensors of each call of ``layer`` in the model's graph."""
    return [list(node.input_tensors) for node in getattr(layer, "_inbound_nodes", [])]


def run_first(callback: Any) -> bool:
    """Move ``callback`` to the front of the ``CallbackList`` that is setting it up, so
    that the keys it adds to the logs reach every other callback (CSVLogger,
    TensorBoard, a user's ProgbarLogger) whatever the order the user listed them in.

    ``CallbackList.set_model`` calls each callback's ``set_model`` in list order; the
    list is found in its frame. Moving an already visited element to the front while it
    iterates skips nothing and repeats nothing. False where no such list is found.
    """
    frame = sys._getframe(1)
    for _ in range(6):
        frame = frame.f_back  # type: ignore[assignment]
        if frame is None:
            return False
        owner = frame.f_locals.get("self")
        if isinstance(owner, keras.callbacks.CallbackList):
            mine = [i for i, c in enumerate(owner.callbacks) if c is callback]
            if not mine:
                return False
            owner.callbacks.insert(0, owner.callbacks.pop(mine[0]))
            return True
    return False
