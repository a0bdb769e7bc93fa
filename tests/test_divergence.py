"""The Kullback-Leibler divergences (`jaxce._divergence`): float64 formulas, reductions, edges.

The references are float64 NumPy formulas written here from the docstrings' definitions;
parity with optax (values, gradients, its own test classes) is in tests/test_parity_optax.py
and tests/test_peer_suites.py, with PyTorch's ``kl_div`` in every reduction in
tests/test_parity_torch.py. Every case runs one jitted function: compiling is what they cost.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import np_log_softmax, rounding_bound, value_grad_closed
from jax.experimental import checkify

import jaxce

N, C = 4, 5
DIVERGENCE_REDUCTIONS = ["none", "sum", "mean", "batchmean"]
NAMES = ["kl_divergence", "kl_divergence_with_log_targets"]
# float64: a log, a product and a sum over C classes, then a sum over N examples.
FLOAT64_TOLERANCE = rounding_bound(jnp.float64, 4 * C + N + 16)


def np_kl(log_q, t, where=None):
    """sum_c t_c (log t_c - log q_c) per row, 0 log 0 = 0, over the included entries."""
    included = t > 0 if where is None else (t > 0) & where
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(included, t * (np.log(t) - log_q), 0)
    return terms.sum(-1)


def _soft(rng, shape):
    raw = rng.uniform(0.05, 1.0, shape)
    return raw / raw.sum(-1, keepdims=True)


def _second(name, targets):
    """The second argument of ``name``: the targets or their logs."""
    if name == "kl_divergence":
        return targets
    with np.errstate(divide="ignore"):
        return np.log(targets)


@pytest.mark.parametrize("where_kind", [None, "entries", "examples"])
@pytest.mark.parametrize("reduction", DIVERGENCE_REDUCTIONS)
@pytest.mark.parametrize("name", NAMES)
def test_matches_float64_formula(name: str, reduction: str, where_kind) -> None:
    """Values and gradients (jax.grad, the closed form: -t scaled by the reduction)."""
    rng = np.random.default_rng(len(name) + len(reduction))
    log_q = np_log_softmax(2 * rng.standard_normal((N, C)))
    t = _soft(rng, (N, C))
    t[0, 2] = 0.0  # a zero target
    where = None
    if where_kind == "entries":
        where = rng.uniform(size=(N, C)) > 0.3
        where[1] = False  # an example with no included entry
    elif where_kind == "examples":
        where = np.array([True, False, True, True])
    full = (
        None
        if where is None
        else np.broadcast_to(where if where.ndim == 2 else where[:, None], (N, C))
    )
    with jax.enable_x64(True):
        value, grad, closed = value_grad_closed(
            name, log_q, _second(name, t), where=where, reduction=reduction
        )
    per_example = np_kl(log_q, t, full)
    counted = np.ones(N, bool) if full is None else full.any(-1)
    scale = {"none": 1.0, "sum": 1.0, "mean": 1 / counted.sum(), "batchmean": 1 / N}[reduction]
    expected = per_example if reduction == "none" else per_example.sum() * scale
    np.testing.assert_allclose(value, expected, rtol=FLOAT64_TOLERANCE, atol=1e-300)
    included = t > 0 if full is None else (t > 0) & full
    expected_grad = np.where(included, -t, 0) * scale
    np.testing.assert_allclose(grad, expected_grad, rtol=FLOAT64_TOLERANCE)
    np.testing.assert_allclose(closed, expected_grad, rtol=FLOAT64_TOLERANCE)


@pytest.mark.parametrize("name", NAMES)
def test_tuple_axis_none_axis_and_broadcast_targets(name: str) -> None:
    rng = np.random.default_rng(2)
    log_q = rng.standard_normal((3, 2, 4))
    t = rng.uniform(size=(3, 1, 4)) / 4
    fn = getattr(jaxce, name)
    flat = lambda a: jnp.moveaxis(a, (2, 0), (1, 2)).reshape(2, 12)  # noqa: E731

    @jax.jit
    def run(z):
        targets = jnp.broadcast_to(_second(name, t), z.shape)
        return (
            fn(z, _second(name, t), axis=(2, 0)),
            fn(flat(z), flat(targets)),
            fn(z, _second(name, t), axis=None),
        )

    tupled, moved, every_axis = run(jnp.asarray(log_q, jnp.float32))
    tolerance = rounding_bound(jnp.float32, 4 * 12 + 16)
    np.testing.assert_allclose(tupled, moved, rtol=tolerance)
    assert every_axis.shape == ()
    np.testing.assert_allclose(every_axis, moved.sum(), rtol=tolerance)


@pytest.mark.parametrize("name", NAMES)
def test_batchmean_divides_by_the_first_axis_as_pytorch(name: str) -> None:
    """PyTorch's rule: ``shape[0]`` whatever the class axis (the classes for a 1-D input); an
    empty first axis gives 0 (PyTorch: 0 / 0 = NaN)."""
    rng = np.random.default_rng(3)
    log_q, t = np_log_softmax(rng.standard_normal((3, 4))), _soft(rng, (3, 4))
    fn = getattr(jaxce, name)

    @jax.jit
    def run(z):
        second = _second(name, t)
        return (
            fn(z, second, reduction="sum"),
            fn(z, second, reduction="batchmean"),
            fn(z, second, reduction="mean"),
            fn(z.T, second.T, axis=0, reduction="batchmean"),
            fn(z[0], second[0], reduction="sum"),
            fn(z[0], second[0], reduction="batchmean"),
            fn(z[:0], second[:0], reduction="batchmean"),
        )

    total, batchmean, mean, by_classes, row, row_batchmean, empty = run(
        jnp.asarray(log_q, jnp.float32)
    )
    tolerance = rounding_bound(jnp.float32, 4 * 4 + 16)
    np.testing.assert_allclose(batchmean, total / 3, rtol=tolerance)
    np.testing.assert_allclose(mean, total / 3, rtol=tolerance)  # 2-D: "mean" is "batchmean"
    np.testing.assert_allclose(by_classes, total / 4, rtol=tolerance)  # shape[0] = 4 classes
    np.testing.assert_allclose(row_batchmean, row / 4, rtol=tolerance)
    assert float(empty) == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_zero_target_contributes_nothing_even_on_infinite_log_predictions(name: str) -> None:
    """optax and PyTorch give NaN there; a positive target on -inf costs +inf."""
    log_q = np.array([[-np.inf, -0.5, np.inf], [-np.inf, -0.5, -1.0]], np.float32)
    t = np.array([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]], np.float32)
    value, grad, closed = value_grad_closed(name, jnp.asarray(log_q), _second(name, t))
    np.testing.assert_allclose(value[0], 0.5, rtol=rounding_bound(jnp.float32, 4))
    assert value[1] == np.inf
    np.testing.assert_array_equal(grad, -t)
    np.testing.assert_array_equal(closed, -t)


@pytest.mark.parametrize("name", NAMES)
def test_invalid_targets_and_nan_log_predictions_make_their_example_nan(name: str) -> None:
    """The other examples are exact; gradients are finite (0 in the invalid example), and
    `jaxce.checked` names the argument, its index and value. Excluded entries are not checked."""
    rng = np.random.default_rng(4)
    log_q = np_log_softmax(rng.standard_normal((N, C))).astype(np.float32)
    t = _soft(rng, (N, C)).astype(np.float32)
    second = _second(name, t)
    bad_value = 1.5 if name == "kl_divergence" else 0.5  # not a probability / a log-probability
    second[1, 3] = bad_value
    second[2, 0] = np.nan
    log_q[3, 4] = np.nan
    t_arg = "targets" if name == "kl_divergence" else "log_targets"
    value, grad, closed = value_grad_closed(name, jnp.asarray(log_q), second)
    assert np.all(np.isnan(value[1:])) and np.isfinite(value[0])
    np.testing.assert_allclose(
        value[0], np_kl(log_q[:1], t[:1])[0], rtol=rounding_bound(jnp.float32, 32)
    )
    assert np.all(np.isfinite(grad)) and np.all(grad[1:3] == 0) and np.all(closed[1:3] == 0)
    fn = getattr(jaxce, name)
    with pytest.raises(checkify.JaxRuntimeError, match=rf"`{t_arg}`.*{bad_value} at index \[1 3\]"):
        jaxce.checked(jax.jit(lambda z, s: fn(z, s, reduction="mean")))(log_q, second)
    valid = second.copy()
    valid[1, 3], valid[2, 0] = second[1, 2], second[2, 1]
    with pytest.raises(checkify.JaxRuntimeError, match=r"`log_predictions`.*nan at index \[3 4\]"):
        jaxce.checked(lambda z, s: fn(z, s, reduction="mean"))(log_q, valid)
    excluded = np.ones((N, C), bool)
    excluded[1, 3] = excluded[2, 0] = excluded[3, 4] = False
    out = jaxce.checked(lambda z, s: fn(z, s, where=excluded))(log_q, second)
    assert np.all(np.isfinite(np.asarray(out)))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_is_computed_in_float32(dtype: str) -> None:
    rng = np.random.default_rng(5)
    log_q = jnp.asarray(np_log_softmax(rng.standard_normal((N, C))), dtype)
    t = _soft(rng, (N, C)).astype(np.float32)
    value, grad, closed = value_grad_closed("kl_divergence", log_q, t, reduction="batchmean")
    assert value.dtype == np.float32 and grad.dtype == closed.dtype == jnp.dtype(dtype)
    expected = np_kl(np.asarray(log_q, np.float64), t).sum() / N
    np.testing.assert_allclose(value, expected, rtol=rounding_bound(jnp.float32, 4 * C + N + 16))


def test_log_targets_are_the_divergence_of_their_exponentials_and_kl_of_itself_is_zero() -> None:
    rng = np.random.default_rng(6)
    log_q = np_log_softmax(2 * rng.standard_normal((N, C)))
    log_t = np_log_softmax(2 * rng.standard_normal((N, C)))

    @jax.jit
    def run(z, s):
        return (
            jaxce.kl_divergence_with_log_targets(z, s),
            jaxce.kl_divergence(z, jnp.exp(s)),
            jaxce.kl_divergence(z, jnp.exp(z)),
        )

    with jax.enable_x64(True):
        with_log, with_exp, itself = run(log_q, log_t)
    np.testing.assert_allclose(with_log, with_exp, rtol=FLOAT64_TOLERANCE)
    np.testing.assert_allclose(itself, 0.0, atol=FLOAT64_TOLERANCE)


def test_bad_arguments_raise_naming_them() -> None:
    x, t = np.zeros((2, 3), np.float32), np.full((2, 3), 1 / 3, np.float32)
    with pytest.raises(ValueError, match=r"`reduction` must be one of .*'batchmean'"):
        jaxce.kl_divergence(x, t, reduction="batch_mean")
    with pytest.raises(ValueError, match=r"`log_targets` has shape \(2, 4\).*`log_predictions`"):
        jaxce.kl_divergence_with_log_targets(x, np.zeros((2, 4)))
    with pytest.raises(TypeError, match="`targets` must have a floating dtype"):
        jaxce.kl_divergence(x, np.ones((2, 3), np.int32))
    with pytest.raises(ValueError, match=r"`where` has rank 3.*`log_predictions`"):
        jaxce.kl_divergence(x, t, where=np.ones((1, 2, 3), bool))
