"""Selective backward for the sample gate: judge the batch without gradients, then
train on the samples that learn only (the mechanism of Composer's SelectiveBackprop).

The gradient gate (:mod:`energy_callbacks.torch_gate`) zeroes the rejected
samples' gradients, so their backward pass still runs. Here the LightningModule's
``training_step`` is wrapped:

1. one forward pass under ``torch.no_grad`` on the whole batch, judged by the
   gate (the mistake memory and the sample counts are updated as usual);
2. ``training_step`` on the rows that learn only: every tensor (or NumPy array)
   in the batch whose first axis is the batch is indexed, whatever the nesting;
3. no sample learns: ``training_step`` is not called and returns None, so
   Lightning skips the backward pass and the optimizer step.

What it costs and changes: the judging forward is an extra forward pass of the
whole batch (under ``no_grad``: no activations kept). The loss is then the mean
over the samples that learn, as in SelectiveBackprop, where the gradient gate's
loss divides by the whole batch: at batch 1 the two are the same update, at
batch B with m learners a step is B / m times larger than the gradient gate's.
Per-token gating (``(batch, tokens, classes)`` scores) cannot drop part of a
sample, so it is refused.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from .torch_gate import OutputGate

INPUT_KEYS = ("x", "input", "inputs", "input_ids", "image", "images", "features")


def default_inputs(batch: Any) -> Any:
    """``batch[0]`` for tuples/lists; the ``x``/``input(s)``/``input_ids``/``image(s)``/
    ``features`` key for dicts."""
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    if isinstance(batch, Mapping):
        for key in INPUT_KEYS:
            if key in batch:
                return batch[key]
    raise ValueError(
        "PlasticityCallback(skip_backward=True): cannot find the inputs in a batch of type "
        f"{type(batch).__name__}; use (x, y) tuples, a dict with one of {INPUT_KEYS}, or pass "
        "inputs=<callable batch -> what the module's forward takes>"
    )


def select_rows(batch: Any, keep: torch.Tensor, n: int) -> Any:
    """``batch`` with only the rows ``keep`` of every tensor/array whose first axis is ``n``
    (tuples, lists, dicts and dataclasses are rebuilt; other leaves are kept)."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() > 0 and batch.shape[0] == n:
            return batch[keep.to(batch.device)]
        return batch
    if isinstance(batch, np.ndarray):
        return batch[keep.cpu().numpy()] if batch.ndim > 0 and batch.shape[0] == n else batch
    if isinstance(batch, Mapping):
        return type(batch)({k: select_rows(v, keep, n) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(select_rows(v, keep, n) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(select_rows(v, keep, n) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        fields = dataclasses.fields(batch)
        return dataclasses.replace(
            batch, **{f.name: select_rows(getattr(batch, f.name), keep, n) for f in fields}
        )
    return batch


class SelectiveBackward:
    """Wraps ``module.training_step``: judge the batch without gradients, train on the
    samples that learn. ``remove()`` restores the module's own method."""

    def __init__(
        self,
        module: nn.Module,
        gate: OutputGate,
        targets: Callable[[Any], Any],
        sample_ids: Callable[[Any], Any],
        inputs: Callable[[Any], Any] | None = None,
    ) -> None:
        self.module = module
        self.gate = gate
        self.targets = targets
        self.sample_ids = sample_ids
        self.inputs = inputs or default_inputs
        self._had_attr = "training_step" in module.__dict__
        self._inner = module.training_step  # type: ignore[operator]
        selective = self

        def training_step(self_: nn.Module, batch: Any, *args: Any, **kwargs: Any) -> Any:
            return selective.step(batch, *args, **kwargs)

        training_step.__doc__ = getattr(self._inner, "__doc__", None)
        module.training_step = types.MethodType(training_step, module)  # type: ignore[method-assign]

    def step(self, batch: Any, *args: Any, **kwargs: Any) -> Any:
        keep = self.judge(batch)
        n = int(keep.shape[0])
        m = int(keep.sum())  # one host read per step: the skip is decided on the host
        if m == 0:
            return None  # Lightning skips the backward pass and the optimizer step
        if m < n:
            batch = select_rows(batch, keep, n)
        return self._inner(batch, *args, **kwargs)

    def judge(self, batch: Any) -> torch.Tensor:
        """The gate's decision on the whole batch, from a forward pass without gradients."""
        with torch.no_grad():
            output = self.module(self.inputs(batch))
        mask, _, _ = self.gate.judge(output, self.targets(batch), self.sample_ids(batch))
        if mask.dim() != 1:
            raise ValueError(
                "PlasticityCallback(skip_backward=True) needs one decision per sample, "
                f"(batch, classes) scores; got a mask of shape {tuple(mask.shape)} (per-token "
                "gating). Per-token gating needs the gradient gate: skip_backward=False."
            )
        return mask.to(torch.bool)

    def remove(self) -> None:
        if self._had_attr:
            self.module.training_step = self._inner  # type: ignore[method-assign]
        else:
            del self.module.training_step
