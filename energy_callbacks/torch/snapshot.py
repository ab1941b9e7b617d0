"""The parameters one optimizer steps, as they were before its step, and the passes
that measure, mask and undo a step against that copy (used by :mod:`energy_callbacks.torch`).

On the CPU (float16/32/64) the work runs on zero-copy NumPy views, in one fused
numba pass per tensor where it can (float32/64); elsewhere on torch tensors.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core import fused
from . import difference
from .difference import DeviceDifference, block_difference, row_blocks
from .shards import local


class ShapeChanged(RuntimeError):
    """Parameter ``index`` of a snapshot changed shape between steps."""

    def __init__(self, index: int, old: tuple[int, ...], new: tuple[int, ...]) -> None:
        super().__init__(f"parameter {index} changed shape from {old} to {new}")
        self.index, self.old, self.new = index, old, new


class Snapshot:
    """The parameters one optimizer steps, as they were before its step.

    The copy is carried from step to step: the post-hook that measures a step
    brings it up to the new weights, so the next step's pre-hook copies nothing.
    A parameter that changed between steps in a way torch counts (its version
    counter or storage moved: ``load_state_dict``, an in-place op under
    ``no_grad``) is copied afresh. Changes torch does not count (``p.data`` ops,
    writes through NumPy views) land in the next step's measured update.
    """

    def __init__(self, params: list[nn.Parameter], use_numpy: bool) -> None:
        self.params = params
        self.use_numpy = use_numpy
        n = len(params)
        shards = [local(p) for p in params]  # what this process holds (all of p unsharded)
        if use_numpy:
            self.before: list[Any] = [np.empty(tuple(t.shape), _np_dtype(t)) for t in shards]
            # 16-bit differences round; float32 holds them exactly.
            self.delta: list[Any] = [
                np.empty(tuple(t.shape), np.promote_types(_np_dtype(t), np.float32)) for t in shards
            ]
            # Bit masks for the branch-free blend in drop(): 4x faster than copyto(where=).
            self.bits = [np.empty(tuple(t.shape), _uint(t)) for t in shards]
            self.xor = [np.empty(tuple(t.shape), _uint(t)) for t in shards]
        else:
            self.before = [
                torch.empty_like(t, memory_format=torch.contiguous_format) for t in shards
            ]
            self.delta = [None] * n
        # One fused pass per tensor where numba can do it (float32/64 on the CPU).
        self.fused = [
            use_numpy and fused.AVAILABLE and _np_dtype(t) in fused.FUSED_DTYPES for t in shards
        ]
        self.current = [False] * n  # before[i] holds the weights as the last step left them
        self.stamps: list[tuple[int, int] | None] = [None] * n

    def weights(self, i: int) -> torch.Tensor:
        """Parameter ``i`` as this process holds it (its shard under FSDP2), detached."""
        return local(self.params[i])

    def take(self) -> None:
        for i, (p, b) in enumerate(zip(self.params, self.before, strict=True)):
            if self.current[i] and self.stamps[i] == _stamp(p):
                continue
            w = local(p)
            if tuple(w.shape) != tuple(b.shape):  # new storage of another shape (p.data = ...)
                raise ShapeChanged(i, tuple(b.shape), tuple(w.shape))
            if self.use_numpy:
                torch.from_numpy(b).copy_(w)  # torch copies with all threads
            else:
                b.copy_(w)

    def differences(self) -> list[fused.Difference | None]:
        """``w_after - w_before`` per parameter (None where it had no grad), written out
        only if a rule reads it; for fused parameters only."""
        return [
            None if p.grad is None else fused.Difference(view(local(p)), b, d)
            for p, b, d in zip(self.params, self.before, self.delta, strict=True)
        ]

    def apply(
        self, diffs: list[fused.Difference | None], masks: list[Any], refresh: bool = True
    ) -> list[tuple[float, int] | None] | None:
        """Keep each fused parameter's update where its mask says (None keeps all), in
        one pass each, then copy the new weights into the snapshot (unless not
        ``refresh``: then the snapshot still holds the old weights).

        Returns the applied change's ``(sum |dw|, count)`` per parameter, or None if
        the step held NaN/Inf: then every parameter is back to its value before it.
        """
        stats: list[tuple[float, int] | None] = [None] * len(self.params)
        finite = True
        for i, (d, m) in enumerate(zip(diffs, masks, strict=True)):
            if d is None:
                continue
            w = view(self.weights(i))
            if m is None:
                stats[i] = fused.diff_totals(w, self.before[i])
                total = stats[i][0]
            else:  # a boolean mask, or a ThresholdMask applied in the same pass
                stats[i], total = fused.blend_kept(w, self.before[i], m)
            finite = finite and math.isfinite(total)
        if not finite:
            self.undo()
            return None
        if refresh:
            self.refresh(stats)
        return stats

    def refresh(self, stepped: list[Any]) -> None:
        """NumPy views only: copy the weights of the parameters whose ``stepped`` entry
        is not None into the snapshot (a step that :meth:`apply` did not refresh)."""
        for i, s in enumerate(stepped):
            if s is not None:
                torch.from_numpy(self.before[i]).copy_(self.weights(i))

    def device_differences(self) -> list[DeviceDifference | None]:
        """Torch tensors only: ``w_after - w_before`` per parameter (None where it had
        no grad), for the rules to read chunk by chunk."""
        return [
            None if p.grad is None else DeviceDifference(local(p), b)
            for p, b in zip(self.params, self.before, strict=True)
        ]

    def blend_on_device(
        self, masks: list[Any], alpha: float
    ) -> tuple[list[DeviceTotals | None], torch.Tensor]:
        """Torch tensors only: keep each stepped parameter's update where its mask says
        (None keeps all), chunk by chunk, leaving the snapshot as it was (so that
        :meth:`undo_unless` can still put the weights back).

        Returns the applied change's device totals per parameter (None where it had no
        grad), as :meth:`device_totals` does, and the whole proposal's ``sum |dw|``
        over all parameters (NaN/Inf if it held any): the step's finiteness check.
        """
        out: list[DeviceTotals | None] = []
        proposal = torch.zeros((), dtype=torch.float64, device=self.before[0].device)
        for p, b, m in zip(self.params, self.before, masks, strict=True):
            if p.grad is None:
                out.append(None)
                continue
            if m is None:
                totals = _change_totals(local(p), b, alpha)
                full = totals[0]  # NaN/Inf too if the change held any
            else:
                totals, full = _blend_totals(local(p), b, m, alpha)
            out.append(totals)
            proposal = proposal + full
        return out, proposal

    def deltas(self) -> tuple[list[Any], list[tuple[float, int] | None]]:
        """NumPy views only (torch ops read :meth:`device_differences` in blocks):
        ``w_after - w_before`` per parameter (None where the parameter had no grad),
        and ``(sum |delta|, count(delta != 0))`` where a fused kernel computed them."""
        out: list[Any] = []
        stats: list[tuple[float, int] | None] = [None] * len(self.params)
        for i, p in enumerate(self.params):
            if p.grad is None:
                out.append(None)
                continue
            d, w = self.delta[i], local(p)
            if self.fused[i]:
                stats[i] = fused.diff_stats(view(w), self.before[i], d)
            elif d.dtype == self.before[i].dtype:
                torch.sub(w, torch.from_numpy(self.before[i]), out=torch.from_numpy(d))
            else:  # 16-bit weights: subtract in float32, where the difference is exact
                np.subtract(view(w), self.before[i], out=d, dtype=d.dtype)
            out.append(d)
        return out, stats

    def drop(self, i: int, keep: Any) -> tuple[float, int] | None:
        """NumPy views only: undo parameter ``i``'s update outside ``keep``, and zero its
        delta there.

        Returns the applied change's ``(sum |delta|, count)`` from the fused kernel,
        which also brings the snapshot up to the new weights.
        """
        p, b, d = self.weights(i), self.before[i], self.delta[i]
        if self.fused[i]:
            return fused.blend_stats(view(p), b, d, keep)
        bits, x = self.bits[i], self.xor[i]
        np.copyto(bits, keep, casting="unsafe")
        np.negative(bits, out=bits)  # all ones where kept, zero where dropped
        w, u = view(p).view(bits.dtype), b.view(bits.dtype)
        np.bitwise_xor(w, u, out=x)
        np.bitwise_and(x, bits, out=x)
        np.bitwise_xor(u, x, out=w)  # kept: the new value; dropped: the old, bit for bit
        if d.itemsize == bits.itemsize:
            np.bitwise_and(d.view(bits.dtype), bits, out=d.view(bits.dtype))
        else:
            np.multiply(d, keep, out=d)
        return None

    def device_totals(self, alpha: float) -> list[DeviceTotals | None]:
        """Torch tensors only: each stepped parameter's ``(sum |d|, sum |d| ** alpha,
        count(d != 0))`` of ``d = w - before``, as device scalars read by nobody yet,
        taken chunk by chunk (no full-size temporary is made)."""
        return [
            None if p.grad is None else _change_totals(local(p), b, alpha)
            for p, b in zip(self.params, self.before, strict=True)
        ]

    def undo_unless(self, ok: torch.Tensor, stepped: list[bool]) -> None:
        """Torch tensors only: put the ``stepped`` parameters back where ``ok`` (a device
        bool scalar) is False, without reading ``ok`` to the host."""
        with torch.no_grad():
            for p, b, s in zip(self.params, self.before, stepped, strict=True):
                if s:
                    w = local(p)
                    torch.where(ok, w, b, out=w)

    def undo(self) -> None:
        """Put every parameter back to its value before the step."""
        with torch.no_grad():
            for p, b in zip(self.params, self.before, strict=True):
                if self.use_numpy:
                    np.copyto(view(local(p)), b)
                else:
                    local(p).copy_(b)
        self.settle([True] * len(self.params))

    def settle(self, current: list[bool]) -> None:
        """End of a step: ``current[i]`` says the snapshot of parameter ``i`` equals its
        weights now."""
        self.current = list(current)
        self.stamps = [_stamp(p) for p in self.params]


DeviceTotals = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""``(sum |d|, sum |d| ** alpha, count(d != 0))`` as device scalars (float64, float64, int64)."""


