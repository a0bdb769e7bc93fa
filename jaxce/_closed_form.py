"""Closed-form softmax gradients, shared by the losses' derivative rule and `jaxce.derivatives`.

With :math:`p = \\operatorname{softmax}(x)` and :math:`-\\log p_c = L - (x_c - m)`
(:math:`m` the row maximum, :math:`L = \\log \\sum_j e^{x_j - m}`):

- :math:`\\partial L / \\partial x = p` (`softmax_parts`' ``p``);
- :math:`\\partial(-\\log p_y) / \\partial x = p - \\text{onehot}(y)` (`label_gradient`);
- :math:`\\partial \\big(\\sum_c a_c (-\\log p_c)\\big) / \\partial x = p \\sum_c a_c - a`
  (`weighted_gradient`: label smoothing with :math:`a = w`, soft labels with
  :math:`a = w \\tilde y`), and with respect to :math:`a` it is :math:`-\\log p`;
- :math:`\\partial\\, z (m + L)^2 / \\partial x = 2 z (m + L)\\, p` (`z_loss_gradient`).

Each formula is written once here. `softmax_terms` carries them as a
`custom_jvp` rule (so `jvp`, `grad` and `hessian` all work: the rule is built
from differentiable ops), which lets XLA compute :math:`e^{x - m}` once: the
same buffer feeds the log-sum-exp's row sum and, scaled in place, the
gradient. `jaxce.derivatives` calls the same functions.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero


def softmax_parts(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(row_max, log_normalizer, p, total)`` over the last axis of compute-dtype ``x``.

    ``row_max`` is the stop-gradient row maximum, 0 where it is infinite
    (so ``x - row_max`` never makes ``inf - inf``) and NaN where a logit is; ``log_normalizer`` is
    ``log sum_c exp(x_c - row_max)`` (``-inf`` for a row of ``-inf``); ``p`` the
    softmax, exactly 0 at ``-inf`` entries and on empty rows (never NaN);
    ``total`` the row sum of ``exp(x - row_max)``. Excluded classes are ``-inf``.
    """
    row_max = jax.lax.stop_gradient(finite_shift(jnp.max(x, axis=-1, keepdims=True)))
    # Every exp(x - max) is at most 1: no overflow; the largest term is 1, so
    # the sum is at least 1 on any row with a finite entry.
    unnormalised = jnp.exp(x - row_max)
    total = jnp.sum(unnormalised, axis=-1)
    return row_max[..., 0], log_of_total(total), unnormalised * reciprocal_of_total(total), total


def finite_shift(row_max: jax.Array) -> jax.Array:
    """The row maximum as a shift: 0 for an infinite one (no ``inf - inf``), NaN kept.

    A NaN logit makes the maximum NaN, and so the whole row NaN, as it must:
    a row with a NaN in it has no meaningful loss.
    """
    return jnp.where(jnp.isinf(row_max), jnp.zeros_like(row_max), row_max)


def log_of_total(total: jax.Array) -> jax.Array:
    """``log(total)`` of a row sum of exponentials: ``-inf`` for an empty row, NaN kept.

    ``log(0)`` stays out of the differentiated path, so an empty row (every
    class excluded or ``-inf``) has a zero gradient, not ``0 * inf``. The test
    is ``total == 0``, not ``total > 0``: a NaN sum must stay NaN.
    """
    empty = total == 0
    return jnp.where(empty, -jnp.inf, jnp.log(jnp.where(empty, 1, total)))


def reciprocal_of_total(total: jax.Array) -> jax.Array:
    """``1 / total`` as ``[..., 1]``: 0 for an empty row (so ``p = 0``, never NaN), NaN kept."""
    empty = total == 0
    return jnp.where(empty, 0, 1 / jnp.where(empty, 1, total))[..., None]


def label_logit(x: jax.Array, labels: jax.Array) -> jax.Array:
    """``x[..., labels]`` with labels clipped into range (callers mask invalid ones)."""
    safe = jnp.clip(labels, 0, x.shape[-1] - 1)
    return jnp.take_along_axis(x, safe[..., None], axis=-1)[..., 0]


def one_hot_select(labels: jax.Array, values: jax.Array) -> jax.Array:
    """``values`` (shape ``[..., C]``) where the class equals the label, else 0."""
    classes = jax.lax.broadcasted_iota(labels.dtype, values.shape, values.ndim - 1)
    return jnp.where(classes == labels[..., None], values, 0)


