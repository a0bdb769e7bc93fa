"""Reductions with PyTorch's denominators and a NaN-free empty mean."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """``numerator / denominator``, and 0 (with zero gradients) where the denominator is 0.

    PyTorch returns NaN for a mean over nothing; jaxce returns 0 on purpose so
    that a batch whose tokens are all ignored does not poison a training run.
    """
    nonzero = denominator != 0
    return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1), 0)


def reduce(
    loss: jax.Array,
    reduction: str,
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


def reduce_examples(loss: jax.Array, mask: jax.Array | None, reduction: str) -> jax.Array:
    """Reduces per-example ``loss`` of rows masked by ``[..., num_classes]`` ``mask``.

    ``"mean"`` counts the examples with at least one included class.
    """
    if mask is None:
        return reduce(loss, reduction)
    counted = jnp.broadcast_to(jnp.any(mask, axis=-1), loss.shape)
    return reduce(loss, reduction, denominator=jnp.sum(counted, dtype=loss.dtype))
