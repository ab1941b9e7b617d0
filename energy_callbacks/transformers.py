"""Hugging Face ``Trainer`` callback: energy-saving plasticity and its energy, in one line.

Example::

    trainer = Trainer(model, args, train_dataset=ds,
                      callbacks=[PlasticityCallback(synapses=0.1, samples="lazy")])

How it fits the Trainer:

- **The optimizer.** The callback attaches :func:`energy_callbacks.torch.attach` in
  ``on_train_begin`` to the optimizer the Trainer built (inside accelerate's
  wrapper), so the masks see the real update of its AdamW, weight decay, schedule,
  gradient clipping and accumulation (one optimizer step per accumulated batch).
- **The sample gate** judges the model output's ``logits`` against the ``labels``
  the model receives as a keyword argument: sequence classification, and token
  labels with -100 ignored (causal language models predict the next token: their
  labels are shifted, as their loss does; an encoder-decoder's are not). It acts on
  the gradient that reaches the logits, so it holds where the model computes its
  loss itself; the loss keeps its normalization. ``samples="mistakes"`` keys its
  memory by a ``sample_id`` (or ``index``/``idx``) column that the dataset
  returns; the callback takes it out of the batch before the model sees it (set
  ``remove_unused_columns=False`` so that the Trainer keeps it).
- **Logs.** ``plasticity/energy`` (M1), ``plasticity/updates`` (M0, an exact
  integer), ``plasticity/energy_min``, ``plasticity/updates_min``,
  ``plasticity/inefficiency``, ``plasticity/skipped_steps`` (and
  ``plasticity/samples_learned`` with a gate; ``plasticity/energy/<tensor>`` with
  ``per_layer=True``; the caching and cost figures when set) join every training
  log: the console and ``trainer.state.log_history``. The Trainer calls the
  ``report_to`` integrations before the callbacks it is given, so for TensorBoard,
  W&B, MLflow and the rest to log the energy too, call
  :meth:`PlasticityCallback.log_before_reporters` once after building the Trainer.
- **Checkpoints.** The state (totals, w_0, the mistake memory, the transient
  store) is saved with each checkpoint: the figures in ``trainer_state.json``
  (the Trainer's protocol for stateful callbacks), the arrays in
  ``plasticity.safetensors`` beside it; ``trainer.train(resume_from_checkpoint=...)``
  restores them exactly, into this object.
- **Distributed.** Under DDP (``torchrun``) the figures follow the DDP rules of
  the Lightning callback: the energy is the same on every process, sample counts
  and mistake memories are combined at each epoch end. FSDP and DeepSpeed shard the
  parameters and are refused.
"""

from __future__ import annotations

import inspect
import os
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from .core import EnergyReport, Plasticity, checks, flat
from .core.caching import Caching
from .core.costs import Cost
from .core.plasticity import from_shorthands
from .core.samples import SampleGate
from .core.synapses import SynapseRule
from .core.targets import IGNORE_INDEX
from .core.units import UnitRule
from .torch import AttachedPlasticity, attach, describe, edges, module_names
from .torch.layers import nothing_to_cover
from .torch.state import from_tensors, to_tensors

ARRAYS_FILE = "plasticity.safetensors"
"""The file of the state's arrays in each checkpoint folder."""
ID_KEYS = ("sample_id", "index", "idx")
SHIFTED_LOSSES = ("ForCausalLM", "ForConditionalGeneration")
"""Hugging Face loss types whose logits predict the next token's label (unless the model
is an encoder-decoder, whose decoder is fed the labels shifted right)."""
JUDGED_LOSSES = (
    *SHIFTED_LOSSES,
    "ForMaskedLM",
    "ForSequenceClassification",
    "ForImageClassification",
    "ForAudioClassification",
    "ForVideoClassification",
    "ForTokenClassification",
)
"""Loss types with one class per sample or per token: the sample gate can judge them."""
SHARDED = (
    "PlasticityCallback does not support FSDP through the Trainer: sharded parameters "
    "cannot be ranked whole on one process. Train without fsdp= (DDP under torchrun is "
    "supported)."
)


