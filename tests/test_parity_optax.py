"""jaxce is a drop-in for ``optax.losses`` and ``jax.nn``: same values and gradients.

Every name jaxce shares with optax (and the primitives it shares with
``jax.nn``) is called with the same arguments under ``jax.jit`` in float32 and
compared, value and gradient, to about 1e-6. The last tests pin the
differences that are deliberate: each asserts what optax does and what jaxce
does instead.
"""

from __future__ import annotations

import inspect
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import compile_as_users_do

import jaxce

TOLERANCE = {"rtol": 1e-6, "atol": 1e-6}


def _rng(*case: object) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(case).encode()))


def _value_and_vjp(fn, x: np.ndarray, cotangent_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``jit(fn)(x)`` and ``jit(grad)`` of ``sum(v * fn(x))`` over its finite outputs.

    A random cotangent ``v`` checks every output's gradient, not only their sum.
    """
    shape = jax.eval_shape(fn, x).shape
    cotangent = np.random.default_rng(cotangent_seed).normal(size=shape).astype(np.float32)

    def scalar(x):
        out = fn(x)
        return jnp.sum(jnp.where(jnp.isfinite(out), cotangent * out, 0))

    value, grad = jax.jit(lambda x: (fn(x), jax.grad(scalar)(x)))(x)
    return np.asarray(value), np.asarray(grad)


def _assert_same(ours, theirs):
    value, grad = ours
    assert value.dtype == theirs[0].dtype == np.float32
    np.testing.assert_allclose(value, theirs[0], **TOLERANCE, err_msg="value")
    np.testing.assert_allclose(grad, theirs[1], **TOLERANCE, err_msg="gradient")
    assert np.all(np.isfinite(grad))


def _logits(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return (rng.normal(size=shape) * 3).astype(np.float32)


def _mask_keeping(rng: np.random.Generator, shape, keep: np.ndarray | None = None) -> np.ndarray:
    """A random class mask; entries in ``keep`` stay included."""
    mask = rng.random(shape) < 0.7
    return mask if keep is None else mask | keep


# (id, logits shape, axis) of the class layouts optax accepts.
LAYOUTS = [
    ("2d-axis-1", (8, 10), -1),
    ("3d-axis1", (4, 10, 3), 1),
    ("3d-axis(1,2)", (4, 5, 3), (1, 2)),
    ("3d-axis(0,2)", (5, 4, 3), (0, 2)),
    # A tuple is flattened in the order given, not sorted (optax's rule).
    ("3d-axis(2,0)", (5, 4, 3), (2, 0)),
    ("4d-axis(3,1,0)", (3, 2, 4, 5), (3, 1, 0)),
    ("3d-axis(-1,-3)", (3, 2, 4), (-1, -3)),
]


def _batch_shape(shape, axis):
    axes = {a % len(shape) for a in ((axis,) if isinstance(axis, int) else axis)}
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def _one_hot_like_logits(labels, shape, axis):
    """One-hot ``[..., C]`` labels laid out like ``logits`` of ``shape`` with class axes ``axis``."""
    axes = tuple(a % len(shape) for a in ((axis,) if isinstance(axis, int) else axis))
    class_shape = tuple(shape[a] for a in axes)
    one_hot = np.eye(int(np.prod(class_shape)), dtype=bool)[labels].reshape(
        *labels.shape, *class_shape
    )
    batch_axes = [i for i in range(len(shape)) if i not in axes]
    return np.moveaxis(one_hot, range(len(shape)), batch_axes + list(axes))


WHERE_KINDS = [None, "logits-shape", "batch-shape"]


@pytest.mark.parametrize("where_kind", WHERE_KINDS, ids=["no-where", "where-logits", "where-batch"])
@pytest.mark.parametrize(("layout", "shape", "axis"), LAYOUTS, ids=[lay[0] for lay in LAYOUTS])
def test_integer_labels_match_optax(layout, shape, axis, where_kind):
    rng = _rng("integer", layout, where_kind)
    logits = _logits(rng, shape)
    batch_shape = _batch_shape(shape, axis)
    num_classes = int(np.prod(shape)) // int(np.prod(batch_shape))
    labels = rng.integers(0, num_classes, size=batch_shape)
    where = None
    if where_kind == "logits-shape":
        # Exclude classes but never the label (see the deliberate differences).
        where = _mask_keeping(rng, shape, _one_hot_like_logits(labels, shape, axis))
    elif where_kind == "batch-shape":
        where = rng.random(batch_shape) < 0.6
    where = None if where is None else jnp.asarray(where)
    kwargs = {"axis": axis, "where": where}

    positional = (axis, where)  # optax's positional order (logits, labels, axis, where)
    _assert_same(
        _value_and_vjp(
            lambda x: jaxce.softmax_cross_entropy_with_integer_labels(x, labels, *positional),
            logits,
        ),
        _value_and_vjp(
            lambda x: optax.losses.softmax_cross_entropy_with_integer_labels(
                x, labels, *positional
            ),
            logits,
        ),
    )
    _assert_same(
        _value_and_vjp(
            lambda x: jaxce.softmax_cross_entropy_with_integer_labels(x, labels, **kwargs), logits
        ),
        _value_and_vjp(
            lambda x: optax.losses.softmax_cross_entropy_with_integer_labels(x, labels, **kwargs),
            logits,
        ),
    )


@pytest.mark.parametrize("where_kind", WHERE_KINDS, ids=["no-where", "where-logits", "where-batch"])
@pytest.mark.parametrize(("layout", "shape", "axis"), LAYOUTS, ids=[lay[0] for lay in LAYOUTS])
def test_probability_labels_match_optax(layout, shape, axis, where_kind):
    rng = _rng("probabilities", layout, where_kind)
    logits = _logits(rng, shape)
    labels = rng.uniform(0, 1, size=shape).astype(np.float32)
    labels /= labels.sum(axis=axis, keepdims=True)
    where = None
    if where_kind == "logits-shape":
        where = _mask_keeping(rng, shape)
        where.reshape(-1)[0] = False
        labels = np.where(where, labels, 0)  # no label mass on excluded classes
    elif where_kind == "batch-shape":
        where = rng.random(_batch_shape(shape, axis)) < 0.6
    where = None if where is None else jnp.asarray(where)
    kwargs = {"axis": axis, "where": where}

    _assert_same(
        _value_and_vjp(lambda x: jaxce.softmax_cross_entropy(x, labels, axis, where), logits),
        _value_and_vjp(
            lambda x: optax.losses.softmax_cross_entropy(x, labels, axis, where), logits
        ),
    )
    _assert_same(
        _value_and_vjp(lambda x: jaxce.softmax_cross_entropy(x, labels, **kwargs), logits),
        _value_and_vjp(lambda x: optax.losses.softmax_cross_entropy(x, labels, **kwargs), logits),
    )


@pytest.mark.parametrize("with_where", [False, True], ids=["no-where", "where-logits"])
def test_probability_labels_over_every_axis_match_optax(with_where):
    """optax's ``axis=None``: the whole array is one distribution; the loss is a scalar."""
    rng = _rng("axis-none", with_where)
    logits = _logits(rng, (3, 4, 2))
    labels = rng.uniform(0, 1, size=logits.shape).astype(np.float32)
    where = jnp.asarray(rng.random(logits.shape) < 0.7) if with_where else None
    labels = labels / labels.sum() if where is None else np.where(where, labels, 0) / labels.sum()
    kwargs = {"axis": None, "where": where}

    ours = _value_and_vjp(lambda x: jaxce.softmax_cross_entropy(x, labels, **kwargs), logits)
    assert ours[0].shape == ()
    _assert_same(
        ours,
        _value_and_vjp(lambda x: optax.losses.softmax_cross_entropy(x, labels, **kwargs), logits),
    )


@pytest.mark.parametrize(
    "labels_shape", [(6, 4), (4,), ()], ids=["full-labels", "broadcast-row", "scalar-array"]
)
def test_probability_labels_broadcast_like_optax(labels_shape):
    rng = _rng("broadcast-soft", labels_shape)
    logits = _logits(rng, (6, 4))
    labels = rng.uniform(0, 1, size=labels_shape).astype(np.float32)
    # optax broadcasts by NumPy rules; so does jaxce when rank promotion is allowed (the default).
    with jax.numpy_rank_promotion("allow"):
        _assert_same(
            _value_and_vjp(lambda x: jaxce.softmax_cross_entropy(x, labels), logits),
            _value_and_vjp(lambda x: optax.losses.softmax_cross_entropy(x, labels), logits),
        )


ELEMENTWISE = ["sigmoid_binary_cross_entropy", "sigmoid_focal_loss"]
BINARY_LABELS = {
    "hard": lambda rng: rng.integers(0, 2, size=(6, 4)).astype(np.float32),
    "soft": lambda rng: rng.uniform(0, 1, size=(6, 4)).astype(np.float32),
    "broadcast-row": lambda rng: rng.integers(0, 2, size=(4,)).astype(np.float32),
    "python-scalar": lambda rng: 1.0,
    "python-int-scalar": lambda rng: 0,
}


@pytest.mark.parametrize("label_kind", BINARY_LABELS)
@pytest.mark.parametrize("name", ELEMENTWISE)
def test_elementwise_losses_match_optax(name, label_kind):
    rng = _rng("elementwise", name, label_kind)
    logits = _logits(rng, (6, 4))
    logits[0, :2] = (-40.0, 40.0)
    labels = BINARY_LABELS[label_kind](rng)
    ours, theirs = getattr(jaxce, name), getattr(optax.losses, name)
    with jax.numpy_rank_promotion("allow"):
        _assert_same(
            _value_and_vjp(lambda x: ours(x, labels), logits),
            _value_and_vjp(lambda x: theirs(x, labels), logits),
        )


@pytest.mark.parametrize(
    ("alpha", "gamma"), [(None, 2.0), (0.25, 2.0), (0.25, 0.0), (0.8, 1.5)], ids=str
)
def test_focal_loss_options_match_optax(alpha, gamma):
    rng = _rng("focal", alpha, gamma)
    logits = _logits(rng, (6, 4))
    labels = rng.integers(0, 2, size=(6, 4)).astype(np.float32)
    _assert_same(
        _value_and_vjp(
            lambda x: jaxce.sigmoid_focal_loss(x, labels, alpha=alpha, gamma=gamma), logits
        ),
        _value_and_vjp(
            lambda x: optax.losses.sigmoid_focal_loss(x, labels, alpha=alpha, gamma=gamma), logits
        ),
    )


@pytest.mark.parametrize("where_kind", WHERE_KINDS, ids=["no-where", "where-logits", "where-batch"])
@pytest.mark.parametrize(
    ("layout", "shape", "axis"), LAYOUTS[:4], ids=[lay[0] for lay in LAYOUTS[:4]]
)
def test_poly_loss_matches_optax(layout, shape, axis, where_kind):
    """Positional ``(logits, labels, epsilon, axis, where)``; epsilon 2 or -1 (the paper's).
    optax's Poly-1 takes no batch-shaped ``where`` (its softmax does not broadcast it): there
    it gets the same rows as a mask of the logits' shape."""
    rng = _rng("poly", layout, where_kind)
    epsilon = float(rng.choice([2.0, -1.0]))
    logits = _logits(rng, shape)
    labels = rng.uniform(0, 1, size=shape).astype(np.float32)
    labels /= labels.sum(axis=axis, keepdims=True)
    ours_where = theirs_where = None
    if where_kind == "logits-shape":
        ours_where = theirs_where = jnp.asarray(_mask_keeping(rng, shape))
    elif where_kind == "batch-shape":
        rows = rng.random(_batch_shape(shape, axis)) < 0.6
        full = rows
        for class_axis in sorted(a % len(shape) for a in np.atleast_1d(axis)):
            full = np.expand_dims(full, class_axis)
        ours_where, theirs_where = jnp.asarray(rows), jnp.asarray(np.broadcast_to(full, shape))
    _assert_same(
        _value_and_vjp(
            lambda x: jaxce.poly_loss_cross_entropy(x, labels, epsilon, axis, ours_where), logits
        ),
        _value_and_vjp(
            lambda x: optax.losses.poly_loss_cross_entropy(
                x, labels, epsilon=epsilon, axis=axis, where=theirs_where
            ),
            logits,
        ),
    )


DIVERGENCES = ["kl_divergence", "kl_divergence_with_log_targets"]


@pytest.mark.parametrize("where_kind", [None, "logits-shape"], ids=["no-where", "where"])
@pytest.mark.parametrize(
    ("layout", "shape", "axis"), LAYOUTS[:4], ids=[lay[0] for lay in LAYOUTS[:4]]
)
@pytest.mark.parametrize("name", DIVERGENCES)
def test_divergences_match_optax(name, layout, shape, axis, where_kind):
    """Positional ``(log_predictions, targets, axis, where)`` as optax's, strictly positive
    targets (optax's NaN at 0 log 0 is a deliberate difference, below)."""
    rng = _rng("divergence", name, layout, where_kind)
    log_predictions = np.asarray(jax.nn.log_softmax(_logits(rng, shape), axis=axis))
    targets = rng.uniform(0.05, 1, size=shape).astype(np.float32)
    targets /= targets.sum(axis=axis, keepdims=True)
    if name == "kl_divergence_with_log_targets":
        targets = np.log(targets)
    where = None if where_kind is None else jnp.asarray(_mask_keeping(rng, shape))
    ours, theirs = getattr(jaxce, name), getattr(optax.losses, name)
    _assert_same(
        _value_and_vjp(lambda x: ours(x, targets, axis, where), log_predictions),
        _value_and_vjp(lambda x: theirs(x, targets, axis, where), log_predictions),
    )


PRIMITIVE_CASES = [
    ("log_sigmoid", {}),
    ("logsumexp", {"axis": -1}),
    ("logsumexp", {"axis": 0}),
    ("logsumexp", {"axis": (0, 2)}),
    ("logsumexp", {"axis": -1, "where": "mask"}),
    ("log_softmax", {}),
    ("log_softmax", {"axis": 1}),
    ("log_softmax", {"axis": (1, 2)}),
    ("log_softmax", {"axis": -1, "where": "mask"}),
]


@pytest.mark.parametrize(
    ("name", "kwargs"),
    PRIMITIVE_CASES,
    ids=[f"{name}-{'-'.join(f'{k}{v}' for k, v in kw.items())}" for name, kw in PRIMITIVE_CASES],
)
def test_primitives_match_jax_nn(name, kwargs):
    rng = _rng("primitive", name, kwargs)
    x = _logits(rng, (3, 4, 5))
    x[0, 0, :2] = (-200.0, 200.0)
    if kwargs.get("where") == "mask":
        mask = rng.random(x.shape) < 0.6
        mask[1, 1] = False  # one row with every entry excluded
        kwargs = {**kwargs, "where": jnp.asarray(mask)}
    ours, theirs = getattr(jaxce, name), getattr(jax.nn, name)
    _assert_same(
        _value_and_vjp(lambda x: ours(x, **kwargs), x),
        _value_and_vjp(lambda x: theirs(x, **kwargs), x),
    )


@pytest.mark.parametrize("name", ["log_sigmoid", "log1m_sigmoid"])
def test_primitives_accept_python_scalars(name):
    ours = getattr(jaxce, name)
    theirs = {"log_sigmoid": jax.nn.log_sigmoid, "log1m_sigmoid": lambda x: jax.nn.log_sigmoid(-x)}
    for x in (2.0, -3.0, 0):
        np.testing.assert_allclose(ours(float(x)), theirs[name](float(x)), **TOLERANCE)
        np.testing.assert_allclose(
            jax.grad(ours)(float(x)), jax.grad(theirs[name])(float(x)), **TOLERANCE
        )


SHARED_NAMES = [
    "sigmoid_binary_cross_entropy",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "sigmoid_focal_loss",
    "poly_loss_cross_entropy",
    "kl_divergence",
    "kl_divergence_with_log_targets",
]


@pytest.mark.parametrize("name", SHARED_NAMES)
def test_signature_is_a_superset_of_optax(name):
    """Same positional pair (``logits, labels``, ``log_predictions, targets``); every optax
    keyword exists with its default."""
    ours = inspect.signature(getattr(jaxce, name)).parameters
    theirs = inspect.signature(getattr(optax.losses, name)).parameters
    assert list(ours)[:2] == list(theirs)[:2]
    for parameter in list(theirs.values())[2:]:
        assert parameter.name in ours, parameter.name
        assert ours[parameter.name].default == parameter.default, parameter.name


def test_swapping_the_module_in_a_training_step_changes_nothing():
    """The same user code, written against ``optax.losses``, runs unchanged on ``jaxce``."""
    rng = _rng("drop-in")
    params = {"w": jnp.asarray(rng.normal(size=(5, 7)), jnp.float32)}
    features = jnp.asarray(rng.normal(size=(9, 2, 5)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 7, size=(9, 2)))
    where = jnp.asarray(rng.random((9, 2)) < 0.8)
    soft = jax.nn.one_hot(labels, 7)
    binary = (soft > 0).astype(jnp.float32)

    def step(losses):
        def objective(params):
            logits = features @ params["w"]
            return (
                losses.softmax_cross_entropy_with_integer_labels(logits, labels, where=where).mean()
                + losses.softmax_cross_entropy(logits, soft, axis=-1, where=where).mean()
                + losses.sigmoid_binary_cross_entropy(logits, binary).mean()
                + losses.sigmoid_focal_loss(logits, binary, alpha=0.25).mean()
            )

        value, grads = jax.jit(jax.value_and_grad(objective))(params)
        updates, _ = optax.sgd(0.1).update(grads, optax.sgd(0.1).init(params))
        return value, optax.apply_updates(params, updates)["w"]

    ours, theirs = step(jaxce), step(optax.losses)
    np.testing.assert_allclose(ours[0], theirs[0], **TOLERANCE)
    np.testing.assert_allclose(ours[1], theirs[1], **TOLERANCE)


# Deliberate differences: each test asserts optax's behaviour and jaxce's.


def test_large_logits_integer_labels_keep_float32_precision():
    """optax computes ``logsumexp(x) - x_y``: at logits near 1e4 float32 cancellation
    loses ~1e-4; jaxce works in the max-shifted frame and stays within 1e-6 of float64."""
    rng = _rng("large-logits")
    logits = (1e4 + rng.normal(size=(64, 10))).astype(np.float32)
    labels = rng.integers(0, 10, size=64)
    x = logits.astype(np.float64)
    exact = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    exact = exact - np.take_along_axis(x, labels[:, None], -1)[:, 0]

    theirs = jax.jit(optax.losses.softmax_cross_entropy_with_integer_labels)(logits, labels)
    ours = jax.jit(jaxce.softmax_cross_entropy_with_integer_labels)(logits, labels)
    assert np.max(np.abs(theirs - exact)) > 5e-5
    np.testing.assert_allclose(ours, exact, rtol=0, atol=1e-6)


def test_negative_label_is_nan_where_optax_wraps_to_the_last_class():
    rng = _rng("negative-label")
    logits = _logits(rng, (2, 5))
    wrapped = optax.losses.softmax_cross_entropy_with_integer_labels(logits, np.array([-1, 2]))
    last = optax.losses.softmax_cross_entropy_with_integer_labels(logits, np.array([4, 2]))
    np.testing.assert_array_equal(wrapped, last)

    ours = jaxce.softmax_cross_entropy_with_integer_labels(logits, np.array([-1, 2]))
    assert np.isnan(ours[0])
    np.testing.assert_allclose(ours[1], last[1], **TOLERANCE)


def test_minus_inf_logit_with_zero_label_is_finite_where_optax_gives_nan():
    logits = np.array([[-np.inf, 1.0, 2.0], [0.5, -1.0, 2.0]], np.float32)
    labels = np.array([[0.0, 0.3, 0.7], [0.2, 0.2, 0.6]], np.float32)
    theirs = optax.losses.softmax_cross_entropy(logits, labels)
    assert np.isnan(theirs[0])

    ours, grad = _value_and_vjp(lambda x: jaxce.softmax_cross_entropy(x, labels), logits)
    without_class = optax.losses.softmax_cross_entropy(logits[:1, 1:], labels[:1, 1:])
    np.testing.assert_allclose(ours[0], without_class[0], **TOLERANCE)
    np.testing.assert_allclose(ours[1], theirs[1], **TOLERANCE)
    assert grad[0, 0] == 0.0 and np.all(np.isfinite(grad))


def test_excluded_label_class_costs_inf_where_optax_ignores_the_exclusion():
    """``where`` gives an excluded class probability 0, so -log p_y = inf; optax
    still subtracts the excluded label's logit and returns a finite number."""
    logits = np.array([[1.0, 2.0, 3.0]], np.float32)
    where = np.array([[True, False, True]])
    labels = np.array([1])
    theirs = optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels, where=where)
    assert np.isfinite(theirs[0])
    ours = jaxce.softmax_cross_entropy_with_integer_labels(logits, labels, where=where)
    assert ours[0] == np.inf


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_divergence_zero_target_on_minus_inf_log_prediction_is_zero_where_optax_gives_nan():
    """0 log 0 = 0 in jaxce, whatever the log prediction; optax computes 0 * (0 - (-inf))."""
    log_predictions = np.array([[-np.inf, -0.2, -1.8], [-1.0, -0.7, -1.7]], np.float32)
    targets = np.array([[0.0, 0.8, 0.2], [0.3, 0.5, 0.2]], np.float32)
    with np.errstate(divide="ignore"):
        log_targets = np.log(targets)
    for name, second in (
        ("kl_divergence", targets),
        ("kl_divergence_with_log_targets", log_targets),
    ):
        theirs = getattr(optax.losses, name)(log_predictions, second)
        assert np.isnan(theirs[0]), name
        ours, grad = _value_and_vjp(
            lambda x, n=name, t=second: getattr(jaxce, n)(x, t), log_predictions
        )
        without = getattr(optax.losses, name)(log_predictions[:1, 1:], second[:1, 1:])
        np.testing.assert_allclose(ours[0], without[0], **TOLERANCE)
        np.testing.assert_allclose(ours[1], theirs[1], **TOLERANCE)
        assert grad[0, 0] == 0.0 and np.all(np.isfinite(grad)), name


