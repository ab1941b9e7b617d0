"""docs/keras.md's python blocks run on every Keras backend (one process per backend)."""

from __future__ import annotations

import pytest
from docs_blocks import DOCS, run_page


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_keras_page_runs(backend, tmp_path):
    run_page(DOCS / "keras.md", tmp_path, {"KERAS_BACKEND": backend})
