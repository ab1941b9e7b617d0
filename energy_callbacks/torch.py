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
  The snapshot is carried from one step to the next, so the pre-hook copies
  only parameters that torch saw change in between (``load_state_dict``,
  in-place ops under ``no_grad``); changes torch does not see (``p.data``
  ops, writes through NumPy views) are measured as part of the next step.
- **Samples.** A forward hook on the model computes the gate from its output.
  The rows of gated-out samples get a zero output gradient, so they add nothing
  to any parameter gradient, and the loss keeps its own normalization. When no
  sample passes, the optimizer step is skipped: no weight, moment or step
  count changes. Outside data parallelism the output is then detached, so the
  backward pass costs nothing.
- **Synaptic caching** (``Plasticity(caching=...)``): after the masked step,
  the applied change enters the transient store and the store's decay is
  added to the parameters, so the network uses ``w_c + w_e``. Call
  :meth:`AttachedPlasticity.consolidate` when training ends (the Lightning
  callback does, in ``on_train_end``).

Limits: the gate needs the model's ``forward`` to be called with the batch
(``model(x)``). Models whose loss reads other outputs than the gated logits
are gated only through those logits. Parameters without a gradient in a step
are not read. CPU tensors in float16/32/64 are processed through zero-copy
NumPy views; other devices and dtypes use torch ops.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .backends import fused
from .backends.torch_ops import ops_for
from .core import EnergyReport, Plasticity, TensorSpec, Topology
from .core.ops import NumpyOps
from .torch_gate import OutputGate, default_logits, skip_empty_steps

__all__ = ["AttachedPlasticity", "attach", "default_logits", "describe"]

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
        own = dict(module.named_parameters(recurse=False))
        kernel = own.get("weight") if isinstance(module, LAYER_TYPES) else None
        # A layer exists only if its own kernel is covered here (not frozen, not tied to an
        # earlier module); otherwise its bias is a tensor of its own.
        is_layer = kernel is not None and _covered(kernel, seen, wanted)
        for pname, p in own.items():
            if not _covered(p, seen, wanted):
                continue
            seen.add(id(p))
            full = f"{mname}.{pname}" if mname else pname
            if is_layer and pname == "weight":
                specs.append(TensorSpec(full, tuple(p.shape), 0, 1, mname))
            elif is_layer and pname == "bias":
                specs.append(TensorSpec(full, tuple(p.shape), 0, None, mname))
            elif isinstance(module, LAYER_TYPES) and pname == "bias":
                specs.append(TensorSpec(full, tuple(p.shape), 0))
            else:
                specs.append(TensorSpec(full, tuple(p.shape), None))
            found.append(p)
    return specs, found


def network(
    specs: Sequence[TensorSpec],
    adjacency: Sequence[tuple[str, str]] | None,
    plasticity: Plasticity,
) -> Topology:
    """The topology of a torch model: ``adjacency`` if given, else the layers in order
    with the last one the output, linked where sizes match. A path rule warns about
    the links it cannot make (their inputs count as always selected)."""
    if adjacency is not None:
        return Topology(specs, adjacency)
    topology = Topology.chain(specs)
    units = plasticity.units
    if units is not None and units.path and topology.unlinked():
        warnings.warn(
            f"path rule: layers {topology.unlinked()} are consecutive but their sizes do not "
            "match (e.g. conv -> flatten -> dense), so the path does not link them: the "
            "later layer's inputs count as always selected. attach(adjacency=...) overrides.",
            RuntimeWarning,
            stacklevel=3,
        )
    return topology


def _covered(p: nn.Parameter, seen: set[int], wanted: set[int] | None) -> bool:
    return p.requires_grad and id(p) not in seen and (wanted is None or id(p) in wanted)


