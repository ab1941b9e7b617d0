"""w_0, the weights where the measurement began, kept in host memory, and the net
change ``(sum |w_T - w_0|, count(w_T != w_0))`` read from it for M1_min and M0_min.

w_0 is read only when M1_min is reported (a report, a log of it, a checkpoint), so
on an accelerator it takes host memory, not device memory. The net change is
summed in float64 through temporaries of bounded size: no float64 copy of a
parameter is ever made.
"""

from __future__ import annotations

import numpy as np
import torch

from ..core import energy, fused
from .snapshot import view

_NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64)


def keep(p: torch.Tensor) -> torch.Tensor:
    """A host copy of ``p`` in its own dtype: its w_0."""
    return p.detach().to("cpu", copy=True)


def from_displacement(p: torch.Tensor, displacement: np.ndarray) -> torch.Tensor:
    """The w_0 of a state that saved ``w_T - w_0`` (float64) instead of w_0, ``p``
    holding w_T: ``w_T - displacement`` in float64, which gives that displacement back
    exactly."""
    w = p.detach().to("cpu", torch.float64).reshape(displacement.shape)
    return w - torch.from_numpy(np.asarray(displacement, dtype=np.float64))


def totals(p: torch.Tensor, w0: torch.Tensor) -> tuple[float, int]:
    """``(sum |p - w0|, count(p != w0))``, the difference in float64; a NaN/Inf in
    ``p`` makes the sum non-finite."""
    after = p.detach()
    if after.device.type == "cpu" and after.dtype in _NUMPY_DTYPES:
        a, b = view(after).reshape(-1), view(w0).reshape(-1)
        if fused.AVAILABLE and a.dtype in fused.FUSED_DTYPES and b.dtype in fused.FUSED_DTYPES:
            return fused.net_totals(a, b)
        return energy.net_change(a, b)
    # other dtypes (bfloat16) and devices: float64 chunks on the host
    a, b = after.reshape(-1), w0.reshape(-1)
    acc, count, chunk = 0.0, 0, energy.NET_CHUNK
    for start in range(0, a.numel(), chunk):
        d = a[start : start + chunk].to("cpu", torch.float64)
        d.sub_(b[start : start + chunk].to(torch.float64))
        count += int(torch.count_nonzero(d))
        acc += float(d.abs_().sum())
    return acc, count
