"""Synaptic caching and cost through attach() and the Lightning callback, against the
NumPy oracle on the same numbers; end-of-fit consolidation, checkpoints, logs, YAML."""

from __future__ import annotations

import copy
import csv
import math

import numpy as np
import pytest
import torch
from conftest import IndexedData, PaperModule, trainer
from torch import nn

from energy_callbacks import Caching, Cost, Plasticity, TopFraction, TopUnits
from energy_callbacks.core import fused
from energy_callbacks.lightning import PlasticityCallback
from energy_callbacks.reference import PaperMLP
from energy_callbacks.torch import attach, describe
from energy_callbacks.torch.ops import TorchOps

RULES = {
    "synapse, decay": dict(caching=Caching(0.004, 40.0, 1e-3)),
    "synapse, tau=1": dict(caching=Caching(0.002, 1.0, 0.0)),
    "layer_max + top 10%": dict(synapses=0.1, caching=Caching(0.01, 25.0, 1e-4, "layer_max")),
    "layer_sum + path": dict(
        units=TopUnits(0.2, path=True), caching=Caching(0.5, math.inf, 1e-3, "layer_sum")
    ),
}


def oracle_caching_step(oracle, params, step):
    """An optimizer step by hand: the oracle's masks, its caching store, its decay
    added to the weights. This is what the adapter must reproduce exactly."""
    before = [p.detach().clone() for p in params]
    step()
    masks = oracle.masks([(p.detach() - b).numpy() for p, b in zip(params, before)])
    with torch.no_grad():
        for p, b, m in zip(params, before, masks):
            if m is not None:
                p.copy_(torch.where(torch.from_numpy(np.array(m)), p, b))
    applied = [(p.detach() - b).numpy() for p, b in zip(params, before)]
    oracle.record(applied)
    with torch.no_grad():
        for i, d in enumerate(oracle.cache(applied)):
            if d is not None:
                kept = params[i].detach().clone()
                params[i].add_(torch.from_numpy(d))
                oracle.meter.add_displacement(i, (params[i].detach() - kept).numpy())


def replay(rule, x, y, order, ref):
    twin = PaperModule(ref)
    opt = twin.configure_optimizers()
    params = list(twin.net.parameters())
    oracle = Plasticity(**copy.deepcopy(rule)).setup(ref.topology())
    eye = torch.eye(10)
    for i in order:
        xb, yb = torch.from_numpy(x[[i]]), torch.from_numpy(y[[i]])

        def step(xb=xb, yb=yb):
            opt.zero_grad()
            (0.5 * ((twin(xb) - eye[yb]) ** 2).sum(1).mean()).backward()
            opt.step()

        oracle_caching_step(oracle, params, step)
    oracle.consolidate()
    return twin, oracle.report()


def fit(rule, x, y, order, ref, **kwargs):
    module = PaperModule(ref)
    callback = PlasticityCallback(**copy.deepcopy(rule), **kwargs)
    data = torch.utils.data.DataLoader(IndexedData(x, y, order), batch_size=1)
    trainer(max_epochs=1, callbacks=[callback]).fit(module, data)
    return module, callback


@pytest.mark.parametrize("numba", [True, False], ids=["fused", "numpy"])
@pytest.mark.parametrize("name", sorted(RULES))
def test_lightning_caching_matches_the_numpy_oracle(digits, name, numba, monkeypatch):
    if not numba:
        monkeypatch.setattr(fused, "AVAILABLE", False)
    x, y, _, _ = digits
    order = np.random.default_rng(0).integers(0, len(x), 200)
    module, callback = fit(RULES[name], x, y, order, PaperMLP(64, 40, seed=3))
    twin, want = replay(RULES[name], x, y, order, PaperMLP(64, 40, seed=3))
    for p, q in zip(module.net.parameters(), twin.net.parameters()):
        np.testing.assert_array_equal(p.detach().numpy(), q.detach().numpy())
    got = callback.report()
    assert got.transient == 0.0 == want.transient  # on_train_end consolidated it all
    assert got.consolidations == want.consolidations > 0
    assert got.m0 == want.m0 and got.steps == want.steps == len(order)
    for field in ("consolidation", "maintenance", "m1"):
        assert getattr(got, field) == pytest.approx(getattr(want, field), rel=1e-12), field
    assert got.m1_min == pytest.approx(want.m1_min, rel=1e-9)
    assert got.energy < got.m1  # caching saved energy on this run


