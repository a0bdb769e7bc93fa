"""Shared test settings: float64 available on demand, reproducible randomness."""

import jax
import numpy as np
import pytest

# x64 is enabled per test with `jax.enable_x64(True)`; the default stays float32,
# as users run it.
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
