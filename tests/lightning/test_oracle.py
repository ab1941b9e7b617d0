"""Lightning against the NumPy oracle: same weights, same data, same masks and energy."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import IndexedData, PaperModule, trainer
from oracle_replay import oracle_step

from energy_callbacks import (
    FixedSubnetwork,
    Plasticity,
    RandomUnits,
    TopFraction,
    TopUnits,
)
from energy_callbacks.lightning import PlasticityCallback
from energy_callbacks.reference import PaperMLP

RULES = {
    "backprop": dict(),
    "top-fraction": dict(synapses=0.1),
    "equal-count": dict(synapses=TopFraction(0.05, equal_count=True)),
    "path": dict(units=TopUnits(0.1, path=True)),
    "fixed": dict(units=FixedSubnetwork(5, seed=1)),
    "random-units": dict(units=RandomUnits(0.2, seed=2, path=True)),
    "combined": dict(units=TopUnits(0.2, path=True), synapses=0.1),
    "lazy": dict(samples="lazy"),
    "mistakes": dict(samples="mistakes"),
    "combined+mistakes": dict(units=TopUnits(0.2, path=True), synapses=0.1, samples="mistakes"),
}


def oracle_run(ref, rule, x, y, order, batch_size, lr=0.01):
    """The reference loop of energy_callbacks.reference, on a fixed sample order."""
    plasticity = Plasticity(**rule).setup(ref.topology())
    eye = np.eye(10, dtype=np.float32)
    for start in range(0, len(order), batch_size):
        ids = order[start : start + batch_size]
        gate = plasticity.gate(ref.forward(x[ids])[2], y[ids], ids)
        if not gate.any:
            continue
        weights = None if plasticity.samples is None else gate.mask.astype(np.float32)
        plasticity.step([-lr * g for g in ref.gradients(x[ids], eye[y[ids]], weights)], ref.params)
    return plasticity.report()


def fit(rule, x, y, order, batch_size, ref, **module_kwargs):
    torch.manual_seed(0)
    module = PaperModule(ref, **module_kwargs)
    callback = PlasticityCallback(**copy.deepcopy(rule))
    data = torch.utils.data.DataLoader(IndexedData(x, y, order), batch_size=batch_size)
    trainer(max_epochs=1, callbacks=[callback]).fit(module, data)
    return module, callback.report()


def replay(rule, x, y, order, batch_size, ref, **module_kwargs):
    """The same torch model and optimizer by hand; masks and energy from the NumPy oracle.

    The oracle sees the real proposal of each optimizer step (w_after - w_before),
    so the comparison is exact: the adapter must select the same entries.
    """
    twin = PaperModule(ref, **module_kwargs)
    opt = twin.configure_optimizers()
    params = list(twin.net.parameters())
    oracle = Plasticity(**copy.deepcopy(rule)).setup(ref.topology())
    eye = torch.eye(10)
    for start in range(0, len(order), batch_size):
        ids = order[start : start + batch_size]
        xb, yb = torch.from_numpy(x[ids]), torch.from_numpy(y[ids])
        out = twin(xb)
        gate = oracle.gate(out.detach().numpy(), y[ids], ids)
        if not gate.any:
            continue
        keep = torch.from_numpy(gate.mask.astype(np.float32))[:, None]
        out.register_hook(lambda g, keep=keep: g * keep)
        opt.zero_grad()
        (0.5 * ((out - eye[yb]) ** 2).sum(1).mean()).backward()
        oracle_step(oracle, params, opt.step)
    return twin, oracle.report()


@pytest.mark.parametrize("name", sorted(RULES))
def test_lightning_matches_numpy_oracle_batch_1_sgd(digits, name):
    x, y, _, _ = digits
    order = np.random.default_rng(0).integers(0, len(x), 300)
    module, got = fit(RULES[name], x, y, order, 1, PaperMLP(64, 50, seed=3))
    twin, want = replay(RULES[name], x, y, order, 1, PaperMLP(64, 50, seed=3))
    for p, q in zip(module.net.parameters(), twin.net.parameters()):
        np.testing.assert_array_equal(p.detach().numpy(), q.detach().numpy())
    assert got.steps == want.steps
    assert got.m0 == want.m0 and got.m0_min == want.m0_min
    assert got.m1 == pytest.approx(want.m1, rel=1e-12)
    assert got.m1_min == pytest.approx(want.m1_min, rel=1e-9)  # w_T - w_0 vs summed deltas
    assert got.samples_seen == want.samples_seen == len(order)
    assert got.samples_learned == want.samples_learned
    if "mistakes" in name or "lazy" in name:
        assert got.samples_learned < got.samples_seen


@pytest.mark.parametrize("name", ["backprop", "path", "fixed", "lazy", "mistakes"])
def test_lightning_reproduces_the_numpy_reference_experiment(digits, name):
    """Against the pure-NumPy MLP (its own float32 gradients), for the rules whose
    selections are not decided by float rounding of near-tied |dw| values."""
    x, y, _, _ = digits
    order = np.random.default_rng(0).integers(0, len(x), 300)
    module, got = fit(RULES[name], x, y, order, 1, PaperMLP(64, 50, seed=3))
    ref = PaperMLP(64, 50, seed=3)
    want = oracle_run(ref, copy.deepcopy(RULES[name]), x, y, order, 1)
    for p, w in zip(module.net.parameters(), ref.params):
        np.testing.assert_allclose(p.detach().numpy(), w, rtol=0, atol=2e-6)
    assert got.steps == want.steps
    assert got.m0 == pytest.approx(want.m0, rel=1e-3)  # sub-ulp updates may round differently
    assert got.m1 == pytest.approx(want.m1, rel=1e-5)
    assert got.m1_min == pytest.approx(want.m1_min, rel=1e-4)
    assert got.samples_learned == want.samples_learned


def test_lightning_matches_oracle_batched_adam(digits):
    x, y, _, _ = digits
    order = np.random.default_rng(1).integers(0, len(x), 320)
    rule = dict(units=TopUnits(0.2, path=True), synapses=0.2, samples="lazy")
    kw = dict(lr=1e-3, optimizer="adam")
    module, got = fit(rule, x, y, order, 32, PaperMLP(64, 50, seed=4), **kw)
    twin, want = replay(rule, x, y, order, 32, PaperMLP(64, 50, seed=4), **kw)
    for p, q in zip(module.net.parameters(), twin.net.parameters()):
        np.testing.assert_array_equal(p.detach().numpy(), q.detach().numpy())
    assert got.m0 == want.m0 and got.steps == want.steps == 10
    assert got.m1 == pytest.approx(want.m1, rel=1e-12)
    assert got.samples_learned == want.samples_learned < got.samples_seen