def test_bf16_parameters_cache_through_torch_ops():
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5))  # noqa: E731
    model = make().to(torch.bfloat16)
    twin = copy.deepcopy(model)
    rule = dict(synapses=0.5, caching=Caching(0.02, 3.0, 0.1))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    handle = attach(model, opt, Plasticity(**copy.deepcopy(rule)))
    assert isinstance(handle.ops, TorchOps)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.2)
    params = list(twin.parameters())
    oracle = Plasticity(**copy.deepcopy(rule)).setup(describe(twin)[0])
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        x = torch.randn(8, 12, generator=g).to(torch.bfloat16)
        y = (x[:, :5].float() * 3).argmax(1)
        for m, o in ((model, opt), (twin, None)):
            (o or twin_opt).zero_grad()
            nn.functional.cross_entropy(m(x).float(), y).backward()
        opt.step()
        _bf16_oracle_step(oracle, params, twin_opt.step)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    handle.consolidate()
    oracle.consolidate()
    got, want = handle.report(), oracle.report()
    assert got.consolidations == want.consolidations > 0
    assert got.consolidation == pytest.approx(want.consolidation, rel=1e-6)
    assert got.maintenance == pytest.approx(want.maintenance, rel=1e-6)


def _bf16_oracle_step(oracle, params, step):
    """The oracle on the float32 differences of bf16 weights (exact), as the adapter."""
    before = [p.detach().clone() for p in params]
    step()
    proposed = [(p.detach().float() - b.float()).numpy() for p, b in zip(params, before)]
    masks = oracle.masks(proposed)
    with torch.no_grad():
        for p, b, m in zip(params, before, masks):
            if m is not None:
                p.copy_(torch.where(torch.from_numpy(np.array(m)), p, b))
    applied = [(p.detach().float() - b.float()).numpy() for p, b in zip(params, before)]
    oracle.record(applied)
    with torch.no_grad():
        for p, d in zip(params, oracle.cache(applied)):
            p.add_(torch.from_numpy(d))


def test_attach_handle_consolidates_on_request_and_reports_joules():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = attach(model, opt, Plasticity(caching=Caching(1.0, math.inf, 0.0), cost="dram"))
    start = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        opt.zero_grad()
        y = torch.tensor([0, 1, 2, 0, 1])
        nn.functional.cross_entropy(model(torch.randn(5, 6)), y).backward()
        opt.step()
    held = handle.report()
    assert held.consolidation == 0.0 and held.transient > 0 and held.joules == 0.0
    handle.consolidate()
    after = [p.detach().clone() for p in model.parameters()]
    r = handle.report()
    assert r.transient == 0.0 and r.consolidation == pytest.approx(held.transient, rel=1e-12)
    moved = sum((a.double() - s.double()).abs().sum().item() for a, s in zip(after, start))
    assert r.m1_min == pytest.approx(moved, rel=1e-9)
    assert r.consolidation == pytest.approx(r.m1_min, rel=1e-5)  # tau = inf, theta high
    assert r.joules == pytest.approx(640e-12 * r.consolidations)
    for a, b in zip(after, model.parameters()):
        assert torch.equal(a, b)  # consolidating moves no weight


def test_consolidate_without_caching_is_refused():
    model = nn.Linear(2, 2)
    handle = attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="no synaptic caching"):
        handle.consolidate()


@pytest.fixture
def loader(digits):
    x, y, _, _ = digits
    return torch.utils.data.DataLoader(IndexedData(x, y, np.arange(192)), batch_size=16)


def resume_parts():
    callback = PlasticityCallback(
        synapses=TopFraction(0.3), caching=Caching(0.05, 30.0, 1e-3), cost="sram"
    )
    return PaperModule(PaperMLP(64, 30, seed=7), lr=1e-2, optimizer="adam"), callback


