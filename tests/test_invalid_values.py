"""Invalid values are loud, valid ones are never mistaken for invalid, and empty is not an error.

Six behaviours, each across every loss and primitive it reaches, the dtypes float32, bfloat16
and float16, and the reductions "none", "sum" and "mean":

1. a NaN logit of a class that takes part makes its row's loss NaN (never -inf or finite) and
   leaves the other rows exact; a NaN excluded by ``where`` changes nothing, gradients included;
2. integer labels of any integer dtype give the loss of int32 labels of the same values;
3. a "mean" over zero counted examples is 0 with zero gradients, but invalid labels stay NaN,
   and counted class weights summing to 0 divide by zero as PyTorch does;
4. traced hyperparameters out of range give NaN (``jaxce.checked`` names them), concrete ones
   raise a ``ValueError`` naming them;
5. ``jaxce.checked`` works on (and next to) ``jax.jit``-ed functions, in either order;
6. empty batches give empty per-example losses, 0 for "sum" / "mean", and empty gradients.

The vocabulary-parallel cases (``jaxce.sharded``) need several devices, and JAX fixes its device
count when the backend starts, so the parent run holds one test that runs the
``test_vocab_parallel_*`` cases of this file again in a subprocess with four host devices
(``JAXCE_INVALID_VALUES_FOUR_DEVICES=1``); only that subprocess defines them. The subprocess
starts with the module's first test and runs beside the others (not under pytest-xdist).

Most cases compile one function and run it on several inputs (NaN and finite, several values
of a traced option): compiling, not running, is what these small cases cost.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REDUCTIONS, rounding_bound, unit_roundoff
from jax.experimental import checkify

import jaxce
import jaxce.derivatives
import jaxce.sharded

CHILD_FLAG = "JAXCE_INVALID_VALUES_FOUR_DEVICES"
DEVICE_FLAG = "--xla_force_host_platform_device_count=4"

DTYPES = ["float32", "bfloat16", "float16"]
LABEL_DTYPES = ["int8", "int16", "int32", "uint8", "uint16", "uint32"]
MODES = ["eager", "jit"]
# Every dtype under jit, and float32 eagerly too (eager calls skip the traced-only checks).
DTYPE_MODES = [("float32", "eager"), ("float32", "jit"), ("bfloat16", "jit"), ("float16", "jit")]
DTYPE_MODE_IDS = [f"{d}-{m}" for d, m in DTYPE_MODES]
# Outputs in the input's dtype (primitives, gradients): the tolerance of that dtype.
# These tests compare a loss or gradient with the same one computed another way (a
# NaN replaced by a finite value where it takes no part, a row alone, the closed
# form against jax.grad): the same float32 arithmetic, up to the order of a few
# sums (16 roundings of float32's u = 2^-24), then rounded once to the dtype. Two
# roundings of values that close differ by at most one unit in the last place,
# 2 u(dtype): 2^-7 for bfloat16, 2^-10 for float16.
RTOL = {
    dtype: (2 * unit_roundoff(dtype) if dtype != "float32" else 0.0)
    + rounding_bound(jnp.float32, 16)
    for dtype in DTYPES
}
GRAD_TOL = RTOL


def as_f64(x: Any) -> np.ndarray:
    """Any array (bfloat16 included) as a float64 NumPy array."""
    return np.asarray(x).astype(np.float64)


def one_hot(classes: np.ndarray, num_classes: int) -> np.ndarray:
    return np.eye(num_classes)[classes]


def maybe_jit(fn: Callable[..., Any], mode: str) -> Callable[..., Any]:
    return jax.jit(fn) if mode == "jit" else fn


def all_reductions(fn: Callable[..., jax.Array], *args: Any, **options: Any) -> dict[str, Any]:
    return {reduction: fn(*args, reduction=reduction, **options) for reduction in REDUCTIONS}


def integer_loss(logits, labels, **options):
    return jaxce.softmax_cross_entropy_with_integer_labels(logits, labels, **options)


def assert_same_tree(actual: Any, expected: Any, what: str = "") -> None:
    """Same structure, bit-identical leaves (NaN where NaN)."""
    leaves, tree = jax.tree.flatten(actual)
    expected_leaves, expected_tree = jax.tree.flatten(expected)
    assert tree == expected_tree, what
    for a, e in zip(leaves, expected_leaves, strict=True):
        np.testing.assert_array_equal(as_f64(a), as_f64(e), err_msg=what)


def reference_loss(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """-log softmax(x)_y in float64."""
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(-1)) + m[..., 0]
    return lse - np.take_along_axis(x, labels[..., None], -1)[..., 0]


# --------------------------------------------------------------------------- #
# 1. NaN logits are loud; NaN excluded by `where` changes nothing.
# --------------------------------------------------------------------------- #

N, C = 6, 6
NAN_IN_LABEL_ROW = 1  # the NaN is the logit of the label's class (a positive, for binary)
NAN_IN_OTHER_ROW = 3  # the NaN is another class's logit (a negative, for binary)
IGNORED_ROW = 4


def _nan_options(option: str, classes: np.ndarray) -> dict[str, Any]:
    """Options of a NaN case; arrays with a leading batch axis are sliced with the rows."""
    rng = np.random.default_rng(40)
    if option == "plain":
        return {}
    if option == "weight_smoothing_z_loss_ignore_index":
        return {
            "weight": rng.uniform(0.2, 2.0, C),
            "label_smoothing": 0.1,
            "z_loss": 1e-3,
            "ignore_index": -100,
        }
    if option == "weight_smoothing":
        return {"weight": rng.uniform(0.2, 2.0, C), "label_smoothing": 0.1}
    if option == "weight_pos_weight_smoothing":
        return {
            "weight": rng.uniform(0.2, 2.0, C),
            "pos_weight": rng.uniform(0.5, 3.0, C),
            "label_smoothing": 0.1,
        }
    if option == "alpha_gamma":
        return {"alpha": 0.25, "gamma": 1.5}
    if option == "alpha_vector_gamma_smoothing":
        return {"alpha": rng.uniform(0.2, 2.0, C), "gamma": 0.5, "label_smoothing": 0.1}
    assert option == "where_excludes_another_class"
    # Every row excludes one class that is neither its label nor its NaN's class.
    where = np.ones((N, C), bool)
    where[np.arange(N), (classes + 3) % C] = False
    return {"where": where}


# (id, loss, kind of labels, option)
NAN_CASES = [
    ("integer_labels-plain", integer_loss, "integer", "plain"),
    (
        "integer_labels-weight_smoothing_z_loss_ignore_index",
        integer_loss,
        "integer",
        "weight_smoothing_z_loss_ignore_index",
    ),
    ("integer_labels-where", integer_loss, "integer", "where_excludes_another_class"),
    ("softmax-plain", jaxce.softmax_cross_entropy, "one_hot", "plain"),
    ("softmax-weight_smoothing", jaxce.softmax_cross_entropy, "one_hot", "weight_smoothing"),
    ("softmax-where", jaxce.softmax_cross_entropy, "one_hot", "where_excludes_another_class"),
    ("sigmoid_binary-plain", jaxce.sigmoid_binary_cross_entropy, "binary", "plain"),
    (
        "sigmoid_binary-weight_pos_weight_smoothing",
        jaxce.sigmoid_binary_cross_entropy,
        "binary",
        "weight_pos_weight_smoothing",
    ),
    (
        "sigmoid_binary-where",
        jaxce.sigmoid_binary_cross_entropy,
        "binary",
        "where_excludes_another_class",
    ),
    ("sigmoid_focal-plain", jaxce.sigmoid_focal_loss, "binary", "plain"),
    ("sigmoid_focal-alpha_gamma", jaxce.sigmoid_focal_loss, "binary", "alpha_gamma"),
    ("softmax_focal-plain", jaxce.softmax_focal_loss, "one_hot", "plain"),
    (
        "softmax_focal-alpha_vector_gamma_smoothing",
        jaxce.softmax_focal_loss,
        "one_hot",
        "alpha_vector_gamma_smoothing",
    ),
    ("poly-plain", jaxce.poly_loss_cross_entropy, "one_hot", "plain"),
    # The "logits" are log-predictions: a NaN one makes its row NaN, also under a zero target.
    ("kl_divergence-plain", jaxce.kl_divergence, "one_hot", "plain"),
    (
        "kl_divergence_with_log_targets-where",
        jaxce.kl_divergence_with_log_targets,
        "log_one_hot",
        "where_excludes_another_class",
    ),
]


def _dense_labels(kind: str, classes: np.ndarray, num_classes: int) -> np.ndarray:
    """One-hot labels, or their logs (-inf for the zeros) for the divergence of log targets."""
    labels = one_hot(classes, num_classes)
    if kind.startswith("log_one_hot"):
        with np.errstate(divide="ignore"):
            return np.log(labels)
    return labels


def _keep_rows(options: dict[str, Any], keep: np.ndarray) -> dict[str, Any]:
    return {
        k: v[keep] if isinstance(v, np.ndarray) and v.ndim == 2 and v.shape[0] == N else v
        for k, v in options.items()
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("loss", "kind", "option"),
    [case[1:] for case in NAN_CASES],
    ids=[case[0] for case in NAN_CASES],
)
def test_nan_logit_makes_its_row_nan_and_leaves_other_rows_exact(
    loss, kind: str, option: str, dtype: str
) -> None:
    """One row has a NaN in its label's class, another in another class (the old -inf bug).

    For the binary losses an example is an element: the NaNs are a positive and a negative.
    """
    rng = np.random.default_rng(41)
    x = rng.normal(size=(N, C)) * 2
    classes = rng.integers(0, C, size=N)
    nan_entries = [
        (NAN_IN_LABEL_ROW, classes[NAN_IN_LABEL_ROW]),
        (NAN_IN_OTHER_ROW, (classes[NAN_IN_OTHER_ROW] + 1) % C),
    ]
    for entry in nan_entries:
        x[entry] = np.nan
    options = _nan_options(option, classes)
    labels: np.ndarray = classes.copy() if kind == "integer" else _dense_labels(kind, classes, C)
    if "ignore_index" in options:
        labels[IGNORED_ROW] = -100
    logits = jnp.asarray(x, dtype)
    run = jax.jit(lambda z: all_reductions(loss, z, labels, **options))

    out = run(logits)

    per_example = as_f64(out["none"])
    for entry in nan_entries:
        unit = entry if kind == "binary" else entry[0]
        assert np.isnan(per_example[unit]), f"loss at {unit}: {per_example[unit]}"
    assert np.isnan(out["sum"]), f"sum: {out['sum']}"
    assert np.isnan(out["mean"]), f"mean: {out['mean']}"
    # The other examples (rows; elements for binary) are exactly what they are on their own:
    # what the same program gives them when the NaNs are finite values.
    finite = as_f64(run(jnp.asarray(np.nan_to_num(x, nan=0.0), dtype))["none"])
    others = ~np.isnan(x) if kind == "binary" else ~np.isnan(x).any(axis=1)
    assert np.all(np.isfinite(per_example[others]))
    np.testing.assert_array_equal(per_example[others], finite[others])
    if kind != "binary" and dtype == "float32":  # and what they are in a batch of their own
        keep = np.flatnonzero(others)
        kept = _keep_rows(options, keep)
        alone = jax.jit(lambda z: loss(z, labels[keep], reduction="none", **kept))(logits[keep])
        np.testing.assert_allclose(per_example[keep], as_f64(alone), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_reported_case_nan_beside_the_label_is_nan_not_minus_inf(dtype: str) -> None:
    """`softmax_cross_entropy_with_integer_labels([[nan, 0, 1]], [1])` was -inf."""
    logits = jnp.asarray([[np.nan, 0.0, 1.0]], dtype)
    for mode in MODES:
        out = maybe_jit(lambda z: all_reductions(integer_loss, z, np.array([1])), mode)(logits)
        for reduction, loss in out.items():
            assert np.all(np.isnan(as_f64(loss))), f"{mode}, {reduction}: {loss}"


@pytest.mark.parametrize(
    ("layout", "dtype"),
    [("batch_dims_axis-1", "float32"), ("axis0", "bfloat16"), ("axis(2,0)", "float32")],
)
@pytest.mark.parametrize("loss", ["integer_labels", "softmax"])
def test_nan_logit_is_loud_in_any_class_layout(loss: str, layout: str, dtype: str) -> None:
    """The NaN (not in the label's class) is found whatever the class axes are."""
    rng = np.random.default_rng(42)
    if layout == "batch_dims_axis-1":
        shape, axis = (2, 3, 5), -1
    elif layout == "axis0":
        shape, axis = (5, 4), 0
    else:
        shape, axis = (3, 4, 2), (2, 0)  # classes: 2 x 3 flattened in that order
    class_axes = tuple(a % len(shape) for a in ((axis,) if isinstance(axis, int) else axis))
    batch_shape = tuple(s for i, s in enumerate(shape) if i not in class_axes)
    num_classes = int(np.prod([shape[a] for a in class_axes]))
    classes = rng.integers(0, num_classes, size=batch_shape)
    # Lay every example's classes out last (in the order given), set one NaN, move them back.
    order = [i for i in range(len(shape)) if i not in class_axes] + list(class_axes)
    flat = rng.normal(size=(*batch_shape, num_classes))
    first = (0,) * len(batch_shape)
    flat[(*first, (classes[first] + 1) % num_classes)] = np.nan
    x = np.transpose(flat.reshape([shape[i] for i in order]), np.argsort(order))
    logits = jnp.asarray(x, dtype)
    if loss == "integer_labels":
        out = jax.jit(lambda z: all_reductions(integer_loss, z, classes, axis=axis))(logits)
    else:
        targets = one_hot(classes, num_classes).reshape([shape[i] for i in order])
        targets = np.transpose(targets, np.argsort(order))
        out = jax.jit(lambda z: all_reductions(jaxce.softmax_cross_entropy, z, targets, axis=axis))(
            logits
        )
    per_example = as_f64(out["none"])
    assert per_example.shape == batch_shape
    assert np.isnan(per_example[first])
    rest = np.ones(batch_shape, bool)
    rest[first] = False
    assert np.all(np.isfinite(per_example[rest]))
    assert np.isnan(out["sum"]) and np.isnan(out["mean"])


# Rows 1..8 hold a NaN; rows 0 and 9 are finite. (row, entries `where` excludes)
PRIMITIVE_NAN_ROWS = [
    ([np.nan, 0.5, 1.0, -2.0, 0.3], ()),  # first
    ([0.5, 1.0, np.nan, -2.0, 0.3], ()),  # middle
    ([0.5, 1.0, -2.0, 0.3, np.nan], ()),  # last
    ([0.5, 9.0, np.nan, -2.0, 0.3], ()),  # beside the maximum
    ([0.5, np.inf, np.nan, -2.0, 0.3], ()),  # beside +inf
    ([-np.inf, np.nan, 1.0, -2.0, 0.3], ()),  # beside -inf
    ([np.nan] * 5, ()),  # all NaN
    ([0.5, np.nan, 1.0, -2.0, 0.3], (3,)),  # another entry excluded by `where`
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [-1, 0], ids=["axis-1", "axis0"])
@pytest.mark.parametrize("primitive", ["logsumexp", "log_softmax"])
def test_nan_in_primitive_row_is_nan_and_other_rows_exact(
    primitive: str, axis: int, dtype: str
) -> None:
    rng = np.random.default_rng(43)
    x = rng.normal(size=(10, 5)) * 3
    where = np.ones((10, 5), bool)
    for i, (row, excluded) in enumerate(PRIMITIVE_NAN_ROWS, start=1):
        x[i] = row
        where[i, list(excluded)] = False
    fn = jax.jit(functools.partial(getattr(jaxce, primitive), axis=axis))

    def call(rows: np.ndarray, mask: np.ndarray) -> np.ndarray:
        # axis=0: the same rows, as columns.
        if axis == 0:
            rows, mask = rows.T, mask.T
        out = fn(jnp.asarray(rows, dtype), where=mask)
        assert out.dtype == jnp.dtype(dtype)
        out = as_f64(out)
        return out.T if (axis == 0 and out.ndim == 2) else out

    out = call(x, where)
    nan_rows = np.arange(1, 9)
    if primitive == "logsumexp":
        assert np.all(np.isnan(out[nan_rows])), out
    else:
        # The whole row is NaN, but for the entries `where` excludes (log-probability -inf).
        assert np.all(np.isnan(out[nan_rows][where[nan_rows]])), out
        assert np.all(out[~where] == -np.inf), out
    finite = np.array([0, 9])
    assert np.all(np.isfinite(out[finite]))
    np.testing.assert_allclose(out[finite], call(x[finite], where[finite]), rtol=RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("primitive", ["logsumexp", "log_softmax"])
def test_primitive_nan_excluded_by_where_changes_nothing(primitive: str, dtype: str) -> None:
    x = np.array([[0.5, np.nan, 1.0, -2.0], [np.nan, np.nan, 0.3, 2.0]])
    where = ~np.isnan(x)
    fn = getattr(jaxce, primitive)

    def total(v):
        # log_softmax is -inf at the excluded entries: sum the included ones.
        out = fn(v, where=where).astype(jnp.float32)
        return jnp.sum(out if primitive == "logsumexp" else jnp.where(where, out, 0))

    @jax.jit
    def value_and_grad(z):
        return fn(z, where=where), jax.grad(total)(z)

    out, grad = value_and_grad(jnp.asarray(x, dtype))
    assert np.all(np.isfinite(as_f64(grad))) and np.all(as_f64(grad)[~where] == 0)
    if primitive == "log_softmax":
        assert np.all(as_f64(out)[~where] == -np.inf)
        assert np.all(np.isfinite(as_f64(out)[where]))
    else:
        assert np.all(np.isfinite(as_f64(out)))
    for replacement in (0.0, 3.0):
        replaced = jnp.asarray(np.where(where, x, replacement), dtype)
        expected, expected_grad = value_and_grad(replaced)
        np.testing.assert_array_equal(as_f64(out), as_f64(expected))
        np.testing.assert_allclose(as_f64(grad), as_f64(expected_grad), rtol=RTOL[dtype])


# (id, loss, its closed-form derivative, kind of inputs)
WHERE_LOSSES = [
    (
        "sigmoid_binary_cross_entropy",
        jaxce.sigmoid_binary_cross_entropy,
        jaxce.derivatives.sigmoid_binary_cross_entropy,
        "binary_logits",
    ),
    (
        "sigmoid_focal_loss",
        jaxce.sigmoid_focal_loss,
        jaxce.derivatives.sigmoid_focal_loss,
        "binary_logits",
    ),
    (
        "binary_cross_entropy",
        jaxce.binary_cross_entropy,
        jaxce.derivatives.binary_cross_entropy,
        "binary_probs",
    ),
    (
        "softmax_cross_entropy",
        jaxce.softmax_cross_entropy,
        jaxce.derivatives.softmax_cross_entropy,
        "one_hot_logits",
    ),
    (
        "softmax_cross_entropy_with_integer_labels",
        jaxce.softmax_cross_entropy_with_integer_labels,
        jaxce.derivatives.softmax_cross_entropy_with_integer_labels,
        "integer_logits",
    ),
    (
        "categorical_cross_entropy",
        jaxce.categorical_cross_entropy,
        jaxce.derivatives.categorical_cross_entropy,
        "one_hot_probs",
    ),
    (
        "softmax_focal_loss",
        jaxce.softmax_focal_loss,
        jaxce.derivatives.softmax_focal_loss,
        "one_hot_logits",
    ),
    (
        "poly_loss_cross_entropy",
        jaxce.poly_loss_cross_entropy,
        jaxce.derivatives.poly_loss_cross_entropy,
        "one_hot_logits",
    ),
    ("kl_divergence", jaxce.kl_divergence, jaxce.derivatives.kl_divergence, "one_hot_logits"),
    (
        "kl_divergence_with_log_targets",
        jaxce.kl_divergence_with_log_targets,
        jaxce.derivatives.kl_divergence_with_log_targets,
        "log_one_hot_logits",
    ),
]


def _where_inputs(kind: str, where_kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, Any]:
    """(values with NaN where excluded, labels, the excluded entries, `where`).

    "elementwise" (a mask of the inputs' shape) excludes one entry (a positive label for the
    binary losses, a class that is not the label otherwise), a whole class, and a whole row;
    "per_row" (the batch shape) a row; "per_class" (shape (1, C), broadcast) a class.
    """
    rng = np.random.default_rng(44)
    n, c = 4, 5
    classes = np.array([0, 2, 4, 2])  # class 1 is nobody's label
    probs = kind.endswith("probs")
    x = rng.uniform(0.05, 0.95, size=(n, c)) if probs else rng.normal(size=(n, c)) * 2
    labels = classes if kind == "integer_logits" else _dense_labels(kind, classes, c)
    binary = kind.startswith("binary")
    excluded = np.zeros((n, c), bool)
    if where_kind in ("elementwise", "per_class"):
        excluded[:, 1] = True
    if where_kind in ("elementwise", "per_row"):
        excluded[2] = True
    if where_kind == "elementwise":
        excluded[1, 2 if binary else 3] = True
        where: Any = ~excluded
    elif where_kind == "per_class":
        where = ~excluded[:1]
    else:
        where = ~excluded[:, :1] if binary else ~excluded[:, 0]
    x[excluded] = np.nan
    return x, labels, excluded, where


WHERE_KINDS = [("elementwise", "float32"), ("per_row", "bfloat16"), ("per_class", "float16")]


@pytest.mark.parametrize(
    ("where_kind", "dtype"), WHERE_KINDS, ids=[f"{w}-{d}" for w, d in WHERE_KINDS]
)
@pytest.mark.parametrize(
    ("loss", "derivative", "kind"),
    [case[1:] for case in WHERE_LOSSES],
    ids=[case[0] for case in WHERE_LOSSES],
)
def test_nan_excluded_by_where_changes_nothing(
    loss, derivative, kind: str, where_kind: str, dtype: str
) -> None:
    """The loss is that of any finite value there; gradients are finite, 0 where excluded.

    For the losses from probabilities the excluded values are not checked either: 3.0 (not a
    probability) there changes nothing, and the mean is not NaN. The closed-form derivative
    (`jaxce.derivatives`) agrees with `jax.grad`.
    """
    x, labels, excluded, where = _where_inputs(kind, where_kind)

    def values_and_grads(z):
        out = {}
        for reduction in REDUCTIONS:

            def total(v, reduction=reduction):
                return jnp.sum(loss(v, labels, where=where, reduction=reduction))

            value = loss(z, labels, where=where, reduction=reduction)
            if reduction == "sum":  # its gradient is that of "none"
                out[reduction] = (value, *out["none"][1:])
                continue
            grad = jax.grad(total)(z)
            out[reduction] = (value, grad, derivative(z, labels, where=where, reduction=reduction))
        return out

    run = jax.jit(values_and_grads)
    with_nan = run(jnp.asarray(x, dtype))
    for replacement in (0.0, 3.0):
        finite = run(jnp.asarray(np.where(excluded, replacement, x), dtype))
        for reduction in REDUCTIONS:
            value, grad, closed_form = with_nan[reduction]
            expected_value, expected_grad, _ = finite[reduction]
            what = f"reduction={reduction}, replacement={replacement}"
            assert np.all(np.isfinite(as_f64(value))), what
            np.testing.assert_allclose(
                as_f64(value), as_f64(expected_value), rtol=1e-6, err_msg=what
            )
            assert grad.dtype == jnp.dtype(dtype)
            assert np.all(np.isfinite(as_f64(grad))), what
            assert np.all(as_f64(grad)[excluded] == 0), what
            np.testing.assert_allclose(
                as_f64(grad), as_f64(expected_grad), rtol=RTOL[dtype], atol=1e-7, err_msg=what
            )
            what = f"closed form, {what}"
            assert np.all(np.isfinite(as_f64(closed_form))), what
            assert np.all(as_f64(closed_form)[excluded] == 0), what
            np.testing.assert_allclose(
                as_f64(closed_form),
                as_f64(grad),
                rtol=GRAD_TOL[dtype],
                atol=rounding_bound(jnp.float32, 16),
                err_msg=what,
            )


LINEAR_NAN_CASES = [
    ("plain", 2, "float32"),
    ("plain", 2, "bfloat16"),
    ("bias_smoothing_z_loss_softcap_ignore_index", None, "float32"),
    ("bias_smoothing_z_loss_softcap_ignore_index", None, "float16"),
]


@pytest.mark.parametrize(
    ("option", "chunk_size", "dtype"),
    LINEAR_NAN_CASES,
    ids=[f"{o}-chunk{c}-{d}" for o, c, d in LINEAR_NAN_CASES],
)
def test_linear_nan_hidden_row_makes_its_token_nan(option: str, chunk_size, dtype: str) -> None:
    rng = np.random.default_rng(45)
    tokens, dim, vocab = 7, 4, 11
    hidden = rng.normal(size=(tokens, dim))
    weight = rng.normal(size=(vocab, dim)) * 0.5
    labels = rng.integers(0, vocab, size=tokens)
    nan_row = 2
    hidden[nan_row, 1] = np.nan
    options: dict[str, Any] = {"chunk_size": chunk_size}
    if option != "plain":
        labels[IGNORED_ROW] = -100
        options.update(
            bias=jnp.asarray(rng.normal(size=vocab), dtype),
            label_smoothing=0.1,
            z_loss=1e-3,
            softcap=5.0,
            ignore_index=-100,
        )
    h, w = jnp.asarray(hidden, dtype), jnp.asarray(weight, dtype)
    out = jax.jit(lambda a, b: all_reductions(jaxce.linear_cross_entropy, a, b, labels, **options))(
        h, w
    )
    per_token = as_f64(out["none"])
    assert np.isnan(per_token[nan_row])
    assert np.isnan(out["sum"]) and np.isnan(out["mean"])
    keep = np.arange(tokens) != nan_row
    assert np.all(np.isfinite(per_token[keep]))
    # The other tokens' losses are those they have on their own, whatever the chunking.
    finite = jaxce.linear_cross_entropy(
        jnp.asarray(np.nan_to_num(hidden), dtype), w, labels, reduction="none", **options
    )
    np.testing.assert_allclose(per_token[keep], as_f64(finite)[keep], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- #
# 2. Integer labels of any integer dtype.
# --------------------------------------------------------------------------- #


def _label_results(
    function: str, logits: np.ndarray, mode: str = "eager", **options: Any
) -> Callable[..., Any]:
    """labels -> {reduction: (loss, closed-form derivative)} of one integer-label function.

    "integer_labels": the loss on ``logits`` and `jaxce.derivatives` of it; "linear":
    `linear_cross_entropy` on hidden states and an embedding of ``logits``' shape and
    `jaxce.derivatives.linear_cross_entropy`. Under "jit" the float inputs are arguments (not
    constants folded into the program, which is slow to compile for 40000 classes).
    """
    if function == "integer_labels":
        derivative = jaxce.derivatives.softmax_cross_entropy_with_integer_labels
        arrays: tuple[jax.Array, ...] = (jnp.asarray(logits),)

        def results(arrays, labels):
            return {
                r: (
                    integer_loss(arrays[0], labels, reduction=r, **options),
                    derivative(arrays[0], labels, reduction=r, **options),
                )
                for r in REDUCTIONS
            }

    else:
        assert function == "linear"
        rng = np.random.default_rng(46)
        weight = jnp.asarray(rng.normal(size=(logits.shape[-1], 3)), jnp.float32)
        arrays = (jnp.asarray(rng.normal(size=(*logits.shape[:-1], 3)), jnp.float32), weight)

        def results(arrays, labels):
            # The closed form of "mean" only: its three matrix products compile slowly.
            derivative = jaxce.derivatives.linear_cross_entropy
            return {
                r: (
                    jaxce.linear_cross_entropy(*arrays, labels, reduction=r, **options),
                    derivative(*arrays, labels, reduction=r, **options) if r == "mean" else None,
                )
                for r in REDUCTIONS
            }

    run = maybe_jit(results, mode)
    return lambda labels: run(arrays, labels)


LABEL_FUNCTIONS = ["integer_labels", "linear"]


@functools.cache
def _shared_label_results(function: str, mode: str, **options: Any) -> Callable[..., Any]:
    """`_label_results` on fixed logits, one (jitted) function per case: compiles are shared."""
    logits = (np.random.default_rng(47).normal(size=(3, 7)) * 2).astype(np.float32)
    return _label_results(function, logits, mode, **options)


# Every label dtype through the integer-label loss, eagerly and under jit, and through the
# linear loss: under jit a narrow signed, a narrow unsigned and a wide unsigned one.
LABEL_DTYPE_CASES = [
    (label_dtype, "integer_labels", mode) for label_dtype in LABEL_DTYPES for mode in MODES
] + [
    (label_dtype, "linear", "jit" if label_dtype in ("int8", "uint8", "uint32") else "eager")
    for label_dtype in LABEL_DTYPES
]


@pytest.mark.parametrize(
    ("label_dtype", "function", "mode"),
    LABEL_DTYPE_CASES,
    ids=[f"{d}-{f}-{m}" for d, f, m in LABEL_DTYPE_CASES],
)
def test_label_dtype_gives_the_int32_result(label_dtype: str, function: str, mode: str) -> None:
    """Losses and closed-form gradients; -100 is ignored where the dtype holds it."""
    values = np.array([6, -100, 3] if np.dtype(label_dtype).kind == "i" else [6, 0, 3])
    options = {"ignore_index": -100, "label_smoothing": 0.1, "z_loss": 1e-3}
    results = _shared_label_results(function, mode, **options)
    actual = results(jnp.asarray(values.astype(label_dtype)))
    assert_same_tree(actual, results(jnp.asarray(values, jnp.int32)), f"{label_dtype} vs int32")
    assert np.all(np.isfinite(as_f64(actual["mean"][0])))


@pytest.mark.parametrize(
    ("label_dtype", "function"),
    [("int64", "integer_labels"), ("uint64", "integer_labels"), ("int64", "linear")],
)
def test_64_bit_label_dtypes_under_x64(label_dtype: str, function: str) -> None:
    with jax.enable_x64(True):
        logits = (np.random.default_rng(48).normal(size=(4, 5)) * 2).astype(np.float32)
        values = np.array([0, 4, 2, 1])
        results = _label_results(function, logits, "jit", ignore_index=-100)
        actual = results(jnp.asarray(values.astype(label_dtype)))
        assert_same_tree(actual, results(jnp.asarray(values, jnp.int32)), label_dtype)


def test_64_bit_labels_out_of_int32_range_are_invalid_or_ignored_exactly() -> None:
    """2**40 is out of range (not wrapped into it); an int64 ignore_index of 2**40 ignores it."""
    with jax.enable_x64(True):
        logits = np.zeros((3, 4), np.float32)
        big = np.array([1, 2**40, 3], np.int64)
        huge = np.array([1, 2**64 - 1, 3], np.uint64)  # not -1, and not a class either
        loss, ignored, unsigned = jax.jit(
            lambda x: (
                integer_loss(x, big),
                integer_loss(x, big, ignore_index=2**40, reduction="mean"),
                integer_loss(x, huge, ignore_index=-100),
            )
        )(logits)
        assert np.isnan(loss[1]) and np.all(np.isfinite(as_f64(loss)[[0, 2]]))
        np.testing.assert_allclose(ignored, np.log(4), rtol=1e-6)
        assert np.isnan(unsigned[1])


@pytest.mark.parametrize("function", LABEL_FUNCTIONS)
def test_int16_labels_index_40000_classes(function: str) -> None:
    """Classes 5 and 30000 of 40000 in int16 labels are classes (they once gave NaN)."""
    rng = np.random.default_rng(49)
    logits = rng.normal(size=(2, 40000)).astype(np.float32)
    values = np.array([5, 30000])
    results = _label_results(function, logits, "jit")
    actual = results(jnp.asarray(values, jnp.int16))
    assert_same_tree(actual, results(jnp.asarray(values, jnp.int32)), "int16 vs int32")
    assert np.all(np.isfinite(as_f64(actual["none"][0])))
    if function == "integer_labels":
        np.testing.assert_allclose(actual["none"][0], reference_loss(logits, values), rtol=1e-6)
        assert np.all(np.asarray(actual["none"][1])[[0, 1], values] < 0)  # p_y - 1


@pytest.mark.parametrize(
    ("function", "mode"),
    [("integer_labels", "eager"), ("integer_labels", "jit"), ("linear", "jit")],
)
def test_uint8_label_156_is_a_class_not_ignore_index_minus_100(function: str, mode: str) -> None:
    """In uint8, -100 wraps to 156: label 156 of 200 classes must still count."""
    rng = np.random.default_rng(50)
    logits = rng.normal(size=(3, 200)).astype(np.float32)
    values = np.array([156, 3, 17])
    results = _label_results(function, logits, mode, ignore_index=-100)
    actual = results(jnp.asarray(values, jnp.uint8))
    assert_same_tree(actual, results(jnp.asarray(values, jnp.int32)), "uint8 vs int32")
    ignored = results(jnp.asarray([-100, 3, 17], jnp.int32))
    if function == "integer_labels":
        reference = reference_loss(logits, values)
        np.testing.assert_allclose(actual["none"][0], reference, rtol=1e-6)
        np.testing.assert_allclose(actual["mean"][0], reference.mean(), rtol=1e-6)
        assert np.asarray(actual["none"][1])[0, 156] < 0
    assert as_f64(actual["none"][0])[0] > 0  # counted, not ignored
    assert not np.isclose(actual["mean"][0], ignored["mean"][0])


NEGATIVE_LABELS = [
    ("int8", -3, -100),
    ("int8", -1, None),
    ("uint32", 2**32 - 1, -100),  # wraps to -1 in int32: out of range, not class C - 1
]


@pytest.mark.parametrize(
    ("function", "mode"),
    [("integer_labels", "eager"), ("integer_labels", "jit"), ("linear", "jit")],
)
@pytest.mark.parametrize(
    ("label_dtype", "bad", "ignore_index"),
    NEGATIVE_LABELS,
    ids=[f"{d}:{b}-ignore_index={i}" for d, b, i in NEGATIVE_LABELS],
)
def test_negative_label_that_is_not_ignore_index_is_nan(
    label_dtype: str, bad: int, ignore_index, function: str, mode: str
) -> None:
    """Its loss is NaN, "sum" and "mean" too; its gradient is 0 and the others' unchanged."""
    results = _shared_label_results(function, mode, ignore_index=ignore_index)
    actual = results(jnp.asarray(np.array([2, bad, 1], dtype=label_dtype)))
    good = results(jnp.asarray([2, 0, 1], jnp.int32))  # the same shapes: no compile
    per_example = as_f64(actual["none"][0])
    assert np.isnan(per_example[1])
    np.testing.assert_allclose(per_example[[0, 2]], as_f64(good["none"][0])[[0, 2]], rtol=1e-6)
    assert np.isnan(actual["sum"][0]) and np.isnan(actual["mean"][0])
    for reduction in REDUCTIONS:
        gradients = jax.tree.leaves(actual[reduction][1])
        assert all(np.all(np.isfinite(as_f64(g))) for g in gradients), reduction
    if function == "integer_labels":
        for reduction in ("none", "sum"):
            grad, expected = as_f64(actual[reduction][1]), as_f64(good[reduction][1])
            assert np.all(grad[1] == 0)
            np.testing.assert_allclose(grad[[0, 2]], expected[[0, 2]], rtol=1e-6)


# --------------------------------------------------------------------------- #
# 3. The "mean" rule.
# --------------------------------------------------------------------------- #

NOTHING_COUNTED = [
    "all_ignored",
    "all_ignored_weight_smoothing_z_loss",
    "every_row_excluded_by_where",
    "every_class_excluded_by_where",
    "empty_batch",
    "empty_batch_with_batch_dims",
]


def _nothing_counted(case: str, dtype: str) -> tuple[jax.Array, np.ndarray, dict[str, Any]]:
    rng = np.random.default_rng(52)
    shape = {"empty_batch": (0, 5), "empty_batch_with_batch_dims": (2, 0, 5)}.get(case, (4, 5))
    logits = jnp.asarray(rng.normal(size=shape) * 2, dtype)
    labels = rng.integers(0, 5, size=shape[:-1])
    options: dict[str, Any] = {}
    if case.startswith("all_ignored"):
        labels[:] = -100
        options["ignore_index"] = -100
    if case == "all_ignored_weight_smoothing_z_loss":
        options.update(weight=rng.uniform(0.2, 2.0, 5), label_smoothing=0.1, z_loss=1e-3)
    if case == "every_row_excluded_by_where":
        options["where"] = np.zeros(shape[:-1], bool)
    if case == "every_class_excluded_by_where":
        options["where"] = np.zeros(shape, bool)
    return logits, labels, options


# float32 under jit for every case, the half dtypes for some (eager: `test_empty_batch`).
NOTHING_COUNTED_CASES = [(case, "float32", "jit") for case in NOTHING_COUNTED]
NOTHING_COUNTED_CASES += [
    ("all_ignored_weight_smoothing_z_loss", "bfloat16", "jit"),
    ("every_row_excluded_by_where", "bfloat16", "jit"),
    ("every_class_excluded_by_where", "float16", "jit"),
    ("empty_batch", "float16", "jit"),
]


@pytest.mark.parametrize(
    ("case", "dtype", "mode"),
    NOTHING_COUNTED_CASES,
    ids=[f"{c}-{d}-{m}" for c, d, m in NOTHING_COUNTED_CASES],
)
def test_integer_labels_mean_over_nothing_is_zero_with_zero_gradients(
    case: str, dtype: str, mode: str
) -> None:
    logits, labels, options = _nothing_counted(case, dtype)

    def results(z):
        out = {}
        for reduction in REDUCTIONS:

            def total(v, r=reduction):
                return jnp.sum(integer_loss(v, labels, reduction=r, **options))

            out[reduction] = (
                integer_loss(z, labels, reduction=reduction, **options),
                jax.grad(total)(z),
                jaxce.derivatives.softmax_cross_entropy_with_integer_labels(
                    z, labels, reduction=reduction, **options
                ),
            )
        return out

    out = maybe_jit(results, mode)(logits)
    for reduction, (value, grad, closed_form) in out.items():
        expected_shape = labels.shape if reduction == "none" else ()
        assert value.shape == expected_shape and value.dtype == jnp.float32
        assert np.all(as_f64(value) == 0), f"{reduction}: {value}"
        for g in (grad, closed_form):
            assert g.shape == logits.shape and g.dtype == jnp.dtype(dtype)
            assert np.all(as_f64(g) == 0), f"{reduction}: {g}"


OTHER_LOSSES = [c for c in WHERE_LOSSES if c[0] != "softmax_cross_entropy_with_integer_labels"]
OTHER_WHERE = [("per_element", "float32"), ("per_element", "bfloat16"), ("per_row", "float16")]


@pytest.mark.parametrize(
    ("where_kind", "dtype"), OTHER_WHERE, ids=[f"{w}-{d}" for w, d in OTHER_WHERE]
)
@pytest.mark.parametrize(
    ("loss", "derivative", "kind"),
    [case[1:] for case in OTHER_LOSSES],
    ids=[case[0] for case in OTHER_LOSSES],
)
def test_other_losses_mean_over_nothing_is_zero_with_zero_gradients(
    loss, derivative, kind: str, where_kind: str, dtype: str
) -> None:
    x, labels, _, _ = _where_inputs(kind, "per_row")
    x = np.nan_to_num(x, nan=0.5)
    binary = kind.startswith("binary")
    if where_kind == "per_row":
        where = np.zeros((4, 1) if binary else (4,), bool)
    else:
        where = np.zeros(x.shape, bool)

    def results(z):
        return {
            r: (
                *jax.value_and_grad(lambda v, r=r: loss(v, labels, where=where, reduction=r))(z),
                derivative(z, labels, where=where, reduction=r),
            )
            for r in ("sum", "mean")
        }

    for reduction, (value, grad, closed_form) in jax.jit(results)(jnp.asarray(x, dtype)).items():
        assert float(value) == 0.0, reduction
        assert grad.dtype == jnp.dtype(dtype) and np.all(as_f64(grad) == 0), reduction
        assert np.all(as_f64(closed_form) == 0), reduction


INVALID_LABELS = {
    "all_out_of_range": [5, 6, 50, 5],
    "all_negative": [-1, -2, -5, -1],
    "invalid_among_ignored": [-100, 9, -100, -100],
    "invalid_among_counted": [0, 9, 2, 3],
}
INVALID_FUNCTIONS = [("integer_labels", "float32"), ("integer_labels", "float16")]
INVALID_FUNCTIONS += [("linear", "bfloat16")]


@pytest.mark.parametrize(
    ("function", "dtype"), INVALID_FUNCTIONS, ids=[f"{f}-{d}" for f, d in INVALID_FUNCTIONS]
)
@pytest.mark.parametrize("case", list(INVALID_LABELS))
def test_invalid_labels_make_mean_and_sum_nan_even_when_nothing_counts(
    case: str, function: str, dtype: str
) -> None:
    """An invalid label is neither ignored nor counted: NaN, whatever else the batch holds.

    The closed-form gradients stay finite (0 for the invalid and ignored examples).
    """
    rng = np.random.default_rng(53)
    labels = np.array(INVALID_LABELS[case])
    invalid = (labels != -100) & ((labels < 0) | (labels >= 5))
    ignored = labels == -100
    if function == "integer_labels":
        logits = jnp.asarray(rng.normal(size=(4, 5)), dtype)
        derivative = jaxce.derivatives.softmax_cross_entropy_with_integer_labels
        out, closed_form = jax.jit(
            lambda z: (
                all_reductions(integer_loss, z, labels, ignore_index=-100),
                derivative(z, labels, ignore_index=-100, reduction="mean"),
            )
        )(logits)
        assert np.all(np.isfinite(as_f64(closed_form)))
        assert np.all(as_f64(closed_form)[invalid | ignored] == 0)
    else:
        hidden = jnp.asarray(rng.normal(size=(4, 3)), dtype)
        weight = jnp.asarray(rng.normal(size=(5, 3)), dtype)
        out, grads = jax.jit(
            lambda h, w: (
                all_reductions(
                    jaxce.linear_cross_entropy, h, w, labels, ignore_index=-100, chunk_size=2
                ),
                jaxce.derivatives.linear_cross_entropy(
                    h, w, labels, ignore_index=-100, reduction="mean"
                ),
            )
        )(hidden, weight)
        assert all(np.all(np.isfinite(as_f64(g))) for g in grads if g is not None)
    per_example = as_f64(out["none"])
    assert np.all(np.isnan(per_example[invalid]))
    assert np.all(per_example[ignored] == 0)
    assert np.all(np.isfinite(per_example[~invalid]))
    assert np.isnan(out["sum"]), out["sum"]
    assert np.isnan(out["mean"]), out["mean"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_all_ignored_is_zero_with_zero_gradients(dtype: str) -> None:
    rng = np.random.default_rng(54)
    hidden = jnp.asarray(rng.normal(size=(5, 3)), dtype)
    weight = jnp.asarray(rng.normal(size=(6, 3)), dtype)
    bias = jnp.asarray(rng.normal(size=6), dtype)
    labels = np.full(5, -100)
    options = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-3)

    def results(h, w, b):
        out = {}
        for r in ("sum", "mean"):

            def total(h, w, b, r=r):
                return jaxce.linear_cross_entropy(h, w, labels, bias=b, reduction=r, **options)

            out[r] = (
                *jax.value_and_grad(total, argnums=(0, 1, 2))(h, w, b),
                jaxce.derivatives.linear_cross_entropy(
                    h, w, labels, bias=b, reduction=r, **options
                ),
            )
        return out

    for reduction, (value, grads, closed_form) in jax.jit(results)(hidden, weight, bias).items():
        assert float(value) == 0.0, reduction
        for g, c, like in zip(grads, closed_form, (hidden, weight, bias), strict=True):
            assert g.dtype == like.dtype and np.all(as_f64(g) == 0), reduction
            assert c.dtype == like.dtype and np.all(as_f64(c) == 0), reduction


ZERO_WEIGHT_SUMS = {
    # (two rows of logits, for labels 0 and 1; class weights): w_0 + w_1 + w_0 + w_1 = 0.
    "zero_weights_on_counted_labels": (
        [[0.3, -1.0, 0.5, 0.0], [1.0, 0.2, -0.4, 0.1]],
        [0, 0, 1, 2],
    ),
    "cancelling_weights_positive_numerator": (
        [[-2.0, 1.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]],
        [1, -1, 0.5, 2],
    ),
    "cancelling_weights_negative_numerator": (
        [[2.0, 0.0, 0.0, 0.0], [0.0, -2.0, 0.0, 0.0]],
        [1, -1, 0.5, 2],
    ),
}


def _zero_weight_inputs(case: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Six rows of four classes: labels 0, 1, 0, 1 counted, then two ignored (-100) rows."""
    rows, weight = ZERO_WEIGHT_SUMS[case]
    logits = np.array([rows[0], rows[1]] * 3, np.float32)
    labels = np.array([0, 1, 0, 1, -100, -100])
    return logits, labels, np.array(weight, np.float32)


def _torch_cross_entropy(logits, labels, weight, label_smoothing, reduction) -> np.ndarray:
    import torch

    return (
        torch.nn.functional.cross_entropy(
            torch.tensor(np.asarray(logits, np.float64)),
            torch.tensor(labels),
            weight=torch.tensor(np.asarray(weight, np.float64)),
            ignore_index=-100,
            label_smoothing=label_smoothing,
            reduction=reduction,
        )
        .detach()
        .numpy()
    )


def _assert_matches_torch(ours: dict[str, Any], logits, labels, weight, smoothing) -> None:
    """Compares "none" and "sum" (finite), then "mean" (not finite: the case is as named)."""
    for reduction in REDUCTIONS:
        expected = _torch_cross_entropy(logits, labels, weight, smoothing, reduction)
        assert np.all(np.isfinite(expected)) == (reduction != "mean")
        np.testing.assert_allclose(
            as_f64(ours[reduction]), expected, rtol=1e-5, atol=1e-6, err_msg=reduction
        )


@functools.cache
def _weighted_integer_loss(smoothing: float) -> Callable[..., dict[str, jax.Array]]:
    return jax.jit(
        lambda x, y, w: all_reductions(
            integer_loss, x, y, weight=w, ignore_index=-100, label_smoothing=smoothing
        )
    )


@pytest.mark.parametrize("smoothing", [0.0, 0.2], ids=["no_smoothing", "smoothing0.2"])
@pytest.mark.parametrize("case", list(ZERO_WEIGHT_SUMS))
def test_counted_weights_summing_to_zero_match_torch(case: str, smoothing: float) -> None:
    """PyTorch divides by the summed weights: 0/0 = NaN, x/0 = +-inf. Only "no example
    counted" is 0."""
    logits, labels, weight = _zero_weight_inputs(case)
    ours = _weighted_integer_loss(smoothing)(logits, labels, weight)
    _assert_matches_torch(ours, logits, labels, weight, smoothing)


# --------------------------------------------------------------------------- #
# 4. Traced hyperparameters out of range are NaN; concrete ones raise.
# --------------------------------------------------------------------------- #


def _hyper_setup(function: str, dtype: str) -> tuple[tuple[jax.Array, ...], Callable[..., Any]]:
    """(differentiable inputs, call(*inputs, **options)) of one loss with fixed labels."""
    rng = np.random.default_rng(55)
    if function == "linear":
        hidden = jnp.asarray(rng.normal(size=(6, 4)), dtype)
        weight = jnp.asarray(rng.normal(size=(7, 4)), dtype)
        labels = rng.integers(0, 7, size=6)
        return (hidden, weight), lambda h, w, **o: jaxce.linear_cross_entropy(h, w, labels, **o)
    logits = jnp.asarray(rng.normal(size=(5, 7)) * 2, dtype)
    classes = rng.integers(0, 7, size=5)
    if function == "integer_labels":
        return (logits,), lambda z, **o: integer_loss(z, classes, **o)
    if function == "softmax":
        return (logits,), lambda z, **o: jaxce.softmax_cross_entropy(z, one_hot(classes, 7), **o)
    if function == "softmax_focal":
        return (logits,), lambda z, **o: jaxce.softmax_focal_loss(z, one_hot(classes, 7), **o)
    if function == "poly":
        return (logits,), lambda z, **o: jaxce.poly_loss_cross_entropy(z, one_hot(classes, 7), **o)
    if function == "categorical":
        probs = jax.nn.softmax(logits.astype(jnp.float32)).astype(dtype)
        return (probs,), lambda p, **o: jaxce.categorical_cross_entropy(p, one_hot(classes, 7), **o)
    binary = rng.integers(0, 2, size=(5, 7)).astype(np.float64)
    if function == "sigmoid_binary":
        return (logits,), lambda z, **o: jaxce.sigmoid_binary_cross_entropy(z, binary, **o)
    assert function == "sigmoid_focal"
    return (logits,), lambda z, **o: jaxce.sigmoid_focal_loss(z, binary, **o)


NAN = float("nan")
# (function, argument, out-of-range values, in-range values); NaN is out of every range (a
# check written `x < 0 or x >= 1` lets it through).
HYPERPARAMETERS = [
    (function, "label_smoothing", (1.5, -0.1, 1.0, NAN), (0.0, 0.3))
    for function in (
        "integer_labels",
        "softmax",
        "sigmoid_binary",
        "linear",
        "softmax_focal",
        "categorical",
    )
]
HYPERPARAMETERS += [
    (function, "z_loss", (-0.5, -1e-8, NAN), (0.0, 1e-3))
    for function in ("integer_labels", "linear")
]
HYPERPARAMETERS += [("sigmoid_focal", "alpha", (-0.1, 1.5, NAN), (0.0, 1.0))]
HYPERPARAMETERS += [("sigmoid_focal", "gamma", (-0.5, -1e-8, NAN), (0.0, 2.0))]
HYPERPARAMETERS += [("softmax_focal", "gamma", (-0.5, -1e-8, NAN), (0.0, 0.5))]
HYPERPARAMETERS += [("poly", "epsilon", (NAN, float("inf"), -float("inf")), (-1.0, 2.0))]
HYPERPARAMETERS += [("linear", "temperature", (-1.0, 0.0, NAN, float("inf")), (0.5, 2.0))]
BAD_HYPERPARAMETERS = [(f, a, v) for f, a, bad, _ in HYPERPARAMETERS for v in bad]
BAD_IDS = [f"{f}-{a}={v}" for f, a, v in BAD_HYPERPARAMETERS]


# float32 for every argument, and a half dtype, bfloat16 and float16 in turn.
HYPER_CASES = [
    (*case, dtype)
    for i, case in enumerate(HYPERPARAMETERS)
    for dtype in ("float32", ("bfloat16", "float16")[i % 2])
]


@pytest.mark.parametrize(
    ("function", "argument", "bad", "good", "dtype"),
    HYPER_CASES,
    ids=[f"{f}-{a}-{d}" for f, a, _, _, d in HYPER_CASES],
)
def test_traced_hyperparameter_out_of_range_is_nan_and_in_range_is_exact(
    function: str, argument: str, bad: tuple, good: tuple, dtype: str
) -> None:
    """One compiled function, the value an argument: NaN for every reduction when out of
    range; the loss of the same concrete value when in range."""
    inputs, call = _hyper_setup(function, dtype)
    run = jax.jit(
        lambda args, v: {r: call(*args, reduction=r, **{argument: v}) for r in REDUCTIONS}
    )
    for value in bad:
        out = run(inputs, value)
        for reduction, loss in out.items():
            assert np.all(np.isnan(as_f64(loss))), f"{argument}={value}, {reduction}: {loss}"
    for value in good if dtype == "float32" else good[1:]:
        out = run(inputs, value)
        if dtype != "float32":  # the comparison with concrete values is float32's
            assert all(np.all(np.isfinite(as_f64(v))) for v in out.values())
            continue
        concrete_run = jax.jit(
            lambda args, v=value: {r: call(*args, reduction=r, **{argument: v}) for r in REDUCTIONS}
        )
        for reduction, concrete in concrete_run(inputs).items():
            what = f"{argument}={value}, {reduction}"
            assert np.all(np.isfinite(as_f64(out[reduction]))), what
            np.testing.assert_allclose(
                as_f64(out[reduction]), as_f64(concrete), rtol=2e-6, atol=1e-7, err_msg=what
            )


@pytest.mark.parametrize(
    ("function", "argument", "value"),
    [(f, a, bad[0]) for f, a, bad, _ in HYPERPARAMETERS],
    ids=[f"{f}-{a}={bad[0]}" for f, a, bad, _ in HYPERPARAMETERS],
)
def test_checked_names_the_hyperparameter_out_of_range(
    function: str, argument: str, value: float
) -> None:
    inputs, call = _hyper_setup(function, "float32")

    def loss(args, v):
        return call(*args, reduction="mean", **{argument: v})

    # `checked` traces `loss` itself: a concrete array raises the eager ValueError.
    with pytest.raises((ValueError, checkify.JaxRuntimeError), match=f"`{argument}`"):
        jaxce.checked(loss)(inputs, jnp.float32(value))
    # Traced inside a jitted function: only the check can tell.
    with pytest.raises(checkify.JaxRuntimeError, match=f"`{argument}`"):
        jaxce.checked(jax.jit(loss))(inputs, value)


@pytest.mark.parametrize("form", ["python", "numpy", "jax_array", "closed_over_in_jit"])
@pytest.mark.parametrize(("function", "argument", "value"), BAD_HYPERPARAMETERS, ids=BAD_IDS)
def test_concrete_hyperparameter_out_of_range_raises_value_error(
    function: str, argument: str, value: float, form: str
) -> None:
    inputs, call = _hyper_setup(function, "float32")
    concrete: Any = {"numpy": np.float32(value), "jax_array": jnp.float32(value)}.get(form, value)
    with pytest.raises(ValueError, match=f"`{argument}`"):
        if form == "closed_over_in_jit":
            jax.jit(lambda args: call(*args, **{argument: concrete}))(inputs)
        else:
            call(*inputs, **{argument: concrete})


# --------------------------------------------------------------------------- #
# 5. `jaxce.checked` and `jax.jit`, in either order.
# --------------------------------------------------------------------------- #


def _checked_cases() -> dict[str, tuple[Callable[[], Callable[..., Any]], tuple, tuple, str]]:
    """name: (make the function, good arguments, bad arguments, the argument named)."""
    rng = np.random.default_rng(56)
    logits = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    good, bad = jnp.array([0, 4, 2, 1]), jnp.array([0, 9, 2, 1])
    hidden = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    probs = jnp.asarray(rng.uniform(0.1, 0.9, size=(4, 5)), jnp.float32)
    targets = jnp.asarray(one_hot(np.array([0, 4, 2, 1]), 5), jnp.float32)
    derivative = jaxce.derivatives.softmax_cross_entropy_with_integer_labels
    return {
        "integer_labels": (
            lambda: lambda x, y: integer_loss(x, y, reduction="mean"),
            (logits, good),
            (logits, bad),
            "labels",
        ),
        "integer_labels_derivatives": (
            lambda: lambda x, y: derivative(x, y, reduction="mean"),
            (logits, good),
            (logits, bad),
            "labels",
        ),
        "linear": (
            lambda: lambda h, w, y: jaxce.linear_cross_entropy(h, w, y, chunk_size=2),
            (hidden, weight, good),
            (hidden, weight, bad),
            "labels",
        ),
        "binary_cross_entropy_probs": (
            lambda: lambda p, y: jaxce.binary_cross_entropy(p, y, reduction="mean"),
            (probs, targets),
            (probs.at[1, 2].set(1.5), targets),
            "probs",
        ),
        "categorical_probs": (
            lambda: lambda p, y: jaxce.categorical_cross_entropy(p, y, reduction="mean"),
            (probs, targets),
            (probs.at[3, 0].set(-0.2), targets),
            "probs",
        ),
        "kl_divergence_targets": (
            lambda: lambda q, t: jaxce.kl_divergence(q, t, reduction="batchmean"),
            (jax.nn.log_softmax(logits), probs / probs.sum(-1, keepdims=True)),
            (jax.nn.log_softmax(logits), probs.at[2, 1].set(1.5)),
            "targets",
        ),
        "softmax_focal_traced_gamma": (
            lambda: lambda x, g: jaxce.softmax_focal_loss(x, targets, gamma=g, reduction="mean"),
            (logits, 2.0),
            (logits, -1.0),
            "gamma",
        ),
        "traced_label_smoothing": (
            lambda: (
                lambda x, s: jaxce.softmax_cross_entropy(
                    x, targets, label_smoothing=s, reduction="mean"
                )
            ),
            (logits, 0.1),
            (logits, 1.5),
            "label_smoothing",
        ),
    }


CHECKED_CASES = list(_checked_cases())


@functools.cache
def _never_checked(case: str) -> Callable[..., Any]:
    """The jitted function of a case, never given to `jaxce.checked`."""
    return jax.jit(_checked_cases()[case][0]())


@pytest.mark.parametrize("order", ["checked_first", "jit_first"])
@pytest.mark.parametrize("case", CHECKED_CASES)
def test_checked_on_a_jitted_function(case: str, order: str) -> None:
    make, good, bad, argument = _checked_cases()[case]
    step = jax.jit(make())
    fresh = _never_checked(case)  # what `step` must keep returning
    if order == "jit_first":
        step(*bad)
        step(*good)
    with pytest.raises(checkify.JaxRuntimeError, match=f"`{argument}`"):
        jaxce.checked(step)(*bad)
    assert_same_tree(jaxce.checked(step)(*good), fresh(*good))
    # `step` itself still runs, with the same results as a function `checked` never saw.
    assert_same_tree(step(*bad), fresh(*bad))
    assert_same_tree(step(*good), fresh(*good))
    if case != "integer_labels_derivatives":
        assert np.isnan(step(*bad)) and np.isfinite(step(*good))
    with pytest.raises(checkify.JaxRuntimeError, match=f"`{argument}`"):
        jaxce.checked(step)(*bad)


@pytest.mark.parametrize("order", ["checked_first", "helper_first"])
@pytest.mark.parametrize("use", ["value", "value_and_grad"])
def test_checked_function_with_a_jitted_helper_inside(use: str, order: str) -> None:
    rng = np.random.default_rng(57)
    logits = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    good, bad = jnp.array([0, 4, 2, 1]), jnp.array([0, 4, -2, 1])
    helper = jax.jit(lambda x, y: integer_loss(x, y, label_smoothing=0.1))

    def train_step(x, y):
        def objective(z):
            return jnp.mean(helper(z, y)) * 2.0

        return jax.value_and_grad(objective)(x) if use == "value_and_grad" else objective(x)

    if order == "helper_first":
        helper(logits, bad)
        helper(logits, good)
    with pytest.raises(checkify.JaxRuntimeError, match=r"`labels`.*-2"):
        jaxce.checked(train_step)(logits, bad)
    # `checked` compiles `train_step` (once): the same program as `jax.jit` compiles.
    assert_same_tree(jaxce.checked(train_step)(logits, good), jax.jit(train_step)(logits, good))
    fresh = jax.jit(lambda x, y: integer_loss(x, y, label_smoothing=0.1))
    per_example = helper(logits, bad)
    assert_same_tree(per_example, fresh(logits, bad))
    assert np.isnan(per_example[2]) and np.all(np.isfinite(as_f64(per_example)[[0, 1, 3]]))
    assert_same_tree(helper(logits, good), fresh(logits, good))
    with pytest.raises(checkify.JaxRuntimeError, match="`labels`"):
        jaxce.checked(train_step)(logits, bad)


# --------------------------------------------------------------------------- #
# 6. Empty batches.
# --------------------------------------------------------------------------- #


def _integer_labels_of(shape: tuple[int, ...]) -> np.ndarray:
    return np.zeros(shape[:-1], np.int32)


def _dense_labels_of(shape: tuple[int, ...]) -> np.ndarray:
    return np.zeros(shape, np.float32)


# (loss, its derivative, labels for a logits shape, optax's name or None, elementwise)
EMPTY_LOSSES = {
    "softmax_cross_entropy_with_integer_labels": (
        jaxce.softmax_cross_entropy_with_integer_labels,
        jaxce.derivatives.softmax_cross_entropy_with_integer_labels,
        _integer_labels_of,
        "softmax_cross_entropy_with_integer_labels",
        False,
    ),
    "softmax_cross_entropy": (
        jaxce.softmax_cross_entropy,
        jaxce.derivatives.softmax_cross_entropy,
        _dense_labels_of,
        "softmax_cross_entropy",
        False,
    ),
    "categorical_cross_entropy": (
        jaxce.categorical_cross_entropy,
        jaxce.derivatives.categorical_cross_entropy,
        _dense_labels_of,
        None,
        False,
    ),
    "sigmoid_binary_cross_entropy": (
        jaxce.sigmoid_binary_cross_entropy,
        jaxce.derivatives.sigmoid_binary_cross_entropy,
        _dense_labels_of,
        "sigmoid_binary_cross_entropy",
        True,
    ),
    "sigmoid_focal_loss": (
        jaxce.sigmoid_focal_loss,
        jaxce.derivatives.sigmoid_focal_loss,
        _dense_labels_of,
        "sigmoid_focal_loss",
        True,
    ),
    "binary_cross_entropy": (
        jaxce.binary_cross_entropy,
        jaxce.derivatives.binary_cross_entropy,
        _dense_labels_of,
        None,
        True,
    ),
    "softmax_focal_loss": (
        jaxce.softmax_focal_loss,
        jaxce.derivatives.softmax_focal_loss,
        _dense_labels_of,
        None,
        False,
    ),
    "poly_loss_cross_entropy": (
        jaxce.poly_loss_cross_entropy,
        jaxce.derivatives.poly_loss_cross_entropy,
        _dense_labels_of,
        "poly_loss_cross_entropy",
        False,
    ),
    "kl_divergence": (
        jaxce.kl_divergence,
        jaxce.derivatives.kl_divergence,
        _dense_labels_of,
        "kl_divergence",
        False,
    ),
    "kl_divergence_with_log_targets": (
        jaxce.kl_divergence_with_log_targets,
        jaxce.derivatives.kl_divergence_with_log_targets,
        _dense_labels_of,
        "kl_divergence_with_log_targets",
        False,
    ),
}
EMPTY_SHAPES = [((0, 5), "float32", "jit"), ((2, 0, 5), "bfloat16", "eager")]
EMPTY_IDS = [f"{s}-{d}-{m}".replace(" ", "") for s, d, m in EMPTY_SHAPES]


@pytest.mark.parametrize(("shape", "dtype", "mode"), EMPTY_SHAPES, ids=EMPTY_IDS)
@pytest.mark.parametrize("case", list(EMPTY_LOSSES))
def test_empty_batch(case: str, shape: tuple[int, ...], dtype: str, mode: str) -> None:
    """An empty per-example loss (optax's shape), 0 for "sum" and "mean", empty gradients."""
    import optax

    loss, derivative, make_labels, optax_name, elementwise = EMPTY_LOSSES[case]
    labels = make_labels(shape)

    def results(z, y):
        out = {}
        for reduction in REDUCTIONS:

            def total(v, r=reduction):
                return jnp.sum(loss(v, y, reduction=r))

            value = loss(z, y, reduction=reduction)
            if reduction == "sum":  # its gradient is that of "none"
                out[reduction] = (value, *out["none"][1:])
                continue
            out[reduction] = (value, jax.grad(total)(z), derivative(z, y, reduction=reduction))
        return out

    out = maybe_jit(results, mode)(jnp.zeros(shape, dtype), labels)
    for reduction, (value, grad, closed_form) in out.items():
        assert value.dtype == jnp.float32, reduction
        if reduction == "none":
            assert value.shape == (shape if elementwise else shape[:-1])
        else:
            assert value.shape == () and float(value) == 0.0, f"{reduction}: {value}"
        for g in (grad, closed_form):
            assert g.shape == shape and g.dtype == jnp.dtype(dtype), reduction
    if optax_name is not None:
        theirs = getattr(optax.losses, optax_name)(jnp.zeros(shape), labels)
        assert out["none"][0].shape == theirs.shape


@pytest.mark.parametrize(("dtype", "mode"), DTYPE_MODES, ids=DTYPE_MODE_IDS)
@pytest.mark.parametrize("shape", [(0,), (2, 0)], ids=["(0,)", "(2,0)"])
def test_linear_empty_batch(shape: tuple[int, ...], dtype: str, mode: str) -> None:
    hidden = jnp.zeros((*shape, 3), dtype)
    weight = jnp.asarray(np.random.default_rng(58).normal(size=(5, 3)), dtype)
    labels = np.zeros(shape, np.int32)

    def results(h, w, y):
        out = {}
        for reduction in REDUCTIONS:

            def total(a, b, r=reduction):
                return jnp.sum(jaxce.linear_cross_entropy(a, b, y, reduction=r))

            out[reduction] = (
                jaxce.linear_cross_entropy(h, w, y, reduction=reduction),
                jax.grad(total, argnums=(0, 1))(h, w),
                jaxce.derivatives.linear_cross_entropy(h, w, y, reduction=reduction)[:2],
            )
        return out

    out = maybe_jit(results, mode)(hidden, weight, labels)
    for reduction, (value, grads, closed_form) in out.items():
        assert value.shape == (shape if reduction == "none" else ())
        assert np.all(as_f64(value) == 0)
        for g, c, like in zip(grads, closed_form, (hidden, weight), strict=True):
            assert g.shape == c.shape == like.shape and g.dtype == c.dtype == like.dtype
            assert np.all(as_f64(g) == 0) and np.all(as_f64(c) == 0)


# --------------------------------------------------------------------------- #
# Vocabulary-parallel cases, on four host devices (in a subprocess).
# --------------------------------------------------------------------------- #

if os.environ.get(CHILD_FLAG) != "1":
    VOCAB_PARALLEL_TEST = "test_vocab_parallel_cases_on_four_host_devices"

    class FourDeviceRun:
        """``pytest -k vocab_parallel`` on this file, with four host devices, in a subprocess."""

        def __init__(self) -> None:
            env = dict(os.environ)
            env[CHILD_FLAG] = "1"
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {DEVICE_FLAG}".strip()
            command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
            command += ["-k", "vocab_parallel", __file__]
            self.log = tempfile.TemporaryFile(mode="w+")
            self.process = subprocess.Popen(
                command, env=env, stdout=self.log, stderr=subprocess.STDOUT, text=True
            )

        def wait(self, timeout: float) -> tuple[int, str]:
            returncode = self.process.wait(timeout=timeout)
            self.log.seek(0)
            return returncode, self.log.read()

        def stop(self) -> None:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self.log.close()

    @pytest.fixture(scope="module", autouse=True)
    def four_device_run(request: pytest.FixtureRequest):
        """Started with the module's first test, so that it runs beside the others.

        Only when its test is selected, and not under pytest-xdist (where every worker would
        start one): there the test starts it itself.
        """
        selected = any(item.name == VOCAB_PARALLEL_TEST for item in request.session.items)
        run = FourDeviceRun() if selected and "PYTEST_XDIST_WORKER" not in os.environ else None
        yield run
        if run is not None:
            run.stop()

    def test_vocab_parallel_cases_on_four_host_devices(four_device_run) -> None:
        run = four_device_run or FourDeviceRun()
        try:
            returncode, output = run.wait(timeout=300)
        finally:
            run.stop()
        assert returncode == 0, (
            f"4-device cases failed (rerun: {CHILD_FLAG}=1 XLA_FLAGS={DEVICE_FLAG} "
            f"pytest -k vocab_parallel {__file__}):\n{output[-12000:]}"
        )

else:
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    if jax.device_count() != 4:
        raise RuntimeError(
            f"these cases need 4 devices, found {jax.device_count()}: set XLA_FLAGS={DEVICE_FLAG}"
        )

    # "model4": the vocabulary over 4 devices; "data2xmodel2": batch and vocabulary over 2 each.
    MESHES = {"model4": (1, 4), "data2xmodel2": (2, 2)}
    MESH_NAMES = list(MESHES)
    V = 16  # classes; labels below 4 are in shard 0 on both meshes, class 13 is not

    def make_mesh(mesh_name: str) -> tuple[Mesh, str | None]:
        """The ("data", "model") mesh and the batch axis name (None: batch not split)."""
        mesh = Mesh(np.array(jax.devices()).reshape(MESHES[mesh_name]), ("data", "model"))
        return mesh, None if mesh_name == "model4" else "data"

    @functools.cache
    def vocab_parallel(
        mesh_name: str, *, per_class_where: bool = False, **static: Any
    ) -> Callable[..., dict[str, jax.Array]]:
        """(logits, labels, weight, where, traced options) -> {reduction: loss}, jitted.

        One function per mesh and options, shared by the cases: their compiles are shared.
        """
        mesh, batch = make_mesh(mesh_name)

        def body(logits, labels, weight, where, traced):
            return {
                r: jaxce.sharded.softmax_cross_entropy_with_integer_labels(
                    logits,
                    labels,
                    axis_name="model",
                    batch_axis_name=batch,
                    weight=weight,
                    where=where,
                    reduction=r,
                    **static,
                    **traced,
                )
                for r in REDUCTIONS
            }

        mapped = jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(
                P(batch, "model"),
                P(batch),
                P(),
                P(batch, "model") if per_class_where else P(batch),
                P(),
            ),
            out_specs={"none": P(batch), "sum": P(), "mean": P()},
        )

        def call(logits, labels, weight=None, where=None, traced=None):
            return mapped(logits, labels, weight, where, {} if traced is None else traced)

        return jax.jit(call)

    VP_NAN_CASES = [
        (mesh_name, option, dtype)
        for mesh_name, option in [
            ("model4", "plain"),
            ("data2xmodel2", "weight_smoothing_z_loss_ignore_index"),
        ]
        for dtype in DTYPES
    ]

    @pytest.mark.parametrize(
        ("mesh_name", "option", "dtype"),
        VP_NAN_CASES,
        ids=[f"{m}-{o}-{d}" for m, o, d in VP_NAN_CASES],
    )
    def test_vocab_parallel_nan_logit_makes_its_row_nan(
        mesh_name: str, option: str, dtype: str
    ) -> None:
        """Row 1's NaN is in a shard that does not hold its label; row 2's is its label's."""
        rng = np.random.default_rng(60)
        x = rng.normal(size=(4, V)) * 2
        labels = np.array([0, 3, 1, 2])
        x[1, 13] = np.nan
        x[2, labels[2]] = np.nan
        options: dict[str, Any] = {}
        weight = None
        if option != "plain":
            labels[3] = -100
            options = {"ignore_index": -100, "label_smoothing": 0.1, "z_loss": 1e-3}
            weight = rng.uniform(0.2, 2.0, V).astype(np.float32)
        logits = jnp.asarray(x, dtype)
        out = vocab_parallel(mesh_name, **options)(logits, labels, weight)
        per_example = as_f64(out["none"])
        assert np.all(np.isnan(per_example[[1, 2]])), per_example
        assert np.isnan(out["sum"]) and np.isnan(out["mean"])
        keep = np.array([True, False, False, True])
        alone = integer_loss(logits[keep], labels[keep], weight=weight, **options)
        assert np.all(np.isfinite(per_example[keep]))
        np.testing.assert_allclose(per_example[keep], as_f64(alone), rtol=2e-6, atol=1e-6)

    @pytest.mark.parametrize(
        ("mesh_name", "dtype"),
        [("model4", "float32"), ("data2xmodel2", "bfloat16"), ("data2xmodel2", "float16")],
    )
    def test_vocab_parallel_nan_excluded_by_where_changes_nothing(
        mesh_name: str, dtype: str
    ) -> None:
        rng = np.random.default_rng(61)
        x = rng.normal(size=(4, V))
        labels = np.array([0, 3, 1, 2])
        where = np.ones((4, V), bool)
        where[:, 13] = False
        where[2, 7] = False
        loss = vocab_parallel(mesh_name, per_class_where=True, label_smoothing=0.1)

        def mean_and_grad(z):
            return jax.value_and_grad(lambda v: loss(v, labels, None, where)["mean"])(z)

        run = jax.jit(mean_and_grad)
        value, grad = run(jnp.asarray(np.where(where, x, np.nan), dtype))
        expected, expected_grad = run(jnp.asarray(np.where(where, x, 2.5), dtype))
        np.testing.assert_allclose(value, expected, rtol=1e-6)
        assert np.all(np.isfinite(as_f64(grad))) and np.all(as_f64(grad)[~where] == 0)
        np.testing.assert_allclose(as_f64(grad), as_f64(expected_grad), rtol=RTOL[dtype])

    @pytest.mark.parametrize("label_dtype", ["int8", "uint16", "uint32"])
    def test_vocab_parallel_label_dtype_gives_the_int32_result(label_dtype: str) -> None:
        rng = np.random.default_rng(62)
        logits = jnp.asarray(rng.normal(size=(4, V)), jnp.float32)
        values = np.array([0, 15, 7, 9])
        if np.issubdtype(np.dtype(label_dtype), np.signedinteger):
            values[2] = -100
        loss = vocab_parallel("data2xmodel2", ignore_index=-100, label_smoothing=0.1, z_loss=1e-3)

        def results(y):
            return loss(logits, y), jax.grad(lambda z: loss(z, y)["mean"])(logits)

        assert_same_tree(
            results(jnp.asarray(values.astype(label_dtype))),
            results(jnp.asarray(values, jnp.int32)),
            f"{label_dtype} vs int32",
        )

    @pytest.mark.parametrize(
        "case", ["int16_of_40000_classes", "uint8_156_of_200", "int8_negative"]
    )
    @pytest.mark.parametrize("mesh_name", MESH_NAMES)
    def test_vocab_parallel_narrow_label_dtypes(mesh_name: str, case: str) -> None:
        rng = np.random.default_rng(63)
        classes = {"int16_of_40000_classes": 40000, "uint8_156_of_200": 200}.get(case, V)
        labels, label_dtype = {
            "int16_of_40000_classes": ([5, 30000], "int16"),
            "uint8_156_of_200": ([156, 3], "uint8"),
            "int8_negative": ([2, -3], "int8"),
        }[case]
        logits = rng.normal(size=(2, classes)).astype(np.float32)
        out = vocab_parallel(mesh_name, ignore_index=-100)(
            jnp.asarray(logits), jnp.asarray(np.array(labels, label_dtype))
        )
        if case == "int8_negative":
            assert np.isnan(out["none"][1]) and np.isnan(out["sum"]) and np.isnan(out["mean"])
            reference = reference_loss(logits[:1], np.array([2]))
            np.testing.assert_allclose(out["none"][0], reference[0], rtol=1e-5)
            return
        reference = reference_loss(logits, np.array(labels))
        np.testing.assert_allclose(out["none"], reference, rtol=1e-5)
        np.testing.assert_allclose(out["mean"], reference.mean(), rtol=1e-5)

    VP_MEAN_CASES = {
        "all_ignored": [-100] * 4,
        "all_ignored_weighted": [-100] * 4,
        "every_row_excluded_by_where": [0, 3, 1, 2],
        "all_out_of_range": [V, 17, 40, V],
        "all_negative": [-1, -2, -3, -4],
        "invalid_among_ignored": [-100, -100, V + 1, -100],
    }

    VP_MEAN = [
        (case, mesh_name)
        for case in ("all_ignored", "all_out_of_range")
        for mesh_name in MESH_NAMES
    ]
    VP_MEAN += [
        ("all_ignored_weighted", "data2xmodel2"),
        ("every_row_excluded_by_where", "model4"),
        ("all_negative", "data2xmodel2"),
        ("invalid_among_ignored", "model4"),
    ]

    @pytest.mark.parametrize(("case", "mesh_name"), VP_MEAN, ids=[f"{c}-{m}" for c, m in VP_MEAN])
    def test_vocab_parallel_mean_rule(mesh_name: str, case: str) -> None:
        rng = np.random.default_rng(64)
        logits = jnp.asarray(rng.normal(size=(4, V)), jnp.float32)
        labels = np.array(VP_MEAN_CASES[case])
        weight = rng.uniform(0.2, 2.0, V).astype(np.float32) if "weighted" in case else None
        where = np.zeros(4, bool) if case == "every_row_excluded_by_where" else None
        loss = vocab_parallel(mesh_name, ignore_index=-100, label_smoothing=0.1, z_loss=1e-3)
        out = loss(logits, labels, weight, where)
        if case.startswith(("all_ignored", "every_row")):
            assert float(out["mean"]) == 0.0 and float(out["sum"]) == 0.0
            assert np.all(as_f64(out["none"]) == 0)
            for reduction in ("sum", "mean"):
                grad = jax.grad(lambda z, r=reduction: loss(z, labels, weight, where)[r])(logits)
                assert np.all(as_f64(grad) == 0), reduction
        else:
            assert np.isnan(out["sum"]) and np.isnan(out["mean"])
            invalid = labels != -100
            assert np.all(np.isnan(as_f64(out["none"])[invalid]))
            assert np.all(as_f64(out["none"])[~invalid] == 0)

    @pytest.mark.parametrize("smoothing", [0.0, 0.2], ids=["no_smoothing", "smoothing0.2"])
    @pytest.mark.parametrize("case", list(ZERO_WEIGHT_SUMS))
    @pytest.mark.parametrize("mesh_name", MESH_NAMES)
    def test_vocab_parallel_counted_weights_summing_to_zero_match_torch(
        mesh_name: str, case: str, smoothing: float
    ) -> None:
        logits, labels, weight = _zero_weight_inputs(case)
        # Four classes: one per device on "model4", two on "data2xmodel2".
        ours = vocab_parallel(mesh_name, ignore_index=-100, label_smoothing=smoothing)(
            jnp.asarray(logits), labels, weight
        )
        _assert_matches_torch(ours, logits, labels, weight, smoothing)

    @pytest.mark.parametrize(
        ("mesh_name", "argument", "bad", "good"),
        [
            ("model4", "label_smoothing", (1.5, -0.1, 1.0), 0.3),
            ("data2xmodel2", "z_loss", (-0.5,), 1e-3),
        ],
        ids=["model4-label_smoothing", "data2xmodel2-z_loss"],
    )
    def test_vocab_parallel_traced_hyperparameter_out_of_range(
        mesh_name: str, argument: str, bad: tuple, good: float
    ) -> None:
        logits = jnp.asarray(np.random.default_rng(65).normal(size=(4, V)), jnp.float32)
        labels = np.array([0, 3, 1, 2])
        loss = vocab_parallel(mesh_name)
        for value in bad:
            out = loss(logits, labels, traced={argument: jnp.float32(value)})
            for reduction in REDUCTIONS:
                assert np.all(np.isnan(as_f64(out[reduction]))), (value, reduction)
            with pytest.raises(ValueError, match=f"`{argument}`"):
                vocab_parallel(mesh_name, **{argument: value})(logits, labels)
            with pytest.raises(checkify.JaxRuntimeError, match=f"`{argument}`"):
                jaxce.checked(lambda x, v: loss(x, labels, traced={argument: v})["mean"])(
                    logits, jnp.float32(value)
                )
        traced = loss(logits, labels, traced={argument: jnp.float32(good)})
        concrete = vocab_parallel(mesh_name, **{argument: good})(logits, labels)
        for reduction in REDUCTIONS:
            np.testing.assert_allclose(traced[reduction], concrete[reduction], rtol=2e-6)

    @pytest.mark.parametrize("mesh_name", MESH_NAMES)
    def test_vocab_parallel_checked_with_invalid_labels(mesh_name: str) -> None:
        logits = jnp.zeros((4, V), jnp.float32)
        loss = vocab_parallel(mesh_name)
        bad, good = np.array([0, V, 1, 2]), np.array([0, 3, 1, 2])
        with pytest.raises(checkify.JaxRuntimeError, match="`labels`"):
            jaxce.checked(loss)(logits, bad)
        assert np.isnan(loss(logits, bad)["mean"])
        np.testing.assert_allclose(loss(logits, good)["mean"], np.log(V), rtol=1e-6)

    @pytest.mark.parametrize(
        ("mesh_name", "dtype"), [("model4", "float16"), ("data2xmodel2", "bfloat16")]
    )
    def test_vocab_parallel_linear_nan_hidden_row_and_labels(mesh_name: str, dtype: str) -> None:
        rng = np.random.default_rng(66)
        mesh, batch = make_mesh(mesh_name)
        hidden = rng.normal(size=(4, 3))
        weight = jnp.asarray(rng.normal(size=(V, 3)), dtype)
        labels = np.array([0, 3, 1, 2])

        def body(h, w, y):
            return {
                r: jaxce.sharded.linear_cross_entropy(
                    h,
                    w,
                    y,
                    axis_name="model",
                    batch_axis_name=batch,
                    reduction=r,
                    ignore_index=-100,
                )
                for r in REDUCTIONS
            }

        loss = jax.jit(
            jax.shard_map(
                body,
                mesh=mesh,
                in_specs=(P(batch), P("model"), P(batch)),
                out_specs={"none": P(batch), "sum": P(), "mean": P()},
            )
        )
        h = jnp.asarray(hidden, dtype)
        with_nan = hidden.copy()
        with_nan[1, 0] = np.nan
        out = loss(jnp.asarray(with_nan, dtype), weight, labels)
        assert np.isnan(out["none"][1]) and np.isnan(out["sum"]) and np.isnan(out["mean"])
        single = jaxce.linear_cross_entropy(h, weight, labels, reduction="none")
        np.testing.assert_allclose(
            as_f64(out["none"])[[0, 2, 3]], as_f64(single)[[0, 2, 3]], rtol=2e-6, atol=1e-6
        )
        ignored = loss(h, weight, np.full(4, -100))
        assert float(ignored["mean"]) == 0.0 and float(ignored["sum"]) == 0.0
        invalid = loss(h, weight, np.array([V, -1, V, 99]))
        assert np.isnan(invalid["mean"]) and np.isnan(invalid["sum"])
        for label_dtype in ("int8", "uint8", "int16"):
            same = loss(h, weight, labels.astype(label_dtype))
            assert_same_tree(same, loss(h, weight, labels), label_dtype)