def label_gradient(p: jax.Array, labels: jax.Array) -> jax.Array:
    """``d(-log p_y)/dx = p - onehot(y)`` (the one-hot is 0 for a label out of range)."""
    classes = jax.lax.broadcasted_iota(labels.dtype, p.shape, p.ndim - 1)
    return p - (classes == labels[..., None]).astype(p.dtype)


def weighted_gradient(p: jax.Array, weights: jax.Array) -> jax.Array:
    """``d(sum_c a_c (-log p_c))/dx = p sum_c a_c - a`` for ``a = weights`` (``[..., C]``)."""
    # Summed in the weights' own shape: a [1, ..., C] vector is summed once.
    return -weights + p * _row_total(weights, p.shape[-1])[..., None]


def _row_total(weights: jax.Array, num_classes: int) -> jax.Array:
    """``sum_c a_c`` per row; a class axis of length 1 is one weight for every class."""
    total = jnp.sum(weights, axis=-1)
    return total * num_classes if weights.shape[-1] == 1 else total


def z_loss_term(z: jax.Array, log_partition: jax.Array) -> jax.Array:
    """``z (log Z)^2``, evaluated as ``(z log Z) log Z``.

    The order matters: a zero coefficient (traced or not) gives exactly 0 even
    when ``(log Z)^2`` overflows (logits of 1e30 in float32), where
    ``z * square(log Z)`` gives ``0 * inf = nan``; its gradients stay finite.
    """
    return (z * log_partition) * log_partition


def z_loss_gradient(p: jax.Array, z: jax.Array, log_partition: jax.Array) -> jax.Array:
    """``d(z (log Z)^2)/dx = 2 z log Z p`` (0 for ``z = 0``, even when ``log Z`` is huge)."""
    return (2 * z * log_partition)[..., None] * p


def _weighted_shifted_sum(
    weights: jax.Array, x: jax.Array, row_max: jax.Array, zero_times_inf: bool
) -> jax.Array:
    """``sum_c a_c (x_c - m)`` over the last axis of ``x``.

    Written so that XLA:CPU sums it in the pass that reads the logits, with no
    ``[..., C]`` temporary: no select inside the sum (a select makes XLA
    materialise its operand), and ``-m`` is negated apart so that its
    broadcast is not shared with ``exp(x - m)``'s (a shared operand is
    materialised too); the barrier keeps the weights' broadcast apart from the
    gradient's. The logits come first in each product: XLA:CPU's fused sum
    of ``w * (x - m)`` runs several times slower than that of ``(x - m) * w``.

    With ``zero_times_inf`` a zero weight on a ``-inf`` logit contributes 0
    (``0 log 0 = 0``) and positive (negative) weight on one gives ``-inf``
    (``+inf``): the terms are clamped at ``-finfo.max`` (so ``0 * -inf`` never
    happens) and two more, equally fused sums find the weight that sits on
    ``-inf`` logits. Without
    it the plain product is summed (a zero weight on a ``-inf`` logit gives NaN).
    """
    shifted = x + (-row_max)[..., None]
    if not zero_times_inf and weights.shape[-1] == 1:
        # One weight for every class (smoothing without class weights): no
        # [..., C] product at all.
        return jnp.sum(shifted, axis=-1) * weights[..., 0]
    weights = jnp.broadcast_to(jax.lax.optimization_barrier(weights), x.shape)
    if not zero_times_inf:
        return jnp.sum(shifted * weights, axis=-1)
    lowest = jnp.finfo(x.dtype).min
    clamped = jnp.sum(jnp.maximum(shifted, lowest) * weights, axis=-1)
    on_minus_inf = (x == -jnp.inf).astype(x.dtype)
    positive = jnp.sum(on_minus_inf * jnp.maximum(weights, 0), axis=-1) > 0
    negative = jnp.sum(on_minus_inf * jnp.minimum(weights, 0), axis=-1) < 0
    # a * -inf is -inf for a > 0 and +inf for a < 0 (negative class weights);
    # both in one row is -inf + inf.
    infinite = jnp.where(positive, jnp.where(negative, jnp.nan, -jnp.inf), jnp.inf)
    return jnp.where(positive | negative, infinite, clamped)