def test_resume_from_a_mid_fit_checkpoint_is_exact(tmp_path, loader):
    """A checkpoint written at an epoch end holds the transient store; resuming from it
    gives the uninterrupted run's weights and energy, end-of-fit consolidation included."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    module, callback = resume_parts()
    saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    trainer(max_epochs=2, callbacks=[callback, saver], enable_checkpointing=True).fit(
        module, loader
    )
    (first,) = sorted(tmp_path.glob("epoch=0*.ckpt"))
    state = torch.load(first, weights_only=True)  # plain tensors and numbers only
    (saved,) = [v for k, v in state["callbacks"].items() if "PlasticityCallback" in k]
    assert sum(float(s.abs().sum()) for s in saved["caching"]["store"]) > 0

    resumed_module, resumed = resume_parts()
    trainer(max_epochs=2, callbacks=[resumed]).fit(resumed_module, loader, ckpt_path=first)
    for p, q in zip(module.parameters(), resumed_module.parameters()):
        assert torch.equal(p, q)
    assert resumed.report() == callback.report()
    assert callback.report().transient == 0.0 and callback.report().joules > 0


def test_logs_the_caching_figures(tmp_path, loader):
    from lightning.pytorch.loggers import CSVLogger

    module, callback = resume_parts()
    logger = CSVLogger(tmp_path)
    trainer(max_epochs=1, callbacks=[callback], logger=logger, log_every_n_steps=4).fit(
        module, loader
    )

    (path,) = tmp_path.rglob("metrics.csv")
    with path.open() as f:
        rows = [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
    keys = set().union(*rows)
    for key in (
        "plasticity/energy_step",
        "plasticity/energy_epoch",
        "plasticity/energy_consolidation",
        "plasticity/energy_maintenance",
        "plasticity/joules",
    ):
        assert key in keys, key
    (epoch,) = [r for r in rows if "plasticity/energy_consolidation" in r]
    step_energy = [r["plasticity/energy_step"] for r in rows if "plasticity/energy_step" in r]
    total = epoch["plasticity/energy_consolidation"] + epoch["plasticity/energy_maintenance"]
    assert step_energy[-1] <= total * (1 + 1e-6)  # the cached energy, growing
    (epoch_energy,) = [r["plasticity/energy_epoch"] for r in rows if "plasticity/energy_epoch" in r]
    assert epoch_energy == pytest.approx(total, rel=1e-6)
    assert step_energy == sorted(step_energy) and len(step_energy) == 3


def test_yaml_init_args_build_caching_and_cost():
    """What LightningCLI does with ``trainer.callbacks`` init_args in a YAML file."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch import Callback

    parser = ArgumentParser()
    parser.add_argument("--callback", type=Callback)
    config = parser.parse_string(
        """
callback:
  class_path: energy_callbacks.lightning.PlasticityCallback
  init_args:
    synapses: 0.1
    caching:
      class_path: energy_callbacks.Caching
      init_args: {theta: 0.01, tau: .inf, maintenance_cost: 1.0e-4, scope: layer_max}
    cost: dram
"""
    )
    callback = parser.instantiate(config).callback
    assert isinstance(callback, PlasticityCallback)
    caching = callback.plasticity.caching
    assert (caching.theta, caching.tau, caching.maintenance_cost, caching.scope) == (
        0.01,
        math.inf,
        1e-4,
        "layer_max",
    )
    assert callback.plasticity.cost == Cost(640e-12, per="update", name="dram")


def test_yaml_cost_as_a_users_figure():
    from jsonargparse import ArgumentParser
    from lightning.pytorch import Callback

    parser = ArgumentParser()
    parser.add_argument("--callback", type=Callback)
    config = parser.parse_string(
        """
callback:
  class_path: energy_callbacks.lightning.PlasticityCallback
  init_args:
    cost: {joules: 2.0e-12, per: update}
"""
    )
    assert parser.instantiate(config).callback.plasticity.cost == Cost(2e-12, per="update")


def test_torch_ops_for_caching_match_the_numpy_oracle():
    from energy_callbacks.core import numpy_ops

    ops = TorchOps("cpu")
    x = torch.randn(5, 4, 3)
    y = torch.randn(5, 4, 3)
    np.testing.assert_array_equal(ops.add(x, y).numpy(), numpy_ops.add(x.numpy(), y.numpy()))
    np.testing.assert_array_equal(ops.scale(x, -1 / 3).numpy(), numpy_ops.scale(x.numpy(), -1 / 3))
    assert ops.scale(x, 0.1).dtype == torch.float32
    for axis in (0, 1, 2):
        np.testing.assert_array_equal(
            ops.row_max(x, axis).numpy(), numpy_ops.row_max(x.numpy(), axis)
        )
    mask = x > 0
    np.testing.assert_array_equal(ops.logical_not(mask).numpy(), ~mask.numpy())
    for scope in ("synapse", "layer_max", "layer_sum"):
        caching = Caching(0.8 if scope != "layer_sum" else 40.0, 7.0, 0.3, scope)
        got = caching.transient(x, ops)
        want = caching.transient(x.numpy(), numpy_ops)
        np.testing.assert_array_equal(got.store.numpy(), want.store)
        np.testing.assert_array_equal(got.decay.numpy(), want.decay)
        assert got.consolidations == want.consolidations
        assert got.consolidated == pytest.approx(want.consolidated, rel=1e-12)
        assert got.maintenance == pytest.approx(want.maintenance, rel=1e-12)
