"""The Keras adapter on the tensorflow backend (in a subprocess): see backend_checks.py."""

import pytest
from backend_checks import *  # noqa: F403


@pytest.fixture(scope="module")
def backend():
    return "tensorflow"
