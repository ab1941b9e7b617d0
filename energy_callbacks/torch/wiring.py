"""The wiring of a torch model, read off the autograd graph of a real forward pass.

Unit rules need to know which layers are hidden (their output feeds another
layer) and which are outputs; the path rule also needs to know which units of
one layer are the inputs of the next. Registration order says neither, so a
:class:`WiringProbe` watches the layers during training forward passes and
:func:`resolve` reads the wiring off the autograd graph:

- layer ``A`` *feeds* layer ``B`` when ``B``'s input depends on ``A``'s output in
  any way (through residual sums, norms, attention, anything);
- ``A`` is *linked* to ``B`` for the path rule only when ``B``'s input is ``A``'s
  output passed through unit-wise operations alone (activations, dropout,
  batch norm, pooling, scaling) and the unit axes line up, or through one
  channel-major flatten after a convolution (then each channel feeds a block of
  inputs). That is the wiring the rule can prove.

A path rule refuses (ValueError, naming the operation) a hidden layer that
feeds another trainable layer through anything else; ``adjacency=`` states the
wiring instead. The graph is read once, and again after new parameters join.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from math import prod
from typing import Any

import torch
from torch import nn

from ..core import TensorSpec, Topology
from .layers import (
    EMBEDDING_TYPES,
    LINEAR_TYPES,
    TRANSPOSED_TYPES,
    layer_kernels,
)

UNITWISE = frozenset(
    f"{name}Backward0"
    for name in (
        "Relu LeakyRelu Gelu Silu Elu Celu Selu Hardtanh Hardswish Hardsigmoid Mish Softplus "
        "Tanh Sigmoid LogSigmoid Threshold PreluKernel RreluWithNoise NativeDropout Mul Div Neg "
        "Clone ToCopy Alias Add Sub NativeBatchNorm CudnnBatchNorm MiopenBatchNorm "
        "MaxPool2DWithIndices MaxPool3DWithIndices AvgPool2D AvgPool3D AdaptiveAvgPool2D "
        "AdaptiveAvgPool3D AdaptiveMaxPool2D AdaptiveMaxPool3D"
    ).split()
) | {"MaxPool1DWithIndicesBackward0", "AvgPool1DBackward0"}
"""Autograd nodes that keep every unit's value in its own place (with parameters or
constants as further operands; two computed operands are a mix, not unit-wise)."""

FLATTEN = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"})

ROWS_NOT_OUTPUTS = "its units are gate rows, not its outputs"


@dataclass(frozen=True)
class Site:
    """One module call's place in the wiring.

    ``inputs`` maps call arguments (position, keyword) to the layers they feed,
    read along ``in_dim``; ``output`` lists the layers whose units make up the
    call's (first) output along ``out_dim``; ``internal`` are feeds inside the
    module. ``aligned`` is False when the output is not the layers' units.
    """

    inputs: tuple[tuple[int, str, tuple[str, ...]], ...]
    output: tuple[str, ...]
    in_dim: int
    out_dim: int
    internal: tuple[tuple[str, str], ...] = ()
    aligned: bool = True
    internal_via: str = ""


def site_of(module: nn.Module, name: str) -> Site | None:
    """Where a module's layers meet the data it is called with (None: it holds none)."""
    kernels = [lk.layer for lk in layer_kernels(module, name)]
    if not kernels:
        return None
    if isinstance(module, LINEAR_TYPES + TRANSPOSED_TYPES):
        dim = -1 if isinstance(module, nn.Linear) else 1
        return Site(((0, "input", (kernels[0],)),), (kernels[0],), dim, dim)
    if isinstance(module, EMBEDDING_TYPES):
        return Site((), (kernels[0],), -1, -1)
    if isinstance(module, nn.RNNBase):
        depth = module.num_layers
        per = len(kernels) // depth
        rows = [kernels[k * per : (k + 1) * per] for k in range(depth)]
        internal = tuple(
            (a, b) for lo, hi in zip(rows, rows[1:], strict=False) for a in lo for b in hi
        )
        site = Site(((0, "input", tuple(rows[0])),), tuple(rows[-1]), -1, -1, internal, False)
        return dataclasses.replace(site, internal_via="through the recurrence")
    if isinstance(module, nn.MultiheadAttention):
        out = f"{name}.out_proj" if name else "out_proj"
        args = ("query", "key", "value")
        if len(kernels) == 1:
            feeds = tuple((i, a, (kernels[0],)) for i, a in enumerate(args))
        else:
            feeds = tuple((i, a, (k,)) for i, (a, k) in enumerate(zip(args, kernels, strict=True)))
        internal = tuple((k, out) for k in kernels)
        return Site(feeds, (out,), -1, -1, internal, internal_via="through the attention weights")
    return None


