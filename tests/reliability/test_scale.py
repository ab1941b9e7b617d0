"""Scale and long runs: energy totals stay exact over 1e6 steps, and the approximate top
fraction keeps its documented count on 1e8-element tensors. (The mistake memory of 1e8
ids: test_scale_memory.py. The Keras in-graph totals over 1e6 steps: keras_checks.py.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from energy_callbacks import Plasticity, TensorSpec, TopFraction
from energy_callbacks.core import fused, keep_count, numpy_ops
from energy_callbacks.core.ops import APPROX_SAMPLE, approx_stride
from energy_callbacks.torch import attach

STEPS = 1_000_000


def float32_sum(values: np.ndarray) -> float:
    """What a float32 running total would hold (a sequential float32 sum)."""
    return float(np.add.accumulate(values.astype(np.float32))[-1])


def test_the_core_totals_stay_exact_over_1e6_steps():
    """A 3x4 layer and a 4096-synapse tensor, 1e6 steps of per-step totals as the fused
    kernels hand them over: M1 within float64 rounding of the exact sum, M0 (3.6e9, past
    int32) and the step count exact, M1_min exact from the displacement."""
    rng = np.random.default_rng(0)
    small = (rng.standard_normal((STEPS, 12)) * np.geomspace(1.0, 1e-7, STEPS)[:, None]).astype(
        np.float32
    )
    small[rng.random(small.shape) < 0.3] = 0  # unchanged synapses
    m1_small = np.abs(small.astype(np.float64)).sum(1)
    m0_small = np.count_nonzero(small, axis=1)
    m1_big = rng.random(STEPS) * 1e-3
    m0_big = rng.integers(3000, 4097, STEPS)
    rule = Plasticity().setup([TensorSpec("w", (3, 4)), TensorSpec("big", (4096,))])
    placeholder = np.zeros(4096, np.float32)
    for t in range(STEPS):
        rule.record(
            [small[t].reshape(3, 4), placeholder],
            displacement=False,
            totals=[(m1_small[t], int(m0_small[t])), (m1_big[t], int(m0_big[t]))],
        )
    rule.meter.add_displacement(0, small.astype(np.float64).sum(0).reshape(3, 4))
    report = rule.report()

    exact_small = math.fsum(np.abs(small.astype(np.float64)).ravel().tolist())
    exact = exact_small + math.fsum(m1_big.tolist())
    assert report.steps == STEPS and report.skipped_steps == 0
    assert report.m0 == int(m0_small.sum()) + int(m0_big.sum()) > 2**31
    assert report.m1 == pytest.approx(exact, rel=1e-12)  # bound: STEPS * 2**-53 = 1.1e-10
    assert report.per_layer["w"].m1 == pytest.approx(exact_small, rel=1e-12)
    # float32 accumulation would have lost the late, tiny steps
    assert abs(float32_sum(m1_small) - exact_small) / exact_small > 1e-5
    net = small.astype(np.float64).sum(0)
    assert report.per_layer["w"].m1_min == pytest.approx(np.abs(net).sum(), rel=1e-12)


class Replay(torch.optim.Optimizer):
    """Adds precomputed updates: step t adds deltas[i][t] to parameter i."""

    def __init__(self, params, deltas):
        super().__init__(params, {})
        self.deltas, self.t = deltas, 0

    @torch.no_grad()
    def step(self, closure=None):
        for p, d in zip(self.param_groups[0]["params"], self.deltas):
            p.add_(d[self.t])
        self.t += 1


@pytest.mark.parametrize("rule", [Plasticity(), Plasticity(alpha=2.0)], ids=["fused", "numpy"])
def test_the_torch_adapter_feeds_the_exact_float32_changes_to_the_totals(rule):
    """20,000 steps of a Linear(4, 3): the adapter's M1, M0 and M1_min equal sums over the
    float32 weight trajectory, replayed in NumPy (sequential float32 additions)."""
    steps = 20_000
    model = nn.Linear(4, 3)
    g = torch.Generator().manual_seed(0)
    scale = torch.logspace(0, -6, steps).reshape(-1, 1, 1)
    deltas = [
        torch.randn((steps, 3, 4), generator=g) * scale,
        torch.randn((steps, 3), generator=g) * scale[:, :, 0],
    ]
    deltas[0][:, 0, 0] = 0  # one synapse never moves
    start = [p.detach().numpy().copy() for p in model.parameters()]
    opt = Replay(model.parameters(), deltas)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    handle = attach(model, opt, rule)
    for _ in range(steps):
        opt.step()
    report = handle.report()
    m1 = m0 = 0
    m1_min = 0.0
    for w0, d in zip(start, deltas):
        path = np.add.accumulate(np.concatenate([w0[None], d.numpy()]), axis=0, dtype=np.float32)
        dw = np.diff(path, axis=0)  # float32 differences, as the adapter takes them
        m1 += math.fsum(np.abs(dw.astype(np.float64)).ravel().tolist())
        m0 += int(np.count_nonzero(dw))
        m1_min += float(np.abs(path[-1].astype(np.float64) - w0).sum())
    assert report.steps == steps and report.m0 == m0
    assert report.m1 == pytest.approx(m1, rel=1e-12)
    assert report.m1_min == pytest.approx(m1_min, rel=1e-12)


def bound(p: float) -> float:
    """The documented relative error of the kept count (TopFraction's docstring)."""
    return 4 * math.sqrt((1 - p) / (p * APPROX_SAMPLE))


@pytest.fixture(scope="module")
def big() -> dict[str, np.ndarray]:
    """1e8-element proposals: iid, heavy-tailed, and a batch-1 dense gradient (rank 1,
    columns of different scales) of a 10000 x 10000 layer."""
    rng = np.random.default_rng(0)
    n = 100_000_000
    rank1 = np.outer(
        rng.standard_normal(10_000, dtype=np.float32),
        np.geomspace(1e-3, 1, 10_000, dtype=np.float32)
        * rng.standard_normal(10_000, dtype=np.float32),
    ).reshape(-1)
    return {
        "normal": rng.standard_normal(n, dtype=np.float32),
        "cauchy": rng.standard_cauchy(n).astype(np.float32),
        "rank-1 gradient": rank1,
    }


@pytest.mark.parametrize("ops", [numpy_ops, fused.FusedNumpyOps()], ids=["numpy", "fused"])
@pytest.mark.parametrize("name", ["normal", "cauchy", "rank-1 gradient"])
def test_approximate_selection_on_1e8_entries_keeps_its_documented_fraction(big, name, ops):
    dw = big[name]
    n = dw.size
    for p in (0.01, 0.1):
        k = keep_count(p, n)
        mask = ops.top_magnitude_mask(dw, k, approximate=True)
        kept = int(np.count_nonzero(mask))
        assert abs(kept - k) <= bound(p) * k, (name, p, kept / k - 1, bound(p))
        if p == 0.1:  # a threshold: every kept |dw| is at least every dropped one
            assert np.abs(dw[mask]).min() >= np.abs(dw[~mask]).max()
        del mask


@pytest.mark.parametrize("shape", [(4096, 4096), (262144, 64), (1000, 3, 3, 64)])
def test_columns_of_different_scales_are_all_sampled(shape):
    """The sample stride is a prime: a plain n // 16384 (1024 here) sampled 4 of 4096
    columns and kept 2x (or 8x) the intended count when columns differ in scale."""
    rng = np.random.default_rng(1)
    scale = np.geomspace(1e-3, 1, shape[-1], dtype=np.float32)
    dw = (rng.standard_normal(shape, dtype=np.float32) * scale).reshape(-1)
    n, p = dw.size, 0.1
    step = approx_stride(n)
    assert all(step % d for d in range(2, math.isqrt(step) + 1))
    for ops in (numpy_ops, fused.FusedNumpyOps()):
        kept = int(np.count_nonzero(ops.top_magnitude_mask(dw, keep_count(p, n), True)))
        assert abs(kept - keep_count(p, n)) <= bound(p) * keep_count(p, n), (shape, kept)
    rule = Plasticity(synapses=TopFraction(p, approximate=True)).setup([TensorSpec("w", shape)])
    (mask,) = rule.masks([dw.reshape(shape)])
    assert abs(int(mask.sum()) - keep_count(p, n)) <= bound(p) * keep_count(p, n)
