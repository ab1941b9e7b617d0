"""attach() and AttachedPlasticity: the optimizer step hooks that measure and mask.

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
- **Parameters that join.** Parameters added to an optimizer mid-run (a new
  param group, ``BaseFinetuning.unfreeze_and_add_param_group``) or unfrozen are
  picked up at the next step; the energy so far carries over. A tracked
  parameter that leaves the model (a replaced layer) is an error.
- **Wiring.** Unit rules learn which layers are hidden and, for the path rule,
  which units feed which, from the autograd graph of the training forward pass
  (:mod:`energy_callbacks.torch.wiring`); ``adjacency=`` states it instead.
- **Samples.** A forward hook on the model computes the gate from its output
  (:mod:`energy_callbacks.torch.gate`). The gradient rows of gated-out samples
  are zeroed on every tensor of the forward output, so they add nothing to any
  parameter gradient, and the loss keeps its own normalization. When no sample
  passes, the optimizer step is skipped: no weight, moment or step count changes.
- **Faults.** A step whose update holds NaN/Inf is undone and counted in
  ``report().skipped_steps`` (the first one of each cause warns). Steps a
  ``torch.amp.GradScaler`` skips never reach the hooks: ``handle.watch(scaler)``
  counts them as skipped (Lightning does it under ``16-mixed``).
- **Devices.** CPU tensors in float16/32/64 are processed through zero-copy
  NumPy views; other devices and dtypes use torch ops, and their energy totals
  stay on the device until they are read (a report, a log): a step never waits
  for the device.
- **Synaptic caching** (``Plasticity(caching=...)``): after the masked step,
  the applied change enters the transient store and the store's decay is
  added to the parameters, so the network uses ``w_c + w_e``. Call
  :meth:`AttachedPlasticity.consolidate` when training ends (the Lightning
  callback does, in ``on_train_end``).

Limits: the gate needs the model's ``forward`` to be called with the batch
(``model(x)``), and the loss to be made from that forward's output. Parameters
without a gradient in a step are not read.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..core import EnergyReport, Plasticity, TensorSpec, Topology, checks
from ..core.ops import NumpyOps
from ..core.targets import IGNORE_INDEX
from . import initial, ranks, shards
from .faults import nonfinite_reason, nonfinite_weights, watch_scaler
from .gate import CLOSURE_OPTIMIZERS, OutputGate, refuse_closure_optimizer, skip_empty_steps
from .layers import describe, nothing_to_cover
from .ops import ops_for
from .sharded_ops import Rows, ShardedOps
from .shards import Shards, local, shards_of
from .snapshot import ShapeChanged, Snapshot
from .state_init import makes_state_only
from .wiring import WiringProbe, resolve

__all__ = ["AttachedPlasticity", "attach", "edges", "forget_compiled_hooks", "module_names"]

INITIAL_KEY = "initial"
"""The key of w_0 in :meth:`AttachedPlasticity.state_dict`."""


class AttachedPlasticity:
    """Plasticity attached to a model and its optimizer(s). Made by :func:`attach`."""

    def __init__(
        self,
        model: nn.Module,
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        plasticity: Plasticity,
        *,
        layers: Sequence[str] | None = None,
        adjacency: Sequence[tuple[str, str] | tuple[str, str, int]] | None = None,
        outputs: Callable[[Any], torch.Tensor] | None = None,
        ignore_index: int | None = IGNORE_INDEX,
    ) -> None:
        self.model = model
        self.optimizers = (
            [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
        )
        if plasticity.samples is not None:
            for opt in self.optimizers:
                if isinstance(opt, CLOSURE_OPTIMIZERS):
                    raise ValueError(refuse_closure_optimizer(opt))
        self.plasticity = plasticity
        self._layers = layers
        self._adjacency = None if adjacency is None else [tuple(e) for e in adjacency]
        self.params: list[nn.Parameter] = []
        self.specs: list[TensorSpec] = []
        self._extra: list[nn.Parameter] = []  # tracked although not covered (from a checkpoint)
        self._initial: dict[int, torch.Tensor] = {}  # w_0 per parameter, in host memory
        self._steps: dict[int, tuple[Snapshot, list[int]]] = {}
        self._removers: list[Callable[[], None]] = []
        self._stepped = 0  # optimizer steps that reached the hooks
        self._state_only = False  # this step only makes the optimizer's state
        self._merged = (0, 0)  # (samples seen, learned) when last combined over processes
        self.shards: Shards | None = None  # the processes of sharded (FSDP2) training
        self._nonfinite_weights: set[str] = set()  # parameters warned about in sync()
        units = plasticity.units
        self._probe = WiringProbe(model) if units is not None and adjacency is None else None
        if self._probe is not None:
            self._removers.append(self._probe.remove)
        self._bind()
        for opt in self.optimizers:
            pre = opt.register_step_pre_hook(lambda o, a, k: self._before_step(o))
            post = opt.register_step_post_hook(lambda o, a, k: self._after_step(o))
            self._removers += [pre.remove, post.remove]
        self.gate: OutputGate | None = None
        if plasticity.samples is not None:
            self.gate = OutputGate(model, plasticity, outputs, ignore_index)
            self._removers.append(self.gate.remove)
            for opt in self.optimizers:
                self._removers.append(skip_empty_steps(opt, self.gate))

    # -- which parameters, and how they are wired ------------------------------
    def _signature(self) -> tuple[int, ...]:
        return tuple(
            id(p)
            for opt in self.optimizers
            for group in opt.param_groups
            for p in group["params"]
            if p.requires_grad
        )

    def _bind(self) -> None:
        """Describe the covered parameters, and (re)bind the rules and the snapshots."""
        in_optimizers = [p for o in self.optimizers for g in o.param_groups for p in g["params"]]
        keep = [*self.params, *self._extra]
        specs, params = describe(self.model, in_optimizers, self._layers, keep=keep)
        if not params:
            if not describe(self.model, layers=self._layers)[0]:
                field = "" if self._layers is None else f" layers={self._layers}:"
                raise ValueError(
                    f"attach:{field} nothing to train, as "
                    f"{nothing_to_cover(self.model, self._layers)}. Name modules that hold "
                    "trainable parameters, or unfreeze them."
                )
            raise ValueError(
                "attach: the optimizer(s) step none of the model's trainable parameters"
            )
        now = {id(p): s.name for s, p in zip(specs, params, strict=True)}
        gone = [s.name for s, p in zip(self.specs, self.params, strict=True) if id(p) not in now]
        renamed = [
            f"{s.name} -> {now[id(p)]}"
            for s, p in zip(self.specs, self.params, strict=True)
            if id(p) in now and now[id(p)] != s.name
        ]
        if gone or renamed:
            raise RuntimeError(
                f"plasticity: tracked parameters {gone + renamed} left the model or moved in it "
                "mid-run (a replaced layer?), so their energy cannot be carried on. Change the "
                "model before attaching (or before fit), or detach(), read report(), and attach "
                "again."
            )
        shards = shards_of(params)
        if shards is not None:
            self._refuse_under_shards()
        first = not self.params
        inner = ops_for([local(p) for p in params])
        ops = inner if shards is None else ShardedOps(inner, shards)
        if self._adjacency is not None:
            topology = Topology(specs, self._adjacency)
        else:
            topology = Topology.chain(specs)  # until the forward pass shows the wiring
        if first:
            self.plasticity.setup(topology, ops=ops)
        else:
            self.plasticity.rebind(topology, ops=ops)
        self.ops = ops
        self._use_numpy = isinstance(inner, NumpyOps)
        self.specs, self.params = specs, params
        self.shards = self.plasticity.meter.shares = shards
        if self.plasticity.caching is not None:
            self.plasticity.caching.shares = shards
        for p in params:
            if id(p) not in self._initial:
                self._initial[id(p)] = initial.keep(local(p))
        index = {id(p): i for i, p in enumerate(params)}
        self._steps = {}
        for opt in self.optimizers:
            mine = sorted(
                {index[id(p)] for g in opt.param_groups for p in g["params"] if id(p) in index}
            )
            if mine:
                self._steps[id(opt)] = (Snapshot([params[i] for i in mine], self._use_numpy), mine)
        self._bound = self._signature()
        self._wired = self._probe is None

    def _refuse_under_shards(self) -> None:
        """Refuse, on sharded (FSDP2) parameters, what needs a whole tensor."""
        p = self.plasticity
        if p.units is not None and self._adjacency is None:
            raise ValueError(
                f"attach: the parameters are sharded (FSDP2), and units={p.units!r} needs the "
                "layers' wiring, which cannot be read off a sharded forward pass; pass "
                "adjacency=[(pre, post), ...] (module names), or train unsharded"
            )
        if p.caching is not None and p.caching.scope != "synapse":
            raise ValueError(
                f"attach: the parameters are sharded (FSDP2), and caching=Caching(scope="
                f"{p.caching.scope!r}) consolidates on a whole tensor's store; use "
                "scope='synapse' (each process steps its share of the store), or train "
                "unsharded"
            )

    def _wire(self) -> None:
        """Read the wiring off this step's forward pass; refuse what unit rules cannot use."""
        assert self._probe is not None and self.plasticity.units is not None
        used = {
            s.layer
            for s, p in zip(self.specs, self.params, strict=True)
            if s.layer is not None and s.input_axis is not None and p.grad is not None
        }
        if not used:
            return  # nothing learned yet: wait for a step that does
        units = self.plasticity.units
        topology = resolve(self.specs, self._probe.take(), used, path=units.path)
        if not topology.hidden:
            names = [lyr.name for lyr in topology.layers]
            every, _ = describe(self.model, keep=list(self.model.parameters()))
            if len({s.layer for s in every if s.input_axis is not None}) <= len(names):
                raise ValueError(
                    f"units={units!r}: the trainable layers {names} are all outputs (no layer "
                    "feeds another), so the unit rule would change nothing. Drop units=."
                )
            warnings.warn(
                f"units={units!r}: the trainable layers {names} are all outputs; the frozen "
                "layers that feed them keep the unit rule idle until they train (they are "
                "picked up when unfrozen)",
                RuntimeWarning,
                stacklevel=4,
            )
        self.plasticity.rebind(topology)
        self._wired = True

    # -- the step ----------------------------------------------------------
    def _before_step(self, opt: torch.optim.Optimizer) -> None:
        self._state_only = makes_state_only(opt)
        if self._state_only:
            return  # a checkpoint reader making the optimizer's state: not a training step
        self._stepped += 1
        if self._signature() != self._bound:
            self._bind()
        entry = self._steps.get(id(opt))
        if entry is not None:
            try:
                entry[0].take()
            except ShapeChanged as exc:
                name = self.specs[entry[1][exc.index]].name
                raise RuntimeError(
                    f"plasticity: parameter {name!r} changed shape from {exc.old} to {exc.new} "
                    "mid-run (its data was replaced), so its energy cannot be carried on. "
                    "Resize the model before attaching (or before fit), or detach(), read "
                    "report(), and attach again."
                ) from None

    def _after_step(self, opt: torch.optim.Optimizer) -> None:
        if self._state_only:
            self._state_only = False
            return
        entry = self._steps.get(id(opt))
        if entry is None:
            return
        if not self._wired:
            self._wire()
        elif self._probe is not None:
            self._probe.take()  # the wiring is known: drop this step's records
        snap, mine = entry
        if not self._use_numpy:
            self._step_on_device(snap, mine)
        elif all(snap.fused) and self.plasticity.meter.alpha == 1.0:
            self._step_fused(snap, mine)
        else:
            self._step_numpy(snap, mine)

    def _proposed(self, mine: list[int], values: Sequence[Any]) -> list[Any]:
        proposed: list[Any] = [None] * len(self.params)
        for i, v in zip(mine, values, strict=True):
            proposed[i] = v
        return proposed

    def _rows(self, proposed: list[Any]) -> list[Any]:
        """Sharded: each proposal as the rules see it, this process's rows of a tensor."""
        ops = self.ops
        if not isinstance(ops, ShardedOps):
            return proposed
        return [
            None if v is None else Rows(v, s.shape, ops.span(s.shape)[0])
            for v, s in zip(proposed, self.specs, strict=True)
        ]

    def _local(self, masks: Sequence[Any]) -> list[Any]:
        """Sharded: each mask as this process's rows."""
        ops = self.ops
        if not isinstance(ops, ShardedOps):
            return list(masks)
        return [ops.local_mask(m, s.shape) for m, s in zip(masks, self.specs, strict=True)]

    def _step_numpy(self, snap: Snapshot, mine: list[int]) -> None:
        plasticity = self.plasticity
        deltas, stats = snap.deltas()
        proposed = self._proposed(mine, deltas)
        current = [False] * len(mine)  # snapshots that drop() brought up to date
        ops = self.ops
        finite = all(
            d is None or (ops.isfinite_all(d) if s is None else math.isfinite(s[0]))
            for d, s in zip(deltas, stats, strict=True)
        )
        if self.shards is not None:
            finite = self.shards.all(finite)  # a step is undone on every process or none
        if not finite:
            snap.undo()
            self._count_skipped(snap)
            return
        if plasticity.restricts:
            masks = self._local(plasticity.masks(self._rows(proposed)))
            for j, i in enumerate(mine):
                if proposed[i] is not None and masks[i] is not None:
                    stats[j] = snap.drop(j, masks[i])
                    current[j] = snap.fused[j]
        # The deltas now hold the real applied change: mask * dw. record() still checks
        # its sums (finite entries whose float64 sum overflows are skipped too).
        totals = self._proposed(mine, stats)
        if plasticity.record(proposed, displacement=False, totals=totals):
            snap.settle(current)
            if plasticity.caching is not None:
                self._cache(snap, mine, proposed)
        else:
            snap.undo()

    def _cache(self, snap: Snapshot, mine: list[int], applied: list[Any]) -> None:
        """Synaptic caching: the applied changes enter the store; its decay goes into the
        parameters (the next pre-hook then copies them afresh)."""
        decay = self._local(self.plasticity.cache(self._rows(applied)))
        with torch.no_grad():
            for j, i in enumerate(mine):
                d = decay[i]
                if d is None:
                    continue
                w = local(self.params[i])
                w.add_(torch.from_numpy(d) if self._use_numpy else d)
                snap.current[j] = False

    def _step_fused(self, snap: Snapshot, mine: list[int]) -> None:
        """A step on fused tensors (alpha = 1): the rules see lazy differences, and one
        pass per tensor applies its mask (if any), measures the step and writes the
        next snapshot. Measuring only, or the approximate top fraction, never writes
        the difference out."""
        plasticity = self.plasticity
        diffs = snap.differences()
        proposed = self._proposed(mine, diffs)
        masks = (
            self._local(plasticity.masks(self._rows(proposed)))
            if plasticity.restricts
            else [None] * len(proposed)
        )
        caching = plasticity.caching is not None
        # caching reads the applied change against the old snapshot: no refresh yet;
        # sharded, the processes agree first that nobody undoes the step
        sharded = self.shards is not None
        applied = snap.apply(diffs, [masks[i] for i in mine], refresh=not (caching or sharded))
        if self.shards is not None and not self.shards.all(applied is not None):
            if applied is not None:
                snap.undo()  # another process's shard held NaN/Inf
            applied = None
        if applied is None:  # NaN/Inf: the weights are back as before the step
            self._count_skipped(snap)
            return
        if sharded and not caching:
            snap.refresh(applied)
        # record() reads only the totals here (alpha = 1, no displacement).
        totals = self._proposed(mine, applied)
        plasticity.record(proposed, check_finite=False, displacement=False, totals=totals)
        if caching:  # the applied change w - before, read a block at a time
            snap.settle([False] * len(mine))
            self._cache(snap, mine, self._proposed(mine, snap.differences()))
        else:
            snap.settle([s is not None for s in applied])

    def _step_on_device(self, snap: Snapshot, mine: list[int]) -> None:
        """Torch ops (GPU, bf16): mask, measure and undo a non-finite step on the device;
        the totals join the meter unread, so the step never waits for the device.
        No delta is written: the rules, the blend and the totals read ``w - before``
        chunk by chunk."""
        plasticity = self.plasticity
        stepped = [p.grad is not None for p in snap.params]
        if not any(stepped):
            return
        alpha = plasticity.meter.alpha
        if plasticity.restricts:
            # the rules read each difference chunk by chunk; the blend writes no delta
            proposed = self._proposed(mine, snap.device_differences())
            masks = self._local(plasticity.masks(self._rows(proposed)))
            totals, proposal = snap.blend_on_device([masks[i] for i in mine], alpha)
            ok = torch.isfinite(proposal)
        else:
            totals = snap.device_totals(alpha)
            # a NaN/Inf in the step turns its M1 NaN/Inf
            ok = torch.isfinite(torch.stack([t[0] for t in totals if t is not None]).sum())
        if self.shards is not None:
            ok = self.shards.all(ok)  # a step is undone on every process or none
        snap.undo_unless(ok, stepped)
        device = snap.before[0].device
        zero = torch.zeros((), dtype=torch.float64, device=device)
        none = torch.zeros((), dtype=torch.int64, device=device)
        parts = [(zero, zero, none)] * len(self.params)
        for i, t in zip(mine, totals, strict=True):
            if t is not None:
                parts[i] = t
        m1, m_alpha, m0 = (torch.stack([p[k] for p in parts]) for k in range(3))
        plasticity.step_count += 1
        plasticity.meter.record_deferred(
            torch.where(ok, m1, 0.0),
            torch.where(ok, m_alpha, 0.0),
            m0 * ok,
            (~ok).to(torch.int64),
        )
        snap.settle([False] * len(mine))
        if plasticity.caching is not None and bool(ok):  # caching reads its figures: one sync
            # the applied change, read a block at a time: the snapshot is still the old
            self._cache(snap, mine, self._proposed(mine, snap.device_differences()))

    def _count_skipped(self, snap: Snapshot) -> None:
        """Count a step that was undone for NaN/Inf; the first one of each cause warns."""
        names = {id(p): s.name for s, p in zip(self.specs, self.params, strict=True)}
        bad = nonfinite_weights(
            [names[id(p)] for p in snap.params], [local(p) for p in snap.params]
        )
        self._nonfinite_weights.update(bad)  # sync() need not warn about them again
        self.plasticity.meter.skip_nonfinite(reason=nonfinite_reason(bad))

    def watch(self, scaler: Any) -> None:
        """Count the optimizer steps a ``torch.amp.GradScaler`` skips (inf/NaN gradients
        at this loss scale) as skipped steps: they cost nothing and change no weight.

        Without this the hooks never see those steps (the scaler does not call
        ``optimizer.step``). Lightning's callback watches its precision plugin's scaler.
        With a sample gate, a batch nobody learns from then still runs its backward
        pass (into zero gradients): the scaler fails on parameters without gradients.
        """
        gate = self.gate
        if gate is not None:
            gate.detach_when_empty = False
        self._removers.append(
            watch_scaler(
                scaler,
                self.optimizers,
                stepped=lambda: self._stepped,
                gate_skips=lambda: 0 if gate is None else gate.empty_steps,
                count=lambda: self.plasticity.meter.skip_nonfinite(reason=""),
            )
        )

    def sync(self) -> None:
        """Measure the net change ``w_T - w_0`` of every parameter (M1_min, M0_min).

        A parameter holding NaN/Inf is left out (its M1_min and M0_min stay at their
        last finite values) and is warned about once.
        """
        meter = self.plasticity.meter
        bad = []
        with torch.no_grad():
            for i, p in enumerate(self.params):
                m1_min, m0_min = initial.totals(local(p), self._initial[id(p)])
                if not math.isfinite(m1_min):
                    bad.append(self.specs[i].name)
                    continue
                meter.set_net(i, m1_min, m0_min)
        new = [name for name in bad if name not in self._nonfinite_weights]
        if new:
            self._nonfinite_weights.update(new)
            warnings.warn(
                f"plasticity: parameters {new} hold NaN/Inf; their net displacement "
                "(M1_min) stays at its last finite value until they are finite again",
                RuntimeWarning,
                stacklevel=3,
            )

    # -- public --------------------------------------------------------------
    def gate_batch(self, targets: Any, sample_ids: Any = None) -> None:
        """Give the targets (and ids) of the batch whose forward pass comes next."""
        if self.gate is None:
            raise RuntimeError("gate_batch: this Plasticity has no sample gate (samples=None)")
        self.gate.arm(targets, sample_ids)

    def energy(self) -> tuple[Any, Any]:
        """``(M1, M0)`` so far without waiting for the device: device scalars on the
        torch-ops path (read them when you log), floats otherwise."""
        if self.plasticity.caching is not None:
            return self.plasticity.totals()  # consolidation + maintenance, on the host
        pending = self.plasticity.meter.pending_totals()
        return pending if pending is not None else self.plasticity.meter.totals()

    def consolidate(self) -> None:
        """Synaptic caching: consolidate the whole transient store (the end of training).

        The weights do not change (they hold ``w_c + w_e`` already); the store's
        ``sum |w_e|`` is paid as consolidation energy. Needs ``Plasticity(caching=...)``.
        """
        self.plasticity.consolidate()

    def report(self) -> EnergyReport:
        self.sync()
        return self.plasticity.report()

    def merge_samples(self) -> None:
        """Data-parallel or sharded training: add up the samples every process saw and
        learned since the last merge, and OR the mistake memories together, so that
        every process holds the totals (a collective). The callbacks call it at each
        epoch's end; under FSDP2, :meth:`state_dict` calls it too."""
        if ranks.world_size() < 2:
            return
        device = self.shards.device if self.shards is not None else local(self.params[0]).device
        ranks.merge_samples(self.plasticity, self._merged, device)
        self._merged = (self.plasticity.samples_seen, self.plasticity.samples_learned)

    def state_dict(self) -> dict[str, Any]:
        """The plasticity state (energy totals, counters, mistake memory), plain data,
        and ``initial``: w_0 of each measured tensor (host tensors, in the state's
        ``energy.names`` order), for M1_min after a resume.

        Under FSDP2 this is a collective: the totals and the samples are summed over
        the processes (:meth:`merge_samples`), and each w_0 is a ``DTensor`` sharded
        like its parameter, so that ``torch.distributed.checkpoint`` saves every
        process's rows and the rest once.
        """
        if self.shards is not None:
            self.merge_samples()
        self.sync()
        state = self.plasticity.state_dict()
        by_name = {s.name: p for s, p in zip(self.specs, self.params, strict=True)}
        kept = []
        for name in state["energy"]["names"]:
            p = by_name[name]
            w0 = self._initial[id(p)]
            kept.append(shards.like(p, w0) if self.shards is not None else w0)
        state[INITIAL_KEY] = kept
        caching = state.get("caching")
        if self.shards is not None and caching:  # each process's share of the store
            caching["store"] = [
                shards.like(
                    by_name[n], shards.own_rows(self.shards, by_name[n], torch.as_tensor(a))
                )
                for n, a in zip(caching["names"], caching["store"], strict=True)
            ]
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state, w_0 included (a state without it gives w_0 as the current
        weights minus its saved displacement, in float64).

        Tensors the state measured that are not covered now (a layer unfrozen
        mid-run, frozen again at the start of the resumed fit) are tracked again,
        so their energy carries on.
        """
        covered = {s.name for s in self.specs}
        missing = [str(n) for n in state["energy"]["names"] if str(n) not in covered]
        if missing:
            named = dict(self.model.named_parameters())
            absent = [n for n in missing if n not in named]
            if absent:
                raise ValueError(
                    f"plasticity: the checkpoint measured parameters {absent} that this model "
                    "does not have; resume with the model the checkpoint was taken from"
                )
            self._extra = [named[n] for n in missing]
            self._bind()
        saved = [str(n) for n in state["energy"]["names"]]
        by_name = {s.name: p for s, p in zip(self.specs, self.params, strict=True)}
        kept = state.get(INITIAL_KEY)
        displacement = state["energy"].get("displacement") or [None] * len(saved)
        if kept is None and any(d is None for d in displacement):
            raise ValueError(
                f"plasticity: the state has no {INITIAL_KEY!r} (w_0) for tensors whose net "
                "change it did not accumulate; pass the whole state_dict() it came from"
            )
        caching = state.get("caching")
        if self.shards is not None and caching:  # this process's share of each store
            state = {**state, "caching": dict(caching)}
            state["caching"]["store"] = [
                shards.own_rows(self.shards, by_name[str(n)], s).numpy()
                for n, s in zip(caching["names"], caching["store"], strict=True)
            ]
        self.plasticity.load_state_dict(state)
        self._merged = (self.plasticity.samples_seen, self.plasticity.samples_learned)
        for s, p in zip(self.specs, self.params, strict=True):
            if s.name not in saved:  # tensors the state did not measure start here
                self._initial[id(p)] = initial.keep(local(p))
        for j, name in enumerate(saved):
            p = by_name[name]
            if kept is not None:
                w0 = shards.own_rows(self.shards, p, kept[j])
                if tuple(w0.shape) != tuple(local(p).shape):
                    raise ValueError(
                        f"plasticity: w_0 of {name!r} was saved with shape {tuple(w0.shape)}, "
                        f"the model's parameter has {tuple(p.shape)}"
                    )
            else:
                w0 = initial.from_displacement(local(p), displacement[j])
            self._initial[id(p)] = w0
        self.sync()

    def detach(self) -> None:
        """Remove every hook and wrapper; the model and optimizers are as before."""
        self.sync()
        for remove in reversed(self._removers):
            remove()
        self._removers = []


def module_names(layers: Any, field: str = "layers") -> list[str] | None:
    """``layers=`` as a list of module names: one name alone is a list of one."""
    return checks.names(field, layers, "a module name")


def edges(adjacency: Any, field: str = "adjacency") -> list[tuple[Any, ...]] | None:
    """``adjacency=`` as ``(pre, post)`` / ``(pre, post, spread)`` tuples (YAML gives lists)."""
    if adjacency is None:
        return None
    out = []
    listed = isinstance(adjacency, Sequence) and not isinstance(adjacency, str)
    for edge in adjacency if listed else [adjacency]:
        ok = (
            isinstance(edge, Sequence)
            and not isinstance(edge, str)
            and len(edge) in (2, 3)
            and all(isinstance(n, str) for n in edge[:2])
            and (
                len(edge) == 2
                or (isinstance(edge[2], int) and not isinstance(edge[2], bool) and edge[2] >= 1)
            )
        )
        if not ok:
            raise ValueError(
                f"{field} must list [pre, post] or [pre, post, spread] layer links (layer "
                f"names are module names, e.g. 'net.0'; spread an integer >= 1), got {edge!r}"
            )
        out.append(tuple(edge))
    return out


def forget_compiled_hooks() -> None:
    """Clear torch.compile's caches: code compiled before the gate's or the wiring's
    forward hooks were added does not run them (dynamo does not guard on hooks)."""
    warnings.warn(
        "energy_callbacks: the model is compiled (torch.compile); resetting dynamo's caches "
        "so that the compiled code runs the plasticity hooks (the next step recompiles)",
        RuntimeWarning,
        stacklevel=3,
    )
    torch._dynamo.reset()


def _uncompiled(model: nn.Module) -> nn.Module:
    """The module inside a ``torch.compile`` wrapper (its hooks are what runs)."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def attach(
    model: nn.Module,
    optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
    plasticity: Plasticity | None = None,
    **kwargs: Any,
) -> AttachedPlasticity:
    """Apply ``plasticity`` (default: measure only) to every step of ``optimizers``.

    Keyword arguments: ``layers`` (module names to cover), ``adjacency`` (layer
    wiring for the unit rules: ``(pre, post)`` or ``(pre, post, spread)`` pairs;
    by default read off the forward pass), ``outputs`` (forward output -> the
    class scores the gate judges), ``ignore_index`` (target id of entries the
    gate skips, default -100).
    """
    plasticity = plasticity or Plasticity()
    inner = _uncompiled(model)
    if inner is not model and (plasticity.samples is not None or plasticity.units is not None):
        forget_compiled_hooks()
    if "layers" in kwargs:
        kwargs["layers"] = module_names(kwargs["layers"])
    if "adjacency" in kwargs:
        kwargs["adjacency"] = edges(kwargs["adjacency"])
    return AttachedPlasticity(inner, optimizers, plasticity, **kwargs)
