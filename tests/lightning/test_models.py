"""The Lightning adapter on model variants: frozen and tied parameters, missing grads,
bf16-mixed, gradient accumulation, several optimizers and parameter groups.

The energy is checked against the real weight changes, measured independently by
snapshotting every parameter around each training batch.
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import trainer
from lightning.pytorch.callbacks import Callback
from torch import nn

from energy_callbacks.core.synapses import keep_count
from energy_callbacks.lightning import PlasticityCallback


class Tiny(pl.LightningModule):
    """A 4-8-3 MLP classifier; batches are (x, y) tuples."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class Measure(Callback):
    """The real change of every (unique) parameter in every training batch."""

    def __init__(self) -> None:
        self.m1 = 0.0
        self.per_name: dict[str, float] = {}
        self.changed: list[dict[str, int]] = []  # entries changed per batch, per tensor
        self._before: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        changed = {}
        for name, p in pl_module.named_parameters():
            dw = (p.detach() - self._before[name]).numpy()
            e = float(np.abs(dw.astype(np.float64)).sum())
            self.m1 += e
            self.per_name[name] = self.per_name.get(name, 0.0) + e
            changed[name] = int(np.count_nonzero(dw))
        self.changed.append(changed)


class PerBatch(Callback):
    """The callback's per-tensor report after every training batch."""

    def __init__(self, plasticity: PlasticityCallback) -> None:
        self.plasticity = plasticity
        self.reports = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.reports.append(self.plasticity.report())


def loader(n: int = 64, batch_size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size)


def fit(module, callback, data=None, **kwargs):
    measure = Measure()
    extra = kwargs.pop("callbacks", [])
    trainer(max_epochs=1, callbacks=[callback, measure, *extra], **kwargs).fit(
        module, data or loader()
    )
    return measure


def initial(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


# -- frozen and tied parameters -------------------------------------------------
def test_frozen_parameters_are_ignored():
    module = Tiny()
    module.net[0].requires_grad_(False)
    start = initial(module)
    callback = PlasticityCallback(synapses=0.5, per_layer=True)
    measure = fit(module, callback)

    report = callback.report()
    assert set(report.per_layer) == {"net.2.weight", "net.2.bias"}
    for name in ("net.0.weight", "net.0.bias"):
        torch.testing.assert_close(module.get_parameter(name), start[name], rtol=0, atol=0)
    assert report.m1 > 0
    assert report.m1 == pytest.approx(measure.m1, rel=1e-6)
    assert sum(e.synapses for e in report.per_layer.values()) == 8 * 3 + 3


@pytest.mark.parametrize(
    "layers, says",
    [
        (["net.1"], "module 'net.1' (Tanh) has no parameters"),
        (["net.1", "net.0"], "module 'net.0' (Linear) has only frozen parameters"),
    ],
)
def test_layers_that_hold_nothing_trainable_are_named_at_setup(layers, says):
    module = Tiny()
    module.net[0].requires_grad_(False)
    callback = PlasticityCallback(layers=layers)
    with pytest.raises(ValueError, match="nothing to train") as err:
        callback.setup(trainer(), module, "fit")
    assert says in str(err.value) and "PlasticityCallback.layers" in str(err.value)
    assert "has no trainable parameter" not in str(err.value)


def test_attach_names_the_layers_that_hold_nothing_trainable():
    from energy_callbacks.torch import attach

    module = Tiny()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"layers=\['net.1'\].*'net.1' \(Tanh\) has no param"):
        attach(module, optimizer, layers=["net.1"])


@pytest.mark.parametrize("rule", ["FixedSubnetwork(8)", "TopUnits(k=9)"])
def test_a_unit_count_that_keeps_a_whole_hidden_layer_is_refused_at_setup(rule):
    from energy_callbacks import FixedSubnetwork, TopUnits  # noqa: F401

    callback = PlasticityCallback(units=eval(rule))
    with pytest.raises(ValueError, match=r"keeps every unit of the hidden layer\(s\) 'net.0' \(8"):
        callback.setup(trainer(), Tiny(), "fit")
    PlasticityCallback(units=FixedSubnetwork(7)).setup(trainer(), Tiny(), "fit")


class Tied(Tiny):
    """Two square layers sharing one weight Parameter, then a head."""

    def __init__(self, second_bias: bool) -> None:
        super().__init__()
        del self.net
        torch.manual_seed(1)
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4, bias=second_bias)
        self.b.weight = self.a.weight
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


@pytest.mark.parametrize(
    "second_bias",
    [
        False,
        True,
    ],
    ids=["second-no-bias", "second-with-bias"],
)
@pytest.mark.parametrize("rule", [dict(), dict(synapses=0.3)], ids=["measure", "top-0.3"])
def test_tied_weights_count_once(rule, second_bias):
    module = Tied(second_bias)
    assert module.a.weight is module.b.weight
    callback = PlasticityCallback(**rule, per_layer=True)
    measure = fit(module, callback)

    report = callback.report()
    names = ["a.weight", "a.bias", "head.weight", "head.bias"] + ["b.bias"] * second_bias
    assert sorted(report.per_layer) == sorted(names)  # the tied weight once
    assert sum(e.synapses for e in report.per_layer.values()) == sum(
        p.numel() for p in module.parameters()
    )
    assert report.per_layer["a.weight"].m1 == pytest.approx(measure.per_name["a.weight"], rel=1e-6)
    assert report.m1 == pytest.approx(measure.m1, rel=1e-6)  # the tied change once, not twice
    assert module.a.weight is module.b.weight
    if rule:
        k = keep_count(0.3, 16)
        assert max(c["a.weight"] for c in measure.changed) <= k


