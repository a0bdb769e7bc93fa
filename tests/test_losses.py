"""Semantics, numerics, dtypes, transformations and bad input of every public loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    LOGIT_LOSSES,
    LOSSES,
    PLUS_INF_ROWS,
    REDUCTIONS,
    LossCase,
    half_precision_output_bound,
    np_integer_ce,
    np_log_softmax,
    np_logsumexp,
)

import jaxce

# --------------------------------------------------------------------------- #
# Transformations: jit, vmap, grad, jvp, hessian in float32, float64, bfloat16.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("case", LOSSES, ids=str)
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_jit_matches_eager_and_vmap_matches_batch(case: LossCase, dtype: str) -> None:
    rng = np.random.default_rng(1)
    x, y = case.make_inputs(rng, 6, 5)
    with jax.enable_x64(dtype == "float64"):
        x = jnp.asarray(x, dtype)
        y = jnp.asarray(y)
        eager = case.fn(x, y)
        jitted = jax.jit(case.fn)(x, y)
        per_example = jax.vmap(case.fn)(x, y)
        expected_dtype = jnp.float64 if dtype == "float64" else jnp.float32
        assert eager.dtype == expected_dtype
        np.testing.assert_allclose(jitted, eager, rtol=1e-6)
        np.testing.assert_allclose(per_example, eager, rtol=1e-6)


@pytest.mark.parametrize("case", LOSSES, ids=str)
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_jvp_tangent_equals_grad_dot_direction(case: LossCase, dtype: str) -> None:
    rng = np.random.default_rng(2)
    x, y = case.make_inputs(rng, 4, 3)
    direction = rng.normal(size=x.shape) * 0.01
    with jax.enable_x64(dtype == "float64"):
        x, y = jnp.asarray(x, dtype), jnp.asarray(y)
        v = jnp.asarray(direction, dtype)

        def total(z: jax.Array) -> jax.Array:
            return case.fn(z, y, reduction="mean")

        grad = jax.jit(jax.grad(total))(x)
        assert grad.dtype == x.dtype
        _, tangent = jax.jit(lambda z, t: jax.jvp(total, (z,), (t,)))(x, v)
        products = np.asarray(grad, np.float64) * np.asarray(v, np.float64)
    # As jaxce.verify measures the directional pair: |t - g.v| against sum |g_i v_i|.
    # The tangent is float32 (float64) arithmetic on the same inputs; the gradient is
    # that arithmetic rounded once to the input's dtype, which moves each g_i v_i by
    # u(dtype) of itself. A softmax of C = 3 classes and its weights: 4 C + 16 roundings.
    tolerance = half_precision_output_bound(dtype, 4 * 3 + 16)
    error = abs(float(tangent) - float(np.sum(products)))
    assert error <= tolerance * float(np.sum(np.abs(products))), (error, tolerance)


@pytest.mark.parametrize("case", LOSSES, ids=str)
def test_hessian_is_symmetric_and_matches_finite_differences_of_grad(case: LossCase) -> None:
    rng = np.random.default_rng(3)
    x, y = case.make_inputs(rng, 2, 3)
    with jax.enable_x64(True):
        x, y = jnp.asarray(x), jnp.asarray(y)

        def total(z: jax.Array) -> jax.Array:
            return case.fn(z, y, reduction="sum")

        hessian = jax.jit(jax.hessian(total))(x).reshape(x.size, x.size)
        grad = jax.jit(jax.grad(total))
        step = 1e-6
        columns = []
        for k in range(x.size):
            e = jnp.zeros(x.size).at[k].set(step).reshape(x.shape)
            columns.append(((grad(x + e) - grad(x - e)) / (2 * step)).ravel())
        np.testing.assert_allclose(hessian, hessian.T, atol=1e-12)
        # Central differences: truncation h^2 |g'''| / 6 ~ 1e-12 for derivatives of
        # order 1, rounding of g (a few u = 2^-53 on each side) over 2h: ~ 2e-10.
        np.testing.assert_allclose(hessian, np.stack(columns, axis=1), atol=1e-9)


def test_softmax_hessian_is_diag_p_minus_outer_p() -> None:
    with jax.enable_x64(True):
        x = jnp.array([0.3, -1.2, 2.0, 0.0])
        p = jax.nn.softmax(x)
        hessian = jax.jit(
            jax.hessian(lambda z: jaxce.softmax_cross_entropy_with_integer_labels(z, 1))
        )(x)
        np.testing.assert_allclose(hessian, jnp.diag(p) - jnp.outer(p, p), atol=1e-14)
        soft = jax.jit(jax.hessian(lambda z: jaxce.softmax_cross_entropy(z, jnp.full(4, 0.25))))(x)
        np.testing.assert_allclose(soft, jnp.diag(p) - jnp.outer(p, p), atol=1e-14)


# --------------------------------------------------------------------------- #
# Numerics.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("scale", [1e4, 1e30], ids=["1e4", "1e30"])
def test_integer_labels_extreme_logits_match_float64(scale: float) -> None:
    rng = np.random.default_rng(4)
    x64 = rng.choice([-1.0, 0.5, 1.0], size=(8, 6)) * scale
    x64 += rng.normal(size=x64.shape) * (scale * 1e-6)
    labels = rng.integers(0, 6, size=8)
    x32 = x64.astype(np.float32)
    loss, grad = jax.jit(
        jax.value_and_grad(
            lambda z: jaxce.softmax_cross_entropy_with_integer_labels(z, labels, reduction="sum")
        )
    )(x32)
    reference_x = x32.astype(np.float64)
    reference = np.sum(np_logsumexp(reference_x) - reference_x[np.arange(8), labels])
    reference_grad = np.exp(np_log_softmax(reference_x)) - np.eye(6)[labels]
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(loss, reference, rtol=1e-6)
    np.testing.assert_allclose(grad, reference_grad, atol=1e-6)


def test_integer_labels_beat_optax_cancellation_at_1e4() -> None:
    """optax's `logsumexp(x) - x_y` loses about 2e-4 at logits of 1e4 in float32."""
    import optax

    x = np.array([[1e4, 1e4 - 3.0, 1e4 - 7.0]], np.float32)
    exact = np_logsumexp(x.astype(np.float64)) - x.astype(np.float64)[:, 1]
    ours = jaxce.softmax_cross_entropy_with_integer_labels(x, np.array([1]))
    theirs = optax.softmax_cross_entropy_with_integer_labels(x, np.array([1]))
    assert abs(float(ours[0]) - exact[0]) < 1e-6
    assert abs(float(theirs[0]) - exact[0]) > abs(float(ours[0]) - exact[0])


