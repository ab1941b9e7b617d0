"""A nested plasticity state as plain data plus a flat table of arrays.

Checkpoint formats that hold only JSON next to a file of named tensors (the Hugging
Face Trainer's ``trainer_state.json`` and safetensors) need the state in two parts:
:func:`split` takes the arrays out of a nested dict/list state, leaving a JSON-safe
skeleton that names each array by its path; :func:`join` puts them back.

Example::

    >>> skeleton, arrays = split({"m1": np.zeros(2), "steps": 3}, is_array)
    >>> skeleton
    {'m1': {'__array__': 'm1'}, 'steps': 3}
    >>> join(skeleton, arrays)["steps"]
    3
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

ARRAY = "__array__"
"""The skeleton's key for an array taken out: ``{"__array__": "<path>"}``."""


def is_array(value: Any) -> bool:
    """A NumPy array (the core's arrays; adapters pass their own test)."""
    return isinstance(value, np.ndarray)


def split(state: Any, array: Callable[[Any], bool] = is_array) -> tuple[Any, dict[str, Any]]:
    """``(skeleton, arrays)``: the state with each value that ``array`` accepts replaced
    by ``{"__array__": path}``, and those values by path (``"energy/m1"``, ``"initial/0"``).

    Dict keys must be strings without ``/`` (the path separator); other leaves must be
    JSON scalars (int, float, str, bool, None).
    """
    arrays: dict[str, Any] = {}

    def walk(value: Any, path: str) -> Any:
        if array(value):
            arrays[path] = value
            return {ARRAY: path}
        if isinstance(value, Mapping):
            out = {}
            for k, v in value.items():
                if not isinstance(k, str) or "/" in k or k == ARRAY:
                    raise ValueError(f"state: key {k!r} at {path or '/'!r} is not a plain name")
                out[k] = walk(v, f"{path}/{k}" if path else k)
            return out
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{path}/{i}" if path else str(i)) for i, v in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, (np.integer, np.floating, np.bool_)):
            return value.item()
        raise TypeError(f"state: {type(value).__name__} at {path!r} is neither an array nor JSON")

    return walk(state, ""), arrays


def join(skeleton: Any, arrays: Mapping[str, Any]) -> Any:
    """The state :func:`split` took apart; a missing array raises ``KeyError``."""
    if isinstance(skeleton, Mapping):
        if set(skeleton) == {ARRAY}:
            path = skeleton[ARRAY]
            if path not in arrays:
                raise KeyError(f"state: the array {path!r} is missing")
            return arrays[path]
        return {k: join(v, arrays) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [join(v, arrays) for v in skeleton]
    return skeleton
