"""Exact running totals in Keras variables: float32 pairs and int32 word pairs.

JAX runs without x64, so the optimizer wrapper keeps each float64 total as a
float32 ``(value, rounding error)`` pair updated with an error-free sum, and each
int64 count as two int32 words. Host code reads them back with
:func:`read_total` and :func:`read_count`, and writes with :func:`split_total`
and :func:`split_count`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from keras import ops

COUNT_BITS = 20
"""The low int32 word of a count holds ``COUNT_BITS`` bits; the rest carries over."""


def two_sum(total: Any, error: Any, x: Any) -> tuple[Any, Any]:
    """``(total', error')`` with ``total' + error' == total + error + x`` up to float32
    rounding of ``error`` alone (Knuth's TwoSum keeps the rounding error of the sum).

    The pair is renormalized every step (Fast2Sum of the sum and its error), so
    ``error`` stays within half a float32 ulp of ``total``: left to grow, it summed 1e6
    steps' rounding errors in float32 and lost 2e-6 of M1 to its own rounding.
    """
    s = total + x
    bb = s - total
    err = (total - (s - bb)) + (x - bb) + error
    new = s + err
    return new, err - (new - s)


def carry_count(low: Any, high: Any, x: Any) -> tuple[Any, Any]:
    """``(low', high')`` with ``high' * 2**COUNT_BITS + low' == high * 2**COUNT_BITS + low + x``
    in int32 words (``x`` below ``2**31 - 2**COUNT_BITS``)."""
    low = low + x
    carry = ops.right_shift(low, COUNT_BITS)
    return low - ops.left_shift(carry, COUNT_BITS), high + carry


def two_sum_update(total: Any, error: Any, x: Any) -> list[tuple[Any, Any]]:
    """The ``(variable, new value)`` assignments that add ``x`` to a (total, error) pair."""
    new_total, new_error = two_sum(total.value, error.value, x)
    return [(total, new_total), (error, new_error)]


def read_total(total: Any, error: Any) -> np.ndarray:
    """The float64 values of a (value, error) pair of float32 arrays."""
    return np.asarray(total, np.float64) + np.asarray(error, np.float64)


def split_total(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A float64 array as a (value, error) pair of float32 arrays."""
    hi = np.asarray(x, np.float64).astype(np.float32)
    return hi, (np.asarray(x, np.float64) - hi).astype(np.float32)


def read_count(low: Any, high: Any) -> np.ndarray:
    """The int64 counts of two int32 words."""
    return (np.asarray(high, np.int64) << COUNT_BITS) + np.asarray(low, np.int64)


def split_count(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int64 counts as (low, high) int32 words."""
    x = np.asarray(x, np.int64)
    return (x & ((1 << COUNT_BITS) - 1)).astype(np.int32), (x >> COUNT_BITS).astype(np.int32)


READOUT_EXACT = 2**24
"""float32 holds every integer below this exactly."""


def readout(energy: list[tuple[Any, Any]], count: tuple[Any, Any]) -> Any:
    """The running totals packed into four float32 numbers, for a one-read log per batch:
    ``[sum of energies, sum of their errors, sum of high count words, sum of low ones]``.

    ``energy`` is a list of (value, error) arrays (per tensor) and ``count`` the (low,
    high) int32 words of the counts. Seven ops in the step: the energy is summed in
    float32 (a log's precision), and :func:`read_readout` puts the count together.
    """
    total = ops.sum(ops.stack([ops.sum(value) for value, _ in energy]))
    error = ops.sum(ops.stack([ops.sum(err) for _, err in energy]))
    low = ops.cast(ops.sum(count[0]), "float32")
    high = ops.cast(ops.sum(count[1]), "float32")
    return ops.stack([total, error, high, low])


def read_readout(values: np.ndarray) -> tuple[float, int] | None:
    """``(energy, count)`` from a :func:`readout`; None when a count word outgrew
    float32's exact integers (past 1.7e13 updates, or 2**24 in the low words of many
    tensors): then read the totals themselves."""
    total, error, high, low = (float(v) for v in np.asarray(values, np.float64))
    if high >= READOUT_EXACT or low >= READOUT_EXACT:
        return None
    return total + error, (int(high) << COUNT_BITS) + int(low)
