"""Reductions with PyTorch's denominators and a NaN-free empty mean."""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp

Reduction = Literal["none", "sum", "mean"]
REDUCTIONS: tuple[Reduction, ...] = get_args(Reduction)


def safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """``numerator / denominator``, and 0 (with zero gradients) where the denominator is 0.

    PyTorch returns NaN for a mean over nothing; jaxce returns 0 on purpose so
    that a batch whose tokens are all ignored does not poison a training run.
    """
    nonzero = denominator != 0
    return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1), 0)


def reduce(
    loss: jax.Array,
    reduction: Reduction,
    *,
    denominator: jax.Array | None = None,
) -> jax.Array:
    """Applies ``reduction`` to per-example ``loss``.

    ``denominator`` is what ``"mean"`` divides by; it defaults to the number of
    elements of ``loss``.
    """
    if reduction == "none":
        return loss
    total = jnp.sum(loss)
    if reduction == "sum":
        return total
    if denominator is None:
        denominator = jnp.asarray(loss.size, loss.dtype)
    return safe_divide(total, denominator.astype(loss.dtype))


def reduce_elements(loss: jax.Array, mask: jax.Array | None, reduction: Reduction) -> jax.Array:
    """Reduces elementwise ``loss``: excluded elements are 0; ``"mean"`` divides by the included ones."""
    if mask is not None:
        loss = jnp.where(mask, loss, 0)
    return reduce(loss, reduction, denominator=element_count(mask, loss.shape, loss.dtype))


def reduce_examples(loss: jax.Array, mask: jax.Array | None, reduction: Reduction) -> jax.Array:
    """Reduces per-example ``loss`` of rows masked by ``[..., num_classes]`` ``mask``.

    ``"mean"`` counts the examples with at least one included class.
    """
    return reduce(loss, reduction, denominator=example_count(mask, loss.shape, loss.dtype))


def element_count(mask: jax.Array | None, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """The mean's denominator of an elementwise loss: the included elements (all without a mask)."""
    if mask is None:
        return jnp.asarray(math.prod(shape), dtype)
    return jnp.sum(jnp.broadcast_to(mask, shape), dtype=dtype)


def example_count(mask: jax.Array | None, batch_shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """The mean's denominator of a multiclass loss: the examples with an included class."""
    if mask is None:
        return jnp.asarray(math.prod(batch_shape), dtype)
    return jnp.sum(jnp.broadcast_to(jnp.any(mask, axis=-1), batch_shape), dtype=dtype)


def gradient_scale(denominator: jax.Array, reduction: Reduction) -> jax.Array:
    """What a closed form multiplies each loss's gradient by: 1, or the mean's ``1 / n``.

    0 when ``n = 0``: the mean over nothing is 0, with zero gradients (`safe_divide`).
    """
    if reduction != "mean":
        return jnp.ones((), denominator.dtype)
    return safe_divide(jnp.ones((), denominator.dtype), denominator)


def element_gradient_scale(
    mask: jax.Array | None, shape: tuple[int, ...], reduction: Reduction, dtype: Any
) -> jax.Array:
    """`gradient_scale` of an elementwise loss, 0 at excluded elements."""
    scale = gradient_scale(element_count(mask, shape, dtype), reduction)
    return scale if mask is None else jnp.where(mask, scale, 0)


def example_gradient_scale(
    mask: jax.Array | None, batch_shape: tuple[int, ...], reduction: Reduction, dtype: Any
) -> jax.Array:
    """`gradient_scale` of a multiclass loss (excluded classes are zeroed by the caller)."""
    return gradient_scale(example_count(mask, batch_shape, dtype), reduction)
