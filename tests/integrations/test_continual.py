"""integrations/continual: class-incremental learning, a replay buffer of flagged samples only."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from energy_callbacks.data import FASHION_MNIST_DIR

SCRIPT = Path(__file__).resolve().parents[2] / "integrations" / "continual" / "train.py"
HAVE_FASHION = (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file()


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("energy_callbacks_continual_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_buffer(run: dict, per_task: int) -> None:
    """The buffer holds the flagged samples of finished tasks and nothing else."""
    tasks, labels = run["tasks"], run["labels"]
    sizes = [t["buffer"] for t in tasks]
    assert sizes == sorted(sizes) and 0 < sizes[-1] < tasks[-1]["samples_so_far"]
    for t in tasks:
        old = np.isin(
            labels[t["buffer_ids"]], [c for task in tasks[: t["task"] + 1] for c in task["classes"]]
        )
        assert old.all() and len(set(t["buffer_ids"].tolist())) == t["buffer"]
    assert sorted(tasks[-1]["buffer_ids"].tolist()) == run["flagged"].tolist()
    assert len(tasks) == 10 // per_task


def test_digits_buffer_keeps_flagged_samples_only(script, capsys):
    run = script.main(
        ["--dataset", "digits", "--per-class", "30", "--hidden", "64", "--batch-size", "8"]
        + ["--epochs-per-task", "2"]
    )
    assert "replay buffer:" in capsys.readouterr().out
    check_buffer(run, per_task=2)
    tasks = run["tasks"]
    assert tasks[0]["accuracy_first"] > 0.8  # the first task is learnt
    assert all(0 < t["learned"] <= 1 for t in tasks)
    assert tasks[-1]["m0"] > tasks[0]["m0"] > 0


@pytest.mark.data
@pytest.mark.skipif(not HAVE_FASHION, reason=f"Fashion-MNIST not in {FASHION_MNIST_DIR}")
def test_fashion_mnist_slice_flagged_replay_against_none(script):
    argv = ["--dataset", "fashion-mnist", "--per-class", "60", "--hidden", "64"]
    flagged = script.main([*argv, "--epochs-per-task", "2"])
    none = script.main([*argv, "--epochs-per-task", "2", "--replay", "none"])
    check_buffer(flagged, per_task=2)
    assert all(t["buffer"] == 0 for t in none["tasks"])
    # without replay the first classes are forgotten; the flagged buffer keeps some of them
    assert none["tasks"][-1]["accuracy_first"] < 0.1
    assert flagged["tasks"][-1]["accuracy_first"] > none["tasks"][-1]["accuracy_first"] + 0.1
