"""The Keras paths' share of ``test_memory.py`` (tracking at its floor; compiled
Keras's exact top fraction under its own ceiling), in a file of its own so that
another worker measures it."""

from __future__ import annotations

import pytest
from test_memory import KERAS_PATHS, check


@pytest.mark.slow
@pytest.mark.parametrize("path", KERAS_PATHS)
def test_tracking_holds_a_snapshot_and_w0(path):
    check(path)
