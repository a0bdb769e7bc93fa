"""One source of truth for the softmax losses' derivatives, and what the fused rule must keep.

`jaxce._closed_form` holds the closed-form softmax gradients. The losses'
`custom_jvp` rule and `jaxce.derivatives` both call them: changing one of those
functions changes `jax.grad` of the loss and the closed form alike. The rule
also carries the smoothing and soft-label sums, so the gradients with respect
to labels and class weights, forward mode, second order, -inf semantics and
the zero-coefficient z-loss are checked here against plain formulations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import REDUCTIONS, compile_as_users_do

import jaxce
import jaxce.derivatives as derivatives
from jaxce import _closed_form

N, C = 4, 5


def _inputs(seed: int = 0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, C)) * 2
    labels = rng.integers(0, C, size=N)
    soft = rng.dirichlet(np.ones(C), size=N)
    soft[0, 1] = 0.0  # a zero target: its label gradient is still -log p
    soft[0] /= soft[0].sum()
    weight = rng.uniform(0.5, 1.5, size=C)
    return x.astype(dtype), labels, soft.astype(dtype), weight.astype(dtype)


# --------------------------------------------------------------------------- #
# Sharing: patching a shared closed form changes both derivatives.
# --------------------------------------------------------------------------- #


def _integer_loss(x, labels, **options):
    return jaxce.softmax_cross_entropy_with_integer_labels(x, labels, reduction="sum", **options)


def _soft_loss(x, targets, **options):
    return jaxce.softmax_cross_entropy(x, targets, reduction="sum", **options)


def _both(kind: str, options: dict):
    """(jax.grad of the loss, the closed form of `jaxce.derivatives`) on fixed inputs."""
    x, labels, soft, _ = _inputs(dtype=np.float32)

    # One jitted trace (the caches are cleared around every patch, so it reads the
    # patched function), not an op-by-op compile of every primitive.
    @jax.jit
    def grad_and_closed(x):
        if kind == "integer":
            loss = jax.grad(lambda z: _integer_loss(z, labels, **options))(x)
            closed = derivatives.softmax_cross_entropy_with_integer_labels(
                x, labels, reduction="sum", **options
            )
        else:
            loss = jax.grad(lambda z: _soft_loss(z, soft, **options))(x)
            closed = derivatives.softmax_cross_entropy(x, soft, reduction="sum", **options)
        return loss, closed

    loss, closed = grad_and_closed(x)
    return np.asarray(loss), np.asarray(closed)


@pytest.fixture
def fresh_traces():
    """No jaxpr traced before (or with) a patch is reused."""
    jax.clear_caches()
    yield
    jax.clear_caches()


def _doubled(function):
    def patched(*args):
        return 2 * function(*args)

    return patched


def _p_doubled(x):
    row_max, log_normalizer, p, total = _ORIGINAL_PARTS(x)
    return row_max, log_normalizer, 2 * p, total


_ORIGINAL_PARTS = _closed_form.softmax_parts


@pytest.mark.parametrize(
    ("patched_name", "kind", "options"),
    [
        ("label_gradient", "integer", {}),
        ("label_gradient", "integer", {"weight": np.linspace(0.5, 1.5, C)}),
        ("weighted_gradient", "integer", {"label_smoothing": 0.3}),
        ("weighted_gradient", "soft", {}),
        ("softmax_parts", "integer", {"z_loss": 0.1}),
        ("softmax_parts", "soft", {"label_smoothing": 0.2}),
    ],
    ids=[
        "label_gradient-integer",
        "label_gradient-integer-weights",
        "weighted_gradient-smoothing",
        "weighted_gradient-soft-labels",
        "softmax_parts-integer-z_loss",
        "softmax_parts-soft-smoothing",
    ],
)
def test_patching_a_shared_closed_form_changes_grad_and_derivative_alike(
    monkeypatch, fresh_traces, patched_name, kind, options
):
    grad_before, closed_before = _both(kind, options)
    np.testing.assert_allclose(grad_before, closed_before, rtol=1e-5, atol=1e-6)

    original = getattr(_closed_form, patched_name)
    replacement = _p_doubled if patched_name == "softmax_parts" else _doubled(original)
    monkeypatch.setattr(_closed_form, patched_name, replacement)
    jax.clear_caches()
    grad_after, closed_after = _both(kind, options)

    # Both moved, by the same amount: they read the same function.
    assert np.max(np.abs(grad_after - grad_before)) > 1e-2
    np.testing.assert_allclose(grad_after, closed_after, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- #
# z-loss with a zero coefficient.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_traced_zero_z_loss_is_exactly_no_z_loss_at_1e30(reduction):
    x = np.array([[1e30, 1e30], [1e30, -1e30]], np.float32)
    labels = np.array([0, 1])

    def loss(z, zl):
        return jnp.sum(
            jaxce.softmax_cross_entropy_with_integer_labels(
                z, labels, z_loss=zl, reduction=reduction
            )
        )

    value, grad = jax.jit(jax.value_and_grad(loss))(x, 0.0)
    plain, plain_grad = jax.value_and_grad(lambda z: loss(z, 0))(x)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    np.testing.assert_array_equal(value, plain)
    np.testing.assert_array_equal(grad, plain_grad)
    closed = derivatives.softmax_cross_entropy_with_integer_labels(
        x, labels, z_loss=0.0, reduction=reduction
    )
    np.testing.assert_array_equal(closed, plain_grad)


def test_z_loss_coefficient_gradient_is_log_partition_squared():
    x, labels, _, _ = _inputs()
    with jax.enable_x64(True):
        grad = jax.grad(
            lambda z: jaxce.softmax_cross_entropy_with_integer_labels(
                x, labels, z_loss=z, reduction="sum"
            )
        )(0.0)
        log_partition = np.log(np.sum(np.exp(x), axis=-1))
        np.testing.assert_allclose(grad, np.sum(log_partition**2), rtol=1e-12)


# --------------------------------------------------------------------------- #
# Gradients with respect to labels and class weights, forward and second order.
# --------------------------------------------------------------------------- #


def _plain_soft(x, targets, weight, smoothing):
    targets = (1 - smoothing) * targets + smoothing / x.shape[-1]
    return -jnp.sum(jnp.reshape(weight, (1, -1)) * targets * jax.nn.log_softmax(x))


def _plain_integer(x, labels, weight, smoothing):
    """PyTorch's weighted, smoothed mean in plain jnp."""
    log_p = jax.nn.log_softmax(x)
    label_weight = weight[labels]
    nll = -jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]
    smooth = -jnp.sum(weight[None, :] * log_p, axis=-1) / x.shape[-1]
    total = jnp.sum((1 - smoothing) * label_weight * nll + smoothing * smooth)
    return total / jnp.sum(label_weight)


