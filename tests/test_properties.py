"""Hypothesis property tests: closed forms agree with jax.grad and with float64 references.

Each property evaluates, in float32, the loss, ``jax.grad`` of it and the closed
form (`jaxce.derivatives`); both of the latter come from `jaxce._closed_form`, so
each is also compared, with the loss value, against ``jax.grad`` of the plain
formulation in `jaxce._references` evaluated in float64 on the same (float32)
inputs: an independent witness. Laws (non-negative losses, gradient rows summing
to 0) are checked beside those value checks, never instead of them.

Shapes come from a small fixed set and every function is jitted once per shape and
reduction (compilation, not arithmetic, is the cost), so a property runs hundreds of
examples in a few seconds. Values mix ordinary logits with the extremes ``+-1e4``,
``+-1e30``, ``-inf`` in classes excluded by ``where``, and probabilities at 0 and 1;
options are drawn with and without class weights and ``where`` (row- or class-shaped).

Profiles: ``ci`` (the default: derandomized, a few thousand examples in total) and
``thorough`` (``pytest --hypothesis-profile=thorough``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REDUCTIONS, assert_normwise_close, rounding_bound
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.extra import numpy as hnp

import jaxce
import jaxce.derivatives as derivatives
from jaxce import _references

_COMMON = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
try:  # tests/conftest.py may have registered them already (needed for --hypothesis-profile).
    settings.get_profile("ci")
except InvalidArgument:
    settings.register_profile("ci", max_examples=150, derandomize=True, **_COMMON)
    settings.register_profile("thorough", max_examples=5000, **_COMMON)
if settings.get_current_profile_name() == "default":
    settings.load_profile("ci")

SHAPES = [(1, 2), (3, 5), (2, 3, 4)]
EXTREMES = [1e4, -1e4, 1e30, -1e30, 0.0]
IGNORE = -100

logit_values = st.one_of(
    st.floats(-30, 30, width=32), st.sampled_from(EXTREMES), st.floats(-30, 30, width=32)
)
probability_values = st.one_of(st.floats(0, 1, width=32), st.sampled_from([0.0, 1.0]))
# Weights of 0 or normal floats: XLA:CPU flushes float32 subnormals to 0, the float64
# reference would not (a class weight of 1e-45 is 0 to the loss, not to the reference).
weight_values = st.one_of(st.just(0.0), st.floats(2.0**-20, 4, width=32))

# Tolerances against the float64 reference, norm-wise (`assert_normwise_close`), from
# the float32 unit roundoff u = 2^-24 and the operations on the way (gamma_n = n u):
# - A softmax-family loss of one row: C shifted logits x_c - m (one rounding each),
#   a sum of C exponentials (C - 1) and its log (1; the sum is >= 1, so the log's
#   absolute error is the sum's relative error), C weighted terms summed (2C), the
#   smoothing mix and z (log Z)^2 (4); then the reduction over at most N rows (N) and a
#   division (1). Every term is >= 0 for non-negative weights, so this bounds the error
#   relative to the loss itself: (4C + N + 8) u, with C = 5, N = 6: 34 u.
# - Its gradient: p_c = e^(x_c - m) / sum. The argument's error t u (t = m - x_c) moves
#   e^-t by t e^-t u <= u / e; with the sum and the division, p carries (C + 2) u
#   absolutely; times the weights, the smoothing mix and 2 z log Z p (each summed over
#   the C classes for the smoothing term) that is (2C + 8) u of the largest product
#   |a_c| scale, which the gradient's own scale bounds within a factor C. So
#   C (2C + 8) u = 90 u. The closed form and jax.grad are the same float32 arithmetic
#   in two orders: the same bound.
# - Elementwise (sigmoid) losses: softplus (exp, log1p, a max and an add: 4) per term,
#   two terms, weights, smoothing (4 more), reduction over at most N C = 24 elements:
#   (12 + 24) u = 36 u for the value; the gradient sigma(x) - y is 4 roundings, times
#   two weights: 8 u. The focal factor exp(gamma log(1 - p_t)) carries the argument's
#   absolute error gamma (C_log) u with gamma <= 3.5 and a log-sum-exp of 8 roundings:
#   about 32 u more, and its derivative as much again: 64 u.
# Each bound is rounded up to a power of two.
SOFTMAX_VALUE_TOL = rounding_bound(jnp.float32, 64)
SOFTMAX_GRAD_TOL = rounding_bound(jnp.float32, 128)
ELEMENTWISE_VALUE_TOL = rounding_bound(jnp.float32, 64)
ELEMENTWISE_GRAD_TOL = rounding_bound(jnp.float32, 16)
FOCAL_TOL = rounding_bound(jnp.float32, 128)


def _arrays(shape, elements):
    return hnp.arrays(np.float32, shape, elements=elements)


def _per_reduction(loss, closed=None):
    """Jitted: per reduction, ``(loss, jax.grad of its sum)``, and the closed form if given.

    One compiled program holds the three reductions: compiling, not running, is
    what these properties spend their time on.
    """

    def evaluate(first, rest, options):
        results = {}
        for reduction in REDUCTIONS:

            def total(a, reduction=reduction):
                return jnp.sum(loss(a, *rest, reduction=reduction, **options))

            values = (loss(first, *rest, reduction=reduction, **options), jax.grad(total)(first))
            if closed is not None:
                values += (closed(first, *rest, reduction=reduction, **options),)
            results[reduction] = values
        return results

    return jax.jit(evaluate)


def _grad_and_closed(name, **fixed):
    """``(loss, jax.grad, closed form)`` of the jaxce loss ``name`` per reduction (jitted).

    ``fixed``: options that must be Python values (``ignore_index``).
    """
    loss = functools.partial(getattr(jaxce, name), **fixed)
    return _per_reduction(loss, functools.partial(getattr(derivatives, name), **fixed))


def _reference(name, **fixed):
    """``(loss, jax.grad)`` of the plain ``_references.<name>`` per reduction (jitted)."""
    return _per_reduction(functools.partial(_references.REFERENCES[name], **fixed))


def _float64(tree):
    """Floating leaves as float64 NumPy arrays (integer and boolean ones unchanged)."""

    def widen(leaf):
        leaf = np.asarray(leaf)
        return leaf.astype(np.float64) if np.issubdtype(leaf.dtype, np.floating) else leaf

    return jax.tree.map(widen, tree)


def _in_float64(reference, first, rest, options):
    """Per reduction, the reference's value and gradient at the float32 inputs, in float64."""
    with jax.enable_x64(True):
        results = reference(*_float64((first, rest, options)))
    return jax.tree.map(np.asarray, results)


