"""integrations/keras_fit: a plain Keras script with the callback, on the TF backend:
the energy reaches CSVLogger, TensorBoard and the saved model."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "integrations" / "keras_fit" / "train.py"
CHECK_SAVED = """
import json, sys, keras
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util.tensor_util import make_ndarray
from energy_callbacks.keras import PlasticityOptimizer
model = keras.models.load_model(sys.argv[1] + "/model.keras")
assert isinstance(model.optimizer, PlasticityOptimizer), type(model.optimizer)
events = EventAccumulator(sys.argv[1] + "/tensorboard/train", size_guidance={"tensors": 0})
events.Reload()
energy = [float(make_ndarray(e.tensor_proto)) for e in events.Tensors("epoch_plasticity/energy")]
print(json.dumps({"flagged": int(model.optimizer.gate.flagged()), "tensorboard": energy}))
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
        [sys.executable, "-c", CHECK_SAVED, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert saved.returncode == 0, saved.stderr[-3000:]
    checked = json.loads(saved.stdout.strip().splitlines()[-1])
    assert checked["flagged"] > 0  # the mistake memory was saved with the model
    assert checked["tensorboard"] == pytest.approx(energy, rel=1e-6)  # TensorBoard has M1 too
