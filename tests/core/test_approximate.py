"""TopFraction(approximate=True): one pass, a documented count error, exact when small."""

from __future__ import annotations

import math

import numpy as np
import pytest

from energy_callbacks import Plasticity, TensorSpec, TopFraction
from energy_callbacks.core import keep_count, numpy_ops
from energy_callbacks.core.ops import APPROX_SAMPLE


def bound(p: float) -> float:
    """The documented relative error of the kept count (4 standard deviations)."""
    return 4 * math.sqrt((1 - p) / (p * APPROX_SAMPLE))


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5])
@pytest.mark.parametrize("seed", range(5))
def test_kept_count_is_within_the_documented_error(p, seed):
    rng = np.random.default_rng(seed)
    n = 784_000
    dw = (rng.standard_normal(n) * 1e-3).astype(np.float32)
    rule = Plasticity(synapses=TopFraction(p, approximate=True)).setup([TensorSpec("w", (n,))])
    (mask,) = rule.masks([dw])
    k = keep_count(p, n)
    assert abs(int(mask.sum()) - k) <= bound(p) * k
    # A threshold: every kept |dw| is at least every dropped one.
    assert np.abs(dw[mask]).min() >= np.abs(dw[~mask]).max()


def test_small_tensors_are_exact_and_zeros_never_count():
    rng = np.random.default_rng(0)
    small = rng.standard_normal((30, 40)).astype(np.float32)
    tensors = [TensorSpec("small", small.shape), TensorSpec("sparse", (100_000,))]
    sparse = np.zeros(100_000, np.float32)
    sparse[rng.integers(0, 100_000, 50)] = 1.0  # far fewer nonzero entries than k
    rule = Plasticity(synapses=TopFraction(0.1, approximate=True)).setup(tensors)
    exact = Plasticity(synapses=TopFraction(0.1)).setup(tensors)
    got, want = rule.masks([small, sparse]), exact.masks([small, sparse])
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], sparse != 0)


def test_torch_ops_pick_the_same_threshold():
    torch = pytest.importorskip("torch")
    from energy_callbacks.torch.ops import TorchOps

    scores = np.abs(np.random.default_rng(1).standard_normal(200_000)).astype(np.float32)
    want = numpy_ops.approx_top_mask(scores, 20_000)
    got = TorchOps("cpu").approx_top_mask(torch.from_numpy(scores), 20_000).numpy()
    np.testing.assert_array_equal(got, want)


def test_approximate_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="approximate"):
        TopFraction(0.1, approximate=True, per_unit=True)
    with pytest.raises(ValueError, match="approximate"):
        TopFraction(0.1, approximate=True, largest=False)
