"""The extra memory of measuring stays at its floor on every path.

Per byte of parameters, tracking holds one snapshot of the weights and one copy of
w_0: 2.0x. ``benchmarks/memory.py`` measures each path in fresh processes (peak
resident memory with and without the callback, at two widths of an MLP; the slope
cancels the fixed costs). Two runs' slopes differ by up to about 0.2x on this
machine (allocator and page-cache noise at the smaller width), hence the margin: a
regression that holds one more copy of the weights adds 1.0x.
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
NOISE = 0.25
WIDTHS = (3072, 6144)


@pytest.mark.slow
@pytest.mark.parametrize("path", memory.PATHS)
def test_tracking_holds_a_snapshot_and_w0_and_no_more(path):
    (row,) = memory.table([path], ["tracking"], WIDTHS)
    assert row["per_byte"] <= FLOOR + NOISE, row
