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
With ``cost=``, ``plasticity/joules``. The callback moves itself to the front of
the callback list ``fit`` makes, so ``CSVLogger``, ``TensorBoard`` and the user's
callbacks see the keys whatever the order they were listed in.

Checkpoints written during ``fit`` (``ModelCheckpoint``, ``BackupAndRestore``)
hold the wrapper, its totals and the mistake memory. ``load_model`` of such a
file gives a model whose optimizer is the wrapper; a new callback adopts it and
continues the totals, and a ``fit`` without one trains with the inner optimizer.

A custom ``train_step`` is measured and masked as it is (every step ends in
``optimizer.apply``); a sample gate needs its loss from ``self.compute_loss``
(JAX: ``self.stateless_compute_loss``) or weighted by :func:`~energy_callbacks.keras.sample_weight`.
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
from ..core.targets import REGRESSION_HINT
from . import private
from .carry import carry_over
from .distribute import strategy_scope
from .gate import GateState, check_outputs, gated_compute_loss
from .optimizer import PlasticityOptimizer, check_in_graph

__all__ = ["PlasticityCallback"]

_INSTALLED = "_energy_callbacks_installed"


class PlasticityCallback(keras.callbacks.Callback):
    """Apply energy-saving plasticity rules in ``model.fit`` and log their energy.

    Give a ready :class:`~energy_callbacks.Plasticity`, or the shorthands
    ``synapses`` (a fraction or rule), ``units`` (a fraction or rule), ``samples``
    (``"lazy"``, ``"mistakes"`` or a gate), ``caching`` (a ``Caching``), ``cost``
    (a ``Cost`` or a preset name) and ``alpha``. ``sample_ids`` is
    ``fn(x, y) -> ids`` when ids do not come in ``x["index"]``. ``outputs`` says
    which output a sample gate judges in a model with several: its name in
    ``model.output_names``, its index, or ``fn(y, y_pred) -> (targets, scores)``.
    ``layers`` names the layers the rules act on (default: all). ``per_layer``
    logs each tensor. One callback follows one model (its totals are that
    model's); use a new callback for another model.
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
        outputs: str | int | Callable[[Any, Any], tuple[Any, Any]] | None = None,
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
        if outputs is not None:
            if plasticity.samples is None:
                raise ValueError(
                    "PlasticityCallback.outputs= picks the output a sample gate judges, and "
                    "there is no gate: add samples='lazy' or 'mistakes', or drop outputs="
                )
            if isinstance(outputs, bool) or not isinstance(outputs, (str, int)):
                checks.function("PlasticityCallback.outputs", outputs)
        self.plasticity = plasticity
        self.sample_ids = sample_ids
        self.outputs = outputs
        self.layers = checks.names("PlasticityCallback.layers", layers, "a layer name")
        self.per_layer = checks.flag("PlasticityCallback.per_layer", per_layer)
        self.optimizer: PlasticityOptimizer | None = None
        self._restore: dict[str, Any] | None = None
        self._last: EnergyReport | None = None
        self._warned: set[str] = set()  # what has been warned about once
        self._model_id: int | None = None  # the model this callback's totals belong to
        self._checked = False  # the first batch of this fit was checked
        self._epoch_start = (0, 0)  # the gate's (seen, learned) when the epoch began

    # -- installing --------------------------------------------------------
    def set_model(self, model: Any) -> None:
        super().set_model(model)
        private.run_first(self)  # its keys reach the other callbacks whatever the order
        # install here, before any callback's on_train_begin: BackupAndRestore loads the
        # checkpoint there and must find the wrapper it saved
        if getattr(model, "optimizer", None) is not None and self._restore is None:
            self._install(model)

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._checked = False
        self._epoch_start = (0, 0)
        if self._restore is None:
            self._install(self.model)

    def _install(self, model: Any) -> None:
        if model.optimizer is None:
            raise ValueError("PlasticityCallback: compile the model with an optimizer first")
        if self._model_id is not None and self._model_id != id(model):
            raise ValueError(
                "PlasticityCallback: this callback already measured another model, and its "
                "totals, w_0 and mistake memory are that model's. Give each model its own "
                "PlasticityCallback (read report() of this one first)."
            )
        self._model_id = id(model)
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
        wrapper.read_layers_of(model)
        if not wrapper.built and not model.built:
            pass  # fit builds the model (TensorFlow: in the first step): apply() builds then
        elif not wrapper.built:
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
            "compile_optimizer": private.compiled_optimizer(model),
            "has_training_arg": private.compute_loss_takes_training(model),
        }
        gate = wrapper.gate
        gate.outputs, gate.sample_ids = self.outputs, self.sample_ids
        gate.output_names = list(getattr(model, "output_names", None) or ())
        if gate.sample_gate is not None:
            check_outputs(self.outputs, gate.output_names)
        model.optimizer = wrapper
        wrapper.driven = True
        private.set_compiled_optimizer(model, wrapper)
        model.compute_loss = gated_compute_loss(model, model.compute_loss, gate)
        private.set_compute_loss_takes_training(model, True)
        private.add_metric(model, gate)
        setattr(model, _INSTALLED, self._restore)
        private.forget_train_function(model)

    def _uninstall(self) -> None:
        if self._restore is None:
            return
        _restore(self.model, self._restore)
        self._restore = None

    # -- logging -----------------------------------------------------------
    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is None or self.optimizer is None:
            return
        # self._model, not self.model: on JAX that property syncs the whole trainer state
        # into the variables, every batch (0.35 ms a batch here)
        model = self._model
        m1, m0 = self.optimizer.totals(private.live_state(model, "optimizer_variables"))
        logs["plasticity/energy"] = m1
        logs["plasticity/updates"] = float(m0)
        gate = self.optimizer.gate
        if gate.sample_gate is not None:  # this epoch's share of samples that learned
            seen, learned = self._gate_counts(model)[:2]
            share = _share(seen - self._epoch_start[0], learned - self._epoch_start[1])
            if share is not None:
                logs["plasticity/samples_learned"] = share
        if not self._checked:
            self._checked = True
            self._check_first_batch(model)

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self.optimizer is not None and self.optimizer.built:
            self._epoch_start = self.optimizer.gate.counts()[:2]

    def _gate_counts(self, model: Any) -> tuple[int, int, int, int]:
        """The gate's counts now (on JAX from the trainer's state, mid-epoch)."""
        assert self.optimizer is not None
        gate = self.optimizer.gate
        return gate.counts(private.live_value(model, gate.total_counts))

    def _check_first_batch(self, model: Any) -> None:
        """Refuse what the first step shows: a train_step whose loss the gate never
        judged, and targets that are no class ids (regression)."""
        gate = self.optimizer.gate if self.optimizer is not None else None
        if gate is None or gate.sample_gate is None:
            return
        seen, _, _, bad = self._gate_counts(model)
        ungated = gate.ungated(private.live_value(model, gate.outside_loss))
        if ungated or not seen:
            raise RuntimeError(
                f"PlasticityCallback(samples={self.plasticity.samples!r}): the sample gate did "
                "not judge the loss of the first batch, so every sample learned. This model's "
                "train_step makes its loss without model.compute_loss: call "
                "self.compute_loss(x, y, y_pred, sample_weight) there (JAX: "
                "self.stateless_compute_loss(...)), or weight your own loss with "
                "energy_callbacks.keras.sample_weight(self, y, y_pred, x)."
            )
        if bad:
            raise ValueError(
                f"PlasticityCallback: {bad} targets of the first batch are not class ids of "
                "the outputs (fractional, negative or too large) or not probability rows, so "
                "the gate cannot judge them. " + REGRESSION_HINT
            )

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        report = self.report()
        if logs is not None:
            metrics = report.metrics(per_layer=self.per_layer)
            metrics.pop("plasticity/samples_learned", None)
            share = _share(
                report.samples_seen - self._epoch_start[0],
                report.samples_learned - self._epoch_start[1],
            )
            if share is not None:
                metrics["plasticity/samples_learned"] = share
            metrics["plasticity/skipped_steps"] = float(report.skipped_steps)
            logs.update(metrics)
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
                "gradients?); each was skipped: weights left as before (and the optimizer's "
                "state, at least where the gradients held NaN/Inf), nothing counted. Later "
                "ones are counted in report().skipped_steps and the plasticity/skipped_steps "
                "log without another warning.",
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
            plasticity.caching.load_figures(*wrapper.caching_figures())
        plasticity.samples_seen, plasticity.samples_learned, lost, bad = wrapper.gate.counts()
        self._warn_batches(lost, bad, wrapper.gate)
        plasticity.step_count = plasticity.meter.steps
        return plasticity.report()


def _share(seen: int, learned: int) -> float | None:
    return learned / seen if seen > 0 else None


def _restore(model: Any, saved: dict[str, Any]) -> None:
    if isinstance(model.optimizer, PlasticityOptimizer):
        model.optimizer.driven = False  # fitted again without the callback: plain training
    if saved["optimizer"] is not None:
        model.optimizer = saved["optimizer"]
        private.set_compiled_optimizer(model, saved["compile_optimizer"])
    if saved["compute_loss"] is None:
        model.__dict__.pop("compute_loss", None)
    else:
        model.compute_loss = saved["compute_loss"]
    private.set_compute_loss_takes_training(model, saved["has_training_arg"])
    private.remove_metrics(model, GateState)
    model.__dict__.pop(_INSTALLED, None)
    private.forget_train_function(model)


def _uninstall_stale(model: Any) -> None:
    """Undo an installation a ``fit`` that raised left behind."""
    saved = model.__dict__.get(_INSTALLED)
    if saved is not None:
        _restore(model, saved)
