"""What the rules need to know about a network: its tensors, layers and wiring.

A *synapse* is one scalar trainable parameter. Each trainable tensor is
described by a :class:`TensorSpec`: its shape, the axis that holds the
postsynaptic units, and (for kernels) the axis that holds the presynaptic ones.
Tensors that share a ``layer`` name form one layer: its kernel plus the tensors
that follow its units (a bias). The :class:`Topology` orders the layers and
says which layer feeds which, so that the path rule can link units across
layers.

Layouts: torch ``Linear``/``Conv`` weights hold units on axis 0 and inputs on
axis 1; Keras ``Dense``/``Conv`` kernels hold units on the last axis and inputs
on the one before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from math import prod


@dataclass(frozen=True)
class TensorSpec:
    """One trainable tensor.

    ``unit_axis`` is the postsynaptic unit axis (``None``: the tensor has no
    unit structure, so unit rules leave it alone). ``input_axis`` marks a
    kernel: the axis of its presynaptic units. ``layer`` groups a kernel with
    its bias.
    """

    name: str
    shape: tuple[int, ...]
    unit_axis: int | None = 0
    input_axis: int | None = None
    layer: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        nd = len(self.shape)
        for fld in ("unit_axis", "input_axis"):
            axis = getattr(self, fld)
            if axis is None:
                continue
            if not -nd <= axis < nd:
                raise ValueError(
                    f"TensorSpec {self.name!r}: {fld}={axis} is out of range for shape "
                    f"{self.shape}; use an axis in [{-nd}, {nd - 1}] or None"
                )
            object.__setattr__(self, fld, axis % nd)
        if self.input_axis is not None and self.input_axis == self.unit_axis:
            raise ValueError(
                f"TensorSpec {self.name!r}: input_axis and unit_axis are both {self.unit_axis}"
            )

    @property
    def size(self) -> int:
        return prod(self.shape)

    @property
    def n_units(self) -> int | None:
        return None if self.unit_axis is None else self.shape[self.unit_axis]


@dataclass(frozen=True)
class Layer:
    """A layer: one kernel and the unit-aligned tensors (bias) that follow it."""

    name: str
    kernel: int
    followers: tuple[int, ...]
    n_units: int
    n_inputs: int


@dataclass(frozen=True)
class Topology:
    """The tensors of a network, their layers in order, and the layer wiring.

    ``adjacency`` lists ``(presynaptic layer, postsynaptic layer)`` pairs. By
    default consecutive layers are chained. A triple ``(pre, post, spread)``
    says that each presynaptic unit feeds ``spread`` consecutive inputs of
    ``post``: a channel-major flatten, as torch's ``conv -> flatten -> linear``
    (unit ``c`` feeds inputs ``c * spread`` to ``(c + 1) * spread - 1``).
    ``outputs`` names the output layers, whose units are always selected; by
    default, the layers with no outgoing edge. Unit rules act on the other
    layers, the hidden ones.
    """

    tensors: tuple[TensorSpec, ...]
    layers: tuple[Layer, ...] = field(init=False)
    edges: tuple[tuple[str, str], ...] = field(init=False)
    outputs: tuple[str, ...] = field(init=False)
    spreads: tuple[tuple[str, str, int], ...] = field(init=False)

    def __init__(
        self,
        tensors: Sequence[TensorSpec],
        adjacency: Sequence[tuple[str, str] | tuple[str, str, int]] | None = None,
        outputs: Sequence[str] | None = None,
    ) -> None:
        tensors = tuple(tensors)
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            raise ValueError(f"Topology: tensor names must be unique, got {names}")
        object.__setattr__(self, "tensors", tensors)
        layers = _group_layers(tensors)
        object.__setattr__(self, "layers", layers)
        if adjacency is None:
            adjacency = [(a.name, b.name) for a, b in zip(layers, layers[1:], strict=False)]
        known = {layer.name for layer in layers}
        edges: list[tuple[str, str]] = []
        spreads: list[tuple[str, str, int]] = []
        for edge in adjacency:
            if len(edge) not in (2, 3):
                raise ValueError(
                    f"Topology.adjacency entries are (pre, post) or (pre, post, spread), "
                    f"got {edge!r}"
                )
            pre, post = str(edge[0]), str(edge[1])
            for name in (pre, post):
                if name not in known:
                    raise ValueError(
                        f"Topology.adjacency names unknown layer {name!r}; "
                        f"layers are {sorted(known)}"
                    )
            if len(edge) == 3:
                spread = edge[2]
                if isinstance(spread, bool) or not isinstance(spread, int) or spread < 1:
                    raise ValueError(
                        f"Topology.adjacency: the spread of ({pre!r}, {post!r}) must be an "
                        f"integer >= 1, got {spread!r}"
                    )
                if spread > 1:
                    spreads.append((pre, post, spread))
            edges.append((pre, post))
        object.__setattr__(self, "edges", tuple(edges))
        object.__setattr__(self, "spreads", tuple(spreads))
        if outputs is None:
            feeding = {pre for pre, _ in self.edges}
            outputs = [layer.name for layer in layers if layer.name not in feeding]
        unknown = [name for name in outputs if name not in known]
        if unknown:
            raise ValueError(
                f"Topology.outputs names unknown layers {unknown}; layers are {sorted(known)}"
            )
        object.__setattr__(self, "outputs", tuple(outputs))

    @classmethod
    def chain(cls, tensors: Sequence[TensorSpec]) -> Topology:
        """Layers in order, the last one the output; consecutive layers are linked for
        the path rule only where the sizes match (conv -> flatten -> dense is not)."""
        t = cls(tensors, adjacency=[])
        edges = [
            (a.name, b.name)
            for a, b in zip(t.layers, t.layers[1:], strict=False)
            if a.n_units == b.n_inputs
        ]
        return cls(tensors, edges, outputs=[t.layers[-1].name] if t.layers else [])

    def unlinked(self) -> list[tuple[str, str]]:
        """Consecutive layers the path rule does not link."""
        linked = set(self.edges)
        pairs = zip(self.layers, self.layers[1:], strict=False)
        return [(a.name, b.name) for a, b in pairs if (a.name, b.name) not in linked]

    def layer(self, name: str) -> Layer:
        return next(layer for layer in self.layers if layer.name == name)

    @property
    def hidden(self) -> tuple[Layer, ...]:
        """The layers that are not outputs; unit rules select units here."""
        return tuple(layer for layer in self.layers if layer.name not in self.outputs)

    def presynaptic(self, layer: Layer) -> Layer | None:
        """The layer whose units are ``layer``'s inputs, for the path rule."""
        pres = [pre for pre, post in self.edges if post == layer.name]
        if not pres:
            return None
        if len(pres) > 1:
            raise ValueError(
                f"Topology: layer {layer.name!r} has several inputs {pres}; the path rule "
                "links one presynaptic layer per kernel. Pass adjacency= with one edge per layer."
            )
        pre = self.layer(pres[0])
        spread = self.spread(pre.name, layer.name)
        if pre.n_units * spread != layer.n_inputs:
            fed = f"{pre.n_units} units" + (f" x spread {spread}" if spread > 1 else "")
            raise ValueError(
                f"Topology: layer {pre.name!r} has {fed} but layer {layer.name!r} takes "
                f"{layer.n_inputs} inputs, so the path rule cannot link them. Pass "
                "adjacency= without that edge (its inputs then count as always selected), "
                "or with the spread (pre, post, inputs per unit) of a flatten."
            )
        return pre

    def spread(self, pre: str, post: str) -> int:
        """How many consecutive inputs of ``post`` each unit of ``pre`` feeds (1: one)."""
        return next((s for a, b, s in self.spreads if (a, b) == (pre, post)), 1)

    @classmethod
    def mlp(cls, sizes: Sequence[int], *, bias: bool = True, layout: str = "torch") -> Topology:
        """A dense stack ``sizes[0] -> sizes[1] -> ...`` named ``layer{i}.weight/.bias``.

        ``layout="torch"`` gives ``(out, in)`` weights, ``"keras"`` ``(in, out)`` kernels.
        """
        if layout not in ("torch", "keras"):
            raise ValueError(f"Topology.mlp: layout must be 'torch' or 'keras', got {layout!r}")
        specs = []
        for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:], strict=False)):
            shape, unit, inp = ((n_out, n_in), 0, 1) if layout == "torch" else ((n_in, n_out), 1, 0)
            specs.append(TensorSpec(f"layer{i}.weight", shape, unit, inp, f"layer{i}"))
            if bias:
                specs.append(TensorSpec(f"layer{i}.bias", (n_out,), 0, None, f"layer{i}"))
        return cls(specs)


