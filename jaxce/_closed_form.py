"""Closed-form softmax gradients, shared by the losses' derivative rule and `jaxce.derivatives`.

The gradient of :math:`\\log \\sum_c e^{x_c}` is :math:`p = \\operatorname{softmax}(x)`;
the gradient of the label logit :math:`x_y` is the one-hot of :math:`y`. Both are
written once here. `softmax_terms` carries them as a `custom_jvp` rule, so
`jvp`, `grad` and `hessian` all work (the rule is itself differentiable), and
so that XLA computes :math:`e^{x - m}` once: the same buffer feeds the
log-sum-exp's row sum and, scaled in place, the gradient (on CPU this keeps the
value-and-gradient at optax's pass count, without the scatter of a gather's
transpose).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def softmax_parts(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(row_max, log_normalizer, p, total)`` over the last axis of compute-dtype ``x``.

    ``row_max`` is the stop-gradient row maximum, 0 for rows without a finite
    entry (so ``x - row_max`` never makes ``inf - inf``); ``log_normalizer`` is
    ``log sum_c exp(x_c - row_max)`` (``-inf`` for a row of ``-inf``); ``p`` the
    softmax, exactly 0 at ``-inf`` entries and on empty rows (never NaN);
    ``total`` the row sum of ``exp(x - row_max)``.
    """
    row_max = jnp.max(x, axis=-1, keepdims=True)
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0))
    # Every exp(x - max) is at most 1: no overflow; the largest term is 1, so
    # the sum is at least 1 on any row with a finite entry.
    unnormalised = jnp.exp(x - row_max)
    total = jnp.sum(unnormalised, axis=-1)
    nonempty = total > 0
    log_normalizer = jnp.where(nonempty, jnp.log(jnp.where(nonempty, total, 1)), -jnp.inf)
    reciprocal = jnp.where(nonempty, 1 / jnp.where(nonempty, total, 1), 0)
    p = unnormalised * reciprocal[..., None]
    return row_max[..., 0], log_normalizer, p, total


def label_logit(x: jax.Array, labels: jax.Array) -> jax.Array:
    """``x[..., labels]`` with labels clipped into range (callers mask invalid ones)."""
    safe = jnp.clip(labels, 0, x.shape[-1] - 1)
    return jnp.take_along_axis(x, safe[..., None], axis=-1)[..., 0]


def one_hot_select(labels: jax.Array, values: jax.Array) -> jax.Array:
    """``values`` (shape ``[..., C]``) where the class equals the label, else 0."""
    classes = jax.lax.broadcasted_iota(labels.dtype, values.shape, values.ndim - 1)
    return jnp.where(classes == labels[..., None], values, 0)


@jax.custom_jvp
def softmax_terms(x: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(row_max, log_normalizer, label_logit - row_max)`` per row of ``x``.

    ``-log p_y = log_normalizer - (x_y - row_max)``: both terms live in the
    shifted frame, so large logits lose nothing to ``lse(x) - x_y``
    cancellation. Derivatives: ``row_max`` is a constant shift (tangent 0),
    ``log_normalizer`` has gradient ``p`` and the label term the one-hot of
    the label (0 for a label out of range).
    """
    row_max, log_normalizer, _, _ = softmax_parts(x)
    return row_max, log_normalizer, label_logit(x, labels) - row_max


@softmax_terms.defjvp
def _softmax_terms_jvp(
    primals: tuple[jax.Array, jax.Array], tangents: tuple[jax.Array, jax.Array]
) -> tuple[tuple[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]:
    x, labels = primals
    dx, _ = tangents
    row_max, log_normalizer, p, _ = softmax_parts(x)
    label_shifted = label_logit(x, labels) - row_max
    tangent_normalizer = jnp.sum(p * dx, axis=-1)
    tangent_label = jnp.sum(one_hot_select(labels, dx), axis=-1)
    return (row_max, log_normalizer, label_shifted), (
        jnp.zeros_like(row_max),
        tangent_normalizer,
        tangent_label,
    )
