"""PyTorch Lightning callback: energy-saving plasticity and its energy, in one line.

Example::

    trainer = Trainer(callbacks=[PlasticityCallback(synapses=0.1, units=0.5, samples="lazy")])

Logged keys (the Keras adapter uses the same ones):

- ``plasticity/energy`` (M1 so far, in the progress bar) and
  ``plasticity/updates`` (M0), at every step and at epoch end: like any
  ``self.log(on_step=True, on_epoch=True)`` value, loggers get ``..._step``
  and ``..._epoch`` columns (Lightning throttles logger writes by its
  ``log_every_n_steps``), and ``trainer.callback_metrics`` always holds
  ``plasticity/energy``, so ``EarlyStopping``/``ModelCheckpoint`` can monitor it;
- ``plasticity/energy_min``, ``plasticity/inefficiency`` and
  ``plasticity/samples_learned`` (the share of this epoch's samples that
  passed the gate) at epoch end, with ``plasticity/energy/<tensor>`` when
  ``per_layer=True``; ``plasticity/skipped_steps`` (steps undone for NaN/Inf,
  or skipped by the 16-mixed GradScaler, so far) at epoch end;
- with ``caching=``: ``plasticity/energy`` is consolidation + maintenance, and
  ``plasticity/energy_consolidation``, ``plasticity/energy_maintenance`` come at
  epoch end; with ``cost=``, ``plasticity/joules``. The transient store is
  consolidated in ``on_train_end`` and saved in checkpoints.

The mechanism is :mod:`energy_callbacks.torch`: optimizer step hooks mask the
real update of any optimizer, and a forward hook gates samples through the
output gradient. Under DDP the weights, and so the energy, are the same on
every rank: it is logged once, not summed. Sample counts and the mistake
memory are combined over ranks at every epoch end.

Sharded training runs through ``ModelParallelStrategy`` with a ``configure_model``
that calls ``fully_shard`` (FSDP2): each rank masks and measures its own rows
(see :mod:`energy_callbacks.torch.sharded_ops`), the figures are summed over the
ranks when they are logged, and a distributed checkpoint keeps each rank's rows
of w_0 beside the weights. ``FSDPStrategy`` (FSDP1, flat parameters) and
DeepSpeed are refused at ``setup``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed.checkpoint as distributed_checkpoint
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

from .core import EnergyReport, Plasticity, Topology, checks
from .core.caching import Caching
from .core.costs import Cost
from .core.plasticity import from_shorthands
from .core.samples import SampleGate
from .core.synapses import SynapseRule
from .core.targets import IGNORE_INDEX
from .core.units import UnitRule
from .torch import AttachedPlasticity, attach, describe, edges, forget_compiled_hooks, module_names
from .torch.attached import INITIAL_KEY
from .torch.layers import nothing_to_cover
from .torch.ranks import world_size
from .torch.selective import SelectiveBackward
from .torch.shards import is_sharded, local
from .torch.shards import like as sharded_like
from .torch.spawned import WorkerResult
from .torch.state import from_tensors, to_tensors

TARGET_KEYS = ("y", "label", "labels", "target", "targets")
ID_KEYS = ("index", "idx", "sample_id")
QUEUE_KEY = "skip_backward_queue"  # the state of backward_batch's waiting learners
REFUSED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy)
SHARDED_IN_WEIGHTS = "sharded_in_state_dict"  # w_0 and the store went beside the weights
INITIAL_PREFIX = "energy_callbacks.initial."  # their keys there
STORE_PREFIX = "energy_callbacks.store."
EPOCH_EXTRA = (
    "plasticity/energy_consolidation",
    "plasticity/energy_maintenance",
    "plasticity/joules",
)


def default_targets(batch: Any) -> Any:
    """``batch[1]`` for tuples/lists; the ``y``/``label(s)``/``target(s)`` key for dicts."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    if isinstance(batch, Mapping):
        for key in TARGET_KEYS:
            if key in batch:
                return batch[key]
    raise ValueError(
        "PlasticityCallback: cannot find the targets in a batch of type "
        f"{type(batch).__name__}; use (x, y) tuples, a dict with one of {TARGET_KEYS}, "
        "or pass targets=<callable batch -> targets>"
    )