class PlasticityCallback(TrainerCallback, ExportableState):  # type: ignore[misc]
    """Apply energy-saving plasticity rules to a ``transformers.Trainer`` run and log
    the energy.

    Give a :class:`~energy_callbacks.Plasticity` or its shorthands
    (``synapses=0.1``, ``units=0.5``, ``samples="lazy"``, ``caching=Caching(...)``,
    ``cost="sram"``), not both. ``layers`` names the modules to cover; ``adjacency``
    states the unit rules' wiring (read off the forward pass by default).
    ``targets`` (the forward's keyword arguments -> the class ids aligned with the
    logits) and ``outputs`` (the forward output -> the logits) replace the
    defaults for models outside them; ``ignore_index`` is the label the gate skips.
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
        layers: Sequence[str] | str | None = None,
        adjacency: Sequence[Sequence[Any]] | None = None,
        targets: Callable[[Mapping[str, Any]], Any] | None = None,
        outputs: Callable[[Any], torch.Tensor] | None = None,
        ignore_index: int = IGNORE_INDEX,
        per_layer: bool = False,
    ) -> None:
        self.plasticity = from_shorthands(
            plasticity,
            synapses=synapses,
            units=units,
            samples=samples,
            alpha=alpha,
            caching=caching,
            cost=cost,
        )
        checks.function("PlasticityCallback.targets", targets)
        checks.function("PlasticityCallback.outputs", outputs)
        self.layers = module_names(layers, "PlasticityCallback.layers")
        self.adjacency = edges(adjacency, "PlasticityCallback.adjacency")
        self.targets = targets
        self.outputs = outputs
        what = "an int (the label the gate skips, -100 by default)"
        self.ignore_index = checks.integer("PlasticityCallback.ignore_index", ignore_index, what)
        self.per_layer = checks.flag("PlasticityCallback.per_layer", per_layer)
        self._handle: AttachedPlasticity | None = None
        self._pending: dict[str, Any] | None = None  # a state waiting for the next attach
        self._feed: torch.utils.hooks.RemovableHandle | None = None
        self._arrays: dict[str, torch.Tensor] | None = None  # state()'s arrays, for on_save
        self._run = uuid.uuid4().hex  # ties a checkpoint's figures to its arrays file

    # -- the Trainer's events ----------------------------------------------------
    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        refuse_arguments(args, self.plasticity)

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        refuse_arguments(args, self.plasticity)
        if model is None or optimizer is None:
            raise RuntimeError("PlasticityCallback: the Trainer passed no model or optimizer")
        inner = inner_optimizer(optimizer)
        if any(_sharded(p) for g in inner.param_groups for p in g["params"]):
            raise ValueError(SHARDED)  # FSDP set up by accelerate's config, not fsdp=
        specs, _ = describe(model, layers=self.layers)
        if not specs:
            field = "" if self.layers is None else f".layers={self.layers}"
            raise ValueError(
                f"PlasticityCallback{field}: nothing to train, as "
                f"{nothing_to_cover(model, self.layers)}. Name modules that hold trainable "
                "parameters, or unfreeze them."
            )
        gate = self.plasticity.samples is not None
        if gate and self.targets is None:
            refuse_model(model, self.plasticity)
        self._release()  # a train() that failed before its end left its hooks
        saved = state.stateful_callbacks.get(type(self).__name__)
        if state.global_step > 0 and saved:  # resuming: the checkpoint's state wins
            self._pending = self._read_checkpoint(args, state, saved)
        self._handle = attach(
            model,
            inner,
            self.plasticity,
            layers=self.layers,
            adjacency=self.adjacency,
            outputs=self.outputs,
            ignore_index=self.ignore_index,
        )
        if self._pending is not None:
            self._handle.load_state_dict(self._pending)
            self._pending = None
        feed = BatchFeed(self._handle, self.targets or default_targets(model, self.ignore_index))
        self._feed = model.register_forward_pre_hook(feed, with_kwargs=True)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._handle is not None:  # each process's samples, counted together
            self._handle.merge_samples()

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs is None or self._handle is None or _is_evaluation(logs):
            return
        figures = self.figures()
        logs.update(figures)
        record = state.log_history[-1] if state.log_history else None
        if record is not None and record.get("step") == state.global_step:
            record.update(figures)  # the Trainer appended it before calling on_log

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not args.should_save or not self.plasticity.is_setup:
            return
        folder = checkpoint_folder(args, state)
        if not os.path.isdir(folder):
            warnings.warn(
                f"PlasticityCallback: the checkpoint of step {state.global_step} is not in "
                f"{folder} (a hyperparameter search's run folder?), so its {ARRAYS_FILE} "
                "(w_0, the mistake memory) was not written; resuming from that checkpoint "
                "will refuse",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        from safetensors.torch import save_file

        arrays = self._arrays  # taken apart by state(), which the Trainer has just called
        if arrays is None:
            _, arrays = flat.split(self._state_dict(), _is_tensor)
        self._arrays = None
        tensors = {k: v.detach().cpu().contiguous() for k, v in arrays.items()}
        save_file(tensors, os.path.join(folder, ARRAYS_FILE), metadata={"run": self._run})

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._handle is None:
            return
        if self.plasticity.caching is not None:
            self._handle.consolidate()  # the end of training consolidates the transient store
        self._release()

    def _release(self) -> None:
        """Detach the hooks and keep the state (w_0 included): a later train() carries on."""
        if self._feed is not None:
            self._feed.remove()
            self._feed = None
        if self._handle is not None:
            self._pending = self._handle.state_dict()
            self._handle.detach()
            self._handle = None

    # -- the Trainer's stateful-callback protocol ------------------------------------
    def state(self) -> dict[str, Any]:
        """The figures for ``trainer_state.json`` (arrays go to ``plasticity.safetensors``
        in ``on_save``). The Trainer calls this when it saves a checkpoint."""
        if not self.plasticity.is_setup:
            return {"args": {}, "attributes": {}}
        skeleton, self._arrays = flat.split(self._state_dict(), _is_tensor)  # for on_save
        return {"args": {}, "attributes": {"plasticity": skeleton, "run": self._run}}

    # -- public ----------------------------------------------------------------------
    def report(self) -> EnergyReport:
        """The energy spent so far (the core's immutable EnergyReport)."""
        if self._handle is not None:
            return self._handle.report()
        if not self.plasticity.is_setup:
            raise RuntimeError("PlasticityCallback.report(): nothing has trained yet")
        return self.plasticity.report()

    def figures(self) -> dict[str, Any]:
        """The logged figures now: M1 and the others as floats, counts as ints."""
        report = self.report()
        out: dict[str, Any] = dict(report.metrics(per_layer=self.per_layer))
        out["plasticity/updates"] = int(report.updates)
        out["plasticity/updates_min"] = int(report.m0_min)
        if "plasticity/updates_uncached" in out:
            out["plasticity/updates_uncached"] = int(report.m0)
        out["plasticity/skipped_steps"] = int(report.skipped_steps)
        return out

    def log_before_reporters(self, trainer: Any) -> PlasticityCallback:
        """Move this callback ahead of the ``report_to`` integrations in ``trainer``, so
        that TensorBoard, W&B, MLflow and the others log the energy too. Uses the
        Trainer's public ``pop_callback``/``add_callback``; returns self."""
        others = [c for c in trainer.callback_handler.callbacks if c is not self]
        if len(others) == len(trainer.callback_handler.callbacks):
            raise ValueError(
                "PlasticityCallback.log_before_reporters: this callback is not in the "
                "trainer; pass it in Trainer(callbacks=[...]) first"
            )
        for callback in others:
            trainer.pop_callback(callback)
        for callback in others:
            trainer.add_callback(callback)
        return self

    # -- state -----------------------------------------------------------------------
    def _state_dict(self) -> dict[str, Any]:
        if self._handle is not None:
            state = self._handle.state_dict()
        elif self._pending is not None:
            state = self._pending
        else:
            state = self.plasticity.state_dict()
        return dict(to_tensors(state))

    def _read_checkpoint(
        self, args: TrainingArguments, state: TrainerState, saved: Any
    ) -> dict[str, Any] | None:
        saved = saved[-1] if isinstance(saved, list) else saved
        attributes = saved.get("attributes", {}) if isinstance(saved, Mapping) else {}
        if "plasticity" not in attributes:
            return None
        folder = checkpoint_folder(args, state)
        path = os.path.join(folder, ARRAYS_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"PlasticityCallback: the checkpoint's trainer_state.json holds this "
                f"callback's figures, but {path} (its arrays: w_0, the mistake memory) is "
                "missing. Resume from the checkpoint folder the Trainer wrote, under "
                "TrainingArguments.output_dir."
            )
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            if (f.metadata() or {}).get("run") != attributes.get("run"):
                raise ValueError(
                    f"PlasticityCallback: {path} was written by another run than the "
                    "checkpoint's trainer_state.json; resume from one checkpoint folder"
                )
            arrays = {k: f.get_tensor(k) for k in f.keys()}
        self._run = str(attributes.get("run"))
        return dict(from_tensors(flat.join(attributes["plasticity"], arrays)))


class BatchFeed:
    """A forward pre-hook that gives the gate each training batch's targets and ids from
    the forward's keyword arguments (and takes the id column out), or counts the
    samples when there is no gate."""

    def __init__(self, handle: AttachedPlasticity, targets: Callable[[Mapping[str, Any]], Any]):
        self.handle = handle
        self.targets = targets

    def __call__(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if not (module.training and torch.is_grad_enabled()):
            return None
        handle = self.handle
        accepted = _forward_parameters(module)
        ids = None
        for key in ID_KEYS:
            if key in kwargs and key not in accepted:
                kwargs = dict(kwargs)
                ids = kwargs.pop(key)
                break
        if handle.gate is None:
            first = next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
            if first is None and args and isinstance(args[0], torch.Tensor):
                first = args[0]
            if first is not None and first.dim() > 0:
                handle.plasticity.count_samples(int(first.shape[0]))
            return (args, kwargs) if ids is not None else None
        handle.gate_batch(self.targets(kwargs), ids)
        return args, kwargs


def default_targets(
    model: torch.nn.Module, ignore_index: int
) -> Callable[[Mapping[str, Any]], Any]:
    """The class ids the gate judges the logits against: ``labels`` (or ``shift_labels``),
    shifted by one token for causal language models, as their loss does."""
    config = getattr(model, "config", None)
    shifted = loss_type(model) in SHIFTED_LOSSES and not getattr(
        config, "is_encoder_decoder", False
    )

    def targets(kwargs: Mapping[str, Any]) -> Any:
        if kwargs.get("shift_labels") is not None:
            return kwargs["shift_labels"]
        labels = kwargs.get("labels")
        if labels is None:
            raise ValueError(
                "PlasticityCallback: the sample gate judges the logits against the labels "
                "the model receives, and this training batch has no 'labels' (a dataset "
                "without labels, or label smoothing / a compute_loss_func that takes them "
                "out of the batch). Give the batches labels, pass targets=<callable: the "
                "forward's keyword arguments -> class ids>, or drop samples=."
            )
        if shifted:  # position t predicts token t + 1; the last position predicts nothing
            labels = torch.nn.functional.pad(labels[..., 1:], (0, 1), value=ignore_index)
        return labels

    return targets


def inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (which has no
    step hooks of its own and calls the inner ``step`` on accumulation boundaries)."""
    while not hasattr(optimizer, "_optimizer_step_pre_hooks") and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"PlasticityCallback: the Trainer's optimizer {type(optimizer).__name__} is not a "
            "torch.optim.Optimizer, so its steps cannot be hooked"
        )
    return optimizer


def checkpoint_folder(args: TrainingArguments, state: TrainerState) -> str:
    """The folder the Trainer writes the checkpoint of ``state.global_step`` to."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


def refuse_arguments(args: TrainingArguments, plasticity: Plasticity) -> None:
    """Refuse the TrainingArguments the callback cannot be exact under, naming the fix."""
    if args.fsdp:
        raise ValueError(SHARDED)
    if args.deepspeed:
        raise ValueError(
            "PlasticityCallback does not support DeepSpeed: its optimizer steps "
            "partitioned parameters outside torch's step hooks. Train without deepspeed= "
            "(DDP under torchrun is supported)."
        )
    if args.restore_callback_states_from_checkpoint:
        raise ValueError(
            "PlasticityCallback restores its own state on resume_from_checkpoint, into the "
            "object you hold; TrainingArguments(restore_callback_states_from_checkpoint=True) "
            "would replace it with a new one built without your rules. Leave it False."
        )
    if plasticity.samples is None:
        return
    if args.torch_compile:
        raise ValueError(
            "PlasticityCallback(samples=...): with torch_compile the model's loss is made "
            "inside the compiled graph, so no gradient passes through the logits the gate "
            "acts on. Set torch_compile=False or drop samples= (the other rules and the "
            "energy work compiled)."
        )
    if args.label_smoothing_factor:
        raise ValueError(
            "PlasticityCallback(samples=...): with label_smoothing_factor the Trainer takes the "
            "labels out of the batch before the model sees them, so the gate cannot judge. "
            "Set label_smoothing_factor=0 or drop samples=."
        )
    if getattr(plasticity.samples, "needs_ids", False) and args.remove_unused_columns:
        raise ValueError(
            f"PlasticityCallback(samples={plasticity.samples!r}) keys its memory by sample id: "
            f"return one of {ID_KEYS} from the dataset and set "
            "TrainingArguments(remove_unused_columns=False), so the Trainer keeps that column "
            "(the callback takes it out before the model sees it)"
        )


def refuse_model(model: torch.nn.Module, plasticity: Plasticity) -> None:
    """Refuse, before training, a model whose outputs the sample gate cannot judge."""
    config = getattr(model, "config", None)
    kind = loss_type(model)
    name = type(model).__name__
    if config is not None and kind not in JUDGED_LOSSES:
        raise ValueError(
            f"PlasticityCallback(samples={plasticity.samples!r}): {name} has no head whose "
            "logits give one class per sample or per token (a base model, question "
            "answering, detection, CTC), so the gate cannot tell mistakes. Use a "
            "classification or language-modeling head, pass targets= and outputs=, or drop "
            "samples=."
        )
    problem = getattr(config, "problem_type", None)
    if kind == "ForSequenceClassification" and (
        problem in ("regression", "multi_label_classification")
        or (problem is None and getattr(config, "num_labels", 2) == 1)
    ):
        what = problem or "regression (num_labels=1)"
        raise ValueError(
            f"PlasticityCallback(samples={plasticity.samples!r}): {name} is set up for {what}, "
            "which has no single right class per sample, so the gate cannot tell mistakes. "
            "Drop samples= (the other rules and the energy apply)."
        )


def loss_type(model: torch.nn.Module) -> str | None:
    """The model's Hugging Face loss type (``"ForCausalLM"``, ...); language-model heads
    that name none (``GPT2LMHeadModel``) use the causal loss."""
    kind = getattr(model, "loss_type", None)
    if kind is None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
            return "ForCausalLM"
    return kind if isinstance(kind, str) else None


def _forward_parameters(module: torch.nn.Module) -> set[str]:
    try:
        return set(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _sharded(p: torch.Tensor) -> bool:
    """A parameter that FSDP has sharded: a DTensor (FSDP2) or a flat parameter (FSDP1)."""
    return type(p).__name__ in ("DTensor", "FlatParameter") or hasattr(p, "_is_flat_param")


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def _is_evaluation(logs: Mapping[str, Any]) -> bool:
    return any(k.startswith(("eval_", "test_")) for k in logs)


__all__ = ["PlasticityCallback", "default_targets", "inner_optimizer"]
