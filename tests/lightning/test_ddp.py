"""PlasticityCallback under DDP: CPU, gloo, 2 processes (tests/lightning/ddp_run.py).

Both rules train in parallel subprocesses once per module (about 15-25 s in all).
Under DDP the weights, and so the energy, are the same on every rank: the energy
is logged once, not summed over ranks. Sample counts and the mistake memory are
combined over ranks at every epoch end.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import IndexedData, PaperModule, trainer
from lightning.pytorch import strategies as lightning_strategies
from torch.utils.data import DistributedSampler

from energy_callbacks.lightning import PlasticityCallback
from energy_callbacks.reference import PaperMLP

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SCRIPT = HERE / "ddp_run.py"
RULES = ("mistakes", "track")
SPAWNED = "mistakes:ddp_spawn"  # the same run with the ranks in spawned child processes
WORLD = 2
EPOCHS = 2  # ddp_run.MAX_EPOCHS
BATCH = 8  # ddp_run.BATCH_SIZE, per rank
TIMEOUT = 300

# Variables that would make Lightning think it is already a DDP child or on a cluster.
SCRUB = ("LOCAL_RANK", "GLOBAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "GROUP_RANK")
SCRUB_PREFIXES = ("MASTER_", "SLURM_", "TORCHELASTIC_", "PL_", "LSB_", "OMPI_", "PMI_")


def child_env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in SCRUB and not k.startswith(SCRUB_PREFIXES)
    }
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


@pytest.fixture(scope="module")
def runs():
    """{rule: (rank0, rank1, metrics rows)} from one DDP run per rule, run in parallel."""
    with tempfile.TemporaryDirectory(prefix="ddp_") as tmp:
        procs = {}
        for rule in (*RULES, SPAWNED):
            out = Path(tmp) / rule
            cmd = [sys.executable, str(SCRIPT), str(out), *rule.split(":")]
            procs[rule] = (
                out,
                subprocess.Popen(
                    cmd,
                    cwd=ROOT,
                    env=child_env(),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                ),
            )
        results = {}
        failures = []
        for rule, (out, proc) in procs.items():
            try:
                log, _ = proc.communicate(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                log, _ = proc.communicate()
                failures.append(f"{rule}: timed out after {TIMEOUT} s\n{log[-4000:]}")
                continue
            if proc.returncode != 0:
                failures.append(f"{rule}: exit {proc.returncode}\n{log[-4000:]}")
                continue
            if rule == SPAWNED:
                results[rule] = dict(np.load(out / "main.npz"))
                continue
            ranks = [dict(np.load(out / f"rank{r}.npz")) for r in range(WORLD)]
            with open(out / "logs" / "version_0" / "metrics.csv", newline="") as f:
                rows = list(csv.DictReader(f))
            results[rule] = (*ranks, rows)
        if failures:
            pytest.fail("ddp_run.py failed:\n" + "\n\n".join(failures))
        yield results


def test_ddp_spawn_brings_rank_zeros_report_back_to_the_launching_process(runs):
    """Under ddp_spawn the callback in the launching process never trains: its report
    is rank 0's, sent back, and equals the same run under ddp (weights included)."""
    spawned, (r0, _, _) = runs[SPAWNED], runs["mistakes"]
    np.testing.assert_array_equal(spawned["weights"], r0["weights"])
    for key in ("m0", "steps", "samples_seen", "samples_learned"):
        assert int(spawned[key]) == int(r0[key]), key
    for key in ("m1", "m1_min"):
        assert float(spawned[key]) == pytest.approx(float(r0[key]), rel=1e-12), key
    np.testing.assert_array_equal(spawned["flagged"], r0["flagged"])


def n_train(digits) -> int:
    return len(digits[0])


def last_logged(rows: list[dict], key: str) -> float:
    values = [row[key] for row in rows if row.get(key)]
    assert values, f"{key} was never logged"
    return float(values[-1])


@pytest.mark.parametrize("rule", RULES)
def test_ddp_ranks_train_identical_weights(runs, rule):
    r0, r1, _ = runs[rule]
    assert int(r0["world_size"]) == int(r1["world_size"]) == WORLD
    assert np.array_equal(r0["weights"], r1["weights"])
    assert np.all(np.isfinite(r0["weights"]))


@pytest.mark.parametrize("rule", RULES)
def test_ddp_energy_same_on_ranks_and_logged_once(runs, rule):
    r0, r1, rows = runs[rule]
    for key in ("m1", "m0", "m1_min", "steps"):
        assert r0[key] == r1[key], key
    m1 = float(r0["m1"])
    assert m1 > 0
    # The epoch value is the total at epoch end: M1, not world_size * M1.
    logged = last_logged(rows, "plasticity/energy_epoch")
    assert logged == pytest.approx(m1, rel=1e-6)
    assert logged != pytest.approx(WORLD * m1, rel=1e-3)
    assert last_logged(rows, "plasticity/energy_step") <= logged
    assert last_logged(rows, "plasticity/updates_epoch") == float(r0["m0"])
    assert last_logged(rows, "plasticity/energy_min") == pytest.approx(float(r0["m1_min"]), 1e-6)


