"""A Lightning run for test_kill_resume.py: ``python kill_lightning.py MODE WORKDIR [STEP]``.

- ``straight``: 3 epochs of 8 batches, never interrupted;
- ``run``: the same with a checkpoint every 3 optimizer steps; at step ``STEP`` it
  writes ``WORKDIR/ready`` and waits to be killed (the test sends SIGKILL);
- ``resume``: a new process resumes from the newest checkpoint and trains to the end.

``straight`` and ``resume`` write ``WORKDIR/<mode>.json``: the energy report, the mistake
flags and the weights. The data order is a function of (epoch, batch), and the loader
is resumable (``state_dict``/``load_state_dict``, which Lightning saves with the loops),
so a resumed epoch continues with the batch after the checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from energy_callbacks import RandomUnits, TopFraction
from energy_callbacks.lightning import PlasticityCallback

N, BATCH, EPOCHS = 64, 8, 3


class Indexed(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N, 6, generator=g)
        self.y = (self.x[:, :3] * 3).argmax(1)
        self.y[::5] = (self.y[::5] + 1) % 3  # some hard samples: mistakes to remember

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i], "index": i}


class EpochOrder(torch.utils.data.Sampler):
    """A new permutation each epoch (seeded by the epoch), from batch ``skip`` on.

    Lightning calls ``set_epoch`` before each epoch's iterator; ``trained`` counts the
    batches trained in the epoch (kept by :class:`Progress`)."""

    def __init__(self) -> None:
        self.epoch, self.skip, self.trained = 0, 0, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:  # a new epoch, not the one a checkpoint resumes
            self.epoch, self.skip, self.trained = epoch, 0, 0

    def __len__(self) -> int:
        return N

    def __iter__(self):
        order = np.random.default_rng([7, self.epoch]).permutation(N)
        yield from order[self.skip * BATCH :].tolist()


class ResumableLoader(torch.utils.data.DataLoader):
    """Saves the epoch and the batches trained in it (a Lightning ``_Stateful``)."""

    def __init__(self) -> None:
        self.order = EpochOrder()
        super().__init__(Indexed(), batch_size=BATCH, sampler=self.order)

    def state_dict(self) -> dict:
        return {"epoch": self.order.epoch, "trained": self.order.trained}

    def load_state_dict(self, state: dict) -> None:
        self.order.epoch = state["epoch"]
        self.order.skip = self.order.trained = state["trained"]


class Progress(Callback):
    """Counts the batches trained in the epoch, before ModelCheckpoint (it runs last)."""

    def __init__(self, loader: ResumableLoader) -> None:
        self.loader = loader

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.loader.order.trained += 1


class WaitToBeKilled(Callback):
    def __init__(self, step: int, workdir: Path) -> None:
        self.step, self.workdir = step, workdir

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            (self.workdir / "ready").write_text(str(trainer.global_step))
            while True:
                time.sleep(1)


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch["x"]), batch["y"])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.02)


def callback() -> PlasticityCallback:
    """Rules with state: a step-seeded random control, a top fraction, a mistake memory."""
    return PlasticityCallback(
        units=RandomUnits(0.5, seed=3), synapses=TopFraction(0.5), samples="mistakes"
    )


def main() -> None:
    mode, workdir = sys.argv[1], Path(sys.argv[2])
    loader, energy = ResumableLoader(), callback()
    callbacks: list[Callback] = [Progress(loader), energy]
    ckpt_path = None
    ckpts = workdir / "ckpt"
    if mode == "run":
        callbacks += [
            ModelCheckpoint(dirpath=ckpts, filename="{step}", every_n_train_steps=3, save_top_k=-1),
            WaitToBeKilled(int(sys.argv[3]), workdir),
        ]
    elif mode == "resume":
        ckpt_path = max(ckpts.glob("*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=EPOCHS,
        logger=False,
        enable_checkpointing=mode == "run",
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        callbacks=callbacks,
    )
    module = Net()
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    report = energy.report()
    memory = energy.plasticity.samples.memory
    result = {
        "m1": report.m1,
        "m0": report.m0,
        "m1_min": report.m1_min,
        "steps": report.steps,
        "seen": report.samples_seen,
        "learned": report.samples_learned,
        "per_layer": {k: [v.m1, v.m0, v.m1_min] for k, v in report.per_layer.items()},
        "flagged": memory.flagged().tolist(),
        "weights": [p.detach().numpy().ravel().tolist() for p in module.parameters()],
        "resumed_from": None if ckpt_path is None else ckpt_path.name,
        "global_step": trainer.global_step,
    }
    (workdir / f"{mode}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
