"""Fused CPU kernels (numba) on NumPy views, with exact results: the hot path of the torch
adapter on the CPU, and of the Keras adapter on the torch backend.

One pass per tensor instead of the 3-4 NumPy passes that the same work takes:
in a training loop each pass over a multi-megabyte tensor is a cache refill.

- :func:`diff_totals` returns the L1 norm (float64) and nonzero count of
  ``after - before`` in one read-only pass (measuring only: no delta is written);
  :func:`net_totals` the same in float64 differences (``w_T - w_0``);
- :func:`diff_stats` writes ``delta = after - before`` and returns its L1 norm
  and nonzero count;
- :func:`blend_stats` undoes the dropped entries of a step, returns the
  applied change's L1 norm and count, and brings the snapshot up to the new
  weights;
- :func:`blend_kept` undoes the dropped entries for the adapter's masked steps
  at ``alpha = 1`` without a written difference: it leaves ``before`` intact,
  so a step found NaN/Inf in that pass can still be undone (the snapshot is
  brought up to the new weights by a copy afterwards, not kept in a spare
  buffer: a second copy of the weights would cost more memory than the copy's
  time);
- :class:`Difference` is ``after - before`` written out only when an op reads
  it; the approximate top fraction of one is a :class:`ThresholdMask`, so that
  rule costs a strided sample plus that one pass;
- :class:`FusedNumpyOps` selects the largest ``|dw|`` without a separate
  magnitude pass, and finds the entries in the sampled bracket of an exact
  selection in one pass; its candidates are compacted 8 flags at a time.

The loops are branch-free so that LLVM vectorizes them: a branch on a random
mask mispredicts (the blend took 1.3 ms instead of 0.15 ms on 784k entries).
For the same reason the exact selection's bracket pass only writes two masks;
the candidates (about 2% of the entries) are then compacted and gathered by a
loop that skips the empty 8-byte words of that mask. It replaced
``flatnonzero`` and NumPy's gathers: the whole exact selection went from 1.09
to 0.75 ms on 784k entries.

The sums accumulate in float64, in another order than NumPy's pairwise sums
(relative differences around 1e-16). ``AVAILABLE`` is False without numba; the
adapter then uses the NumPy reference path. Only float32 and float64 are fused.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import numpy as np

from .ops import (
    APPROX_SAMPLE,
    NumpyOps,
    approx_cut,
    approx_stride,
    bracket,
    bracket_sample,
)

try:  # numba is optional: the NumPy path gives the same numbers, slower
    from numba import njit

    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only without numba
    AVAILABLE = False

FUSED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

if AVAILABLE:
    # No "nnan"/"ninf": the sum must turn NaN/Inf reliably (it is a step's finiteness check).
    @njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
    def _diff_totals(after: Any, before: Any) -> tuple[float, int]:
        acc = 0.0
        count = 0
        for i in range(after.size):
            d = after[i] - before[i]  # in the weights' dtype: the step's dw
            acc += abs(np.float64(d))
            count += d != 0
        return acc, count

    @njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
    def _zero_unless_nonfinite(x: Any) -> Any:
        # x * 0 is 0 for finite x and NaN for NaN/Inf: the sum is 0 exactly when all
        # entries are finite (it never overflows, whatever their size)
        acc = x.dtype.type(0)
        for i in range(x.size):
            acc += x[i] * x.dtype.type(0)
        return acc

    @njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
    def _net_totals(after: Any, before: Any) -> tuple[float, int]:
        acc = 0.0
        count = 0
        for i in range(after.size):
            d = np.float64(after[i]) - np.float64(before[i])  # exact for float32 weights
            acc += abs(d)
            count += d != 0
        return acc, count

    @njit(cache=True, nogil=True, fastmath=True)
    def _diff_stats(after: Any, before: Any, delta: Any) -> tuple[float, int]:
        acc = 0.0
        count = 0
        for i in range(after.size):
            d = after[i] - before[i]
            delta[i] = d
            acc += abs(np.float64(d))
            count += d != 0
        return acc, count

    @njit(cache=True, nogil=True, fastmath=True)
    def _blend_stats(w: Any, before: Any, delta: Any, keep: Any) -> tuple[float, int]:
        # Branch-free, so that both loops vectorize: a branch on a random 10% mask
        # mispredicts often and cost 5x. ``w`` and ``before`` are unsigned views, so the
        # select copies bits exactly; ``delta * 0/1`` is exact for finite deltas.
        acc = 0.0
        count = 0
        for i in range(delta.size):
            d = delta[i] * delta.dtype.type(keep[i])
            delta[i] = d
            acc += abs(np.float64(d))
            count += d != 0
        for i in range(w.size):
            ones = w.dtype.type(0) - w.dtype.type(keep[i])  # all ones where kept
            b = before[i]
            new = b ^ ((w[i] ^ b) & ones)
            w[i] = new
            before[i] = new
        return acc, count

    # No "nnan"/"ninf" here: the step's total must turn NaN/Inf reliably, since it is
    # the finiteness check of a step whose difference was never written out.
    @njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
    def _blend_kept(w: Any, before: Any, keep: Any, t: Any, floor: Any) -> tuple[float, int, float]:
        # keep None: keep |w - before| >= t and > floor; else where keep[i]. The kept
        # entries stay new, the rest go back to ``before``, which is left as it was, so
        # the step can still be undone. Selects copy values bit for bit.
        acc = 0.0
        count = 0
        total = 0.0
        zero = w.dtype.type(0)
        for i in range(w.size):
            a = w[i]
            b = before[i]
            d = a - b
            ad = abs(d)
            if keep is None:
                m = (ad >= t) & (ad > floor)
            else:
                m = keep[i] != 0
            total += abs(np.float64(d))
            applied = d if m else zero
            acc += abs(np.float64(applied))
            count += applied != 0
            w[i] = a if m else b
        return acc, count, total

    @njit(cache=True, nogil=True, fastmath=True)
    def _magnitude_at_least(x: Any, t: Any, strict: bool, out: Any) -> None:
        if strict:
            for i in range(x.size):
                out[i] = abs(x[i]) > t
        else:
            for i in range(x.size):
                out[i] = abs(x[i]) >= t

    # The selection kernels read ``x`` itself (``b`` None) or the difference ``x - b``
    # computed entry by entry (``b`` the snapshot), zeroed where the 0/1 bytes ``m``
    # are 0 (a combined rule's mask so far; None: no mask), so an unwritten Difference
    # is selected from without a delta array; numba compiles each case on its own.
    @njit(inline="always")
    def _at(x: Any, b: Any, m: Any, i: int) -> Any:
        if b is None:
            return x[i]
        if m is None:
            return x[i] - b[i]
        return (x[i] - b[i]) * m[i]  # a finite difference times 0/1: exact

    @njit(cache=True, nogil=True, fastmath=True)
    def _split_bracket(
        x: Any, b: Any, m: Any, lo: Any, hi: Any, above: Any, between: Any
    ) -> tuple[int, int]:
        n_above = 0
        n_between = 0
        for i in range(x.size):
            a = abs(_at(x, b, m, i))
            u = a > hi
            v = (a > lo) & (a <= hi)
            above[i] = u
            between[i] = v
            n_above += u
            n_between += v
        return n_above, n_between

    @njit(cache=True, nogil=True, fastmath=True)
    def _row_l1(x: Any, b: Any, out: Any) -> None:
        # rows of x (b None) or of the difference x - b (both (rows, m) views)
        for i in range(x.shape[0]):
            acc = 0.0
            for j in range(x.shape[1]):
                d = x[i, j] if b is None else x[i, j] - b[i, j]
                acc += abs(np.float64(d))
            out[i] = acc

    @njit(cache=True, nogil=True, fastmath={"contract"})
    def _col_l1(x: Any, b: Any, out: Any) -> None:
        # columns of x (b None) or of x - b ((rows, m) views): row after row, the order
        # of NumPy's float64 sum over the leading axes, so the scores are the same
        out[:] = 0.0
        for i in range(x.shape[0]):
            for j in range(x.shape[1]):
                d = x[i, j] if b is None else x[i, j] - b[i, j]
                out[j] += abs(np.float64(d))

    @njit(cache=True, nogil=True)
    def _keep_2d(x: Any, mask: Any, out: Any) -> None:
        # ``mask`` may be a broadcast view (zero strides): a unit mask over a kernel
        for i in range(x.shape[0]):
            for j in range(x.shape[1]):
                out[i, j] = x[i, j] * x.dtype.type(mask[i, j])

    @njit(cache=True, nogil=True)
    def _gather_flagged(
        x: Any, b: Any, m: Any, flags: Any, words: Any, idx: Any, values: Any
    ) -> int:
        # Compact the flagged entries' indices and |x| in index order. ``words`` views
        # ``flags`` 8 bytes at a time, so that the mostly-empty words cost one load; the
        # writes inside a word are branch-free (the slot advances only on a flag), so
        # ``idx`` and ``values`` need 7 spare entries.
        c = 0
        for w in range(words.size):
            if words[w] != 0:
                for i in range(8 * w, 8 * w + 8):
                    idx[c] = i
                    values[c] = abs(_at(x, b, m, i))
                    c += flags[i]
        for i in range(8 * words.size, x.size):
            idx[c] = i
            values[c] = abs(_at(x, b, m, i))
            c += flags[i]
        return c

    @njit(cache=True, nogil=True)
    def _mark_largest(idx: Any, values: Any, cut: Any, need: int, mask: Any) -> None:
        # Mark the ``need`` largest ``values`` (``cut`` is the need-th largest): all above
        # the cut, then the tied ones in index order (lowest index first).
        ties = need
        for j in range(values.size):
            ties -= values[j] > cut
        for j in range(values.size):
            v = values[j]
            if v > cut:
                mask[idx[j]] = True
            elif v == cut and ties > 0:
                mask[idx[j]] = True
                ties -= 1

    @njit(cache=True, nogil=True)
    def _keep_first_equal(x: Any, b: Any, m: Any, value: Any, r: int, mask: Any) -> int:
        # Set ``mask`` on the first ``r`` entries with ``|x| == value``; return how many
        # were missing. Scans only as far as it needs.
        i = 0
        while r > 0 and i < x.size:
            if abs(_at(x, b, m, i)) == value:
                mask[i] = True
                r -= 1
            i += 1
        return r


def diff_totals(after: np.ndarray, before: np.ndarray) -> tuple[float, int]:
    """``(sum |after - before|, count(after != before))`` of the difference in the
    arrays' dtype (a step's dw), summed in float64, writing nothing (NaN/Inf make the
    sum non-finite)."""
    acc, count = _diff_totals(after.reshape(-1), before.reshape(-1))
    return float(acc), int(count)


def all_finite(x: np.ndarray) -> bool:
    """True when no entry of the float32/64 array ``x`` is NaN or Inf (one read-only
    pass, no boolean copy)."""
    return bool(_zero_unless_nonfinite(x.reshape(-1)) == 0)


def net_totals(after: np.ndarray, before: np.ndarray) -> tuple[float, int]:
    """:func:`diff_totals` with the difference taken in float64 (``w_T - w_0``, exact
    for float32 weights); ``before`` may be wider than ``after``."""
    acc, count = _net_totals(after.reshape(-1), before.reshape(-1))
    return float(acc), int(count)


def diff_stats(after: np.ndarray, before: np.ndarray, delta: np.ndarray) -> tuple[float, int]:
    """``delta[:] = after - before``; return ``(sum |delta|, count(delta != 0))``."""
    acc, count = _diff_stats(after.reshape(-1), before.reshape(-1), delta.reshape(-1))
    return float(acc), int(count)


def blend_stats(
    w: np.ndarray, before: np.ndarray, delta: np.ndarray, keep: np.ndarray
) -> tuple[float, int]:
    """Where not ``keep``: ``w = before`` and ``delta = 0``; then ``before = w`` everywhere.

    Returns the stats of the kept ``delta``: the step's applied change."""
    bits = np.dtype(f"u{w.itemsize}")
    acc, count = _blend_stats(
        w.reshape(-1).view(bits),
        before.reshape(-1).view(bits),
        delta.reshape(-1),
        np.ascontiguousarray(keep).reshape(-1).view(np.uint8),
    )
    return float(acc), int(count)


