"""Shared test settings: float64 available on demand, reproducible randomness.

How references are chosen
-------------------------
A test that checks a loss or a gradient compares it with something that shares
no code with what it checks:

- ``jaxce._references``: each loss written from its definition with ``jax.nn``
  and ``jax.numpy`` only (no shifted frame, no fused selects), evaluated in
  float64 on the same inputs (float32 and half-precision values are exact in
  float64), and differentiated with ``jax.grad``. The closed forms
  (``jaxce.derivatives``) and the losses' derivative rules both come from
  ``jaxce._closed_form``, so comparing them with each other proves only that
  they agree: every such comparison also has the reference on one side
  (tests/test_derivatives.py over the option space, tests/test_properties.py
  over drawn inputs, tests/test_linear.py for the fused loss, whose reference
  materialises the logits). The references lose to cancellation where the
  shipped losses do not (``x - logsumexp(x)`` at logits of 1e30, ``log(1 -
  sigmoid(x))`` beyond |x| ~ 16 in float64): tests compare with them at inputs
  where they are exact, and check the extremes against hand-derived values.
- Float64 NumPy formulas in tests/helpers.py and in the tests, and PyTorch in
  float64 (tests/test_parity_torch.py) for PyTorch's semantics.
- A law (a loss >= 0, gradient rows summing to 0) is checked beside a value
  comparison, never instead: a wrong scale keeps the laws.

How tolerances are chosen
-------------------------
From the dtype and the operation, written beside each, with the helpers in
tests/helpers.py:

- ``u = unit_roundoff(dtype)``: 2^-53 (float64), 2^-24 (float32), 2^-11
  (float16), 2^-8 (bfloat16): the relative error of one rounding.
- ``rounding_bound(dtype, n) = n u``: a computation of ``n`` roundings (a sum
  of ``n`` terms, a dot product of length ``n``) is within that of the exact
  result, relative to the magnitudes involved. Count the terms: a softmax of C
  classes is about 4 C + 16 with its weights, smoothing and z-loss; the fused
  loss N + D + V + 16 (tokens, hidden size, vocabulary).
- Half-precision inputs are computed in float32 and the gradient rounded once
  to the input's dtype: ``half_precision_output_bound = u(dtype) +
  rounding_bound(float32, n)``; two such results of the same float32 values
  differ by at most one unit in the last place, ``2 u(dtype)``.
- Comparisons are norm-wise (``assert_normwise_close``): ``max |a - b| <= tol *
  max(1, max |b|)``, as ``jaxce.verify`` measures, because element-wise
  relative errors mean nothing for entries that cancel to nearly 0.

A tolerance with no derivation, or one far above its derivation, is a bug in
the test: a wrong formula (a missing 1/n, a flipped sign, a dropped factor) is
off by O(1), which every derived tolerance is far below.
"""

import atexit
import os
import shutil
import tempfile

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# How the suite compiles (the tests' own subprocesses inherit it through the environment):
# - XLA:CPU's LLVM backend at -O0 without its expensive passes, as `jaxce.verify` compiles;
#   its older elemental fusion emitters (`--xla_cpu_use_fusion_emitters=false`), and the
#   LLVM module compiled whole instead of split across threads (the workers already use
#   every core). The tests' arrays are small, so compiling is most of their time: these
#   halve it (`make test` went from about ten minutes to six on two cores). The older
#   emitters fuse a few operations differently, so a test that reads what XLA compiled (its
#   HLO, `memory_analysis()`) compiles with the default ones (`helpers.compile_as_users_do`).
#   JAXCE_TESTS_XLA_DEFAULTS=1 runs the whole suite with XLA's default code generation;
# - a compilation cache for this process, so that a program another test compiled already
#   (the same loss at the same shapes, from a new `jit`) is loaded, not compiled again. It
#   starts empty: every run compiles from scratch once, as CI does.
_FAST_COMPILE = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    " --xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
)
if os.environ.get("JAXCE_TESTS_XLA_DEFAULTS") != "1" and _FAST_COMPILE not in os.environ.get(
    "XLA_FLAGS", ""
):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="jaxce-tests-compilation-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ.update(
        JAX_COMPILATION_CACHE_DIR=_cache,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    jax.config.update("jax_compilation_cache_dir", _cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# Registered here, not in a test module: the hypothesis plugin resolves
# `--hypothesis-profile` before test modules are imported.
_hypothesis_common = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
settings.register_profile("ci", max_examples=150, derandomize=True, **_hypothesis_common)
settings.register_profile("thorough", max_examples=5000, **_hypothesis_common)
settings.load_profile("ci")

# x64 is enabled per test with `jax.enable_x64(True)`; the default stays float32,
# as users run it.
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