@pytest.mark.parametrize("smoothing", [0.0, 0.2], ids=["no_smoothing", "smoothing"])
def test_soft_label_and_weight_gradients_match_plain_formula(smoothing):
    x, _, soft, weight = _inputs(1)
    with jax.enable_x64(True):

        def ours(x, t, w):
            return jaxce.softmax_cross_entropy(
                x, t, weight=w, label_smoothing=smoothing, reduction="sum"
            )

        got = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(x, soft, weight)
        want = jax.jit(jax.grad(_plain_soft, argnums=(0, 1, 2)))(x, soft, weight, smoothing)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)
        # The zero target's gradient is -w log p, not 0.
        assert got[1][0, 1] > 0


def test_integer_label_class_weight_gradient_matches_plain_formula():
    x, labels, _, weight = _inputs(2)
    with jax.enable_x64(True):

        def ours(x, w):
            return jaxce.softmax_cross_entropy_with_integer_labels(
                x, labels, weight=w, label_smoothing=0.1, reduction="mean"
            )

        got = jax.grad(ours, argnums=(0, 1))(x, weight)
        want = jax.grad(_plain_integer, argnums=(0, 2))(x, labels, weight, 0.1)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["integer-smoothing", "soft-smoothing"])
def test_jvp_and_hessian_match_plain_formula(kind):
    x, labels, soft, weight = _inputs(3)
    with jax.enable_x64(True):
        if kind == "integer-smoothing":

            def ours(z):
                return jaxce.softmax_cross_entropy_with_integer_labels(
                    z, labels, weight=weight, label_smoothing=0.2, reduction="mean"
                )

            def plain(z):
                return _plain_integer(z, labels, weight, 0.2)
        else:

            def ours(z):
                return jaxce.softmax_cross_entropy(z, soft, label_smoothing=0.2, reduction="sum")

            def plain(z):
                return _plain_soft(z, soft, np.ones(C), 0.2)

        direction = np.random.default_rng(4).normal(size=x.shape)
        # Jitted: one compile each instead of an op-by-op one for every primitive.
        _, tangent = jax.jit(lambda d: jax.jvp(ours, (x,), (d,)))(direction)
        _, expected = jax.jit(lambda d: jax.jvp(plain, (x,), (d,)))(direction)
        np.testing.assert_allclose(tangent, expected, rtol=1e-12)
        np.testing.assert_allclose(
            jax.jit(jax.hessian(ours))(x), jax.jit(jax.hessian(plain))(x), rtol=1e-10, atol=1e-12
        )


