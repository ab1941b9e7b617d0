"""Changes to the model mid-run: a parameter frozen or unfrozen, a layer whose data is
replaced or resized, a layer replaced in a Lightning run. Each is handled (the energy so
far carries over, exactly) or refused with a message that says what to do.

Already shown elsewhere: a param group added mid-run and a replaced layer in plain torch
(tests/torch/test_real_models.py: test_a_param_group_added_mid_run_is_masked_and_measured,
test_a_replaced_layer_is_an_error_that_says_what_to_do) and layers unfrozen by
BaseFinetuning (tests/lightning/test_pipeline.py). Keras: keras_cases.py.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from reliability_helpers import Tiny, batches, loader, mlp, trainer
from torch import nn

from energy_callbacks import Plasticity, TopFraction, TopUnits
from energy_callbacks.core import keep_count
from energy_callbacks.lightning import PlasticityCallback
from energy_callbacks.torch import attach


def step(model, opt, x, y) -> dict[str, torch.Tensor]:
    """One SGD step; the entries that changed, per parameter."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return {n: p.detach() != before[n] for n, p in model.named_parameters()}


def moved(model, before) -> float:
    return sum(
        (p.detach() - before[n]).double().abs().sum().item() for n, p in model.named_parameters()
    )


@pytest.mark.parametrize(
    "rule",
    [Plasticity(), Plasticity(synapses=TopFraction(0.25)), Plasticity(units=TopUnits(0.5))],
    ids=["measure", "top-0.25", "units"],
)
def test_a_parameter_frozen_then_unfrozen_mid_run_keeps_its_energy(rule):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    handle = attach(model, opt, rule)
    data = batches(6)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    step(model, opt, *data[0])
    first = handle.report()
    model[0].weight.requires_grad_(False)  # frozen: no grad, so the optimizer skips it
    for x, y in data[1:3]:
        changed = step(model, opt, x, y)
        assert not changed["0.weight"].any()
    frozen = handle.report()
    assert frozen.per_layer["0.weight"].m1 == first.per_layer["0.weight"].m1
    assert frozen.per_layer["2.weight"].m1 > first.per_layer["2.weight"].m1
    model[0].weight.requires_grad_(True)  # unfrozen: measured and masked again
    for x, y in data[3:]:
        changed = step(model, opt, x, y)
        if rule.synapses:
            assert int(changed["0.weight"].sum()) == keep_count(0.25, 48)
    end = handle.report()
    assert end.per_layer["0.weight"].m1 > frozen.per_layer["0.weight"].m1
    net = sum(
        float((p.detach().double() - start[n].double()).abs().sum())
        for n, p in model.named_parameters()
    )
    assert end.m1_min == pytest.approx(net, rel=1e-12)
    assert end.steps == 6


def test_a_parameter_frozen_with_a_stale_gradient_is_measured_while_the_optimizer_moves_it():
    """requires_grad=False does not stop SGD from applying a gradient left in .grad."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    handle = attach(model, opt, Plasticity())
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    model[0].weight.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    report = handle.report()
    assert report.m1 == pytest.approx(moved(model, before), rel=1e-9)
    assert report.per_layer["0.weight"].m1 > 0


def test_new_data_of_the_same_shape_carries_on_and_a_new_shape_is_refused():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    handle = attach(model, opt, Plasticity(synapses=0.5))
    data = batches(3)
    step(model, opt, *data[0])
    first = handle.report()
    model[2].weight.data = torch.randn(3, 8)  # reinitialized: not a step, so no energy
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step(model, opt, *data[1])
    assert handle.report().m1 == pytest.approx(first.m1 + moved(model, before), rel=1e-9)
    model[0].weight.data = torch.randn(8, 7)
    with pytest.raises(RuntimeError, match=r"'0.weight' changed shape from \(8, 6\) to \(8, 7\)"):
        step(model, opt, torch.randn(8, 7), data[2][1])


class ReplaceHead(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            pl_module.net[2] = nn.Linear(8, 3)
            trainer.optimizers[0].add_param_group({"params": pl_module.net[2].parameters()})


class Freeze(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        pl_module.net[0].requires_grad_(trainer.current_epoch != 1)


def test_lightning_a_layer_frozen_for_an_epoch_keeps_its_energy():
    callback = PlasticityCallback(synapses=0.5, per_layer=True)
    energy = []

    class Record(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            energy.append(callback.report().per_layer["net.0.weight"].m1)

    trainer(max_epochs=3, callbacks=[Freeze(), callback, Record()]).fit(Tiny(), loader(batches(4)))
    assert energy[0] == energy[1] < energy[2]
    assert callback.report().steps == 12


def test_lightning_a_replaced_layer_stops_the_run_with_what_to_do():
    callback = PlasticityCallback()
    t = trainer(max_epochs=2, callbacks=[ReplaceHead(), callback])
    with pytest.raises(RuntimeError, match="left the model or moved in it mid-run"):
        t.fit(Tiny(), loader(batches(4)))
    assert callback.plasticity.report().steps == 4  # the first epoch's energy is kept