def _moderate(x):
    """Finite logits clipped to +-1e4 (-inf kept).

    The references compute log-softmax as written, ``x - logsumexp(x)``: at
    logits of 1e30 that cancels to 0 even in float64 (1e30 + log 2 == 1e30),
    where the shipped losses, in a shifted frame, keep log 2. At 1e4 float64
    keeps 1e4 * 2^-52 ~ 2e-12 of it: far below the float32 tolerances.
    """
    return np.where(np.isfinite(x), np.clip(x, -1e4, 1e4), x).astype(x.dtype)


def _check(results, references, value_tol, grad_tol, grad_where=None):
    """Per reduction: loss = reference value; closed form = jax.grad = reference gradient."""
    for reduction, (loss, autodiff, closed) in results.items():
        reference_value, reference_grad = references[reduction]
        assert_normwise_close(loss, reference_value, value_tol, f"{reduction}: loss vs reference")
        assert_normwise_close(closed, autodiff, grad_tol, f"{reduction}: closed form vs jax.grad")
        if grad_where is not None:
            closed, reference_grad = np.asarray(closed)[grad_where], reference_grad[grad_where]
        assert_normwise_close(closed, reference_grad, grad_tol, f"{reduction}: vs reference")


def _check_closed_form(results, grad_tol):
    """Per reduction: closed form = jax.grad, finite; the loss >= 0 (non-negative weights)."""
    for reduction, (loss, autodiff, closed) in results.items():
        assert_normwise_close(closed, autodiff, grad_tol, f"{reduction}: closed form vs jax.grad")
        assert np.all(np.asarray(loss) >= 0), reduction


