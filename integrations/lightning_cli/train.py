"""An ordinary Lightning pipeline: an MLP classifier on scikit-learn's digits.

Nothing here knows about energy_callbacks: the plasticity rules and their
energy log come in through one ``trainer.callbacks`` entry in ``config.yaml``.

Run::

    python integrations/lightning_cli/train.py fit --config integrations/lightning_cli/config.yaml
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from energy_callbacks.data import load_digits, paper_inputs


class DigitsClassifier(pl.LightningModule):
    """A one-hidden-layer MLP trained with cross-entropy."""

    def __init__(self, hidden: int = 64, lr: float = 0.2, n_in: int = 64, n_out: int = 10):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out))
        self.lr = lr
        self.val_acc = MulticlassAccuracy(num_classes=n_out, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.val_acc(logits, y)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class DigitsData(pl.LightningDataModule):
    """The bundled 8x8 digits, flattened and centred (the reference preprocessing)."""

    def __init__(self, batch_size: int = 32, num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        ds = load_digits(seed=self.seed)
        x, mean = paper_inputs(ds.train.images)
        x_val, _ = paper_inputs(ds.test.images, mean)
        self.train_set = TensorDataset(torch.from_numpy(x), torch.from_numpy(ds.train.labels))
        self.val_set = TensorDataset(torch.from_numpy(x_val), torch.from_numpy(ds.test.labels))

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            generator=generator,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256, num_workers=self.num_workers)


def main(args=None):
    return LightningCLI(
        DigitsClassifier, DigitsData, args=args, save_config_kwargs={"overwrite": True}
    )


if __name__ == "__main__":
    main()