class FusedNumpyOps(NumpyOps):
    """:class:`~energy_callbacks.core.ops.NumpyOps` with the largest-``|dw|`` selection
    fused: the same masks, ties included, in fewer passes.

    - approximate: the threshold comes from a sample of ``|x|`` and one pass
      writes the mask, with no ``|x|`` array in between;
    - exact: one pass over ``x`` writes both the entries surely kept (above the
      sampled bracket) and those inside it, whose exact top-k follows. Ties at
      the bracket's low end (masked-out zeros) go to the lowest indices, as in
      the reference; a missed bracket takes the reference path;
    - ``row_l1`` (unit scores) and ``keep`` with a broadcast unit mask run as
      single loops (NumPy casts there element by element: 2-7x slower).

    On an unwritten :class:`Difference` the unit scores, ``Threshold`` (a
    :class:`ThresholdMask`) and the exact top fraction read ``after - before``
    entry by entry, and ``keep`` (a combined rule's ranking) attaches its mask,
    which the selection kernels apply as they read: no delta is written.
    """

    def row_l1(self, x: Any, axis: int) -> Any:
        # units on the first axis (torch's weights) or the last (Keras's kernels)
        first, last = axis == 0, axis == x.ndim - 1
        if self.deferred(x) and x.kept is None and x.ndim >= 2 and (first or last):
            # after - before, entry by entry: no difference is written
            return _unit_l1(x.after, x.before, x.shape, first)
        x = np.asarray(x)
        fits = x.dtype in FUSED_DTYPES and x.ndim >= 2 and x.flags.c_contiguous
        if not fits or not (first or last):
            return super().row_l1(x, axis)
        return _unit_l1(x, None, x.shape, first)

    def abs(self, x: Any) -> Any:
        if isinstance(x, Difference) and not x.written:
            return x.magnitude()  # |after - before|, still unwritten
        return super().abs(x)

    def greater_equal(self, x: Any, threshold: float) -> Any:
        if self.deferred(x) and x.absolute and x.kept is None:
            # Threshold: applied in the blend pass, the difference is not written
            return ThresholdMask(x, self.at_least(x.dtype, threshold), x.shape)
        return super().greater_equal(x, threshold)

    def _keep(self, x: Any, mask: Any, out: Any | None = None) -> Any:
        x, mask = np.asarray(x), np.asarray(mask)
        fits = x.ndim == 2 and x.dtype in FUSED_DTYPES and mask.dtype == bool
        if out is None or not fits or mask.shape != x.shape:
            return super().keep(x, mask, out)
        _keep_2d(x, mask.view(np.uint8), out)
        return out

    def reshape(self, x: Any, shape: tuple[int, ...]) -> Any:
        if isinstance(x, (Difference, ThresholdMask)):
            return x.reshaped(shape)
        return super().reshape(x, shape)

    def deferred(self, x: Any) -> bool:
        return isinstance(x, Difference) and not x.written and x.dtype in FUSED_DTYPES

    def zeros_like(self, x: Any) -> Any:
        if isinstance(x, Difference):
            return np.zeros(x.shape, dtype=x.dtype)
        return super().zeros_like(x)

    def blocks(self, x: Any, size: int) -> Iterator[Any]:
        if not (self.deferred(x) and x.kept is None):
            yield from super().blocks(x, size)
            return
        after, before = x.after, x.before  # the difference in the weights' dtype
        for s in range(0, after.size, size):
            d = np.subtract(after[s : s + size], before[s : s + size])
            yield np.abs(d, out=d) if x.absolute else d

    def keep(self, x: Any, mask: Any, out: Any | None = None) -> Any:
        if self.deferred(x) and not x.absolute:
            return x.masked(mask)  # read as where(mask, x, 0) by the selection kernels
        return self._keep(x, mask, out)

    def top_magnitude_mask(self, x: Any, k: int, approximate: bool = False) -> Any:
        if approximate and isinstance(x, Difference) and not x.written and x.kept is None:
            n = x.size
            if x.dtype in FUSED_DTYPES and 0 < k < n and n > APPROX_SAMPLE:
                # The sample of w - before is all the threshold needs: the difference
                # itself is never written (the adapter applies the threshold as it undoes).
                step = approx_stride(n)
                t = approx_cut(np.abs(x.after[::step] - x.before[::step]), n, k)
                return ThresholdMask(x, t, (n,), approximate=True)
        if isinstance(x, Difference) and not x.written and not approximate:
            # the exact selection reads after - before entry by entry: no delta is written
            flat, base, kept = x.after, x.before, x.kept
        else:
            x = np.asarray(x)
            flat, base, kept = x.reshape(-1), None, None
        n = x.size
        if x.dtype not in FUSED_DTYPES or k <= 0 or k >= n or n <= APPROX_SAMPLE:
            return super().top_magnitude_mask(np.asarray(x), k, approximate)
        if approximate:
            t = approx_cut(np.abs(flat[:: approx_stride(n)]), n, k)
            out = np.empty(n, dtype=bool)
            _magnitude_at_least(flat, t, t <= 0, out)
            return out
        sample = bracket_sample(flat)
        if base is not None:
            sample = sample - bracket_sample(base)
        if kept is not None:
            sample = sample * bracket_sample(kept)
        lo, hi = bracket(np.abs(sample), n, k)
        if lo is None:
            return super().top_magnitude_mask(np.asarray(x), k)
        # The mask of a Difference is used within its step: one buffer per parameter
        # (its snapshot's address) is reused every step, so a step allocates nothing.
        if base is None:
            above = np.empty(n, dtype=bool)
        else:
            above = self._buffer((n,), bool, owner=base.__array_interface__["data"][0])
        between = self._buffer((n,), bool)
        top = np.asarray(np.inf, flat.dtype) if hi is None else hi
        n_above, n_between = _split_bracket(flat, base, kept, lo, top, above, between)
        need = k - n_above
        if need < 0:
            return super().top_magnitude_mask(np.asarray(x), k)
        if n_between <= need:  # all of them, and the rest from the ties at lo (zeros)
            np.logical_or(above, between, out=above)
            if _keep_first_equal(flat, base, kept, lo, need - n_between, above) > 0:
                return super().top_magnitude_mask(np.asarray(x), k)
            return above
        if need == 0:
            return above
        room = 1 << (n_between + 8).bit_length()  # few sizes, so the scratch is reused
        idx, values = self._buffer((room,), np.intp), self._buffer((room,), flat.dtype)
        flags = between.view(np.uint8)
        words = flags[: n - n % 8].view(np.uint64)
        _gather_flagged(flat, base, kept, flags, words, idx, values)
        idx, values = idx[:n_between], values[:n_between]
        cut = np.partition(values, n_between - need)[n_between - need]
        _mark_largest(idx, values, cut, need, above)
        return above


