"""Parity with ``torch.nn.functional`` in float64: values and gradients, every option.

Each test builds seeded random inputs, evaluates jaxce and PyTorch (or, where
PyTorch has no equivalent, a float64 NumPy formula) and compares the value and
the gradient with respect to the first argument to 1e-9. For
``reduction="none"`` the gradient is that of the summed losses.
"""

from __future__ import annotations

import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import REDUCTIONS

import jaxce

TOLERANCE = {"rtol": 1e-9, "atol": 1e-9}
NUM_CLASSES = 5


@pytest.fixture(autouse=True)
def _float64():
    with jax.enable_x64(True):
        yield


def _rng(*case: object) -> np.random.Generator:
    """A generator seeded by the test case, so every case draws different values."""
    return np.random.default_rng(zlib.crc32(repr(case).encode()))


def _jax_value_and_grad(fn, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = jnp.asarray(x)
    value = fn(x)
    grad = jax.grad(lambda x: jnp.sum(fn(x)))(x)
    assert value.dtype == jnp.float64 and grad.dtype == jnp.float64
    return np.asarray(value), np.asarray(grad)


def _torch_value_and_grad(fn, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x_t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    value = fn(x_t)
    value.sum().backward()
    assert x_t.grad is not None
    return value.detach().numpy(), x_t.grad.numpy()


def _tensor(x: np.ndarray | None) -> torch.Tensor | None:
    return None if x is None else torch.tensor(x)


def _assert_parity(ours: tuple[np.ndarray, np.ndarray], theirs: tuple[np.ndarray, np.ndarray]):
    np.testing.assert_allclose(ours[0], theirs[0], **TOLERANCE, err_msg="value")
    np.testing.assert_allclose(ours[1], theirs[1], **TOLERANCE, err_msg="gradient")


# Logits layouts: torch puts the classes on axis 1 ([N, C] or [N, C, d1]); jaxce
# then takes `axis=1` (for [N, C], axis=1 is also axis=-1).
LAYOUTS = {"NC": (7, NUM_CLASSES), "NCd": (4, NUM_CLASSES, 3)}


def _class_weight(rng: np.random.Generator, kind: str | None) -> np.ndarray | None:
    """Positive class weights, or ("signed") weights of both signs: PyTorch computes those."""
    return _weights(rng, kind, NUM_CLASSES, 0.2, 2.0)


def _weights(rng, kind, size, low, high) -> np.ndarray | None:
    if kind is None:
        return None
    if kind == "signed":
        weights = rng.uniform(low, high, size=size)
        return np.where(rng.random(size) < 0.4, -weights, weights)
    return rng.uniform(low, high, size=size)


def _integer_labels(
    rng: np.random.Generator, batch_shape: tuple[int, ...], ignore_index: int | None
) -> np.ndarray:
    """Random class indices with about a third of the examples ignored (but not all)."""
    labels = rng.integers(0, NUM_CLASSES, size=batch_shape)
    flat = labels.reshape(-1)
    if ignore_index is not None:
        flat[rng.random(flat.size) < 0.3] = ignore_index
        flat[0] = ignore_index
        flat[1] = (ignore_index + 1) % NUM_CLASSES if ignore_index >= 0 else 3
    return labels


INTEGER_CASES = list(
    itertools.product(
        LAYOUTS, (None, "weight", "signed"), (None, -100, 2), (0.0, 0.1, 0.35), REDUCTIONS
    )
)


@pytest.mark.parametrize(
    ("layout", "weight_kind", "ignore_index", "label_smoothing", "reduction"),
    INTEGER_CASES,
    ids=[
        f"{lay}-{w or 'unweighted'}-ignore{ii}-smooth{ls}-{red}"
        for lay, w, ii, ls, red in INTEGER_CASES
    ],
)
def test_integer_labels_match_torch_cross_entropy(
    layout, weight_kind, ignore_index, label_smoothing, reduction
):
    rng = _rng(layout, weight_kind, ignore_index, label_smoothing, reduction)
    shape = LAYOUTS[layout]
    logits = rng.normal(size=shape) * 3
    batch_shape = (shape[0], *shape[2:])
    labels = _integer_labels(rng, batch_shape, ignore_index)
    weight = _class_weight(rng, weight_kind)

    ours = _jax_value_and_grad(
        lambda x: jaxce.softmax_cross_entropy_with_integer_labels(
            x,
            labels,
            axis=1,
            weight=weight,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            reduction=reduction,
        ),
        logits,
    )
    theirs = _torch_value_and_grad(
        lambda x: F.cross_entropy(
            x,
            torch.tensor(labels),
            weight=_tensor(weight),
            ignore_index=-100 if ignore_index is None else ignore_index,
            label_smoothing=label_smoothing,
            reduction=reduction,
        ),
        logits,
    )
    _assert_parity(ours, theirs)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1], ids=["plain", "smoothed"])