@pytest.mark.parametrize("case", LOGIT_LOSSES, ids=str)
def test_logit_losses_finite_at_1e30(case: LossCase) -> None:
    x = jnp.array([[1e30, -1e30, 0.0], [-1e30, 1e30, 3.0]], jnp.float32)
    rng = np.random.default_rng(5)
    _, y = case.make_inputs(rng, 2, 3)
    loss, grad = jax.value_and_grad(lambda z: case.fn(z, y, reduction="sum"))(x)
    assert np.isfinite(loss)
    assert np.all(np.isfinite(grad))


def test_binary_extreme_logits_match_float64() -> None:
    x = np.array([1e30, -1e30, 30.0, -30.0, 1e4, -1e4], np.float32)
    y = np.array([0.0, 1.0, 1.0, 0.0, 0.3, 0.7])
    loss, grad = jax.value_and_grad(
        lambda z: jaxce.sigmoid_binary_cross_entropy(z, y, reduction="sum")
    )(x)
    x64 = x.astype(np.float64)
    reference = np.sum(y * np.logaddexp(0, -x64) + (1 - y) * np.logaddexp(0, x64))
    with np.errstate(over="ignore"):  # exp(-x) = inf for very negative x: sigmoid 0, exactly
        reference_grad = 1 / (1 + np.exp(-x64)) - y
    np.testing.assert_allclose(loss, reference, rtol=1e-6)
    np.testing.assert_allclose(grad, reference_grad, atol=1e-6)


def test_binary_gradient_at_zero_logit_is_exact() -> None:
    """The shared softplus tail uses |x|: its gradient at 0 must still be sigmoid(0) - y."""
    grad = jax.grad(lambda z: jaxce.sigmoid_binary_cross_entropy(z, 1.0))(0.0)
    assert float(grad) == pytest.approx(-0.5, abs=1e-7)
    grad0 = jax.grad(lambda z: jaxce.sigmoid_binary_cross_entropy(z, 0.0))(0.0)
    assert float(grad0) == pytest.approx(0.5, abs=1e-7)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_is_computed_in_float32(dtype: str) -> None:
    rng = np.random.default_rng(6)
    x = rng.normal(size=(16, 50)) * 4
    labels = rng.integers(0, 50, size=16)
    half = jnp.asarray(x, dtype)
    loss, grad = jax.value_and_grad(
        lambda z: jaxce.softmax_cross_entropy_with_integer_labels(z, labels, reduction="mean")
    )(half)
    assert loss.dtype == jnp.float32
    assert grad.dtype == jnp.dtype(dtype)
    exact = np_integer_ce(
        np.asarray(half.astype(jnp.float32), np.float64), labels, reduction="mean"
    )
    np.testing.assert_allclose(loss, exact, rtol=1e-6)


# --------------------------------------------------------------------------- #
# Semantics: reductions, weights, ignore_index, smoothing, z-loss, where.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2], ids=["no_smoothing", "smoothing"])
@pytest.mark.parametrize("z_loss", [0.0, 1e-3], ids=["no_z", "z_loss"])
def test_integer_labels_match_float64_formula(
    reduction: str, weighted: bool, smoothing: float, z_loss: float
) -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(9, 7)) * 3
    labels = rng.integers(0, 7, size=9)
    labels[[1, 4]] = -100
    weight = rng.uniform(0.2, 2.0, size=7) if weighted else None
    options = dict(
        weight=weight,
        ignore_index=-100,
        label_smoothing=smoothing,
        z_loss=z_loss,
        reduction=reduction,
    )
    with jax.enable_x64(True):
        ours = jaxce.softmax_cross_entropy_with_integer_labels(jnp.asarray(x), labels, **options)
    np.testing.assert_allclose(ours, np_integer_ce(x, labels, **options), rtol=1e-12, atol=1e-12)


def test_empty_mean_is_zero_with_zero_gradient() -> None:
    x = jnp.ones((3, 4))
    labels = jnp.array([-100, -100, -100])

    def loss(z: jax.Array) -> jax.Array:
        return jaxce.softmax_cross_entropy_with_integer_labels(
            z,
            labels,
            ignore_index=-100,
            weight=jnp.ones(4),
            label_smoothing=0.1,
            z_loss=0.01,
            reduction="mean",
        )

    value, grad = jax.value_and_grad(loss)(x)
    assert float(value) == 0.0
    assert np.all(np.asarray(grad) == 0.0)
    masked = jaxce.sigmoid_binary_cross_entropy(
        x, 1.0, where=jnp.zeros((3, 4), bool), reduction="mean"
    )
    assert float(masked) == 0.0


