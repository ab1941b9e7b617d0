"""The Keras reliability cases on the torch backend (in a subprocess): see keras_checks.py."""

import pytest
from keras_checks import *  # noqa: F403


@pytest.fixture(scope="module")
def backend():
    return "torch"
