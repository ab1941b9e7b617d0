"""The reference experiment (SCIENCE.md section 3) as a Lightning pipeline.

- :class:`PaperModule`: the ``n_in - N - 10`` MLP (leaky ReLU 0.1, init
  ``N(0, 0.03**2)`` copied from :class:`~energy_callbacks.reference.PaperMLP`, so a
  seed gives the NumPy reference's numbers), loss ``0.5 * ||y - onehot||**2`` (or
  cross-entropy), plain SGD.
- :class:`SampleStream`: batches drawn at random with replacement, the same draws
  as :func:`energy_callbacks.reference.train` for the same seed.
- :class:`TestEvery`: tests on the whole test set every ``every`` samples, in one
  no-grad forward pass, and stops the trainer at the target accuracy.
- :func:`fit_paper`: one run through :class:`energy_callbacks.lightning.PlasticityCallback`
  on a lean Trainer (no checkpoints, logger, summary or progress bar).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from ..core import EnergyReport, Plasticity
from ..lightning import PlasticityCallback
from ..reference import PaperMLP

LOSSES = ("mse", "cross_entropy")
SUSTAINED_POINTS = 2
"""Consecutive test points at or above the target that make a sustained crossing."""


class PaperModule(pl.LightningModule):
    """The reference MLP; ``loss="mse"`` (the paper's) or ``"cross_entropy"``.

    SGD with ``lr`` in both layers, or ``output_lr`` in the output layer when given.
    """

    def __init__(
        self,
        n_inputs: int,
        n_hidden: int,
        n_outputs: int = 10,
        *,
        loss: str = "mse",
        lr: float = 0.01,
        output_lr: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"PaperModule.loss must be one of {LOSSES}, got {loss!r}")
        ref = PaperMLP(n_inputs, n_hidden, n_outputs, seed=seed)
        self.net = nn.Sequential(
            nn.Linear(n_inputs, n_hidden), nn.LeakyReLU(ref.slope), nn.Linear(n_hidden, n_outputs)
        )
        with torch.no_grad():
            for p, w in zip(self.net.parameters(), ref.params, strict=True):
                p.copy_(torch.from_numpy(w))
        self.n_outputs = n_outputs
        self.loss_name = loss
        self.lr = lr
        self.output_lr = lr if output_lr is None else output_lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self(batch["x"])
        if self.loss_name == "cross_entropy":
            return nn.functional.cross_entropy(out, batch["y"])
        target = nn.functional.one_hot(batch["y"], self.n_outputs).to(out.dtype)
        return 0.5 * ((out - target) ** 2).sum(1).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.output_lr == self.lr:
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        hidden, output = self.net[0], self.net[2]
        return torch.optim.SGD(
            [
                {"params": list(hidden.parameters()), "lr": self.lr},
                {"params": list(output.parameters()), "lr": self.output_lr},
            ]
        )

    @torch.no_grad()
    def predict_labels(self, x: torch.Tensor, chunk: int = 2000) -> torch.Tensor:
        """Argmax predictions for ``x`` in chunks of ``chunk`` rows (bounded memory)."""
        return torch.cat([self.net(x[i : i + chunk]).argmax(1) for i in range(0, len(x), chunk)])


class SampleStream:
    """``n_batches`` batches ``{"x", "y", "index"}`` drawn with replacement from ``pool``.

    The draws are ``rng.integers(0, len(pool), batch_size)`` per batch from
    ``numpy.random.default_rng(seed)``, as in :func:`energy_callbacks.reference.train`;
    ``index`` is the sample's row in the full training set (its id). The generator
    persists across epochs, so a second pass continues the sequence.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        n_batches: int,
        *,
        batch_size: int = 1,
        seed: int = 0,
        pool: np.ndarray | None = None,
    ) -> None:
        if n_batches < 1:
            raise ValueError(f"SampleStream.n_batches must be >= 1, got {n_batches}")
        self.x, self.y = x, y
        self.pool = np.arange(len(x)) if pool is None else np.asarray(pool, dtype=np.int64)
        if len(self.pool) == 0:
            raise ValueError("SampleStream.pool is empty: there is no sample to draw")
        self.n_batches = n_batches
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        n = len(self.pool)
        for _ in range(self.n_batches):
            ids = torch.from_numpy(self.pool[self.rng.integers(0, n, self.batch_size)])
            yield {"x": self.x[ids], "y": self.y[ids], "index": ids}


