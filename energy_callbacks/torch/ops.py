"""ArrayOps on torch tensors, for any device and dtype (bf16, CUDA included).

The rules' ops never read a device value back to the host (no ``.item()``, no
boolean indexing), so masking a step does not wait for the device; the energy
totals stay on the device too (:meth:`EnergyMeter.record_deferred`).

CPU tensors in a NumPy dtype take the faster route of NumPy views (see
:func:`ops_for`); this module serves the rest and is tested against the NumPy
oracle on the same numbers. Selection keeps the core's tie rule: among equal
scores the lower flat index wins.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from ..core import fused
from ..core.ops import APPROX_SAMPLE, Array, ArrayOps, NumpyOps, approx_stride
from . import difference
from .difference import DeviceDifference, dense

_NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64)


def ops_for(tensors: Iterable[torch.Tensor]) -> ArrayOps:
    """NumPy views for CPU tensors of a NumPy dtype (with the fused selection when
    numba is installed), torch ops otherwise."""
    tensors = list(tensors)
    if all(t.device.type == "cpu" and t.dtype in _NUMPY_DTYPES for t in tensors):
        return fused.FusedNumpyOps() if fused.AVAILABLE else NumpyOps()  # own scratch buffers
    return TorchOps(tensors[0].device if tensors else None)


class TorchOps:
    """:class:`~energy_callbacks.core.ops.ArrayOps` on torch tensors of one device.

    The adapter's proposals are :class:`~energy_callbacks.torch.difference.DeviceDifference`
    objects: the top fraction, the unit rules' row norms, ``Threshold`` and a combined
    rule's ``keep`` read them chunk by chunk; any other op writes them out first.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device if device is not None else "cpu")
        self._thresholds: dict[tuple[torch.dtype, float], torch.Tensor] = {}

    def deferred(self, x: Array) -> bool:
        """True for a proposal read chunk by chunk (``keep`` then needs no buffer)."""
        return isinstance(x, DeviceDifference)

    def abs(self, x: Array) -> Array:
        return x.absolute() if isinstance(x, DeviceDifference) else x.abs()

    def magnitude(self, x: Array) -> Array:
        return self.abs(x)

    def isfinite_all(self, x: Array) -> bool:
        return bool(torch.isfinite(dense(x)).all())

    def total(self, x: Array, alpha: float = 1.0) -> float:
        # float64 sums of |x| a block at a time: no float64 copy of a whole tensor
        acc = torch.zeros((), dtype=torch.float64, device=x.device)
        for block in self.blocks(x, difference.DEVICE_CHUNK):
            a = block.abs()
            acc += a.sum(dtype=torch.float64) if alpha == 1.0 else a.double().pow_(alpha).sum()
        return float(acc)

    def count_nonzero(self, x: Array) -> int:
        return int(torch.count_nonzero(dense(x)))

    def row_l1(self, x: Array, axis: int) -> Array:
        if isinstance(x, DeviceDifference) and x.whole_shape:
            return difference.row_l1(x, axis)
        rows = dense(x).detach().abs().double().movedim(axis, 0)
        return rows.reshape(rows.shape[0], -1).sum(1)

    def row_max(self, x: Array, axis: int) -> Array:
        rows = dense(x).detach().abs().movedim(axis, 0)
        return rows.reshape(rows.shape[0], -1).amax(1)

    def top_k_mask(self, scores: Array, k: Array | int, largest: bool = True) -> Array:
        scores = dense(scores)
        if scores.dim() != 2:
            raise ValueError(f"top_k_mask expects a 2-D tensor, got shape {tuple(scores.shape)}")
        rows, n = scores.shape
        kk = torch.as_tensor(k, dtype=torch.int64, device=scores.device).expand(rows).clamp(max=n)
        if n == 0:
            return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        s = scores if largest else -scores
        # Cut value per row: the k-th largest (rows with k = 0 are cleared below). One k
        # for every row is a selection (kthvalue); per-row k takes a sort, whose indices
        # cost 8 bytes an entry.
        if isinstance(k, int):
            kth = min(max(k, 1), n)
            cut = torch.kthvalue(s, n - kth + 1, dim=1, keepdim=True).values
        else:
            ranked = torch.sort(s, dim=1, descending=True, stable=True).values
            cut = ranked.gather(1, (kk - 1).clamp(min=0)[:, None])
        above = s > cut
        tied = s == cut
        need = kk - above.sum(1)
        # ties at the cut go to the lowest indices (int32 ranks: half the memory of int64)
        mask = above | (tied & (tied.cumsum(1, dtype=torch.int32) <= need[:, None]))
        return mask & (kk > 0)[:, None]  # no boolean indexing: it would wait for the device

    def approx_top_mask(self, scores: Array, k: int) -> Array:
        scores = dense(scores)
        n = scores.numel()
        if n <= APPROX_SAMPLE or k <= 0 or k >= n:
            return self.top_k_mask(scores.reshape(1, n), k)[0]
        sample = scores.reshape(-1)[:: approx_stride(n)]
        m = sample.numel()
        r = min(m - 1, max(0, m - round(k * m / n)))
        t = torch.kthvalue(sample.float(), r + 1).values.to(scores.dtype)
        # scores >= t, or > 0 when t is 0 (zero scores never count); decided on the device
        return (scores >= t) & ((t > 0) | (scores > 0))

    def top_magnitude_mask(self, x: Array, k: int, approximate: bool = False) -> Array:
        if isinstance(x, DeviceDifference):
            return difference.top_mask(x, k, approximate, self)
        s = x.abs()
        return self.approx_top_mask(s, k) if approximate else self.top_k_mask(s[None, :], k)[0]

    def reshape(self, x: Array, shape: tuple[int, ...]) -> Array:
        return x.reshaped(shape) if isinstance(x, DeviceDifference) else x.reshape(shape)

    def moveaxis(self, x: Array, source: int, destination: int) -> Array:
        return dense(x).movedim(source, destination)

    def expand_units(self, unit_mask: Array, shape: tuple[int, ...], axis: int) -> Array:
        view = [1] * len(shape)
        view[axis] = shape[axis]
        return unit_mask.reshape(view).expand(shape)

    def logical_and(self, a: Array, b: Array) -> Array:
        return torch.logical_and(a, b)

    def logical_or(self, a: Array, b: Array) -> Array:
        return torch.logical_or(a, b)

    def logical_not(self, a: Array) -> Array:
        return torch.logical_not(a)

    def add(self, a: Array, b: Array) -> Array:
        return torch.add(dense(a), dense(b))

    def scale(self, x: Array, factor: float) -> Array:
        x = dense(x)
        return x * torch.tensor(factor, dtype=x.dtype, device=x.device)

    def ones_mask(self, shape: tuple[int, ...]) -> Array:
        return torch.ones(shape, dtype=torch.bool, device=self.device)

    def zeros_like(self, x: Array) -> Array:
        if isinstance(x, DeviceDifference):
            return torch.zeros(x.shape, dtype=x.dtype, device=x.device)
        return torch.zeros_like(x)

    def keep(self, x: Array, mask: Array, out: Array | None = None) -> Array:
        if isinstance(x, DeviceDifference):
            return x.masked(mask)  # read as where(mask, x, 0) by the next pass
        if out is None:
            return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
        return torch.mul(x, mask, out=out)

    def greater_equal(self, x: Array, threshold: float) -> Array:
        # Rounded up into x's dtype once, on the host (exact compare), and used as a CPU
        # scalar operand: no copy to the device, no wait for it.
        key = (x.dtype, threshold)
        t = self._thresholds.get(key)
        if t is None:
            t = torch.tensor(threshold, dtype=x.dtype)
            if float(t) < threshold:
                t = torch.nextafter(t, torch.tensor(float("inf"), dtype=x.dtype))
            t = self._thresholds[key] = t
        if isinstance(x, DeviceDifference):
            return difference.at_least(x, t.to(x.device))
        return x >= t

    def from_numpy(self, x: np.ndarray) -> Array:
        return torch.from_numpy(np.ascontiguousarray(x)).to(self.device)

    def to_numpy(self, x: Array) -> np.ndarray:
        t = dense(x).detach()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.cpu().numpy()

    def concat(self, xs: list[Array], axis: int) -> Array:
        return torch.cat([dense(x) for x in xs], dim=axis)

    def split(self, x: Array, sizes: list[int], axis: int) -> list[Array]:
        return list(torch.split(dense(x), sizes, dim=axis))

    def blocks(self, x: Array, size: int) -> Iterator[Array]:
        if isinstance(x, DeviceDifference):
            yield from x.flat_blocks(size)
            return
        yield from x.detach().reshape(-1).split(size)

    def assign(self, dst: Array, src: Array) -> None:
        with torch.no_grad():
            dst.copy_(src)

    def zeros_f64(self, shape: tuple[int, ...]) -> Array:
        return torch.zeros(shape, dtype=torch.float64, device=self.device)

    def apply_update(self, w: Array, update: Array) -> Array:
        with torch.no_grad():
            before = w.detach().clone()
            w.add_(update)
            return w.detach() - before

    def add_f64(self, acc: Array, x: Array) -> Array:
        return acc.add_(x.detach())

    def argmax(self, x: Array) -> Array:
        return x.argmax(-1)

    def class_probability(self, outputs: Array, labels: Array, from_logits: bool) -> Array:
        p = outputs.detach().double()
        if from_logits:
            p = p.softmax(-1)
        return p.gather(-1, labels.long().reshape(-1, 1))[:, 0]
