"""Targets the sample gates accept, the ones they refuse, and per-token gating."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from energy_callbacks import Lazy, Margin, MemorizedMistakes, Plasticity, Topology
from energy_callbacks.core.targets import class_targets


def gate(samples, outputs, targets, ids=None, **kwargs):
    p = Plasticity(samples=samples).setup(Topology.mlp([2, 2]))
    return p, p.gate(np.asarray(outputs), np.asarray(targets), ids, **kwargs)


def test_class_ids_integral_floats_and_a_trailing_unit_axis_are_class_ids():
    for targets in ([0, 2, 1], [0.0, 2.0, 1.0], [[0], [2], [1]]):
        t = class_targets((3, 4), np.asarray(targets))
        assert t.labels.tolist() == [0, 2, 1] and t.counted is None and t.batch_shape == (3,)


def test_one_hot_and_soft_labels_give_their_argmax():
    smoothed = np.full((2, 4), 0.05)
    smoothed[0, 3] = smoothed[1, 1] = 0.85
    assert class_targets((2, 4), smoothed).labels.tolist() == [3, 1]
    assert class_targets((2, 3), np.eye(3)[[2, 0]]).labels.tolist() == [2, 0]


@pytest.mark.parametrize(
    ("output_shape", "targets", "match"),
    [
        ((4, 1), np.random.default_rng(0).normal(size=(4, 1)), "1 class score"),  # regression
        ((4, 1), np.array([0, 1, 1, 0]), "torch.cat"),  # one binary logit
        ((4, 3), np.random.default_rng(1).normal(size=(4, 3)), "not a probability row"),
        ((4, 3), np.array([0.5, 1.0, 2.0, 0.0]), "not a class id"),
        ((4, 3), np.array([0, 1, 3, 0]), r"outside \[0, 3\)"),
        ((4, 3), np.array([0, 1, -1, 0]), "outside"),
        ((4, 3), np.array([[0, 1], [1, 1], [2, 2], [0, 0]]), "do not fit"),
        ((4,), np.array([0, 1, 1, 0]), "per token"),
        ((4, 3), np.array([True, False, True, True]), "not class ids"),
    ],
)
def test_targets_a_gate_cannot_judge_raise_and_say_what_to_pass(output_shape, targets, match):
    with pytest.raises(ValueError, match=match) as err:
        class_targets(output_shape, targets)
    if "regression" in match or output_shape[-1] == 1:
        assert "samples=None" in str(err.value)


def test_lazy_on_regression_targets_is_an_error_not_a_model_that_never_learns():
    with pytest.raises(ValueError, match="samples=None"):
        gate(Lazy(), np.zeros((5, 1)), np.linspace(0, 1, 5)[:, None])


def test_tokens_are_samples_and_ignored_tokens_neither_learn_nor_count():
    outputs = np.zeros((2, 3, 4))
    outputs[..., 1] = 1.0  # every token predicts class 1
    targets = np.array([[1, 2, -100], [-100, 1, 0]])
    p, result = gate(Lazy(), outputs, targets)
    assert np.asarray(result.mask).tolist() == [[False, True, False], [False, False, True]]
    assert (result.seen, result.learned) == (4, 2)
    assert (p.samples_seen, p.samples_learned) == (4, 2)
    # Another ignore_index, or none: -100 is then an out-of-range id.
    _, other = gate(Lazy(), outputs, np.where(targets == -100, 3, targets), ignore_index=3)
    assert np.asarray(other.mask).tolist() == np.asarray(result.mask).tolist()
    with pytest.raises(ValueError, match="outside"):
        gate(Lazy(), outputs, targets, ignore_index=None)


def test_memorized_mistakes_per_token_ids_or_per_sequence_ids():
    outputs = np.zeros((2, 2, 3))
    outputs[..., 0] = 1.0  # every token predicts class 0
    first = np.array([[0, 1], [0, 0]])  # one wrong token, in sequence 0
    right = np.zeros((2, 2), dtype=np.int64)
    # One id per token: only that token is flagged.
    gate_t = MemorizedMistakes()
    ids_t = np.array([[10, 11], [12, 13]])
    gate(gate_t, outputs, first, ids_t)
    _, later = gate(gate_t, outputs, right, ids_t)
    assert np.asarray(later.mask).tolist() == [[False, True], [False, False]]
    assert gate_t.memory.flagged().tolist() == [11]
    # One id per sequence: the sequence is flagged; all its counted tokens learn later.
    gate_s = MemorizedMistakes()
    ids_s = np.array([5, 6])
    gate(gate_s, outputs, first, ids_s)
    _, later = gate(gate_s, outputs, np.array([[0, -100], [0, 0]]), ids_s)
    assert np.asarray(later.mask).tolist() == [[True, False], [False, False]]
    assert gate_s.memory.flagged().tolist() == [5]
    with pytest.raises(ValueError, match="sample ids of shape"):
        gate(MemorizedMistakes(), outputs, first, np.arange(3))


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    batch=st.integers(1, 4),
    tokens=st.integers(1, 5),
    classes=st.integers(2, 4),
    margin=st.booleans(),
)
def test_token_gating_equals_gating_counted_tokens_as_rows(data, batch, tokens, classes, margin):
    outputs = data.draw(
        hnp.arrays(np.float64, (batch, tokens, classes), elements=st.integers(-2, 2))
    )
    targets = data.draw(
        hnp.arrays(np.int64, (batch, tokens), elements=st.integers(-1, classes - 1))
    )
    make = (lambda: Margin(0.6)) if margin else Lazy
    _, result = gate(make(), outputs, targets, ignore_index=-1)
    counted = targets != -1
    rows = make().gate(outputs[counted], targets[counted])
    np.testing.assert_array_equal(np.asarray(result.mask)[counted], rows)
    assert not np.asarray(result.mask)[~counted].any()
    assert (result.seen, result.learned) == (int(counted.sum()), int(np.sum(rows)))
