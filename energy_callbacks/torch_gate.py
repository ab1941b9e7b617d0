"""The sample gate for torch models: a forward hook that gates samples through the
output gradient, and an optimizer-step wrapper that skips steps nobody learned from.

Used by :func:`energy_callbacks.torch.attach`; see its module docstring for the
guarantees and the limits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from .core import Plasticity
from .core.ops import NumpyOps


def default_logits(output: Any) -> torch.Tensor:
    """The logits in a forward output: a tensor, the first of a tuple, or ``["logits"]``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, dict) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    raise TypeError(
        f"sample gate: cannot find logits in a forward output of type {type(output).__name__}; "
        "pass outputs=<callable returning the logits tensor>"
    )


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class OutputGate:
    """Forward hook that gates samples through the model output's gradient."""

    def __init__(
        self,
        module: nn.Module,
        plasticity: Plasticity,
        outputs: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        self.plasticity = plasticity
        self.outputs = outputs or default_logits
        self._armed: tuple[Any, Any] | None = None
        self.decided = 0  # forward passes gated so far
        self.learned = 0  # samples that passed so far (summed over ranks)
        self._hook = module.register_forward_hook(self._on_forward)

    def arm(self, targets: Any, sample_ids: Any = None) -> None:
        self._armed = (targets, sample_ids)

    @property
    def armed(self) -> bool:
        return self._armed is not None

    def remove(self) -> None:
        self._hook.remove()

    def _on_forward(self, module: nn.Module, args: Any, output: Any) -> Any:
        if self._armed is None or not torch.is_grad_enabled():
            return None
        targets, ids = self._armed
        self._armed = None
        logits = self.outputs(output)
        if logits.dim() != 2:
            raise ValueError(
                f"sample gate: logits of shape {tuple(logits.shape)}; the gates judge one "
                "prediction per sample, shape (batch, classes). Pass outputs= to pick them."
            )
        ops = self.plasticity.ops
        if isinstance(ops, NumpyOps):
            result = self.plasticity.gate(
                _host(logits), _host(targets), None if ids is None else _host(ids)
            )
            mask = torch.from_numpy(np.asarray(result.mask, dtype=bool)).to(logits.device)
        else:
            ids_t = None if ids is None else torch.as_tensor(ids, device=logits.device)
            result = self.plasticity.gate(
                logits.detach(), torch.as_tensor(targets, device=logits.device), ids_t
            )
            mask = result.mask
        learned = result.learned
        if _distributed():
            count = torch.tensor([learned], dtype=torch.int64, device=logits.device)
            torch.distributed.all_reduce(count)
            learned = int(count.item())
        self.decided += 1
        self.learned += learned
        if learned == 0 and not _distributed() and isinstance(output, torch.Tensor):
            return output.detach().requires_grad_()  # nothing learns: a backward pass for free
        if result.learned < result.seen:
            shape = (-1,) + (1,) * (logits.dim() - 1)
            keep = mask.reshape(shape)
            logits.register_hook(lambda g: g * keep.to(g.dtype))
        return None


def _host(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return np.asarray(x.cpu().numpy())
    return np.asarray(x)


def skip_empty_steps(opt: torch.optim.Optimizer, gate: OutputGate) -> Callable[[], None]:
    """Wrap ``opt.step`` so that it does nothing when no sample passed the gate since its
    last step (several optimizers may step after one gated forward pass)."""
    inner = opt.step
    had_attr = "step" in opt.__dict__
    last = [gate.decided, gate.learned]

    def step(closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        loss = None
        if closure is not None:
            # Run the forward/backward first, so the gate has decided before we step.
            loss = closure()
            first = [True]

            def again() -> Any:
                if first[0]:
                    first[0] = False
                    return loss
                return closure()

        if gate.decided == last[0]:
            raise RuntimeError(
                "sample gate: no forward pass of the attached model was gated before "
                "optimizer.step(). Plain PyTorch: call handle.gate_batch(targets) before "
                "model(x). Lightning: training_step must call self(x), the module's forward."
            )
        learned = gate.learned - last[1]
        last[:] = [gate.decided, gate.learned]
        if learned == 0:
            return loss
        return inner(again, **kwargs) if closure is not None else inner(**kwargs)

    opt.step = step  # type: ignore[method-assign]

    def restore() -> None:
        if had_attr:
            opt.step = inner  # type: ignore[method-assign]
        else:
            del opt.step

    return restore
