"""integrations/keras_fit: a plain Keras script with the callback, on the TF backend."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "integrations" / "keras_fit" / "train.py"
CHECK_SAVED = """
import sys, keras
from energy_callbacks.keras import PlasticityOptimizer
model = keras.models.load_model(sys.argv[1])
assert isinstance(model.optimizer, PlasticityOptimizer), type(model.optimizer)
print(model.optimizer.gate.flagged())
"""


def test_keras_script_logs_energy_and_saves_the_wrapper(tmp_path):
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--epochs", "2", "--hidden", "64", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "M1 " in run.stdout
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    energy = [float(r["plasticity/energy"]) for r in rows]
    assert 0 < energy[0] < energy[1]
    assert all(0 < float(r["plasticity/samples_learned"]) <= 1 for r in rows)
    assert float(rows[-1]["val_accuracy"]) > 0.5
    saved = subprocess.run(
        [sys.executable, "-c", CHECK_SAVED, str(tmp_path / "model.keras")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert saved.returncode == 0, saved.stderr[-3000:]
    assert int(saved.stdout.strip().splitlines()[-1]) > 0  # the mistake memory was saved