INTEGER = _grad_and_closed("softmax_cross_entropy_with_integer_labels")
INTEGER_REFERENCE = _reference("softmax_cross_entropy_with_integer_labels")
INTEGER_IGNORE = _grad_and_closed("softmax_cross_entropy_with_integer_labels", ignore_index=IGNORE)
INTEGER_IGNORE_REFERENCE = _reference(
    "softmax_cross_entropy_with_integer_labels", ignore_index=IGNORE
)
SOFTMAX = _grad_and_closed("softmax_cross_entropy")
SOFTMAX_REFERENCE = _reference("softmax_cross_entropy")
SIGMOID = _grad_and_closed("sigmoid_binary_cross_entropy")
SIGMOID_REFERENCE = _reference("sigmoid_binary_cross_entropy")
FOCAL = _grad_and_closed("sigmoid_focal_loss")
FOCAL_REFERENCE = _reference("sigmoid_focal_loss")
BINARY_PROBS = _grad_and_closed("binary_cross_entropy")
BINARY_PROBS_REFERENCE = _reference("binary_cross_entropy")
CATEGORICAL = _grad_and_closed("categorical_cross_entropy")
CATEGORICAL_REFERENCE = _reference("categorical_cross_entropy")
SOFTMAX_FOCAL = _grad_and_closed("softmax_focal_loss")
SOFTMAX_FOCAL_REFERENCE = _reference("softmax_focal_loss")

# The option structures (class weights or None, where of no, the batch's or the full
# shape) change the compiled program; each shape takes two of the six combinations,
# so every combination is drawn and compiles stay few.
MULTICLASS_CONFIGS = [
    ((1, 2), False, "none"),
    ((1, 2), True, "classes"),
    ((3, 5), False, "rows"),
    ((3, 5), True, "none"),
    ((2, 3, 4), True, "rows"),
    ((2, 3, 4), False, "classes"),
]


def _multiclass_options(draw, shape, weighted, where_kind):
    """Class weights >= 0 (or None: smoothing without weights) and a mask (or None)."""
    weight = draw(_arrays(shape[-1:], weight_values)) if weighted else None
    where = None
    if where_kind != "none":
        where = draw(hnp.arrays(np.bool_, shape[:-1] if where_kind == "rows" else shape))
    return weight, where


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
    weight, _ = _multiclass_options(draw, shape, draw(st.booleans()), "none")
    smoothing = draw(st.sampled_from([0.0, 0.1, 0.5]))
    # z is traced, as in a training loop that schedules it: a traced 0 at logits of
    # 1e30 must give 0, not 0 * inf; z (log Z)^2 overflows float32 beyond
    # |log Z| ~ 1e19, so a positive z keeps to the +-1e4 extremes.
    z = draw(st.sampled_from([0.0, 1e-4]))
    if z:
        x = np.clip(x, -1e4, 1e4)
    options = {"weight": weight, "where": where,
               "label_smoothing": np.float32(smoothing), "z_loss": np.float32(z)}  # fmt: skip
    return x, labels, options


