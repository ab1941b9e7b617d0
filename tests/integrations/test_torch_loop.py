"""integrations/torch_loop: a plain PyTorch loop with ``attach``; the rules really apply."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "integrations" / "torch_loop" / "train.py"


def load_script():
    spec = importlib.util.spec_from_file_location("energy_callbacks_torch_loop_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_loop_applies_the_rules_and_detaches(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    result = load_script().main(["--epochs", "2", "--hidden", "32"])
    report, model, optimizer = result["report"], result["model"], result["optimizer"]
    assert "M1 " in capsys.readouterr().out

    batches = 2 * math.ceil(1347 / 32)
    assert 0 < report.steps <= batches  # a batch with no mistake skips its step
    assert report.samples_seen == 2 * 1347
    assert 0 < report.samples_learned < report.samples_seen  # lazy: correct samples skip
    # TopFraction(0.1) keeps exactly round(0.1 n) entries of each tensor per step
    sizes = [p.numel() for p in model.parameters()]
    per_step = sum(max(1, round(0.1 * n)) for n in sizes)
    assert 0.9 * report.steps * per_step <= report.m0 <= report.steps * per_step
    assert report.m1 >= report.m1_min > 0 and report.inefficiency >= 1
    assert result["accuracy"] > 0.5
    # detach() took every hook and wrapper away
    assert "step" not in optimizer.__dict__
    assert not model._forward_hooks
