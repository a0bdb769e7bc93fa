"""Shared test settings: float64 available on demand, reproducible randomness."""

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Registered here, not in a test module: the hypothesis plugin resolves
# `--hypothesis-profile` before test modules are imported.
_hypothesis_common = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
settings.register_profile("ci", max_examples=300, derandomize=True, **_hypothesis_common)
settings.register_profile("thorough", max_examples=5000, **_hypothesis_common)
settings.load_profile("ci")

# x64 is enabled per test with `jax.enable_x64(True)`; the default stays float32,
# as users run it.
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