# -- a parameter without a grad in some steps ---------------------------------
class EvenBranch(Tiny):
    """``branch`` joins the output on even batches only: no grad on odd ones."""

    def __init__(self) -> None:
        super().__init__()
        self.branch = nn.Linear(4, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        if batch_idx % 2 == 0:
            out = out + self.branch(x)
        return nn.functional.cross_entropy(out, y)


def test_parameter_without_grad_costs_nothing_in_that_step():
    module = EvenBranch()
    callback = PlasticityCallback(synapses=0.5, per_layer=True)
    per_batch = PerBatch(callback)
    measure = fit(module, callback, callbacks=[per_batch])

    reports = per_batch.reports
    assert len(reports) == 8 and reports[-1].steps == 8
    for i, (prev, now) in enumerate(zip(reports, reports[1:]), start=1):
        for name in ("branch.weight", "branch.bias"):
            d_m1 = now.per_layer[name].m1 - prev.per_layer[name].m1
            d_m0 = now.per_layer[name].m0 - prev.per_layer[name].m0
            if i % 2:
                assert d_m1 == 0 and d_m0 == 0, (i, name)
                assert measure.changed[i][name] == 0
            else:
                assert d_m1 > 0 and d_m0 > 0, (i, name)
        assert now.per_layer["net.2.weight"].m1 > prev.per_layer["net.2.weight"].m1
    assert reports[-1].m1 == pytest.approx(measure.m1, rel=1e-6)


# -- precision and accumulation -----------------------------------------------
@pytest.mark.parametrize(
    "rule", [dict(), dict(synapses=0.3, samples="lazy")], ids=["measure", "top-0.3+lazy"]
)
def test_bf16_mixed_energy_is_float64_and_real(rule):
    module = Tiny()
    callback = PlasticityCallback(**rule, per_layer=True)
    measure = fit(module, callback, precision="bf16-mixed")

    report = callback.report()
    assert module.net[0].weight.dtype == torch.float32  # mixed: the weights stay float32
    assert report.steps > 0
    for value in (report.m1, report.m1_min, report.inefficiency):
        assert type(value) is float
    assert all(type(e.m1) is float for e in report.per_layer.values())
    assert report.m1 > 0
    assert report.m1 == pytest.approx(measure.m1, rel=1e-6)
    if rule:
        assert 0 < report.samples_learned <= report.samples_seen == 64


@pytest.mark.parametrize("rule", [dict(), dict(synapses=0.3)], ids=["measure", "top-0.3"])
def test_accumulate_grad_batches_counts_optimizer_steps(rule):
    module = Tiny()
    callback = PlasticityCallback(**rule)
    measure = fit(module, callback, data=loader(n=128), accumulate_grad_batches=4)

    report = callback.report()
    assert len(measure.changed) == 16
    assert report.steps == 16 // 4
    assert sum(any(c.values()) for c in measure.changed) == 4  # weights move on 4 batches
    assert report.samples_seen == 128
    assert report.m1 == pytest.approx(measure.m1, rel=1e-6)


# -- several optimizers and parameter groups ----------------------------------
class TwoOptimizers(Tiny):
    """Manual optimization: SGD steps the first layer, Adam the second."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(loss)
        first.step()
        second.step()
        return loss

    def configure_optimizers(self):
        return (
            torch.optim.SGD(self.net[0].parameters(), lr=0.1, momentum=0.9),
            torch.optim.Adam(self.net[2].parameters(), lr=0.01),
        )


class TwoGroups(Tiny):
    """One optimizer, two parameter groups with different learning rates."""

    def configure_optimizers(self):
        return torch.optim.SGD(
            [
                {"params": self.net[0].parameters(), "lr": 0.1},
                {"params": self.net[2].parameters(), "lr": 0.01},
            ],
            momentum=0.9,
        )


@pytest.mark.parametrize("model", [TwoOptimizers, TwoGroups])
@pytest.mark.parametrize("rule", [dict(), dict(synapses=0.3)], ids=["measure", "top-0.3"])
def test_several_optimizers_and_param_groups(model, rule):
    module = model()
    callback = PlasticityCallback(**rule, per_layer=True)
    measure = fit(module, callback)

    report = callback.report()
    names = ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
    assert sorted(report.per_layer) == sorted(names)
    assert report.m1 > 0
    assert report.m1 == pytest.approx(measure.m1, rel=1e-6)
    for name in names:
        assert report.per_layer[name].m1 == pytest.approx(measure.per_name[name], rel=1e-6)
        assert measure.per_name[name] > 0  # both optimizers / groups stepped their tensors
    if rule:
        sizes = {n: p.numel() for n, p in module.named_parameters()}
        for changed in measure.changed:  # one step per optimizer per batch
            for name in names:
                assert changed[name] <= keep_count(0.3, sizes[name]), (name, changed)
        assert report.m0 == sum(sum(c.values()) for c in measure.changed)


@pytest.mark.parametrize(
    "model",
    [
        TwoGroups,
        TwoOptimizers,
    ],
)
def test_sample_gate_with_several_optimizers(model):
    module = model()
    callback = PlasticityCallback(synapses=0.3, samples="lazy", per_layer=True)
    measure = fit(module, callback)

    report = callback.report()
    assert report.samples_seen == 64 and 0 < report.samples_learned < 64
    assert report.m1 == pytest.approx(measure.m1, rel=1e-6)
    for name in ("net.0.weight", "net.2.weight"):
        assert report.per_layer[name].m1 == pytest.approx(measure.per_name[name], rel=1e-6)
        assert measure.per_name[name] > 0