class _Snapshot:
    """The parameters one optimizer steps, as they were before its step.

    The copy is carried from step to step: the fused pass that measures a step
    also leaves a copy of the new weights, so the next step's pre-hook copies
    nothing. A parameter that changed between steps in a way torch counts (its
    version counter or storage moved: ``load_state_dict``, an in-place op under
    ``no_grad``) is copied afresh. Changes torch does not count (``p.data`` ops,
    writes through NumPy views) land in the next step's measured update.
    """

    def __init__(self, params: list[nn.Parameter], use_numpy: bool) -> None:
        self.params = params
        self.use_numpy = use_numpy
        n = len(params)
        if use_numpy:
            self.before: list[Any] = [np.empty(tuple(p.shape), _np_dtype(p)) for p in params]
            # 16-bit differences round; float32 holds them exactly.
            self.delta: list[Any] = [
                np.empty(tuple(p.shape), np.promote_types(_np_dtype(p), np.float32)) for p in params
            ]
            # Bit masks for the branch-free blend in drop(): 4x faster than copyto(where=).
            self.bits = [np.empty(tuple(p.shape), _uint(p)) for p in params]
            self.xor = [np.empty(tuple(p.shape), _uint(p)) for p in params]
        else:
            self.before = [
                torch.empty_like(p, memory_format=torch.contiguous_format) for p in params
            ]
            self.delta = [None] * n
        # One fused pass per tensor where numba can do it (float32/64 on the CPU).
        self.fused = [
            use_numpy and fused.AVAILABLE and _np_dtype(p) in fused.FUSED_DTYPES for p in params
        ]
        self.spare: list[Any] = [None] * n  # the next snapshot, written by apply()
        self.current = [False] * n  # before[i] holds the weights as the last step left them
        self.stamps: list[tuple[int, int] | None] = [None] * n

    def take(self) -> None:
        for i, (p, b) in enumerate(zip(self.params, self.before, strict=True)):
            if self.current[i] and self.stamps[i] == _stamp(p):
                continue
            if self.use_numpy:
                torch.from_numpy(b).copy_(p.detach())  # torch copies with all threads
            else:
                b.copy_(p.detach())

    def differences(self) -> list[fused.Difference | None]:
        """``w_after - w_before`` per parameter (None where it had no grad), written out
        only if a rule reads it; for fused parameters only."""
        return [
            None if p.grad is None else fused.Difference(_view(p), b, d)
            for p, b, d in zip(self.params, self.before, self.delta, strict=True)
        ]

    def apply(
        self, diffs: list[fused.Difference | None], masks: list[Any]
    ) -> list[tuple[float, int] | None] | None:
        """Keep each fused parameter's update where its mask says (None keeps all),
        in one pass each that also writes the next snapshot.

        Returns the applied change's ``(sum |dw|, count)`` per parameter, or None if
        the step held NaN/Inf: then every parameter is back to its value before it.
        """
        stats: list[tuple[float, int] | None] = [None] * len(self.params)
        finite = True
        for i, (d, m) in enumerate(zip(diffs, masks, strict=True)):
            if d is None:
                continue
            if self.spare[i] is None:
                self.spare[i] = np.empty_like(self.before[i])
            w = _view(self.params[i])
            if m is None:
                stats[i] = fused.track_stats(w, self.before[i], self.spare[i])
                total = stats[i][0]
            else:  # a boolean mask, or a ThresholdMask applied in the same pass
                stats[i], total = fused.blend_kept(w, self.before[i], self.spare[i], m)
            finite = finite and math.isfinite(total)
        if not finite:
            self.undo()
            return None
        return stats

    def deltas(self) -> tuple[list[Any], list[tuple[float, int] | None]]:
        """``w_after - w_before`` per parameter (None where the parameter had no grad),
        and ``(sum |delta|, count(delta != 0))`` where a fused kernel computed them."""
        out: list[Any] = []
        stats: list[tuple[float, int] | None] = [None] * len(self.params)
        for i, p in enumerate(self.params):
            if p.grad is None:
                out.append(None)
            elif self.use_numpy:
                d = self.delta[i]
                if self.fused[i]:
                    stats[i] = fused.diff_stats(_view(p), self.before[i], d)
                elif d.dtype == self.before[i].dtype:
                    torch.sub(p.detach(), torch.from_numpy(self.before[i]), out=torch.from_numpy(d))
                else:  # 16-bit weights: subtract in float32, where the difference is exact
                    np.subtract(_view(p), self.before[i], out=d, dtype=d.dtype)
                out.append(d)
            else:
                wide = torch.promote_types(p.dtype, torch.float32)  # exact 16-bit differences
                self.delta[i] = p.detach().to(wide) - self.before[i].to(wide)
                out.append(self.delta[i])
        return out, stats

    def drop(self, i: int, keep: Any) -> tuple[float, int] | None:
        """Undo parameter ``i``'s update outside ``keep``, and zero its delta there.

        Returns the applied change's ``(sum |delta|, count)`` from the fused kernel,
        which also brings the snapshot up to the new weights.
        """
        p, b, d = self.params[i], self.before[i], self.delta[i]
        if self.use_numpy and self.fused[i]:
            return fused.blend_stats(_view(p), b, d, keep)
        if self.use_numpy:
            bits, x = self.bits[i], self.xor[i]
            np.copyto(bits, keep, casting="unsafe")
            np.negative(bits, out=bits)  # all ones where kept, zero where dropped
            w, u = _view(p).view(bits.dtype), b.view(bits.dtype)
            np.bitwise_xor(w, u, out=x)
            np.bitwise_and(x, bits, out=x)
            np.bitwise_xor(u, x, out=w)  # kept: the new value; dropped: the old, bit for bit
            if d.itemsize == bits.itemsize:
                np.bitwise_and(d.view(bits.dtype), bits, out=d.view(bits.dtype))
            else:
                np.multiply(d, keep, out=d)
        else:
            with torch.no_grad():
                p.copy_(torch.where(keep, p, b))
            d.masked_fill_(~keep, 0)
        return None

    def undo(self) -> None:
        """Put every parameter back to its value before the step."""
        with torch.no_grad():
            for p, b in zip(self.params, self.before, strict=True):
                if self.use_numpy:
                    np.copyto(_view(p), b)
                else:
                    p.copy_(b)
        self.settle([True] * len(self.params))

    def settle(self, current: list[bool], swap: list[bool] | None = None) -> None:
        """End of a step: ``current[i]`` says the snapshot of parameter ``i`` equals its
        weights now; ``swap[i]`` that :meth:`apply` wrote it into the spare buffer."""
        for i, swapped in enumerate(swap or []):
            if swapped:
                self.before[i], self.spare[i] = self.spare[i], self.before[i]
        self.current = list(current)
        self.stamps = [_stamp(p) for p in self.params]


