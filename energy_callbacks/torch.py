"""Plasticity on plain PyTorch optimizers; the Lightning callback uses the same machinery.

Example::

    handle = attach(model, optimizer, Plasticity(synapses=0.1, samples="lazy"))
    for x, y in loader:
        handle.gate_batch(y)        # with a sample gate only: before the forward pass
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()            # masked; skipped when no sample passed the gate
        optimizer.zero_grad()
    print(handle.report())
    handle.detach()

How it works:

- **Updates.** A step pre-hook snapshots the parameters and a post-hook diffs
  them. ``dw = w_after - w_before`` is the update the optimizer made, whatever
  the optimizer (SGD, Adam, LBFGS, ...). The masked-out entries are restored,
  so the applied update is ``mask * dw`` and the energy is the real change. The
  optimizer's own state (momentum, Adam moments) still sees every proposal.
- **Samples.** A forward hook on the model computes the gate from its output.
  The rows of gated-out samples get a zero output gradient, so they add nothing
  to any parameter gradient, and the loss keeps its own normalization. When no
  sample passes, the optimizer step is skipped: no weight, moment or step
  count changes. Outside data parallelism the output is then detached, so the
  backward pass costs nothing.

Limits: the gate needs the model's ``forward`` to be called with the batch
(``model(x)``). Models whose loss reads other outputs than the gated logits
are gated only through those logits. Parameters without a gradient in a step
are not read. CPU tensors in float16/32/64 are processed through zero-copy
NumPy views; other devices and dtypes use torch ops.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .backends.torch_ops import ops_for
from .core import EnergyReport, GateResult, Plasticity, TensorSpec
from .core.ops import numpy_ops

LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Modules whose ``weight`` holds (units, inputs, ...) and whose bias follows units."""


def describe(
    model: nn.Module,
    params: Iterable[nn.Parameter] | None = None,
    layers: Sequence[str] | None = None,
) -> tuple[list[TensorSpec], list[nn.Parameter]]:
    """The tensors the rules see: trainable, de-duplicated (tied weights count once).

    ``params`` restricts to those parameters (an optimizer's). ``layers`` names
    the modules to cover, in forward order; by default every module, in
    registration order. ``Linear``/``Conv`` weights get unit axis 0 and input
    axis 1 with their bias in the same layer; other parameters get no unit axis.
    """
    wanted = None if params is None else {id(p) for p in params}
    modules = dict(model.named_modules())
    if layers is None:
        names = list(modules)
    else:
        unknown = [n for n in layers if n not in modules]
        if unknown:
            raise ValueError(
                f"layers names modules {unknown} that the model does not have; "
                f"its modules are {[n for n in modules if n]}"
            )
        names = [
            f"{n}.{sub}" if n and sub else n or sub
            for n in layers
            for sub, _ in modules[n].named_modules()
        ]
    specs: list[TensorSpec] = []
    found: list[nn.Parameter] = []
    seen: set[int] = set()
    for mname in names:
        module = modules[mname]
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen or (wanted is not None and id(p) not in wanted):
                continue
            seen.add(id(p))
            full = f"{mname}.{pname}" if mname else pname
            if isinstance(module, LAYER_TYPES) and pname == "weight":
                specs.append(TensorSpec(full, tuple(p.shape), 0, 1, mname))
            elif isinstance(module, LAYER_TYPES) and pname == "bias":
                specs.append(TensorSpec(full, tuple(p.shape), 0, None, mname))
            else:
                specs.append(TensorSpec(full, tuple(p.shape), None))
            found.append(p)
    return specs, found


class _Snapshot:
    """Before/after buffers of the parameters one optimizer steps."""

    def __init__(self, params: list[nn.Parameter], use_numpy: bool) -> None:
        self.params = params
        self.use_numpy = use_numpy
        if use_numpy:
            self.before = [np.empty(tuple(p.shape), _np_dtype(p)) for p in params]
            # 16-bit differences round; float32 holds them exactly.
            self.delta = [
                np.empty(tuple(p.shape), np.promote_types(_np_dtype(p), np.float32)) for p in params
            ]
        else:
            self.before = [
                torch.empty_like(p, memory_format=torch.contiguous_format) for p in params
            ]

    def view(self, p: nn.Parameter) -> Any:
        return p.detach().numpy() if self.use_numpy else p.detach()

    def take(self) -> None:
        for p, b in zip(self.params, self.before, strict=True):
            if self.use_numpy:
                np.copyto(b, self.view(p))
            else:
                b.copy_(p.detach())

    def deltas(self) -> list[Any]:
        """``w_after - w_before`` per parameter (None where the parameter had no grad)."""
        out: list[Any] = []
        for i, p in enumerate(self.params):
            if p.grad is None:
                out.append(None)
            elif self.use_numpy:
                out.append(np.subtract(self.view(p), self.before[i], out=self.delta[i]))
            else:
                wide = torch.promote_types(p.dtype, torch.float32)  # exact 16-bit differences
                out.append(p.detach().to(wide) - self.before[i].to(wide))
        return out

    def restore(self, i: int, keep: Any | None) -> None:
        """Put back the entries of parameter ``i`` outside ``keep`` (all if None)."""
        p, b = self.params[i], self.before[i]
        if self.use_numpy:
            w = self.view(p)
            np.copyto(w, b, where=True if keep is None else np.logical_not(keep))
        else:
            with torch.no_grad():
                p.copy_(b if keep is None else torch.where(keep, p, b))


