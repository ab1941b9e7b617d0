"""PlasticityCallback under ModelParallelStrategy with FSDP2 (CPU, gloo, 2 processes).

Run as ``python tests/lightning/model_parallel_run.py OUTDIR MODE`` (Lightning's
launcher starts the second process). MODE:

- ``whole``: 8 epochs of one step, a full checkpoint (``save_distributed_checkpoint=False``)
  every 4;
- ``killed``: the same run with distributed checkpoints, SIGKILLed by itself at step 6
  (after the step-4 checkpoint);
- ``resumed``: 8 steps from ``OUTDIR/../killed/ckpt/step=4.ckpt``;
- ``full-resumed``: 8 steps from ``OUTDIR/../whole/ckpt/step=4.ckpt``.

Each rank writes ``OUTDIR/rank<R>.json``: the callback's report, a witness's sum of
the changes of the gathered weights around every step, and the final weights.
Not collected by pytest: tests/lightning/test_model_parallel.py runs it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

from energy_callbacks import Caching, TopFraction, TopUnits
from energy_callbacks.lightning import PlasticityCallback

STEPS = 8
KILL_AT = 6


# --8<-- [start:module]
class Sharded(pl.LightningModule):
    """A 20-33-3 classifier (33 units split 17/16) sharded in configure_model."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(20, 33), nn.ReLU(), nn.Linear(33, 3))

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for layer in (self.net[0], self.net[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    # --8<-- [end:module]

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def full(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.full_tensor().detach().clone() for n, p in module.named_parameters()}


class Witness(Callback):
    """Sums the changes of the gathered weights around every training batch."""

    def __init__(self, kill: bool) -> None:
        self.kill = kill
        self.m1, self.m0 = 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = full(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        after = full(pl_module)
        for n, w in after.items():
            d = (w - self.before[n]).double()  # float32 weights: the change in float32
            self.m1 += float(d.abs().sum())
            self.m0 += int(torch.count_nonzero(d))
        if self.kill and trainer.global_step == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(16, 20, generator=g), torch.randint(0, 3, (16,), generator=g))
    distributed = mode in ("killed", "resumed")  # else one full file, from rank 0
    # --8<-- [start:trainer]
    callback = PlasticityCallback(
        units=TopUnits(0.25, path=True),
        synapses=TopFraction(0.2),
        samples="lazy",
        caching=Caching(theta=0.03, tau=math.inf, maintenance_cost=0.1),
        adjacency=[("net.0", "net.2")],
    )
    witness = Witness(kill=mode == "killed")
    checkpoints = ModelCheckpoint(  # an epoch is one step: 16 samples, 8 on each process
        dirpath=out / "ckpt", filename="{step}", every_n_epochs=4, save_top_k=-1
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(
            data_parallel_size=2,
            tensor_parallel_size=1,
            save_distributed_checkpoint=distributed,
        ),
        max_epochs=STEPS,
        callbacks=[callback, witness, checkpoints],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # --8<-- [end:trainer]
    model = Sharded()
    resume = {  # a distributed checkpoint, or a full one (one file, written by rank 0)
        "resumed": out.parent / "killed" / "ckpt" / "step=4.ckpt",
        "full-resumed": out.parent / "whole" / "ckpt" / "step=4.ckpt",
    }.get(mode)
    trainer.fit(model, DataLoader(data, batch_size=8, shuffle=False), ckpt_path=resume)
    report = callback.report()
    weights = full(model)
    result = {
        "world": trainer.world_size,
        "m1": report.m1,
        "m0": report.m0,
        "m1_min": report.m1_min,
        "m0_min": report.m0_min,
        "energy": report.energy,
        "consolidations": report.consolidations,
        "steps": report.steps,
        "learned": report.samples_learned,
        "seen": report.samples_seen,
        "witness_m1": witness.m1,
        "witness_m0": witness.m0,
        "weights": {n: w.tolist() for n, w in weights.items()},
        "local_rows": {n: list(p.to_local().shape) for n, p in model.named_parameters()},
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