def _stamp(p: torch.Tensor) -> tuple[int, int]:
    """What torch changes when a tensor is written in place or given new storage."""
    return p._version, p.data_ptr()


def _view(p: torch.Tensor) -> np.ndarray:
    """A zero-copy NumPy view of a CPU tensor's storage (writes go to the tensor)."""
    return p.detach().numpy()


def _uint(p: torch.Tensor) -> np.dtype:
    return np.dtype(f"u{p.element_size()}")


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
        plasticity.setup(network(specs, adjacency, plasticity), ops=self.ops)
        self._use_numpy = isinstance(self.ops, NumpyOps)
        # w_T - w_0 is folded into the meter lazily from this reference copy.
        self._reference = [p.detach().clone() for p in params]
        index = {id(p): i for i, p in enumerate(params)}
        self._removers: list[Callable[[], None]] = []
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
                self._removers.append(skip_empty_steps(opt, self.gate))

    # -- the step ----------------------------------------------------------
    def _after(self, snap: _Snapshot, mine: list[int]) -> None:
        plasticity = self.plasticity
        if all(snap.fused) and plasticity.meter.alpha == 1.0 and plasticity.caching is None:
            self._step_fused(snap, mine)
            return
        deltas, stats = snap.deltas()
        proposed: list[Any] = [None] * len(self.params)
        for i, dw in zip(mine, deltas, strict=True):
            proposed[i] = dw
        current = [False] * len(mine)  # snapshots that drop() brought up to date
        restricts = plasticity.restricts
        if restricts:
            ops = self.ops
            finite = all(
                d is None or (ops.isfinite_all(d) if s is None else math.isfinite(s[0]))
                for d, s in zip(deltas, stats, strict=True)
            )
            if not finite:
                snap.undo()
                plasticity.meter.skip_nonfinite()
                return
            masks = plasticity.masks(proposed)
            for j, i in enumerate(mine):
                if proposed[i] is not None and masks[i] is not None:
                    stats[j] = snap.drop(j, masks[i])
                    current[j] = snap.fused[j]
        # The deltas now hold the real applied change: mask * dw.
        totals: list[tuple[float, int] | None] = [None] * len(self.params)
        for j, i in enumerate(mine):
            totals[i] = stats[j]
        if plasticity.record(
            proposed, check_finite=not restricts, displacement=False, totals=totals
        ):
            snap.settle(current)
            if plasticity.caching is not None:
                self._cache(snap, mine, proposed)
        else:
            snap.undo()

    def _cache(self, snap: _Snapshot, mine: list[int], applied: list[Any]) -> None:
        """Synaptic caching: the applied changes enter the store; its decay goes into the
        parameters (the next pre-hook then copies them afresh)."""
        decay = self.plasticity.cache(applied)
        with torch.no_grad():
            for j, i in enumerate(mine):
                d = decay[i]
                if d is None:
                    continue
                p = self.params[i]
                p.add_(torch.from_numpy(d) if self._use_numpy else d)
                snap.current[j] = False

    def _step_fused(self, snap: _Snapshot, mine: list[int]) -> None:
        """A step on fused tensors (alpha = 1): the rules see lazy differences, and one
        pass per tensor applies its mask (if any), measures the step and writes the
        next snapshot. Measuring only, or the approximate top fraction, never writes
        the difference out."""
        plasticity = self.plasticity
        diffs = snap.differences()
        proposed: list[Any] = [None] * len(self.params)
        for j, i in enumerate(mine):
            proposed[i] = diffs[j]
        masks = plasticity.masks(proposed) if plasticity.restricts else [None] * len(proposed)
        applied = snap.apply(diffs, [masks[i] for i in mine])
        if applied is None:
            plasticity.meter.skip_nonfinite()
            return
        totals: list[tuple[float, int] | None] = [None] * len(self.params)
        for j, i in enumerate(mine):
            totals[i] = applied[j]
        # record() reads only the totals here (alpha = 1, no displacement).
        plasticity.record(proposed, check_finite=False, displacement=False, totals=totals)
        stepped = [s is not None for s in applied]
        snap.settle(stepped, swap=stepped)

    def sync(self) -> None:
        """Fold the weights' net change since the last sync into ``w_T - w_0``."""
        meter = self.plasticity.meter
        with torch.no_grad():
            for i, (p, ref) in enumerate(zip(self.params, self._reference, strict=True)):
                if self._use_numpy:
                    delta = np.subtract(_view(p), _view(ref), dtype=np.float64)
                else:
                    delta = p.detach().double() - ref.double()
                meter.add_displacement(i, delta)
                ref.copy_(p.detach())

    # -- public --------------------------------------------------------------
    def gate_batch(self, targets: Any, sample_ids: Any = None) -> None:
        """Give the targets (and ids) of the batch whose forward pass comes next."""
        if self.gate is None:
            raise RuntimeError("gate_batch: this Plasticity has no sample gate (samples=None)")
        self.gate.arm(targets, sample_ids)

    def consolidate(self) -> None:
        """Synaptic caching: consolidate the whole transient store (the end of training).

        The weights do not change (they hold ``w_c + w_e`` already); the store's
        ``sum |w_e|`` is paid as consolidation energy. Needs ``Plasticity(caching=...)``.
        """
        self.plasticity.consolidate()

    def report(self) -> EnergyReport:
        self.sync()
        return self.plasticity.report()

    def state_dict(self) -> dict[str, Any]:
        """The plasticity state (energy totals, counters, mistake memory), plain data."""
        self.sync()
        return self.plasticity.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state; the current weights become the reference for what follows."""
        self.plasticity.load_state_dict(state)
        with torch.no_grad():
            for p, ref in zip(self.params, self._reference, strict=True):
                ref.copy_(p.detach())

    def detach(self) -> None:
        """Remove every hook and wrapper; the model and optimizers are as before."""
        self.sync()
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
