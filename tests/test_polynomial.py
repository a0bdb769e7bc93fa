"""The softmax focal loss and Poly-1 (`jaxce._polynomial`): Keras' values, float64 formulas, edges.

The references are float64 NumPy formulas written here from the docstrings' definitions, and
Keras' own test values (``keras/src/losses/losses_test.py``, ``CategoricalFocalCrossentropyTest``,
the ``from_logits=True`` cases). Poly-1's optax values are optax's own test class, run with
jaxce substituted (tests/test_peer_suites.py); its parity with optax on random inputs is in
tests/test_parity_optax.py. Every case runs one jitted function: compiling is what they cost.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    REDUCTIONS,
    assert_normwise_close,
    np_log_softmax,
    rounding_bound,
    unit_roundoff,
    value_grad_closed,
)

import jaxce
import jaxce.derivatives as derivatives
from jaxce import _closed_form, _references

N, C = 4, 5
# float64 against float64: a softmax, a power and sums over C classes, 4 C + 16 roundings
# on each side. (A wrong formula is off by O(1).)
FLOAT64_TOLERANCE = rounding_bound(jnp.float64, 2 * (4 * C + 16))


def np_focal(x, y, *, alpha=0.25, gamma=2.0, label_smoothing=0.0, where=None):
    """-sum_c alpha_c (1 - p_c)^gamma y~_c log p_c per row of [N, C] float64 arrays."""
    y = (1 - label_smoothing) * y + label_smoothing / x.shape[-1]
    if where is not None:
        x = np.where(where, x, -np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_p = np_log_softmax(x)
        terms = np.asarray(alpha) * (-np.expm1(log_p)) ** gamma * y * log_p
    included = y != 0 if where is None else (y != 0) & where
    return -np.sum(np.where(included, terms, 0), axis=-1)


def np_focal_gradient(x, y, *, alpha=0.25, gamma=2.0, label_smoothing=0.0, where=None):
    """The closed form as written: u - p sum_c u_c, u_c = a_c [gamma q^(gamma-1) p log p - q^gamma]."""
    y = (1 - label_smoothing) * y + label_smoothing / x.shape[-1]
    if where is not None:
        x = np.where(where, x, -np.inf)
    log_p = np_log_softmax(x)
    p, q = np.exp(log_p), -np.expm1(log_p)
    a = np.asarray(alpha) * y if where is None else np.where(where, np.asarray(alpha) * y, 0)
    with np.errstate(invalid="ignore"):  # 0 * inf at excluded classes (a = 0 there)
        u = np.where(a != 0, a * (gamma * q ** (gamma - 1) * p * log_p - q**gamma), 0)
    return u - p * u.sum(-1, keepdims=True)


def _soft(rng, shape):
    raw = rng.uniform(0.05, 1.0, shape)
    return raw / raw.sum(-1, keepdims=True)


# --------------------------------------------------------------------------- #
# Keras' values (keras/src/losses/losses_test.py, CategoricalFocalCrossentropyTest).
# Keras averages over the examples ("sum_over_batch_size") after multiplying each
# example's loss by its sample weight.
# --------------------------------------------------------------------------- #

KERAS_LOGITS = np.array([[8.0, 1.0, 1.0], [0.0, 9.0, 1.0], [2.0, 3.0, 5.0]])
KERAS_NO_REDUCTION = np.array([1.5096224e-09, 2.4136547e-11, 1.0360638e-03])
KERAS_SMOOTHING_LOGITS = np.array([[4.9, -0.5, 2.05]])


@jax.jit
def _keras_cases(logits, correct_logits, smoothing_logits):
    loss = jaxce.softmax_focal_loss
    return (
        loss(logits, np.eye(3)),
        loss(logits, np.eye(3), reduction="mean"),
        loss(correct_logits, np.eye(3)),
        loss(smoothing_logits, np.array([[1.0, 0.0, 0.0]]), label_smoothing=0.1),
    )


def test_keras_no_reduction_values() -> None:
    """test_no_reduction, in float64, against the float64 formula and Keras' values.

    ``-log p`` of a class with ``p`` near 1 is the log of a row sum near 1: a rounding of
    that sum (a few u) is a relative error of ``u / (1 - p)`` in ``-log p`` and in ``1 - p``,
    ``gamma + 1`` times over in ``(1 - p)^gamma (-log p)``. Keras computes in float32
    (u = 2^-24): that bounds its values' own error (3.6e-4 for the second row, where
    ``1 - p = 4.6e-4``); the others it holds to 1e-5.
    """
    with jax.enable_x64(True):
        ours = np.asarray(_keras_cases(KERAS_LOGITS, 10 * np.eye(3), KERAS_SMOOTHING_LOGITS)[0])
    miss = -np.expm1(np.diag(np_log_softmax(KERAS_LOGITS)))
    float64_error = (2.0 + 1) * rounding_bound(np.float64, 8) / miss
    exact = np_focal(KERAS_LOGITS, np.eye(3))
    assert np.all(np.abs(ours - exact) <= float64_error * exact), (ours, exact)
    keras_error = (2.0 + 1) * unit_roundoff(np.float32) / miss + 1e-5
    assert np.all(np.abs(ours - KERAS_NO_REDUCTION) <= keras_error * KERAS_NO_REDUCTION)
    np.testing.assert_allclose(ours[[0, 2]], KERAS_NO_REDUCTION[[0, 2]], rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_keras_reduced_values(dtype: str) -> None:
    """test_unweighted (0.000345), test_scalar_weighted (0.000794), test_sample_weighted
    (0.001933), test_all_correct_unweighted (0.0), test_label_smoothing (0.06685); Keras
    checks them to 3 decimals (4 for the scalar weight)."""
    with jax.enable_x64(dtype == "float64"):
        inputs = (KERAS_LOGITS, 10 * np.eye(3), KERAS_SMOOTHING_LOGITS)
        outputs = _keras_cases(*(jnp.asarray(a, dtype) for a in inputs))
    per_example, mean, correct, smoothed = (np.asarray(o, np.float64) for o in outputs)
    np.testing.assert_allclose(mean, 0.000345, atol=0.5e-3)
    np.testing.assert_allclose(mean, per_example.mean(), rtol=rounding_bound(dtype, 4))
    np.testing.assert_allclose(np.mean(2.3 * per_example), 0.000794, atol=0.5e-4)
    np.testing.assert_allclose(np.mean([1.2, 3.4, 5.6] * per_example), 0.001933, atol=0.5e-3)
    np.testing.assert_allclose(correct, 0.0, atol=0.5e-3)
    np.testing.assert_allclose(smoothed[0], 0.06685, atol=0.5e-3)
    # and the float64 formula's 0.0668515 (which Keras' value rounds), to the dtype.
    expected = np_focal(KERAS_SMOOTHING_LOGITS, np.array([[1.0, 0, 0]]), label_smoothing=0.1)
    np.testing.assert_allclose(smoothed[0], expected[0], rtol=rounding_bound(dtype, 4 * 3 + 16))


# --------------------------------------------------------------------------- #
# The float64 formula, and the closed form as written.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("options", ["soft", "alpha_vector_where_smoothing"])
def test_focal_matches_float64_formula_and_closed_form(gamma: float, options: str) -> None:
    """Values against the float64 NumPy formula; jax.grad and the closed form against the
    closed form as written (with ``q^(gamma-1)``, finite at these moderate logits)."""
    rng = np.random.default_rng(int(gamma * 10) + len(options))
    x, y = 2 * rng.standard_normal((N, C)), _soft(rng, (N, C))
    kwargs: dict = {"gamma": gamma}
    if options != "soft":
        where = rng.uniform(size=(N, C)) > 0.25
        where[:, 0] = True  # no row without a class
        kwargs.update(alpha=rng.uniform(0.2, 2.0, C), where=where, label_smoothing=0.1)
    with jax.enable_x64(True):
        loss, grad, closed = value_grad_closed("softmax_focal_loss", x, y, **kwargs)
    np.testing.assert_allclose(loss, np_focal(x, y, **kwargs), rtol=FLOAT64_TOLERANCE)
    expected = np_focal_gradient(x, y, **kwargs)
    assert_normwise_close(grad, expected, FLOAT64_TOLERANCE, "jax.grad")
    assert_normwise_close(closed, expected, FLOAT64_TOLERANCE, "closed form")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_alpha_one_gamma_zero_is_softmax_cross_entropy(reduction: str) -> None:
    rng = np.random.default_rng(3)
    x, y = 3 * rng.standard_normal((N, C)), _soft(rng, (N, C))
    where = rng.uniform(size=(N, C)) > 0.2
    options = {"where": where, "label_smoothing": 0.1, "reduction": reduction}

    @jax.jit
    def both(z):
        def focal(v):
            return jnp.sum(jaxce.softmax_focal_loss(v, y, alpha=1.0, gamma=0.0, **options))

        def cross_entropy(v):
            return jnp.sum(jaxce.softmax_cross_entropy(v, y, **options))

        return jax.value_and_grad(focal)(z), jax.value_and_grad(cross_entropy)(z)

    (focal, focal_grad), (ce, ce_grad) = both(jnp.asarray(x, jnp.float32))
    # Two float32 formulations of one sum over C classes (the focal one multiplies a factor
    # of exactly 1 into each term): 4 C + 16 roundings each.
    tolerance = rounding_bound(jnp.float32, 2 * (4 * C + 16))
    assert_normwise_close(focal, ce, tolerance, "loss")
    assert_normwise_close(focal_grad, ce_grad, tolerance, "gradient")


# --------------------------------------------------------------------------- #
# Edges: extreme logits, p = 1, zero labels on -inf logits, gamma = 0.
# --------------------------------------------------------------------------- #

EXTREME = np.array([[1e30, -1e30, 0.0], [-1e30, 1e30, 3.0], [40.0, 0.0, 0.0], [0.5, -np.inf, 2.0]])
EXTREME_LABELS = np.array([[1.0, 0, 0], [0.2, 0.3, 0.5], [1.0, 0, 0], [0.5, 0, 0.5]])


@pytest.mark.parametrize("gamma", [0.0, 0.3, 2.0])
@pytest.mark.parametrize("loss", ["softmax_focal_loss", "poly_loss_cross_entropy"])
def test_extreme_logits_give_finite_losses_and_gradients(loss: str, gamma: float) -> None:
    """Logits of +-1e30, p = 1 in float32 (logits 40 apart), a -inf logit under a zero label."""
    options = {"gamma": gamma} if loss == "softmax_focal_loss" else {"epsilon": gamma - 1}
    x = jnp.asarray(EXTREME, jnp.float32)
    value, grad, closed = value_grad_closed(loss, x, EXTREME_LABELS, **options)
    assert np.all(np.isfinite(value)), value
    assert np.all(np.isfinite(grad)) and np.all(np.isfinite(closed)), (grad, closed)
    np.testing.assert_allclose(grad, closed, atol=rounding_bound(jnp.float32, 32))
    assert grad[3, 1] == 0 and closed[3, 1] == 0  # the -inf logit
    if loss == "softmax_focal_loss" and gamma > 0:
        assert value[0] == 0 and value[2] == 0  # p = 1: (1 - p)^gamma = 0


def test_gamma_zero_is_exactly_the_unmodulated_factor_at_p_equal_one() -> None:
    """(1 - p)^0 = 1 where 1 - p = 0 (no 0^0 NaN): softmax_cross_entropy's values there."""
    x = jnp.asarray([[1e30, 0.0, -1e30], [60.0, 0.0, 0.0]], jnp.float32)
    y = np.array([[1.0, 0, 0], [0.5, 0.5, 0]])

    @jax.jit
    def both(z):
        focal = lambda v: jaxce.softmax_focal_loss(v, y, alpha=1.0, gamma=0.0, reduction="sum")  # noqa: E731
        plain = lambda v: jaxce.softmax_cross_entropy(v, y, reduction="sum")  # noqa: E731
        return jax.value_and_grad(focal)(z), jax.value_and_grad(plain)(z)

    (value, grad), (expected, expected_grad) = both(x)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(value, expected, rtol=rounding_bound(jnp.float32, 16))
    np.testing.assert_allclose(grad, expected_grad, atol=rounding_bound(jnp.float32, 16))


