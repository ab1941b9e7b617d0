"""The chunked selections on an unwritten ``w_after - w_before`` (the torch-ops path)
against the NumPy oracle: heavy ties, zeros, masked differences, float64 keys, and
chunks that split rows and ties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from energy_callbacks.core.ops import NumpyOps
from energy_callbacks.torch import difference
from energy_callbacks.torch.difference import DeviceDifference
from energy_callbacks.torch.ops import TorchOps

ORACLE = NumpyOps()


def pair(shape, dtype, ties: bool, seed: int):
    """Weights before and after a step; with ``ties`` the changes take few values
    (and many are zero), as rounded updates do."""
    g = torch.Generator().manual_seed(seed)
    before = torch.randn(shape, generator=g).to(dtype)
    step = torch.randn(shape, generator=g) * 1e-2
    if ties:
        step = torch.round(step * 200) / 200 * (torch.rand(shape, generator=g) < 0.6)
    return (before.float() + step).to(dtype), before


def numpy_difference(after, before):
    wide = torch.promote_types(after.dtype, torch.float32)
    return (after.to(wide) - before.to(wide)).numpy()


@pytest.fixture(params=[7, 50, 1 << 22], ids=["chunk-7", "chunk-50", "whole"])
def chunk(request, monkeypatch):
    monkeypatch.setattr(difference, "DEVICE_CHUNK", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("shape", [(13, 11), (300,), (4, 3, 5, 2)])
def test_exact_top_fraction_equals_the_oracle(dtype, ties, shape, chunk):
    after, before = pair(shape, dtype, ties, seed=len(shape))
    x = DeviceDifference(after, before).reshaped((after.numel(),))
    want_d = numpy_difference(after, before).reshape(-1)
    for k in (1, 2, 17, after.numel() // 3, after.numel() - 1, after.numel()):
        got = TorchOps().top_magnitude_mask(x, k)
        want = ORACLE.top_magnitude_mask(want_d, k)
        assert got.shape == want.shape
        np.testing.assert_array_equal(got.numpy(), want, err_msg=f"k={k}")
        assert int(got.sum()) == k


def test_a_masked_difference_ranks_what_the_mask_left(chunk):
    after, before = pair((20, 9), torch.bfloat16, ties=True, seed=3)
    mask = torch.rand(20, 1, generator=torch.Generator().manual_seed(4)) < 0.5
    x = TorchOps().keep(DeviceDifference(after, before), mask.expand(20, 9))
    kept = np.where(mask.expand(20, 9).numpy(), numpy_difference(after, before), 0)
    for k in (1, 30, 100):
        got = TorchOps().top_magnitude_mask(TorchOps().reshape(x, (180,)), k)
        np.testing.assert_array_equal(got.numpy(), ORACLE.top_magnitude_mask(kept.reshape(-1), k))


def test_row_norms_and_threshold_equal_the_oracle(chunk):
    after, before = pair((6, 4, 3, 3), torch.bfloat16, ties=True, seed=5)
    d = numpy_difference(after, before)
    x = DeviceDifference(after, before)
    for axis in (0, 1):
        np.testing.assert_array_equal(TorchOps().row_l1(x, axis).numpy(), ORACLE.row_l1(d, axis))
    got = TorchOps().greater_equal(TorchOps().abs(x), 0.01)
    np.testing.assert_array_equal(got.numpy(), ORACLE.greater_equal(np.abs(d), 0.01))


def test_the_approximate_cut_samples_the_same_entries(monkeypatch, chunk):
    monkeypatch.setattr("energy_callbacks.core.ops.APPROX_SAMPLE", 16)
    monkeypatch.setattr(difference, "APPROX_SAMPLE", 16)
    after, before = pair((40, 30), torch.float32, ties=False, seed=6)
    x = DeviceDifference(after, before).reshaped((1200,))
    got = TorchOps().top_magnitude_mask(x, 120, approximate=True)
    want = ORACLE.top_magnitude_mask(numpy_difference(after, before).reshape(-1), 120, True)
    np.testing.assert_array_equal(got.numpy(), want)


def test_nothing_is_written_to_the_weights(chunk):
    after, before = pair((30, 30), torch.bfloat16, ties=True, seed=7)
    a, b = after.clone(), before.clone()
    x = DeviceDifference(after, before).reshaped((900,))
    TorchOps().top_magnitude_mask(x, 90)
    assert torch.equal(after, a) and torch.equal(before, b)


def test_blocks_of_an_unwritten_difference_are_its_values_in_order():
    """Caching reads the applied change a block at a time (torch ops and the fused
    NumPy views): the blocks, joined, are the written difference."""
    from energy_callbacks.core import fused

    after, before = pair((9, 5), torch.bfloat16, ties=True, seed=8)
    blocks = list(TorchOps().blocks(DeviceDifference(after, before), 7))
    assert [b.numel() for b in blocks] == [7] * 6 + [3]
    want = numpy_difference(after, before).reshape(-1)
    np.testing.assert_array_equal(torch.cat(blocks).numpy(), want)
    a, b = after.float().numpy(), before.float().numpy()
    ops = fused.FusedNumpyOps()
    x = fused.Difference(a, b, np.empty_like(a))
    np.testing.assert_array_equal(np.concatenate(list(ops.blocks(x, 7))), (a - b).reshape(-1))
    assert not x.written
