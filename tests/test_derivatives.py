"""Closed-form gradients (`jaxce.derivatives`) against jax.grad, references and the documents."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REDUCTIONS, assert_normwise_close, half_precision_output_bound, rounding_bound

import jaxce
import jaxce.derivatives as derivatives
from jaxce import _references

BATCH, CLASSES = (3, 4), 5
SHAPE = (*BATCH, CLASSES)


# One compile per case is the cost of these tests; XLA's expensive passes do not pay off.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _autodiff(loss, argnums, *args, **kwargs):
    def scalar(*a):
        return jnp.sum(loss(*a, **kwargs))

    return jax.jit(jax.grad(scalar, argnums=argnums), compiler_options=FAST_COMPILE)(*args)


def _three_ways(name, first, *rest, **kwargs):
    """(closed form, jax.grad of the loss, jax.grad of the reference), in one compile."""

    def all_three(first):
        def scalar(module):
            return lambda a: jnp.sum(getattr(module, name)(a, *rest, **kwargs))

        closed = getattr(derivatives, name)(first, *rest, **kwargs)
        return closed, jax.grad(scalar(jaxce))(first), jax.grad(scalar(_references))(first)

    return jax.jit(all_three, compiler_options=FAST_COMPILE)(first)


def _with_reductions(options, full=("defaults", "all", "everything")):
    """Each option set with one reduction (cycling), the combined ones with all three."""
    cases = []
    for index, option in enumerate(options):
        reductions = REDUCTIONS if option in full else [REDUCTIONS[index % len(REDUCTIONS)]]
        cases += [pytest.param(option, r, id=f"{option}-{r}") for r in reductions]
    return cases


# float64 against float64, norm-wise: a gradient entry is a softmax or sigmoid (an
# exponential, a sum of at most 60 classes with tuple axes, a division), mixed with
# weights, smoothing and z-loss terms summed over the classes, and a mean's division:
# fewer than 4 C + 16 roundings on each side, C <= 60. 2 (4 * 60 + 16) u = 512 u ~ 6e-14.
# (A wrong formula, a missing 1/n or a flipped sign, is off by O(1).)
FLOAT64_TOLERANCE = rounding_bound(jnp.float64, 512)


def _assert_grads_close(actual, expected, tolerance=FLOAT64_TOLERANCE):
    assert_normwise_close(actual, expected, tolerance)


def _soft(rng, shape):
    raw = rng.uniform(0.05, 1.0, shape)
    return raw / raw.sum(axis=-1, keepdims=True)


def _signed(rng, low, high, shape):
    """Weights of both signs (PyTorch computes negative ones; so does jaxce)."""
    signs = np.where(np.arange(np.prod(shape)) % 3 == 1, -1, 1).reshape(shape)
    return rng.uniform(low, high, shape) * signs


def _binary_options(rng):
    return {
        "defaults": {},
        "weight": {"weight": rng.uniform(0.5, 2, CLASSES)},
        "pos_weight": {"pos_weight": rng.uniform(0.5, 3, CLASSES)},
        "signed_weights": {
            "weight": _signed(rng, 0.5, 2, SHAPE),
            "pos_weight": _signed(rng, 0.5, 3, (CLASSES,)),
        },
        "label_smoothing": {"label_smoothing": 0.2},
        "where": {"where": rng.uniform(size=SHAPE) > 0.4},
        "where_none_included": {"where": np.zeros(SHAPE, bool)},
        "all": {
            "weight": rng.uniform(0.5, 2, SHAPE),
            "pos_weight": rng.uniform(0.5, 3, CLASSES),
            "label_smoothing": 0.1,
            "where": rng.uniform(size=SHAPE) > 0.4,
        },
    }


@pytest.mark.parametrize(
    "option, reduction", _with_reductions(_binary_options(np.random.default_rng(0)))
)
def test_sigmoid_binary_cross_entropy_matches_autodiff(option, reduction):
    rng = np.random.default_rng(1)
    kwargs = _binary_options(rng)[option]
    with jax.enable_x64(True):
        x = jnp.asarray(3 * rng.standard_normal(SHAPE))
        y = jnp.asarray(rng.uniform(size=SHAPE))
        closed, expected, reference = _three_ways(
            "sigmoid_binary_cross_entropy", x, y, reduction=reduction, **kwargs
        )
    _assert_grads_close(closed, expected)
    _assert_grads_close(closed, reference)


@pytest.mark.parametrize(
    "kwargs, reduction",
    [
        pytest.param({}, "none", id="defaults-none"),
        pytest.param({"alpha": 0.25}, "mean", id="alpha-mean"),
        pytest.param({"gamma": 0.0}, "sum", id="gamma=0-sum"),
        pytest.param({"gamma": 0.5, "alpha": 0.7}, "none", id="gamma=0.5_alpha-none"),
        pytest.param(
            {"gamma": 3.0, "where": np.arange(60).reshape(SHAPE) % 3 > 0},
            "mean",
            id="gamma=3_where-mean",
        ),
    ],
)
@pytest.mark.parametrize("labels", ["hard", "soft"])
def test_sigmoid_focal_loss_matches_autodiff(kwargs, reduction, labels):
    rng = np.random.default_rng(2)
    with jax.enable_x64(True):
        x = jnp.asarray(3 * rng.standard_normal(SHAPE))
        y = rng.uniform(size=SHAPE)
        y = jnp.asarray((y > 0.5) * 1.0 if labels == "hard" else y)
        closed, expected, reference = _three_ways(
            "sigmoid_focal_loss", x, y, reduction=reduction, **kwargs
        )
    _assert_grads_close(closed, expected)
    _assert_grads_close(closed, reference)


@pytest.mark.parametrize(
    "option, reduction",
    _with_reductions(
        ["defaults", "weight", "where", "where_none_included", "signed_weights"], full=()
    ),
)
def test_binary_cross_entropy_matches_autodiff(option, reduction):
    rng = np.random.default_rng(3)
    kwargs = dict(_binary_options(rng)[option])
    kwargs.pop("pos_weight", None)  # PyTorch's BCELoss has none
    with jax.enable_x64(True):
        p = jnp.asarray(rng.uniform(0.02, 0.98, SHAPE))
        y = jnp.asarray(rng.uniform(size=SHAPE))
        closed, expected, reference = _three_ways(
            "binary_cross_entropy", p, y, reduction=reduction, **kwargs
        )
    _assert_grads_close(closed, expected)
    _assert_grads_close(closed, reference)


def _multiclass_options(rng):
    return {
        "defaults": {},
        "weight": {"weight": rng.uniform(0.5, 2, CLASSES)},
        "where_classes": {"where": rng.uniform(size=SHAPE) > 0.3},
        "where_examples": {"where": rng.uniform(size=BATCH) > 0.3},
        "where_none_included": {"where": np.zeros(BATCH, bool)},
        "axis=0": {"axis": 0},
        "axis=(0,2)": {"axis": (0, 2)},
        "signed_weight": {"weight": _signed(rng, 0.5, 2, (CLASSES,))},
        # Weights and a class-shaped mask together (a row-shaped mask would leave
        # every class of a counted row in).
        "weight_where_classes": {
            "weight": rng.uniform(0.5, 2, CLASSES),
            "where": rng.uniform(size=SHAPE) > 0.3,
        },
    }


@pytest.mark.parametrize(
    "option, reduction", _with_reductions(_multiclass_options(np.random.default_rng(0)))
)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15], ids=["eps=0", "eps=0.15"])
def test_softmax_cross_entropy_matches_autodiff(option, reduction, label_smoothing):
    rng = np.random.default_rng(4)
    kwargs = dict(_multiclass_options(rng)[option])
    axis = kwargs.get("axis", -1)
    if "weight" in kwargs and axis != -1:
        del kwargs["weight"]
    with jax.enable_x64(True):
        x = jnp.asarray(3 * rng.standard_normal(SHAPE))
        y = jnp.asarray(_soft(rng, SHAPE) if axis == -1 else rng.uniform(size=SHAPE))
        args = (x, y)
        kwargs.update(reduction=reduction, label_smoothing=label_smoothing)
        closed, expected, reference = _three_ways("softmax_cross_entropy", *args, **kwargs)
    _assert_grads_close(closed, expected)
    _assert_grads_close(closed, reference)


@pytest.mark.parametrize(
    "option, reduction",
    _with_reductions(
        [
            "defaults",
            "weight",
            "where_classes",
            "where_examples",
            "where_none_included",
            "axis=(0,2)",
            "signed_weight",
            "weight_where_classes",
        ],
        full=("defaults", "weight_where_classes"),
    ),
)
def test_categorical_cross_entropy_matches_autodiff(option, reduction):
    rng = np.random.default_rng(5)
    kwargs = dict(_multiclass_options(rng)[option], reduction=reduction)
    with jax.enable_x64(True):
        p = jnp.asarray(rng.uniform(0.02, 1.0, SHAPE))
        y = jnp.asarray(_soft(rng, SHAPE))
        closed, expected, reference = _three_ways("categorical_cross_entropy", p, y, **kwargs)
    _assert_grads_close(closed, expected)
    _assert_grads_close(closed, reference)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_categorical_label_smoothing_matches_autodiff(reduction):
    rng = np.random.default_rng(13)
    kwargs = dict(_multiclass_options(rng)["weight_where_classes"], reduction=reduction)
    with jax.enable_x64(True):
        p = jnp.asarray(rng.uniform(0.02, 1.0, SHAPE))
        y = jnp.asarray(_soft(rng, SHAPE))
        closed, expected, reference = _three_ways(
            "categorical_cross_entropy", p, y, label_smoothing=0.2, **kwargs
        )
    _assert_grads_close(closed, expected)
    _assert_grads_close(closed, reference)


FOCAL_OPTIONS = {
    "defaults": {},
    "gamma=0_alpha=1": {"gamma": 0.0, "alpha": 1.0},
    "gamma=0.5_alpha[C]": {"gamma": 0.5, "alpha": np.linspace(0.5, 2.0, CLASSES)},
    "gamma=3_smoothing": {"gamma": 3.0, "label_smoothing": 0.15},
    "where_classes": {"where": np.arange(60).reshape(SHAPE) % 4 > 0},
    "where_examples": {"where": np.arange(12).reshape(BATCH) % 3 > 0},
    "axis=(0,2)": {"axis": (0, 2)},
    "everything": {
        "gamma": 1.5,
        "alpha": np.linspace(0.5, 2.0, CLASSES),
        "label_smoothing": 0.1,
        "where": np.arange(60).reshape(SHAPE) % 4 > 0,
    },
}


@pytest.mark.parametrize("option, reduction", _with_reductions(FOCAL_OPTIONS))
def test_softmax_focal_loss_matches_autodiff(option, reduction):
    rng = np.random.default_rng(14)
    kwargs = dict(FOCAL_OPTIONS[option], reduction=reduction)
    with jax.enable_x64(True):
        x = jnp.asarray(2 * rng.standard_normal(SHAPE))
        y = jnp.asarray(_soft(rng, SHAPE) if "axis" not in kwargs else rng.uniform(size=SHAPE))
        closed, expected, reference = _three_ways("softmax_focal_loss", x, y, **kwargs)
    _assert_grads_close(closed, expected)
    _assert_grads_close(closed, reference)


POLY_OPTIONS = {
    "defaults": {},
    "epsilon=-1": {"epsilon": -1.0},
    "where_classes": {"epsilon": 5.45, "where": np.arange(60).reshape(SHAPE) % 4 > 0},
    "where_examples": {"where": np.arange(12).reshape(BATCH) % 3 > 0},
    "axis=(0,2)": {"axis": (0, 2)},
}


@pytest.mark.parametrize("option, reduction", _with_reductions(POLY_OPTIONS))
def test_poly_loss_cross_entropy_matches_autodiff(option, reduction):
    rng = np.random.default_rng(15)
    kwargs = dict(POLY_OPTIONS[option], reduction=reduction)
    with jax.enable_x64(True):
        x = jnp.asarray(3 * rng.standard_normal(SHAPE))
        y = jnp.asarray(_soft(rng, SHAPE))
        closed, expected, reference = _three_ways("poly_loss_cross_entropy", x, y, **kwargs)
    _assert_grads_close(closed, expected)
    _assert_grads_close(closed, reference)


DIVERGENCE_OPTIONS = {
    "defaults": {},
    "where_entries": {"where": np.arange(60).reshape(SHAPE) % 4 > 0},
    "where_examples": {"where": np.arange(12).reshape(BATCH) % 3 > 0},
    "axis=(0,2)": {"axis": (0, 2)},
}


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
@pytest.mark.parametrize("option", DIVERGENCE_OPTIONS)
@pytest.mark.parametrize("name", ["kl_divergence", "kl_divergence_with_log_targets"])
def test_divergences_match_autodiff(name, option, reduction):
    rng = np.random.default_rng(16)
    kwargs = dict(DIVERGENCE_OPTIONS[option], reduction=reduction)
    targets = _soft(rng, SHAPE)
    targets[0, 0, 1] = 0.0  # 0 log 0
    with jax.enable_x64(True):
        log_q = jnp.asarray(rng.standard_normal(SHAPE) - 2)
        second = jnp.asarray(targets if name == "kl_divergence" else np.log(_soft(rng, SHAPE)))
        closed, expected, reference = _three_ways(name, log_q, second, **kwargs)
    _assert_grads_close(closed, expected)
    _assert_grads_close(closed, reference)


INTEGER_OPTIONS = {
    "defaults": {},
    "weight": {"weight": np.linspace(0.5, 2.0, CLASSES)},
    "ignore_index": {"ignore_index": -100},
    "weight_ignore_index": {"weight": np.linspace(0.5, 2.0, CLASSES), "ignore_index": -100},
    "label_smoothing": {"label_smoothing": 0.1},
    "weight_smoothing": {"weight": np.linspace(0.5, 2.0, CLASSES), "label_smoothing": 0.2},
    "signed_weight_smoothing": {
        "weight": np.linspace(0.5, 2.0, CLASSES) * np.array([1, -1, 1, 1, -1]),
        "label_smoothing": 0.2,
    },
    "z_loss": {"z_loss": 1e-2},
    "where_examples": {"where": np.array([[True, False, True, True]] * 3)},
    "everything": {
        "weight": np.linspace(0.5, 2.0, CLASSES),
        "ignore_index": -100,
        "label_smoothing": 0.1,
        "z_loss": 1e-3,
        "where": np.array([[True, True, False, True]] * 3),
    },
}


@pytest.mark.parametrize("option, reduction", _with_reductions(INTEGER_OPTIONS))
def test_integer_labels_match_autodiff(option, reduction):
    rng = np.random.default_rng(6)
    kwargs = dict(INTEGER_OPTIONS[option], reduction=reduction)
    labels = rng.integers(0, CLASSES, BATCH)
    if "ignore_index" in kwargs:
        labels[0, 1] = labels[2, 3] = -100
    with jax.enable_x64(True):
        x = jnp.asarray(3 * rng.standard_normal(SHAPE))
        closed, expected, reference = _three_ways(
            "softmax_cross_entropy_with_integer_labels", x, labels, **kwargs
        )
    _assert_grads_close(closed, expected)
    _assert_grads_close(closed, reference)


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize(
    "axis, where_shape",
    [(0, None), ((0, 2), None), (1, (3, 4, 5)), ((1, 2), (3,))],
    ids=["axis=0", "axis=(0,2)", "axis=1_where_full", "axis=(1,2)_where_batch"],
)
def test_integer_labels_axes_and_where(axis, where_shape, reduction):
    rng = np.random.default_rng(7)
    layout_axes = (axis,) if isinstance(axis, int) else axis
    num_classes = int(np.prod([SHAPE[a] for a in layout_axes]))
    batch = tuple(d for i, d in enumerate(SHAPE) if i not in layout_axes)
    labels = rng.integers(0, num_classes, batch)
    kwargs = {"axis": axis, "reduction": reduction, "label_smoothing": 0.1, "z_loss": 1e-2}
    if where_shape is not None:
        where = rng.uniform(size=where_shape) > 0.3
        if where.shape == SHAPE:
            # Keep every label's class included (an excluded label has an infinite loss).
            where = np.moveaxis(where, axis, -1)
            np.put_along_axis(where, labels[..., None], True, axis=-1)
            where = np.moveaxis(where, -1, axis)
        kwargs["where"] = where
    with jax.enable_x64(True):
        x = jnp.asarray(2 * rng.standard_normal(SHAPE))
        closed, expected, reference = _three_ways(
            "softmax_cross_entropy_with_integer_labels", x, labels, **kwargs
        )
    _assert_grads_close(closed, expected)
    _assert_grads_close(closed, reference)


@pytest.mark.parametrize(
    ("scale", "z"),
    [(1e4, 1e-4), (1e30, 0.0)],
    ids=["1e4-z=1e-4", "1e30-traced_z=0"],
)
def test_traced_z_loss_at_large_logits_matches_float64_reference(scale, z):
    """A traced z-loss (as a schedule passes it) at large float32 logits.

    z (log Z)^2 is 1e4 at logits of 1e4; at 1e30 it would overflow float32, and a
    traced z = 0 must give exactly 0 there, not 0 * inf.
    """
    rng = np.random.default_rng(12)
    x = (rng.choice([-1.0, 0.5, 1.0], SHAPE) * scale + rng.standard_normal(SHAPE)).astype(
        np.float32
    )
    labels = rng.integers(0, CLASSES, BATCH)
    options = {"weight": np.linspace(0.5, 2.0, CLASSES), "label_smoothing": 0.1}

    def closed_and_grad(x, z):
        kwargs = {**options, "z_loss": z, "reduction": "mean"}
        loss = jaxce.softmax_cross_entropy_with_integer_labels
        closed = derivatives.softmax_cross_entropy_with_integer_labels(x, labels, **kwargs)
        return closed, jax.grad(lambda a: loss(a, labels, **kwargs))(x)

    closed, autodiff = jax.jit(closed_and_grad)(x, np.float32(z))
    with jax.enable_x64(True):
        # The reference's x - logsumexp(x) cancels at 1e30 even in float64, but its
        # gradient, softmax - onehot, does not.
        reference = jax.grad(
            lambda a: _references.softmax_cross_entropy_with_integer_labels(
                a, labels, **options, z_loss=z, reduction="mean"
            )
        )(np.float64(x))
    assert np.all(np.isfinite(closed)) and np.all(np.isfinite(autodiff))
    # float32: the softmax of 5 classes, weights and smoothing summed over them, and
    # 2 z log Z p (log Z to u |log Z|): 4 C + 16 = 36 roundings, rounded up to 64.
    tolerance = rounding_bound(jnp.float32, 64)
    assert_normwise_close(closed, autodiff, tolerance)
    assert_normwise_close(closed, reference, tolerance)


LINEAR_OPTIONS = {
    "defaults": {},
    "bias": {"bias": True},
    "softcap": {"softcap": 2.0},
    "shift": {"shift": 1},
    "everything": {
        "bias": True,
        "softcap": 3.0,
        "shift": 1,
        "ignore_index": -100,
        "label_smoothing": 0.1,
        "z_loss": 1e-3,
    },
}


@pytest.mark.parametrize("option, reduction", _with_reductions(LINEAR_OPTIONS))
def test_linear_cross_entropy_matches_autodiff(option, reduction):
    rng = np.random.default_rng(8)
    kwargs = dict(LINEAR_OPTIONS[option], reduction=reduction)
    labels = rng.integers(0, 7, (2, 5))
    labels[0, 2] = -100 if "ignore_index" in kwargs else labels[0, 2]
    with jax.enable_x64(True):
        hidden = jnp.asarray(rng.standard_normal((2, 5, 4)))
        weight = jnp.asarray(rng.standard_normal((7, 4)))
        bias = jnp.asarray(rng.standard_normal(7))
        kwargs["bias"] = bias if kwargs.get("bias") else None
        closed = derivatives.linear_cross_entropy(hidden, weight, labels, **kwargs)

        def scalar(module, h, w, b):
            return jnp.sum(module.linear_cross_entropy(h, w, labels, **{**kwargs, "bias": b}))

        argnums = (0, 1, 2) if kwargs["bias"] is not None else (0, 1)
        b = kwargs["bias"]
        expected, reference = jax.jit(
            lambda *a: (
                jax.grad(lambda *a: scalar(jaxce, *a), argnums)(*a),
                jax.grad(lambda *a: scalar(_references, *a), argnums)(*a),
            ),
            compiler_options=FAST_COMPILE,
        )(hidden, weight, b)
    if kwargs["bias"] is None:
        assert closed[2] is None
    for got, want, ref in zip(closed, expected, reference, strict=False):
        _assert_grads_close(got, want)
        _assert_grads_close(got, ref)


@pytest.mark.parametrize(
    "name, x",
    [
        ("log_sigmoid", np.array([-1e30, -30.0, -1.0, 0.0, 2.0, 1e30])),
        ("log1m_sigmoid", np.array([-1e30, -30.0, -1.0, 0.0, 2.0, 1e30])),
        ("logsumexp", np.array([[1.0, -2.0, 0.5], [1e30, 1e30, -1e30]])),
        ("log_softmax", np.array([[1.0, -2.0, 0.5], [3.0, -np.inf, 0.0]])),
    ],
)
def test_primitives_match_autodiff(name, x):
    with jax.enable_x64(True):
        x = jnp.asarray(x)
        closed = getattr(derivatives, name)(x)
        expected = _autodiff(getattr(jaxce, name), 0, x)
    _assert_grads_close(closed, expected)


@pytest.mark.parametrize("name", ["logsumexp", "log_softmax"])
def test_primitives_with_where_and_axis(name):
    rng = np.random.default_rng(9)
    where = rng.uniform(size=SHAPE) > 0.3
    where[0, 0] = False
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal(SHAPE))
        for axis in (-1, (0, 2)):
            closed = getattr(derivatives, name)(x, axis=axis, where=where)
            expected = _autodiff(getattr(jaxce, name), 0, x, axis=axis, where=where)
            _assert_grads_close(closed, expected)


# The reference documents' per-sample formulas, and the 1/n of the mean.


def test_documents_sigmoid_minus_label_and_one_over_n():
    x, y = np.array([-1.5, 0.0, 2.0, 0.3]), np.array([0.0, 1.0, 1.0, 0.0])
    with jax.enable_x64(True):
        per_sample = derivatives.sigmoid_binary_cross_entropy(x, y)
        mean = derivatives.sigmoid_binary_cross_entropy(x, y, reduction="mean")
    np.testing.assert_allclose(per_sample, 1 / (1 + np.exp(-x)) - y, rtol=1e-15)
    np.testing.assert_allclose(mean, (1 / (1 + np.exp(-x)) - y) / x.size, rtol=1e-15)


def test_documents_softmax_minus_onehot_and_one_over_n():
    x = np.array([[2.0, 1.0, 0.1], [0.5, 0.5, -1.0]])
    labels = np.array([0, 2])
    softmax = np.exp(x) / np.exp(x).sum(-1, keepdims=True)
    onehot = np.eye(3)[labels]
    with jax.enable_x64(True):
        per_sample = derivatives.softmax_cross_entropy_with_integer_labels(x, labels)
        mean = derivatives.softmax_cross_entropy_with_integer_labels(x, labels, reduction="mean")
        dense = derivatives.softmax_cross_entropy(x, onehot, reduction="mean")
    np.testing.assert_allclose(per_sample, softmax - onehot, rtol=1e-14)
    np.testing.assert_allclose(mean, (softmax - onehot) / 2, rtol=1e-14)
    np.testing.assert_allclose(dense, (softmax - onehot) / 2, rtol=1e-14)


def test_documents_probability_forms():
    p, y = np.array([0.9, 0.2, 0.6]), np.array([1.0, 0.0, 1.0])
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    onehot = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    with jax.enable_x64(True):
        binary = derivatives.binary_cross_entropy(p, y, reduction="mean")
        categorical = derivatives.categorical_cross_entropy(probs, onehot)
    np.testing.assert_allclose(binary, (-y / p + (1 - y) / (1 - p)) / 3, rtol=1e-14)
    np.testing.assert_allclose(categorical, -onehot / probs, rtol=1e-14)


def test_weighted_mean_denominator_is_the_sum_of_label_weights():
    x = np.zeros((2, 3))
    labels = np.array([0, 2])
    weight = np.array([1.0, 5.0, 3.0])
    with jax.enable_x64(True):
        mean = derivatives.softmax_cross_entropy_with_integer_labels(
            x, labels, weight=weight, reduction="mean"
        )
        total = derivatives.softmax_cross_entropy_with_integer_labels(
            x, labels, weight=weight, reduction="sum"
        )
    np.testing.assert_allclose(mean, np.asarray(total) / (1.0 + 3.0), rtol=1e-15)


# Edge values: the closed form agrees with jax.grad of the shipped loss, and says so.


def test_mean_over_nothing_has_zero_gradient():
    x = jnp.ones((2, 3))
    labels = jnp.array([-100, -100])
    gradient = derivatives.softmax_cross_entropy_with_integer_labels(
        x, labels, ignore_index=-100, z_loss=0.1, reduction="mean"
    )
    assert np.all(np.asarray(gradient) == 0)
    gradient = derivatives.sigmoid_binary_cross_entropy(
        x, jnp.ones((2, 3)), where=jnp.zeros((2, 3), bool), reduction="mean"
    )
    assert np.all(np.asarray(gradient) == 0)


def test_out_of_range_labels_give_zero_gradient_like_autodiff():
    x = jnp.asarray(np.random.default_rng(10).standard_normal((4, 3)))
    labels = jnp.array([0, 3, -1, 2])
    loss = jaxce.softmax_cross_entropy_with_integer_labels
    assert np.isnan(np.asarray(loss(x, labels)))[[1, 2]].all()
    for reduction in REDUCTIONS:
        closed = derivatives.softmax_cross_entropy_with_integer_labels(
            x, labels, reduction=reduction, label_smoothing=0.1
        )
        expected = _autodiff(loss, 0, x, labels, reduction=reduction, label_smoothing=0.1)
        np.testing.assert_allclose(closed, expected, rtol=1e-6, atol=1e-7)
        assert np.all(np.asarray(closed)[[1, 2]] == 0)
        assert np.all(np.isfinite(np.asarray(closed)))


def test_probabilities_outside_unit_interval_give_zero_gradient_like_autodiff():
    p = jnp.array([0.5, 1.5, -0.2, 0.3])
    y = jnp.array([1.0, 1.0, 0.0, 0.0])
    closed = derivatives.binary_cross_entropy(p, y)
    expected = _autodiff(jaxce.binary_cross_entropy, 0, p, y)
    np.testing.assert_allclose(closed, expected, rtol=1e-6)
    assert np.all(np.asarray(closed)[1:3] == 0)


def test_clamped_log_has_zero_gradient_at_zero_and_one():
    p = jnp.array([0.0, 1.0, 0.0, 1.0])
    y = jnp.array([1.0, 0.0, 0.0, 1.0])
    closed = derivatives.binary_cross_entropy(p, y)
    expected = _autodiff(jaxce.binary_cross_entropy, 0, p, y)
    np.testing.assert_array_equal(closed, expected)
    # p = 0 with y = 1: the log is clamped, so the loss is flat (100) and the
    # gradient 0; p = 0 with y = 0: d/dp -log(1 - p) = 1.
    np.testing.assert_array_equal(closed, [0.0, 0.0, 1.0, -1.0])


@pytest.mark.parametrize("value", [1e4, 1e30], ids=["1e4", "1e30"])
def test_extreme_logits_give_finite_gradients(value):
    x = jnp.array([[value, -value, 0.0], [-value, -jnp.inf, value]])
    labels = jnp.array([1, 0])
    closed = derivatives.softmax_cross_entropy_with_integer_labels(x, labels, z_loss=1e-4)
    expected = _autodiff(jaxce.softmax_cross_entropy_with_integer_labels, 0, x, labels, z_loss=1e-4)
    assert np.all(np.isfinite(np.asarray(closed)))
    np.testing.assert_allclose(closed, expected, rtol=1e-6)
    flat = jnp.array([value, -value, 0.0])
    y = jnp.array([1.0, 1.0, 0.0])
    for name in ("sigmoid_binary_cross_entropy", "sigmoid_focal_loss"):
        closed = getattr(derivatives, name)(flat, y)
        assert np.all(np.isfinite(np.asarray(closed))), name
        np.testing.assert_allclose(closed, _autodiff(getattr(jaxce, name), 0, flat, y), atol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize(
    "name",
    [
        "sigmoid_binary_cross_entropy",
        "sigmoid_focal_loss",
        "binary_cross_entropy",
        "softmax_cross_entropy",
        "categorical_cross_entropy",
        "softmax_cross_entropy_with_integer_labels",
        "softmax_focal_loss",
        "poly_loss_cross_entropy",
        "kl_divergence",
        "kl_divergence_with_log_targets",
    ],
)
def test_gradient_dtype_is_the_input_dtype(name, dtype):
    rng = np.random.default_rng(11)
    first = jnp.asarray(rng.uniform(0.1, 0.9, SHAPE), dtype)
    if name == "softmax_cross_entropy_with_integer_labels":
        labels = jnp.asarray(rng.integers(0, CLASSES, BATCH))
    elif name == "kl_divergence_with_log_targets":
        labels = jnp.asarray(np.log(_soft(rng, SHAPE)), jnp.float32)
    else:
        labels = jnp.asarray(_soft(rng, SHAPE), jnp.float32)
    closed = getattr(derivatives, name)(first, labels, reduction="mean")
    expected = _autodiff(getattr(jaxce, name), 0, first, labels, reduction="mean")
    assert closed.dtype == dtype == expected.dtype
    with jax.enable_x64(True):
        reference = jax.grad(lambda a: getattr(_references, name)(a, labels, reduction="mean"))(
            jnp.asarray(first, jnp.float64)
        )
    # Both computed in float32 (4 C + 16 = 36 roundings, as above) and rounded once
    # to the input's dtype: each within half_precision_output_bound of the exact
    # gradient at the same (rounded) inputs, so within twice that of each other.
    # Norm-wise against the largest entry: a rounding of one entry is relative to it.
    tolerance = half_precision_output_bound(dtype, 4 * CLASSES + 16)
    assert_normwise_close(closed, reference, tolerance, "closed form vs reference", floor=0.0)
    assert_normwise_close(closed, expected, 2 * tolerance, "closed form vs jax.grad", floor=0.0)


def test_linear_gradient_dtypes_follow_each_input():
    hidden = jnp.ones((3, 4), jnp.bfloat16)
    weight = jnp.ones((5, 4), jnp.float32)
    bias = jnp.zeros((5,), jnp.bfloat16)
    d_hidden, d_weight, d_bias = derivatives.linear_cross_entropy(
        hidden, weight, jnp.array([0, 1, 2]), bias=bias
    )
    assert (d_hidden.dtype, d_weight.dtype, d_bias.dtype) == (
        jnp.bfloat16,
        jnp.float32,
        jnp.bfloat16,
    )


def test_closed_forms_use_no_autodiff():
    """A closed form traces to a jaxpr without any derivative rule being invoked."""
    x = jnp.ones((2, 3))
    labels = jnp.array([0, 1])
    jaxpr = jax.make_jaxpr(
        lambda x: derivatives.softmax_cross_entropy_with_integer_labels(
            x, labels, label_smoothing=0.1, z_loss=0.1, reduction="mean"
        )
    )(x)
    primitives = {eqn.primitive.name for eqn in jaxpr.jaxpr.eqns}
    assert not primitives & {"custom_jvp_call", "custom_vjp_call", "transpose", "linear_call"}


# Every axis form a loss accepts; the closed form must accept it too and agree with jax.grad.
AXIS_FORMS = {
    "None": None,
    "tuple(0,2)": (0, 2),
    "tuple(2,0)": (2, 0),
    "negative-2": -2,
    "list[0,2]": [0, 2],
    "numpy_int1": np.int64(1),
}
AXIS_FUNCTIONS = [
    "softmax_cross_entropy",
    "categorical_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "softmax_focal_loss",
    "poly_loss_cross_entropy",
    "kl_divergence",
    "log_softmax",
    "logsumexp",
]


def _axis_inputs(name: str, axis, rng):
    """(first argument, other arguments, options) of `name` reducing over `axis` of SHAPE."""
    x = rng.normal(size=SHAPE)
    if name in ("log_softmax", "logsumexp"):
        return x, (), {}
    ndim = len(SHAPE)
    try:
        reduced = tuple(range(ndim)) if axis is None else _references_axes(axis, ndim)
    except TypeError:
        reduced = ()
    batch_shape = tuple(d for i, d in enumerate(SHAPE) if i not in reduced)
    if name == "softmax_cross_entropy_with_integer_labels":
        num_classes = int(np.prod([SHAPE[i] for i in reduced])) if reduced else CLASSES
        return x, (rng.integers(0, num_classes, size=batch_shape),), {"reduction": "mean"}
    labels = rng.uniform(0.05, 1.0, SHAPE)
    if name == "categorical_cross_entropy":
        return rng.uniform(0.05, 0.95, SHAPE), (labels,), {"reduction": "mean"}
    return x, (labels,), {"reduction": "mean"}


def _references_axes(axis, ndim: int) -> tuple[int, ...]:
    axes = (int(axis),) if np.ndim(axis) == 0 else tuple(int(a) for a in axis)
    return tuple(a % ndim for a in axes)


def _loss_accepts(name: str, first, rest, options) -> bool:
    try:
        jax.eval_shape(lambda a: getattr(jaxce, name)(a, *rest, **options), first)
    except (TypeError, ValueError):
        return False
    return True


@pytest.mark.parametrize("axis_id", list(AXIS_FORMS))
@pytest.mark.parametrize("name", AXIS_FUNCTIONS)
def test_closed_form_accepts_every_axis_its_loss_accepts(name: str, axis_id: str) -> None:
    """`derivatives.softmax_cross_entropy(..., axis=None)` raised TypeError while the loss
    and jax.grad accept it; a list axis failed the same way for `derivatives.logsumexp`.
    Where the loss refuses an axis, the closed form refuses it too."""
    axis = AXIS_FORMS[axis_id]
    rng = np.random.default_rng(91)
    with jax.enable_x64(True):
        first, rest, options = _axis_inputs(name, axis, rng)
        options = {**options, "axis": axis}
        if not _loss_accepts(name, first, rest, options):
            # The loss refuses this axis: the closed form refuses it too.
            with pytest.raises((TypeError, ValueError)):
                getattr(derivatives, name)(first, *rest, **options)
            return
        closed = getattr(derivatives, name)(first, *rest, **options)
        expected = _autodiff(getattr(jaxce, name), 0, jnp.asarray(first), *rest, **options)
    _assert_grads_close(closed, expected)


@pytest.mark.parametrize("gamma", [-0.5, float("nan")], ids=["negative", "nan"])
def test_focal_closed_form_checks_gamma_as_the_loss_does(gamma: float) -> None:
    """A concrete gamma < 0 (or NaN) raises; a traced one gives the loss's gradient, 0 (the
    loss is NaN), and `jaxce.checked` names it. The docstring says gamma >= 0; neither the
    loss nor the closed form checked it."""
    from jax.experimental import checkify

    rng = np.random.default_rng(92)
    x = jnp.asarray(rng.normal(size=SHAPE), jnp.float32)
    y = jnp.asarray(rng.integers(0, 2, size=SHAPE), jnp.float32)
    for fn in (jaxce.sigmoid_focal_loss, derivatives.sigmoid_focal_loss):
        with pytest.raises(ValueError, match="`gamma`"):
            fn(x, y, gamma=gamma)
    traced = jax.jit(
        lambda x, g: (
            derivatives.sigmoid_focal_loss(x, y, gamma=g, reduction="mean"),
            jax.grad(lambda z: jaxce.sigmoid_focal_loss(z, y, gamma=g, reduction="mean"))(x),
        )
    )
    closed, expected = traced(x, gamma)
    np.testing.assert_array_equal(closed, expected)
    np.testing.assert_array_equal(closed, np.zeros(SHAPE, np.float32))
    with pytest.raises(checkify.JaxRuntimeError, match="`gamma`"):
        jaxce.checked(traced)(x, gamma)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("softmax_focal_loss", {"gamma": -0.5}),
        ("softmax_focal_loss", {"gamma": float("nan")}),
        ("poly_loss_cross_entropy", {"epsilon": float("nan")}),
        ("categorical_cross_entropy", {"label_smoothing": 1.0}),
    ],
    ids=["focal-gamma=-0.5", "focal-gamma=nan", "poly-epsilon=nan", "categorical-smoothing=1"],
)
def test_closed_forms_check_their_options_as_the_losses_do(name, options) -> None:
    x = jnp.full(SHAPE, 0.2, jnp.float32)
    y = jnp.asarray(_soft(np.random.default_rng(93), SHAPE), jnp.float32)
    (argument,) = options
    for fn in (getattr(jaxce, name), getattr(derivatives, name)):
        with pytest.raises(ValueError, match=f"`{argument}`"):
            fn(x, y, **options)