@pytest.mark.parametrize("gamma", [0.25, 0.5, 0.75])
def test_p_near_one_with_gamma_below_one_matches_float64_reference(gamma: float) -> None:
    """``gamma (1-p)^(gamma-1) p log p`` is ``inf * 0`` at p = 1: the values on the way there,
    float64 logits 25 apart (1 - p = 2.8e-11), against jax.grad of the plain reference."""
    x = np.array([[25.0, 0.0, 0.0], [12.0, 0.0, -3.0]])
    y = np.array([[1.0, 0.0, 0.0], [0.7, 0.3, 0.0]])

    @jax.jit
    def run(z):
        total = lambda module, v: jnp.sum(module.softmax_focal_loss(v, y, gamma=gamma))  # noqa: E731
        closed = derivatives.softmax_focal_loss(z, y, gamma=gamma)
        return (
            jax.grad(lambda v: total(jaxce, v))(z),
            closed,
            jax.grad(lambda v: total(_references, v))(z),
        )

    with jax.enable_x64(True):
        grad, closed, reference = run(x)
    assert np.all(np.isfinite(grad))
    # The reference's 1 - p carries float64's rounding of p: 2^-53 / 2.8e-11 of itself.
    tolerance = rounding_bound(jnp.float64, 64) / 2.8e-11
    assert_normwise_close(grad, reference, tolerance, "jax.grad", floor=0.0)
    assert_normwise_close(closed, reference, tolerance, "closed form", floor=0.0)