def default_sample_ids(batch: Any) -> Any:
    """The ``index``/``idx``/``sample_id`` entry of a dict batch, else None."""
    if isinstance(batch, Mapping):
        for key in ID_KEYS:
            if key in batch:
                return batch[key]
    return None


class PlasticityCallback(Callback):
    """Apply energy-saving plasticity rules to a LightningModule and log the energy.

    Give a :class:`~energy_callbacks.Plasticity` or its shorthands
    (``synapses=0.1``, ``units=0.5``, ``samples="lazy"``, ``caching=Caching(...)``,
    ``cost="sram"``), not both.
    ``targets``/``outputs``/``sample_ids`` are callables for batches and forward
    outputs outside the defaults (see :func:`default_targets`,
    :func:`~energy_callbacks.torch.default_logits`, :func:`default_sample_ids`).
    ``layers`` names the modules to cover, in forward order.

    ``skip_backward=True`` (with a sample gate) judges each batch in a forward pass
    without gradients and runs ``training_step`` on the samples that learn only, so the
    backward pass of the others is really skipped (see
    :mod:`energy_callbacks.torch.selective`: the loss is then the mean over the
    learners); ``inputs`` picks what the module's forward takes from a batch.
    ``backward_batch=B`` with it queues the learners of successive batches and trains
    B at a time, so each backward pass and optimizer step is a full batch; the last
    batch of an epoch trains what waits, and what waits is saved in checkpoints.
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
        targets: Callable[[Any], Any] | None = None,
        outputs: Callable[[Any], torch.Tensor] | None = None,
        sample_ids: Callable[[Any], Any] | None = None,
        layers: Sequence[str] | str | None = None,
        adjacency: Sequence[Sequence[Any]] | None = None,
        ignore_index: int | None = IGNORE_INDEX,
        log_every_n_steps: int | None = None,
        per_layer: bool = False,
        skip_backward: bool = False,
        inputs: Callable[[Any], Any] | None = None,
        backward_batch: int | None = None,
    ) -> None:
        plasticity = from_shorthands(
            plasticity,
            synapses=synapses,
            units=units,
            samples=samples,
            alpha=alpha,
            caching=caching,
            cost=cost,
        )
        for name, fn in (
            ("targets", targets),
            ("outputs", outputs),
            ("sample_ids", sample_ids),
            ("inputs", inputs),
        ):
            checks.function(f"PlasticityCallback.{name}", fn)
        skip_backward = checks.flag("PlasticityCallback.skip_backward", skip_backward)
        if skip_backward and plasticity.samples is None:
            raise ValueError(
                "PlasticityCallback.skip_backward=True skips the backward pass of the samples "
                "a sample gate rejects, and there is none: add samples='lazy' or 'mistakes', "
                "or drop skip_backward"
            )
        if inputs is not None and not skip_backward:
            raise ValueError(
                "PlasticityCallback.inputs= is only used with skip_backward=True (the judging "
                "forward pass); drop inputs= or set skip_backward=True"
            )
        if backward_batch is not None:
            if not skip_backward:
                raise ValueError(
                    "PlasticityCallback.backward_batch= queues the learners of the judging "
                    "forward pass, which runs with skip_backward=True only; set "
                    "skip_backward=True or drop backward_batch="
                )
            backward_batch = checks.count("PlasticityCallback.backward_batch", backward_batch)
        if log_every_n_steps is not None:
            try:
                log_every_n_steps = checks.count("log_every_n_steps", log_every_n_steps)
            except ValueError:
                raise ValueError(
                    f"PlasticityCallback.log_every_n_steps must be an int >= 1 or None (every "
                    f"step), got {log_every_n_steps!r}"
                ) from None
        per_layer = checks.flag("PlasticityCallback.per_layer", per_layer)
        if ignore_index is not None:
            what = "an int (the target id of entries the gate skips, -100 by default) or None"
            ignore_index = checks.integer("PlasticityCallback.ignore_index", ignore_index, what)
        self.plasticity = plasticity
        self.targets = targets or default_targets
        self.outputs = outputs
        self.sample_ids = sample_ids or default_sample_ids
        self.layers = module_names(layers, "PlasticityCallback.layers")
        self.adjacency = edges(adjacency, "PlasticityCallback.adjacency")
        self.ignore_index = ignore_index
        self.log_every_n_steps = log_every_n_steps
        self.per_layer = per_layer
        self.skip_backward = skip_backward
        self.inputs = inputs
        self.backward_batch = backward_batch
        self._selective: SelectiveBackward | None = None
        self._pending_queue: dict[str, Any] | None = None
        self._handle: AttachedPlasticity | None = None
        self._pending_state: dict[str, Any] | None = None
        self._epoch_start = (0, 0)
        self._batches = 0
        self._worker_result = WorkerResult(self)  # ddp_spawn: the report comes back here

    # -- set-up ----------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if isinstance(trainer.strategy, REFUSED_STRATEGIES):  # subclasses too
            raise ValueError(
                f"PlasticityCallback does not support {type(trainer.strategy).__name__}: its "
                "optimizer steps flat or partitioned parameters that cannot be measured row by "
                "row. Shard with ModelParallelStrategy and fully_shard (FSDP2) in "
                "configure_model, or use strategy='ddp' (or a single device)."
            )
        if isinstance(trainer.strategy, ModelParallelStrategy):
            self._check_model_parallel(trainer.strategy)
            return  # the model takes its layers in configure_model, after this hook
        specs, _ = describe(pl_module, layers=self.layers)
        if not specs:
            field = "" if self.layers is None else f".layers={self.layers}"
            raise ValueError(
                f"PlasticityCallback{field}: nothing to train, as "
                f"{nothing_to_cover(pl_module, self.layers)}. Name modules that hold trainable "
                "parameters (a Linear, not the activation after it), or unfreeze them."
            )
        # Check the rules against the model now, so that a misfit fails before training.
        check = Plasticity(self.plasticity.synapses, self.plasticity.units)
        if self.adjacency is not None:
            check.setup(Topology(specs, self.adjacency))
        else:
            check.setup(Topology.chain(specs))
        if self.skip_backward and trainer.world_size > 1:
            raise ValueError(
                "PlasticityCallback.skip_backward=True trains a different number of samples "
                f"on each of the {trainer.world_size} processes, and DDP needs the same "
                "backward pass everywhere. Use skip_backward=False (the gradient gate) there."
            )
        if self.skip_backward and not pl_module.automatic_optimization:
            raise ValueError(
                "PlasticityCallback.skip_backward=True needs automatic optimization (it "
                "returns None from training_step when no sample learns); with manual "
                "optimization use skip_backward=False"
            )
        units = self.plasticity.units
        every, _ = describe(pl_module, layers=self.layers, keep=list(pl_module.parameters()))
        n_layers = len({s.layer for s in every if s.input_axis is not None})
        if units is not None and n_layers < 2:
            raise ValueError(
                f"PlasticityCallback.units={units!r}: the model has {n_layers} layer(s), so "
                "there is no hidden layer whose units could compete (outputs keep all their "
                "units). Drop units=."
            )

    def _check_model_parallel(self, strategy: ModelParallelStrategy) -> None:
        """Sharded training: FSDP2 alone (no tensor parallelism), and unit rules with their
        wiring given."""
        mesh = strategy.device_mesh
        tensor_parallel = mesh["tensor_parallel"].size() if mesh.ndim > 1 else 1
        if tensor_parallel > 1:
            raise ValueError(
                "PlasticityCallback: ModelParallelStrategy(tensor_parallel_size="
                f"{tensor_parallel}) splits layers along other dims than their units; "
                "plasticity is exact on FSDP2's row shards only. Use tensor_parallel_size=1."
            )
        if self.plasticity.units is not None and self.adjacency is None:
            raise ValueError(
                f"PlasticityCallback.units={self.plasticity.units!r} under ModelParallelStrategy: "
                "the wiring cannot be read off a sharded forward pass; pass "
                "adjacency=[(pre, post), ...] (module names)."
            )
        if self.skip_backward:
            raise ValueError(
                "PlasticityCallback.skip_backward=True trains a different number of samples "
                "on each process, and sharded training needs the same backward pass "
                "everywhere. Use skip_backward=False (the gradient gate) there."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A second fit() with this callback continues its totals (attach() starts afresh).
        if self._pending_state is None and self.plasticity.is_setup:
            self._pending_state = self.plasticity.state_dict()
        hooks = self.plasticity.samples is not None or self.plasticity.units is not None
        if hooks and getattr(pl_module, "_compiler_ctx", None) is not None:
            forget_compiled_hooks()
        self._handle = attach(
            pl_module,
            trainer.optimizers,
            self.plasticity,
            layers=self.layers,
            adjacency=self.adjacency,
            outputs=self.outputs,
            ignore_index=self.ignore_index,
        )
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:  # 16-mixed: steps the GradScaler skips count as skipped
            self._handle.watch(scaler)
        if self._pending_state is not None:
            self._handle.load_state_dict(self._pending_state)
            self._pending_state = None
        if self.skip_backward:
            assert self._handle.gate is not None
            self._selective = SelectiveBackward(
                pl_module,
                self._handle.gate,
                self.targets,
                self.sample_ids,
                self.inputs,
                backward_batch=self.backward_batch,
            )
            if self._pending_queue is not None:
                self._selective.load_state_dict(self._pending_queue)
                self._pending_queue = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._handle is not None and self.plasticity.caching is not None:
            self._handle.consolidate()  # the end of fit consolidates the transient store

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # A failed fit leaves the module as it was: no hook, no wrapped training_step.
        self.teardown(trainer, pl_module, "fit")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._selective is not None:
            if self._selective.queue:  # a later fit() trains what still waits
                self._pending_queue = self._selective.state_dict()
            self._selective.remove()
            self._selective = None
        if self._handle is not None:
            state = self._handle.state_dict()  # w_0 included: a later fit carries on
            if stage == "fit" and trainer.is_global_zero and self._worker_result.in_worker():
                self._worker_result.send(self._handle.specs, to_tensors(state))
            self._handle.detach()
            self._pending_state = state
            self._handle = None

    # -- batches -----------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._selective is not None:  # skip_backward: training_step judges the batch
            # the last step of an epoch (or of max_steps) trains the learners that wait;
            # is_last_batch misses an epoch cut short by limit_train_batches
            self._selective.flush = (
                trainer.is_last_batch
                or batch_idx + 1 >= trainer.num_training_batches
                or 0 <= trainer.max_steps <= trainer.global_step + 1
            )
            return
        if self._handle is None:
            return
        if self._handle.gate is not None:
            self._handle.gate_batch(self.targets(batch), self.sample_ids(batch))
        else:
            try:
                n = len(self.targets(batch))
            except (ValueError, TypeError):
                return  # batches without visible targets: samples are not counted
            self.plasticity.count_samples(n)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        handle = self._handle
        if handle is not None and handle.gate is not None and handle.gate.armed:
            if outputs is None or (isinstance(outputs, Mapping) and not outputs):
                handle.gate.disarm()  # training_step returned None: Lightning skipped the batch
            else:
                raise RuntimeError(
                    "PlasticityCallback: the sample gate saw no forward pass of the "
                    "LightningModule in training_step. Call self(x) (the module's forward) "
                    "there, or use samples=None."
                )
        self._batches += 1
        every = self.log_every_n_steps or 1
        if handle is not None and (self._batches % every == 0 or trainer.is_last_batch):
            self._log_energy(pl_module)

    def _log_energy(self, pl_module: pl.LightningModule) -> None:
        """M1 and M0 so far, as any on_step + on_epoch value (the epoch value is the last)."""
        assert self._handle is not None
        m1, m0 = self._handle.energy()  # device scalars on GPU: nothing waits here
        for key, value, bar in (("plasticity/energy", m1, True), ("plasticity/updates", m0, False)):
            pl_module.log(
                key, _float64(value), prog_bar=bar, on_step=True, on_epoch=True, reduce_fx="max"
            )

    # -- epochs ------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = (self.plasticity.samples_seen, self.plasticity.samples_learned)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._handle is not None:  # sample counts and mistake memories of every rank
            self._handle.merge_samples()
        report = self.report()
        seen = report.samples_seen - self._epoch_start[0]
        learned = report.samples_learned - self._epoch_start[1]
        metrics = {
            "plasticity/energy_min": report.m1_min,
            "plasticity/inefficiency": report.inefficiency,
            "plasticity/skipped_steps": float(report.skipped_steps),
        }
        if seen:
            metrics["plasticity/samples_learned"] = learned / seen
        full = report.metrics()
        for key in EPOCH_EXTRA:  # caching and cost figures, when there are any
            if key in full:
                metrics[key] = full[key]
        if self.per_layer:
            metrics.update(
                {f"plasticity/energy/{name}": e.energy for name, e in report.per_layer.items()}
            )
        # The values are equal on every rank by now; the mean over ranks keeps them.
        sync = world_size() > 1
        for key, value in metrics.items():
            device = pl_module.device if sync else None  # the collective's device
            value = _float64(value, device)
            pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=sync)

    # -- state -------------------------------------------------------------------
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Sharded training: w_0 and the caching store are sharded like the weights. A
        distributed checkpoint saves each rank's rows of them beside the weights (in
        ``state_dict``, under ``energy_callbacks.initial.<parameter>`` and
        ``energy_callbacks.store.<parameter>``); a full one gets them whole."""
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if not state:
            return
        parts = _sharded_parts(state)
        if not parts:
            return
        weights = checkpoint.get("state_dict", {})
        distributed = any(is_sharded(t) for t in weights.values())  # every rank saves
        for prefix, names, tensors, put in parts:
            if distributed:
                for name, t in zip(names, tensors, strict=True):
                    weights[prefix + str(name)] = t
                put(None)
            else:  # a full checkpoint (rank 0 writes it): whole, gathered like the weights
                put([t.full_tensor() for t in tensors])
        if distributed:
            state[SHARDED_IN_WEIGHTS] = True

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Read each rank's rows of w_0 and the store back from a distributed checkpoint."""
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if not state or not state.pop(SHARDED_IN_WEIGHTS, False):
            return
        if self._handle is None or self._handle.shards is None:
            raise ValueError(
                "PlasticityCallback: this checkpoint was saved from sharded training; resume "
                "it under ModelParallelStrategy with the same fully_shard layout"
            )
        handle = self._handle
        by_name = {s.name: p for s, p in zip(handle.specs, handle.params, strict=True)}
        names = [str(n) for n in state["energy"]["names"]]
        wanted = {INITIAL_PREFIX: names}
        if state.get("caching"):
            wanted[STORE_PREFIX] = [str(n) for n in state["caching"]["names"]]
        template = {  # host tensors placed like the parameters, which DCP fills
            prefix + n: sharded_like(
                by_name[n],
                torch.empty(
                    local(by_name[n]).shape,
                    dtype=local(by_name[n]).dtype if prefix == INITIAL_PREFIX else torch.float32,
                ),
            )
            for prefix, group in wanted.items()
            for n in group
        }
        distributed_checkpoint.load({"state_dict": template}, checkpoint_id=trainer.ckpt_path)
        state[INITIAL_KEY] = [template[INITIAL_PREFIX + n] for n in names]
        if STORE_PREFIX in wanted:
            state["caching"]["store"] = [template[STORE_PREFIX + n] for n in wanted[STORE_PREFIX]]

    def state_dict(self) -> dict[str, Any]:
        self._receive_worker_result()
        if self._pending_state is not None:
            state = to_tensors(self._pending_state)
        elif self._handle is not None:
            state = to_tensors(self._handle.state_dict())
        else:
            state = to_tensors(self.plasticity.state_dict()) if self.plasticity.is_setup else {}
        queue = self._selective.state_dict() if self._selective else self._pending_queue
        if queue is not None and queue["rows"]:
            state[QUEUE_KEY] = queue  # the learners of backward_batch that wait, as batches
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        state_dict = dict(state_dict)
        queue = state_dict.pop(QUEUE_KEY, None)
        if self._selective is not None:
            self._selective.load_state_dict(queue or {"batches": [], "rows": []})
        else:
            self._pending_queue = queue
        state = from_tensors(state_dict)
        if self._handle is not None:
            self._handle.load_state_dict(state)
        else:
            self._pending_state = state

    def report(self) -> EnergyReport:
        """The energy spent so far (the core's immutable EnergyReport).

        After a fit under ``ddp_spawn`` (training in child processes) this is rank 0's
        report, brought back from the worker.
        """
        if self._handle is not None:
            return self._handle.report()
        self._receive_worker_result()
        if not self.plasticity.is_setup:
            raise RuntimeError(
                "PlasticityCallback.report(): this callback has trained nothing in this "
                "process. If fit ran in worker processes that sent nothing back (a callback "
                "copied into them by hand, or a launcher other than Lightning's), read the "
                "logged figures from trainer.callback_metrics ('plasticity/energy', "
                "'plasticity/updates', ...) or restore a checkpoint with load_state_dict()."
            )
        return self.plasticity.report()

    def __getstate__(self) -> dict[str, Any]:
        # pickled for new ddp_spawn workers: they continue what earlier workers sent back
        self._receive_worker_result()
        return self.__dict__.copy()

    def _receive_worker_result(self) -> None:
        """Take over the state a ``ddp_spawn`` worker sent back (see torch/spawned.py)."""
        received = self._worker_result.receive()
        if received is None:
            return
        specs, state = received
        topology = Topology(specs, self.adjacency) if self.adjacency else Topology.chain(specs)
        if self.plasticity.is_setup:
            self.plasticity.rebind(topology)
        else:
            self.plasticity.setup(topology)
        self._pending_state = from_tensors(state)
        self.plasticity.load_state_dict(self._pending_state)


def _float64(value: Any, device: torch.device | None = None) -> torch.Tensor:
    """A logged value as a float64 tensor: Lightning stores a Python number as float32,
    which rounds counts above 2**24 (M0 reaches 1e10); float64 is exact to 2**53."""
    if isinstance(value, torch.Tensor):
        return value.to(torch.float64)
    return torch.tensor(float(value), dtype=torch.float64, device=device)


def _sharded_parts(state: dict[str, Any]) -> list[tuple[str, list[Any], list[Any], Any]]:
    """The sharded tensors of a callback state: ``(key prefix, names, tensors, put)``,
    ``put`` writing a replacement list back into the state."""
    parts = []
    kept = state.get(INITIAL_KEY)
    if kept and any(is_sharded(t) for t in kept):
        names = list(state["energy"]["names"])
        parts.append((INITIAL_PREFIX, names, kept, lambda v: state.__setitem__(INITIAL_KEY, v)))
    caching = state.get("caching")
    store = caching.get("store") if caching else None
    if store and any(is_sharded(t) for t in store):
        names = list(caching["names"])
        parts.append((STORE_PREFIX, names, store, lambda v: caching.__setitem__("store", v)))
    return parts
