"""One demo run through PyTorch Lightning with the energy callback.

An ordinary LightningModule (an MLP trained with cross-entropy and SGD), a
``CSVLogger`` and the callback: the energy lands in ``<out>/lightning/<rule>/metrics.csv``
next to ``val_accuracy``, which :mod:`energy_callbacks.plot` reads back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from ..core import Plasticity
from ..lightning import PlasticityCallback
from ..reproduce.runner import quiet_lightning
from .config import DemoConfig, DemoData, batches_per_epoch, epoch_order, initial_weights
from .result import RunResult


class DemoModule(pl.LightningModule):
    """The demo MLP (ReLU hidden layer, linear outputs), from given initial weights."""

    def __init__(self, weights: tuple[np.ndarray, ...], lr: float) -> None:
        super().__init__()
        w1, _, w2, _ = weights
        self.net = nn.Sequential(
            nn.Linear(w1.shape[1], w1.shape[0]), nn.ReLU(), nn.Linear(w2.shape[1], w2.shape[0])
        )
        with torch.no_grad():
            for p, w in zip(self.net.parameters(), weights, strict=True):
                p.copy_(torch.from_numpy(w))
        self.lr = lr
        # the fraction right over the whole validation set (summed over DDP ranks)
        self.val_accuracy = MulticlassAccuracy(num_classes=w2.shape[0], average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch["x"]), batch["y"])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["x"])
        self.log("val_loss", nn.functional.cross_entropy(logits, batch["y"]))
        self.val_accuracy(logits, batch["y"])
        self.log("val_accuracy", self.val_accuracy)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class IndexedSamples(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """``{"x", "y", "index"}`` samples; the index is the id the mistake memory keys on."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i], "index": torch.tensor(i)}


class EpochOrder(torch.utils.data.Sampler[int]):
    """:func:`~energy_callbacks.demo.config.epoch_order`; Lightning calls ``set_epoch``."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        return iter(epoch_order(self.n, self.seed, self.epoch).tolist())


class BatchTicks(Callback):
    """Calls ``tick()`` after every training batch (drives the demo's progress bar)."""

    def __init__(self, tick: Callable[[], None]) -> None:
        self.tick = tick

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self.tick()


def run_lightning(
    config: DemoConfig,
    data: DemoData,
    rule: str,
    plasticity: Plasticity,
    tick: Callable[[], None],
) -> RunResult:
    """Train the demo MLP with ``plasticity`` through Lightning; its figures and log file."""
    weights = initial_weights(data.x_train.shape[1], config.hidden, data.n_classes, config.seed)
    model = DemoModule(weights, config.lr)
    # The energy is logged once per epoch, at its last batch: the step at which
    # val_accuracy is logged, so each evaluation pairs with the energy spent up to it.
    # (Every step would cost a millisecond of Lightning's logging each.)
    every = batches_per_epoch(len(data.y_train), config.batch_size)
    energy = PlasticityCallback(plasticity, log_every_n_steps=every)
    log_dir = Path(config.out) / "lightning"
    train = torch.utils.data.DataLoader(
        IndexedSamples(data.x_train, data.y_train),
        batch_size=config.batch_size,
        sampler=EpochOrder(len(data.y_train), config.seed),
    )
    test = torch.utils.data.DataLoader(IndexedSamples(data.x_test, data.y_test), batch_size=1000)
    start = time.perf_counter()
    with quiet_lightning():
        logger = CSVLogger(log_dir, name=rule, version="")
        trainer = pl.Trainer(
            max_epochs=config.epochs,
            accelerator="cpu",
            devices=1,
            logger=logger,
            log_every_n_steps=every,
            callbacks=[energy, BatchTicks(tick)],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(model, train, test)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        predicted = model(torch.from_numpy(data.x_test)).argmax(1).numpy()
    return RunResult(
        framework="lightning",
        rule=rule,
        accuracy=float(np.mean(predicted == data.y_test)),
        report=energy.report(),
        seconds=seconds,
        log=Path(logger.log_dir) / "metrics.csv",
    )