@pytest.mark.parametrize("loss", ["softmax_focal_loss", "poly_loss_cross_entropy"])
def test_zero_label_on_minus_inf_logit_contributes_nothing(loss: str) -> None:
    """0 log 0 = 0 (optax's poly loss gives NaN); positive label mass there costs +inf."""
    x = np.array([[-np.inf, 1.0, 2.0], [-np.inf, 1.0, 2.0]], np.float32)
    y = np.array([[0.0, 0.3, 0.7], [0.1, 0.2, 0.7]], np.float32)
    fn = getattr(jaxce, loss)

    @jax.jit
    def run(z):
        return fn(z, y), fn(z[:1, 1:], y[:1, 1:]), jax.grad(lambda v: fn(v, y[:1]).sum())(z[:1])

    value, without_class, grad = run(x)
    np.testing.assert_allclose(value[0], without_class[0], rtol=rounding_bound(jnp.float32, 16))
    assert value[1] == np.inf
    assert np.all(np.isfinite(grad)) and grad[0, 0] == 0


@pytest.mark.parametrize("loss", ["softmax_focal_loss", "poly_loss_cross_entropy"])
def test_where_is_dropping_the_excluded_classes_and_examples(loss: str) -> None:
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(N, C)).astype(np.float32), _soft(rng, (N, C)).astype(np.float32)
    classes = np.ones((N, C), bool)
    classes[:, 1] = False
    rows = np.array([True, False, True, True])
    fn = getattr(jaxce, loss)

    @jax.jit
    def run(z):
        return (
            fn(z, y, where=classes),
            fn(jnp.delete(z, 1, -1), np.delete(y, 1, -1)),
            fn(z, y, where=rows, reduction="mean"),
            fn(z[rows], y[rows], reduction="mean"),
            fn(z, y, where=np.zeros(N, bool), reduction="mean"),
        )

    masked, dropped, masked_mean, kept_mean, nothing = run(x)
    tolerance = rounding_bound(jnp.float32, 4 * C + 16)
    np.testing.assert_allclose(masked, dropped, rtol=tolerance)
    np.testing.assert_allclose(masked_mean, kept_mean, rtol=tolerance)
    assert float(nothing) == 0.0


