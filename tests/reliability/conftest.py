"""Fixtures of the reliability suite: the Keras cases run once per backend, in a subprocess
(Keras fixes its backend per process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def run_keras_cases(backend: str, out: Path) -> dict:
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, str(HERE / "keras_cases.py"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        pytest.fail(f"keras_cases.py failed under {backend}:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def keras_results(backend, tmp_path_factory) -> dict:
    results = run_keras_cases(backend, tmp_path_factory.mktemp(f"keras-{backend}") / "out.json")
    crashed = {
        k: v["crashed"] for k, v in results.items() if isinstance(v, dict) and "crashed" in v
    }
    assert not crashed, crashed
    return results
