"""The reference experiment (SCIENCE.md section 3) in NumPy, rule by rule, step by step.

Each rule runs through ``Plasticity`` on the paper's 784-N-10 MLP with online
SGD on a slice of Fashion-MNIST. At every step the test recomputes the mask the
spec prescribes from the proposed update alone (brute force, independent of the
core's selection code) and checks the applied update, the weights and the
energy against it.
"""

from __future__ import annotations

import numpy as np
import pytest

from energy_callbacks import (
    FixedSubnetwork,
    Margin,
    MemorizedMistakes,
    Plasticity,
    TopFraction,
    TopUnits,
)
from energy_callbacks.data import FASHION_MNIST_DIR, load_fashion_mnist, paper_inputs
from energy_callbacks.reference import PaperMLP, train

N_HIDDEN = 60
STEPS = 300

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def fmnist():
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(
            f"Fashion-MNIST not found in {FASHION_MNIST_DIR}: "
            "apt-get install dataset-fashion-mnist (make test does this when it can)"
        )
    ds = load_fashion_mnist()
    x_train, mean = paper_inputs(ds.train.images[:3000])
    x_test, _ = paper_inputs(ds.test.images[:1000], mean)
    return x_train, ds.train.labels[:3000], x_test, ds.test.labels[:1000]