def _np_dtype(p: torch.Tensor) -> np.dtype:
    return np.dtype(str(p.dtype).removeprefix("torch."))


class AttachedPlasticity:
    """Plasticity attached to a model and its optimizer(s). Made by :func:`attach`."""

    def __init__(
        self,
        model: nn.Module,
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        plasticity: Plasticity,
        *,
        layers: Sequence[str] | None = None,
        adjacency: Sequence[tuple[str, str]] | None = None,
        outputs: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        opts = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
        in_optimizers = [p for opt in opts for group in opt.param_groups for p in group["params"]]
        specs, params = describe(model, in_optimizers, layers)
        if not params:
            raise ValueError(
                "attach: the optimizer(s) step none of the model's trainable parameters"
            )
        self.model = model
        self.plasticity = plasticity
        self.params = params
        self.ops = ops_for(params)
        plasticity.setup(specs, adjacency, ops=self.ops)
        self._use_numpy = self.ops is numpy_ops
        index = {id(p): i for i, p in enumerate(params)}
        self._removers: list[Callable[[], None]] = []
        self._optimizers = opts
        for opt in opts:
            mine = [index[id(p)] for g in opt.param_groups for p in g["params"] if id(p) in index]
            mine = sorted(set(mine))
            if not mine:
                continue
            snap = _Snapshot([params[i] for i in mine], self._use_numpy)
            pre = opt.register_step_pre_hook(lambda o, a, k, s=snap: s.take())
            post = opt.register_step_post_hook(lambda o, a, k, s=snap, m=mine: self._after(s, m))
            self._removers += [pre.remove, post.remove]
        self.gate: OutputGate | None = None
        if plasticity.samples is not None:
            self.gate = OutputGate(model, plasticity, outputs)
            self._removers.append(self.gate.remove)
            for opt in opts:
                self._removers.append(_skip_empty_steps(opt, self.gate))

    # -- the step ----------------------------------------------------------
    def _after(self, snap: _Snapshot, mine: list[int]) -> None:
        proposed: list[Any] = [None] * len(self.params)
        for i, dw in zip(mine, snap.deltas(), strict=True):
            proposed[i] = dw
        step = self.plasticity.step(proposed)
        for j, i in enumerate(mine):
            if proposed[i] is None:
                continue
            if step.skipped:
                snap.restore(j, None)
            elif step.masks[i] is not None:
                snap.restore(j, step.masks[i])

    # -- public --------------------------------------------------------------
    def gate_batch(self, targets: Any, sample_ids: Any = None) -> None:
        """Give the targets (and ids) of the batch whose forward pass comes next."""
        if self.gate is None:
            raise RuntimeError("gate_batch: this Plasticity has no sample gate (samples=None)")
        self.gate.arm(targets, sample_ids)

    def report(self) -> EnergyReport:
        return self.plasticity.report()

    def detach(self) -> None:
        """Remove every hook and wrapper; the model and optimizers are as before."""
        for remove in reversed(self._removers):
            remove()
        self._removers = []


def attach(
    model: nn.Module,
    optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
    plasticity: Plasticity | None = None,
    **kwargs: Any,
) -> AttachedPlasticity:
    """Apply ``plasticity`` (default: measure only) to every step of ``optimizers``.

    Keyword arguments: ``layers`` (module names in forward order), ``adjacency``
    (layer wiring for the path rule), ``outputs`` (forward output -> logits).
    """
    return AttachedPlasticity(model, optimizers, plasticity or Plasticity(), **kwargs)


# -- sample gates -------------------------------------------------------------
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
        self.decided = 0  # batches gated since the last optimizer step
        self.learned = 0  # samples that passed since the last step (summed over ranks)
        self.last: GateResult | None = None
        self._hook = module.register_forward_hook(self._on_forward)

    def arm(self, targets: Any, sample_ids: Any = None) -> None:
        self._armed = (targets, sample_ids)

    @property
    def armed(self) -> bool:
        return self._armed is not None

    def remove(self) -> None:
        self._hook.remove()

    def step_done(self) -> None:
        self.decided = self.learned = 0

    def _on_forward(self, module: nn.Module, args: Any, output: Any) -> Any:
        if self._armed is None or not torch.is_grad_enabled():
            return None
        targets, ids = self._armed
        self._armed = None
        logits = self.outputs(output)
        ops = self.plasticity.ops
        if ops is numpy_ops:
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
        self.last = result
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


def _skip_empty_steps(opt: torch.optim.Optimizer, gate: OutputGate) -> Callable[[], None]:
    """Wrap ``opt.step`` so that it does nothing when no sample passed the gate."""
    inner = opt.step
    had_attr = "step" in opt.__dict__

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

        if gate.decided == 0:
            raise RuntimeError(
                "sample gate: no forward pass of the attached model was gated before "
                "optimizer.step(). Plain PyTorch: call handle.gate_batch(targets) before "
                "model(x). Lightning: training_step must call self(x), the module's forward."
            )
        if gate.learned == 0:
            gate.step_done()
            return loss
        gate.step_done()
        return inner(again, **kwargs) if closure is not None else inner(**kwargs)

    opt.step = step  # type: ignore[method-assign]

    def restore() -> None:
        if had_attr:
            opt.step = inner  # type: ignore[method-assign]
        else:
            del opt.step

    return restore
