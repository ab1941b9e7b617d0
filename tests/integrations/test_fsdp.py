"""integrations/fsdp: a plain torch loop sharded with fully_shard over 2 CPU processes
(torchrun, gloo), plasticity attached; a resumed run carries the totals on."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "integrations" / "fsdp" / "train.py"
SCRUB = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK")

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on Linux")


def torchrun(*args: str) -> str:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in SCRUB and not k.startswith(("MASTER_", "TORCHELASTIC_"))
    }
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*cmd, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def steps(line: str) -> int:
    return int(re.search(r"steps (\d+)", line).group(1))


def test_the_sharded_loop_masks_measures_and_resumes(tmp_path):
    out = str(tmp_path / "run")
    first = torchrun("--epochs", "1", "--out", out)
    epochs = [line for line in first.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 0"]
    assert steps(epochs[0]) > 0
    # each process holds half the rows: 100 hidden units, 10 outputs
    assert "'0.weight': [50, 64]" in first and "'2.bias': [5]" in first
    again = torchrun("--epochs", "2", "--out", out, "--resume")
    last = [line for line in again.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in last] == ["epoch 1"]
    assert steps(last[0]) > steps(epochs[0])  # the saved epoch's steps, and more