@dataclass
class Curve:
    """Test points: samples seen, accuracy, training seconds (tests excluded), M1, M0."""

    samples: list[int] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    m1: list[float] = field(default_factory=list)
    m0: list[int] = field(default_factory=list)
    learned: list[int] = field(default_factory=list)
    """Samples that passed the sample gate so far (kept in memory, not in the curves CSV)."""

    def first_reaching(self, target: float) -> int | None:
        """Index of the first test point at or above ``target`` (None: never)."""
        return next((i for i, a in enumerate(self.accuracy) if a >= target), None)

    def first_sustained(self, target: float, points: int = SUSTAINED_POINTS) -> int | None:
        """Index of the first of ``points`` consecutive test points at or above ``target``
        (None: never): a crossing that one lucky test point cannot make."""
        a = self.accuracy
        return next(
            (i for i in range(len(a) - points + 1) if min(a[i : i + points]) >= target), None
        )


class TestEvery(Callback):
    """Test every ``every`` training samples; stop at ``target`` accuracy (after
    ``confirm`` consecutive test points at or above it).

    ``subsets`` maps a name to a boolean mask over the test set; their accuracies
    are kept in :attr:`subset_accuracy` at every test point (e.g. the first task
    of a class-incremental run).
    """

    def __init__(
        self,
        x_test: torch.Tensor,
        y_test: torch.Tensor,
        *,
        every: int = 2000,
        target: float | None = None,
        energy: PlasticityCallback | None = None,
        subsets: dict[str, np.ndarray] | None = None,
        confirm: int = 1,
    ) -> None:
        if confirm < 1:
            raise ValueError(f"confirm must be >= 1 test point, got {confirm}")
        self.confirm = confirm
        self.x_test, self.y_test = x_test, y_test
        self.every, self.target, self.energy = every, target, energy
        self.subsets = {k: torch.from_numpy(v) for k, v in (subsets or {}).items()}
        self.curve = Curve()
        self.subset_accuracy: dict[str, list[float]] = {k: [] for k in self.subsets}
        self.seen = 0
        self.reached = False
        self._next = every
        self._train_seconds = 0.0
        self._clock = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._next = self.seen + self.every
        self.reached = False
        self._clock = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        self.seen += len(batch["y"])
        last = trainer.is_last_batch
        if self.seen >= self._next or last:
            self._next += self.every
            self.test(pl_module)
            recent = self.curve.accuracy[-self.confirm :]
            if (
                self.target is not None
                and len(recent) == self.confirm
                and min(recent) >= self.target
            ):
                self.reached = True
                trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.curve.samples or self.curve.samples[-1] != self.seen:
            self.test(pl_module)

    def test(self, pl_module: pl.LightningModule) -> float:
        self._train_seconds += time.perf_counter() - self._clock
        predicted = pl_module.predict_labels(self.x_test)  # type: ignore[operator]
        correct = predicted == self.y_test
        accuracy = float(correct.float().mean())
        for name, mask in self.subsets.items():
            self.subset_accuracy[name].append(float(correct[mask].float().mean()))
        c = self.curve
        c.samples.append(self.seen)
        c.accuracy.append(accuracy)
        c.seconds.append(self._train_seconds)
        if self.energy is not None:
            m1, m0 = self.energy.plasticity.meter.totals()
            c.m1.append(float(m1))
            c.m0.append(int(m0))
            c.learned.append(int(self.energy.plasticity.samples_learned))
        self._clock = time.perf_counter()
        return accuracy


def lean_trainer(callbacks: Sequence[Callback], max_epochs: int = 1) -> pl.Trainer:
    """A Trainer with nothing but the loop: no checkpoints, logger, summary or progress bar."""
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=10**9,
        callbacks=list(callbacks),
    )