def top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Brute force: the k largest by value, ties to the lower flat index."""
    flat = values.ravel()
    order = np.lexsort((np.arange(flat.size), -flat))[:k]  # full sort: by -value, then index
    mask = np.zeros(flat.size, dtype=bool)
    mask[order] = True
    return mask.reshape(values.shape)


def k_of(p: float, n: int) -> int:
    return min(n, max(1, int(np.floor(p * n + 0.5))))


def unit_selection(proposed, q):
    w1, b1 = proposed[0], proposed[1]
    score = np.abs(w1.astype(np.float64)).sum(1) + np.abs(b1.astype(np.float64))
    return top_k(score, k_of(q, len(score)))


def path_masks(sel):
    """Masks for [W1, b1, W2, b2] given the selected hidden units."""
    return [
        np.broadcast_to(sel[:, None], (N_HIDDEN, 784)),
        sel,
        np.broadcast_to(sel[None, :], (10, N_HIDDEN)),
        np.ones(10, dtype=bool),
    ]


def expect_top_fraction(p, equal_count=False):
    def rule(proposed):
        n_max = max(d.size for d in proposed)
        return [
            top_k(np.abs(d), min(d.size, k_of(p, n_max)) if equal_count else k_of(p, d.size))
            for d in proposed
        ]

    return rule


def expect_path(q):
    return lambda proposed: path_masks(unit_selection(proposed, q))


def expect_combined(q, p):
    def rule(proposed):
        unit = path_masks(unit_selection(proposed, q))
        return [
            m & top_k(np.abs(np.where(m, d, 0)), k_of(p, d.size)) for d, m in zip(proposed, unit)
        ]

    return rule


def all_kept(proposed):
    return [np.ones(d.shape, dtype=bool) for d in proposed]


RULES = {
    "backprop": (lambda: Plasticity(), all_kept),
    "top-fraction": (lambda: Plasticity(synapses=0.1), expect_top_fraction(0.1)),
    "equal-count": (
        lambda: Plasticity(synapses=TopFraction(0.05, equal_count=True)),
        expect_top_fraction(0.05, equal_count=True),
    ),
    "top-units-path": (lambda: Plasticity(units=TopUnits(0.1, path=True)), expect_path(0.1)),
    "combined": (
        lambda: Plasticity(units=TopUnits(0.2, path=True), synapses=0.1),
        expect_combined(0.2, 0.1),
    ),
}


def as_mask(mask, like):
    return np.ones(like.shape, dtype=bool) if mask is None else np.asarray(mask)


@pytest.mark.parametrize("name", sorted(RULES))
def test_rule_semantics_step_by_step(fmnist, name):
    make, expected_masks = RULES[name]
    x_train, y_train, x_test, y_test = fmnist
    model = PaperMLP(784, N_HIDDEN, seed=1)
    w0 = [p.astype(np.float64) for p in model.params]
    spent = {"m1": 0.0, "m0": 0, "steps": 0}

    def check(model, x, y, ids, gate, proposed, step):
        want = expected_masks(proposed)
        for dw, got_mask, want_mask, applied in zip(proposed, step.masks, want, step.applied):
            np.testing.assert_array_equal(as_mask(got_mask, dw), want_mask)
            # The applied update is the real float32 change: dw where kept (up to the
            # weight's rounding), exactly zero where dropped.
            np.testing.assert_array_equal(applied[~want_mask], 0)
            np.testing.assert_allclose(applied[want_mask], dw[want_mask], rtol=0, atol=1e-7)
            spent["m1"] += np.abs(applied.astype(np.float64)).sum()
            spent["m0"] += np.count_nonzero(applied)
        spent["steps"] += 1

    plasticity = make()
    result = train(
        model, plasticity, x_train, y_train, x_test, y_test,
        max_samples=STEPS, eval_every=STEPS, on_batch=check,
    )  # fmt: skip
    report = result.report
    assert spent["steps"] == report.steps == STEPS
    assert report.m1 == pytest.approx(spent["m1"], rel=1e-12)
    assert report.m0 == spent["m0"]
    moved = sum(np.abs(p.astype(np.float64) - w).sum() for p, w in zip(model.params, w0))
    # The recorded changes are real float32 changes, so they telescope to w_T - w_0.
    assert report.m1_min == pytest.approx(moved, rel=1e-9)
    assert report.inefficiency >= 1.0


def test_fixed_subnetwork_keeps_one_path(fmnist):
    x_train, y_train, x_test, y_test = fmnist
    seen = []

    def check(model, x, y, ids, gate, proposed, step):
        sel = np.asarray(step.masks[1])
        assert sel.sum() == 10
        for got, want in zip(step.masks, path_masks(sel)):
            np.testing.assert_array_equal(as_mask(got, want), want)
        seen.append(sel)

    train(
        PaperMLP(784, N_HIDDEN, seed=1), Plasticity(units=FixedSubnetwork(10, seed=3)),
        x_train, y_train, x_test, y_test, max_samples=50, eval_every=50, on_batch=check,
    )  # fmt: skip
    assert all((s == seen[0]).all() for s in seen)


@pytest.mark.parametrize("batch_size", [1, 8])
@pytest.mark.parametrize("gate_name", ["lazy", "margin", "mistakes"])
def test_sample_gates_learn_only_from_gated_samples(fmnist, gate_name, batch_size):
    x_train, y_train, x_test, y_test = fmnist
    samples = {"lazy": "lazy", "margin": Margin(0.12), "mistakes": MemorizedMistakes()}[gate_name]
    ever_wrong: set[int] = set()
    counts = {"batches": 0, "steps": 0, "learned": 0}

    def check(model, x, y, ids, gate, proposed, step):
        out = model.forward(x)[2]
        wrong = out.argmax(1) != y
        if gate_name == "lazy":
            want = wrong
        elif gate_name == "margin":
            p = np.exp(out - out.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            want = wrong | (p[np.arange(len(y)), y] < 0.12)
        else:
            want = wrong | np.array([i in ever_wrong for i in ids])
            ever_wrong.update(int(i) for i, w in zip(ids, wrong) if w)
        np.testing.assert_array_equal(gate.mask, want)
        counts["batches"] += 1
        counts["learned"] += int(want.sum())
        if not want.any():
            assert proposed is None and step is None  # no step: no weight may change
            return
        counts["steps"] += 1
        # Gated-out samples contribute nothing; the batch mean keeps its divisor.
        eye = np.eye(10, dtype=np.float32)
        kept = model.gradients(x[want], eye[y[want]])
        for dw, g in zip(proposed, kept):
            np.testing.assert_allclose(dw, -0.01 * g * want.sum() / len(x), rtol=1e-4, atol=1e-7)

    result = train(
        PaperMLP(784, N_HIDDEN, seed=2), Plasticity(samples=samples),
        x_train, y_train, x_test, y_test, batch_size=batch_size,
        max_samples=400, eval_every=400, on_batch=check,
    )  # fmt: skip
    report = result.report
    assert report.steps == counts["steps"] <= counts["batches"]
    if batch_size == 1:
        assert counts["steps"] < counts["batches"]  # correct samples were skipped
    assert report.samples_seen == counts["batches"] * batch_size
    assert report.samples_learned == counts["learned"]


def test_reference_mlp_learns_fashion_mnist(fmnist):
    x_train, y_train, x_test, y_test = fmnist
    result = train(
        PaperMLP(784, 100, seed=0), Plasticity(), x_train, y_train, x_test, y_test,
        max_samples=3000, eval_every=1000,
    )  # fmt: skip
    assert result.accuracy > 0.65  # well above chance (0.1) after one pass of 3000 samples
    assert result.report.inefficiency > 1.0
