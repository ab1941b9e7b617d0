"""Which Keras variables the rules see, where unit rules find units, and the wiring.

:func:`describe` turns variables into the core's :class:`TensorSpec` list. A
*layer* is a kernel (postsynaptic units on its last axis, inputs on the axis
before) plus the variables that follow its units:

- ``Dense``, ``Conv1D/2D/3D`` (and other layers with a ``kernel`` of rank >= 2 and a
  ``bias``): the kernel's last axis; the bias follows.
- ``SimpleRNN``, ``LSTM``, ``GRU`` cells: each column of ``kernel`` is a unit, one
  gate's pre-activation of one hidden unit (4 per hidden unit for an LSTM, 3 for a
  GRU), as in the torch adapter; ``recurrent_kernel`` and ``bias`` (a GRU's
  ``(2, 3 * units)`` bias too) follow the same columns.
- ``EinsumDense`` (the query, key, value and output projections of
  ``MultiHeadAttention``): its units span several axes ``(heads, key_dim)``, so it has
  no unit axis: unit rules leave it alone; synapse rules and the energy cover it.
- Other variables (normalization scales, embeddings, custom weights) have no unit
  axis either.

:func:`wiring` reads which layers feed which, and which are outputs, off a functional
model's graph (``model.outputs``), through layers without variables (activations,
dropout, reshapes): every layer that produces a model output is an output layer, so a
model with several heads keeps all of their units.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..core import TensorSpec
from . import private

NO_UNIT_AXIS = ("EinsumDense",)
Wiring = tuple[list[tuple[str, str]], list[str]]


def layer_of(v: Any) -> str:
    """The layer a variable belongs to: its path without the last component."""
    return str(v.path).rsplit("/", 1)[0]


def _leaf(v: Any) -> str:
    return str(v.path).rsplit("/", 1)[-1]


def describe(variables: Sequence[Any], kinds: Mapping[int, str] | None = None) -> list[TensorSpec]:
    """TensorSpecs of Keras variables. ``kinds`` maps ``id(variable)`` to the class name
    of the layer that owns it (see :func:`owner_kinds`); without it, layers are read
    from the variables' names alone."""
    kinds = kinds or {}
    kernels = {
        layer_of(v)
        for v in variables
        if _leaf(v) == "kernel" and len(v.shape) >= 2 and kinds.get(id(v)) not in NO_UNIT_AXIS
    }
    specs = []
    for v in variables:
        layer, leaf, shape = layer_of(v), _leaf(v), tuple(v.shape)
        if layer in kernels and leaf == "kernel":
            specs.append(TensorSpec(v.path, shape, -1, -2, layer))
        elif layer in kernels and leaf == "recurrent_kernel":
            specs.append(TensorSpec(v.path, shape, -1, None, layer))
        elif layer in kernels and leaf == "bias" and len(shape) in (1, 2):
            specs.append(TensorSpec(v.path, shape, -1, None, layer))
        else:
            specs.append(TensorSpec(v.path, shape, None))
    return specs


def owner_kinds(model: Any) -> dict[int, str]:
    """``id(variable) -> class name`` of the innermost layer holding each variable of
    ``model``."""
    kinds: dict[int, str] = {}
    for layer in private.sublayers(model):  # outer layers first: inner ones overwrite
        for v in layer.weights:
            kinds[id(v)] = type(layer).__name__
    return kinds


def wiring(model: Any, specs: Sequence[TensorSpec]) -> Wiring | None:
    """``(links, outputs)`` between the layers of ``specs``, from a functional model's
    graph: ``(pre, post)`` when ``pre``'s output reaches ``post`` through layers without
    variables (and its units are ``post``'s inputs, for the path rule), and the layers
    that produce a model output. None when the model has no graph to read (subclassed)."""
    outputs = private.graph_outputs(model)
    if outputs is None:
        return None
    names = {s.layer for s in specs if s.layer is not None}
    units = {s.layer: s.shape[s.unit_axis] for s in specs if s.input_axis is not None}
    inputs = {s.layer: s.shape[s.input_axis] for s in specs if s.input_axis is not None}
    name_of: dict[int, str | None] = {}

    def layer_name(layer: Any) -> str | None:
        if id(layer) not in name_of:
            mine = {layer_of(v) for v in layer.trainable_weights} & names
            name_of[id(layer)] = min(mine) if len(mine) == 1 else None
        return name_of[id(layer)]

    def producers(tensors: Iterable[Any], seen: set[int]) -> set[str]:
        """The nearest layers of ``specs`` behind ``tensors``."""
        found: set[str] = set()
        for t in tensors:
            step = private.producer(t)
            if step is None or id(step[0]) in seen:
                continue
            layer, inbound = step
            seen.add(id(layer))
            name = layer_name(layer)
            if name is not None:
                found.add(name)
            elif not layer.trainable_weights:
                found |= producers(inbound, seen)
            else:  # a model used as a layer: what makes its outputs
                inner = private.graph_outputs(layer)
                found |= producers(inner or [], seen)
        return found

    output_layers = producers(outputs, set())
    if not output_layers:
        return None  # nothing readable (a layer with weights of its own kind): use the order
    links = []
    for layer in private.sublayers(model):
        post = layer_name(layer)
        if post is None:
            continue
        for inbound in private.inbound_tensors(layer):
            for pre in sorted(producers(inbound, set())):
                if pre != post and units.get(pre) == inputs.get(post):
                    links.append((pre, post))
    return sorted(set(links)), sorted(output_layers)
