"""Mid-run checkpoints of `reproduce`: a run stopped and resumed (once or twice) is the
run that was never stopped, to the last weight, energy total and test point."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from sklearn.datasets import load_digits

from energy_callbacks.reproduce import resume
from energy_callbacks.reproduce.concentration import UnitEnergy
from energy_callbacks.reproduce.paper import fit_paper
from energy_callbacks.reproduce.rules import get_rule
from energy_callbacks.reproduce.runner import RunResult, Sweep


class Killed(Exception):
    """The process ends here (the sweep's session ran out)."""


class KillAt(Callback):
    """Raise before the training step that would see sample number ``at`` + 1."""

    def __init__(self, at: int | None) -> None:
        self.at, self.seen = at, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.at is not None and self.seen >= self.at:
            raise Killed
        self.seen += len(batch["y"])

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state_dict):
        self.seen = state_dict["seen"]


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0 - 0.3).astype(np.float32)
    return x[:1500], y[:1500].astype(np.int64), x[1500:], y[1500:].astype(np.int64)


def two_phases(y):
    """The class-incremental set-up: classes 0-4, then every sample (noting a count)."""
    first = np.flatnonzero(y < 5)

    def second(energy):
        memory = energy.plasticity.samples.memory
        return np.arange(len(y)), {"flagged": int(len(memory.flagged()))}

    return [first, second]


CASES = {
    # rule, batch size, skip_backward, loss, two phases, unit energies
    "combined path + top fraction": ("combined", 1, False, "mse", False, False),
    "lazy, backward over learners only": ("lazy", 4, True, "cross_entropy", False, False),
    "memorized mistakes, two phases": ("mistakes", 1, False, "cross_entropy", True, False),
    "backprop with a unit-energy callback": ("backprop", 2, False, "mse", False, True),
}


def run(digits, case, kill_at, checkpoint):
    rule, batch, skip, loss, phased, units = CASES[case]
    x, y, xt, yt = digits
    extra = [KillAt(kill_at)] + ([UnitEnergy()] if units else [])
    got = fit_paper(
        get_rule(rule).build(40, 1),
        x,
        y,
        xt,
        yt,
        n_hidden=40,
        loss=loss,
        max_samples=240,
        eval_every=50,
        seed=1,
        batch_size=batch,
        skip_backward=skip,
        phases=two_phases(y) if phased else None,
        callbacks=extra,
        checkpoint=checkpoint,
        checkpoint_every=0.0,
    )
    return got, extra


@pytest.mark.parametrize("case", list(CASES))
def test_a_run_killed_twice_and_resumed_is_the_run_never_killed(digits, case, tmp_path):
    want, want_extra = run(digits, case, None, None)
    path = tmp_path / "run.pt"
    phased = CASES[case][4]
    kills = (180, 330) if phased else (70, 170)  # the first kill of a phased run: phase 2
    for at in kills:
        with pytest.raises(Killed):
            run(digits, case, at, path)
        assert path.exists()
    got, got_extra = run(digits, case, None, path)

    for a, b in zip(got.module.parameters(), want.module.parameters(), strict=True):
        assert torch.equal(a, b)
    assert (got.report.m1, got.report.m0) == (want.report.m1, want.report.m0)
    assert got.report.m1_min == want.report.m1_min
    assert got.report.samples_seen == want.report.samples_seen
    assert got.report.samples_learned == want.report.samples_learned
    for field in ("samples", "accuracy", "m1", "m0", "learned"):
        assert getattr(got.curve, field) == getattr(want.curve, field), field
    assert got.samples == want.samples and got.phase_ends == want.phase_ends
    assert got.notes == want.notes
    if phased:
        assert got.notes[1]["flagged"] > 0
    if CASES[case][5]:
        assert torch.equal(got_extra[1].energy, want_extra[1].energy)
    assert got.curve.seconds[-1] > 0


def test_a_sweep_resumes_its_unfinished_run_and_drops_the_checkpoint_once_kept(
    digits, tmp_path, monkeypatch, capsys
):
    """The sweep hands each run its checkpoint, keeps it while the run is unfinished, says
    that it resumes from it, and deletes it once the run's row is written."""
    monkeypatch.setattr(resume, "CHECKPOINT_SECONDS", 0.0)
    x, y, xt, yt = digits
    sweep = Sweep(tmp_path, "resume")
    kill = [100]
    seen_paths = []

    def execute(spec):
        seen_paths.append(spec.checkpoint)
        got = fit_paper(
            get_rule("backprop").build(30, 0),
            x,
            y,
            xt,
            yt,
            n_hidden=30,
            max_samples=200,
            eval_every=50,
            callbacks=[KillAt(kill[0])],
            checkpoint=spec.checkpoint,
        )
        return RunResult({"samples": got.samples, "m1": got.report.m1}, got.curve)

    from energy_callbacks.reproduce.runner import RunSpec

    spec = RunSpec("resume|digits|N=30", "N=30")
    with pytest.raises(Killed):
        sweep.run([spec], execute, show_progress=False)
    assert seen_paths[0] == sweep.checkpoint(spec.key) and seen_paths[0].exists()
    kill[0] = None
    rows = sweep.run([spec], execute)
    assert f"N=30 resumes from {seen_paths[0]}\n" in capsys.readouterr().err
    assert rows[0]["samples"] == 200 and not seen_paths[0].exists()
    assert sweep.curves()[spec.key].samples == [50, 100, 150, 200]
