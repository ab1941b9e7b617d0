"""The Trainer callback under DDP: ``torchrun --nproc_per_node 2`` on the CPU (gloo),
tests/transformers/trainer_ddp_run.py. The weights, and so the energy, are the same on every
rank; sample counts and the mistake memory are combined over ranks at each epoch end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SCRUB = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK")
SCRUB_PREFIXES = ("MASTER_", "TORCHELASTIC_", "ACCELERATE_")


@pytest.fixture(scope="module")
def ranks():
    env = {
        k: v for k, v in os.environ.items() if k not in SCRUB and not k.startswith(SCRUB_PREFIXES)
    }
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    env["TRANSFORMERS_VERBOSITY"] = "error"
    with tempfile.TemporaryDirectory(prefix="hf_ddp_") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",  # a free port on this host
            "--nproc_per_node",
            "2",
            str(HERE / "trainer_ddp_run.py"),
            tmp,
        ]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
        yield [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(2)]


def test_every_rank_reports_the_same_figures(ranks):
    a, b = ranks
    assert a["world"] == 2
    assert a == b  # energy, counts, memory, weights: the same on both ranks


def test_the_energy_is_the_witness_s_and_counted_once(ranks):
    a = ranks[0]
    assert a["m0"] == a["witness_m0"] > 0
    assert a["m1"] == pytest.approx(a["witness_m1"], rel=1e-12)
    assert a["logged"][-1] == a["m0"]  # logged once, not summed over ranks


def test_sample_counts_and_the_mistake_memory_cover_both_ranks(ranks):
    a = ranks[0]
    from trainer_ddp_run import EPOCHS, SAMPLES

    assert a["seen"] == EPOCHS * SAMPLES  # each rank saw half of every epoch
    assert 0 < a["learned"] < a["seen"]
    assert sum(a["flagged"]) > 0