@pytest.mark.parametrize("case", LOSSES, ids=str)
def test_mean_and_sum_agree_with_none(case: LossCase) -> None:
    rng = np.random.default_rng(8)
    x, y = case.make_inputs(rng, 5, 4)
    per = case.fn(x, y)
    np.testing.assert_allclose(case.fn(x, y, reduction="sum"), jnp.sum(per), rtol=1e-6)
    np.testing.assert_allclose(case.fn(x, y, reduction="mean"), jnp.mean(per), rtol=1e-6)


def test_where_excludes_classes_like_minus_inf_logits() -> None:
    rng = np.random.default_rng(9)
    x = rng.normal(size=(4, 6)).astype(np.float32)
    mask = np.ones((4, 6), bool)
    mask[:, [2, 5]] = False
    labels = np.array([0, 1, 3, 4])
    as_inf = np.where(mask, x, -np.inf)

    def masked(z: jax.Array) -> jax.Array:
        return jaxce.softmax_cross_entropy_with_integer_labels(
            z, labels, where=mask, label_smoothing=0.1, reduction="sum"
        )

    value, grad = jax.jit(jax.value_and_grad(masked))(x)
    assert np.all(np.asarray(grad)[~mask] == 0.0)
    assert np.all(np.isfinite(grad))
    # Smoothing spreads eps / C over the C classes; excluded classes take no part.
    plain_value = jaxce.softmax_cross_entropy_with_integer_labels(
        as_inf[:, mask[0]], labels - (labels > 2)
    )
    log_p = np_log_softmax(as_inf[:, mask[0]].astype(np.float64))
    smooth = -np.sum(log_p, axis=-1) / 6
    reference = np.sum(0.9 * np.asarray(plain_value, np.float64) + 0.1 * smooth)
    np.testing.assert_allclose(value, reference, rtol=1e-5)
    # -inf logits: same value, no NaN anywhere.
    inf_value, inf_grad = jax.value_and_grad(
        lambda z: jaxce.softmax_cross_entropy_with_integer_labels(z, labels, reduction="sum")
    )(jnp.asarray(as_inf))
    np.testing.assert_allclose(inf_value, jnp.sum(plain_value), rtol=1e-6)
    assert np.all(np.asarray(inf_grad)[~mask] == 0.0)


def test_where_of_batch_shape_excludes_examples_and_mean_counts_the_rest() -> None:
    rng = np.random.default_rng(10)
    x = rng.normal(size=(5, 3))
    labels = rng.integers(0, 3, size=5)
    keep = np.array([True, False, True, True, False])
    loss = jaxce.softmax_cross_entropy_with_integer_labels(x, labels, where=keep)
    assert np.all(np.asarray(loss)[~keep] == 0.0)
    mean = jaxce.softmax_cross_entropy_with_integer_labels(x, labels, where=keep, reduction="mean")
    full = jaxce.softmax_cross_entropy_with_integer_labels(x[keep], labels[keep], reduction="mean")
    np.testing.assert_allclose(mean, full, rtol=1e-6)
    soft = jaxce.softmax_cross_entropy(x, np.eye(3)[labels], where=keep, reduction="mean")
    np.testing.assert_allclose(soft, full, rtol=1e-6)


def test_soft_labels_zero_mass_on_minus_inf_logit_is_zero_not_nan() -> None:
    x = jnp.array([[0.0, -jnp.inf, 1.0]])
    y = jnp.array([[0.5, 0.0, 0.5]])
    value, grad = jax.value_and_grad(lambda z: jaxce.softmax_cross_entropy(z, y).sum())(x)
    assert np.isfinite(value)
    assert np.all(np.isfinite(grad))
    assert float(grad[0, 1]) == 0.0
    positive_mass = jaxce.softmax_cross_entropy(x, jnp.array([[0.5, 0.5, 0.0]]))
    assert np.isposinf(positive_mass[0])


def test_tuple_axis_indexes_flattened_class_slice() -> None:
    rng = np.random.default_rng(11)
    x = rng.normal(size=(2, 3, 4, 5))
    labels = rng.integers(0, 12, size=(2, 5))
    ours = jaxce.softmax_cross_entropy_with_integer_labels(x, labels, axis=(1, 2))
    flat = np.moveaxis(x, 3, 1).reshape(2, 5, 12)
    expected = np_logsumexp(flat) - np.take_along_axis(flat, labels[..., None], -1)[..., 0]
    np.testing.assert_allclose(ours, expected, rtol=1e-5)
    class_weight = rng.uniform(size=(3, 4))
    weighted = jaxce.softmax_cross_entropy_with_integer_labels(
        x, labels, axis=(1, 2), weight=class_weight
    )
    np.testing.assert_allclose(weighted, expected * class_weight.reshape(-1)[labels], rtol=1e-5)


def test_binary_smoothing_is_keras() -> None:
    x = np.array([-2.0, 0.5, 3.0])
    y = np.array([1.0, 0.0, 1.0])
    eps = 0.2
    smoothed = y * (1 - eps) + 0.5 * eps
    expected = smoothed * np.logaddexp(0, -x) + (1 - smoothed) * np.logaddexp(0, x)
    with jax.enable_x64(True):
        ours = jaxce.sigmoid_binary_cross_entropy(x, y, label_smoothing=eps)
    np.testing.assert_allclose(ours, expected, rtol=1e-12)


def test_bce_from_probabilities_clamps_log_at_minus_100() -> None:
    p = jnp.array([0.0, 1.0, 0.0, 1.0])
    y = jnp.array([1.0, 0.0, 0.0, 1.0])
    loss, grad = jax.value_and_grad(lambda q: jaxce.binary_cross_entropy(q, y).sum())(p)
    np.testing.assert_allclose(loss, 200.0)
    assert np.all(np.isfinite(grad))


