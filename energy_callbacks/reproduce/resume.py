"""Mid-run checkpoints: a long run of :func:`~energy_callbacks.reproduce.paper.fit_paper`
survives the end of its process.

:class:`Checkpointer` writes everything the rest of a run depends on (weights,
optimizer state, the energy callback's totals and memories, the test curve, the
sample stream's position and random state, the phase) at most every ``every``
seconds, between two training steps. :func:`read_checkpoint` gives it back to
``fit_paper``, which carries on from there: the resumed run draws the same
samples and ends with the same weights, energy totals and test points as one that
was never stopped. Its wall-clock figures add up the parts' times (the steps after
the last checkpoint are counted once, when they are trained again).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

CHECKPOINT_SECONDS = 300.0
"""Default seconds between two mid-run checkpoints."""


class Checkpointer(Callback):
    """Write ``capture(trainer, batches_trained)`` to ``path`` at most every ``every``
    seconds, after a training step that neither ends the phase nor stops it.

    ``restore_optimizers`` (states from a checkpoint) are loaded into the trainer's
    optimizers when training starts. ``on_saved(seconds)`` hears how long a write
    took (the run's clock leaves it out).
    """

    def __init__(
        self,
        path: Path,
        capture: Callable[[pl.Trainer, int], dict[str, Any]],
        *,
        every: float = CHECKPOINT_SECONDS,
        first_batch: int = 0,
        restore_optimizers: list[dict[str, Any]] | None = None,
        on_saved: Callable[[float], None] | None = None,
    ) -> None:
        if every < 0:
            raise ValueError(f"Checkpointer.every must be >= 0 seconds, got {every}")
        self.path = Path(path)
        self.capture = capture
        self.every = every
        self.first_batch = first_batch
        self.restore_optimizers = restore_optimizers
        self.on_saved = on_saved
        self._last = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.restore_optimizers is not None:
            for optimizer, state in zip(trainer.optimizers, self.restore_optimizers, strict=True):
                optimizer.load_state_dict(state)
            self.restore_optimizers = None
        self._last = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        if trainer.should_stop or trainer.is_last_batch:
            return  # the phase ends here: what follows it is not a mid-run state
        now = time.perf_counter()
        if now - self._last < self.every:
            return
        write_checkpoint(self.path, self.capture(trainer, self.first_batch + i + 1))
        self._last = time.perf_counter()
        if self.on_saved is not None:
            self.on_saved(self._last - now)


def write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Save ``state`` to ``path`` whole or not at all (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    torch.save(state, partial)
    os.replace(partial, path)


def read_checkpoint(path: Path | None) -> dict[str, Any] | None:
    """The state saved at ``path``; None when there is none."""
    if path is None or not Path(path).exists():
        return None
    # The sweep's own file: it holds NumPy random states, which weights_only refuses.
    state: dict[str, Any] = torch.load(path, weights_only=False)
    return state
