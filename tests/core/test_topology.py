"""Topology wiring: spread edges (a channel-major flatten) and their validation."""

from __future__ import annotations

import numpy as np
import pytest

from energy_callbacks.core import TensorSpec, Topology, numpy_ops
from energy_callbacks.core.units import unit_masks

CONV_TO_DENSE = [
    TensorSpec("conv.weight", (4, 1, 3, 3), 0, 1, "conv"),
    TensorSpec("conv.bias", (4,), 0, None, "conv"),
    TensorSpec("hidden.weight", (5, 4 * 9), 0, 1, "hidden"),
    TensorSpec("out.weight", (2, 5), 0, 1, "out"),
]


def test_a_spread_edge_links_each_channel_to_its_block_of_flattened_inputs():
    topology = Topology(CONV_TO_DENSE, [("conv", "hidden", 9), ("hidden", "out")])
    assert topology.spread("conv", "hidden") == 9 and topology.spread("hidden", "out") == 1
    selected = {
        "conv": np.array([False, True, False, True]),
        "hidden": np.array([True, False, False, False, True]),
    }
    masks = unit_masks(selected, topology, numpy_ops, True)
    columns = np.repeat(selected["conv"], 9)  # inputs 9..17 and 27..35
    want = selected["hidden"][:, None] & columns[None, :]
    np.testing.assert_array_equal(masks[2], want)
    np.testing.assert_array_equal(masks[3], np.broadcast_to(selected["hidden"], (2, 5)))
    twin = Topology(CONV_TO_DENSE, [("conv", "hidden", 9), ("hidden", "out")])
    assert hash(topology) == hash(twin) and topology == twin


@pytest.mark.parametrize(
    ("adjacency", "match"),
    [
        ([("conv", "hidden", 8), ("hidden", "out")], "spread 8"),
        ([("conv", "hidden")], "4 units"),
        ([("conv", "hidden", 0)], "integer >= 1"),
        ([("conv",)], r"\(pre, post\)"),
    ],
)
def test_wrong_spreads_are_refused_with_the_sizes(adjacency, match):
    with pytest.raises(ValueError, match=match):
        topology = Topology(CONV_TO_DENSE, adjacency)
        topology.presynaptic(topology.layer("hidden"))
