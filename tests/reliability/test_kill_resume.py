"""A training process killed mid-epoch: a real subprocess, SIGKILL, and a resume from the
last (mid-epoch) checkpoint in a new process, in Lightning and in Keras. The resumed run
ends with the same energy totals, mistake flags and weights, bit for bit, as a run that
was never interrupted (so also as an uninterrupted run from that checkpoint).

The scripts: kill_lightning.py and kill_keras.py (what each framework restores mid-epoch
is in their docstrings and docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent
TIMEOUT = 600


def env(**extra: str) -> dict[str, str]:
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **extra)


def run(script: str, *args: str, environ: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, str(HERE / script), *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def kill_when_ready(script: str, workdir: Path, step: int, environ: dict[str, str]) -> int:
    """Start a run, SIGKILL it once it reached ``step``; its return code."""
    proc = subprocess.Popen(
        [sys.executable, str(HERE / script), "run", str(workdir), str(step)],
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + TIMEOUT
    try:
        while not (workdir / "ready").exists():
            if proc.poll() is not None:
                pytest.fail(f"{script} ended before it was killed:\n{proc.stderr.read()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{script} did not reach step {step}")
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def same_run(straight: dict, resumed: dict) -> None:
    for key in ("m1", "m0", "m1_min", "steps", "seen", "learned", "per_layer", "flagged"):
        assert resumed[key] == straight[key], key
    assert resumed["weights"] == straight["weights"]
    assert straight["flagged"] and straight["steps"] > 0


def test_lightning_killed_mid_epoch_resumes_to_the_same_end(tmp_path):
    environ = env()
    run("kill_lightning.py", "straight", str(tmp_path), environ=environ)
    assert kill_when_ready("kill_lightning.py", tmp_path, 13, environ) == -signal.SIGKILL
    checkpoints = sorted(p.name for p in (tmp_path / "ckpt").glob("*.ckpt"))
    assert checkpoints == ["step=12.ckpt", "step=3.ckpt", "step=6.ckpt", "step=9.ckpt"]
    run("kill_lightning.py", "resume", str(tmp_path), environ=environ)
    straight = json.loads((tmp_path / "straight.json").read_text())
    resumed = json.loads((tmp_path / "resume.json").read_text())
    assert resumed["resumed_from"] == "step=12.ckpt"  # epoch 1, after batch 4 of 8
    assert resumed["global_step"] == straight["global_step"] == 24
    same_run(straight, resumed)


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_keras_killed_mid_epoch_resumes_to_the_same_end(tmp_path, backend):
    environ = env(KERAS_BACKEND=backend)
    run("kill_keras.py", "straight", str(tmp_path), environ=environ)
    assert kill_when_ready("kill_keras.py", tmp_path, 14, environ) == -signal.SIGKILL
    run("kill_keras.py", "resume", str(tmp_path), environ=environ)
    straight = json.loads((tmp_path / "straight.json").read_text())
    resumed = json.loads((tmp_path / "resume.json").read_text())
    assert resumed["resumed_from"] == "e2-b4.keras"  # epoch 1, after batch 4 of 8
    assert resumed["iterations"] == straight["iterations"]
    same_run(straight, resumed)