# Float32 probabilities from normal (1e-37) through subnormal (1e-38 to 1.4e-45, the smallest)
# to 0 and the float32 just below 1. XLA:CPU flushes subnormals to 0, so a plain `log(p)` or
# `p > exp(-100)` (itself subnormal) there reads a subnormal as 0 and clamps a finite log.
SUBNORMAL_PROBS = [1e-37, 1e-38, 1e-40, 1e-45, 0.0, 1 - 1e-7]


def _f64_clamped_log(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.maximum(np.log(p), -100.0)


def _f64_clamped_log_slope(p: np.ndarray) -> np.ndarray:
    """d/dp max(log p, -100) in float64: 1/p above the clamp, 0 at and below it."""
    with np.errstate(divide="ignore"):
        return np.where(np.log(p) > -100, 1 / np.where(p > 0, p, 1), 0.0)


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_probabilities_use_the_log_of_subnormals(mode: str) -> None:
    """log of a subnormal is finite (-87.5 at 1e-38) and is used; only the log is clamped at -100.

    PyTorch's BCELoss gives 87.4982 at p = 1e-38, y = 1; jaxce gave 100 (the subnormal read as 0).
    """
    import torch

    p32 = np.array(SUBNORMAL_PROBS, np.float32)
    p = p32.astype(np.float64)  # the float32 values, exactly
    ones, zeros = np.ones_like(p32), np.zeros_like(p32)
    expected = {1.0: -_f64_clamped_log(p), 0.0: -_f64_clamped_log(1 - p)}
    slope = {1.0: -_f64_clamped_log_slope(p), 0.0: _f64_clamped_log_slope(1 - p)}
    wrap = jax.jit if mode == "jit" else (lambda f: f)
    bce = wrap(lambda q, y: jaxce.binary_cross_entropy(q, y))
    bce_grad = wrap(jax.grad(lambda q, y: jaxce.binary_cross_entropy(q, y).sum()))
    # Each class of a two-class row [p, 1 - p] whose label is the class of p.
    rows = np.stack([p32, (1 - p).astype(np.float32)], axis=-1)
    cce = wrap(
        lambda q: jaxce.categorical_cross_entropy(q, np.eye(2, dtype=np.float32)[[0] * len(p)])
    )
    cce_grad = wrap(jax.grad(lambda q: cce(q).sum()))
    for y, labels in ((1.0, ones), (0.0, zeros)):
        loss = np.asarray(bce(p32, labels))
        # float64 once rounded to float32, then a few float32 roundings of a log near -100.
        np.testing.assert_allclose(
            loss, expected[y].astype(np.float32), rtol=4e-7, err_msg=f"y={y}"
        )
        torch_loss = torch.nn.functional.binary_cross_entropy(
            torch.tensor(p32), torch.tensor(labels), reduction="none"
        ).numpy()
        # PyTorch takes log1p(-p), which keeps -p (<= 1e-37 here) where log(1 - p) is 0.
        np.testing.assert_allclose(loss, torch_loss, rtol=4e-7, atol=1e-36, err_msg=f"torch y={y}")
        # The gradient 1/p above the clamp (inf where 1/p overflows float32), 0 below it.
        with np.errstate(over="ignore"):
            expected_grad = slope[y].astype(np.float32)
        for gradient in (
            bce_grad(p32, labels),
            jaxce.derivatives.binary_cross_entropy(p32, labels),
        ):
            np.testing.assert_allclose(np.asarray(gradient), expected_grad, rtol=4e-7)
    np.testing.assert_allclose(cce(rows), expected[1.0].astype(np.float32), rtol=4e-7)
    with np.errstate(over="ignore"):
        expected_grad = np.stack([slope[1.0], np.zeros_like(p)], -1).astype(np.float32)
    for gradient in (
        cce_grad(rows),
        jaxce.derivatives.categorical_cross_entropy(
            rows, np.eye(2, dtype=np.float32)[[0] * len(p)]
        ),
    ):
        np.testing.assert_allclose(np.asarray(gradient), expected_grad, rtol=4e-7)


# --------------------------------------------------------------------------- #
# Bad values: NaN under jit, an error under jaxce.checked.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("bad_label", [-1, 3, 99], ids=["minus_one", "num_classes", "far"])
def test_out_of_range_label_gives_nan_for_that_example(bad_label: int) -> None:
    x = jnp.zeros((3, 3))
    labels = jnp.array([0, bad_label, 2])
    loss = jax.jit(jaxce.softmax_cross_entropy_with_integer_labels)(x, labels)
    assert np.isfinite(loss[0]) and np.isfinite(loss[2])
    assert np.isnan(loss[1])
    mean = jaxce.softmax_cross_entropy_with_integer_labels(x, labels, reduction="mean")
    assert np.isnan(mean)
    ignored = jaxce.softmax_cross_entropy_with_integer_labels(x, labels, ignore_index=bad_label)
    assert float(ignored[1]) == 0.0


def test_checked_names_index_and_value_of_bad_label() -> None:
    loss = jaxce.checked(jaxce.softmax_cross_entropy_with_integer_labels)
    with pytest.raises(Exception, match=r"labels.*got -1 at index \[2\]"):
        loss(jnp.zeros((4, 3)), jnp.array([0, 1, -1, 2]))
    np.testing.assert_allclose(
        loss(jnp.zeros((2, 3)), jnp.array([0, 1])), np.log(3) * np.ones(2), rtol=1e-6
    )


def test_checked_names_probability_outside_unit_interval() -> None:
    loss = jaxce.checked(jaxce.binary_cross_entropy)
    with pytest.raises(Exception, match=r"probs.*got 1.5 at index \[1\]"):
        loss(jnp.array([0.5, 1.5]), jnp.array([1.0, 0.0]))
    assert np.isnan(jaxce.binary_cross_entropy(jnp.array([0.5, 1.5]), jnp.array([1.0, 0.0]))[1])
    categorical = jaxce.checked(jaxce.categorical_cross_entropy)
    probs = jnp.array([[0.7, 0.2, 0.1], [0.5, 0.75, -0.25]])
    with pytest.raises(Exception, match=r"probs.*got -0.25 at index \[1 2\]"):
        categorical(probs, jnp.eye(3)[:2])


def _np_categorical(p, y, weight=None, where=None):
    """-sum_c w_c y_c max(log p_c, -100) over the included classes, in float64."""
    p, y = np.asarray(p, np.float64), np.asarray(y, np.float64)
    w = np.ones(p.shape[-1]) if weight is None else np.asarray(weight, np.float64)
    where = np.ones(p.shape, bool) if where is None else np.broadcast_to(where, p.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = w * y * np.maximum(np.log(p), -100)
    return -np.sum(np.where(where & (y != 0), terms, 0), axis=-1)


@pytest.mark.parametrize("bad", [1.5, -0.2, np.nan], ids=["1.5", "-0.2", "nan"])
def test_categorical_probability_outside_unit_interval_makes_its_example_nan(bad) -> None:
    """The README's promise for categorical_cross_entropy, as binary_cross_entropy keeps it."""
    p = np.array([[0.7, 0.2, 0.1], [0.2, 0.3, bad], [0.2, 0.3, 0.5]])
    y = np.eye(3)[[0, 1, 2]]
    loss = np.asarray(jax.jit(jaxce.categorical_cross_entropy)(p, y))
    # The bad value is not the label's class: only the check can make the row NaN.
    assert np.isnan(loss[1])
    # One rounding of a log per row in float32: 2^-24 relative, with room for two.
    np.testing.assert_allclose(loss[[0, 2]], _np_categorical(p, y)[[0, 2]], rtol=2**-22)
    for reduction in ("sum", "mean"):
        assert np.isnan(jaxce.categorical_cross_entropy(p, y, reduction=reduction))
    # Finite gradients elsewhere, none for the invalid example.
    grad = jaxce.derivatives.categorical_cross_entropy(p, y, reduction="sum")
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[1] == 0)
    # A class-shaped `where` that excludes the bad value: the row counts again.
    where = np.ones(p.shape, bool)
    where[1, 2] = False
    masked = jaxce.categorical_cross_entropy(p, y, where=where)
    np.testing.assert_allclose(masked, _np_categorical(p, y, where=where), rtol=2**-22)


def test_categorical_class_shaped_where_drops_classes_not_rows() -> None:
    """A per-class mask leaves the row in and drops the excluded classes' terms.

    Soft labels put mass on every class, so a class mask changes the loss where a
    row mask of the same rows would not (and a row mask drops the row entirely).
    """
    rng = np.random.default_rng(21)
    p = rng.dirichlet(np.ones(4), size=3)
    y = rng.dirichlet(np.ones(4), size=3)
    weight = np.array([1.0, 2.0, -0.5, 0.5])
    classes = np.array([[True, False, True, True], [True, True, True, True], [False] * 4])
    rows = classes.any(axis=-1)
    with jax.enable_x64(True):
        per_class = jaxce.categorical_cross_entropy(p, y, weight=weight, where=classes)
        per_row = jaxce.categorical_cross_entropy(p, y, weight=weight, where=rows)
        per_class_mean = jaxce.categorical_cross_entropy(
            p, y, weight=weight, where=classes, reduction="mean"
        )
        per_class, per_row = np.asarray(per_class), np.asarray(per_row)
    expected = _np_categorical(p, y, weight, classes)
    # float64, a sum of 4 logs times weights: a few units of 2^-53.
    np.testing.assert_allclose(per_class, expected, rtol=1e-14, atol=0)
    np.testing.assert_allclose(per_row, _np_categorical(p, y, weight, rows[:, None]), rtol=1e-14)
    assert abs(per_class[0] - per_row[0]) > 0.01
    assert per_class[2] == per_row[2] == 0
    # The mean counts the examples with any included class: 2 of 3.
    np.testing.assert_allclose(per_class_mean, expected.sum() / 2, rtol=1e-14)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_categorical_label_smoothing_matches_float64_formula(reduction: str) -> None:
    """Targets (1 - eps) y + eps / C before the class weights; the closed form is jax.grad's."""
    rng = np.random.default_rng(22)
    p, y = rng.dirichlet(np.ones(5), size=4), rng.dirichlet(np.ones(5), size=4)
    weight, where = rng.uniform(0.5, 2.0, 5), rng.uniform(size=(4, 5)) > 0.2
    options = {"weight": weight, "where": where, "label_smoothing": 0.15, "reduction": reduction}

    @jax.jit
    def run(q):
        loss = lambda v: jaxce.categorical_cross_entropy(v, y, **options)  # noqa: E731
        closed = jaxce.derivatives.categorical_cross_entropy(q, y, **options)
        return loss(q), jax.grad(lambda v: jnp.sum(loss(v)))(q), closed

    with jax.enable_x64(True):
        value, grad, closed = run(p)
    smoothed = 0.85 * y + 0.15 / 5
    per_example = _np_categorical(p, smoothed, weight, where)
    expected = {
        "none": per_example,
        "sum": per_example.sum(),
        "mean": per_example.sum() / where.any(-1).sum(),
    }[reduction]
    # float64, a sum of 5 logs times weights: a few units of 2^-53.
    np.testing.assert_allclose(value, expected, rtol=1e-14)
    scale = 1 / where.any(-1).sum() if reduction == "mean" else 1.0
    np.testing.assert_allclose(
        closed, np.where(where, -weight * smoothed / p, 0) * scale, rtol=1e-14
    )
    np.testing.assert_allclose(grad, closed, rtol=1e-14)


def test_categorical_label_smoothing_is_keras_away_from_the_clamps() -> None:
    """keras/src/losses/losses_test.py, CategoricalCrossentropyTest.

    test_unweighted (0.3239, to 3 decimals) on probabilities: Keras divides each row by its sum
    first, jaxce takes rows that sum to 1. test_label_smoothing is from logits [100, -100,
    -100] with eps = 0.1: Keras' 400 eps / 3 is softmax_cross_entropy's value; from the
    probabilities softmax gives (e^-200 for the two zero labels) jaxce clamps each log at
    -100, PyTorch's clamp, so the loss is 200 eps / 3 (Keras clips p at 1e-7 instead, which
    gives 2 (eps / 3) log 1e7). Away from both edges the probabilities' loss is the logits'.
    """
    keras_probs = np.array([[0.9, 0.05, 0.05], [0.5, 0.89, 0.6], [0.05, 0.01, 0.94]])
    logits = np.array([[100.0, -100.0, -100.0]])
    moderate = np.array([[4.9, -0.5, 2.05], [0.3, 1.2, -0.7]])
    labels = np.array([[1.0, 0.0, 0.0], [0.0, 0.3, 0.7]])

    @jax.jit
    def run(probs, x, z):
        categorical = jaxce.categorical_cross_entropy
        return (
            categorical(probs / probs.sum(-1, keepdims=True), np.eye(3), reduction="mean"),
            jaxce.softmax_cross_entropy(x, labels[:1], label_smoothing=0.1),
            categorical(jax.nn.softmax(x), labels[:1], label_smoothing=0.1),
            categorical(jax.nn.softmax(z), labels, label_smoothing=0.1),
            jaxce.softmax_cross_entropy(z, labels, label_smoothing=0.1),
        )

    with jax.enable_x64(True):
        unweighted, from_logits, clamped, moderate_probs, moderate_logits = run(
            keras_probs, logits, moderate
        )
    np.testing.assert_allclose(unweighted, 0.3239, atol=0.5e-3)
    np.testing.assert_allclose(from_logits, 400 * 0.1 / 3, rtol=1e-14)
    np.testing.assert_allclose(clamped, 200 * 0.1 / 3, rtol=1e-14)
    np.testing.assert_allclose(moderate_probs, moderate_logits, rtol=1e-14)


def test_checked_accepts_negative_elementwise_and_pos_weights_as_pytorch_does() -> None:
    """Weights of any sign are valid (PyTorch computes them): no error, PyTorch's values."""
    x = jnp.array([[-1.0, 0.5], [2.0, -0.3]])
    y = jnp.array([[1.0, 0.0], [0.3, 1.0]])
    weight = jnp.array([[1.0, -2.0], [-0.5, 3.0]])
    pos_weight = jnp.array([-1.5, 2.0])
    sigmoid = jaxce.checked(
        lambda x, y, w, pw: jaxce.sigmoid_binary_cross_entropy(x, y, weight=w, pos_weight=pw)
    )
    got = sigmoid(x, y, weight, pos_weight)
    x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
    # binary_cross_entropy_with_logits: -w [pw y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))]
    expected = np.asarray(weight) * (
        np.asarray(pos_weight) * y64 * np.logaddexp(0, -x64) + (1 - y64) * np.logaddexp(0, x64)
    )
    # float32: softplus (4 roundings) and three products: 8 u, doubled.
    np.testing.assert_allclose(got, expected, rtol=2**-20)
    probs = jax.nn.sigmoid(x)
    bce = jaxce.checked(lambda p, y, w: jaxce.binary_cross_entropy(p, y, weight=w))
    p64 = np.asarray(probs, np.float64)
    expected = -np.asarray(weight) * (y64 * np.log(p64) + (1 - y64) * np.log1p(-p64))
    np.testing.assert_allclose(bce(probs, y, weight), expected, rtol=2**-20)
    categorical = jaxce.checked(lambda p, y, w: jaxce.categorical_cross_entropy(p, y, weight=w))
    class_weight = jnp.array([1.0, -2.0])
    rows = jnp.array([[0.3, 0.7], [0.6, 0.4]])
    np.testing.assert_allclose(
        categorical(rows, y, class_weight), _np_categorical(rows, y, class_weight), rtol=2**-20
    )


@pytest.mark.parametrize("nested", [False, True], ids=["vmap", "vmap-of-vmap"])
def test_checked_under_vmap_names_the_index_in_the_batch(nested) -> None:
    """The index is into the whole batched array (vmapped axes first), not one slice."""
    loss = jax.vmap(jaxce.softmax_cross_entropy_with_integer_labels)
    labels = np.array([[0, 1], [1, 1], [2, 9]])
    logits = np.zeros((3, 2, 3), np.float32)
    expected = r"got 9 at index \[2 1\]"
    if nested:
        loss = jax.vmap(loss)
        labels, logits = np.stack([labels * 0, labels]), np.stack([logits, logits])
        expected = r"got 9 at index \[1 2 1\]"
    with pytest.raises(Exception, match=expected):
        jaxce.checked(loss)(logits, labels)


def test_checked_accepts_negative_weight_as_pytorch_does() -> None:
    """Negative class weights are valid in PyTorch: no error, PyTorch's value."""
    loss = jaxce.checked(
        lambda x, y, w: jaxce.softmax_cross_entropy_with_integer_labels(x, y, weight=w)
    )
    got = loss(jnp.zeros((2, 3)), jnp.array([0, 1]), jnp.array([1.0, -2.0, 1.0]))
    np.testing.assert_allclose(got, [np.log(3), -2 * np.log(3)], rtol=1e-6)


# --------------------------------------------------------------------------- #
# Bad input at trace time: a clear error naming the argument.
# --------------------------------------------------------------------------- #


BAD_INPUTS = [
    pytest.param(
        lambda: jaxce.softmax_cross_entropy_with_integer_labels(
            jnp.zeros((2, 0)), jnp.array([0, 1])
        ),
        ValueError,
        r"`logits` has no classes: its class axes \(1,\) have sizes \(0,\)",
        id="no_classes_integer",
    ),
    pytest.param(
        lambda: jaxce.softmax_cross_entropy(jnp.zeros((2, 3, 0)), jnp.zeros((2, 3, 0)), (1, 2)),
        ValueError,
        r"`logits` has no classes: its class axes \(1, 2\) have sizes \(3, 0\)",
        id="no_classes_soft",
    ),
    pytest.param(
        lambda: jaxce.derivatives.softmax_cross_entropy_with_integer_labels(
            jnp.zeros((2, 0)), jnp.array([0, 1])
        ),
        ValueError,
        r"`logits` has no classes",
        id="no_classes_derivative",
    ),
    pytest.param(
        lambda: jaxce.softmax_cross_entropy(
            jnp.zeros((2, 3)), jnp.ones((2, 3)), label_smoothing="a"
        ),
        TypeError,
        r"`label_smoothing` must be a real number, got 'a'",
        id="smoothing_string",
    ),
    pytest.param(
        lambda: jaxce.sigmoid_binary_cross_entropy(jnp.zeros(3), jnp.ones(3), label_smoothing=True),
        TypeError,
        r"`label_smoothing` must be a real number, got True",
        id="smoothing_bool",
    ),
    pytest.param(
        lambda: jaxce.softmax_cross_entropy_with_integer_labels(
            jnp.zeros((2, 3)), jnp.array([0, 1]), z_loss=-1e-4
        ),
        ValueError,
        r"`z_loss` must be non-negative, got -0.0001",
        id="z_loss_negative",
    ),
    pytest.param(
        lambda: jaxce.softmax_cross_entropy_with_integer_labels(
            jnp.zeros((2, 3)), jnp.array([0, 1]), ignore_index=True
        ),
        TypeError,
        r"`ignore_index` must be an int or None, got True",
        id="ignore_index_bool",
    ),
    pytest.param(
        lambda: jaxce.logsumexp(jnp.zeros(())),
        ValueError,
        r"`axis` -1 is out of range for `x` of rank 0",
        id="logsumexp_scalar_names_x",
    ),
    pytest.param(
        lambda: jaxce.log_softmax(jnp.zeros(())),
        ValueError,
        r"`axis` -1 is out of range for `x` of rank 0",
        id="log_softmax_scalar_names_x",
    ),
    pytest.param(
        lambda: jaxce.softmax_cross_entropy_with_integer_labels(
            jnp.zeros((2, 3), jnp.int32), jnp.array([0, 1])
        ),
        TypeError,
        r"`logits` must have a floating dtype.*int32",
        id="integer_logits",
    ),
    pytest.param(
        lambda: jaxce.softmax_cross_entropy_with_integer_labels(
            jnp.zeros((2, 3)), jnp.array([0.0, 1.0])
        ),
        TypeError,
        r"`labels` must have an integer dtype.*float32",
        id="float_labels",
    ),
    pytest.param(
        lambda: jaxce.softmax_cross_entropy_with_integer_labels(
            jnp.zeros((2, 3)), jnp.array([0, 1, 2])
        ),
        ValueError,
        r"`labels` has shape \(3,\); expected the batch shape \(2,\)",
        id="labels_shape",
    ),
    pytest.param(
        lambda: jaxce.softmax_cross_entropy_with_integer_labels(
            jnp.zeros((2, 3)), jnp.array([0, 1]), reduction="avg"
        ),
        ValueError,
        r"`reduction` must be one of .* got 'avg'",
        id="reduction",
    ),
    pytest.param(
        lambda: jaxce.softmax_cross_entropy_with_integer_labels(
            jnp.zeros((2, 3)), jnp.array([0, 1]), label_smoothing=1.0
        ),
        ValueError,
        r"`label_smoothing` must be in \[0, 1\), got 1.0",
        id="smoothing_one",
    ),
    pytest.param(
        lambda: jaxce.softmax_cross_entropy(
            jnp.zeros((2, 3)), jnp.ones((2, 3)), label_smoothing=-0.1
        ),
        ValueError,
        r"`label_smoothing` must be in \[0, 1\), got -0.1",
        id="smoothing_negative",
    ),
    pytest.param(
        lambda: jaxce.softmax_cross_entropy_with_integer_labels(
            jnp.zeros((2, 3)), jnp.array([0, 1]), weight=jnp.ones(4)
        ),
        ValueError,
        r"`weight` must hold one weight per class: shape \(3,\), got \(4,\)",
        id="weight_length",
    ),
    pytest.param(
        lambda: jaxce.softmax_cross_entropy_with_integer_labels(
            jnp.zeros((2, 3)), jnp.array([0, 1]), axis=2
        ),
        ValueError,
        r"`axis` 2 is out of range for `logits` of rank 2",
        id="axis_out_of_range",
    ),
    pytest.param(
        lambda: jaxce.softmax_cross_entropy(jnp.zeros((2, 3)), jnp.ones((2, 4))),
        ValueError,
        r"`labels` has shape \(2, 4\), which does not broadcast",
        id="soft_labels_shape",
    ),
    pytest.param(
        lambda: jaxce.sigmoid_binary_cross_entropy(
            jnp.zeros((2, 3)), jnp.ones((2, 3)), pos_weight=jnp.ones(4)
        ),
        ValueError,
        r"`pos_weight` has shape \(4,\)",
        id="pos_weight_shape",
    ),
    pytest.param(
        lambda: jaxce.sigmoid_binary_cross_entropy(jnp.zeros((3,)), jnp.ones((2, 3))),
        ValueError,
        r"`labels` has shape \(2, 3\), which would broadcast",
        id="labels_enlarge_logits",
    ),
    pytest.param(
        lambda: jaxce.softmax_cross_entropy_with_integer_labels(
            jnp.zeros((2, 3)), jnp.array([0, 1]), where=jnp.ones((2, 3))
        ),
        TypeError,
        r"`where` must be a boolean array",
        id="where_dtype",
    ),
    pytest.param(
        lambda: jaxce.softmax_cross_entropy_with_integer_labels(
            jnp.zeros((2, 3, 4)), jnp.zeros((2, 4), int), axis=1, where=jnp.ones((3,), bool)
        ),
        ValueError,
        r"`where` has rank 1",
        id="where_rank",
    ),
    pytest.param(
        lambda: jaxce.binary_cross_entropy(jnp.zeros(3, jnp.int32), jnp.ones(3)),
        TypeError,
        r"`probs` must have a floating dtype",
        id="integer_probs",
    ),
    pytest.param(
        lambda: jaxce.sigmoid_focal_loss(jnp.zeros(3), jnp.ones(3), alpha=1.5),
        ValueError,
        r"`alpha` must be in \[0, 1\], got 1.5",
        id="alpha",
    ),
    pytest.param(
        lambda: jaxce.softmax_cross_entropy_with_integer_labels(
            jnp.zeros((2, 3)), jnp.array([0, 1]), axis="last"
        ),
        TypeError,
        r"`axis` must be an int or a tuple of ints",
        id="axis_type",
    ),
]


@pytest.mark.parametrize(("call", "error", "message"), BAD_INPUTS)
def test_bad_input_raises_naming_the_argument(call, error, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=message):
        call()


def test_bad_input_raises_at_trace_time_under_jit() -> None:
    with pytest.raises(ValueError, match="`reduction`"):
        jax.jit(
            lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(x, y, reduction="max")
        )(jnp.zeros((2, 3)), jnp.array([0, 1]))


def test_traced_hyperparameters_are_accepted() -> None:
    x = jnp.ones((2, 3))
    labels = jnp.array([0, 2])

    @jax.jit
    def loss(smoothing: jax.Array, z: jax.Array) -> jax.Array:
        return jaxce.softmax_cross_entropy_with_integer_labels(
            x, labels, label_smoothing=smoothing, z_loss=z, reduction="mean"
        )

    np.testing.assert_allclose(
        loss(0.1, 0.01),
        jaxce.softmax_cross_entropy_with_integer_labels(
            x, labels, label_smoothing=0.1, z_loss=0.01, reduction="mean"
        ),
        rtol=1e-6,
    )


# --------------------------------------------------------------------------- #
# +inf logits: no finite normaliser, so never a finite loss (docs/semantics.md, "A zero
# weight meeting an infinite term").
# --------------------------------------------------------------------------- #

PLUS_INF_LOGITS = PLUS_INF_ROWS
# Labels on the +inf class, on a finite class, and on a class whose weight is 0.
PLUS_INF_LABELS = {"on_inf": [1, 0, 2, 0], "on_finite": [0, 3, 0, 1], "on_zero_weight": [2] * 4}
PLUS_INF_OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-2},
    "weight": {"weight": np.array([1.0, 2.0, 0.0, 1.0], np.float32)},
}


