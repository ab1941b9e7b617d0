"""The step on the Keras torch backend, for float32/64 variables on the CPU: the torch
adapter's fused kernels on zero-copy NumPy views of the variables.

Keras's torch backend runs the train step eagerly, so each ``keras.ops`` call of the
in-graph rules is a kernel launch with Python around it, and each writes a tensor:
the exact top fraction took 8x the plain step on the paper MLP, and its proposals,
``|dw|`` and ``top_k`` candidates held 2.8x the weights' bytes. Here the step runs
as the torch adapter's does on the CPU:

- the snapshot of the weights before the update is one buffer per variable, kept
  and refilled every step (the selection's scratch is keyed by it, so it is reused);
- the rules see each difference unwritten (:class:`~energy_callbacks.core.fused.Difference`)
  and select with :class:`~energy_callbacks.core.fused.FusedNumpyOps`: the core's
  masks, ties included;
- one pass per tensor keeps the selected entries, puts the snapshot back elsewhere and
  measures what changed (:func:`~energy_callbacks.core.fused.blend_kept`); measuring
  only is one read-only pass (:func:`~energy_callbacks.core.fused.diff_totals`), and so
  is the gradients' finiteness check (:func:`~energy_callbacks.core.fused.all_finite`).

It serves the rules at ``alpha = 1`` without caching when numba is installed; other
steps (bfloat16, a CUDA device, ``alpha != 1``, caching) take the ``keras.ops`` path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..core import Plasticity


def host_step_for(variables: Sequence[Any], plasticity: Plasticity) -> HostStep | None:
    """A :class:`HostStep` when the step can take it: the torch backend, numba, every
    covered variable a contiguous float32/64 CPU tensor, ``alpha = 1`` and no caching."""
    import keras

    if keras.backend.backend() != "torch":
        return None
    if plasticity.alpha != 1.0 or plasticity.caching is not None:
        return None
    from ..core import fused

    if not fused.AVAILABLE:
        return None
    import torch

    for v in variables:
        t = v.value
        if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64):
            return None
        if not t.is_contiguous():
            return None
    return HostStep()


class HostStep:
    """The optimizer's step on the torch backend's CPU tensors (see the module)."""

    def __init__(self) -> None:
        from ..core.fused import FusedNumpyOps

        self.ops = FusedNumpyOps()  # its scratch buffers live as long as the optimizer
        self._before: list[Any] = []

    def snapshot(self, variables: Sequence[Any]) -> list[Any]:
        """The variables' values now, copied into buffers kept from step to step."""
        import torch

        values = [v.value.detach() for v in variables]
        if [(b.shape, b.dtype) for b in self._before] != [(t.shape, t.dtype) for t in values]:
            self._before = [
                torch.empty_like(t, memory_format=torch.contiguous_format) for t in values
            ]
        for b, t in zip(self._before, values, strict=True):
            b.copy_(t)
        return self._before

    def all_finite(self, grads: Sequence[Any]) -> Any:
        """True (a boolean tensor) when no gradient holds NaN/Inf: one read-only pass
        per float32/64 gradient, no boolean copy of it."""
        import torch

        from ..core import fused

        for g in grads:
            if g is None:
                continue
            t = g.detach()
            if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64):
                ok = fused.all_finite(t.numpy())
            else:
                ok = bool(torch.isfinite(t).all())
            if not ok:
                return torch.tensor(False)
        return torch.tensor(True)

    def step(
        self,
        plasticity: Plasticity,
        covered: Sequence[int],
        before: Sequence[Any],
        after: Sequence[Any],
        live: Any,
        grads_finite: Any,
    ) -> tuple:
        """Mask (when a rule restricts) and measure the step in place; the optimizer's
        ``_masked_step`` outputs, with no new values (the weights hold them already):
        the optimizer puts ``before`` back when the step does not go ahead."""
        import torch

        from ..core import fused

        views = [_view(after[i]) for i in covered]
        bases = [_view(before[i]) for i in covered]
        if plasticity.restricts:
            proposed = [
                fused.Difference(a, b, np.empty(a.shape, a.dtype))  # written only if read
                for a, b in zip(views, bases, strict=True)
            ]
            masks = plasticity.masks(proposed)  # with self.ops (the optimizer set them)
        else:
            masks = [None] * len(views)
        m1, m0, whole = [], [], []
        for a, b, m in zip(views, bases, masks, strict=True):
            if m is None:
                total, count = fused.diff_totals(a, b)
                kept = total
            else:
                (kept, count), total = fused.blend_kept(a, b, m)
            m1.append(kept)
            m0.append(count)
            whole.append(total)
        finite = bool(grads_finite) and all(math.isfinite(t) for t in whole)
        go = finite and bool(live)
        sums = torch.tensor(m1 if go else [0.0] * len(m1), dtype=torch.float32)
        counts = torch.tensor(m0 if go else [0] * len(m0), dtype=torch.int32)
        return None, sums, counts, sums, torch.tensor(finite), torch.tensor(go), None


def _view(t: Any) -> np.ndarray:
    """A NumPy view of a CPU tensor's storage (writes go to the tensor)."""
    return t.detach().numpy()
