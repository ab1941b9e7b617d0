"""The sample gate for torch models: a forward hook that gates samples through the
gradient of the forward output, and an optimizer-step wrapper that skips steps
nobody learned from.

- The gate judges the class scores that ``outputs`` picks from the forward
  output (``(batch, classes)``, or ``(batch, tokens, classes)`` with one
  decision per token; targets are checked by
  :func:`~energy_callbacks.core.targets.class_targets`).
- It acts on the forward output itself: every tensor in it whose leading axes
  are the batch (and token) axes gets its gated-out rows' gradient zeroed, so
  whatever the loss is made of that output, gated-out samples add nothing.
- If no gradient reaches the output before the step (the loss was made from
  something else), the step raises instead of learning from every sample.

Used by :func:`energy_callbacks.torch.attach`; see its module docstring.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core import Plasticity
from ..core.ops import NumpyOps
from ..core.targets import IGNORE_INDEX
from .state_init import makes_state_only


def default_logits(output: Any) -> torch.Tensor:
    """The logits in a forward output: a tensor, the first of a tuple, or ``["logits"]``
    (or a ``.logits`` attribute, as Hugging Face outputs have)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(getattr(output, "logits", None), torch.Tensor):
        return output.logits  # type: ignore[no-any-return]
    raise TypeError(
        f"sample gate: cannot find logits in a forward output of type {type(output).__name__}; "
        "pass outputs=<callable returning the logits tensor>"
    )


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def output_tensors(output: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a forward output (tensors, tuples, lists, dicts, dataclasses)."""
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, Mapping):
        for v in output.values():
            yield from output_tensors(v)
    elif isinstance(output, (tuple, list)):
        for v in output:
            yield from output_tensors(v)
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        for f in dataclasses.fields(output):
            yield from output_tensors(getattr(output, f.name))


class OutputGate:
    """Forward hook that gates samples through the forward output's gradient."""

    def __init__(
        self,
        module: nn.Module,
        plasticity: Plasticity,
        outputs: Callable[[Any], torch.Tensor] | None = None,
        ignore_index: int | None = IGNORE_INDEX,
    ) -> None:
        self.plasticity = plasticity
        self.outputs = outputs or default_logits
        self.ignore_index = ignore_index
        self._armed: tuple[Any, Any] | None = None
        self.decided = 0  # forward passes gated so far
        self.learned = 0  # samples that passed so far (summed over ranks)
        self.empty_steps = 0  # optimizer steps skipped because no sample passed
        self.waiting = 0  # samples passed whose step is still to come (skip_backward's queue)
        # No sample learns: detach the output so the backward pass costs nothing. Off
        # under a GradScaler, which needs every gradient to exist (zeros, then).
        self.detach_when_empty = True
        self._reached: list[list[bool]] = []  # per gated forward since the last step
        self._hook = module.register_forward_hook(self._on_forward)

    def arm(self, targets: Any, sample_ids: Any = None) -> None:
        self._armed = (targets, sample_ids)

    def disarm(self) -> None:
        self._armed = None

    @property
    def armed(self) -> bool:
        return self._armed is not None

    def remove(self) -> None:
        self._hook.remove()

    def forget_reached(self) -> None:
        """The step is skipped: whether the gradients reached the output does not matter."""
        self._reached = []

    def check_reached(self) -> None:
        """Raise if a gated forward's output got no gradient (the loss bypassed it)."""
        missed = any(not flag[0] for flag in self._reached)
        self._reached = []
        if missed:
            raise RuntimeError(
                "sample gate: no gradient reached the model's forward output before "
                "optimizer.step(), so the loss was made from something else and gated-out "
                "samples would still learn. Make the loss from what forward returns "
                "(outputs= only picks the class scores the gate judges)."
            )

    def _on_forward(self, module: nn.Module, args: Any, output: Any) -> Any:
        if self._armed is None or not torch.is_grad_enabled():
            return None
        targets, ids = self._armed
        self._armed = None
        mask, learned, local = self.judge(output, targets, ids)
        free = self.detach_when_empty and not _distributed()
        if learned == 0 and free and isinstance(output, torch.Tensor):
            return output.detach().requires_grad_()  # nothing learns: a backward pass for free
        if local < mask.numel():
            self._gate_gradients(output, mask)
        return None

    def judge(self, output: Any, targets: Any, ids: Any = None) -> tuple[torch.Tensor, int, int]:
        """Decide which samples of a forward ``output`` learn, and count them: the mask (on
        the scores' device), the number that learn summed over ranks, and on this rank."""
        scores = self.outputs(output)
        if not isinstance(scores, torch.Tensor):
            raise TypeError(
                f"sample gate: outputs= returned {type(scores).__name__}, not a tensor of "
                "class scores"
            )
        ops = self.plasticity.ops
        if isinstance(getattr(ops, "inner", ops), NumpyOps):  # sharded: the shards' ops
            result = self.plasticity.gate(
                _host(scores),
                _host(targets),
                None if ids is None else _host(ids),
                ignore_index=self.ignore_index,
            )
            mask = torch.from_numpy(np.asarray(result.mask, dtype=bool)).to(scores.device)
        else:
            ids_t = None if ids is None else torch.as_tensor(ids, device=scores.device)
            result = self.plasticity.gate(
                scores.detach(), _host(targets), ids_t, ignore_index=self.ignore_index
            )
            mask = result.mask
        learned = result.learned
        if _distributed():
            count = torch.tensor([learned], dtype=torch.int64, device=scores.device)
            torch.distributed.all_reduce(count)
            learned = int(count.item())
        self.decided += 1
        self.learned += learned
        return mask, learned, result.learned

    def _gate_gradients(self, output: Any, mask: torch.Tensor) -> None:
        """Zero the gated-out rows of the gradient of every batch-major output tensor."""
        batch = mask.shape[0]
        reached = [False]
        hooked = 0
        for t in output_tensors(output):
            if not t.requires_grad or t.dim() == 0 or t.shape[0] != batch:
                continue
            if mask.dim() == 2 and t.dim() >= 2 and t.shape[1] == mask.shape[1]:
                keep = mask  # per token
            else:
                keep = mask.reshape(batch, -1).any(1)  # a sample learns if any of its tokens do
            keep = keep.reshape(tuple(keep.shape) + (1,) * (t.dim() - keep.dim()))
            t.register_hook(_zero_rows(keep, reached))
            hooked += 1
        if not hooked:
            raise ValueError(
                f"sample gate: the forward output holds no tensor with a gradient whose first "
                f"axis is the batch ({batch}), so gated-out samples cannot be removed. Return "
                "the class scores (or what the loss is made of) from forward."
            )
        self._reached.append(reached)


def _zero_rows(keep: torch.Tensor, reached: list[bool]) -> Callable[[torch.Tensor], torch.Tensor]:
    def hook(grad: torch.Tensor | None) -> torch.Tensor | None:
        if grad is None:  # a compiled graph made the loss inside: nothing flows here
            return None
        reached[0] = True
        return grad * keep.to(grad.dtype)

    return hook


def _host(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return np.asarray(x.cpu().numpy())
    return np.asarray(x)


def refuse_closure_optimizer(opt: torch.optim.Optimizer) -> str:
    """Why a sample gate refuses ``opt``, an optimizer that evaluates its closure more
    than once per step (LBFGS)."""
    return (
        f"sample gate: {type(opt).__name__} evaluates its closure several times per step "
        "(line search, inner iterations), and the gate acts on one forward pass per step: "
        "the gradients of the later passes and every loss value the optimizer compares "
        "would hold the gated-out samples. Use a first-order optimizer (SGD, Adam, ...) "
        "with samples=, or samples=None with this one."
    )


CLOSURE_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (torch.optim.LBFGS,)
"""Optimizers known to call their closure more than once per step; others are caught
at their second call."""


def skip_empty_steps(opt: torch.optim.Optimizer, gate: OutputGate) -> Callable[[], None]:
    """Wrap ``opt.step`` so that it does nothing when no sample passed the gate since its
    last step (several optimizers may step after one gated forward pass).

    The wrapper is a bound method that keeps what an LR scheduler marked on the
    step it wraps, so schedulers created before or after it see a normal step.
    """
    inner = opt.step
    had_attr = "step" in opt.__dict__
    last = [gate.decided, gate.learned]

    def step(
        self: torch.optim.Optimizer, closure: Callable[[], Any] | None = None, **kwargs: Any
    ) -> Any:
        if closure is None and makes_state_only(self):  # a checkpoint reader's step
            return inner(**kwargs)
        loss = None
        if closure is not None:
            # Run the forward/backward first, so the gate has decided before we step.
            loss = closure()
            first = [True]

            def again() -> Any:
                if first[0]:
                    first[0] = False
                    return loss
                raise RuntimeError(refuse_closure_optimizer(self))

            if loss is None and (gate.decided == last[0] or gate.waiting):
                # training_step returned None: the batch is skipped (or its learners wait
                # for a full batch, and count towards the step that trains them)
                gate.disarm()
                self._opt_called = True  # type: ignore[attr-defined]
                return None
        if gate.decided == last[0]:
            raise RuntimeError(
                "sample gate: no forward pass of the attached model was gated before "
                "optimizer.step(). Plain PyTorch: call handle.gate_batch(targets) before "
                "model(x). Lightning: training_step must call self(x), the module's forward. "
                "A model compiled (torch.compile) before the gate was attached ignores the "
                "gate's hook: compile after attaching, or call torch._dynamo.reset()."
            )
        learned = gate.learned - last[1]
        last[:] = [gate.decided, gate.learned]
        if learned == 0:
            gate.forget_reached()
            gate.empty_steps += 1
            self._opt_called = True  # type: ignore[attr-defined]
            return loss
        gate.check_reached()
        return inner(again, **kwargs) if closure is not None else inner(**kwargs)

    step.__dict__.update(getattr(inner, "__dict__", {}))  # e.g. _wrapped_by_lr_sched
    opt.step = types.MethodType(step, opt)  # type: ignore[method-assign]

    def restore() -> None:
        if had_attr:
            opt.step = inner  # type: ignore[method-assign]
        else:
            del opt.step

    return restore