def sampler_order(n: int, rank: int, epoch: int) -> np.ndarray:
    """The ids Lightning's injected DistributedSampler (shuffle=True, seed=0) gives a rank.

    Lightning 2.x shuffles the training sampler even for a DataLoader with shuffle=False.
    """
    sampler = DistributedSampler(range(n), num_replicas=WORLD, rank=rank, shuffle=True, seed=0)
    sampler.set_epoch(epoch)
    return np.fromiter(sampler, dtype=np.int64)


@pytest.mark.parametrize("rule", RULES)
def test_ddp_sample_counts_summed_over_ranks(runs, rule, digits):
    r0, r1, rows = runs[rule]
    n = n_train(digits)
    per_rank = math.ceil(n / WORLD)  # DistributedSampler pads to a multiple of the world size
    for r, rank in enumerate((r0, r1)):
        want = np.concatenate([sampler_order(n, r, e) for e in range(EPOCHS)])
        np.testing.assert_array_equal(rank["seen_ids"], want)
    total = len(r0["seen_ids"]) + len(r1["seen_ids"])
    assert total == EPOCHS * WORLD * per_rank
    assert int(r0["samples_seen"]) == int(r1["samples_seen"]) == total
    assert int(r0["samples_learned"]) == int(r1["samples_learned"])
    assert int(r0["steps"]) <= EPOCHS * math.ceil(per_rank / BATCH)
    if rule == "mistakes":
        assert 0 < int(r0["samples_learned"]) < total
        assert 0 < last_logged(rows, "plasticity/samples_learned") < 1
    else:
        assert int(r0["samples_learned"]) == total
        assert last_logged(rows, "plasticity/samples_learned") == 1.0
        assert int(r0["steps"]) == EPOCHS * math.ceil(per_rank / BATCH)


def test_ddp_mistake_memories_merged(runs, digits):
    r0, r1, _ = runs["mistakes"]
    assert bool(r0["has_memory"]) and bool(r1["has_memory"])
    flagged = r0["flagged"]
    np.testing.assert_array_equal(flagged, r1["flagged"])
    assert flagged.size > 0
    assert flagged.max() < n_train(digits)
    # The memory holds flags raised on both ranks: ids only rank 0 saw and ids only rank 1 saw.
    only0 = np.setdiff1d(r0["seen_ids"], r1["seen_ids"])
    only1 = np.setdiff1d(r1["seen_ids"], r0["seen_ids"])
    assert np.intersect1d(flagged, only0).size > 0
    assert np.intersect1d(flagged, only1).size > 0


def test_ddp_track_matches_single_process(runs, digits):
    """DDP averages the two ranks' mean losses over 8 samples each: the same step as one
    process on the union of both ranks' batches (equal sizes, so mean of means = mean)."""
    r0, _, _ = runs["track"]
    x, y, _, _ = digits
    n = len(x)
    batches = []  # global batch k = rank 0's batch k + rank 1's batch k, epoch after epoch
    for epoch in range(EPOCHS):
        orders = [sampler_order(n, r, epoch) for r in range(WORLD)]
        for start in range(0, len(orders[0]), BATCH):
            batches.append(np.concatenate([o[start : start + BATCH] for o in orders]).tolist())
    torch.manual_seed(0)
    module = PaperModule(PaperMLP(64, 40, seed=0))
    callback = PlasticityCallback()
    data = torch.utils.data.DataLoader(IndexedData(x, y, np.arange(n)), batch_sampler=batches)
    trainer(max_epochs=1, callbacks=[callback]).fit(module, data)
    want = callback.report()
    weights = np.concatenate([p.detach().numpy().ravel() for p in module.parameters()])
    np.testing.assert_allclose(r0["weights"], weights, rtol=0, atol=1e-6)
    assert int(r0["steps"]) == want.steps
    assert int(r0["samples_seen"]) == want.samples_seen
    assert float(r0["m1"]) == pytest.approx(want.m1, rel=1e-5)
    assert int(r0["m0"]) == pytest.approx(want.m0, rel=1e-3)


class MyFSDP(lightning_strategies.FSDPStrategy):
    """A user's subclass of a refused strategy (FSDP1): refused like the strategy itself."""


class MyDeepSpeed(lightning_strategies.DeepSpeedStrategy):
    def __init__(self) -> None:  # DeepSpeed itself is not installed here
        pass


class StubTrainer:
    def __init__(self, strategy) -> None:
        self.strategy = strategy


SHARDED = [lightning_strategies.FSDPStrategy, MyFSDP, MyDeepSpeed]


@pytest.mark.parametrize("strategy", SHARDED, ids=lambda c: c.__name__)
def test_fsdp1_deepspeed_and_their_subclasses_are_refused_at_setup(strategy):
    callback = PlasticityCallback(synapses=0.1)
    module = PaperModule(PaperMLP(64, 40, seed=0))
    with pytest.raises(ValueError, match="ModelParallelStrategy and fully_shard") as err:
        callback.setup(StubTrainer(strategy()), module, "fit")
    assert strategy.__name__ in str(err.value)


def test_ddp_strategy_accepted_at_setup():
    callback = PlasticityCallback(synapses=0.1)
    strategy = lightning_strategies.DDPStrategy()
    callback.setup(StubTrainer(strategy), PaperModule(PaperMLP(64, 40, seed=0)), "fit")