def test_poly_zero_label_on_minus_inf_logit_is_finite_where_optax_gives_nan():
    logits = np.array([[-np.inf, 1.0, 2.0], [0.5, -1.0, 2.0]], np.float32)
    labels = np.array([[0.0, 0.3, 0.7], [0.2, 0.2, 0.6]], np.float32)
    theirs = optax.losses.poly_loss_cross_entropy(logits, labels)
    assert np.isnan(theirs[0])
    ours, grad = _value_and_vjp(lambda x: jaxce.poly_loss_cross_entropy(x, labels), logits)
    without = optax.losses.poly_loss_cross_entropy(logits[:1, 1:], labels[:1, 1:])
    np.testing.assert_allclose(ours[0], without[0], **TOLERANCE)
    np.testing.assert_allclose(ours[1], theirs[1], **TOLERANCE)
    assert grad[0, 0] == 0.0 and np.all(np.isfinite(grad))


# --- what XLA:CPU compiles: no more work than optax's at the classifier shapes -------------


def _logit_passes_and_fusions(fn, shape: tuple[int, int]) -> tuple[list[str], int]:
    """The entry's instructions that read the ``[N, C]`` logits, and its number of fusions.

    Each instruction that reads the logits is one pass over them (a fusion
    reads its operand once); the fusions count XLA's kernels. Read from the
    optimised HLO, so this holds whatever the machine's speed.
    """
    logits = jax.ShapeDtypeStruct(shape, jnp.float32)
    labels = jax.ShapeDtypeStruct(shape[:1], jnp.int32)
    text = compile_as_users_do(jax.jit(fn).lower(logits, labels)).as_text()
    entry = text[text.index("\nENTRY") :]
    dims = ",".join(map(str, shape))
    parameter = re.search(r"(%\S+) = f32\[" + dims + r"\]\{1,0\} parameter\(0\)", entry)
    assert parameter is not None, entry
    reads = [
        line.split("=")[0].strip()
        for line in entry.splitlines()
        if re.search(re.escape(parameter.group(1)) + r"[,)]", line) and "parameter(0)" not in line
    ]
    return reads, len(re.findall(r"= \S+ fusion\(", entry))


