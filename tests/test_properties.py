"""Hypothesis property tests: closed forms agree with jax.grad, and the losses keep their laws.

Shapes come from a small fixed set and every function is jitted once per shape and
reduction (compilation, not arithmetic, is the cost), so a property runs hundreds of
examples in a few seconds. Values mix ordinary logits with the extremes ``+-1e4``,
``+-1e30``, ``-inf`` in classes excluded by ``where``, and probabilities at 0 and 1.

Profiles: ``ci`` (the default: derandomized, a few thousand examples in total) and
``thorough`` (``pytest --hypothesis-profile=thorough``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.extra import numpy as hnp

import jaxce
import jaxce.derivatives as derivatives

_COMMON = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
try:  # tests/conftest.py may have registered them already (needed for --hypothesis-profile).
    settings.get_profile("ci")
except InvalidArgument:
    settings.register_profile("ci", max_examples=300, derandomize=True, **_COMMON)
    settings.register_profile("thorough", max_examples=5000, **_COMMON)
if settings.get_current_profile_name() == "default":
    settings.load_profile("ci")

SHAPES = [(1, 2), (3, 5), (2, 3, 4)]
REDUCTIONS = ["none", "sum", "mean"]
EXTREMES = [1e4, -1e4, 1e30, -1e30, 0.0]
IGNORE = -100

logit_values = st.one_of(
    st.floats(-30, 30, width=32), st.sampled_from(EXTREMES), st.floats(-30, 30, width=32)
)
probability_values = st.one_of(st.floats(0, 1, width=32), st.sampled_from([0.0, 1.0]))


def _arrays(shape, elements):
    return hnp.arrays(np.float32, shape, elements=elements)


def _assert_close(actual, expected, rtol=2e-5):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert np.all(np.isfinite(actual) == np.isfinite(expected))
    scale = max(1.0, float(np.max(np.abs(np.where(np.isfinite(expected), expected, 0)))))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def _grad_and_closed(name):
    """A jitted ``(loss, jax.grad, closed form)`` of the jaxce loss ``name``."""
    loss, closed = getattr(jaxce, name), getattr(derivatives, name)

    def evaluate(first, rest, options, reduction):
        value = loss(first, *rest, reduction=reduction, **options)
        gradient = jax.grad(lambda a: jnp.sum(loss(a, *rest, reduction=reduction, **options)))
        return value, gradient(first), closed(first, *rest, reduction=reduction, **options)

    return jax.jit(evaluate, static_argnames="reduction")


INTEGER = _grad_and_closed("softmax_cross_entropy_with_integer_labels")


def _integer_with_ignore(x, labels, weight, smoothing, z, where, reduction):
    def loss(a):
        return jaxce.softmax_cross_entropy_with_integer_labels(
            a, labels, weight=weight, ignore_index=IGNORE, label_smoothing=smoothing,
            z_loss=z, where=where, reduction=reduction,
        )  # fmt: skip

    closed = derivatives.softmax_cross_entropy_with_integer_labels(
        x, labels, weight=weight, ignore_index=IGNORE, label_smoothing=smoothing,
        z_loss=z, where=where, reduction=reduction,
    )  # fmt: skip
    return loss(x), jax.grad(lambda a: jnp.sum(loss(a)))(x), closed


# z is static: a concrete 0 turns the z-loss off, as users write it. (A traced 0 times
# the float32 overflow of (1e30)^2 is NaN; see the report on the shipped loss.)
INTEGER_IGNORE = jax.jit(_integer_with_ignore, static_argnames=("z", "reduction"))
SOFTMAX = _grad_and_closed("softmax_cross_entropy")
SIGMOID = _grad_and_closed("sigmoid_binary_cross_entropy")
FOCAL = _grad_and_closed("sigmoid_focal_loss")
BINARY_PROBS = _grad_and_closed("binary_cross_entropy")
CATEGORICAL = _grad_and_closed("categorical_cross_entropy")


@st.composite
def integer_label_problems(draw):
    shape = draw(st.sampled_from(SHAPES))
    classes = shape[-1]
    x = draw(_arrays(shape, logit_values))
    where = draw(hnp.arrays(np.bool_, shape))
    labels = draw(hnp.arrays(np.int32, shape[:-1], elements=st.integers(0, classes - 1)))
    # The label's class stays included: an excluded label has an infinite loss.
    np.put_along_axis(where, labels[..., None], True, axis=-1)
    ignored = draw(hnp.arrays(np.bool_, shape[:-1]))
    labels = np.where(ignored, IGNORE, labels)
    # Excluded classes may carry -inf: they must not leak NaN anywhere.
    x = np.where(where | ~draw(hnp.arrays(np.bool_, shape)), x, -np.inf).astype(np.float32)
    weight = draw(_arrays((classes,), st.floats(0, 4, width=32)))
    smoothing = draw(st.sampled_from([0.0, 0.1, 0.5]))
    z = draw(st.sampled_from([0.0, 1e-4]))
    if z:
        # z (log Z)^2 overflows float32 beyond |log Z| ~ 1e19: keep to the +-1e4 extremes.
        x = np.clip(x, -1e4, 1e4)
    reduction = draw(st.sampled_from(REDUCTIONS))
    return x, labels, weight, np.float32(smoothing), z, where, reduction


@given(integer_label_problems())
def test_integer_labels_closed_form_equals_autodiff(problem):
    x, labels, weight, smoothing, z, where, reduction = problem
    loss, expected, closed = INTEGER_IGNORE(x, labels, weight, smoothing, z, where, reduction)
    counted = labels != IGNORE
    if reduction == "mean" and counted.any() and weight[labels[counted]].sum() == 0:
        # PyTorch's weighted mean divides by the counted weights: 0 / 0 here, and
        # the gradients of the counted rows are not finite either way.
        assert np.isnan(np.asarray(loss))
        rows = np.broadcast_to(counted[..., None], np.shape(closed)) & where
        assert not np.isfinite(np.asarray(closed)[rows]).any()
        assert not np.isfinite(np.asarray(expected)[rows]).any()
        return
    _assert_close(closed, expected)
    assert np.all(np.isfinite(np.asarray(closed)))
    assert closed.dtype == jnp.float32
    # Cross-entropy, smoothed or not, and z-loss are non-negative for non-negative weights.
    assert np.all(np.asarray(loss) >= 0)


@st.composite
def soft_label_problems(draw, extremes=True):
    shape = draw(st.sampled_from(SHAPES))
    x = draw(_arrays(shape, logit_values if extremes else st.floats(-30, 30, width=32)))
    raw = draw(_arrays(shape, st.floats(0, 1, width=32)))
    totals = raw.sum(-1, keepdims=True)
    labels = np.where(totals > 0, raw / np.where(totals > 0, totals, 1), 1 / shape[-1])
    return x, labels.astype(np.float32)


@given(soft_label_problems(), st.sampled_from(REDUCTIONS), st.sampled_from([0.0, 0.2]))
def test_softmax_closed_form_equals_autodiff_and_rows_sum_to_zero(problem, reduction, smoothing):
    x, labels = problem
    options = {"label_smoothing": np.float32(smoothing)}
    loss, expected, closed = SOFTMAX(x, (labels,), options, reduction)
    _assert_close(closed, expected)
    assert np.all(np.asarray(loss) >= 0)
    # Labels summing to 1 (smoothing keeps that) and no weights: each row sums to 0.
    closed = np.asarray(closed, np.float64)
    row_scale = np.maximum(1.0, np.max(np.abs(closed), axis=-1))
    assert np.all(np.abs(closed.sum(-1)) <= 1e-5 * row_scale)


@given(integer_label_problems())
def test_integer_label_gradient_rows_sum_to_zero(problem):
    x, labels, _, _, _, _, reduction = problem
    x = np.where(np.isfinite(x), x, 0).astype(np.float32)
    labels = np.where(labels == IGNORE, 0, labels)
    _, _, closed = INTEGER(x, (labels,), {}, reduction)
    closed = np.asarray(closed, np.float64)
    assert np.all(np.abs(closed.sum(-1)) <= 1e-5 * np.maximum(1.0, np.abs(closed).max(-1)))


@given(
    soft_label_problems(extremes=False),
    st.floats(-100, 100),
    st.sampled_from([0.0, 0.3]),
)
def test_softmax_loss_invariant_to_adding_a_constant(problem, constant, smoothing):
    x, labels = problem
    with jax.enable_x64(True):
        x = x.astype(np.float64)
        options = {"label_smoothing": smoothing}
        base, gradient, _ = SOFTMAX(x, (labels.astype(np.float64),), options, "none")
        moved, moved_gradient, _ = SOFTMAX(
            x + constant, (labels.astype(np.float64),), options, "none"
        )
    tolerance = 1e-12 * (1 + abs(constant) + np.abs(x).max()) * x.shape[-1]
    np.testing.assert_allclose(moved, base, rtol=0, atol=tolerance)
    np.testing.assert_allclose(moved_gradient, gradient, rtol=0, atol=tolerance)


@st.composite
def binary_problems(draw):
    shape = draw(st.sampled_from(SHAPES))
    x = draw(_arrays(shape, logit_values))
    labels = draw(_arrays(shape, probability_values))
    where = draw(hnp.arrays(np.bool_, shape))
    weight = draw(_arrays(shape[-1:], st.floats(0, 4, width=32)))
    pos_weight = draw(_arrays(shape[-1:], st.floats(0, 4, width=32)))
    reduction = draw(st.sampled_from(REDUCTIONS))
    return x, labels, where, weight, pos_weight, reduction


@given(binary_problems(), st.sampled_from([0.0, 0.1]))
def test_sigmoid_closed_form_equals_autodiff(problem, smoothing):
    x, labels, where, weight, pos_weight, reduction = problem
    options = {
        "weight": weight,
        "pos_weight": pos_weight,
        "label_smoothing": np.float32(smoothing),
        "where": where,
    }
    loss, expected, closed = SIGMOID(x, (labels,), options, reduction)
    _assert_close(closed, expected)
    assert np.all(np.asarray(loss) >= 0)


@given(binary_problems(), st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.5]), st.floats(0, 1))
def test_focal_closed_form_equals_autodiff(problem, gamma, alpha):
    x, labels, where, _, _, reduction = problem
    options = {"gamma": np.float32(gamma), "alpha": np.float32(alpha), "where": where}
    loss, expected, closed = FOCAL(x, (labels,), options, reduction)
    _assert_close(closed, expected, rtol=1e-4)
    assert np.all(np.asarray(loss) >= 0)


@given(binary_problems())
def test_binary_probability_closed_form_equals_autodiff(problem):
    x, labels, where, weight, _, reduction = problem
    probs = jax.nn.sigmoid(np.clip(x, -20, 20))
    # Exactly 0 and 1 where the logits were extreme: the clamp's flat region.
    probs = np.where(np.abs(x) >= 1e4, (x > 0) * 1.0, probs).astype(np.float32)
    loss, expected, closed = BINARY_PROBS(
        probs, (labels,), {"weight": weight, "where": where}, reduction
    )
    _assert_close(closed, expected)
    assert np.all(np.asarray(loss) >= 0)


@given(soft_label_problems(), st.sampled_from(REDUCTIONS))
def test_categorical_closed_form_equals_autodiff(problem, reduction):
    x, labels = problem
    probs = np.asarray(jax.nn.softmax(np.clip(x, -20, 20), axis=-1))
    probs = np.where(np.abs(x) >= 1e4, (x > 0) * 1.0, probs).astype(np.float32)
    loss, expected, closed = CATEGORICAL(probs, (labels,), {}, reduction)
    _assert_close(closed, expected)
    assert np.all(np.asarray(loss) >= 0)


VMAPPED = {
    name: jax.jit(
        lambda first, second, name=name: (
            getattr(jaxce, name)(first, second),
            jax.vmap(lambda a, b: getattr(jaxce, name)(a[None], b[None])[0])(first, second),
            getattr(derivatives, name)(first, second),
            jax.vmap(lambda a, b: getattr(derivatives, name)(a[None], b[None])[0])(first, second),
        )
    )
    for name in ["softmax_cross_entropy", "softmax_cross_entropy_with_integer_labels"]
}


@given(soft_label_problems())
def test_vmap_of_single_examples_equals_the_batch(problem):
    x, labels = problem
    x, labels = x.reshape(-1, x.shape[-1]), labels.reshape(-1, x.shape[-1])
    integer_labels = labels.argmax(-1).astype(np.int32)
    for name, second in [
        ("softmax_cross_entropy", labels),
        ("softmax_cross_entropy_with_integer_labels", integer_labels),
    ]:
        batch_loss, single_loss, batch_grad, single_grad = VMAPPED[name](x, second)
        np.testing.assert_allclose(single_loss, batch_loss, rtol=1e-6)
        np.testing.assert_allclose(single_grad, batch_grad, rtol=1e-6, atol=1e-7)
