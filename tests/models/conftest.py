"""Fixtures of the model tests."""

import pytest

from model_utils import tiny_model


@pytest.fixture
def model():
    return tiny_model()