def _unit_l1(
    x: np.ndarray, b: np.ndarray | None, shape: tuple[int, ...], first: bool
) -> np.ndarray:
    """The float64 L1 norm of ``x`` (or ``x - b``) in ``shape`` over every axis but the
    first (``first``) or the last."""
    n = shape[0] if first else shape[-1]
    grid = (n, -1) if first else (-1, n)
    out = np.empty(n, dtype=np.float64)
    kernel = _row_l1 if first else _col_l1
    kernel(x.reshape(grid), None if b is None else b.reshape(grid), out)
    return out


class _Unwritten:
    """An array-like whose values NumPy gets through ``__array__`` (computed then);
    its shape, dtype, size and ndim are known without that."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def reshaped(self, shape: tuple[int, ...]) -> Any:
        """The same values in another shape (nothing is computed)."""
        view = copy.copy(self)
        view.shape = tuple(shape)
        return view


class Difference(_Unwritten):
    """``after - before`` of one tensor, written out only when something reads it.

    The torch adapter proposes these to the rules. The approximate top fraction
    of :class:`FusedNumpyOps` samples ``after`` and ``before`` directly; any
    other op reads the difference through ``np.asarray``, which writes it into
    ``delta`` once.
    """

    def __init__(self, after: np.ndarray, before: np.ndarray, delta: np.ndarray) -> None:
        self.after, self.before = after.reshape(-1), before.reshape(-1)
        self.delta = delta
        self.shape: tuple[int, ...] = tuple(delta.shape)
        self.dtype = delta.dtype
        self.absolute = False  # |after - before| (see magnitude())
        self.kept: np.ndarray | None = None  # flat 0/1 bytes: zero elsewhere (see masked())
        self._origin = self  # shared by reshaped views, so the difference is written once
        self._written = False

    @property
    def written(self) -> bool:
        return self._origin._written

    def magnitude(self) -> Difference:
        """``|after - before|``, unwritten as well."""
        view = copy.copy(self)
        view.absolute = True
        return view

    def masked(self, mask: Any) -> Difference:
        """Zero outside ``mask`` (in this difference's shape), unwritten as well."""
        flat = np.broadcast_to(np.asarray(mask, dtype=bool), self.shape).reshape(-1)
        if self.kept is not None:
            flat = flat & self.kept.view(bool)
        view = copy.copy(self)
        view.kept = np.ascontiguousarray(flat).view(np.uint8)
        return view

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        origin = self._origin
        if not origin._written:
            diff_stats(self.after, self.before, origin.delta)
            origin._written = True
        out = origin.delta.reshape(self.shape)
        if self.kept is not None:
            out = np.where(self.kept.view(bool).reshape(self.shape), out, out.dtype.type(0))
        if self.absolute:
            out = np.abs(out)
        return out if dtype is None else out.astype(dtype)


class ThresholdMask(_Unwritten):
    """``|dw| >= t`` of a :class:`Difference` kept as its threshold: ``Threshold``'s
    mask (``t`` rounded up into the weights' dtype), or the approximate top
    fraction's, where ``strict``: ``|dw| > 0`` when ``t <= 0``, as
    :meth:`~energy_callbacks.core.ops.ArrayOps.approx_top_mask` defines it.

    The torch adapter applies it in one pass (:func:`blend_kept`); ``np.asarray``
    writes the boolean mask for any other op.
    """

    def __init__(
        self, difference: Difference, t: Any, shape: tuple[int, ...], approximate: bool = False
    ) -> None:
        self.difference, self.t, self.shape = difference, t, tuple(shape)
        self.strict = approximate and t <= 0
        self.dtype = np.dtype(bool)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.empty(self.size, dtype=bool)
        flat = np.asarray(self.difference).reshape(-1)
        _magnitude_at_least(flat, self.t, self.strict, out)
        out = out.reshape(self.shape)
        return out if dtype is None else out.astype(dtype)


def blend_kept(
    w: np.ndarray, before: np.ndarray, keep: np.ndarray | ThresholdMask
) -> tuple[tuple[float, int], float]:
    """Keep the new ``w`` where ``keep`` (a boolean mask, or a :class:`ThresholdMask`
    of ``w - before``), put ``before`` back elsewhere. ``before`` is left unchanged.

    Returns the applied change's ``(sum |dw|, count)`` and the full proposal's
    ``sum |dw|``, which is NaN/Inf if the proposal held any.
    """
    if isinstance(keep, ThresholdMask):
        t, mask = keep.t, None
        floor = t if keep.strict else w.dtype.type(-np.inf)
    else:
        t, floor = w.dtype.type(0), w.dtype.type(0)  # unused with a mask
        mask = np.ascontiguousarray(keep).reshape(-1).view(np.uint8)
    acc, count, total = _blend_kept(w.reshape(-1), before.reshape(-1), mask, t, floor)
    return (float(acc), int(count)), float(total)
