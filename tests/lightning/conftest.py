"""Shared pieces for the Lightning adapter tests."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class PaperModule(pl.LightningModule):
    """The reference MLP (SCIENCE.md section 3) as a LightningModule.

    Weights are copied from a :class:`~energy_callbacks.reference.PaperMLP` so the
    NumPy oracle and Lightning start from the same numbers. The loss is
    ``mean_b 0.5 * ||y_b - onehot_b||^2`` like the oracle's.
    """

    def __init__(self, ref, lr: float = 0.01, optimizer: str = "sgd") -> None:
        super().__init__()
        n_in, n_hidden, n_out = ref.sizes
        self.net = nn.Sequential(
            nn.Linear(n_in, n_hidden), nn.LeakyReLU(ref.slope), nn.Linear(n_hidden, n_out)
        )
        with torch.no_grad():
            for p, w in zip(self.net.parameters(), ref.params):
                p.copy_(torch.from_numpy(w))
        self.n_out = n_out
        self.lr = lr
        self.optimizer = optimizer

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch["x"], batch["y"]
        out = self(x)
        target = nn.functional.one_hot(y, self.n_out).to(out.dtype)
        return 0.5 * ((out - target) ** 2).sum(1).mean()

    def configure_optimizers(self):
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class IndexedData(torch.utils.data.Dataset):
    """Dict samples {x, y, index} in a fixed order (the index is the sample id)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, order: np.ndarray) -> None:
        self.x, self.y, self.order = x, y, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict:
        j = int(self.order[i])
        return {"x": torch.from_numpy(self.x[j]), "y": int(self.y[j]), "index": j}


def trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


@pytest.fixture(scope="session")
def digits():
    """The bundled digits set, preprocessed as in the reference experiment."""
    from energy_callbacks.data import load_digits, paper_inputs

    ds = load_digits()
    x, mean = paper_inputs(ds.train.images)
    x_test, _ = paper_inputs(ds.test.images, mean)
    return x, ds.train.labels, x_test, ds.test.labels
