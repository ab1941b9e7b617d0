"""Data parallel Keras (TF MirroredStrategy, JAX DataParallel) equals one device; and
Keras vs Lightning vs the NumPy oracle."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_scenarios
from scenarios import PAPER_RULES

HERE = Path(__file__).parent


def test_mirrored_strategy_matches_one_device():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, str(HERE / "mirrored.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name, r in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        multi, single = r["mirrored"], r["single"]
        assert r["replicas"] == 2
        assert r["replicas_equal"], name  # the same masks were applied on both replicas
        assert r["weight_diff"] < 1e-6, name
        # energy and steps are counted once, not per replica; sample counts are summed
        assert multi["m1"] == pytest.approx(single["m1"], rel=1e-6), name
        assert multi["energy"] == pytest.approx(single["energy"], rel=1e-6), name
        for key in ("m0", "steps", "seen", "learned", "flagged"):
            assert multi[key] == single[key], (name, key)
        assert multi["seen"] == 256, name
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["measure only"]["mirrored"]["steps"] == 15  # the lazy gate skipped one step
    caching = r["caching"]["mirrored"]
    assert caching["steps"] == 15 and caching["energy"] < caching["m1"]


def test_jax_data_parallel_matches_one_device():
    proc = subprocess.run(
        [sys.executable, str(HERE / "jax_data_parallel.py")],
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    multi, single = r["data_parallel"], r["single"]
    assert r["devices"] == 2
    assert r["weight_diff"] < 1e-6
    assert multi["m1"] == pytest.approx(single["m1"], rel=1e-6)
    for key in ("m0", "steps", "seen", "learned", "flagged"):
        assert multi[key] == single[key], key


def _lightning_helpers():
    spec = importlib.util.spec_from_file_location(
        "lightning_helpers", HERE.parent / "lightning" / "conftest.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_keras_lightning_and_numpy_agree_on_the_paper_mlp(tmp_path):
    torch = pytest.importorskip("torch")
    from energy_callbacks.data import load_digits, paper_inputs
    from energy_callbacks.lightning import PlasticityCallback
    from energy_callbacks.reference import PaperMLP

    keras_results = run_scenarios("tensorflow", tmp_path, only="paper")["paper"]
    helpers = _lightning_helpers()
    ds = load_digits(seed=0)
    x, _ = paper_inputs(ds.train.images)
    order = np.random.default_rng(1).integers(0, len(x), 150)  # as in scenarios.py
    for name, rule in PAPER_RULES.items():
        torch.manual_seed(0)
        module = helpers.PaperModule(PaperMLP(64, 30, 10, seed=3))
        callback = PlasticityCallback(**copy.deepcopy(rule))
        data = torch.utils.data.DataLoader(
            helpers.IndexedData(x, ds.train.labels, order), batch_size=1
        )
        helpers.trainer(max_epochs=1, callbacks=[callback]).fit(module, data)
        lightning = callback.report()
        keras_, oracle = keras_results[name]["keras"], keras_results[name]["oracle"]
        assert lightning.m0 == keras_["m0"] == oracle["m0"], name
        assert lightning.samples_learned == keras_["learned"] == oracle["learned"], name
        tol = 1e-5 if name == "equal-count" else 1e-6
        assert lightning.m1 == pytest.approx(oracle["m1"], rel=tol), name
        assert keras_["m1"] == pytest.approx(lightning.m1, rel=tol), name
