"""One Trainer run under DDP (CPU, gloo): launched by test_trainer_ddp.py with
``torchrun --nproc_per_node 2 trainer_ddp_run.py OUT``. Each rank writes ``OUT/rank<r>.json``:
its report, its witness's sums and a digest of its weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_models import Sequences, Witness, tiny_bert, trainer  # noqa: E402

from energy_callbacks.transformers import PlasticityCallback  # noqa: E402

EPOCHS = 2
SAMPLES = 48  # 3 steps of 8 per rank and epoch


def main(out: Path) -> None:
    callback = PlasticityCallback(synapses=0.1, samples="mistakes")
    witness = Witness()
    model = tiny_bert(dropout=0.0)
    run = trainer(
        model,
        out / "trainer",
        [callback, witness],
        data=Sequences(n=SAMPLES, ids=True),
        max_steps=-1,
        num_train_epochs=EPOCHS,
        remove_unused_columns=False,
        ddp_backend="gloo",
    )
    run.train()
    report = callback.report()
    rank = torch.distributed.get_rank()
    flags = callback.plasticity.samples.memory.get(list(range(SAMPLES)))
    record = {
        "world": torch.distributed.get_world_size(),
        "m1": report.m1,
        "m0": report.m0,
        "m1_min": report.m1_min,
        "steps": report.steps,
        "seen": report.samples_seen,
        "learned": report.samples_learned,
        "flagged": [int(f) for f in flags],
        "witness_m1": witness.m1,
        "witness_m0": witness.m0,
        "weights": float(sum(p.detach().double().abs().sum() for p in model.parameters())),
        "logged": [r.get("plasticity/updates") for r in run.state.log_history if "loss" in r],
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
