"""The fused numba selection (the torch adapter's CPU ops) against the NumPy oracle.

``FusedNumpyOps.top_magnitude_mask`` must return the oracle's mask bit for bit:
the same entries, ties to the lower index, on long signed arrays where its
sampled bracket is used, in the rare cases where it falls back, and in the
approximate mode.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from energy_callbacks.core import fused, numpy_ops
from energy_callbacks.core.ops import NumpyOps, approx_stride, bracket, bracket_sample

pytestmark = pytest.mark.skipif(not fused.AVAILABLE, reason="numba is not installed")


def oracle(x: np.ndarray, k: int, approximate: bool) -> np.ndarray:
    s = np.abs(x)
    return numpy_ops.approx_top_mask(s, k) if approximate else numpy_ops.top_k_mask(s[None], k)[0]


@settings(max_examples=40, deadline=None)
@given(
    n=st.sampled_from([1000, 16_384, 16_385, 40_000, 100_003]),
    spread=st.sampled_from([1, 2, 7, 1000, 10**7]),
    zeros=st.floats(0.0, 0.99),
    k_frac=st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 0.05, 0.1, 1.0])),
    k_shift=st.integers(-2, 2),
    approximate=st.booleans(),
    dtype=st.sampled_from([np.float32, np.float64]),
    lazy=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_fused_selection_equals_the_oracle(
    n, spread, zeros, k_frac, k_shift, approximate, dtype, lazy, seed
):
    rng = np.random.default_rng(seed)
    x = rng.integers(-spread, spread + 1, size=n) * (8.0 / spread)
    x[rng.random(n) < zeros] = 0.0  # masked-out entries: many ties at zero
    x = x.astype(dtype)
    k = min(n, max(0, int(k_frac * n) + k_shift))
    if lazy:  # the adapter's case: after - before, never written out by the exact rule
        before = rng.standard_normal(n).astype(dtype)
        after = (before + x).astype(dtype)
        diff = fused.Difference(after, before, np.empty_like(after))
        x = after - before
        got = np.asarray(fused.FusedNumpyOps().top_magnitude_mask(diff, k, approximate))
    else:
        got = fused.FusedNumpyOps().top_magnitude_mask(x, k, approximate)
    np.testing.assert_array_equal(got, oracle(x, k, approximate))
    if not approximate:
        assert int(got.sum()) == k


@pytest.mark.parametrize("approximate", [False, True])
@pytest.mark.parametrize("masked", [0.0, 0.9, 0.95])
def test_fused_selection_on_gradient_like_updates(approximate, masked):
    """Continuous values, as real updates are, with a share already masked out to zero
    (a unit rule ran first): with 0.9 and 0.95 the cut is at the ties at zero."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1000, 784)) * rng.random(784)).astype(np.float32)
    x[rng.random(1000) < masked] = 0.0
    k = x.size // 10
    got = fused.FusedNumpyOps().top_magnitude_mask(x.reshape(-1), k, approximate)
    np.testing.assert_array_equal(got, oracle(x.reshape(-1), k, approximate))
    if not approximate:  # the adapter's case: after - before, selected without writing it
        before = rng.standard_normal(x.size).astype(np.float32)
        after = before + x.reshape(-1)
        diff = fused.Difference(after, before, np.empty_like(after))
        got = fused.FusedNumpyOps().top_magnitude_mask(diff, k)
        assert not diff.written
        np.testing.assert_array_equal(got, oracle(after - before, k, False))


def test_fused_selection_when_the_sample_misleads():
    """A pattern the strided sample cannot see (the bracket misses): still exact."""
    n = 100_000
    x = np.full(n, 1e-3, dtype=np.float32)
    x[:: approx_stride(n)] = 5.0  # every sampled entry is large, almost no other is
    x[7::13] = -2.0
    for k in (10, 5000, 20_000):
        got = fused.FusedNumpyOps().top_magnitude_mask(x, k)
        np.testing.assert_array_equal(got, oracle(x, k, False))