@pytest.mark.parametrize("weight_kind", [None, "weight"], ids=["unweighted", "weighted"])
def test_all_ignored_batch_mean_is_zero_where_torch_gives_nan(weight_kind, label_smoothing):
    """A deliberate difference: PyTorch's mean over no example is NaN, jaxce's is 0."""
    rng = _rng("all-ignored", weight_kind, label_smoothing)
    logits = rng.normal(size=(4, NUM_CLASSES))
    labels = np.full((4,), -100)
    weight = _class_weight(rng, weight_kind)
    options = {"weight": weight, "label_smoothing": label_smoothing}

    def ours(x, reduction):
        return jaxce.softmax_cross_entropy_with_integer_labels(
            x, labels, ignore_index=-100, reduction=reduction, **options
        )

    def theirs(x, reduction):
        return F.cross_entropy(
            x,
            torch.tensor(labels),
            weight=_tensor(weight),
            ignore_index=-100,
            label_smoothing=label_smoothing,
            reduction=reduction,
        )

    torch_mean = _torch_value_and_grad(lambda x: theirs(x, "mean"), logits)
    assert np.isnan(torch_mean[0])
    value, grad = _jax_value_and_grad(lambda x: ours(x, "mean"), logits)
    assert value == 0.0
    np.testing.assert_array_equal(grad, np.zeros_like(logits))
    for reduction in ("none", "sum"):
        _assert_parity(
            _jax_value_and_grad(lambda x, r=reduction: ours(x, r), logits),
            _torch_value_and_grad(lambda x, r=reduction: theirs(x, r), logits),
        )


