"""Keras 3: ``PlasticityCallback`` for ``model.fit`` on TensorFlow, JAX and torch.

One line in an existing pipeline::

    model.fit(x, y, callbacks=[PlasticityCallback(synapses=0.1, samples="lazy")])

While ``fit`` runs, the callback swaps the model's optimizer for a
:class:`~energy_callbacks.keras_optimizer.PlasticityOptimizer` around it, and
its ``compute_loss`` for a gated one (:mod:`energy_callbacks.keras_gate`); it
forces a retrace so the compiled step includes both, and puts the user's
optimizer and ``compute_loss`` back when ``fit`` ends. A ``fit`` that raised
leaves them installed; the next ``fit`` notices and starts clean. A second
``fit`` with the same callback continues its totals.

Logged keys (the same as the Lightning adapter): ``plasticity/energy`` and
``plasticity/updates`` every batch (progress bar), and at epoch end also
``plasticity/energy_min``, ``plasticity/inefficiency`` and
``plasticity/samples_learned``; with ``per_layer=True``, ``plasticity/energy/<var>``.
With ``caching=``, ``plasticity/energy`` is consolidation + maintenance and the
epoch logs add ``plasticity/energy_consolidation`` and
``plasticity/energy_maintenance``; ``on_train_end`` consolidates the store.
With ``cost=``, ``plasticity/joules``.
Put the callback before ``CSVLogger``/``TensorBoard`` so they see the keys.

Checkpoints written during ``fit`` (``ModelCheckpoint``, ``BackupAndRestore``)
hold the wrapper, its totals and the mistake memory. ``load_model`` of such a
file gives a model whose optimizer is the wrapper; a new callback adopts it and
continues the totals.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import keras

from .core import Caching, Cost, EnergyReport, Plasticity, SampleGate, SynapseRule, UnitRule
from .core.config import to_config
from .core.plasticity import from_shorthands
from .keras_distribute import strategy_scope
from .keras_gate import GateState, gated_compute_loss
from .keras_optimizer import EnergyReadout, PlasticityOptimizer

__all__ = ["PlasticityCallback", "PlasticityOptimizer"]

_INSTALLED = "_energy_callbacks_installed"


class PlasticityCallback(keras.callbacks.Callback):
    """Apply energy-saving plasticity rules in ``model.fit`` and log their energy.

    Give a ready :class:`~energy_callbacks.Plasticity`, or the shorthands
    ``synapses`` (a fraction or rule), ``units`` (a fraction or rule), ``samples``
    (``"lazy"``, ``"mistakes"`` or a gate), ``caching`` (a ``Caching``), ``cost``
    (a ``Cost`` or a preset name) and ``alpha``. ``sample_ids`` is
    ``fn(x, y) -> ids`` when ids do not come in ``x["index"]``. ``layers`` names
    the layers the rules act on (default: all). ``per_layer`` logs each tensor.
    """

    def __init__(
        self,
        plasticity: Plasticity | None = None,
        *,
        synapses: SynapseRule | Sequence[SynapseRule] | float | None = None,
        units: UnitRule | float | None = None,
        samples: SampleGate | str | None = None,
        caching: Caching | None = None,
        cost: Cost | str | None = None,
        alpha: float = 1.0,
        sample_ids: Callable[[Any, Any], Any] | None = None,
        layers: Sequence[str] | None = None,
        per_layer: bool = False,
    ) -> None:
        super().__init__()
        plasticity = from_shorthands(
            plasticity,
            synapses=synapses,
            units=units,
            samples=samples,
            alpha=alpha,
            caching=caching,
            cost=cost,
        )
        if sample_ids is not None and not callable(sample_ids):
            raise ValueError("PlasticityCallback.sample_ids must be a callable fn(x, y) -> ids")
        self.plasticity = plasticity
        self.sample_ids = sample_ids
        self.layers = None if layers is None else list(layers)
        self.per_layer = bool(per_layer)
        self.optimizer: PlasticityOptimizer | None = None
        self._restore: dict[str, Any] | None = None
        self._last: EnergyReport | None = None

    # -- installing --------------------------------------------------------
    def set_model(self, model: Any) -> None:
        super().set_model(model)
        # install here, before any callback's on_train_begin: BackupAndRestore loads the
        # checkpoint there and must find the wrapper it saved
        if getattr(model, "optimizer", None) is not None and self._restore is None:
            self._install(model)

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        if self._restore is None:
            self._install(self.model)

    def _install(self, model: Any) -> None:
        if model.optimizer is None:
            raise ValueError("PlasticityCallback: compile the model with an optimizer first")
        _uninstall_stale(model)
        current = model.optimizer
        if isinstance(current, PlasticityOptimizer):  # loaded from a checkpoint: adopt it
            if to_config(current.plasticity) != to_config(self.plasticity):
                raise ValueError(
                    f"PlasticityCallback: the model's saved optimizer applies "
                    f"{current.plasticity!r}, this callback {self.plasticity!r}; use the same "
                    "rules to resume, or compile with a fresh optimizer to start over"
                )
            wrapper, inner = current, None
        else:
            if self.optimizer is None or self.optimizer.inner_optimizer is not current:
                with strategy_scope(model):
                    self.optimizer = PlasticityOptimizer(current, self.plasticity, self.layers)
            wrapper, inner = self.optimizer, current
        self.optimizer = wrapper
        if not wrapper.built:
            with strategy_scope(model):
                wrapper.build(model.trainable_variables)
        self._restore = {
            "optimizer": inner,
            "compute_loss": model.__dict__.get("compute_loss"),
            "compile_optimizer": model._compile_config.config.get("optimizer"),
            "has_training_arg": model._compute_loss_has_training_arg,
        }
        model.optimizer = wrapper
        model._compile_config.config["optimizer"] = wrapper
        model.compute_loss = gated_compute_loss(
            model, model.compute_loss, wrapper.gate, self.sample_ids
        )
        model._compute_loss_has_training_arg = True
        model._metrics.append(wrapper.gate)
        if keras.backend.backend() != "jax":  # JAX: read from the trainer's state instead
            model._metrics.append(EnergyReadout(wrapper))
        setattr(model, _INSTALLED, self._restore)
        _force_retrace(model)

    def _uninstall(self) -> None:
        if self._restore is None:
            return
        _restore(self.model, self._restore)
        self._restore = None

    # -- logging -----------------------------------------------------------
    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is None or self.optimizer is None or "plasticity/energy" in logs:
            return  # the step's logs carry the totals already (EnergyReadout)
        # self._model, not self.model: on JAX that property syncs the whole trainer state
        # into the variables, every batch (0.35 ms a batch here)
        m1, m0 = self.optimizer.totals(_live_optimizer_values(self._model))
        logs["plasticity/energy"] = m1
        logs["plasticity/updates"] = float(m0)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        report = self.report()
        if logs is not None:
            # samples_learned is the gate metric's own result, already in the epoch logs
            # (read before validation, whose metric reset zeroes the epoch counts)
            metrics = report.metrics(per_layer=self.per_layer)
            metrics.pop("plasticity/samples_learned", None)
            logs.update(metrics)
            for key in ("samples_learned", "energy", "updates"):  # validation's copies
                logs.pop(f"val_plasticity/{key}", None)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self.optimizer is not None and self.optimizer.plasticity.caching is not None:
            self.optimizer.consolidate()  # the end of fit consolidates the transient store
        self._last = self.report()
        self._uninstall()

    # -- results -----------------------------------------------------------
    def report(self) -> EnergyReport:
        """The energy spent so far (read from the optimizer's variables)."""
        wrapper = self.optimizer
        if wrapper is None or not wrapper.built:
            if self._last is not None:
                return self._last
            raise RuntimeError("PlasticityCallback.report(): nothing has been trained yet")
        plasticity = wrapper.plasticity
        plasticity.meter.load_state_dict(wrapper.energy_state())
        if plasticity.caching is not None:
            plasticity.caching.load_state_dict(wrapper.caching_state())
        plasticity.samples_seen, plasticity.samples_learned, lost = wrapper.gate.counts()
        if lost:
            warnings.warn(
                f"PlasticityCallback: {lost} samples had ids beyond the mistake memory's "
                f"capacity and were not remembered; raise MemorizedMistakes(capacity=...) to "
                f"the number of training samples",
                RuntimeWarning,
                stacklevel=2,
            )
        plasticity.step_count = plasticity.meter.steps
        return plasticity.report()


def _force_retrace(model: Any) -> None:
    """Drop the compiled train step so the next ``fit`` traces the current setup."""
    model.train_function = None


def _restore(model: Any, saved: dict[str, Any]) -> None:
    if saved["optimizer"] is not None:
        model.optimizer = saved["optimizer"]
        model._compile_config.config["optimizer"] = saved["compile_optimizer"]
    if saved["compute_loss"] is None:
        model.__dict__.pop("compute_loss", None)
    else:
        model.compute_loss = saved["compute_loss"]
    model._compute_loss_has_training_arg = saved["has_training_arg"]
    model._metrics[:] = [m for m in model._metrics if not isinstance(m, (GateState, EnergyReadout))]
    model.__dict__.pop(_INSTALLED, None)
    _force_retrace(model)


def _uninstall_stale(model: Any) -> None:
    """Undo an installation a ``fit`` that raised left behind."""
    saved = model.__dict__.get(_INSTALLED)
    if saved is not None:
        _restore(model, saved)


def _live_optimizer_values(model: Any) -> list[Any] | None:
    """The optimizer variables' current values where the trainer holds them (JAX)."""
    state = getattr(model, "_jax_state", None)
    if state and not getattr(model, "_jax_state_synced", True):
        return state.get("optimizer_variables")
    return None