@given(integer_label_problems())
def test_integer_labels_closed_form_equals_autodiff_and_float64_reference(problem):
    x, labels, options = problem
    results = INTEGER_IGNORE(x, (labels,), options)
    counted = labels != IGNORE
    weight = options["weight"]
    label_weights = np.ones(x.shape[-1]) if weight is None else weight
    if counted.any() and label_weights[labels[counted]].sum() == 0:
        # PyTorch's weighted mean divides by the counted weights: 0 / 0 here, and
        # the gradients of the counted rows are not finite either way.
        loss, expected, closed = results.pop("mean")
        assert np.isnan(np.asarray(loss))
        rows = np.broadcast_to(counted[..., None], np.shape(closed)) & options["where"]
        assert not np.isfinite(np.asarray(closed)[rows]).any()
        assert not np.isfinite(np.asarray(expected)[rows]).any()
    # Cross-entropy, smoothed or not, and z-loss are non-negative for non-negative weights.
    _check_closed_form(results, SOFTMAX_GRAD_TOL)
    for _, _, closed in results.values():
        assert np.all(np.isfinite(np.asarray(closed))) and closed.dtype == jnp.float32
    moderate = _moderate(x)
    if not np.array_equal(moderate, x):
        x = moderate
        results = {r: v for r, v in INTEGER_IGNORE(x, (labels,), options).items() if r in results}
    references = _in_float64(INTEGER_IGNORE_REFERENCE, x, (labels,), options)
    _check(results, references, SOFTMAX_VALUE_TOL, SOFTMAX_GRAD_TOL)


@st.composite
def soft_label_problems(draw, extremes=True, options=True):
    shape, weighted, where_kind = draw(st.sampled_from(MULTICLASS_CONFIGS))
    x = draw(_arrays(shape, logit_values if extremes else st.floats(-30, 30, width=32)))
    raw = draw(_arrays(shape, st.floats(0, 1, width=32)))
    totals = raw.sum(-1, keepdims=True)
    labels = np.where(totals > 0, raw / np.where(totals > 0, totals, 1), 1 / shape[-1])
    if not options:
        return x, labels.astype(np.float32)
    weight, where = _multiclass_options(draw, shape, weighted, where_kind)
    return x, labels.astype(np.float32), weight, where


@given(soft_label_problems(), st.sampled_from([0.0, 0.2]))
def test_softmax_closed_form_equals_autodiff_and_float64_reference(problem, smoothing):
    x, labels, weight, where = problem
    options = {"label_smoothing": np.float32(smoothing), "weight": weight, "where": where}
    results = SOFTMAX(x, (labels,), options)
    _check_closed_form(results, SOFTMAX_GRAD_TOL)
    moderate = _moderate(x)
    if not np.array_equal(moderate, x):
        x, results = moderate, SOFTMAX(moderate, (labels,), options)
    _check(results, _in_float64(SOFTMAX_REFERENCE, x, (labels,), options),
           SOFTMAX_VALUE_TOL, SOFTMAX_GRAD_TOL)  # fmt: skip
    if weight is None and where is None:
        # Labels summing to 1 (smoothing keeps that), no weights, every class
        # taking part: each row sums to 0 (to the gradient tolerance).
        for _, _, closed in results.values():
            closed = np.asarray(closed, np.float64)
            row_scale = np.maximum(1.0, np.max(np.abs(closed), axis=-1))
            assert np.all(np.abs(closed.sum(-1)) <= SOFTMAX_GRAD_TOL * row_scale)


@given(integer_label_problems())
def test_integer_label_gradient_rows_sum_to_zero_and_equal_float64_reference(problem):
    x, labels, _ = problem
    x = _moderate(np.where(np.isfinite(x), x, 0).astype(np.float32))
    labels = np.where(labels == IGNORE, 0, labels)
    results = INTEGER(x, (labels,), {})
    _check(results, _in_float64(INTEGER_REFERENCE, x, (labels,), {}),
           SOFTMAX_VALUE_TOL, SOFTMAX_GRAD_TOL)  # fmt: skip
    for _, _, closed in results.values():
        closed = np.asarray(closed, np.float64)
        row_scale = np.maximum(1.0, np.abs(closed).max(-1))
        assert np.all(np.abs(closed.sum(-1)) <= SOFTMAX_GRAD_TOL * row_scale)