# --------------------------------------------------------------------------- #
# -inf logits and excluded classes in the fused sums.
# --------------------------------------------------------------------------- #


def test_soft_labels_zero_target_on_minus_inf_contributes_nothing():
    x = jnp.array([[0.0, -jnp.inf, 1.0], [0.0, -jnp.inf, 1.0]])
    targets = jnp.array([[0.5, 0.0, 0.5], [0.5, 1e-6, 0.5 - 1e-6]])
    loss = jaxce.softmax_cross_entropy(x, targets)
    log_p = np.asarray(jax.nn.log_softmax(x[0]))
    np.testing.assert_allclose(loss[0], -0.5 * (log_p[0] + log_p[2]), rtol=1e-6)
    assert loss[1] == np.inf
    grad = jax.grad(lambda z: jaxce.softmax_cross_entropy(z, targets[:1]).sum())(x[:1])
    assert np.all(np.isfinite(grad)) and grad[0, 1] == 0


@pytest.mark.parametrize("loss_kind", ["integer", "soft"])
def test_excluded_classes_with_smoothing_match_dropping_them(loss_kind):
    x, labels, soft, _ = _inputs(5, np.float32)
    keep = np.array([True, True, False, True, True])
    labels = np.where(labels == 2, 0, labels)
    soft = soft * keep
    kwargs = {"label_smoothing": 0.2, "reduction": "sum"}
    if loss_kind == "integer":

        def masked(z):
            return jaxce.softmax_cross_entropy_with_integer_labels(
                z, labels, where=np.broadcast_to(keep, x.shape), **kwargs
            )

        dropped_labels = np.where(labels > 2, labels - 1, labels)

        def dropped(z):
            # PyTorch's smoothing divides by the class count, included or not.
            nll = jaxce.softmax_cross_entropy_with_integer_labels(
                z, dropped_labels, reduction="sum"
            )
            log_p = jax.nn.log_softmax(z)
            return 0.8 * nll - 0.2 / C * jnp.sum(log_p)
    else:

        def masked(z):
            return jaxce.softmax_cross_entropy(
                z, soft, where=np.broadcast_to(keep, x.shape), **kwargs
            )

        def dropped(z):
            targets = 0.8 * soft[:, keep] + 0.2 / C
            return -jnp.sum(targets * jax.nn.log_softmax(z))

    value, grad = jax.jit(jax.value_and_grad(masked))(x)
    expected, expected_grad = jax.jit(jax.value_and_grad(dropped))(x[:, keep])
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    np.testing.assert_allclose(grad[:, keep], expected_grad, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(grad[:, ~keep], 0)


# --------------------------------------------------------------------------- #
# The point of the fused sums: no [N, C] temporaries (XLA's memory analysis).
# --------------------------------------------------------------------------- #


def _temp_bytes(function, *args) -> int:
    compiled = compile_as_users_do(jax.jit(jax.value_and_grad(function)).lower(*args))
    analysis = compiled.memory_analysis()
    assert analysis is not None, "XLA reported no memory analysis for this backend"
    return int(analysis.temp_size_in_bytes)


def test_smoothing_and_soft_labels_need_no_more_temporaries_than_optax():
    shape = (256, 4096)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    labels = jax.ShapeDtypeStruct(shape[:1], jnp.int32)
    weight = jax.ShapeDtypeStruct(shape[1:], jnp.float32)
    one_buffer = shape[0] * shape[1] * 4

    def options(x, y, w):
        return jaxce.softmax_cross_entropy_with_integer_labels(
            x, y, weight=w, ignore_index=-100, label_smoothing=0.1, reduction="mean"
        )

    def soft(x, t):
        return jaxce.softmax_cross_entropy(x, t, reduction="mean")

    def optax_soft(x, t):
        return optax.softmax_cross_entropy(x, t).mean()

    assert _temp_bytes(options, x, labels, weight) < one_buffer
    assert _temp_bytes(soft, x, x) <= max(_temp_bytes(optax_soft, x, x), one_buffer // 8)
