"""The rules on FSDP2 shards: :class:`ShardedOps`, the array operations of the core
rules on this process's rows of each tensor, exact as on whole tensors.

The core rules run unchanged. Each proposal is a :class:`Rows`: this process's
rows of a tensor (an array of the process's own ops: a NumPy view, a lazy
difference, a device tensor) and the whole tensor's shape. Under FSDP2 a shard
is one contiguous range of a tensor's flat (row-major) indices, so:

- elementwise ops (``Threshold``, ``keep``, masks combined) and row-wise ops
  (a unit's norm, the per-unit or equal-count top fraction over a unit's row)
  run on the local rows: torch layers hold their units on dim 0;
- a selection over a whole tensor (the top fraction, the top units of a layer)
  is a radix selection on the bits of ``|dw|``
  (:mod:`~energy_callbacks.torch.sharded_select`): histograms summed over the
  processes find the k-th largest value, and the ties at it go to the lowest
  flat indices, the earlier processes first, as on one process. The
  selections of a step run together, 3 collectives for float32. No process
  sees another's values;
- the approximate top fraction gathers its strided sample (about 16384 entries
  over all processes), so every process cuts at the same threshold;
- seeded masks (fixed subnetwork, random units and synapses) are drawn whole on
  every process, which reads its rows of them.

Unit axes other than dim 0 cannot be kept local and are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core.ops import APPROX_SAMPLE, ArrayOps, approx_cut, approx_stride
from .difference import DeviceDifference
from .sharded_select import LazyMask, Selection, resolve
from .shards import Shards


class Rows:
    """This process's rows of an array of shape ``shape``: the flat entries
    ``[start, start + size)`` of the whole, as ``local`` (an array of the inner ops;
    a selection's mask is computed when ``local`` is first read)."""

    def __init__(self, local: Any, shape: tuple[int, ...], start: int) -> None:
        self.raw, self.shape, self.start = local, tuple(shape), start

    @property
    def local(self) -> Any:
        if isinstance(self.raw, LazyMask):
            self.raw = self.raw.value()
        return self.raw

    @property
    def dtype(self) -> Any:
        return self.raw.dtype

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __add__(self, other: Rows) -> Rows:  # unit scores of a kernel and its bias
        return Rows(self.local + other.local, self.shape, self.start)


class ShardedOps:
    """:class:`~energy_callbacks.core.ops.ArrayOps` on :class:`Rows`, around the ops of
    this process's shards (``inner``). Arrays that are not rows (a batch's outputs,
    device totals) pass through to ``inner``."""

    def __init__(self, inner: ArrayOps, shards: Shards) -> None:
        self.inner = inner
        self.shards = shards
        self._pending: list[Selection] = []  # selections asked for and not yet run

    def resolve(self) -> None:
        """Run every pending selection, together (the first read of a mask does)."""
        pending, self._pending = self._pending, []
        resolve(pending)

    # -- where rows lie --------------------------------------------------------
    def span(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """``(start, size)`` of this process's flat entries of a parameter-shaped array
        (FSDP2 splits its dim 0)."""
        if not shape:
            return (0, 1) if self.shards.first else (0, 0)
        r0, r1 = self.shards.rows(shape[0])
        row = math.prod(shape[1:])
        return r0 * row, (r1 - r0) * row

    @staticmethod
    def local_shape(shape: tuple[int, ...], start: int, size: int) -> tuple[int, ...]:
        """The shape of entries ``[start, start + size)`` of ``shape``: whole rows of it
        where they are whole rows, else a flat run."""
        if not shape:
            return shape if size else (0,)
        row = math.prod(shape[1:])
        if row and start % row == 0 and size % row == 0:
            return (size // row, *shape[1:])
        return (size,)

    @staticmethod
    def aligned(x: Rows) -> bool:
        """True when ``x``'s local entries are whole rows of its shape."""
        row = math.prod(x.shape[1:])
        return len(x.shape) >= 1 and row > 0 and x.start % row == 0

    def rows_of(self, x: Any, like: Any) -> Any:
        """The local array of ``x`` over ``like``'s entries: ``x``'s own for rows; its
        slice for a whole array (a seeded mask every process draws whole)."""
        if isinstance(x, Rows):
            return x.local
        size = _local_size(like)
        whole = math.prod(tuple(like.shape))
        if math.prod(tuple(x.shape)) == size != whole:  # this process's rows already
            return x
        flat = self.inner.reshape(x, (math.prod(tuple(x.shape)),))[like.start : like.start + size]
        return self.inner.reshape(flat, self.local_shape(like.shape, like.start, size))

    def fresh(self, local: Any, shape: tuple[int, ...]) -> Rows:
        return Rows(local, tuple(shape), self.span(tuple(shape))[0])

    def local_mask(self, mask: Any, shape: tuple[int, ...]) -> Any:
        """A rule's mask for a parameter of ``shape``, as the inner ops hold it locally."""
        if mask is None or isinstance(mask, Rows):
            return None if mask is None else mask.local
        start, size = self.span(tuple(shape))
        return self.rows_of(mask, _Span(tuple(shape), start, size))

    def whole(self, x: Any) -> Any:
        """All entries of a small array (unit masks, unit scores) on every process, in
        flat order: gathered from the processes for rows."""
        if not isinstance(x, Rows):
            return x
        parts: list[Any] = [None] * self.shards.world
        torch.distributed.all_gather_object(
            parts, _host(self.inner, x.local), group=self.shards.group
        )
        whole = np.concatenate([np.reshape(p, -1) for p in parts]).reshape(x.shape)
        return self.inner.from_numpy(whole)

    # -- elementwise ---------------------------------------------------------
    def _unary(self, x: Any, op: Any, *args: Any) -> Any:
        if isinstance(x, Rows):
            return Rows(op(x.local, *args), x.shape, x.start)
        return op(x, *args)

    def _binary(self, a: Any, b: Any, op: Any) -> Any:
        like = a if isinstance(a, Rows) else b if isinstance(b, Rows) else None
        if like is None:
            return op(a, b)
        return Rows(op(self.rows_of(a, like), self.rows_of(b, like)), like.shape, like.start)

    def abs(self, x: Any) -> Any:
        return self._unary(x, self.inner.abs)

    def magnitude(self, x: Any) -> Any:
        return self._unary(x, self.inner.magnitude)

    def isfinite_all(self, x: Any) -> bool:
        return self.inner.isfinite_all(x.local if isinstance(x, Rows) else x)

    def total(self, x: Any, alpha: float = 1.0) -> float:
        """This process's share (the meter sums the shares when it is read)."""
        return self.inner.total(x.local if isinstance(x, Rows) else x, alpha)

    def count_nonzero(self, x: Any) -> int:
        """This process's share, as :meth:`total`."""
        return self.inner.count_nonzero(x.local if isinstance(x, Rows) else x)

    def logical_and(self, a: Any, b: Any) -> Any:
        return self._binary(a, b, self.inner.logical_and)

    def logical_or(self, a: Any, b: Any) -> Any:
        return self._binary(a, b, self.inner.logical_or)

    def logical_not(self, a: Any) -> Any:
        return self._unary(a, self.inner.logical_not)

    def add(self, a: Any, b: Any) -> Any:
        return self._binary(a, b, self.inner.add)

    def scale(self, x: Any, factor: float) -> Any:
        return self._unary(x, self.inner.scale, factor)

    def greater_equal(self, x: Any, threshold: float) -> Any:
        return self._unary(x, self.inner.greater_equal, threshold)

    def deferred(self, x: Any) -> bool:
        return self.inner.deferred(x.local if isinstance(x, Rows) else x)

    def keep(self, x: Any, mask: Any, out: Any | None = None) -> Any:
        if not isinstance(x, Rows):
            return self.inner.keep(x, mask, out)
        local_out = out.local if isinstance(out, Rows) else out
        return Rows(self.inner.keep(x.local, self.rows_of(mask, x), local_out), x.shape, x.start)

    def zeros_like(self, x: Any) -> Any:
        return self._unary(x, self.inner.zeros_like)

    def ones_mask(self, shape: tuple[int, ...]) -> Any:
        start, size = self.span(tuple(shape))
        return Rows(
            self.inner.ones_mask(self.local_shape(tuple(shape), start, size)), tuple(shape), start
        )

    # -- shapes ----------------------------------------------------------------
    def reshape(self, x: Any, shape: tuple[int, ...]) -> Any:
        if not isinstance(x, Rows):
            size = math.prod(tuple(x.shape))
            start, mine = self.span(tuple(shape))
            if size != math.prod(tuple(shape)) and size == mine:  # this process's rows
                local = self.inner.reshape(x, self.local_shape(tuple(shape), start, mine))
                return Rows(local, tuple(shape), start)
            return self.inner.reshape(x, shape)
        local = self.local_shape(tuple(shape), x.start, _local_size(x))
        if isinstance(x.raw, LazyMask):  # a selection still to run keeps waiting
            return Rows(x.raw.reshaped(local), tuple(shape), x.start)
        return Rows(self.inner.reshape(x.local, local), tuple(shape), x.start)

    def moveaxis(self, x: Any, source: int, destination: int) -> Any:
        if not isinstance(x, Rows):
            return self.inner.moveaxis(x, source, destination)
        if source % x.ndim != destination % x.ndim:
            raise ValueError(
                "plasticity on sharded parameters: a unit rule needs the units on dim 0 "
                f"(the dim FSDP2 splits); a tensor of shape {x.shape} holds them on dim "
                f"{source}. Leave that layer out (layers=) or train unsharded"
            )
        return x

    def expand_units(self, unit_mask: Any, shape: tuple[int, ...], axis: int) -> Any:
        shape = tuple(shape)
        start, size = self.span(shape)
        local_shape = self.local_shape(shape, start, size)
        if axis == 0:
            r0 = start // max(1, math.prod(shape[1:]))
            units = _Span((shape[0],), r0, local_shape[0] if local_shape else 0)
            if isinstance(unit_mask, Rows) and unit_mask.start != r0:
                unit_mask = self.whole(unit_mask)
            mine = self.rows_of(unit_mask, units)
        else:  # presynaptic units: every process needs all of them
            mine = self.whole(unit_mask)
        return Rows(self.inner.expand_units(mine, local_shape, axis), shape, start)

    def concat(self, xs: list[Any], axis: int) -> Any:
        if not any(isinstance(x, Rows) for x in xs):
            return self.inner.concat(xs, axis)
        if axis != 1 or not all(
            isinstance(x, Rows) and self.aligned(x) and x.ndim == 2 for x in xs
        ):
            raise ValueError("plasticity on sharded parameters: only unit rows join (axis 1)")
        rows = xs[0].start // xs[0].shape[1]
        width = sum(x.shape[1] for x in xs)
        local = self.inner.concat([x.local for x in xs], axis)
        return Rows(local, (xs[0].shape[0], width), rows * width)

    def split(self, x: Any, sizes: list[int], axis: int) -> list[Any]:
        if not isinstance(x, Rows):
            return self.inner.split(x, sizes, axis)
        rows = x.start // x.shape[1]
        return [
            Rows(part, (x.shape[0], width), rows * width)
            for part, width in zip(self.inner.split(x.local, sizes, axis), sizes, strict=True)
        ]

    # -- reductions over rows ------------------------------------------------------
    def row_l1(self, x: Any, axis: int) -> Any:
        return self._per_row(self.inner.row_l1, x, axis)

    def row_max(self, x: Any, axis: int) -> Any:
        return self._per_row(self.inner.row_max, x, axis)

    def _per_row(self, op: Any, x: Any, axis: int) -> Any:
        """A figure per unit (row) of ``x``: the units of this process's rows."""
        if not isinstance(x, Rows):
            return op(x, axis)
        self.moveaxis(x, axis, 0)  # refuses units off dim 0
        unit = x.start // max(1, math.prod(x.shape[1:]))
        return Rows(op(x.local, 0), (x.shape[0],), unit)

    # -- selections ----------------------------------------------------------------
    def top_k_mask(self, scores: Any, k: Any, largest: bool = True) -> Any:
        if not isinstance(scores, Rows):
            return self.inner.top_k_mask(scores, k, largest)
        rows, n = scores.shape
        if rows == 1:  # one row split over the processes
            flat = _dense(self.inner, scores.local).reshape(-1)
            mask = self._select(flat, n, int(np.asarray(k).reshape(-1)[0]), largest)
            return Rows(self._like_inner(mask, scores.local), scores.shape, scores.start)
        if not self.aligned(scores):
            raise ValueError("plasticity on sharded parameters: rows split between processes")
        r0 = scores.start // n
        kk = k if np.ndim(k) == 0 else np.asarray(k)[r0 : r0 + _local_size(scores) // n]
        return Rows(self.inner.top_k_mask(scores.local, kk, largest), scores.shape, scores.start)

    def top_magnitude_mask(self, x: Any, k: int, approximate: bool = False) -> Any:
        if not isinstance(x, Rows):
            return self.inner.top_magnitude_mask(x, k, approximate)
        n = x.size
        flat = _dense(self.inner, self.inner.abs(x.local)).reshape(-1)
        if approximate:
            mask = self._approx(flat, x.start, n, k)
        else:
            mask = self._select(flat, n, k, True)
        return Rows(self._like_inner(mask, x.local), x.shape, x.start)

    def approx_top_mask(self, scores: Any, k: int) -> Any:
        if not isinstance(scores, Rows):
            return self.inner.approx_top_mask(scores, k)
        flat = _dense(self.inner, scores.local).reshape(-1)
        mask = self._approx(flat, scores.start, scores.size, k)
        return Rows(self._like_inner(mask, scores.local), scores.shape, scores.start)

    def _like_inner(self, mask: torch.Tensor | Selection, like: Any) -> Any:
        """A torch bool mask (or a selection's, when it runs) in the inner ops' kind of
        array, shaped like ``like``."""
        shape = tuple(like.shape)
        numpy = not isinstance(like, (torch.Tensor, DeviceDifference))
        if isinstance(mask, Selection):
            return LazyMask(self, mask, shape, numpy)
        return mask.numpy().reshape(shape) if numpy else mask.reshape(shape)

    def _select(self, a: torch.Tensor, n: int, k: int, largest: bool) -> Any:
        """The mask of this process's part ``a`` (flat, values >= 0) of the ``k`` largest
        (or smallest) of ``n`` values split over the processes, ties to the lower flat
        index: a :class:`Selection` that runs with the step's others when first read."""
        if k >= n:
            return torch.ones(a.shape, dtype=torch.bool, device=a.device)
        if k <= 0:
            return torch.zeros(a.shape, dtype=torch.bool, device=a.device)
        selection = Selection(a, k, largest, self.shards)
        self._pending.append(selection)
        return selection

    def _approx(self, a: torch.Tensor, start: int, n: int, k: int) -> Any:
        """The approximate top ``k`` of ``n`` values >= 0: the cut from the whole strided
        sample, gathered from every process."""
        if n <= APPROX_SAMPLE or k <= 0 or k >= n:
            return self._select(a, n, k, True)
        step = approx_stride(n)
        first = (-start) % step
        parts: list[Any] = [None] * self.shards.world
        mine = a[first::step].cpu().numpy()
        torch.distributed.all_gather_object(parts, mine, group=self.shards.group)
        t = approx_cut(np.concatenate(parts), n, k)
        return a > 0 if t <= 0 else a >= torch.as_tensor(t, dtype=a.dtype, device=a.device)

    # -- everything else goes to the inner ops ------------------------------------
    def from_numpy(self, x: np.ndarray) -> Any:
        """A whole array (a batch's labels, a seeded mask), as the inner ops hold it."""
        return self.inner.from_numpy(x)

    def to_numpy(self, x: Any) -> np.ndarray:
        """A host copy of what this process holds of ``x`` (its rows, for rows)."""
        return self.inner.to_numpy(x.local if isinstance(x, Rows) else x)

    def blocks(self, x: Any, size: int) -> Any:
        """This process's entries of ``x``, ``size`` at a time (the caching store steps
        element by element, so its share alone)."""
        return self.inner.blocks(x.local if isinstance(x, Rows) else x, size)

    def __getattr__(self, name: str) -> Any:
        # argmax, class_probability, zeros_f64, add_f64, apply_update, blocks, assign:
        # batch outputs and plain arrays, never rows
        return getattr(self.inner, name)


@dataclass
class _Span:
    """Where rows lie, without values (to slice a whole array to them)."""

    shape: tuple[int, ...]
    start: int
    count: int


def _local_size(x: Any) -> int:
    if isinstance(x, _Span):
        return x.count
    local = x.raw
    return int(math.prod(local.shape)) if local is not None else 0


def _dense(inner: ArrayOps, x: Any) -> torch.Tensor:
    """A local array written out as a torch tensor (NumPy arrays are shared, not copied)."""
    if isinstance(x, DeviceDifference):
        return x.dense()
    if isinstance(x, torch.Tensor):
        return x
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x)))


def _host(inner: ArrayOps, x: Any) -> np.ndarray:
    if isinstance(x, (torch.Tensor, DeviceDifference)):
        return _dense(inner, x).detach().cpu().numpy()
    return np.asarray(x)
