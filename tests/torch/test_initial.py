"""w_0 is kept once, in host memory, and read only for M1_min: the net change is
exact (against a witness), chunked sums equal whole-tensor sums, and w_0 survives a
checkpoint, including a state that saved the displacement instead."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from energy_callbacks import Plasticity, TopFraction
from energy_callbacks.core import energy
from energy_callbacks.torch import attach, difference
from energy_callbacks.torch.attached import INITIAL_KEY

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5)).to(dtype)


def train(net: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    dtype = next(net.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(8, 12, generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x.to(dtype)).float(), (x[:, :5] * 3).argmax(1)).backward()
        opt.step()


def witness(net: nn.Module, w0: list[torch.Tensor]) -> tuple[float, int]:
    """sum |w_T - w_0| and count(w_T != w_0), from weights copied by the test."""
    d = [(p.detach().double() - w.double()).reshape(-1) for p, w in zip(net.parameters(), w0)]
    flat = torch.cat(d)
    return float(flat.abs().sum()), int(torch.count_nonzero(flat))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", [None, 0.2])
def test_m1_min_is_the_net_change_against_w0(dtype, rule, monkeypatch):
    # chunks of 7 entries: every sum crosses chunk boundaries, and must not notice
    monkeypatch.setattr(energy, "NET_CHUNK", 7)
    monkeypatch.setattr(difference, "DEVICE_CHUNK", 7)
    net = model(DTYPES[dtype])
    w0 = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.Adam(net.parameters(), lr=0.05, eps=1e-3)
    handle = attach(net, opt, Plasticity(synapses=None if rule is None else TopFraction(rule)))
    train(net, opt, 5)
    m1_min, m0_min = witness(net, w0)
    report = handle.report()
    assert report.m0_min == m0_min > 0
    assert report.m1_min == pytest.approx(m1_min, rel=1e-12)
    assert report.m1 >= report.m1_min


@pytest.mark.parametrize("dtype", DTYPES)
def test_w0_rides_in_the_state_and_a_resume_is_exact(dtype):
    net = model(DTYPES[dtype])
    w0 = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.Adam(net.parameters(), lr=0.05, eps=1e-3)
    handle = attach(net, opt, Plasticity(synapses=0.3))
    train(net, opt, 3)
    state = handle.state_dict()
    for saved, w in zip(state[INITIAL_KEY], w0):
        assert saved.device.type == "cpu" and torch.equal(saved, w)
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict(), "plasticity": state}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)  # the state holds NumPy arrays

    twin = model(DTYPES[dtype])
    twin.load_state_dict(saved["model"])
    twin_opt = torch.optim.Adam(twin.parameters(), lr=0.05, eps=1e-3)
    twin_opt.load_state_dict(saved["opt"])
    resumed = attach(twin, twin_opt, Plasticity(synapses=0.3))
    resumed.load_state_dict(saved["plasticity"])
    train(net, opt, 2, seed=2)
    train(twin, twin_opt, 2, seed=2)
    assert resumed.report() == handle.report()
    m1_min, m0_min = witness(twin, w0)
    assert resumed.report().m1_min == pytest.approx(m1_min, rel=1e-12)
    assert resumed.report().m0_min == m0_min


def test_a_state_that_saved_the_displacement_gives_the_same_m1_min():
    net = model(torch.float32)
    w0 = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    handle = attach(net, opt)
    train(net, opt, 3)
    state = handle.state_dict()
    del state[INITIAL_KEY]  # the earlier format: w_T - w_0 in float64
    state["energy"]["displacement"] = [
        (p.detach().double() - w.double()).numpy() for p, w in zip(net.parameters(), w0)
    ]
    twin = model(torch.float32)
    twin.load_state_dict(net.state_dict())
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    resumed = attach(twin, twin_opt)
    resumed.load_state_dict(state)
    assert resumed.report() == handle.report()
    train(twin, twin_opt, 2, seed=2)
    m1_min, m0_min = witness(twin, w0)
    assert resumed.report().m1_min == pytest.approx(m1_min, rel=1e-12)
    assert resumed.report().m0_min == m0_min


def test_a_state_without_w0_or_displacement_is_refused():
    net = model(torch.float32)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    handle = attach(net, opt)
    train(net, opt, 2)
    state = handle.state_dict()
    del state[INITIAL_KEY]
    twin = model(torch.float32)
    resumed = attach(twin, torch.optim.SGD(twin.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="no 'initial'"):
        resumed.load_state_dict(state)


def test_net_change_sums_in_float64_chunks():
    rng = np.random.default_rng(0)
    a = rng.standard_normal(1000).astype(np.float32)
    b = a.copy()
    b[::3] += np.float32(1e-3)
    want = np.abs(a.astype(np.float64) - b.astype(np.float64))
    got = energy.net_change(a, b, chunk=7)
    assert got[1] == np.count_nonzero(want)
    assert got[0] == pytest.approx(want.sum(), rel=1e-13)
    # against zero (a store's sum |w_e| and its nonzero entries); the float64 chunks
    # it reads are views of ``store``, which stays as it was
    store = a.astype(np.float64)
    store[::5] = 0.0
    kept = store.copy()
    got = energy.net_change(store, None, chunk=7)
    assert got == (pytest.approx(np.abs(kept).sum(), rel=1e-13), np.count_nonzero(kept))
    assert (store == kept).all()