def _probability_targets(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Soft targets along axis 1 with some exact zeros and one one-hot example."""
    targets = rng.dirichlet(np.ones(NUM_CLASSES), size=(shape[0], *shape[2:]))
    targets = np.moveaxis(targets, -1, 1)
    targets[0, :2] = 0.0
    targets[0] /= targets[0].sum(axis=0)
    targets[1] = 0.0
    targets[1, 3] = 1.0
    return targets


PROBABILITY_CASES = list(
    itertools.product(LAYOUTS, (None, "weight", "signed"), (0.0, 0.1, 0.35), REDUCTIONS)
)


@pytest.mark.parametrize(
    ("layout", "weight_kind", "label_smoothing", "reduction"),
    PROBABILITY_CASES,
    ids=[f"{lay}-{w or 'unweighted'}-smooth{ls}-{red}" for lay, w, ls, red in PROBABILITY_CASES],
)
def test_probability_targets_match_torch_cross_entropy(
    layout, weight_kind, label_smoothing, reduction
):
    rng = _rng("probabilities", layout, weight_kind, label_smoothing, reduction)
    shape = LAYOUTS[layout]
    logits = rng.normal(size=shape) * 3
    targets = _probability_targets(rng, shape)
    weight = _class_weight(rng, weight_kind)

    ours = _jax_value_and_grad(
        lambda x: jaxce.softmax_cross_entropy(
            x,
            targets,
            axis=1,
            weight=weight,
            label_smoothing=label_smoothing,
            reduction=reduction,
        ),
        logits,
    )
    theirs = _torch_value_and_grad(
        lambda x: F.cross_entropy(
            x,
            torch.tensor(targets),
            weight=_tensor(weight),
            label_smoothing=label_smoothing,
            reduction=reduction,
        ),
        logits,
    )
    _assert_parity(ours, theirs)


BINARY_SHAPE = (6, 4)


def _binary_logits(rng: np.random.Generator) -> np.ndarray:
    logits = rng.normal(size=BINARY_SHAPE) * 3
    logits[0, :2] = (-60.0, 60.0)  # far in both tails
    return logits


def _binary_labels(rng: np.random.Generator, kind: str) -> np.ndarray:
    if kind == "hard":
        return rng.integers(0, 2, size=BINARY_SHAPE).astype(np.float64)
    return rng.uniform(0.0, 1.0, size=BINARY_SHAPE)


BINARY_CASES = list(
    itertools.product(
        ("hard", "soft"), (None, "weight", "signed"), (None, "pos_weight", "signed"), REDUCTIONS
    )
)


@pytest.mark.parametrize(
    ("label_kind", "weight_kind", "pos_weight_kind", "reduction"),
    BINARY_CASES,
    ids=[
        f"{lk}-{w or 'unweighted'}-{pw or 'no_pos_weight'}-{red}" for lk, w, pw, red in BINARY_CASES
    ],
)
def test_sigmoid_binary_matches_torch_bce_with_logits(
    label_kind, weight_kind, pos_weight_kind, reduction
):
    rng = _rng("sigmoid", label_kind, weight_kind, pos_weight_kind, reduction)
    logits = _binary_logits(rng)
    labels = _binary_labels(rng, label_kind)
    weight = _weights(rng, weight_kind, BINARY_SHAPE, 0.0, 2.0)
    pos_weight = _weights(rng, pos_weight_kind, BINARY_SHAPE[-1], 0.2, 3.0)

    ours = _jax_value_and_grad(
        lambda x: jaxce.sigmoid_binary_cross_entropy(
            x, labels, weight=weight, pos_weight=pos_weight, reduction=reduction
        ),
        logits,
    )
    theirs = _torch_value_and_grad(
        lambda x: F.binary_cross_entropy_with_logits(
            x,
            torch.tensor(labels),
            weight=_tensor(weight),
            pos_weight=_tensor(pos_weight),
            reduction=reduction,
        ),
        logits,
    )
    _assert_parity(ours, theirs)


def _np_keras_smoothed_bce(x, y, weight, pos_weight, eps, reduction):
    """Float64 NumPy loss and gradient of BCE with Keras' smoothed labels."""
    y = y * (1 - eps) + 0.5 * eps
    sigmoid = 1 / (1 + np.exp(-x))
    log_sigmoid = -np.logaddexp(0.0, -x)
    log_one_minus_sigmoid = -np.logaddexp(0.0, x)
    loss = -weight * (pos_weight * y * log_sigmoid + (1 - y) * log_one_minus_sigmoid)
    grad = weight * (-pos_weight * y * (1 - sigmoid) + (1 - y) * sigmoid)
    if reduction == "none":
        return loss, grad
    if reduction == "sum":
        return loss.sum(), grad
    return loss.mean(), grad / loss.size


SMOOTHED_CASES = list(itertools.product((0.1, 0.35), (None, "pos_weight"), REDUCTIONS))


@pytest.mark.parametrize(
    ("label_smoothing", "pos_weight_kind", "reduction"),
    SMOOTHED_CASES,
    ids=[f"smooth{ls}-{pw or 'no_pos_weight'}-{red}" for ls, pw, red in SMOOTHED_CASES],
)
def test_sigmoid_binary_keras_label_smoothing_matches_formula(
    label_smoothing, pos_weight_kind, reduction
):
    rng = _rng("keras", label_smoothing, pos_weight_kind, reduction)
    logits = _binary_logits(rng)
    labels = _binary_labels(rng, "hard")
    weight = rng.uniform(0.0, 2.0, size=BINARY_SHAPE)
    pos_weight = None if pos_weight_kind is None else rng.uniform(0.2, 3.0, size=BINARY_SHAPE[-1])

    ours = _jax_value_and_grad(
        lambda x: jaxce.sigmoid_binary_cross_entropy(
            x,
            labels,
            weight=weight,
            pos_weight=pos_weight,
            label_smoothing=label_smoothing,
            reduction=reduction,
        ),
        logits,
    )
    expected = _np_keras_smoothed_bce(
        logits,
        labels,
        weight,
        1.0 if pos_weight is None else pos_weight,
        label_smoothing,
        reduction,
    )
    _assert_parity(ours, expected)


def _edge_probabilities(rng: np.random.Generator) -> np.ndarray:
    """Probabilities with exact 0 and 1, values below e^-100, and interior values."""
    probs = rng.uniform(0.02, 0.98, size=BINARY_SHAPE)
    probs[0] = (0.0, 1.0, 1e-60, 0.0)
    probs[1] = (1.0, 0.0, 1e-60, 1.0)
    return probs


def _interior(probs: np.ndarray) -> np.ndarray:
    return (probs > 1e-3) & (probs < 1 - 1e-3)


BCE_CASES = list(itertools.product(("hard", "soft"), (None, "weight", "signed"), REDUCTIONS))


@pytest.mark.parametrize(
    ("label_kind", "weight_kind", "reduction"),
    BCE_CASES,
    ids=[f"{lk}-{w or 'unweighted'}-{red}" for lk, w, red in BCE_CASES],
)
def test_binary_cross_entropy_matches_torch_with_log_clamp(label_kind, weight_kind, reduction):
    """Values match everywhere (the -100 clamp included); gradients away from 0 and 1.

    At p = 0 or 1 PyTorch's gradient divides by max(p (1 - p), 1e-12) while
    jaxce's clamped log has gradient 0 below the clamp, so the edges differ there.
    """
    rng = _rng("bce", label_kind, weight_kind, reduction)
    probs = _edge_probabilities(rng)
    labels = _binary_labels(rng, label_kind)
    labels[0] = (1.0, 0.0, 1.0, 0.0)  # clamp hit: -log(0) and -log(1 - 1)
    labels[1] = (1.0, 0.0, 0.0, 0.0)  # no clamp: the log of the zero term is unused
    weight = _weights(rng, weight_kind, BINARY_SHAPE, 0.0, 2.0)

    ours = _jax_value_and_grad(
        lambda p: jaxce.binary_cross_entropy(p, labels, weight=weight, reduction=reduction), probs
    )
    theirs = _torch_value_and_grad(
        lambda p: F.binary_cross_entropy(
            p, torch.tensor(labels), weight=_tensor(weight), reduction=reduction
        ),
        probs,
    )
    np.testing.assert_allclose(ours[0], theirs[0], **TOLERANCE, err_msg="value")
    assert np.all(np.isfinite(ours[1]))
    interior = _interior(probs)
    np.testing.assert_allclose(ours[1][interior], theirs[1][interior], **TOLERANCE)


def _torch_categorical(probs, targets, weight, reduction):
    """``-sum_c w_c y_c max(log p_c, -100)`` along axis 1; mean over examples."""
    w = torch.ones(NUM_CLASSES, dtype=torch.float64) if weight is None else torch.tensor(weight)
    w = w.reshape(1, NUM_CLASSES, *([1] * (probs.ndim - 2)))
    loss = -(torch.tensor(targets) * w * torch.log(probs).clamp(min=-100)).sum(dim=1)
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()


def _categorical_inputs(rng, shape, label_kind):
    probs = rng.dirichlet(np.ones(NUM_CLASSES), size=(shape[0], *shape[2:]))
    probs = np.moveaxis(probs, -1, 1)
    probs[0, :2] = 0.0  # p = 0 on the label (clamp at -100) and off it
    probs[0, 2:] /= probs[0, 2:].sum(axis=0)
    if label_kind == "onehot":
        index = rng.integers(0, NUM_CLASSES, size=(shape[0], *shape[2:]))
        index[0] = 0
        targets = np.moveaxis(np.eye(NUM_CLASSES)[index], -1, 1)
    else:
        targets = _probability_targets(rng, shape)
        targets[0] = 0.0
        targets[0, 0] = 0.5
        targets[0, 2] = 0.5
    return probs, targets


CATEGORICAL_CASES = list(
    itertools.product(LAYOUTS, ("onehot", "soft"), (None, "weight", "signed"), REDUCTIONS)
)


@pytest.mark.parametrize(
    ("layout", "label_kind", "weight_kind", "reduction"),
    CATEGORICAL_CASES,
    ids=[f"{lay}-{lk}-{w or 'unweighted'}-{red}" for lay, lk, w, red in CATEGORICAL_CASES],
)
def test_categorical_cross_entropy_matches_clamped_nll(layout, label_kind, weight_kind, reduction):
    rng = _rng("categorical", layout, label_kind, weight_kind, reduction)
    shape = LAYOUTS[layout]
    probs, targets = _categorical_inputs(rng, shape, label_kind)
    weight = _class_weight(rng, weight_kind)

    ours = _jax_value_and_grad(
        lambda p: jaxce.categorical_cross_entropy(
            p, targets, axis=1, weight=weight, reduction=reduction
        ),
        probs,
    )
    theirs = _torch_value_and_grad(
        lambda p: _torch_categorical(p, targets, weight, reduction), probs
    )
    np.testing.assert_allclose(ours[0], theirs[0], **TOLERANCE, err_msg="value")
    assert np.all(np.isfinite(ours[1]))
    interior = _interior(probs)
    np.testing.assert_allclose(ours[1][interior], theirs[1][interior], **TOLERANCE)

    if label_kind == "onehot" and (reduction != "mean" or weight is None):
        # The same loss through PyTorch's own nll_loss (whose weighted mean
        # divides by the summed weights, not by the number of examples).
        nll = F.nll_loss(
            torch.log(torch.tensor(probs)).clamp(min=-100),
            torch.tensor(np.argmax(targets, axis=1)),
            weight=_tensor(weight),
            reduction=reduction,
        )
        np.testing.assert_allclose(ours[0], nll.numpy(), **TOLERANCE)


def _np_z_loss(logits, counted, z_loss, reduction):
    """Float64 NumPy ``z * logsumexp(x)**2`` per counted example and its gradient."""
    row_max = logits.max(axis=-1, keepdims=True)
    exp = np.exp(logits - row_max)
    lse = row_max[:, 0] + np.log(exp.sum(axis=-1))
    softmax = exp / exp.sum(axis=-1, keepdims=True)
    value = np.where(counted, z_loss * lse**2, 0.0)
    grad = np.where(counted[:, None], 2 * z_loss * lse[:, None] * softmax, 0.0)
    if reduction == "none":
        return value, grad
    if reduction == "sum":
        return value.sum(), grad
    count = counted.sum()
    return value.sum() / count, grad / count


Z_LOSS_CASES = list(itertools.product((None, "weight"), (None, -100), (0.0, 0.1), REDUCTIONS))


@pytest.mark.parametrize(
    ("weight_kind", "ignore_index", "label_smoothing", "reduction"),
    Z_LOSS_CASES,
    ids=[f"{w or 'unweighted'}-ignore{ii}-smooth{ls}-{red}" for w, ii, ls, red in Z_LOSS_CASES],
)
def test_z_loss_is_unweighted_square_of_logsumexp(
    weight_kind, ignore_index, label_smoothing, reduction
):
    """Total = torch's cross-entropy + z * logsumexp**2 averaged over counted examples."""
    rng = _rng("z_loss", weight_kind, ignore_index, label_smoothing, reduction)
    z_loss = 0.3
    logits = rng.normal(size=(8, NUM_CLASSES)) * 3 + 2
    labels = _integer_labels(rng, (8,), ignore_index)
    weight = _class_weight(rng, weight_kind)

    ours = _jax_value_and_grad(
        lambda x: jaxce.softmax_cross_entropy_with_integer_labels(
            x,
            labels,
            weight=weight,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            reduction=reduction,
        ),
        logits,
    )
    cross_entropy = _torch_value_and_grad(
        lambda x: F.cross_entropy(
            x,
            torch.tensor(labels),
            weight=_tensor(weight),
            ignore_index=-100,
            label_smoothing=label_smoothing,
            reduction=reduction,
        ),
        logits,
    )
    counted = labels != -100
    z_value, z_grad = _np_z_loss(logits, counted, z_loss, reduction)
    _assert_parity(ours, (cross_entropy[0] + z_value, cross_entropy[1] + z_grad))


KL_REDUCTIONS = ["none", "sum", "mean", "batchmean"]
# Log-predictions laid out as PyTorch's examples: [N, C] and [N, T, C] (the classes last).
KL_LAYOUTS = {"NC": (7, NUM_CLASSES), "NTC": (4, 3, NUM_CLASSES)}


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")
@pytest.mark.parametrize("log_target", [False, True], ids=["targets", "log_targets"])
@pytest.mark.parametrize("layout", KL_LAYOUTS)
@pytest.mark.parametrize("reduction", KL_REDUCTIONS)
def test_kl_divergence_matches_torch_kl_div(reduction, layout, log_target):
    """``F.kl_div(log_q, t, reduction, log_target)``: PyTorch's "none" is elementwise (summed
    here over the class axis, jaxce's "none"); "sum" and "batchmean" (the total over
    ``shape[0]``) are jaxce's; PyTorch's elementwise "mean" is jaxce's per-example "mean"
    divided by the number of classes. Values and gradients w.r.t. the log-predictions."""
    rng = _rng("kl_div", reduction, layout, log_target)
    shape = KL_LAYOUTS[layout]
    log_q = rng.normal(size=shape) - 2  # any floats, as both take them
    targets = rng.dirichlet(np.ones(NUM_CLASSES), size=shape[:-1])
    if not log_target:
        targets[0, ..., 1] = 0.0  # 0 log 0 = 0 on a finite log-prediction, in both
    second = np.log(targets) if log_target else targets
    name = "kl_divergence_with_log_targets" if log_target else "kl_divergence"
    ours = _jax_value_and_grad(
        lambda x: getattr(jaxce, name)(x, second, reduction=reduction), log_q
    )
    theirs = _torch_value_and_grad(
        lambda x: F.kl_div(x, torch.tensor(second), reduction=reduction, log_target=log_target),
        log_q,
    )
    if reduction == "none":
        # The gradient of the summed elementwise losses is that of the summed per-example ones.
        theirs = (theirs[0].sum(-1), theirs[1])
    if reduction == "mean":
        ours = (ours[0] / NUM_CLASSES, ours[1] / NUM_CLASSES)
        if layout == "NC":  # for 2-D inputs jaxce's "mean" is PyTorch's "batchmean"
            batchmean = _torch_value_and_grad(
                lambda x: F.kl_div(x, torch.tensor(second), reduction="batchmean",
                                   log_target=log_target),
                log_q,
            )  # fmt: skip
            _assert_parity((ours[0] * NUM_CLASSES, ours[1] * NUM_CLASSES), batchmean)
    _assert_parity(ours, theirs)