def _group_layers(tensors: tuple[TensorSpec, ...]) -> tuple[Layer, ...]:
    order: list[str] = []
    members: dict[str, list[int]] = {}
    for i, t in enumerate(tensors):
        if t.layer is None:
            continue
        if t.unit_axis is None:
            raise ValueError(
                f"TensorSpec {t.name!r} belongs to layer {t.layer!r} but has no unit_axis"
            )
        if t.layer not in members:
            order.append(t.layer)
            members[t.layer] = []
        members[t.layer].append(i)
    layers = []
    for name in order:
        idx = members[name]
        kernels = [i for i in idx if tensors[i].input_axis is not None]
        if len(kernels) != 1:
            raise ValueError(
                f"Topology: layer {name!r} needs exactly one kernel (a tensor with input_axis), "
                f"found {len(kernels)}"
            )
        k = kernels[0]
        kernel = tensors[k]
        n_units = kernel.shape[kernel.unit_axis]  # type: ignore[index]
        for i in idx:
            if tensors[i].n_units != n_units:
                raise ValueError(
                    f"Topology: {tensors[i].name!r} has {tensors[i].n_units} units on its unit "
                    f"axis but kernel {kernel.name!r} of layer {name!r} has {n_units}"
                )
        n_inputs = kernel.shape[kernel.input_axis]  # type: ignore[index]
        followers = tuple(i for i in idx if i != k)
        layers.append(Layer(name, k, followers, n_units, n_inputs))
    return tuple(layers)
