"""Shared fixtures and hypothesis settings of the Python suite."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))

settings.register_profile(
    "rotatekv",
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# A longer run for local bug hunting: ROTATEKV_HYPOTHESIS_PROFILE=thorough pytest tests
settings.register_profile("thorough", parent=settings.get_profile("rotatekv"), max_examples=400)
# Recorded fuzz runs (docs/reliability.md): ROTATEKV_HYPOTHESIS_PROFILE=long pytest -k fuzz tests
settings.register_profile("long", parent=settings.get_profile("rotatekv"), max_examples=5000)
settings.load_profile(os.environ.get("ROTATEKV_HYPOTHESIS_PROFILE", "rotatekv"))


@pytest.fixture
def gen(request: pytest.FixtureRequest) -> torch.Generator:
    """A torch generator seeded from the test's name (reproducible, different per test)."""
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(request.node.nodeid)) % (2**31)
    return torch.Generator().manual_seed(seed)
