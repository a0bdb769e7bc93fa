"""The stable primitives: values at extremes, masks, gradients, dtypes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import PLUS_INF_ROWS, np_log_softmax, np_logsumexp

import jaxce


@pytest.mark.parametrize("fn", [jaxce.log_sigmoid, jaxce.log1m_sigmoid], ids=lambda f: f.__name__)
def test_log_sigmoids_match_float64_everywhere(fn) -> None:  # type: ignore[no-untyped-def]
    x = np.array([-1e30, -1e4, -50.0, -1.0, 0.0, 1.0, 50.0, 1e4, 1e30], np.float32)
    sign = 1.0 if fn is jaxce.log_sigmoid else -1.0
    expected = -np.logaddexp(0.0, -sign * x.astype(np.float64))
    np.testing.assert_allclose(fn(x), expected, rtol=1e-6)
    grad = jax.vmap(jax.grad(fn))(x)
    expected_grad = sign / (1 + np.exp(np.clip(sign * x.astype(np.float64), -700, 700)))
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, expected_grad, atol=1e-7)


def test_logsumexp_and_log_softmax_match_float64() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 7)) * 5
    np.testing.assert_allclose(jaxce.logsumexp(x.astype(np.float32)), np_logsumexp(x), rtol=1e-6)
    np.testing.assert_allclose(
        jaxce.log_softmax(x.astype(np.float32)), np_log_softmax(x), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        jaxce.logsumexp(x.astype(np.float32), axis=None), np_logsumexp(x.ravel()), rtol=1e-6
    )
    np.testing.assert_allclose(
        jaxce.log_softmax(x.reshape(4, 7, 1), axis=(1, 2)),
        np_log_softmax(x)[..., None],
        rtol=1e-5,
        atol=1e-5,
    )


def test_logsumexp_of_empty_row_is_minus_inf_with_zero_gradient() -> None:
    x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    where = jnp.array([[True, False], [False, False]])
    value, grad = jax.value_and_grad(
        lambda z: jnp.sum(
            jnp.where(
                jnp.isfinite(jaxce.logsumexp(z, where=where)), jaxce.logsumexp(z, where=where), 0
            )
        )
    )(x)
    np.testing.assert_allclose(jaxce.logsumexp(x, where=where), [1.0, -np.inf])
    np.testing.assert_allclose(value, 1.0)
    np.testing.assert_array_equal(grad, [[1.0, 0.0], [0.0, 0.0]])


def test_log_softmax_masked_entries_are_minus_inf_without_nan_gradient() -> None:
    x = jnp.array([[1e30, -1e30, 0.0]])
    where = jnp.array([[True, True, False]])
    out = jaxce.log_softmax(x, where=where)
    np.testing.assert_allclose(out, [[0.0, -2e30, -np.inf]], rtol=1e-6)
    grad = jax.grad(lambda z: jnp.sum(jnp.where(where, jaxce.log_softmax(z, where=where), 0)))(x)
    assert np.all(np.isfinite(grad))
    assert float(grad[0, 2]) == 0.0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_primitives_keep_the_input_dtype(dtype: str) -> None:
    x = jnp.linspace(-3, 3, 8).astype(dtype)
    for fn in (jaxce.log_sigmoid, jaxce.log1m_sigmoid, jaxce.log_softmax):
        assert fn(x).dtype == jnp.dtype(dtype)
    assert jaxce.logsumexp(x).dtype == jnp.dtype(dtype)


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_logsumexp_of_plus_inf_is_plus_inf(mode: str) -> None:
    """`logsumexp` of a row holding +inf is +inf (the shift must not turn it into NaN)."""
    wrap = jax.jit if mode == "jit" else (lambda f: f)
    np.testing.assert_array_equal(wrap(jaxce.logsumexp)(PLUS_INF_ROWS), np.full(4, np.inf))
    np.testing.assert_array_equal(
        wrap(lambda x: jaxce.logsumexp(x, axis=None))(PLUS_INF_ROWS), np.inf
    )
    excluded = np.isinf(PLUS_INF_ROWS) & (PLUS_INF_ROWS > 0)
    keep = ~excluded
    keep[3, 1] = True  # row 3 keeps a -inf only: log 0 = -inf
    got = wrap(lambda x: jaxce.logsumexp(x, where=keep))(PLUS_INF_ROWS)
    expected = np_logsumexp(np.where(keep, PLUS_INF_ROWS, -np.inf)[:3].astype(np.float64))
    np.testing.assert_allclose(got[:3], expected, rtol=1e-6)
    assert got[3] == -np.inf
    # log_softmax: x - lse is inf - inf at the +inf entries and -inf elsewhere: never finite
    # where the row holds a +inf.
    log_p = np.asarray(wrap(jaxce.log_softmax)(PLUS_INF_ROWS))
    assert not np.any(np.isfinite(log_p)), log_p


def test_numpy_integer_axis():
    """An axis given as a NumPy integer (from ``np.argmax``, a shape) works as a Python int."""
    x = jnp.arange(6.0).reshape(2, 3)
    for fn in (jaxce.logsumexp, jaxce.log_softmax):
        np.testing.assert_array_equal(fn(x, axis=np.int64(1)), fn(x, axis=1))
