"""Which tensors of a torch model the rules see, and where unit rules find units.

:func:`describe` turns a model into the core's :class:`TensorSpec` list. A
*layer* is a kernel (a tensor with postsynaptic units and presynaptic inputs)
plus the tensors that follow its units. The unit axis of each kind:

- ``Linear``, ``Conv1d/2d/3d``: ``weight`` rows (axis 0, inputs on axis 1); the bias follows.
- ``ConvTranspose1d/2d/3d`` (``groups=1``): ``weight`` axis 1 (inputs on axis 0).
- ``Embedding``, ``EmbeddingBag``: the embedding dimensions, ``weight`` axis 1; the
  token rows are its inputs (an embedding is a linear layer on one-hot tokens).
- ``RNN``, ``LSTM``, ``GRU``: one layer per depth and direction (``lstm.l0``,
  ``lstm.l0_reverse``). Each row of ``weight_ih`` is a unit: one gate's
  pre-activation of one hidden unit (4 per hidden unit for an LSTM, 3 for a GRU),
  with its own incoming synapses and error signal. ``weight_hh``, ``bias_ih`` and
  ``bias_hh`` follow the same rows. An LSTM's projection ``weight_hr`` has no unit axis.
- ``MultiheadAttention``: ``in_proj_weight`` rows (the query, key and value
  features; ``mha.in_proj``), with ``in_proj_bias``; separate ``q/k/v_proj_weight``
  are three layers. ``out_proj`` is a ``Linear``.

Other parameters (normalization scales and shifts, positional embeddings,
custom ``nn.Parameter`` tensors) have no unit axis: unit rules leave their
updates as they are; synapse rules and the energy cover them like every tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from ..core import TensorSpec

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Modules whose ``weight`` holds (units, inputs, ...) and whose bias follows the units."""

TRANSPOSED_TYPES: tuple[type[nn.Module], ...] = (
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
EMBEDDING_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)


@dataclass(frozen=True)
class LayerKernel:
    """How one layer of a module is laid out: its kernel, the tensors that follow it."""

    layer: str
    kernel: str
    unit_axis: int
    input_axis: int
    followers: tuple[str, ...]


def layer_kernels(module: nn.Module, name: str) -> list[LayerKernel]:
    """The layers a module holds, by its own parameter names (none for other modules)."""

    def full(suffix: str) -> str:
        return f"{name}.{suffix}" if name else suffix

    if isinstance(module, LINEAR_TYPES):
        return [LayerKernel(name, "weight", 0, 1, ("bias",))]
    if isinstance(module, TRANSPOSED_TYPES) and getattr(module, "groups", 1) == 1:
        return [LayerKernel(name, "weight", 1, 0, ("bias",))]
    if isinstance(module, EMBEDDING_TYPES):
        return [LayerKernel(name, "weight", 1, 0, ())]
    if isinstance(module, nn.RNNBase):
        out = []
        for k in range(module.num_layers):
            for sfx in ("", "_reverse") if module.bidirectional else ("",):
                tag = f"l{k}{sfx}"
                followers = (f"weight_hh_{tag}", f"bias_ih_{tag}", f"bias_hh_{tag}")
                out.append(LayerKernel(full(tag), f"weight_ih_{tag}", 0, 1, followers))
        return out
    if isinstance(module, nn.MultiheadAttention):
        if module.in_proj_weight is not None:
            return [LayerKernel(full("in_proj"), "in_proj_weight", 0, 1, ("in_proj_bias",))]
        return [
            LayerKernel(full(p), f"{p}_weight", 0, 1, ()) for p in ("q_proj", "k_proj", "v_proj")
        ]
    return []


def describe(
    model: nn.Module,
    params: Iterable[nn.Parameter] | None = None,
    layers: Sequence[str] | None = None,
    keep: Iterable[nn.Parameter] = (),
) -> tuple[list[TensorSpec], list[nn.Parameter]]:
    """The tensors the rules see: trainable, de-duplicated (tied weights count once).

    ``params`` restricts to those parameters (an optimizer's). ``layers`` names
    the modules to cover; by default every module, in registration order.
    ``keep`` are parameters covered even when frozen or outside ``params`` (the
    ones an attached handle already tracks: their energy must not be dropped).
    """
    wanted = None if params is None else {id(p) for p in params}
    kept = {id(p) for p in keep}
    modules = dict(model.named_modules())
    specs: list[TensorSpec] = []
    found: list[nn.Parameter] = []
    seen: set[int] = set()

    def covered(p: nn.Parameter | None) -> bool:
        if p is None or id(p) in seen:
            return False
        return id(p) in kept or (p.requires_grad and (wanted is None or id(p) in wanted))

    for mname in _module_names(modules, layers):
        module = modules[mname]
        own = dict(module.named_parameters(recurse=False))
        roles: dict[str, tuple[int | None, int | None, str | None]] = {}
        # A layer exists only if its own kernel is covered here (not frozen, not tied to an
        # earlier module); otherwise the tensors that would follow it stand alone.
        for lk in layer_kernels(module, mname):
            kernel = own.get(lk.kernel)
            if not covered(kernel):
                continue
            roles[lk.kernel] = (lk.unit_axis, lk.input_axis, lk.layer)
            for f in lk.followers:
                if f in own:
                    roles[f] = (0, None, lk.layer)
        for pname, p in own.items():
            if not covered(p):
                continue
            seen.add(id(p))
            full = f"{mname}.{pname}" if mname else pname
            unit, inp, layer = roles.get(pname, (None, None, None))
            if layer is None and pname == "bias" and isinstance(module, LINEAR_TYPES):
                unit = 0  # a bias whose weight is not covered: unit-aligned, not a layer
            specs.append(TensorSpec(full, tuple(p.shape), unit, inp, layer))
            found.append(p)
    return specs, found


def nothing_to_cover(model: nn.Module, layers: Sequence[str] | None = None) -> str:
    """Why :func:`describe` found no trainable tensor, naming the modules ``layers`` picks."""
    if layers is None:
        if next(model.parameters(), None) is None:
            return "the model has no parameters"
        return "every parameter of the model is frozen (requires_grad=False)"
    modules = dict(model.named_modules())
    _module_names(modules, layers)  # unknown names raise with the model's module names
    reasons = []
    for name in layers:
        module = modules[name]
        kind = type(module).__name__
        if next(module.parameters(), None) is None:
            reasons.append(f"module {name!r} ({kind}) has no parameters")
        else:
            reasons.append(f"module {name!r} ({kind}) has only frozen parameters")
    return "; ".join(reasons)


def _module_names(modules: dict[str, nn.Module], layers: Sequence[str] | None) -> list[str]:
    if layers is None:
        return list(modules)
    if isinstance(layers, str) or not all(isinstance(n, str) for n in layers):
        raise ValueError(
            f"layers must be a list of module names, got {layers!r}; for one module "
            f"write layers=[{layers!r}]"
        )
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
    return list(dict.fromkeys(names))
