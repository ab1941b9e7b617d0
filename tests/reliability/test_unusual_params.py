"""Unusual parameters: sparse gradients (``nn.Embedding(sparse=True)`` with SGD or
SparseAdam), zero-size tensors, 0-d scalars, and weights tied between an embedding and
an output head. Each is masked by the rules and measured exactly once.

Tied weights inside a model and parameters without a gradient in some steps:
tests/lightning/test_models.py (test_tied_weights_count_once,
test_parameter_without_grad_costs_nothing_in_that_step).
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from reliability_helpers import trainer
from torch import nn

from energy_callbacks import Plasticity, TopFraction, TopUnits
from energy_callbacks.core import keep_count
from energy_callbacks.lightning import PlasticityCallback
from energy_callbacks.torch import attach


class Odd(nn.Module):
    """A sparse embedding, a 0-d scale, a layer with a zero-size weight, and a head;
    ``tied`` makes the head's weight the embedding's (language-model style)."""

    def __init__(self, sparse: bool = True, tied: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 4, sparse=sparse)
        self.empty = nn.Linear(0, 3)
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.head = nn.Linear(4, 20 if tied else 3)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, tokens):
        h = self.emb(tokens).mean(1)
        out = self.head(h) * self.scale
        return out[:, :3] + self.empty(torch.zeros(len(tokens), 0))


def unique_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters())  # named_parameters lists a tied tensor once


def run(model: nn.Module, optimizers, rule: Plasticity, steps: int = 6):
    handle = attach(model, optimizers, rule)
    g = torch.Generator().manual_seed(3)
    moved = {n: 0.0 for n in unique_params(model)}
    changed: list[dict[str, int]] = []
    for _ in range(steps):
        tokens = torch.randint(0, 20, (8, 5), generator=g)
        y = torch.randint(0, 3, (8,), generator=g)
        if rule.samples is not None:
            handle.gate_batch(y)
        for opt in optimizers:
            opt.zero_grad()
        nn.functional.cross_entropy(model(tokens), y).backward()
        before = {n: p.detach().clone() for n, p in unique_params(model).items()}
        for opt in optimizers:
            opt.step()
        step = {}
        for n, p in unique_params(model).items():
            dw = (p.detach() - before[n]).double()
            moved[n] += dw.abs().sum().item()
            step[n] = int((dw != 0).sum())
        changed.append(step)
    return handle.report(), moved, changed


def sgd(model):
    return [torch.optim.SGD(model.parameters(), lr=0.1)]


def sparse_adam(model):
    dense = [p for n, p in model.named_parameters() if n != "emb.weight"]
    return [torch.optim.SparseAdam([model.emb.weight], lr=0.05), torch.optim.Adam(dense, lr=0.05)]


RULES = {
    "measure": lambda: Plasticity(),
    "top-0.25": lambda: Plasticity(synapses=0.25),
    "approximate": lambda: Plasticity(synapses=TopFraction(0.25, approximate=True)),
    "per-unit": lambda: Plasticity(synapses=TopFraction(0.25, per_unit=True)),
    "units": lambda: Plasticity(units=TopUnits(0.5), synapses=0.5),
    "lazy": lambda: Plasticity(samples="lazy"),
    "alpha=2": lambda: Plasticity(alpha=2.0),
}


@pytest.mark.parametrize("optimizers", [sgd, sparse_adam], ids=["sgd", "sparse-adam"])
@pytest.mark.parametrize("name", list(RULES))
def test_sparse_zero_size_and_scalar_parameters_are_masked_and_measured(name, optimizers):
    model = Odd()
    report, moved, changed = run(model, optimizers(model), RULES[name]())
    assert set(report.per_layer) == set(unique_params(model))
    assert report.per_layer["empty.weight"].synapses == 0
    assert report.per_layer["empty.weight"].m1 == 0 and report.per_layer["scale"].synapses == 1
    for n, energy in moved.items():
        assert report.per_layer[n].m1 == pytest.approx(energy, rel=1e-6, abs=1e-12), n
    assert report.per_layer["emb.weight"].m1 > 0 and report.per_layer["scale"].m1 > 0
    if name in ("top-0.25",):
        for step in changed:
            for n, p in unique_params(model).items():
                assert step[n] <= keep_count(0.25, p.numel()) if p.numel() else step[n] == 0


@pytest.mark.parametrize("rule", ["measure", "top-0.25", "units"])
def test_weights_tied_between_embedding_and_head_count_once(rule):
    model = Odd(sparse=False, tied=True)
    assert model.head.weight is model.emb.weight
    report, moved, changed = run(model, sgd(model), RULES[rule]())
    assert "head.weight" not in report.per_layer and "emb.weight" in report.per_layer
    total = sum(moved.values())
    assert report.m1 == pytest.approx(total, rel=1e-6)  # once, not twice
    if rule == "top-0.25":
        assert max(s["emb.weight"] for s in changed) <= keep_count(0.25, 80)


class OddModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = Odd()
        self.automatic_optimization = False  # two optimizers

    def forward(self, tokens):
        return self.model(tokens)

    def training_step(self, batch, batch_idx):
        tokens, y = batch
        optimizers = self.optimizers()
        for opt in optimizers:
            opt.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self(tokens), y))
        for opt in optimizers:
            opt.step()

    def configure_optimizers(self):
        return sparse_adam(self.model)


def test_lightning_trains_the_odd_model_with_two_optimizers():
    g = torch.Generator().manual_seed(0)
    tokens, y = torch.randint(0, 20, (48, 5), generator=g), torch.randint(0, 3, (48,), generator=g)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens, y), batch_size=8)
    callback = PlasticityCallback(synapses=0.5)
    module = OddModule()
    start = {n: p.detach().clone() for n, p in module.named_parameters()}
    t = trainer(max_epochs=1, callbacks=[callback])
    t.fit(module, data)
    report = callback.report()
    assert report.steps == 12  # two optimizers, six batches
    net = {
        n: float((p.detach() - start[n]).abs().double().sum()) for n, p in module.named_parameters()
    }
    for n, e in report.per_layer.items():
        assert e.m1_min == pytest.approx(net[n], rel=1e-6, abs=1e-12), n
    assert np.isfinite(report.inefficiency) and report.inefficiency >= 1