def _change_totals(p: torch.Tensor, b: torch.Tensor, alpha: float) -> DeviceTotals:
    """``(sum |d|, sum |d| ** alpha, count(d != 0))`` of ``d = p - b`` in at least
    float32 (exact for 16-bit weights), on the device, a block of
    ``difference.DEVICE_CHUNK`` entries at a time (each block a fresh tensor: the
    weights are only read)."""
    m1 = torch.zeros((), dtype=torch.float64, device=p.device)
    m_alpha = m1 if alpha == 1.0 else m1.clone()
    m0 = torch.zeros((), dtype=torch.int64, device=p.device)
    for d in DeviceDifference(p, b).flat_blocks(difference.DEVICE_CHUNK):
        m0 = m0 + torch.count_nonzero(d)
        d = d.abs_()
        m1 = m1 + d.sum(dtype=torch.float64)
        if alpha != 1.0:
            m_alpha = m_alpha + d.double().pow_(alpha).sum()
    return m1, (m1 if alpha == 1.0 else m_alpha), m0


def _blend_totals(
    p: torch.Tensor, b: torch.Tensor, keep: torch.Tensor, alpha: float
) -> tuple[DeviceTotals, torch.Tensor]:
    """Put ``b`` back in ``p`` outside ``keep`` (broadcast to ``p``'s shape), a block
    of rows at a time; the kept change's totals and the whole ``sum |p - b|``."""
    wide = torch.promote_types(p.dtype, torch.float32)
    a, bb = p.detach(), b
    kk = keep.expand(p.shape)
    if p.dim() == 0:
        a, bb, kk = a.reshape(1), bb.reshape(1), kk.reshape(1)
    zero = torch.zeros((), dtype=torch.float64, device=p.device)
    m1, m_alpha, full = zero, zero, zero
    m0 = torch.zeros((), dtype=torch.int64, device=p.device)
    with torch.no_grad():
        for s, e in row_blocks(a):
            ac, bc, kc = a[s:e], bb[s:e], kk[s:e]
            ad = block_difference(ac, bc, wide).abs_()
            full = full + ad.sum(dtype=torch.float64)
            torch.where(kc, ac, bc, out=ac)
            ad.masked_fill_(kc.logical_not(), 0)
            m0 = m0 + torch.count_nonzero(ad)
            m1 = m1 + ad.sum(dtype=torch.float64)
            if alpha != 1.0:
                m_alpha = m_alpha + ad.double().pow_(alpha).sum()
    return (m1, m1 if alpha == 1.0 else m_alpha, m0), full


def _stamp(p: torch.Tensor) -> tuple[int, int]:
    """What torch changes when a tensor is written in place or given new storage (a
    sharded parameter counts its writes, its shard's storage tells a new one)."""
    return p._version, local(p).data_ptr()


def view(p: torch.Tensor) -> np.ndarray:
    """A zero-copy NumPy view of a CPU tensor's storage (writes go to the tensor)."""
    return p.detach().numpy()


def _uint(p: torch.Tensor) -> np.dtype:
    return np.dtype(f"u{p.element_size()}")


def _np_dtype(p: torch.Tensor) -> np.dtype:
    return np.dtype(str(p.dtype).removeprefix("torch."))
