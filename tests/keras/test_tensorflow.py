"""The Keras adapter on TensorFlow (in subprocesses): backend_checks.py, dropin_checks.py."""

import pytest
from backend_checks import *  # noqa: F403
from dropin_checks import *  # noqa: F403


@pytest.fixture(scope="module")
def backend():
    return "tensorflow"
