"""Checks of configuration values: each names its field and says what it takes.

A bad value fails when a rule or callback is built, never later inside training:
wrong types (a string for a number, a float for a count, ``True`` for a
fraction), values out of range, NaN/inf and unknown names raise ``ValueError``
naming the field. Accepted values come back as plain Python ``bool``/``int``/
``float``, so configs stay JSON-safe (NumPy scalars are accepted).

Example::

    >>> fraction("TopFraction.p", 0.25)
    0.25
    >>> count("TopUnits.k", 2.5)
    Traceback (most recent call last):
    ...
    ValueError: TopUnits.k must be an integer >= 1, got 2.5
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not _is_bool(value)


def is_real(value: Any) -> bool:
    """A real number (NumPy scalars too), not a bool."""
    return _is_real(value)


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not _is_bool(value)


def fraction(field: str, value: Any) -> float:
    """A number in (0, 1]."""
    if not (_is_real(value) and 0 < float(value) <= 1):
        raise ValueError(f"{field} must be a fraction in (0, 1], got {value!r}")
    return float(value)


def real(field: str, value: Any, *, low: float, low_open: bool, what: str) -> float:
    """A finite number above ``low`` (``>`` with ``low_open``, else ``>=``)."""
    ok = _is_real(value) and math.isfinite(float(value))
    ok = ok and (float(value) > low if low_open else float(value) >= low)
    if not ok:
        raise ValueError(f"{field} must be {what}, got {value!r}")
    return float(value)


def count(field: str, value: Any, low: int = 1) -> int:
    """An integer >= ``low`` (not a float, not a bool)."""
    if not (_is_int(value) and int(value) >= low):
        raise ValueError(f"{field} must be an integer >= {low}, got {value!r}")
    return int(value)


def integer(field: str, value: Any, what: str = "an integer") -> int:
    """Any integer (not a float, not a bool)."""
    if not _is_int(value):
        raise ValueError(f"{field} must be {what}, got {value!r}")
    return int(value)


def seed(field: str, value: Any) -> int:
    """A random seed: an integer >= 0 (what ``numpy.random.default_rng`` takes)."""
    return count(field, value, low=0)


def flag(field: str, value: Any) -> bool:
    """True or False (not a truthy string or number)."""
    if not _is_bool(value):
        raise ValueError(f"{field} must be True or False, got {value!r}")
    return bool(value)


def choice(field: str, value: Any, options: Sequence[str]) -> str:
    """One of ``options`` (strings)."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{field} must be one of {tuple(options)}, got {value!r}")
    return value


def names(field: str, value: Any, what: str) -> list[str] | None:
    """None, a name, or a non-empty list/tuple of names (one name is a list of one)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(n, str) for n in value):
        return list(value)
    raise ValueError(f"{field} must be {what} or a non-empty list of them, got {value!r}")


def function(field: str, value: Any) -> Any:
    """None or a callable."""
    if value is not None and not callable(value):
        raise ValueError(f"{field} must be a callable, got {value!r}")
    return value