def _terms(
    x: jax.Array, labels: jax.Array | None, weights: jax.Array | None, zero_times_inf: bool
) -> tuple[Any, jax.Array]:
    row_max, log_normalizer, p, _ = softmax_parts(x)
    nll = None
    if labels is not None:
        nll = log_normalizer - (label_logit(x, labels) - row_max)
    weighted = None
    if weights is not None:
        # sum_c a_c (-log p_c) = L sum_c a_c - sum_c a_c (x_c - m): for a >= 0
        # both terms are >= 0 (L >= 0, x_c - m <= 0), so nothing cancels
        # (negative class weights, which PyTorch allows, may cancel as its
        # own formula does).
        total_weight = jnp.broadcast_to(_row_total(weights, x.shape[-1]), x.shape[:-1])
        # A row without weight (all targets 0, or every class excluded: L may
        # be -inf) contributes 0, never -inf * 0.
        has_weight = total_weight != 0
        normalizer_part = jnp.where(has_weight, log_normalizer, 0) * total_weight
        weighted = normalizer_part - _weighted_shifted_sum(weights, x, row_max, zero_times_inf)
    return (row_max, log_normalizer, nll, weighted), p


@partial(jax.custom_jvp, nondiff_argnums=(3,))
def softmax_terms(
    x: jax.Array,
    labels: jax.Array | None,
    weights: jax.Array | None,
    zero_times_inf: bool = True,
) -> Any:
    """``(row_max, log_normalizer, nll, weighted_nll)`` per row of ``x`` (``[..., C]``).

    ``nll = -log p_y = L - (x_y - m)`` for integer ``labels`` (``None``
    without labels); ``weighted_nll = sum_c a_c (-log p_c)`` for ``weights``
    ``a`` broadcastable to ``x`` (``None`` without; a class axis of length 1
    is the same weight for every class). Every term lives in the
    shifted frame, so large logits lose nothing to ``lse(x) - x_y``
    cancellation. With ``zero_times_inf`` a zero weight on a ``-inf`` logit
    contributes 0 (one more fused sum over the logits); without it, NaN.

    Derivatives (the rule below): ``row_max`` is a constant shift (tangent 0);
    the others use `label_gradient`, `weighted_gradient` and ``p``; the weights
    may be differentiated too (gradient ``-log p``; 0 where a zero weight meets
    a ``-inf`` logit).
    """
    outputs, _ = _terms(x, labels, weights, zero_times_inf)
    return outputs


def _row_dot(gradient: jax.Array, tangent: jax.Array) -> jax.Array:
    return jnp.sum(gradient * tangent, axis=-1)


def _softmax_terms_jvp(
    zero_times_inf: bool, primals: tuple[Any, ...], tangents: tuple[Any, ...]
) -> tuple[Any, Any]:
    x, labels, weights = primals
    dx, _, dweights = tangents
    outputs, p = _terms(x, labels, weights, zero_times_inf)
    row_max, log_normalizer, _, _ = outputs
    if isinstance(dx, SymbolicZero):
        # Only the weights vary (e.g. a gradient with respect to soft labels).
        dx = jnp.zeros_like(x)
    tangent_normalizer = _row_dot(p, dx)
    tangent_nll = None if labels is None else _row_dot(label_gradient(p, labels), dx)
    tangent_weighted = None
    if weights is not None:
        tangent_weighted = _row_dot(weighted_gradient(p, weights), dx)
        if not isinstance(dweights, SymbolicZero):
            # d/da_c sum_c a_c (-log p_c) = -log p_c; where a_c = 0 and p_c = 0
            # (a -inf or excluded logit) it is taken as 0, the value's 0 log 0.
            neg_log_p = log_normalizer[..., None] - (x - row_max[..., None])
            counts = (weights != 0) | jnp.isfinite(neg_log_p)
            tangent_weighted = tangent_weighted + jnp.sum(
                jnp.where(counts, dweights * neg_log_p, 0), axis=-1
            )
    return outputs, (
        jnp.zeros_like(row_max),
        tangent_normalizer,
        tangent_nll,
        tangent_weighted,
    )


softmax_terms.defjvp(_softmax_terms_jvp, symbolic_zeros=True)
