"""Train the paper MLP with PlasticityCallback under DDP (CPU, gloo, 2 processes).

Run as ``python tests/lightning/ddp_run.py OUTDIR RULE [STRATEGY]`` (RULE: ``mistakes``
or ``track``; STRATEGY: ``ddp``, the default, or ``ddp_spawn``). Lightning's subprocess
launcher re-executes this script once per extra rank; the model and data come from
conftest.py next to it. Each rank writes ``OUTDIR/rank{R}.npz`` (final weights, the
callback's report, the mistake memory's flagged ids, the sample ids it trained on);
rank 0's CSVLogger writes ``OUTDIR/logs/version_0/metrics.csv``. Under ``ddp_spawn`` the
ranks are child processes and only the launching process goes on after ``fit``: it
writes ``OUTDIR/main.npz`` from what came back (the weights, the callback's report).
Not collected by pytest: tests/lightning/test_ddp.py runs it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import lightning.pytorch as pl  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from energy_callbacks import TopUnits  # noqa: E402
from energy_callbacks.data import load_digits, paper_inputs  # noqa: E402
from energy_callbacks.lightning import PlasticityCallback  # noqa: E402
from energy_callbacks.reference import PaperMLP  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import IndexedData, PaperModule  # noqa: E402

BATCH_SIZE = 8
MAX_EPOCHS = 2
HIDDEN = 40


def make_callback(rule: str) -> PlasticityCallback:
    if rule == "mistakes":
        return PlasticityCallback(
            units=TopUnits(0.2, path=True), synapses=0.2, samples="mistakes", log_every_n_steps=1
        )
    if rule == "track":
        return PlasticityCallback(log_every_n_steps=1)
    raise SystemExit(f"unknown rule {rule!r}: use 'mistakes' or 'track'")


class RecordingModule(PaperModule):
    """conftest's paper MLP, recording the sample ids this rank trains on."""

    def __init__(self, ref: PaperMLP) -> None:
        super().__init__(ref)
        self.seen_ids: list[int] = []

    def training_step(self, batch, batch_idx):
        self.seen_ids.extend(int(i) for i in batch["index"])
        return super().training_step(batch, batch_idx)


def digits_train() -> tuple[np.ndarray, np.ndarray]:
    ds = load_digits()
    x, _ = paper_inputs(ds.train.images)
    return x, ds.train.labels


def main(outdir: Path, rule: str, strategy: str = "ddp") -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = digits_train()
    # Lightning injects DistributedSampler(shuffle=True, seed=0) for training loaders
    # whatever shuffle= says here (lightning 2.x); the test rebuilds that order.
    data = torch.utils.data.DataLoader(
        IndexedData(x, y, np.arange(len(y))), batch_size=BATCH_SIZE, shuffle=False
    )
    module = RecordingModule(PaperMLP(64, HIDDEN, seed=0))
    callback = make_callback(rule)
    # --8<-- [start:fit]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=MAX_EPOCHS,
        callbacks=[callback],
        logger=CSVLogger(str(outdir), name="logs", version=0),
        log_every_n_steps=1,
        use_distributed_sampler=True,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, data)

    report = callback.report()
    # --8<-- [end:fit]
    memory = getattr(callback.plasticity.samples, "memory", None)
    np.savez(
        outdir / ("main.npz" if strategy == "ddp_spawn" else f"rank{trainer.global_rank}.npz"),
        weights=np.concatenate([p.detach().cpu().numpy().ravel() for p in module.parameters()]),
        m1=report.m1,
        m0=report.m0,
        m1_min=report.m1_min,
        steps=report.steps,
        samples_seen=report.samples_seen,
        samples_learned=report.samples_learned,
        flagged=memory.flagged() if memory is not None else np.zeros(0, dtype=np.int64),
        has_memory=memory is not None,
        seen_ids=np.asarray(module.seen_ids, dtype=np.int64),
        world_size=trainer.world_size,
    )


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        raise SystemExit("usage: python tests/lightning/ddp_run.py OUTDIR RULE [STRATEGY]")
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    main(out, *sys.argv[2:])
