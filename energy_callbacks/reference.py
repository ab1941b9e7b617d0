"""The reference experiment of van Rossum & Pache (2024), in NumPy, trained through Plasticity.

Setup (SCIENCE.md section 3): a ``n_in - N - 10`` MLP with leaky-ReLU hidden
units (slope 0.1) and linear outputs; weights and biases drawn from
``N(0, 0.03**2)``; loss ``0.5 * ||y - onehot||**2`` per sample, averaged over
the batch; plain SGD, learning rate 0.01, batch size 1, samples drawn at random
with replacement; test accuracy every 2000 samples, stop at a target.

This is the oracle the framework adapters are checked against, and the first
step of every ``energy-callbacks reproduce`` run (the initial weights). Weights
use the torch layout ``(out, in)``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .core import EnergyReport, Plasticity, Topology


class PaperMLP:
    """``n_inputs - n_hidden - n_outputs`` MLP; ``params`` = [W1, b1, W2, b2]."""

    def __init__(
        self,
        n_inputs: int,
        n_hidden: int,
        n_outputs: int = 10,
        *,
        init_std: float = 0.03,
        slope: float = 0.1,
        seed: int = 0,
        dtype: type = np.float32,
    ) -> None:
        rng = np.random.default_rng(seed)
        shapes = [(n_hidden, n_inputs), (n_hidden,), (n_outputs, n_hidden), (n_outputs,)]
        self.params = [(rng.standard_normal(s) * init_std).astype(dtype) for s in shapes]
        self.slope = slope
        self.sizes = (n_inputs, n_hidden, n_outputs)

    def topology(self) -> Topology:
        """Tensors ``layer0.weight, layer0.bias, layer1.weight, layer1.bias``."""
        return Topology.mlp(self.sizes)

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(hidden pre-activation, hidden activation, outputs) for a batch ``x``."""
        w1, b1, w2, b2 = self.params
        pre = x @ w1.T + b1
        hidden = np.where(pre > 0, pre, self.slope * pre)
        return pre, hidden, hidden @ w2.T + b2

    def gradients(
        self, x: np.ndarray, targets: np.ndarray, weights: np.ndarray | None = None
    ) -> list[np.ndarray]:
        """Gradient of ``mean_b(weights_b * 0.5 * ||y_b - targets_b||**2)``.

        ``weights`` (0/1 per sample) removes gated-out samples' terms while keeping
        the division by the full batch size.
        """
        pre, hidden, out = self.forward(x)
        err = (out - targets) / len(x)
        if weights is not None:
            err = err * weights[:, None]
        w2 = self.params[2]
        delta = (err @ w2) * np.where(pre > 0, 1.0, self.slope).astype(err.dtype)
        return [delta.T @ x, delta.sum(0), err.T @ hidden, err.sum(0)]

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.argmax(self.forward(x)[2], axis=1)

    def accuracy(self, x: np.ndarray, labels: np.ndarray) -> float:
        return float(np.mean(self.predict(x) == labels))


@dataclass
class RunResult:
    """The outcome of :func:`train`."""

    report: EnergyReport
    samples: int
    accuracy: float
    reached: bool
    seconds: float
    history: list[tuple[int, float]] = field(default_factory=list)


def train(
    model: PaperMLP,
    plasticity: Plasticity,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    lr: float = 0.01,
    batch_size: int = 1,
    max_samples: int | None = None,
    eval_every: int = 2000,
    target_accuracy: float | None = None,
    seed: int = 0,
    on_batch: Callable[..., None] | None = None,
) -> RunResult:
    """Online SGD through ``plasticity`` until ``target_accuracy`` or ``max_samples``.

    ``plasticity`` is set up on the model's topology here. Samples are drawn with
    replacement; each sample's id is its row index (for MemorizedMistakes). A
    batch in which no sample passes the gate changes nothing.

    The energy is the real weight change (``Plasticity.step(proposed, weights)``).
    With synaptic caching the store's decay is written into the weights each step,
    and the whole store is consolidated when training ends.
    ``on_batch(model, x, y, ids, gate, proposed, step)`` is called for every
    batch, seeing the weights from before the step (``proposed`` and ``step``
    are None for a gated-out batch); tests use it to check each step.
    """
    n_classes = model.sizes[2]
    max_samples = 5 * len(x_train) if max_samples is None else max_samples
    plasticity.setup(model.topology())
    rng = np.random.default_rng(seed)
    eye = np.eye(n_classes, dtype=model.params[0].dtype)
    history: list[tuple[int, float]] = []
    start = time.perf_counter()
    seen, accuracy, reached, next_eval = 0, 0.0, False, eval_every
    while seen < max_samples and not reached:
        ids = rng.integers(0, len(x_train), batch_size)
        x, y = x_train[ids], y_train[ids]
        seen += batch_size
        gate = plasticity.gate(model.forward(x)[2], y, ids)
        proposed = step = None
        if gate.any:
            weights = None if plasticity.samples is None else gate.mask.astype(x.dtype)
            proposed = [-lr * g for g in model.gradients(x, eye[y], weights)]
        if on_batch is not None:  # the callback sees the weights the step started from
            before = copy.copy(model)
            before.params = [p.copy() for p in model.params]
        if proposed is not None:
            step = plasticity.step(proposed, model.params)
        if on_batch is not None:
            on_batch(before, x, y, ids, gate, proposed, step)
        if seen >= next_eval or seen >= max_samples:
            next_eval += eval_every
            accuracy = model.accuracy(x_test, y_test)
            history.append((seen, accuracy))
            reached = target_accuracy is not None and accuracy >= target_accuracy
    if plasticity.caching is not None:
        plasticity.consolidate()  # the end of fit consolidates everything
    return RunResult(
        plasticity.report(), seen, accuracy, reached, time.perf_counter() - start, history
    )
