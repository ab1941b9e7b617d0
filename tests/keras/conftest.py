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


def run_scenarios(backend: str, tmp_dir: Path) -> dict:
    """Run scenarios.py under ``backend`` once per test session; its JSON results."""
    if backend not in _CACHE:
        out = tmp_dir / f"{backend}.json"
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
        proc = subprocess.run(
            [sys.executable, str(HERE / "scenarios.py"), str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if proc.returncode != 0:
            pytest.fail(f"scenarios.py failed under {backend}:\n{proc.stderr[-4000:]}")
        _CACHE[backend] = json.loads(out.read_text())
    return _CACHE[backend]


@pytest.fixture(scope="module")
def results(backend, tmp_path_factory) -> dict:
    return run_scenarios(backend, tmp_path_factory.mktemp(f"keras-{backend}"))