@dataclass
class PaperRun:
    """The outcome of one :func:`fit_paper` run."""

    report: EnergyReport
    samples: int
    accuracy: float
    reached: bool
    seconds: float
    curve: Curve
    module: PaperModule
    tester: TestEvery
    energy: PlasticityCallback
    phase_ends: list[int] = field(default_factory=list)
    """Index into ``curve`` of the last test point of each phase."""

    def row(self, n_train: int, target: float | None) -> dict[str, Any]:
        """The CSV figures of this run (see :data:`~energy_callbacks.reproduce.runner.COLUMNS`).

        ``reached`` and ``*_to_target`` come from the first test point at or above
        ``target``, whether or not the run stopped there; ``*_sustained`` from the first
        of :data:`SUSTAINED_POINTS` consecutive ones.
        """
        rep, c = self.report, self.curve
        hit = None if target is None else c.first_reaching(target)
        held = None if target is None else c.first_sustained(target)
        return {
            "samples": self.samples,
            "epochs": self.samples / n_train,
            "reached": hit is not None,
            "accuracy": self.accuracy,
            "m1": rep.m1,
            "m0": rep.m0,
            "m1_min": rep.m1_min,
            "m0_min": rep.m0_min,
            "inefficiency": rep.inefficiency,
            "samples_learned": rep.samples_learned / max(rep.samples_seen, 1),
            "samples_to_target": "" if hit is None else c.samples[hit],
            "m1_to_target": "" if hit is None else c.m1[hit],
            "m0_to_target": "" if hit is None else c.m0[hit],
            "seconds_to_target": "" if hit is None else c.seconds[hit],
            "samples_sustained": "" if held is None else c.samples[held],
            "m1_sustained": "" if held is None else c.m1[held],
            "m0_sustained": "" if held is None else c.m0[held],
            "train_seconds": c.seconds[-1] if c.seconds else 0.0,
            "seconds": self.seconds,
        }


def fit_paper(
    plasticity: Plasticity,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    n_hidden: int,
    n_outputs: int = 10,
    loss: str = "mse",
    lr: float = 0.01,
    output_lr: float | None = None,
    max_samples: int,
    eval_every: int = 2000,
    target: float | None = None,
    seed: int = 0,
    phases: Sequence[np.ndarray | Callable[[PlasticityCallback], np.ndarray]] | None = None,
    subsets: dict[str, np.ndarray] | None = None,
    phase_targets: Sequence[float | None] | None = None,
    confirm: int = 1,
    batch_size: int = 1,
    skip_backward: bool = False,
    callbacks: Sequence[Callback] = (),
) -> PaperRun:
    """Train the paper MLP through :class:`PlasticityCallback`; batch 1, with replacement.

    ``phases`` (default: one phase over the whole training set) are index pools
    trained one after the other with the same callback, each for at most
    ``max_samples`` samples and until its ``phase_targets`` entry (default ``target``).
    A phase may be a callable that gets the energy callback (its mistake memory)
    and returns the pool. ``subsets`` are test-set masks whose accuracy is kept.
    ``output_lr`` is the output layer's step size (default ``lr``). A run stops at its
    target after ``confirm`` consecutive test points at or above it. Batches of
    ``batch_size`` samples; ``skip_backward`` runs the sample gate's judging forward pass
    and the backward pass over the learning samples only (see ``PlasticityCallback``).
    ``callbacks`` join the trainer's (after the energy callback and the tester).
    """
    module = PaperModule(
        x_train.shape[1], n_hidden, n_outputs, loss=loss, lr=lr, output_lr=output_lr, seed=seed
    )
    energy = PlasticityCallback(plasticity, skip_backward=skip_backward)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    tester = TestEvery(
        torch.from_numpy(x_test),
        torch.from_numpy(y_test),
        every=eval_every,
        target=target,
        energy=energy,
        subsets=subsets,
        confirm=confirm,
    )
    pools = list(phases) if phases is not None else [np.arange(len(x_train))]
    goals = list(phase_targets) if phase_targets is not None else [target] * len(pools)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    phase_ends = []
    for k, phase in enumerate(pools):
        pool = phase(energy) if callable(phase) else phase
        tester.target = goals[k]
        stream = SampleStream(
            xt,
            yt,
            max(1, max_samples // batch_size),
            batch_size=batch_size,
            seed=seed if k == 0 else int(rng.integers(2**31)),
            pool=pool,
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            warnings.filterwarnings("ignore", ".*train_dataloader.*")
            lean_trainer([energy, tester, *callbacks]).fit(module, stream)
        phase_ends.append(len(tester.curve.samples) - 1)
    return PaperRun(
        report=energy.report(),
        samples=tester.seen,
        accuracy=tester.curve.accuracy[-1] if tester.curve.accuracy else math.nan,
        reached=tester.reached,
        seconds=time.perf_counter() - start,
        curve=tester.curve,
        module=module,
        tester=tester,
        energy=energy,
        phase_ends=phase_ends,
    )
