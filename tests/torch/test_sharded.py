"""``attach`` on FSDP2-sharded models: ``torchrun --nproc_per_node 2`` on the CPU (gloo),
tests/torch/sharded_run.py. Each process measures its own rows; the figures read
are sums over both, equal to a witness that gathers the whole weights around
every step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SCRUB = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK")
CASES = ["regression", "classification", "lazy", "nan", "regression-bf16"]
RULES = [
    "top-fraction",
    "approximate",
    "per-unit",
    "equal-count",
    "smallest",
    "threshold",
    "random-synapses",
    "fixed",
    "top-units",
    "path",
    "random-units",
    "combined",
]
RULES_BF16 = ["tracking-bf16", "top-fraction-bf16", "combined-bf16"]

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on Linux")


def torchrun(script: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in SCRUB and not k.startswith(("MASTER_", "TORCHELASTIC_"))
    }
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc_per_node", "2", str(script), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ranks():
    with tempfile.TemporaryDirectory(prefix="fsdp_") as tmp:
        cases = ",".join(
            [
                *CASES,
                *RULES,
                *RULES_BF16,
                "refusals",
                "checkpoint",
                "selections",
                "caching",
                "checkpoint-caching",
            ]
        )
        done = torchrun(HERE / "sharded_run.py", tmp, cases)
        assert done.returncode == 0, done.stderr[-3000:]
        yield [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("case", CASES)
def test_processes_agree_and_equal_the_witness(ranks, case):
    a, b = ranks[0][case], ranks[1][case]
    assert a["world"] == 2
    for key in ("m1", "m0", "m1_min", "m0_min", "steps", "skipped", "per_layer"):
        assert a["sharded"][key] == b["sharded"][key], key
    got, witness = a["sharded"], a["witness"]
    assert got["m0"] == witness["m0"] > 0
    assert got["m0_min"] == witness["m0_min"] > 0
    # float64 sums of the same changes, added in another order
    assert got["m1"] == pytest.approx(witness["m1"], rel=1e-12)
    assert got["m1_min"] == pytest.approx(witness["m1_min"], rel=1e-12)


def test_each_process_holds_its_rows_only(ranks):
    rows = [ranks[r]["regression"]["local_rows"] for r in range(2)]
    # 11 embedding rows and 33 units split 6/5 and 17/16; the one-row head: 1/0
    assert rows[0]["embed.weight"] == [6, 16] and rows[1]["embed.weight"] == [5, 16]
    assert rows[0]["hidden.weight"] == [17, 16] and rows[1]["hidden.weight"] == [16, 16]
    assert rows[0]["head.bias"] == [1] and rows[1]["head.bias"] == [0]


@pytest.mark.parametrize("case", ["regression", "classification", "lazy"])
def test_sharded_training_measures_what_unsharded_training_does(ranks, case):
    """The same model trained whole on the whole batches: the same counts, and M1 up to
    the rounding of gradients averaged in another order."""
    run = ranks[0][case]
    assert run["max_weight_gap"] < 1e-6
    assert run["sharded"]["m0"] == run["whole"]["m0"]
    assert run["sharded"]["m1"] == pytest.approx(run["whole"]["m1"], rel=1e-6)


def test_a_step_with_nan_on_one_process_is_undone_on_both(ranks):
    for r in range(2):
        run = ranks[r]["nan"]
        assert run["last_undone"]
        assert (run["sharded"]["steps"], run["sharded"]["skipped"]) == (5, 1)


def test_the_gate_decides_over_both_processes(ranks):
    """Each process judges its own samples; together they learn what one process does."""
    a, b = ranks[0]["lazy"], ranks[1]["lazy"]
    assert a["sharded"]["learned"] + b["sharded"]["learned"] == a["whole"]["learned"]


@pytest.mark.parametrize("case", RULES)
def test_every_rule_masks_shards_as_the_core_masks_whole_tensors(ranks, case):
    """Every step's weights are bit-equal to a NumPy oracle step on the whole tensors
    (SGD, float32), the energy too, and both processes report the same."""
    a, b = ranks[0][case], ranks[1][case]
    assert a == b
    assert a["exact_steps"] == 6
    assert (a["m1"], a["m0"]) == (a["oracle_m1"], a["oracle_m0"])
    assert 0 < a["kept_fraction"] < 0.5  # the rule did mask


@pytest.mark.parametrize("case", RULES_BF16)
def test_bfloat16_shards_keep_the_oracle_s_counts(ranks, case):
    """bfloat16 (the torch-ops path): the test cannot replay the sharded step's 16-bit
    rounding bit for bit, so the counts must match and M1 within bfloat16's rounding."""
    a, b = ranks[0][case], ranks[1][case]
    assert a == b
    assert a["m0"] == a["oracle_m0"]
    assert a["m1"] == pytest.approx(a["oracle_m1"], rel=1e-3)


def test_what_sharded_parameters_refuse(ranks):
    said = ranks[0]["refusals"]
    assert "adjacency=" in said["units-without-adjacency"]
    assert "scope='synapse'" in said["caching"]


def test_a_distributed_checkpoint_resumes_exactly(ranks):
    """torch.distributed.checkpoint of model, optimizer and handle.state_dict() at step 3
    of 6, loaded into a new model, optimizer and handle: the same weights, energy,
    counts and mistake memory as 6 steps straight."""
    for r in range(2):
        run = ranks[r]["checkpoint"]
        assert run["same_weights"] and run["same_memory"]
        assert run["resumed"] == run["straight"]
        assert run["straight"]["learned"] > 0


def test_the_distributed_selection_breaks_ties_as_the_core_does(ranks):
    """Exact k over the processes, ties to the lower flat index (the earlier process
    first), largest and smallest, float32/64 and bfloat16, and a process holding none."""
    for r in range(2):
        got = ranks[r]["selections"]
        assert got["agree"] == got["tried"] > 50


def test_caching_steps_each_process_s_share_of_the_store(ranks):
    """The synapse scope on shards: every step's weights (with the store's decay) equal
    the NumPy core's on whole tensors, and so do the caching figures."""
    for r in range(2):
        got = ranks[r]["caching"]
        assert got["exact_steps"] == 6 and got["read_twice_alike"]
        assert (got["energy"], got["updates"]) == (got["oracle_energy"], got["oracle_updates"])
        assert got["transient"] == pytest.approx(got["oracle_transient"], rel=1e-12)
        assert got["transient"] > 0


def test_the_store_resumes_from_a_distributed_checkpoint(ranks):
    for r in range(2):
        run = ranks[r]["checkpoint-caching"]
        assert run["same_weights"] and run["resumed"] == run["straight"]
        assert run["energy"][0] == run["energy"][1] > 0
        assert run["transient"][0] == run["transient"][1] > 0
