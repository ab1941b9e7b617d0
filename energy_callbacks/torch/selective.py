"""Selective backward for the sample gate: judge the batch without gradients, then
train on the samples that learn only (the mechanism of Composer's SelectiveBackprop).

The gradient gate (:mod:`energy_callbacks.torch.gate`) zeroes the rejected
samples' gradients, so their backward pass still runs. Here the LightningModule's
``training_step`` is wrapped:

1. one forward pass under ``torch.no_grad`` on the whole batch, judged by the
   gate (the mistake memory and the sample counts are updated as usual);
2. ``training_step`` on the rows that learn only: every tensor (or NumPy array)
   in the batch whose first axis is the batch is indexed, whatever the nesting;
3. no sample learns: ``training_step`` is not called and returns None, so
   Lightning skips the backward pass and the optimizer step.

With ``backward_batch=B`` the learners of successive batches wait in a queue until
B of them are judged, and ``training_step`` then runs on exactly B of them (the
queue of Jiang et al.'s Selective-Backprop, 2019): every backward pass and
optimizer step is a full batch, so their fixed costs are paid once per B learners
rather than once per loaded batch. The learners are judged by the weights of the
step they were loaded at and learn a few steps later. ``flush`` (set by the
Lightning callback on the last batch of an epoch, or before ``max_steps``) trains
what waits, fewer than B; what waits is part of the state (checkpoints) and is
counted as learned when judged.

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

from .gate import OutputGate

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
    return gather_rows([batch], [keep], [n])


def gather_rows(batches: list[Any], keeps: list[torch.Tensor], ns: list[int]) -> Any:
    """One batch of the rows ``keeps[i]`` of each ``batches[i]``, concatenated in order:
    a leaf is batch-major if its first axis is ``ns[i]`` in every batch (other leaves
    are taken from the last batch). The batches share one structure."""
    last = batches[-1]
    if isinstance(last, torch.Tensor):
        if all(isinstance(b, torch.Tensor) and b.dim() > 0 and b.shape[0] == n
               for b, n in zip(batches, ns, strict=True)):  # fmt: skip
            rows = [b[k.to(b.device)].to(last.device) for b, k in zip(batches, keeps, strict=True)]
            return rows[0] if len(rows) == 1 else torch.cat(rows)
        return last
    if isinstance(last, np.ndarray):
        if all(isinstance(b, np.ndarray) and b.ndim > 0 and b.shape[0] == n
               for b, n in zip(batches, ns, strict=True)):  # fmt: skip
            rows = [b[k.cpu().numpy()] for b, k in zip(batches, keeps, strict=True)]
            return rows[0] if len(rows) == 1 else np.concatenate(rows)
        return last

    def each(parts: list[Any]) -> Any:
        return gather_rows(parts, keeps, ns)

    if isinstance(last, Mapping):
        return type(last)({k: each([b[k] for b in batches]) for k in last})  # type: ignore[call-arg]
    if isinstance(last, tuple) and hasattr(last, "_fields"):  # a namedtuple
        return type(last)(*(each(list(parts)) for parts in zip(*batches, strict=True)))
    if isinstance(last, (tuple, list)):
        return type(last)(each(list(parts)) for parts in zip(*batches, strict=True))
    if dataclasses.is_dataclass(last) and not isinstance(last, type):
        fields = dataclasses.fields(last)
        return dataclasses.replace(
            last, **{f.name: each([getattr(b, f.name) for b in batches]) for f in fields}
        )
    return last


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
        backward_batch: int | None = None,
    ) -> None:
        self.module = module
        self.gate = gate
        self.targets = targets
        self.sample_ids = sample_ids
        self.inputs = inputs or default_inputs
        self.backward_batch = backward_batch
        self.flush = False  # train what waits at the next step, however few
        self.queue: list[Any] = []  # judged learners waiting for a backward pass
        self.counts: list[int] = []  # the rows of each
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
        if self.backward_batch is not None:
            return self._queued_step(batch, keep, n, m, *args, **kwargs)
        if m == 0:
            return None  # Lightning skips the backward pass and the optimizer step
        if m < n:
            batch = select_rows(batch, keep, n)
        return self._inner(batch, *args, **kwargs)

    def _queued_step(
        self, batch: Any, keep: torch.Tensor, n: int, m: int, *args: Any, **kwargs: Any
    ) -> Any:
        assert self.backward_batch is not None
        if m:
            self.queue.append(batch if m == n else select_rows(batch, keep, n))
            self.counts.append(m)
        waiting = sum(self.counts)
        if waiting < self.backward_batch and not (self.flush and waiting):
            self.gate.waiting = waiting
            return None  # not a full batch yet: no backward pass, no optimizer step
        if len(self.queue) == 1:
            rows = self.queue[0]  # no copy: the common case of B learners in one batch
        else:
            every = [torch.ones(c, dtype=torch.bool) for c in self.counts]
            rows = gather_rows(self.queue, every, self.counts)
        take = min(self.backward_batch, waiting)
        first = torch.arange(waiting) < take
        self.queue, self.counts = [], []
        if take < waiting:
            self.queue, self.counts = [select_rows(rows, ~first, waiting)], [waiting - take]
            rows = select_rows(rows, first, waiting)
        self.gate.waiting = waiting - take
        return self._inner(rows, *args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        """The learners that wait for a backward pass (``backward_batch``), as batches."""
        return {"batches": list(self.queue), "rows": list(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.queue, self.counts = list(state["batches"]), [int(c) for c in state["rows"]]
        self.gate.waiting = sum(self.counts)

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
