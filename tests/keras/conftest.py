"""Keras tests run each backend in a subprocess (Keras fixes its backend per process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
_CACHE: dict[str, dict] = {}


def run_scenarios(
    backend: str, tmp_dir: Path, only: str | None = None, script: str = "scenarios.py"
) -> dict:
    """Run ``script`` (``only`` some scenarios, comma-separated) under ``backend``; its
    JSON results.

    Cached per process, so each backend runs once per test module group.
    """
    key = f"{script}:{backend}:{only}"
    if key not in _CACHE:
        out = tmp_dir / f"{backend}-{script}.json"
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
        proc = subprocess.run(
            [sys.executable, str(HERE / script), str(out), *([only] if only else [])],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if proc.returncode != 0:
            pytest.fail(f"{script} failed under {backend}:\n{proc.stderr[-4000:]}")
        _CACHE[key] = json.loads(out.read_text())
    return _CACHE[key]


@pytest.fixture(scope="module")
def results(backend, tmp_path_factory) -> dict:
    return run_scenarios(backend, tmp_path_factory.mktemp(f"keras-{backend}"))


@pytest.fixture(scope="module")
def dropin(backend, tmp_path_factory) -> dict:
    """dropin.py's results: the adapter on custom train steps, models fit builds, several
    outputs, recurrent layers (one subprocess per backend)."""
    return run_scenarios(backend, tmp_path_factory.mktemp(f"dropin-{backend}"), script="dropin.py")