@pytest.mark.parametrize("loss", ["softmax_focal_loss", "poly_loss_cross_entropy"])
def test_tuple_axis_is_the_classes_moved_last(loss: str) -> None:
    rng = np.random.default_rng(6)
    x = rng.normal(size=(3, 2, 4)).astype(np.float32)
    y = rng.uniform(size=(3, 2, 4)).astype(np.float32)
    fn = getattr(jaxce, loss)
    flat = lambda a: jnp.moveaxis(a, (2, 0), (1, 2)).reshape(2, 12)  # noqa: E731
    tupled, moved = jax.jit(lambda z: (fn(z, y, axis=(2, 0)), fn(flat(z), flat(y))))(x)
    np.testing.assert_allclose(tupled, moved, rtol=rounding_bound(jnp.float32, 4 * 12 + 16))


def test_focal_rule_differentiates_alpha_labels_and_gamma() -> None:
    """The derivative rule's tangents with respect to alpha, the labels and gamma, against
    jax.grad of the plain reference, in float64."""
    rng = np.random.default_rng(7)
    x, y = 2 * rng.standard_normal((N, C)), _soft(rng, (N, C))
    alpha, where = rng.uniform(0.2, 2.0, C), rng.uniform(size=(N, C)) > 0.2

    def total(module, a, labels, gamma):
        fn = module.softmax_focal_loss
        return jnp.sum(fn(x, labels, alpha=a, gamma=gamma, where=where, label_smoothing=0.1))

    @jax.jit
    def run(*args):
        ours = jax.grad(lambda *a: total(jaxce, *a), argnums=(0, 1, 2))(*args)
        return ours, jax.grad(lambda *a: total(_references, *a), argnums=(0, 1, 2))(*args)

    with jax.enable_x64(True):
        ours, reference = run(alpha, y, 1.5)
    for name, a, b in zip(("alpha", "labels", "gamma"), ours, reference, strict=True):
        assert_normwise_close(a, b, FLOAT64_TOLERANCE, name)


