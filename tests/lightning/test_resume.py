"""Checkpoint/resume is exact: energy totals, mistake memory and weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import IndexedData, PaperModule, trainer

from energy_callbacks import RandomUnits
from energy_callbacks.lightning import PlasticityCallback
from energy_callbacks.reference import PaperMLP


def make(tmp_path):
    callback = PlasticityCallback(
        units=RandomUnits(0.3, seed=5, path=True), synapses=0.2, samples="mistakes"
    )
    module = PaperModule(PaperMLP(64, 40, seed=7), lr=1e-3, optimizer="adam")
    return module, callback


@pytest.fixture
def data(digits):
    x, y, _, _ = digits
    order = np.arange(256)
    return torch.utils.data.DataLoader(IndexedData(x, y, order), batch_size=16)


def test_two_epochs_straight_equal_one_plus_resumed_one(tmp_path, data):
    module, callback = make(tmp_path)
    trainer(max_epochs=2, callbacks=[callback]).fit(module, data)

    first_module, first_callback = make(tmp_path)
    t = trainer(max_epochs=1, callbacks=[first_callback])
    t.fit(first_module, data)
    ckpt = tmp_path / "epoch1.ckpt"
    t.save_checkpoint(ckpt)
    # The checkpoint holds plain tensors and numbers: it loads with weights_only=True.
    state = torch.load(ckpt, weights_only=True)
    assert any("PlasticityCallback" in key for key in state["callbacks"])

    resumed_module, resumed_callback = make(tmp_path)
    trainer(max_epochs=2, callbacks=[resumed_callback]).fit(resumed_module, data, ckpt_path=ckpt)

    for p, q in zip(module.parameters(), resumed_module.parameters()):
        assert torch.equal(p, q)
    assert resumed_callback.report() == callback.report()
    straight = callback.plasticity.samples.memory
    resumed = resumed_callback.plasticity.samples.memory
    np.testing.assert_array_equal(resumed.flagged(), straight.flagged())
    assert resumed.count() > 0
    assert resumed_callback.report().samples_seen == 2 * 256


def test_a_second_fit_continues_the_totals(tmp_path, data):
    module, callback = make(tmp_path)
    trainer(max_epochs=1, callbacks=[callback]).fit(module, data)
    first = callback.report()
    trainer(max_epochs=1, callbacks=[callback]).fit(module, data)
    second = callback.report()
    assert second.samples_seen == 2 * first.samples_seen
    assert second.steps > first.steps and second.m1 > first.m1


def test_a_bfloat16_run_resumes_exactly_with_w0_in_the_checkpoint(tmp_path, data):
    """bf16 weights take the torch-ops path; w_0 rides in the checkpoint as bf16 tensors."""

    def make_bf16():
        module = PaperModule(PaperMLP(64, 40, seed=7), lr=1e-2, optimizer="sgd")
        return module, PlasticityCallback(synapses=0.2)

    module, callback = make_bf16()
    trainer(max_epochs=2, precision="bf16-true", callbacks=[callback]).fit(module, data)

    first_module, first_callback = make_bf16()
    t = trainer(max_epochs=1, precision="bf16-true", callbacks=[first_callback])
    t.fit(first_module, data)
    ckpt = tmp_path / "epoch1.ckpt"
    t.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)
    saved = next(v for k, v in state["callbacks"].items() if "PlasticityCallback" in k)
    assert all(w.dtype == torch.bfloat16 for w in saved["initial"])

    resumed_module, resumed_callback = make_bf16()
    trainer(max_epochs=2, precision="bf16-true", callbacks=[resumed_callback]).fit(
        resumed_module, data, ckpt_path=ckpt
    )
    for p, q in zip(module.parameters(), resumed_module.parameters()):
        assert torch.equal(p, q)
    assert resumed_callback.report() == callback.report()
    assert callback.report().m1_min > 0
