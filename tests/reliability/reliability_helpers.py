"""Small models, batches and trainers shared by the reliability tests."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator

import lightning.pytorch as pl
import torch
from torch import nn

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def batches(n: int, size: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(size, 6, generator=g)
        out.append((x, (x[:, :3] * 3).argmax(1)))
    return out


def plasticity_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith("plasticity:")]


class Tiny(pl.LightningModule):
    """The 6-8-3 MLP as a LightningModule; batches are (x, y); ``scale`` multiplies
    the loss of the batches whose index is in ``bad`` (inf/NaN/huge)."""

    def __init__(self, bad: dict[int, float] | None = None, optimizer: str = "sgd") -> None:
        super().__init__()
        self.net = mlp()
        self.bad = bad or {}
        self.optimizer = optimizer

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        return loss * self.bad.get(batch_idx, 1.0)

    def configure_optimizers(self):
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-2)
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader(data: list[tuple[torch.Tensor, torch.Tensor]]) -> Iterator:
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    size = len(data[0][0])
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=size)


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