@pytest.mark.parametrize("shape", [(8192, 10), (4096, 100), (1024, 1000), (256, 32000)])
@pytest.mark.parametrize("mode", ["forward", "value_and_grad"])
def test_plain_mean_compiles_to_no_more_passes_than_optax(shape, mode):
    """The plain mean pays for no option: as many passes over the logits as optax's.

    At the shapes ``python -m benchmarks`` times against optax. jaxce's
    options (``ignore_index``, ``where``, class weights, smoothing, z-loss) and
    its NaN for invalid labels must cost nothing when unused: the passes over
    the logits are the same count as optax's (max, sum of exponentials, the
    label's logit; and the gradient), and at most one more small fusion.
    """

    def ours(x, y):
        return jaxce.softmax_cross_entropy_with_integer_labels(x, y, reduction="mean")

    def theirs(x, y):
        return optax.losses.softmax_cross_entropy_with_integer_labels(x, y).mean()

    if mode == "value_and_grad":
        ours, theirs = jax.value_and_grad(ours), jax.value_and_grad(theirs)
    our_reads, our_fusions = _logit_passes_and_fusions(ours, shape)
    their_reads, their_fusions = _logit_passes_and_fusions(theirs, shape)
    assert len(our_reads) <= len(their_reads), (our_reads, their_reads)
    assert our_fusions <= their_fusions + 1, (our_fusions, their_fusions)