def test_patching_the_focal_closed_form_changes_grad_and_derivative_alike(monkeypatch) -> None:
    """One source of truth: `_closed_form.focal_slopes` feeds the loss's rule and
    `jaxce.derivatives` (as tests/test_closed_form_sharing.py shows for the softmax terms)."""
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(N, C)).astype(np.float32), _soft(rng, (N, C))

    def grad_and_closed():
        return value_grad_closed("softmax_focal_loss", x, y)[1:]

    expected, _ = grad_and_closed()
    original = _closed_form.focal_slopes
    monkeypatch.setattr(_closed_form, "focal_slopes", lambda *a: 2 * original(*a))
    jax.clear_caches()
    try:
        grad, closed = grad_and_closed()
    finally:
        monkeypatch.undo()
        jax.clear_caches()
    # The same float32 arithmetic, but for the factor 2 in u - p sum_c u_c: the sum's roundings.
    tolerance = rounding_bound(jnp.float32, 4 * C + 16)
    assert_normwise_close(grad, 2 * expected, tolerance, "jax.grad")
    assert_normwise_close(closed, 2 * expected, tolerance, "closed form")


# --------------------------------------------------------------------------- #
# Poly-1.
# --------------------------------------------------------------------------- #


def np_poly(x, y, epsilon, where):
    """(loss, gradient) of cross-entropy + epsilon sum_c y_c (1 - p_c), in float64."""
    log_p = np_log_softmax(np.where(where, x, -np.inf))
    p, y = np.exp(log_p), np.where(where, y, 0)
    with np.errstate(invalid="ignore"):  # 0 * -inf at excluded classes, left out
        cross_entropy = -np.sum(np.where(where, y * log_p, 0), -1)
    loss = cross_entropy + epsilon * np.sum(y * (1 - p), -1)
    hit = y * p
    gradient = p * y.sum(-1, keepdims=True) - y - epsilon * (hit - p * hit.sum(-1, keepdims=True))
    return loss, gradient


@pytest.mark.parametrize("epsilon", [-1.0, 0.0, 2.0, 5.45])
def test_poly_matches_float64_formula(epsilon: float) -> None:
    rng = np.random.default_rng(9)
    x, y = 3 * rng.standard_normal((N, C)), _soft(rng, (N, C))
    where = rng.uniform(size=(N, C)) > 0.2
    where[:, 0] = True
    with jax.enable_x64(True):
        # optax's positional order: logits, labels, epsilon, axis, where.
        loss, grad, closed = value_grad_closed("poly_loss_cross_entropy", x, y, epsilon, -1, where)
        plain = jax.jit(lambda z: jaxce.softmax_cross_entropy(z, y, where=where))(x)
    expected, expected_grad = np_poly(x, y, epsilon, where)
    np.testing.assert_allclose(loss, expected, rtol=FLOAT64_TOLERANCE)
    assert_normwise_close(grad, expected_grad, FLOAT64_TOLERANCE, "jax.grad")
    assert_normwise_close(closed, expected_grad, FLOAT64_TOLERANCE, "closed form")
    if epsilon == 0:
        np.testing.assert_allclose(loss, plain, rtol=FLOAT64_TOLERANCE)


def test_traced_epsilon_and_gamma_are_options_not_constants() -> None:
    """One compiled function, several values; out of range: NaN loss, zero gradient."""
    rng = np.random.default_rng(10)
    x, y = rng.normal(size=(N, C)).astype(np.float32), _soft(rng, (N, C))

    def poly(v, epsilon):
        return jaxce.poly_loss_cross_entropy(v, y, epsilon, reduction="mean")

    def focal(v, gamma):
        return jaxce.softmax_focal_loss(v, y, gamma=gamma, reduction="mean")

    @jax.jit
    def run(z, epsilon, gamma):
        return jax.value_and_grad(poly)(z, epsilon), jax.value_and_grad(focal)(z, gamma)

    (poly_value, _), (focal_value, _) = run(x, -1.0, 0.5)
    constants = jax.jit(lambda z: (poly(z, -1.0), focal(z, 0.5)))(x)
    np.testing.assert_allclose(poly_value, constants[0], rtol=rounding_bound(jnp.float32, 4))
    np.testing.assert_allclose(focal_value, constants[1], rtol=rounding_bound(jnp.float32, 4))
    (poly_value, poly_grad), (focal_value, focal_grad) = run(x, np.inf, -1.0)
    assert np.isnan(poly_value) and np.isnan(focal_value)
    assert np.all(poly_grad == 0) and np.all(focal_grad == 0)
