"""core.flat: a nested state as JSON plus named arrays, and back, exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from energy_callbacks.core import flat


def test_split_and_join_give_back_the_state_through_json():
    state = {
        "version": 2,
        "energy": {"names": ["a", "b"], "m1": np.array([0.1, 1 / 3]), "steps": 7},
        "samples": {"memory": {"bits": np.array([5, 255], dtype=np.uint8), "size": 16}},
        "initial": [np.ones((2, 3), np.float32), None],
        "ratio": np.float64(0.25),
    }
    skeleton, arrays = flat.split(state)
    assert set(arrays) == {"energy/m1", "samples/memory/bits", "initial/0"}
    back = flat.join(json.loads(json.dumps(skeleton)), arrays)
    assert back["energy"]["names"] == ["a", "b"] and back["ratio"] == 0.25
    assert back["initial"][1] is None
    np.testing.assert_array_equal(back["samples"]["memory"]["bits"], [5, 255])
    assert back["energy"]["m1"] is arrays["energy/m1"]


def test_what_json_cannot_hold_is_refused_with_its_path():
    with pytest.raises(TypeError, match="'a/b'"):
        flat.split({"a": {"b": object()}})
    with pytest.raises(ValueError, match="not a plain name"):
        flat.split({"a/b": 1})
    with pytest.raises(KeyError, match="energy/m1"):
        flat.join({"energy": {"m1": {flat.ARRAY: "energy/m1"}}}, {})
