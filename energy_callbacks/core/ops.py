"""The array operations the plasticity rules need, and their NumPy reference.

The rules in :mod:`energy_callbacks.core` are written once against
:class:`ArrayOps`; each backend hands them its own implementation. The NumPy
implementation here is the oracle every backend is tested against.

Selection ties are broken by one documented rule everywhere: among entries with
equal score, **the lower flat (row-major) index wins**. Top-k selection therefore
always returns exactly ``k`` entries, and the same ones on every backend.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np

Array = Any
"""An array of the backend in use (``np.ndarray`` for :data:`numpy_ops`)."""


class ArrayOps(Protocol):
    """The few array operations the rules use. Masks are boolean arrays."""

    def abs(self, x: Array) -> Array: ...

    def magnitude(self, x: Array) -> Array:
        """``|x|`` for immediate use: valid only until the next call (may reuse a buffer)."""
        ...

    def isfinite_all(self, x: Array) -> bool:
        """True when every entry is finite."""
        ...

    def total(self, x: Array, alpha: float = 1.0) -> float:
        """``sum(|x| ** alpha)`` accumulated in float64."""
        ...

    def count_nonzero(self, x: Array) -> int: ...

    def row_l1(self, x: Array, axis: int) -> Array:
        """L1 norm of every slice along ``axis`` (float64, shape ``(x.shape[axis],)``)."""
        ...

    def row_max(self, x: Array, axis: int) -> Array:
        """Largest ``|x|`` of every slice along ``axis`` (x's dtype, shape ``(x.shape[axis],)``)."""
        ...

    def top_k_mask(self, scores: Array, k: Array | int, largest: bool = True) -> Array:
        """Mask of the ``k`` largest (or smallest) entries of every row of a 2-D array.

        ``k`` is an int or one int per row. Ties go to the lower column index, so
        every row keeps exactly ``min(k, n_columns)`` entries.
        """
        ...

    def approx_top_mask(self, scores: Array, k: int) -> Array:
        """About the ``k`` largest entries of a 1-D array of scores ``>= 0``, in one pass.

        Keeps ``scores >= t``, where ``t`` is the matching order statistic of a
        sample of about :data:`APPROX_SAMPLE` entries at a prime stride
        (:func:`approx_stride`; ``> 0`` when ``t`` is 0, so that zero scores never
        count). Exact below that many entries.
        """
        ...

    def top_magnitude_mask(self, x: Array, k: int, approximate: bool = False) -> Array:
        """Mask of the ``k`` entries of a 1-D array with the largest ``|x|``.

        Equals ``top_k_mask(|x|[None], k)[0]``, or ``approx_top_mask(|x|, k)`` when
        ``approximate``; a backend may fuse the magnitude into the selection.
        """
        ...

    def reshape(self, x: Array, shape: tuple[int, ...]) -> Array: ...

    def moveaxis(self, x: Array, source: int, destination: int) -> Array: ...

    def expand_units(self, unit_mask: Array, shape: tuple[int, ...], axis: int) -> Array:
        """Broadcast a mask over units (1-D) to a tensor whose ``axis`` holds them."""
        ...

    def logical_and(self, a: Array, b: Array) -> Array: ...

    def logical_or(self, a: Array, b: Array) -> Array: ...

    def logical_not(self, a: Array) -> Array: ...

    def add(self, a: Array, b: Array) -> Array:
        """``a + b`` elementwise, a new array in the promoted dtype of both."""
        ...

    def scale(self, x: Array, factor: float) -> Array:
        """``x * factor``, with ``factor`` rounded to x's dtype first (a new array)."""
        ...

    def ones_mask(self, shape: tuple[int, ...]) -> Array: ...

    def zeros_like(self, x: Array) -> Array: ...

    def keep(self, x: Array, mask: Array, out: Array | None = None) -> Array:
        """``x`` where ``mask``, zero elsewhere (into ``out`` when given)."""
        ...

    def deferred(self, x: Array) -> bool:
        """True where ``x`` is read pass by pass, never written whole (``keep`` of it
        then needs no ``out`` buffer)."""
        ...

    def greater_equal(self, x: Array, threshold: float) -> Array:
        """``x >= threshold`` exactly as real numbers, whatever the dtype of ``x``."""
        ...

    def from_numpy(self, x: np.ndarray) -> Array:
        """Bring a host array (e.g. a seeded random mask) to the backend."""
        ...

    def to_numpy(self, x: Array) -> np.ndarray: ...

    def concat(self, xs: list[Array], axis: int) -> Array: ...

    def split(self, x: Array, sizes: list[int], axis: int) -> list[Array]: ...

    def blocks(self, x: Array, size: int) -> Iterator[Array]:
        """``x`` flattened, ``size`` entries at a time in row-major order: views of
        an array, fresh blocks of a :meth:`deferred` one. Host backends only."""
        ...

    def assign(self, dst: Array, src: Array) -> None:
        """Write ``src`` into the block ``dst`` of an array, in place. Host backends only
        (NumPy, torch): the store of :meth:`Caching.step` is updated a block at a time."""
        ...

    def zeros_f64(self, shape: tuple[int, ...]) -> Array:
        """A float64 accumulator."""
        ...

    def apply_update(self, w: Array, update: Array) -> Array:
        """Add ``update`` to ``w`` in place; return the real change ``w_after - w_before``."""
        ...

    def add_f64(self, acc: Array, x: Array) -> Array:
        """``acc + x`` in float64 (may update ``acc`` in place and return it)."""
        ...

    def argmax(self, x: Array) -> Array:
        """Index of the largest entry of every row (last axis)."""
        ...

    def class_probability(self, outputs: Array, labels: Array, from_logits: bool) -> Array:
        """Probability of ``labels[i]`` in row ``i`` (after a softmax when ``from_logits``)."""
        ...


class NumpyOps:
    """:class:`ArrayOps` on NumPy arrays; the reference implementation.

    The reductions (``total``, ``count_nonzero``, ``isfinite_all``) reuse scratch
    buffers instead of allocating a temporary per call: inside a training loop a
    fresh multi-megabyte temporary costs page faults that tripled their time. An
    instance is therefore not thread-safe; adapters make their own.
    """

    def __init__(self) -> None:
        self._scratch: dict[tuple[tuple[int, ...], np.dtype, int], np.ndarray] = {}

    def _buffer(self, shape: tuple[int, ...], dtype: Any, owner: int = 0) -> np.ndarray:
        """A scratch array kept for the next call with the same shape, dtype and
        ``owner`` (what it belongs to, when two arrays of one shape live at once)."""
        key = (shape, np.dtype(dtype), owner)
        buf = self._scratch.get(key)
        if buf is None:
            if len(self._scratch) > 64:
                self._scratch.clear()
            buf = self._scratch[key] = np.empty(shape, dtype)
        return buf

    def abs(self, x: Array) -> Array:
        return np.abs(x)

    def magnitude(self, x: Array) -> Array:
        x = np.asarray(x)
        return np.abs(x, out=self._buffer(x.shape, x.dtype))

    def isfinite_all(self, x: Array) -> bool:
        x = np.asarray(x)
        return bool(np.isfinite(x, out=self._buffer(x.shape, bool)).all())

    def total(self, x: Array, alpha: float = 1.0) -> float:
        x = np.asarray(x)
        if alpha == 1.0:  # abs in the native dtype is exact; the sum runs in float64
            a = np.abs(x, out=self._buffer(x.shape, x.dtype))
            return float(np.add.reduce(a, axis=None, dtype=np.float64))
        return float((np.abs(np.asarray(x, dtype=np.float64)) ** alpha).sum())

    def count_nonzero(self, x: Array) -> int:
        x = np.asarray(x)
        if x.dtype != bool:
            x = np.not_equal(x, 0, out=self._buffer(x.shape, bool))
        return int(np.count_nonzero(x))

    def row_l1(self, x: Array, axis: int) -> Array:
        a = self.magnitude(x)
        others = tuple(d for d in range(a.ndim) if d != axis)
        out: np.ndarray = np.add.reduce(a, axis=others, dtype=np.float64)
        return out

    def row_max(self, x: Array, axis: int) -> Array:
        a = np.abs(np.asarray(x))
        others = tuple(d for d in range(a.ndim) if d != axis)
        out: np.ndarray = np.max(a, axis=others) if others else a
        return out

    def top_k_mask(self, scores: Array, k: Array | int, largest: bool = True) -> Array:
        s = np.asarray(scores)
        if s.ndim != 2:
            raise ValueError(f"top_k_mask expects a 2-D array, got shape {s.shape}")
        rows, n = s.shape
        kk = np.minimum(np.broadcast_to(np.asarray(k, dtype=np.int64), (rows,)), n)
        if s.dtype == np.float16:
            # NumPy 2.4 mis-sorts negative float16 on some x86 CPUs (AVX-512 sort
            # kernels); float32 holds every float16 exactly and sorts correctly.
            s = s.astype(np.float32)
        if not largest:
            s = -s
        if rows == 1 and n >= _BRACKET_MIN:
            mask = _top_k_bracketed(s[0], int(kk[0]), self._buffer)
            if mask is not None:
                return mask[None, :]
        return _top_k_rows(s, kk)

    def approx_top_mask(self, scores: Array, k: int) -> Array:
        s = np.asarray(scores)
        n = s.size
        if n <= APPROX_SAMPLE or k <= 0 or k >= n:
            return self.top_k_mask(s[None, :], k)[0]
        t = approx_cut(s[:: approx_stride(n)], n, k)
        out: np.ndarray = s > 0 if t <= 0 else s >= t
        return out

    def top_magnitude_mask(self, x: Array, k: int, approximate: bool = False) -> Array:
        s = self.magnitude(x)
        return self.approx_top_mask(s, k) if approximate else self.top_k_mask(s[None, :], k)[0]

    def reshape(self, x: Array, shape: tuple[int, ...]) -> Array:
        return np.reshape(x, shape)

    def moveaxis(self, x: Array, source: int, destination: int) -> Array:
        return np.moveaxis(x, source, destination)

    def expand_units(self, unit_mask: Array, shape: tuple[int, ...], axis: int) -> Array:
        view = [1] * len(shape)
        view[axis] = shape[axis]
        return np.broadcast_to(np.reshape(unit_mask, view), shape)

    def logical_and(self, a: Array, b: Array) -> Array:
        return np.logical_and(a, b)

    def logical_or(self, a: Array, b: Array) -> Array:
        return np.logical_or(a, b)

    def logical_not(self, a: Array) -> Array:
        return np.logical_not(a)

    def add(self, a: Array, b: Array) -> Array:
        return np.add(a, b)

    def scale(self, x: Array, factor: float) -> Array:
        x = np.asarray(x)
        return np.multiply(x, x.dtype.type(factor))

    def ones_mask(self, shape: tuple[int, ...]) -> Array:
        return np.ones(shape, dtype=bool)

    def zeros_like(self, x: Array) -> Array:
        return np.zeros_like(x)

    def deferred(self, x: Array) -> bool:
        return False

    def keep(self, x: Array, mask: Array, out: Array | None = None) -> Array:
        if out is None:
            return np.where(mask, x, x.dtype.type(0))
        return np.multiply(x, mask, out=out)

    def greater_equal(self, x: Array, threshold: float) -> Array:
        x = np.asarray(x)
        return np.greater_equal(x, self.at_least(x.dtype, threshold))

    @staticmethod
    def at_least(dtype: Any, threshold: float) -> Any:
        """``threshold`` rounded *up* into ``dtype`` (a NumPy scalar): ``x >= it`` is
        exactly ``x >= threshold`` for ``x`` of that dtype."""
        with np.errstate(over="ignore"):  # beyond the dtype's range: inf, no warning
            t = np.asarray(threshold, dtype=dtype)
            if float(t) < threshold:
                t = np.nextafter(t, np.asarray(np.inf, dtype=dtype))
        return t[()]

    def from_numpy(self, x: np.ndarray) -> Array:
        return x

    def to_numpy(self, x: Array) -> np.ndarray:
        return np.asarray(x)

    def concat(self, xs: list[Array], axis: int) -> Array:
        return np.concatenate(xs, axis=axis)

    def split(self, x: Array, sizes: list[int], axis: int) -> list[Array]:
        return np.split(x, np.cumsum(sizes)[:-1], axis=axis)

    def blocks(self, x: Array, size: int) -> Iterator[Array]:
        flat = np.asarray(x).reshape(-1)
        for start in range(0, flat.size, size):
            yield flat[start : start + size]

    def assign(self, dst: Array, src: Array) -> None:
        np.copyto(dst, src)

    def zeros_f64(self, shape: tuple[int, ...]) -> Array:
        return np.zeros(shape, dtype=np.float64)

    def apply_update(self, w: Array, update: Array) -> Array:
        before = w.copy()
        w += update
        return w - before

    def add_f64(self, acc: Array, x: Array) -> Array:
        return np.add(acc, x, out=acc)  # casts chunk by chunk, no float64 copy of x

    def argmax(self, x: Array) -> Array:
        return np.argmax(x, axis=-1)

    def class_probability(self, outputs: Array, labels: Array, from_logits: bool) -> Array:
        p = np.asarray(outputs, dtype=np.float64)
        if from_logits:
            p = np.exp(p - p.max(axis=-1, keepdims=True))
            p /= p.sum(axis=-1, keepdims=True)
        idx = np.asarray(labels, dtype=np.int64)[:, None]
        return np.take_along_axis(p, idx, axis=-1)[:, 0]


def _top_k_rows(s: np.ndarray, kk: np.ndarray) -> np.ndarray:
    """Exact top-k per row: the cut from a sort, then a count over the tied entries.

    One row goes to :func:`_top_k_row`. Several rows sort: ``np.partition``
    slows down 10-20x on rows full of equal values (masked-out zeros), which
    are common here.
    """
    rows, n = s.shape
    if n == 0:
        return np.zeros(s.shape, dtype=bool)
    if rows == 1:
        return _top_k_row(s[0], int(kk[0]))[None, :]
    pos = np.clip(n - kk, 0, n - 1)
    cut = np.take_along_axis(np.sort(s, axis=1), pos[:, None], axis=1)
    above = s > cut
    tied = s == cut
    need = kk - above.sum(axis=1)
    mask: np.ndarray = above | (tied & (np.cumsum(tied, axis=1) <= need[:, None]))
    mask[kk == 0] = False
    return mask


def _top_k_row(s: np.ndarray, k: int) -> np.ndarray:
    """:func:`_top_k_rows` for one row, in few NumPy calls (small tensors run every step)."""
    n = s.size
    if k <= 0 or k >= n:
        return np.full(n, k > 0, dtype=bool)
    if n >= _PARTITION_MIN and 2 * np.count_nonzero(s) > n:
        # Mostly distinct values: a partition finds the cut 2-3x faster than a sort.
        cut = np.partition(s, n - k)[n - k]
    else:
        cut = np.sort(s)[n - k]
    mask: np.ndarray = s >= cut
    extra = int(np.count_nonzero(mask)) - k
    if extra > 0:  # ties at the cut: keep the lowest indices among them
        tied = np.flatnonzero(s == cut)
        mask[tied[tied.size - extra :]] = False
    return mask


APPROX_SAMPLE = 1 << 14
"""Sample size of :meth:`ArrayOps.approx_top_mask`."""


@functools.lru_cache(maxsize=256)
def approx_stride(n: int) -> int:
    """The stride of :meth:`ArrayOps.approx_top_mask`'s sample of ``n`` entries: the
    smallest prime ``>= n // APPROX_SAMPLE`` (1 for short arrays).

    A prime shares no factor with a tensor's row length or channel count, so the
    sample visits every column of a structured tensor. The plain ``n // 16384`` of a
    4096 x 4096 matrix is 1024, which sampled 4 of its 4096 columns: with columns of
    different scales (any dense gradient, ``outer(delta, x)``) the kept count was off
    by 97%, and by 730% for a (262144, 64) embedding.
    """
    step = n // APPROX_SAMPLE
    if step < 2:
        return 1
    while any(step % d == 0 for d in range(2, math.isqrt(step) + 1)):
        step += 1
    return step


_BRACKET_MIN = 1 << 14
_PARTITION_MIN = 2048
_CHUNK = 1 << 16


def approx_cut(sample: np.ndarray, n: int, k: int) -> Any:
    """The threshold of :meth:`ArrayOps.approx_top_mask`: the order statistic of the
    strided ``sample`` (of ``n`` scores) that leaves about ``k`` of ``n`` above it."""
    m = sample.size
    r = min(m - 1, max(0, m - round(k * m / n)))
    return np.partition(sample, r)[r]


def bracket_sample(s: np.ndarray) -> np.ndarray:
    """The strided sample of ``s`` that :func:`bracket` reads (a view, no copy), with
    the prime stride of :func:`approx_stride`: the plain ``n // 16384`` sampled 4 of a
    4096 x 4096 matrix's columns, so the bracket missed the cut (and the selection
    fell back to a slower path holding the whole ``|dw|``) on most steps of Adam."""
    return s[:: approx_stride(s.size)]


def bracket(sample: np.ndarray, n: int, k: int) -> tuple[Any, Any]:
    """``(lo, hi)`` from :func:`bracket_sample` of ``n`` scores such that the ``k``-th
    largest score lies in ``[lo, hi]`` with overwhelming probability (4 sd and 8
    entries of margin).

    ``hi`` is None when fewer than one sample entry lies above the margin (nothing
    is surely kept), ``lo`` is None when the margin runs past the sample (no bracket).
    Callers check that the bracket holds before trusting it.
    """
    m = sample.size
    j = k * m / n  # expected sample entries above the cut
    margin = 4.0 * float(np.sqrt(j * (1.0 - k / n))) + 8.0
    hi_rank, lo_rank = int(j - margin), int(np.ceil(j + margin))
    if lo_rank > m:
        return None, None
    ranks = sorted({r for r in (m - hi_rank, m - lo_rank) if 0 <= r < m})
    part = np.partition(sample, ranks) if len(ranks) > 0 else sample
    return part[m - lo_rank], (part[m - hi_rank] if hi_rank >= 1 else None)


def _top_k_bracketed(
    s: np.ndarray, k: int, scratch: Callable[[tuple[int, ...], Any], np.ndarray]
) -> np.ndarray | None:
    """Exact top-k of a long vector in a few linear passes.

    A strided sample brackets the cut value ``[lo, hi]`` with a wide safety
    margin. Entries above ``hi`` are kept. If the entries strictly between fit,
    they are kept too and the rest comes from the entries equal to ``lo``, lowest
    index first (this is the case of many tied values, such as masked-out
    zeros); otherwise the exact selection runs on the few entries in between.
    Returns None (the caller falls back) when the bracket misses the cut.
    """
    n = s.size
    if k <= 0 or k >= n:
        return np.full(n, k > 0, dtype=bool)
    lo, hi = bracket(bracket_sample(s), n, k)
    if lo is None:
        return None
    above: np.ndarray = s > hi if hi is not None else np.zeros(n, dtype=bool)
    need = k - int(np.count_nonzero(above))
    if need < 0:
        return None
    between = np.greater(s, lo, out=scratch((n,), bool))
    between ^= above  # lo <= hi, so above is inside s > lo
    n_between = int(np.count_nonzero(between))
    if n_between <= need:
        equal = _first_true(np.equal(s, lo, out=scratch((1, n), bool)[0]), need - n_between)
        if equal is None:
            return None
        above |= between
        above |= equal
        return above
    idx = np.flatnonzero(between)
    above[idx[_top_k_rows(s[idx][None, :], np.array([need]))[0]]] = True
    return above


def _first_true(mask: np.ndarray, r: int) -> np.ndarray | None:
    """Clear all but the first ``r`` True entries of ``mask`` in place (None if fewer)."""
    for start in range(0, mask.size, _CHUNK):
        chunk = mask[start : start + _CHUNK]
        c = int(np.count_nonzero(chunk))
        if c < r:
            r -= c
            continue
        chunk[np.flatnonzero(chunk)[r:]] = False
        mask[start + _CHUNK :] = False
        return mask
    return None if r > 0 else mask


numpy_ops: ArrayOps = NumpyOps()
"""The shared NumPy reference instance."""