@settings(max_examples=30, deadline=None)
@given(
    shape=st.sampled_from([(7,), (30, 11), (1000, 78), (12, 3, 5), (1, 1)]),
    axis=st.integers(0, 2),
    dtype=st.sampled_from([np.float16, np.float32, np.float64]),
    transpose=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_fused_row_l1_equals_the_oracle(shape, axis, dtype, transpose, seed):
    x = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    if transpose:
        x = x.T  # not contiguous: the reference path
    axis = axis % x.ndim
    got = fused.FusedNumpyOps().row_l1(x, axis)
    np.testing.assert_allclose(got, numpy_ops.row_l1(x, axis), rtol=1e-12)
    assert got.dtype == np.float64


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 40),
    how=st.sampled_from(["full", "units", "inputs"]),
    with_out=st.booleans(),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**32 - 1),
)
def test_fused_keep_equals_the_oracle(rows, cols, how, with_out, dtype, seed):
    """``keep`` with a full mask, or a unit mask broadcast along either axis."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(dtype)
    if how == "full":
        mask = rng.random((rows, cols)) < 0.5
    elif how == "units":
        mask = numpy_ops.expand_units(rng.random(rows) < 0.5, x.shape, 0)
    else:
        mask = numpy_ops.expand_units(rng.random(cols) < 0.5, x.shape, 1)
    out = np.full_like(x, np.nan) if with_out else None
    got = fused.FusedNumpyOps().keep(x, mask, out)
    np.testing.assert_array_equal(got, numpy_ops.keep(x, mask))
    if with_out:
        assert got is out


@pytest.mark.parametrize("shape", [(1024, 1024), (4096, 256), (1000, 784)])
def test_the_bracket_holds_the_cut_of_a_matrix_with_columns_of_different_scales(shape):
    """Dense updates are outer products: each column has its own scale. The sample
    must visit every column, or the bracket misses and the selection falls back."""
    rng = np.random.default_rng(0)
    x = np.abs(rng.standard_normal(shape) * rng.random(shape[1]) ** 3).astype(np.float32)
    flat = x.reshape(-1)
    n, k = flat.size, flat.size // 10
    lo, hi = bracket(bracket_sample(flat), n, k)
    cut = np.partition(flat, n - k)[n - k]
    assert lo is not None and lo <= cut and (hi is None or cut <= hi)


def test_row_norms_and_threshold_of_an_unwritten_difference_write_nothing():
    """The unit rules' row norms (units on the first or the last axis) and ``Threshold``
    read ``after - before`` entry by entry: the oracle's numbers, with the difference
    left unwritten; the blend pass applies the threshold as the oracle's mask would."""
    rng = np.random.default_rng(11)
    oracle = NumpyOps()
    for dtype in (np.float32, np.float64):
        before = rng.standard_normal((37, 5, 3)).astype(dtype)
        after = (before + np.round(rng.standard_normal(before.shape) * 100) / 1e4).astype(dtype)
        d = after - before
        for theta in (0.0, 0.003, 0.01, 1.0):
            x = fused.Difference(after, before, np.empty_like(before))
            ops = fused.FusedNumpyOps()
            for axis in (0, 2):  # units first (torch's weights) or last (Keras's kernels)
                rows = ops.row_l1(x, axis)
                np.testing.assert_array_equal(rows, ops.row_l1(d, axis))  # as if written
                np.testing.assert_allclose(rows, oracle.row_l1(d, axis), rtol=1e-14)
            mask = ops.greater_equal(ops.abs(x), theta)
            assert isinstance(mask, fused.ThresholdMask) and not x.written
            want = oracle.greater_equal(np.abs(d), theta)
            w = after.copy()
            (m1, m0), total = fused.blend_kept(w, before, mask)
            np.testing.assert_array_equal(w, np.where(want, after, before))
            assert m0 == np.count_nonzero(np.where(want, d, 0)) and not x.written
            assert m1 == pytest.approx(np.abs(np.where(want, d, 0)).sum(dtype=np.float64))
            np.testing.assert_array_equal(np.asarray(mask).reshape(d.shape), want)


@pytest.mark.parametrize("ties", [False, True])
def test_a_masked_difference_is_selected_from_as_the_oracle_ranks_it(ties):
    """A combined rule's ``keep`` attaches its mask to the unwritten difference; the
    exact top fraction then ranks ``where(mask, dw, 0)`` as the oracle does, with
    masked-out zeros tied at the bottom, and writes no delta."""
    rng = np.random.default_rng(12)
    before = rng.standard_normal((300, 200)).astype(np.float32)
    step = rng.standard_normal(before.shape) * 1e-2
    if ties:
        step = np.round(step * 300) / 300
    after = (before + step).astype(np.float32)
    d = after - before
    units = rng.random((300, 1)) < 0.3
    ops = fused.FusedNumpyOps()
    for k in (1, 500, 6000, 17000, 18000):
        x = fused.Difference(after, before, np.empty_like(before))
        assert ops.deferred(x)
        ranked = ops.keep(x, np.broadcast_to(units, d.shape))
        got = ops.top_magnitude_mask(ops.reshape(ranked, (d.size,)), k)
        want = numpy_ops.top_magnitude_mask(np.where(units, d, 0).reshape(-1), k)
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"k={k}")
        assert not x.written


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_finite_is_false_exactly_when_an_entry_is_nan_or_inf(dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 7)).astype(dtype)
    assert fused.all_finite(x) and fused.all_finite(x.T)  # a strided view too
    big = np.full(1000, np.finfo(dtype).max, dtype=dtype)  # a sum would overflow
    assert fused.all_finite(big)
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[123 % 300, 5] = bad
        assert not fused.all_finite(y) and not fused.all_finite(y.T)
