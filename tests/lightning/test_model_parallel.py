"""PlasticityCallback under ModelParallelStrategy with FSDP2 on the CPU (gloo, 2
processes), tests/lightning/model_parallel_run.py: the figures equal a witness that
gathers the weights around every step, and a run SIGKILLed after a distributed
checkpoint resumes to the same weights and figures as a run never stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from lightning.pytorch import strategies as lightning_strategies

from energy_callbacks import TopUnits
from energy_callbacks.lightning import PlasticityCallback

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SCRIPT = HERE / "model_parallel_run.py"
SCRUB = ("LOCAL_RANK", "GLOBAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "GROUP_RANK")
SCRUB_PREFIXES = ("MASTER_", "SLURM_", "TORCHELASTIC_", "PL_", "LSB_", "OMPI_", "PMI_")

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="2 CPU processes with gloo")


def launch(out: Path, mode: str) -> subprocess.CompletedProcess:
    env = {
        k: v for k, v in os.environ.items() if k not in SCRUB and not k.startswith(SCRUB_PREFIXES)
    }
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, str(SCRIPT), str(out), mode]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs():
    with tempfile.TemporaryDirectory(prefix="model_parallel_") as tmp:
        out = {}
        for mode in ("whole", "killed", "resumed", "full-resumed"):
            done = launch(Path(tmp) / mode, mode)
            if mode == "killed":
                assert done.returncode == -9, done.stderr[-3000:]  # SIGKILL
                continue
            assert done.returncode == 0, done.stderr[-3000:]
            out[mode] = [
                json.loads((Path(tmp) / mode / f"rank{r}.json").read_text()) for r in (0, 1)
            ]
        checkpoint = Path(tmp) / "killed" / "ckpt" / "step=4.ckpt"
        keys = torch.distributed.checkpoint.FileSystemReader(str(checkpoint)).read_metadata()
        out["checkpoint_keys"] = sorted(keys.state_dict_metadata)
        yield out


def test_ranks_agree_and_the_energy_is_the_witness_s(runs):
    a, b = runs["whole"]
    assert a["energy"] != a["m1"]  # caching: consolidation + maintenance, some still held
    assert a["world"] == 2
    assert {k: v for k, v in a.items() if k != "local_rows"} == {
        k: v for k, v in b.items() if k != "local_rows"
    }
    assert a["m0"] == a["witness_m0"] > 0
    assert a["m1"] == pytest.approx(a["witness_m1"], rel=1e-12)
    assert a["seen"] == 8 * 16  # 8 epochs of 16 samples, counted over both processes
    assert a["local_rows"]["net.0.weight"] == [17, 20]
    assert b["local_rows"]["net.0.weight"] == [16, 20]


def test_a_killed_run_resumes_from_its_distributed_checkpoint_exactly(runs):
    whole = runs["whole"][0]
    for resumed in runs["resumed"]:
        assert resumed["weights"] == whole["weights"]
        keys = ("m1", "m0", "m1_min", "m0_min", "steps", "learned", "seen", "energy")
        for key in (*keys, "consolidations"):
            assert resumed[key] == whole[key], key


def test_the_checkpoint_keeps_each_rank_s_rows_of_w0_beside_the_weights(runs):
    keys = runs["checkpoint_keys"]
    for name in ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"):
        assert f"state_dict.energy_callbacks.initial.{name}" in keys
        assert f"state_dict.energy_callbacks.store.{name}" in keys  # synaptic caching
        assert f"state_dict.{name}" in keys


class TensorParallel(lightning_strategies.ModelParallelStrategy):
    """A strategy whose mesh splits layers over 2 processes (no processes started)."""

    class Mesh:
        ndim = 2

        def __getitem__(self, name):
            size = 2 if name == "tensor_parallel" else 1
            return type("Dim", (), {"size": lambda self: size})()

    @property
    def device_mesh(self):
        return self.Mesh()


class StubTrainer:
    def __init__(self, strategy) -> None:
        self.strategy = strategy


def test_tensor_parallelism_is_refused_at_setup():
    callback = PlasticityCallback(synapses=0.1)
    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        callback.setup(StubTrainer(TensorParallel()), None, "fit")


def test_unit_rules_need_their_wiring_given_under_model_parallel():
    class DataParallel(TensorParallel):
        class Mesh(TensorParallel.Mesh):
            ndim = 1

    with pytest.raises(ValueError, match="adjacency="):
        PlasticityCallback(units=TopUnits(0.5)).setup(StubTrainer(DataParallel()), None, "fit")


def test_a_full_checkpoint_holds_w0_and_the_store_whole_and_resumes_exactly(runs):
    """save_distributed_checkpoint=False: one file from rank 0, w_0 and the caching store
    gathered whole like the weights; each rank takes its rows back on resume."""
    whole = runs["whole"][0]
    for resumed in runs["full-resumed"]:
        assert resumed["weights"] == whole["weights"]
        for key in ("m1", "m0", "m1_min", "m0_min", "energy", "consolidations", "seen"):
            assert resumed[key] == whole[key], key
