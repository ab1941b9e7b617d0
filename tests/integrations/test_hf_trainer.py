"""integrations/hf_trainer: a Trainer fine-tuning script with the callback dropped in;
the rules apply, the energy is logged, and a resumed run carries the totals on."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[2] / "integrations" / "hf_trainer" / "train.py"


def load_script():
    spec = importlib.util.spec_from_file_location("energy_callbacks_hf_trainer_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_trainer_script_applies_the_rules_and_resumes(tmp_path, capsys):
    script = load_script()
    out = str(tmp_path / "run")
    first = script.main(["--steps", "40", "--out", out])
    report = first["report"]
    assert "M1 " in capsys.readouterr().out
    assert report.steps == 40
    sizes = [p.numel() for p in first["trainer"].model.parameters()]
    assert 0 < report.m0 <= 40 * sum(math.ceil(0.1 * n) for n in sizes)  # top 10% per step
    assert 0 < report.samples_learned <= report.samples_seen == 40 * 32
    logged = [r for r in first["trainer"].state.log_history if "loss" in r]
    assert [r["step"] for r in logged] == [20, 40]
    assert logged[-1]["plasticity/updates"] == report.m0

    again = script.main(["--steps", "50", "--out", out, "--resume"])["report"]
    assert again.steps == 50  # the 40 steps of checkpoint-40, and 10 more
    assert again.m0 > report.m0
    assert again.samples_seen == 1347 + (50 - 43) * 32  # an epoch is 43 batches, the last of 3
