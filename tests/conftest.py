"""pytest configuration and fixtures. Shared helpers (devices, tolerances, masks, tiny models)
live in the ``helpers`` package beside this file."""

from __future__ import annotations

import pytest
from hypothesis import settings

from helpers.models import tiny_model

# Property-based tests: no deadline (the first call of an op may compile/warm up), no example
# database written into the checkout.
settings.register_profile("fastrlhf", deadline=None, database=None, max_examples=60)
settings.load_profile("fastrlhf")


def pytest_configure(config):
    # also declared in pyproject.toml; repeated here so the suite works from any rootdir
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running checks (a real model, statistics)")


@pytest.fixture(autouse=True)
def _no_forced_reference(monkeypatch):
    """Tests decide kernel vs reference themselves: a FASTRLHF_FORCE_REFERENCE=1 left in the
    environment would silently turn every kernel-vs-reference test into reference-vs-reference."""
    monkeypatch.delenv("FASTRLHF_FORCE_REFERENCE", raising=False)


@pytest.fixture
def model():
    """A fresh tiny CausalLM."""
    return tiny_model()
