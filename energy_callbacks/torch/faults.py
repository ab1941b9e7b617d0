"""Faults on the torch side: why a step held NaN/Inf, and the steps a loss scaler skips
(used by :mod:`energy_callbacks.torch`).

- :func:`nonfinite_reason`: the warning for an undone step. Either the update held
  NaN/Inf (the optimizer's own state may have taken it in) or the weights already did
  (written outside ``optimizer.step``), so every step of them is undone until repaired.
- :func:`watch_scaler`: a ``torch.amp.GradScaler`` skips ``optimizer.step`` when the
  gradients overflow at its scale, so the step hooks never see those steps; the watch
  counts them as skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

UPDATE_HELD_NAN = (
    "a step's update held NaN/Inf (NaN/Inf gradients?): it was undone and nothing was "
    "counted. The optimizer's own state (momentum, Adam moments) took those gradients in; "
    "if the following steps are skipped too, stop non-finite gradients before "
    "optimizer.step (torch.amp.GradScaler does)"
)


def nonfinite_weights(names: Sequence[str], params: Sequence[torch.Tensor]) -> list[str]:
    """The names of the parameters that hold NaN/Inf."""
    with torch.no_grad():
        return [n for n, p in zip(names, params, strict=True) if not bool(torch.isfinite(p).all())]


def nonfinite_reason(bad: Sequence[str]) -> str:
    """Why an undone step held NaN/Inf, given the parameters that hold it themselves."""
    if not bad:
        return UPDATE_HELD_NAN
    return (
        f"parameters {list(bad)} held NaN/Inf before the step (written outside "
        "optimizer.step: loaded, or set in place), so each step of them is undone and "
        "skipped, and their net displacement (M1_min) stays at its last finite value, until "
        "they are finite again; reload or repair those weights"
    )


def watch_scaler(
    scaler: Any,
    ours: Sequence[torch.optim.Optimizer],
    stepped: Callable[[], int],
    gate_skips: Callable[[], int],
    count: Callable[[], None],
) -> Callable[[], None]:
    """Wrap ``scaler.step``: a call on one of ``ours`` that reached no step hook
    (``stepped()`` unchanged) and was not skipped by the sample gate (``gate_skips()``
    unchanged) was skipped by the scaler, and ``count()`` is called. Returns the undo."""
    inner = scaler.step
    had_attr = "step" in scaler.__dict__

    def step(optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        before = stepped(), gate_skips()
        out = inner(optimizer, *args, **kwargs)
        if any(optimizer is o for o in ours) and (stepped(), gate_skips()) == before:
            count()
        return out

    scaler.step = step

    def restore() -> None:
        if had_attr:
            scaler.step = inner
        else:
            del scaler.step

    return restore
