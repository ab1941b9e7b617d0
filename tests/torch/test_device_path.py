"""The torch-ops path (GPU, bf16): the NumPy oracle's masks and energy, and no host reads.

On this CPU-only machine the path runs for bf16 parameters. A step must not wait
for the device: no ``.item()``, no ``bool()``/``float()`` of a tensor, no boolean
indexing; the totals stay on the device until a report or a log reads them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from energy_callbacks import Plasticity, Threshold, TopFraction, Topology, TopUnits
from energy_callbacks.torch import attach, difference
from energy_callbacks.torch.ops import TorchOps

READS = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "nonzero"}
RULES = {
    "tracking": dict,
    "exact top 10%": lambda: dict(synapses=TopFraction(0.1)),
    "approximate top 10%": lambda: dict(synapses=TopFraction(0.1, approximate=True)),
    "threshold": lambda: dict(synapses=Threshold(1e-3)),
    "combined": lambda: dict(units=TopUnits(0.5, path=True), synapses=TopFraction(0.3)),
    "top units": lambda: dict(units=TopUnits(0.25)),
    "equal count": lambda: dict(synapses=TopFraction(0.2, equal_count=True)),
    "per unit": lambda: dict(synapses=TopFraction(0.2, per_unit=True)),
    "smallest": lambda: dict(synapses=TopFraction(0.2, largest=False)),
}


@pytest.fixture(params=["whole", "chunked"])
def chunks(request, monkeypatch):
    """Whole tensors (the dense selection), or 7-entry chunks: every tensor then takes
    the chunked passes (radix selection, chunked sample, row norms, blend)."""
    if request.param == "chunked":
        monkeypatch.setattr(difference, "DEVICE_CHUNK", 7)
        monkeypatch.setattr(difference, "APPROX_SAMPLE", 16)
    return request.param


class HostReads(TorchFunctionMode):
    """Counts the calls that read a tensor's value to the host (a device sync on GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        index = args[1] if name in ("__getitem__", "__setitem__") and len(args) > 1 else None
        if name in READS or (isinstance(index, torch.Tensor) and index.dtype == torch.bool):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5)).to(torch.bfloat16)


def batches(n: int = 6):
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        x = torch.randn(8, 12, generator=g)
        yield x.to(torch.bfloat16), (x[:, :5] * 3).argmax(1)


def backward(model, x, y) -> None:
    nn.functional.cross_entropy(model(x).float(), y).backward()


@pytest.mark.parametrize("name", RULES)
def test_steps_read_nothing_to_the_host(name, chunks):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, foreach=False)
    handle = attach(model, opt, Plasticity(**RULES[name]()))
    assert isinstance(handle.ops, TorchOps)
    counted = []
    for x, y in batches():
        opt.zero_grad()
        backward(model, x, y)
        with HostReads() as mode:
            opt.step()
            handle.energy()  # what the Lightning callback logs every step
        counted.append(mode.reads)
    # Threshold rounds its value into the weights' dtype once, on the host (a CPU tensor).
    first = ["__float__"] if name == "threshold" else []
    assert counted == [first] + [[]] * (len(counted) - 1), counted
    assert handle.report().steps == len(counted)


@pytest.mark.parametrize("name", RULES)
def test_device_path_equals_the_numpy_oracle(name, chunks, monkeypatch):
    if chunks == "chunked":  # the oracle's approximate sample at the same size
        monkeypatch.setattr("energy_callbacks.core.ops.APPROX_SAMPLE", 16)
    model, twin = mlp(), mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.5)
    handle = attach(model, opt, Plasticity(**RULES[name]()))
    oracle = Plasticity(**RULES[name]()).setup(Topology.mlp([12, 16, 5]))
    for x, y in batches():
        for m, o in ((model, opt), (twin, twin_opt)):
            o.zero_grad()
            backward(m, x, y)
        opt.step()
        params = list(twin.parameters())
        before = [p.detach().clone() for p in params]
        twin_opt.step()
        proposed = [(p.detach().float() - b.float()).numpy() for p, b in zip(params, before)]
        masks = oracle.masks(proposed)
        with torch.no_grad():
            for p, b, m in zip(params, before, masks):
                if m is not None:
                    p.copy_(torch.where(torch.from_numpy(np.array(m)), p, b))
        oracle.record([(p.detach().float() - b.float()).numpy() for p, b in zip(params, before)])
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    got, want = handle.report(), oracle.report()
    assert got.m0 == want.m0 and got.m1 == pytest.approx(want.m1, rel=1e-12)
    assert got.m1_min == pytest.approx(want.m1_min, rel=1e-9)


def test_a_nonfinite_step_is_undone_on_the_device_and_reported_once_read():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    handle = attach(model, opt, Plasticity(synapses=0.5))
    x, y = next(batches())
    before = [p.detach().clone() for p in model.parameters()]
    (nn.functional.cross_entropy(model(x).float(), y) * float("nan")).backward()
    with HostReads() as mode:
        opt.step()
    assert mode.reads == []  # undone on the device: nothing waited for it
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with pytest.warns(RuntimeWarning, match="NaN/Inf"):
        report = handle.report()
    assert report.skipped_steps == 1 and report.steps == 0 and report.m1 == 0.0


def test_measuring_float32_weights_on_torch_ops_leaves_them_alone(chunks):
    """float32 weights take the torch-ops path on a GPU: measuring a step reads
    ``w - before`` block by block and writes nothing into the weights."""
    from energy_callbacks.torch.snapshot import Snapshot

    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(9, 5))
    snap = Snapshot([p], use_numpy=False)
    snap.take()
    p.grad = torch.zeros_like(p)
    with torch.no_grad():
        p.add_(torch.randn(9, 5) * 1e-2)
    stepped = p.detach().clone()
    ((m1, _, m0),) = snap.device_totals(1.0)
    assert torch.equal(p.detach(), stepped)
    d = (stepped - snap.before[0]).double()
    assert int(m0) == int(torch.count_nonzero(d))
    assert float(m1) == pytest.approx(float(d.abs().sum()), rel=1e-6)