@given(
    soft_label_problems(extremes=False, options=False),
    st.floats(-100, 100),
    st.sampled_from([0.0, 0.3]),
)
def test_softmax_loss_invariant_to_adding_a_constant(problem, constant, smoothing):
    x, labels = problem
    with jax.enable_x64(True):
        x = x.astype(np.float64)
        options = {"label_smoothing": smoothing}
        base, gradient, _ = SOFTMAX(x, (labels.astype(np.float64),), options)["none"]
        moved, moved_gradient, _ = SOFTMAX(x + constant, (labels.astype(np.float64),), options)[
            "none"
        ]
    # x + c rounds each logit by u |x + c| (float64 u = 2^-53); the loss and its
    # gradient move by at most that per class, over C classes: C u (1 + |c| + max |x|),
    # here with a factor 2^13 of room (1e-12 ~ 9000 u).
    tolerance = 1e-12 * (1 + abs(constant) + np.abs(x).max()) * x.shape[-1]
    np.testing.assert_allclose(moved, base, rtol=0, atol=tolerance)
    np.testing.assert_allclose(moved_gradient, gradient, rtol=0, atol=tolerance)


@st.composite
def binary_problems(draw):
    shape = draw(st.sampled_from(SHAPES))
    x = draw(_arrays(shape, logit_values))
    labels = draw(_arrays(shape, probability_values))
    where = draw(hnp.arrays(np.bool_, shape))
    weight = draw(_arrays(shape[-1:], weight_values))
    pos_weight = draw(_arrays(shape[-1:], weight_values))
    return x, labels, where, weight, pos_weight


@given(binary_problems(), st.sampled_from([0.0, 0.1]))
def test_sigmoid_closed_form_equals_autodiff_and_float64_reference(problem, smoothing):
    x, labels, where, weight, pos_weight = problem
    options = {
        "weight": weight,
        "pos_weight": pos_weight,
        "label_smoothing": np.float32(smoothing),
        "where": where,
    }
    results = SIGMOID(x, (labels,), options)
    _check_closed_form(results, ELEMENTWISE_GRAD_TOL)
    # log_sigmoid is stable: the reference holds at the extremes too.
    _check(results, _in_float64(SIGMOID_REFERENCE, x, (labels,), options),
           ELEMENTWISE_VALUE_TOL, ELEMENTWISE_GRAD_TOL)  # fmt: skip


@given(binary_problems(), st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.5]), st.floats(0, 1))
def test_focal_closed_form_equals_autodiff_and_float64_reference(problem, gamma, alpha):
    x, labels, where, _, _ = problem
    options = {"gamma": np.float32(gamma), "alpha": np.float32(alpha), "where": where}
    _check_closed_form(FOCAL(x, (labels,), options), FOCAL_TOL)
    # The reference takes log(1 - sigmoid(x)) as written: float64's rounding of
    # sigmoid(x) near 1 costs 2^-53 e^|x| of the log, below float32's 2^-24 for
    # |x| <= 16 (e^16 ~ 2^23).
    moderate = np.clip(x, -16, 16)
    _check(FOCAL(moderate, (labels,), options),
           _in_float64(FOCAL_REFERENCE, moderate, (labels,), options), FOCAL_TOL, FOCAL_TOL)  # fmt: skip


