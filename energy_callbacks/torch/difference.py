"""A step's ``w_after - w_before`` on the torch-ops path (GPU, bf16), read in chunks
and never written out whole, and the rules' selections on it.

The adapter proposes a :class:`DeviceDifference` per stepped parameter to the rules.
:class:`~energy_callbacks.torch.ops.TorchOps` reads it chunk by chunk where a rule
has a chunked form, so a masked step holds one mask per tensor, not a written
difference and its ``|dw|``:

- the exact top fraction (:func:`top_mask`) is a radix selection on the bits of
  ``|dw|`` (16 bits a round, one histogram of counts per round, kept on the
  device), then one pass that writes the mask with the core's tie rule (lower
  flat index first); tensors of at most :data:`DEVICE_CHUNK` entries take the
  dense selection on a temporary difference;
- the approximate top fraction samples ``after`` and ``before`` at the prime
  stride and compares chunk by chunk;
- the row norms of the unit rules (:func:`row_l1`) and ``Threshold``'s
  comparison (:func:`at_least`) are summed and compared chunk by chunk;
- ``keep`` of a combined rule (the next rule ranks what this one left) is the
  same difference with the mask attached, read as ``where(mask, d, 0)``.

Any other op writes the difference out (:meth:`DeviceDifference.dense`), as the
path did before: the same numbers, in more memory. No op reads a device value
back to the host, so masking a step does not wait for the device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from ..core.ops import APPROX_SAMPLE, ArrayOps, approx_stride

DEVICE_CHUNK = 1 << 22
"""Entries per temporary of the chunked passes (16 MiB in float32)."""

_DIGIT_BITS = 16
_BINS = 1 << _DIGIT_BITS


class DeviceDifference:
    """``after - before`` of one parameter in at least float32 (exact for 16-bit
    weights), seen in ``shape``; ``|.|`` of it when ``magnitude``, zero outside
    ``mask`` (a boolean tensor broadcastable to the parameter's shape) when given.

    Cheap to reshape, take the magnitude of and mask: nothing is computed until a
    pass reads :meth:`chunks` or an op asks for :meth:`dense`.
    """

    def __init__(
        self,
        after: torch.Tensor,
        before: torch.Tensor,
        *,
        shape: tuple[int, ...] | None = None,
        mask: torch.Tensor | None = None,
        magnitude: bool = False,
    ) -> None:
        self.after, self.before = after.detach(), before
        self.shape = tuple(after.shape) if shape is None else tuple(shape)
        self.mask = mask
        self.magnitude = magnitude
        self.dtype = torch.promote_types(after.dtype, torch.float32)
        self.device = after.device

    def numel(self) -> int:
        return math.prod(self.shape)

    def _with(self, **changes: object) -> DeviceDifference:
        fields = {"shape": self.shape, "mask": self.mask, "magnitude": self.magnitude}
        fields.update(changes)
        return DeviceDifference(self.after, self.before, **fields)  # type: ignore[arg-type]

    def reshaped(self, shape: tuple[int, ...]) -> DeviceDifference:
        if math.prod(shape) != self.numel():
            raise ValueError(f"cannot reshape {self.shape} to {tuple(shape)}")
        return self._with(shape=tuple(shape))

    def absolute(self) -> DeviceDifference:
        return self._with(magnitude=True)

    def masked(self, mask: torch.Tensor) -> DeviceDifference:
        """Zero outside ``mask`` (given in this difference's shape)."""
        mask = mask.reshape(self.after.shape)
        if self.mask is not None:
            mask = torch.logical_and(self.mask, mask)
        return self._with(mask=mask)

    @property
    def whole_shape(self) -> bool:
        """True when seen in the parameter's own shape (row passes need it)."""
        return self.shape == tuple(self.after.shape)

    def chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first row, values)`` over blocks of whole rows (dim 0) of the
        parameter, each a fresh tensor of at most about :data:`DEVICE_CHUNK` entries
        in row-major order."""
        a, b, m = _rows(self.after), _rows(self.before), self.mask
        if m is not None:
            m = _rows(m.expand(self.after.shape))
        for s, e in row_blocks(a):
            d = block_difference(a[s:e], b[s:e], self.dtype)
            if m is not None:
                d.masked_fill_(m[s:e].logical_not(), 0)
            yield s, (d.abs_() if self.magnitude else d)

    def flat_blocks(self, size: int) -> Iterator[torch.Tensor]:
        """The values flattened, ``size`` entries at a time (each a fresh tensor)."""
        if self.mask is not None or not self.after.is_contiguous():
            yield from self.dense().reshape(-1).split(size)
            return
        a, b = self.after.reshape(-1), self.before.reshape(-1)
        for s in range(0, a.numel(), size):
            d = block_difference(a[s : s + size], b[s : s + size], self.dtype)
            yield d.abs_() if self.magnitude else d

    def dense(self) -> torch.Tensor:
        """The values, written out whole (a new tensor in ``shape``)."""
        d = block_difference(self.after, self.before, self.dtype)
        if self.mask is not None:
            d.masked_fill_(self.mask.expand(d.shape).logical_not(), 0)
        return (d.abs_() if self.magnitude else d).reshape(self.shape)


def block_difference(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a - b`` in ``dtype`` (at least float32: exact for 16-bit weights), as a new
    tensor: ``a`` is only read, even when it already has that dtype."""
    return a.to(dtype, copy=True).sub_(b)


def dense(x: object) -> object:
    """``x`` as a tensor when it is a :class:`DeviceDifference`, else ``x``."""
    return x.dense() if isinstance(x, DeviceDifference) else x


def row_blocks(a: torch.Tensor) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` row ranges of ``a`` (at least 1-D) of about
    :data:`DEVICE_CHUNK` entries each (one row at least)."""
    rows = a.shape[0]
    per_row = a.numel() // rows if rows else 1
    step = max(1, DEVICE_CHUNK // max(per_row, 1))
    for s in range(0, rows, step):
        yield s, min(s + step, rows)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1) if t.dim() == 0 else t


def top_mask(x: DeviceDifference, k: int, approximate: bool, ops: ArrayOps) -> torch.Tensor:
    """The mask of the ``k`` largest ``|x|`` (in ``x.shape``), exact with the core's
    tie rule, or the approximate top fraction's ``|x| >= t`` of a strided sample.
    Tensors of at most :data:`DEVICE_CHUNK` entries take ``ops``' dense selection on
    a temporary ``|x|``."""
    n = x.numel()
    if k >= n or k <= 0:
        return torch.full((), k > 0, dtype=torch.bool, device=x.device).expand(x.shape)
    if approximate and n > APPROX_SAMPLE:
        return _threshold_top(x.absolute(), n, k)
    if n <= DEVICE_CHUNK:
        scores = x.absolute().dense().reshape(-1)
        flat = ops.approx_top_mask(scores, k) if approximate else ops.top_k_mask(scores[None], k)[0]
        return flat.reshape(x.shape)
    return _radix_top(x.absolute(), k)


def _threshold_top(x: DeviceDifference, n: int, k: int) -> torch.Tensor:
    """``approx_top_mask`` of the non-negative ``x``: the cut from a sample at the
    prime stride (taken chunk by chunk), then one comparison pass."""
    step = approx_stride(n)
    parts = []
    for s, d in x.chunks():
        first = s * (d.numel() // d.shape[0])  # flat index of the chunk's first entry
        parts.append(d.reshape(-1)[(-first) % step :: step].clone())
    sample = torch.cat(parts)
    m = sample.numel()
    r = min(m - 1, max(0, m - round(k * m / n)))
    t = torch.kthvalue(sample.float(), r + 1).values.to(x.dtype)
    out = torch.empty(_rows(x.after).shape, dtype=torch.bool, device=x.device)
    for s, d in x.chunks():
        # d >= t, or > 0 when t is 0 (zero scores never count)
        torch.logical_and(d >= t, (t > 0) | (d > 0), out=out[s : s + d.shape[0]])
    return out.reshape(x.shape)


def _radix_top(x: DeviceDifference, k: int) -> torch.Tensor:
    """Exact top-k of the non-negative ``x`` (``|dw|``) without writing it out.

    A non-negative float's bits, read as a signed integer of its width, order as the
    float does, so the k-th largest value is found 16 bits at a time: each round
    counts, over all blocks, the entries that share the bits found so far by their
    next 16 bits, and picks the digit where the count from the top reaches k. One
    more pass keeps the entries above that value and the first ones equal to it.
    """
    keys = torch.int32 if x.dtype == torch.float32 else torch.int64
    width = 32 if keys == torch.int32 else 64
    device = x.device
    prefix = torch.zeros((), dtype=torch.int64, device=device)
    need = torch.full((1,), k, dtype=torch.int64, device=device)  # rank among matches
    ones = torch.ones((), dtype=torch.int64, device=device)
    for shift in range(width - _DIGIT_BITS, -1, -_DIGIT_BITS):
        hist = torch.zeros(_BINS + 1, dtype=torch.int64, device=device)
        first = shift + _DIGIT_BITS == width
        high = None if first else (prefix >> (shift + _DIGIT_BITS)).to(keys)
        for _, d in x.chunks():
            key = d.reshape(-1).view(keys)
            digit = ((key >> shift) & (_BINS - 1)).to(torch.int32)
            if high is not None:  # entries outside the prefix go to the spare bin
                digit.masked_fill_((key >> (shift + _DIGIT_BITS)) != high, _BINS)
            hist.index_add_(0, digit, ones.expand(digit.shape))
        from_top = hist[:_BINS].flip(0).cumsum(0)
        rank = torch.searchsorted(from_top, need).clamp_(max=_BINS - 1)
        digit = _BINS - 1 - rank
        need = need - (from_top[rank] - hist[digit])  # minus the entries above this digit
        prefix = prefix | (digit[0] << shift)
    cut = prefix.to(keys)
    out = torch.empty(_rows(x.after).shape, dtype=torch.bool, device=device)
    taken = torch.zeros((), dtype=torch.int64, device=device)  # ties kept in earlier blocks
    for s, d in x.chunks():
        key = d.reshape(-1).view(keys)
        tied = key == cut
        ranks = tied.cumsum(0, dtype=torch.int32)  # among this block's ties
        keep = (key > cut) | (tied & (ranks <= need - taken))
        out[s : s + d.shape[0]] = keep.reshape(d.shape)
        taken = taken + tied.sum()
    return out.reshape(x.shape)


def row_l1(x: DeviceDifference, axis: int) -> torch.Tensor:
    """The float64 L1 norm of ``x``'s slices along ``axis`` (``x`` in its parameter's
    shape), summed chunk by chunk."""
    n = x.shape[axis]
    out = torch.zeros(n, dtype=torch.float64, device=x.device)
    for s, d in x.absolute().chunks():
        if axis == 0:
            out[s : s + d.shape[0]] = d.double().reshape(d.shape[0], -1).sum(1)
        else:
            out += d.double().movedim(axis, 0).reshape(n, -1).sum(1)
    return out


def at_least(x: DeviceDifference, t: torch.Tensor) -> torch.Tensor:
    """``x >= t`` (``t`` a scalar tensor of ``x.dtype``), compared chunk by chunk."""
    out = torch.empty(_rows(x.after).shape, dtype=torch.bool, device=x.device)
    for s, d in x.chunks():
        torch.ge(d, t, out=out[s : s + d.shape[0]])
    return out.reshape(x.shape)