@dataclass
class _Call:
    site: Site
    inputs: list[tuple[str, Any, tuple[int, ...]]]  # (layer, autograd node, input shape)
    output: tuple[Any, tuple[int, ...]] | None  # (autograd node, output shape)


@dataclass
class WiringProbe:
    """Forward hooks on every module holding layers; records training calls only.

    Each layer keeps its last few calls (a cell called at every time step needs
    no more); :meth:`take` hands them over and starts afresh.
    """

    model: nn.Module
    keep_calls: int = 8
    _calls: list[_Call] = field(default_factory=list)
    _per_site: dict[int, int] = field(default_factory=dict)
    _handles: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name, module in self.model.named_modules():
            site = site_of(module, name)
            if site is not None:
                hook = self._hook(site)
                self._handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def _hook(self, site: Site) -> Any:
        def record(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
        ) -> None:
            if not torch.is_grad_enabled():
                return
            n = self._per_site.get(id(site), 0)
            if n >= self.keep_calls:
                return
            self._per_site[id(site)] = n + 1
            inputs = []
            for pos, key, layers in site.inputs:
                value = args[pos] if pos < len(args) else kwargs.get(key)
                node, shape = _node(value)
                for layer in layers:
                    inputs.append((layer, node, shape))
            first = out[0] if isinstance(out, (tuple, list)) else out
            node, shape = _node(first)
            self._calls.append(_Call(site, inputs, None if node is None else (node, shape)))

        return record

    def take(self) -> list[_Call]:
        calls, self._calls, self._per_site = self._calls, [], {}
        return calls

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _node(value: Any) -> tuple[Any, tuple[int, ...]]:
    data = getattr(value, "data", None) if isinstance(value, nn.utils.rnn.PackedSequence) else value
    if isinstance(data, torch.Tensor) and data.grad_fn is not None:
        return data.grad_fn, tuple(data.shape)
    return None, ()


def resolve(
    specs: Sequence[TensorSpec], calls: Iterable[_Call], used: set[str], *, path: bool
) -> Topology:
    """The topology of ``specs`` from observed calls. ``used`` names the layers that
    learned this step: each must have been seen. Raises ValueError where the unit
    rules cannot know a layer's place, or ``path`` a link it cannot prove."""
    calls = list(calls)
    layers = {layer.name: layer for layer in Topology(specs, adjacency=[]).layers}
    produced: dict[int, tuple[Any, Site, tuple[int, ...]]] = {}
    for call in calls:
        if call.output is not None:
            node, shape = call.output
            produced[id(node)] = (node, call.site, shape)
    ancestry = _Ancestry(produced)
    seen: set[str] = set()
    unaligned = {name for call in calls if not call.site.aligned for name in call.site.output}
    inside = {edge: call.site.internal_via for call in calls for edge in call.site.internal}
    feeds: set[tuple[str, str]] = set()
    proofs: dict[str, list[tuple[str, int] | str]] = {}
    for call in calls:
        seen.update(call.site.output)
        seen.update(a for edge in call.site.internal for a in edge)
        feeds.update(call.site.internal)
        for layer, node, shape in call.inputs:
            seen.add(layer)
            if node is None:
                continue
            for pre in ancestry.of(node):
                feeds.add((pre, layer))
            proofs.setdefault(layer, []).append(_prove(node, shape, call.site, produced, layers))
    unseen = sorted(used - seen)
    if unseen:
        raise ValueError(
            f"units=: layers {unseen} learned but were not seen running in the forward pass "
            "(their module was not called: functional use of its weights, or torch.compile), "
            "so whether they are hidden or outputs is unknown. Pass adjacency=[(pre, post), "
            "...] (layers with no outgoing edge are outputs)."
        )
    hidden = {a for a, b in feeds if a != b}
    outputs = [name for name in layers if name not in hidden]
    edges: list[tuple[str, str, int]] = []
    for layer, found in proofs.items():
        if layer in layers and found and all(f == found[0] for f in found):
            pre = found[0]
            if not isinstance(pre, str) and pre[0] in layers:
                edges.append((pre[0], layer, pre[1]))
    if path:
        linked = {(a, b) for a, b, _ in edges}
        for a, b in sorted(feeds):
            if a == b or a not in layers or b not in layers or (a, b) in linked:
                continue
            why = next((p for p in proofs.get(b, []) if isinstance(p, str)), "")
            if a in unaligned:
                why = ROWS_NOT_OUTPUTS
            elif (a, b) in inside:
                why = inside[(a, b)]
            raise ValueError(
                f"path=True: cannot prove how layer {a!r} feeds layer {b!r}"
                + (f" ({why})" if why else "")
                + ", so the path cannot link their units. Use path=False, or pass "
                "adjacency=[(pre, post), ...] with the links the path should use (inputs of "
                "unlisted links count as always selected)."
            )
    return Topology(specs, [(a, b, s) for a, b, s in edges if a in hidden], outputs)


