"""The extra memory of measuring stays at its floor on every path, the torch
adapter's exact top fraction adds no more than a mask (so does Keras's on torch, which
runs the same kernels), and compiled Keras's holds no ``|dw|``.

Per byte of parameters, tracking holds one snapshot of the weights and one copy of
w_0: 2.0x; the exact top fraction adds a boolean mask per tensor (0.25x of float32
weights, 0.5x of bfloat16), 2.5x in all. ``benchmarks/memory.py`` measures each path
in fresh processes (peak resident memory with and without the callback, at two
widths of an MLP; the slope cancels the fixed costs). On the torch paths two runs'
slopes differ by less than 0.05x, TensorFlow's by 0.15x; the margin is 0.25x: a
regression that holds one more copy of the weights adds 1.0x. A reading over its
ceiling is measured again, each peak the lowest of three runs (a regression stays
over).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("memory_benchmark", ROOT / "benchmarks/memory.py")
assert spec is not None and spec.loader is not None
memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory)

FLOOR = 2.0
MARGIN = 0.25
# on a CUDA device w_0 is in host memory: the device holds the snapshot only
CEILING = dict.fromkeys(memory.GPU_PATHS, 1.0)
EXACT = "TopFraction(0.1)"
# the torch adapter's exact selection: the mask on top (the device holds the snapshot)
EXACT_CEILING = dict.fromkeys(("torch-fp32", "torch-bf16"), 2.5)
EXACT_CEILING.update(dict.fromkeys(memory.GPU_PATHS, 1.5))
# compiled Keras: the selection reads after - before at each round, a slice (JAX: a
# row) at a time, and holds no |dw| (TensorFlow 2.0x measured, JAX 2.3x)
EXACT_CEILING["keras-tensorflow"] = EXACT_CEILING["keras-jax"] = 2.5
# Keras on torch (CPU, float32): the torch adapter's fused step on the variables
EXACT_CEILING["keras-torch"] = 2.5


TORCH_PATHS = tuple(p for p in memory.PATHS if p.startswith("torch")) + memory.GPU_PATHS
KERAS_PATHS = tuple(p for p in memory.PATHS if p.startswith("keras"))
"""Measured from two test files, so that each worker of ``pytest -n 2 --dist
loadfile`` takes one half (about two minutes each)."""


@pytest.mark.slow
@pytest.mark.parametrize("path", TORCH_PATHS)
def test_a_step_holds_a_snapshot_w0_and_for_the_exact_rule_a_mask(path):
    check(path)


def check(path: str) -> None:
    """The path's tracking slope (and the exact rule's, where it has a ceiling) under
    its ceiling plus the margin."""
    if path in memory.GPU_PATHS and path not in memory.gpu_paths():
        pytest.skip("no CUDA device")
    rules = ["tracking"] + ([EXACT] if path in EXACT_CEILING else [])

    def ceiling(row: dict) -> float:
        return (EXACT_CEILING[path] if row["rule"] == EXACT else CEILING.get(path, FLOOR)) + MARGIN

    rows = memory.table([path], rules, (3072, 6144))
    over = [row["rule"] for row in rows if row["per_byte"] > ceiling(row)]
    if over:  # a noisy reading: each peak the lowest of three runs; a regression stays over
        rows = memory.table([path], over, (3072, 6144), repeat=3)
    for row in rows:
        assert row["per_byte"] <= ceiling(row), row
