"""Keras 3: ``PlasticityCallback`` for ``model.fit`` on TensorFlow, JAX and torch.

One line in an existing pipeline::

    model.fit(x, y, callbacks=[PlasticityCallback(synapses=0.1, samples="lazy")])

While ``fit`` runs, the callback swaps the model's optimizer for a
:class:`~energy_callbacks.keras.optimizer.PlasticityOptimizer` around it, and
its ``compute_loss`` for a gated one (:mod:`energy_callbacks.keras.gate`); it
forces a retrace so the compiled step includes both, and puts the user's
optimizer and ``compute_loss`` back when ``fit`` ends. A ``fit`` that raised
leaves them installed; the next ``fit`` notices and starts clean. A second
``fit`` with the same callback continues its totals, also after the model was
compiled again (layers unfrozen, a new optimizer); a layer frozen since the last
``fit`` is refused, as its energy would be lost.

Logged keys (the same as the Lightning adapter): ``plasticity/energy`` and
``plasticity/updates`` every batch (progress bar), and at epoch end also
``plasticity/energy_min``, ``plasticity/inefficiency``, ``plasticity/skipped_steps``
and ``plasticity/samples_learned``; with ``per_layer=True``, ``plasticity/energy/<var>``.
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

from ..core import (
    Caching,
    Cost,
    EnergyReport,
    Plasticity,
    SampleGate,
    SynapseRule,
    UnitRule,
    checks,
)
from ..core.config import to_config
from ..core.plasticity import from_shorthands
from .carry import carry_over
from .distribute import strategy_scope
from .gate import GateState, gated_compute_loss
from .optimizer import EnergyReadout, PlasticityOptimizer, check_in_graph

__all__ = ["PlasticityCallback"]

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
        check_in_graph(plasticity)
        if sample_ids is not None and not callable(sample_ids):
            raise ValueError("PlasticityCallback.sample_ids must be a callable fn(x, y) -> ids")
        self.plasticity = plasticity
        self.sample_ids = sample_ids
        self.layers = checks.names("PlasticityCallback.layers", layers, "a layer name")
        self.per_layer = checks.flag("PlasticityCallback.per_layer", per_layer)
        self.optimizer: PlasticityOptimizer | None = None
        self._restore: dict[str, Any] | None = None
        self._last: EnergyReport | None = None
        self._warned: set[str] = set()  # what has been warned about once

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
            previous = None
            if self.optimizer is None or self.optimizer.inner_optimizer is not current:
                if self.optimizer is not None and self.optimizer.built:
                    previous = self.optimizer  # compiled again: its totals go on
                with strategy_scope(model):
                    self.optimizer = PlasticityOptimizer(current, self.plasticity, self.layers)
            wrapper, inner = self.optimizer, current
        self.optimizer = wrapper
        if not wrapper.built:
            with strategy_scope(model):
                wrapper.build(model.trainable_variables)
                if inner is not None and previous is not None:
                    carry_over(wrapper, previous)
        elif [id(v) for v in wrapper._trainable_variables] != [
            id(v) for v in model.trainable_variables
        ]:
            raise ValueError(
                "PlasticityCallback: the model's trainable variables changed since its optimizer "
                "was built (a layer frozen or unfrozen?). Keras needs model.compile(...) again "
                "after changing trainable; the callback then carries its totals over."
            )
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
            metrics["plasticity/skipped_steps"] = float(report.skipped_steps)
            logs.update(metrics)
            for key in ("samples_learned", "energy", "updates"):  # validation's copies
                logs.pop(f"val_plasticity/{key}", None)
        self._warn_skipped(report)

    def _warn_batches(self, lost: int, bad: int, gate: Any) -> None:
        """Say once that ids were not remembered, and once that targets were no classes."""
        if lost and "ids" not in self._warned:
            self._warned.add("ids")
            warnings.warn(
                f"PlasticityCallback: {lost} samples so far had ids outside [0, {gate.capacity}) "
                "(negative, or not below MemorizedMistakes(capacity=...)); they were judged but "
                "not remembered. Give ids from 0 and raise capacity to the number of training "
                "samples (on JAX ids must also fit in int32).",
                RuntimeWarning,
                stacklevel=3,
            )
        if bad and "targets" not in self._warned:
            self._warned.add("targets")
            warnings.warn(
                f"PlasticityCallback: {bad} targets so far were not class ids of the outputs "
                "(negative, too large, or fractional); the gate counted them as mistakes. "
                "Check the labels and the number of output classes; for regression use "
                "samples=None.",
                RuntimeWarning,
                stacklevel=3,
            )

    def _warn_skipped(self, report: EnergyReport) -> None:
        """Say once that steps were undone for NaN/Inf (a loss scaler's skips are normal)."""
        assert self.optimizer is not None
        scaler = isinstance(self.optimizer.inner_optimizer, keras.optimizers.LossScaleOptimizer)
        if report.skipped_steps and not scaler and "skipped" not in self._warned:
            self._warned.add("skipped")
            warnings.warn(
                f"plasticity: {report.skipped_steps} step(s) so far had NaN/Inf updates (NaN/Inf "
                "gradients?); each was skipped: weights and optimizer state left as before, "
                "nothing counted. Later ones are counted in report().skipped_steps and the "
                "plasticity/skipped_steps log without another warning.",
                RuntimeWarning,
                stacklevel=2,
            )

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
        plasticity.samples_seen, plasticity.samples_learned, lost, bad = wrapper.gate.counts()
        self._warn_batches(lost, bad, wrapper.gate)
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
