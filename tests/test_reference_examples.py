"""The worked examples of a question-and-answer walk-through of cross-entropy, computed by jaxce.

The first document's "Example Output" block is wrong (0.3285... and 1.1819...);
the values below are the ones its code and its 3-sample walk-through give.
Its derivative formulas are per sample: the gradient of the *mean* loss
carries a further 1/n, and through a softmax head the gradient with respect
to the logits is ``softmax(z) - y`` (times 1/n for the mean).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxce

# (id, labels, predicted probabilities, mean binary cross-entropy)
BINARY_EXAMPLES = [
    ("numpy-example", [1.0, 0.0, 1.0, 0.0], [0.9, 0.1, 0.8, 0.2], 0.164252033486018),
    ("3-sample-walkthrough", [1.0, 0.0, 1.0], [0.9, 0.1, 0.7], 0.18913199175146167),
]
CATEGORICAL_LABELS = np.eye(3)
CATEGORICAL_PROBS = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5]])
CATEGORICAL_MEAN = 0.4243218919376292
WRONG_DOCUMENTED_OUTPUT = {"binary": 0.3285061001454424, "categorical": 1.181944395487012}

# float64 is checked to a few ulps; float32 to its precision.
PRECISIONS = {"float64": (np.float64, 1e-14), "float32": (np.float32, 1e-6)}


@pytest.fixture(params=list(PRECISIONS), ids=list(PRECISIONS))
def precision(request):
    dtype, rtol = PRECISIONS[request.param]
    with jax.enable_x64(dtype == np.float64):
        yield dtype, rtol


def _close(actual, expected, rtol, dtype):
    actual = np.asarray(actual)
    assert actual.dtype == dtype
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=0)


@pytest.mark.parametrize(
    ("labels", "probs", "expected"),
    [example[1:] for example in BINARY_EXAMPLES],
    ids=[example[0] for example in BINARY_EXAMPLES],
)
def test_binary_examples(labels, probs, expected, precision):
    dtype, rtol = precision
    y, p = np.array(labels, dtype), np.array(probs, dtype)
    # The documents' formula, in plain NumPy, agrees with the stated value.
    _close(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)), expected, rtol, dtype)

    _close(jaxce.binary_cross_entropy(p, y, reduction="mean"), expected, rtol, dtype)
    logits = np.log(p) - np.log1p(-p)  # sigmoid(logits) = p
    _close(jaxce.sigmoid_binary_cross_entropy(logits, y, reduction="mean"), expected, rtol, dtype)


def test_categorical_example(precision):
    dtype, rtol = precision
    y, p = CATEGORICAL_LABELS.astype(dtype), CATEGORICAL_PROBS.astype(dtype)
    _close(-np.mean(np.sum(y * np.log(p), axis=1)), CATEGORICAL_MEAN, rtol, dtype)

    _close(jaxce.categorical_cross_entropy(p, y, reduction="mean"), CATEGORICAL_MEAN, rtol, dtype)
    logits = np.log(p)  # softmax(log p) = p, since each row sums to 1
    _close(jaxce.softmax_cross_entropy(logits, y, reduction="mean"), CATEGORICAL_MEAN, rtol, dtype)
    _close(
        jaxce.softmax_cross_entropy_with_integer_labels(
            logits, np.argmax(y, axis=1), reduction="mean"
        ),
        CATEGORICAL_MEAN,
        rtol,
        dtype,
    )


def test_documented_example_output_is_not_reproduced():
    """The document's printed output is wrong; jaxce must not agree with it."""
    _, y, p, _ = BINARY_EXAMPLES[0]
    binary = jaxce.binary_cross_entropy(np.array(p), np.array(y), reduction="mean")
    categorical = jaxce.categorical_cross_entropy(
        CATEGORICAL_PROBS, CATEGORICAL_LABELS, reduction="mean"
    )
    assert abs(float(binary) - WRONG_DOCUMENTED_OUTPUT["binary"]) > 0.1
    assert abs(float(categorical) - WRONG_DOCUMENTED_OUTPUT["categorical"]) > 0.1


@pytest.mark.parametrize(
    ("labels", "probs"),
    [example[1:3] for example in BINARY_EXAMPLES],
    ids=[example[0] for example in BINARY_EXAMPLES],
)
def test_binary_gradient_is_per_sample_derivative_over_n(labels, probs, precision):
    dtype, rtol = precision
    y, p = np.array(labels, dtype), np.array(probs, dtype)
    n = len(y)
    per_sample = -y / p + (1 - y) / (1 - p)  # the document's formula

    def mean_loss(p):
        return jaxce.binary_cross_entropy(p, y, reduction="mean")

    def summed_loss(p):
        return jnp.sum(jaxce.binary_cross_entropy(p, y))

    _close(jax.grad(mean_loss)(p), per_sample / n, rtol, dtype)
    _close(jax.grad(summed_loss)(p), per_sample, rtol, dtype)
    _close(n * jax.grad(mean_loss)(p), per_sample, rtol, dtype)


def test_categorical_gradient_is_per_sample_derivative_over_n(precision):
    dtype, rtol = precision
    y, p = CATEGORICAL_LABELS.astype(dtype), CATEGORICAL_PROBS.astype(dtype)
    n = len(y)
    per_sample = -y / p  # the document's formula

    grad = jax.grad(lambda p: jaxce.categorical_cross_entropy(p, y, reduction="mean"))(p)
    _close(grad, per_sample / n, rtol, dtype)


@pytest.mark.parametrize("logits_kind", ["log-probs", "random"])
def test_softmax_head_gradient_is_softmax_minus_labels_over_n(logits_kind, precision):
    """Through the softmax, d(mean CE)/dz = (softmax(z) - y) / n, not -y/p."""
    dtype, rtol = precision
    y = CATEGORICAL_LABELS.astype(dtype)
    n = len(y)
    if logits_kind == "log-probs":
        logits = np.log(CATEGORICAL_PROBS).astype(dtype) + dtype(3.0)
    else:
        logits = np.random.default_rng(0).normal(size=(n, 3)).astype(dtype)
    z = logits.astype(np.float64)
    softmax = np.exp(z - z.max(1, keepdims=True))
    softmax /= softmax.sum(1, keepdims=True)
    expected = (softmax - y) / n
    # Gradients near zero are judged relative to the largest entry.
    atol = rtol * np.max(np.abs(expected))

    grads = [
        jax.grad(lambda z: jaxce.softmax_cross_entropy(z, y, reduction="mean"))(logits),
        jax.grad(
            lambda z: jaxce.softmax_cross_entropy_with_integer_labels(
                z, np.argmax(y, axis=1), reduction="mean"
            )
        )(logits),
    ]
    for grad in grads:
        assert grad.dtype == dtype
        np.testing.assert_allclose(grad, expected, rtol=rtol, atol=atol)
