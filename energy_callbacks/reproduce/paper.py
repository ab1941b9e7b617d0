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
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from ..core import EnergyReport, Plasticity
from ..lightning import PlasticityCallback
from ..reference import PaperMLP
from . import resume
from .resume import Checkpointer, read_checkpoint

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
    :meth:`state_dict` and :meth:`load_state_dict` resume it after any batch.
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
        self.start = 0
        self._drawn = 0
        self._states: deque[tuple[int, Mapping[str, Any]]] = deque(maxlen=4)

    def __len__(self) -> int:
        return self.n_batches - self.start

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        n = len(self.pool)
        for i in range(self.start, self.n_batches):
            # the loop may fetch a batch ahead of training: keep the states it drew from
            self._states.append((i, self.rng.bit_generator.state))
            ids = torch.from_numpy(self.pool[self.rng.integers(0, n, self.batch_size)])
            self._drawn = i + 1
            yield {"x": self.x[ids], "y": self.y[ids], "index": ids}

    def state_dict(self, trained: int) -> dict[str, Any]:
        """The stream as it was after ``trained`` batches (the next one not drawn yet)."""
        if trained == self._drawn:
            return {"start": trained, "rng": self.rng.bit_generator.state}
        states = dict(self._states)
        if trained not in states:
            raise ValueError(f"SampleStream: batch {trained} is not among the recent draws")
        return {"start": trained, "rng": states[trained]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Carry on from a :meth:`state_dict`: the next batch is the one it would draw."""
        self.start = self._drawn = int(state["start"])
        self.rng.bit_generator.state = state["rng"]


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
        self._resumed_next: int | None = None
        self._train_seconds = 0.0
        self._clock = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._resumed_next is None:
            self._next = self.seen + self.every
        else:  # a phase resumed from a checkpoint keeps its test points
            self._next, self._resumed_next = self._resumed_next, None
        self.reached = False
        self._clock = time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        """The test points so far and the next one's place (a mid-phase checkpoint)."""
        return {
            "curve": asdict(self.curve),
            "subset_accuracy": {k: list(v) for k, v in self.subset_accuracy.items()},
            "seen": self.seen,
            "next": self._next,
            "train_seconds": self._train_seconds + time.perf_counter() - self._clock,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.curve = Curve(**state_dict["curve"])
        self.subset_accuracy = {k: list(v) for k, v in state_dict["subset_accuracy"].items()}
        self.seen = int(state_dict["seen"])
        self._resumed_next = int(state_dict["next"])
        self._train_seconds = float(state_dict["train_seconds"])

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` just spent (e.g. writing a checkpoint) out of the training time."""
        self._clock += seconds

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
    notes: list[dict[str, Any]] = field(default_factory=list)
    """Per phase, what its callable returned beside the pool ({} for a fixed pool)."""

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


Pool: TypeAlias = np.ndarray | tuple[np.ndarray, dict[str, Any]]
"""What a phase callable returns: the pool, or the pool and notes kept in ``PaperRun.notes``."""


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
    phases: Sequence[np.ndarray | Callable[[PlasticityCallback], Pool]] | None = None,
    subsets: dict[str, np.ndarray] | None = None,
    phase_targets: Sequence[float | None] | None = None,
    confirm: int = 1,
    batch_size: int = 1,
    skip_backward: bool = False,
    callbacks: Sequence[Callback] = (),
    checkpoint: Path | None = None,
    checkpoint_every: float | None = None,
) -> PaperRun:
    """Train the paper MLP through :class:`PlasticityCallback`; batch 1, with replacement.

    ``phases`` (default: one phase over the whole training set) are index pools
    trained one after the other with the same callback, each for at most
    ``max_samples`` samples and until its ``phase_targets`` entry (default ``target``).
    A phase may be a callable that gets the energy callback (its mistake memory)
    and returns the pool, or the pool and a dict of notes (kept in ``PaperRun.notes``).
    ``subsets`` are test-set masks whose accuracy is kept.
    ``output_lr`` is the output layer's step size (default ``lr``). A run stops at its
    target after ``confirm`` consecutive test points at or above it. Batches of
    ``batch_size`` samples; ``skip_backward`` runs the sample gate's judging forward pass
    and the backward pass over the learning samples only (see ``PlasticityCallback``).
    ``callbacks`` join the trainer's (after the energy callback and the tester); their
    ``state_dict`` goes into checkpoints.

    ``checkpoint``: a file to resume from when it exists, written every
    ``checkpoint_every`` seconds of the run (default ``resume.CHECKPOINT_SECONDS``; see
    :mod:`~energy_callbacks.reproduce.resume`); the caller deletes it once the run's
    results are kept.
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
    phases = list(phases) if phases is not None else [np.arange(len(x_train))]
    goals = list(phase_targets) if phase_targets is not None else [target] * len(phases)
    rng = np.random.default_rng(seed)
    pools: list[np.ndarray] = []
    notes: list[dict[str, Any]] = []
    phase_ends: list[int] = []
    saved = read_checkpoint(checkpoint)
    seconds_before = 0.0
    if saved is not None:
        module.load_state_dict(saved["module"])
        energy.load_state_dict(saved["energy"])
        tester.load_state_dict(saved["tester"])
        for callback, state in zip(callbacks, saved["callbacks"], strict=True):
            callback.load_state_dict(state)
        rng.bit_generator.state = saved["phase_rng"]
        pools = [p.numpy() for p in saved["pools"]]
        notes, phase_ends, seconds_before = saved["notes"], saved["phase_ends"], saved["seconds"]
    start = time.perf_counter() - seconds_before
    for k in range(len(pools) - 1 if saved is not None else 0, len(phases)):
        resumed = saved is not None and k == len(pools) - 1
        if not resumed:
            phase = phases[k]
            chosen = phase(energy) if callable(phase) else phase
            pool, note = chosen if isinstance(chosen, tuple) else (chosen, {})
            pools.append(np.asarray(pool, dtype=np.int64))
            notes.append(note)
        tester.target = goals[k]
        stream = SampleStream(
            xt,
            yt,
            max(1, max_samples // batch_size),
            batch_size=batch_size,
            seed=seed if k == 0 or resumed else int(rng.integers(2**31)),
            pool=pools[k],
        )
        if resumed:
            assert saved is not None
            stream.load_state_dict(saved["stream"])

        def capture(
            trainer: pl.Trainer, trained: int, stream: SampleStream = stream
        ) -> dict[str, Any]:
            return {
                "module": module.state_dict(),
                "optimizers": [o.state_dict() for o in trainer.optimizers],
                "energy": energy.state_dict(),
                "tester": tester.state_dict(),
                "callbacks": [c.state_dict() for c in callbacks],
                "phase_rng": rng.bit_generator.state,
                "pools": [torch.from_numpy(p) for p in pools],
                "notes": notes,
                "phase_ends": phase_ends,
                "stream": stream.state_dict(trained),
                "seconds": time.perf_counter() - start,
            }

        keeper = []
        if checkpoint is not None:
            keeper.append(
                Checkpointer(
                    checkpoint,
                    capture,
                    every=resume.CHECKPOINT_SECONDS
                    if checkpoint_every is None
                    else checkpoint_every,
                    first_batch=stream.start,
                    restore_optimizers=saved["optimizers"] if resumed and saved else None,
                    on_saved=tester.exclude,
                )
            )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            warnings.filterwarnings("ignore", ".*train_dataloader.*")
            lean_trainer([energy, tester, *callbacks, *keeper]).fit(module, stream)
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
        notes=notes,
    )