@pytest.mark.slow  # about 7 s; tests/test_polynomial.py checks the extremes in the default run
@given(soft_label_problems(), st.sampled_from([0.0, 0.5, 2.0]))
def test_softmax_focal_closed_form_equals_autodiff_and_float64_reference(problem, gamma):
    """Class weights drawn for the softmax losses serve as the per-class ``alpha`` (a scalar
    0.25 without them). The closed form is the loss's derivative rule: checked at the
    extremes (1e30, p = 1 with gamma = 0.5) against jax.grad, finite; against the reference
    where the reference's ``(1 - p)^gamma`` keeps ``1 - p``: logits within +-16, where
    float64 rounds 1 - p >= e^-32 by at most 2^-53 e^32 ~ 1% of itself, a change below
    float32's rounding of the gradient's scale. A row with one included class has p = 1,
    where the reference's derivative of ``(1 - p)^gamma`` is NaN: its gradient (0) is
    compared with jax.grad only."""
    x, labels, weight, where = problem
    alpha = np.float32(0.25) if weight is None else weight
    options = {"gamma": np.float32(gamma), "alpha": alpha, "where": where}
    results = SOFTMAX_FOCAL(x, (labels,), options)
    _check_closed_form(results, FOCAL_TOL)
    for _, autodiff, closed in results.values():
        assert np.all(np.isfinite(np.asarray(closed))) and np.all(np.isfinite(np.asarray(autodiff)))
    moderate = np.clip(x, -16, 16)
    included = (
        np.ones(x.shape, bool)
        if where is None
        else np.broadcast_to(where if where.ndim == x.ndim else where[..., None], x.shape)
    )
    one_class = np.broadcast_to(included.sum(-1, keepdims=True) == 1, x.shape)
    _check(SOFTMAX_FOCAL(moderate, (labels,), options),
           _in_float64(SOFTMAX_FOCAL_REFERENCE, moderate, (labels,), options),
           FOCAL_TOL, FOCAL_TOL, grad_where=~one_class)  # fmt: skip


def _interior(probs):
    """Where the plain clamped log has a finite gradient (0 < p < 1)."""
    return (probs > 0) & (probs < 1)


@given(binary_problems())
def test_binary_probability_closed_form_equals_autodiff_and_float64_reference(problem):
    x, labels, where, weight, _ = problem
    probs = jax.nn.sigmoid(np.clip(x, -20, 20))
    # Exactly 0 and 1 where the logits were extreme: the clamp's flat region.
    probs = np.where(np.abs(x) >= 1e4, (x > 0) * 1.0, probs).astype(np.float32)
    options = {"weight": weight, "where": where}
    results = BINARY_PROBS(probs, (labels,), options)
    _check_closed_form(results, ELEMENTWISE_GRAD_TOL)
    # Gradients compared where the reference's max(log p, -100) has one (0 < p < 1).
    _check(results, _in_float64(BINARY_PROBS_REFERENCE, probs, (labels,), options),
           ELEMENTWISE_VALUE_TOL, ELEMENTWISE_GRAD_TOL, grad_where=_interior(probs))  # fmt: skip


@given(soft_label_problems())
def test_categorical_closed_form_equals_autodiff_and_float64_reference(problem):
    x, labels, weight, where = problem
    probs = np.asarray(jax.nn.softmax(np.clip(x, -20, 20), axis=-1))
    probs = np.where(np.abs(x) >= 1e4, (x > 0) * 1.0, probs).astype(np.float32)
    options = {"weight": weight, "where": where}
    results = CATEGORICAL(probs, (labels,), options)
    _check_closed_form(results, SOFTMAX_GRAD_TOL)
    _check(results, _in_float64(CATEGORICAL_REFERENCE, probs, (labels,), options),
           SOFTMAX_VALUE_TOL, SOFTMAX_GRAD_TOL, grad_where=_interior(probs))  # fmt: skip


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


@given(soft_label_problems(options=False))
def test_vmap_of_single_examples_equals_the_batch(problem):
    x, labels = problem
    x, labels = x.reshape(-1, x.shape[-1]), labels.reshape(-1, x.shape[-1])
    integer_labels = labels.argmax(-1).astype(np.int32)
    for name, second in [
        ("softmax_cross_entropy", labels),
        ("softmax_cross_entropy_with_integer_labels", integer_labels),
    ]:
        batch_loss, single_loss, batch_grad, single_grad = VMAPPED[name](x, second)
        # The same float32 arithmetic on the same rows: equal up to the order XLA
        # picks for a row's sum (C - 1 roundings).
        assert_normwise_close(single_loss, batch_loss, SOFTMAX_VALUE_TOL, name)
        assert_normwise_close(single_grad, batch_grad, SOFTMAX_GRAD_TOL, name)