def _plus_inf_cases() -> list:
    cases = []
    for loss in ("integer_xla", "integer_pallas", "soft"):
        for option in PLUS_INF_OPTIONS:
            if loss == "soft" and option == "z_loss":
                continue
            for labels in PLUS_INF_LABELS:
                cases.append(pytest.param(loss, option, labels, id=f"{loss}-{option}-{labels}"))
    return cases


@pytest.mark.parametrize(("loss", "option", "labels"), _plus_inf_cases())
def test_plus_inf_logit_never_gives_a_finite_loss(loss: str, option: str, labels: str) -> None:
    classes = jnp.asarray(PLUS_INF_LABELS[labels])
    options = PLUS_INF_OPTIONS[option]

    def run(reduction: str) -> jax.Array:
        if loss == "soft":
            return jaxce.softmax_cross_entropy(
                PLUS_INF_LOGITS, jax.nn.one_hot(classes, 4), reduction=reduction, **options
            )
        return jaxce.softmax_cross_entropy_with_integer_labels(
            PLUS_INF_LOGITS,
            classes,
            reduction=reduction,
            implementation=loss.removeprefix("integer_"),
            **options,
        )

    per_example = np.asarray(run("none"))
    assert not np.any(np.isfinite(per_example)), per_example
    for reduction in ("sum", "mean"):
        assert not np.isfinite(np.asarray(run(reduction))), reduction
