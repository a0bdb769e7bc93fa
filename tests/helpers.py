"""Float64 NumPy references and the table of public losses the tests sweep.

The references share no code with jaxce: they are the formulas of the
docstrings written directly in NumPy, evaluated in float64.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

import jaxce


def np_logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def np_log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return x - np.expand_dims(np_logsumexp(x, axis), axis)


def np_softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(x, 0.0)


def np_integer_ce(
    x: np.ndarray,
    y: np.ndarray,
    *,
    weight: np.ndarray | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "none",
) -> np.ndarray:
    """PyTorch's cross_entropy (class indices) plus PaLM's z-loss, in float64 loops."""
    n, c = x.shape
    w = np.ones(c) if weight is None else weight
    losses, weights, z_terms, counted = [], [], [], []
    for i in range(n):
        if ignore_index is not None and y[i] == ignore_index:
            losses.append(0.0)
            weights.append(0.0)
            z_terms.append(0.0)
            counted.append(False)
            continue
        logp = np_log_softmax(x[i])
        nll = -w[y[i]] * logp[y[i]]
        smooth = -np.sum(w * logp)
        losses.append((1 - label_smoothing) * nll + label_smoothing / c * smooth)
        weights.append(w[y[i]])
        z_terms.append(z_loss * np_logsumexp(x[i]) ** 2)
        counted.append(True)
    losses_a, z_a = np.array(losses), np.array(z_terms)
    if reduction == "none":
        return losses_a + z_a
    if reduction == "sum":
        return np.sum(losses_a) + np.sum(z_a)
    den = np.sum(weights)
    count = np.sum(counted)
    ce = np.sum(losses_a) / den if den else 0.0
    return np.asarray(ce + (np.sum(z_a) / count if count else 0.0))


@dataclasses.dataclass(frozen=True)
class LossCase:
    """One public loss with inputs generated for a given batch shape and dtype."""

    name: str
    fn: Callable[..., Any]
    make_inputs: Callable[[np.random.Generator, int, int], tuple[np.ndarray, np.ndarray]]

    def __str__(self) -> str:
        return self.name


def _logits_int(rng: np.random.Generator, n: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.normal(size=(n, c)) * 2, rng.integers(0, c, size=(n,))


def _logits_soft(rng: np.random.Generator, n: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.normal(size=(n, c)) * 2, rng.dirichlet(np.ones(c), size=n)


def _logits_binary(rng: np.random.Generator, n: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.normal(size=(n, c)) * 2, rng.integers(0, 2, size=(n, c)).astype(float)


def _probs_binary(rng: np.random.Generator, n: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.uniform(0.05, 0.95, size=(n, c)), rng.integers(0, 2, size=(n, c)).astype(float)


def _probs_categorical(rng: np.random.Generator, n: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.dirichlet(np.ones(c) * 2, size=n), np.eye(c)[rng.integers(0, c, size=n)]


LOSSES = [
    LossCase(
        "softmax_cross_entropy_with_integer_labels",
        jaxce.softmax_cross_entropy_with_integer_labels,
        _logits_int,
    ),
    LossCase("softmax_cross_entropy", jaxce.softmax_cross_entropy, _logits_soft),
    LossCase("sigmoid_binary_cross_entropy", jaxce.sigmoid_binary_cross_entropy, _logits_binary),
    LossCase("sigmoid_focal_loss", jaxce.sigmoid_focal_loss, _logits_binary),
    LossCase("binary_cross_entropy", jaxce.binary_cross_entropy, _probs_binary),
    LossCase("categorical_cross_entropy", jaxce.categorical_cross_entropy, _probs_categorical),
]
