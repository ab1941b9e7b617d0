"""Scale: the mistake memory of 1e8 sample ids fits in about 12.5 MB, and no id
(1e12, a hash) can make it allocate more than its bound."""

from __future__ import annotations

import numpy as np
import pytest

from energy_callbacks.core import MemorizedMistakes, Plasticity, Topology
from energy_callbacks.core.memory import DENSE_FLOOR_BYTES, MistakeMemory

N = 100_000_000
MB = 1e6


@pytest.fixture(scope="module")
def flagged():
    rng = np.random.default_rng(0)
    ids = np.unique(rng.integers(0, N, 1_000_000))
    return np.concatenate([ids, [N - 1]]) if ids[-1] != N - 1 else ids


def test_1e8_ids_take_12_5_mb(flagged):
    memory = MistakeMemory()
    for chunk in np.array_split(flagged, 50):  # batches in id order: the bitmap grows
        memory.set(chunk)
    assert len(memory) == N and memory.count() == flagged.size
    assert 12.5 * MB <= memory.nbytes <= 1.13 * 12.5 * MB  # growth leaves <= 12.5% slack
    state = memory.state_dict()
    assert state["bits"].nbytes == N // 8 and state["sparse"].size == 0
    np.testing.assert_array_equal(memory.flagged(), flagged)
    probe = np.random.default_rng(1).integers(0, N, 100_000)
    np.testing.assert_array_equal(memory.get(probe), np.isin(probe, flagged))


def test_a_known_capacity_sizes_the_bitmap_exactly(flagged):
    gate = MemorizedMistakes(capacity=N)
    assert gate.memory.nbytes == N // 8
    gate.memory.set(flagged)
    assert gate.memory.nbytes == N // 8


@pytest.mark.parametrize("far", [10**12, 2**63 - 2])
def test_a_huge_id_costs_8_bytes_not_a_bitmap_to_it(far):
    rule = Plasticity(samples="mistakes").setup(Topology.mlp([2, 2]))
    outputs = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    ids = np.array([5, far, 7])
    rule.gate(outputs, np.array([1, 1, 1]), ids)  # 5 and `far` are wrong: flagged
    memory = rule.samples.memory
    assert memory.get([5, 6, 7, far, far - 1]).tolist() == [True, False, False, True, False]
    assert memory.nbytes < 64 and len(memory) == far + 1
    again = Plasticity(samples="mistakes").setup(Topology.mlp([2, 2]))
    again.load_state_dict(rule.state_dict())
    np.testing.assert_array_equal(again.samples.memory.flagged(), [5, far])
    # correct now, flagged before: still learns
    assert again.gate(outputs[[2]], np.array([1]), np.array([far])).mask.tolist() == [True]


def test_random_64_bit_ids_stay_bounded_and_exact():
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 2**62, 200_000)
    memory = MistakeMemory()
    for chunk in np.array_split(ids, 20):
        memory.set(chunk)
    unique = np.unique(ids)
    assert memory.count() == unique.size
    bound = max(DENSE_FLOOR_BYTES, 16 * unique.size) + 8 * unique.size
    assert memory.nbytes <= bound and memory.nbytes <= 8 * unique.size + 1024
    np.testing.assert_array_equal(memory.flagged(), unique)


def test_sparse_ids_move_into_the_bitmap_once_it_covers_them():
    memory = MistakeMemory()
    far = 8 * DENSE_FLOOR_BYTES + 10  # just past what the bitmap may cover at first
    memory.set([far])
    assert memory.state_dict()["sparse"].tolist() == [far]
    memory.set(np.arange(0, 8 * DENSE_FLOOR_BYTES, 97))  # enough flags to justify a bigger map
    memory.set([far + 1])
    state = memory.state_dict()
    assert state["sparse"].size == 0 and memory.get([far, far + 1, far - 1]).tolist() == [
        True,
        True,
        False,
    ]


def test_merging_memories_of_different_reach_is_their_union():
    a, b = MistakeMemory(), MistakeMemory()
    a.set([1, 10**12, 50])
    b.set([2, 50, 3 * 10**11])
    b.merge(a.state_dict())
    np.testing.assert_array_equal(b.flagged(), [1, 2, 50, 3 * 10**11, 10**12])
    assert b.count() == 5 and len(b) == 10**12 + 1


@pytest.mark.parametrize(
    "state",
    [
        {"bits": np.zeros(3, np.uint8), "size": 100},
        {"bits": np.zeros(1, np.uint8), "size": 12, "sparse": np.array([5, 11])},
        {"bits": np.zeros(1, np.uint8), "size": 21, "sparse": np.array([20, 16])},
    ],
)
def test_a_corrupt_state_is_refused(state):
    """Padding past the size, sparse ids inside the bitmap, unsorted sparse ids."""
    with pytest.raises(ValueError, match="corrupt"):
        MistakeMemory().load_state_dict(state)


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        (np.array([3, -1]), "sample id -1 is outside"),
        (np.array([2**63 - 1], dtype=np.uint64), "outside"),
        (np.array([2**64 - 1], dtype=np.uint64), "outside"),
        (np.array([1.0, 2.0]), "must be integers"),
        (np.array([True]), "must be integers"),
    ],
)
def test_ids_that_are_no_index_are_refused(ids, match):
    with pytest.raises(ValueError, match=match):
        MistakeMemory().set(ids)