class _Ancestry:
    """Which layers' outputs an autograd node depends on (memoized, iterative)."""

    def __init__(self, produced: Mapping[int, tuple[Any, Site, tuple[int, ...]]]) -> None:
        self.produced = produced
        self.memo: dict[int, frozenset[str]] = {}
        self._alive: list[Any] = []  # keeps memoized nodes alive, so ids stay unique

    def of(self, start: Any) -> frozenset[str]:
        stack = [(start, False)]
        while stack:
            node, expanded = stack.pop()
            key = id(node)
            if key in self.memo:
                continue
            if key in self.produced:
                self.memo[key] = frozenset(self.produced[key][1].output)
                self._alive.append(node)
                continue
            parents = [p for p, _ in node.next_functions if p is not None]
            if not expanded:
                stack.append((node, True))
                stack.extend((p, False) for p in parents if id(p) not in self.memo)
                continue
            out: set[str] = set()
            for p in parents:
                out |= self.memo.get(id(p), frozenset())
            self.memo[key] = frozenset(out)
            self._alive.append(node)
        return self.memo[id(start)]


def _prove(
    node: Any,
    shape: tuple[int, ...],
    site: Site,
    produced: Mapping[int, tuple[Any, Site, tuple[int, ...]]],
    layers: Mapping[str, Any],
) -> tuple[str, int] | str:
    """``(presynaptic layer, spread)`` if the input is provably unit-wise from one layer,
    else what stands in the way."""
    flattened: list[tuple[int, ...]] = []
    while id(node) not in produced:
        name = type(node).__name__
        if name not in UNITWISE and name not in FLATTEN:
            return f"through {_pretty(name)}"
        computed = [
            p
            for p, _ in node.next_functions
            if p is not None and type(p).__name__ != "AccumulateGrad"
        ]
        if len(computed) != 1:
            return f"{_pretty(name)} of {len(computed)} computed operands"
        if name in FLATTEN:
            flattened.append(tuple(int(s) for s in node._saved_self_sym_sizes))
        node = computed[0]
    _, pre_site, out_shape = produced[id(node)]
    if len(pre_site.output) != 1:
        return "the output of several layers"
    pre = pre_site.output[0]
    if not pre_site.aligned:
        return f"{pre!r}: {ROWS_NOT_OUTPUTS}"
    if pre not in layers:
        return ""
    units = layers[pre].n_units
    if not flattened:
        if len(out_shape) != len(shape) or pre_site.out_dim % len(out_shape) != site.in_dim % len(
            shape
        ):
            return "its unit axis is not the next layer's input axis"
        return (pre, 1)
    sizes = flattened[0]
    if (
        len(flattened) == 1
        and pre_site.out_dim == 1
        and len(shape) == 2
        and len(sizes) >= 3
        and sizes[1] == units
        and prod(sizes[1:]) == shape[1]
    ):
        return (pre, prod(sizes[2:]))
    return "through a reshape other than a channel-major flatten"


def _pretty(node_name: str) -> str:
    return node_name.removesuffix("Backward0").removesuffix("Backward1")
