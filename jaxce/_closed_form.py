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

from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jaxce import _formulas


def softmax_parts(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(row_max, log_normalizer, p, total)`` over the last axis of compute-dtype ``x``.

    ``row_max`` is the stop-gradient finite shift (`_formulas.finite_shift`);
    ``log_normalizer`` is ``log sum_c exp(x_c - row_max)`` (``-inf`` for a row
    of ``-inf``); ``p`` the softmax, exactly 0 at ``-inf`` entries and on empty
    rows (never NaN); ``total`` the row sum of ``exp(x - row_max)``. Excluded
    classes are ``-inf``.
    """
    row_max, unnormalised, total = _formulas.shifted_exponentials(x)
    p = unnormalised * _formulas.reciprocal_of_total(total)[..., None]
    return row_max[..., 0], _formulas.log_of_total(total), p, total


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


def z_loss_gradient(p: jax.Array, z: jax.Array, log_partition: jax.Array) -> jax.Array:
    """``d(z (log Z)^2)/dx = 2 z log Z p`` (0 for ``z = 0``, even when ``log Z`` is huge)."""
    return _formulas.z_loss_slope(z, log_partition)[..., None] * p


def _weighted_shifted_sum(
    weights: jax.Array, x: jax.Array, row_max: jax.Array, included: jax.Array | None
) -> jax.Array:
    """``sum_c a_c (x_c - m)`` over the last axis of ``x``, under `_formulas.weighted_terms`' rule.

    Without ``included`` it is written so that XLA:CPU sums it in the pass
    that reads the logits, with no ``[..., C]`` temporary: no select inside
    the sum (a select makes XLA materialise its operand), and ``-m`` is
    negated apart so that its broadcast is not shared with ``exp(x - m)``'s (a
    shared operand is materialised too); the barrier keeps the weights'
    broadcast apart from the gradient's. The logits come first in each
    product: XLA:CPU's fused sum of ``w * (x - m)`` runs several times slower
    than that of ``(x - m) * w``.
    """
    shifted = x + (-row_max)[..., None]
    if included is None and weights.shape[-1] == 1:
        # One weight for every class (smoothing without class weights): no
        # [..., C] product at all.
        return jnp.sum(shifted, axis=-1) * weights[..., 0]
    weights = jnp.broadcast_to(jax.lax.optimization_barrier(weights), x.shape)
    return jnp.sum(_formulas.weighted_terms(weights, shifted, included), axis=-1)


def _terms(
    x: jax.Array, labels: jax.Array | None, weights: jax.Array | None, included: jax.Array | None
) -> tuple[Any, jax.Array]:
    row_max, log_normalizer, p, _ = softmax_parts(x)
    nll = None
    if labels is not None:
        nll = log_normalizer - (_formulas.label_logit(x, labels) - row_max)
    weighted = None
    if weights is not None:
        # sum_c a_c (-log p_c) = L sum_c a_c - sum_c a_c (x_c - m): for a >= 0
        # both terms are >= 0 (L >= 0, x_c - m <= 0), so nothing cancels
        # (negative class weights, which PyTorch allows, may cancel as its
        # own formula does).
        total_weight = jnp.broadcast_to(_row_total(weights, x.shape[-1]), x.shape[:-1])
        # An empty row (every class excluded or -inf: L = -inf) contributes 0,
        # never -inf * 0; a row whose weights sum to 0 multiplies as PyTorch
        # does (0 * L: NaN for a +inf logit, as with integer labels).
        empty = (total_weight == 0) & (log_normalizer == -jnp.inf)
        normalizer_part = jnp.where(empty, 0, log_normalizer) * total_weight
        weighted = normalizer_part - _weighted_shifted_sum(weights, x, row_max, included)
    return (row_max, log_normalizer, nll, weighted), p


@jax.custom_jvp
def softmax_terms(
    x: jax.Array,
    labels: jax.Array | None,
    weights: jax.Array | None,
    included: jax.Array | None = None,
) -> Any:
    """``(row_max, log_normalizer, nll, weighted_nll)`` per row of ``x`` (``[..., C]``).

    ``nll = -log p_y = L - (x_y - m)`` for integer ``labels`` (``None``
    without labels); ``weighted_nll = sum_c a_c (-log p_c)`` for ``weights``
    ``a`` broadcastable to ``x`` (``None`` without; a class axis of length 1
    is the same weight for every class). Every term lives in the
    shifted frame, so large logits lose nothing to ``lse(x) - x_y``
    cancellation. ``included`` (boolean, broadcastable to ``x``; None: every
    class) says which classes take part in the weighted sum: the others
    contribute 0 whatever their weight and logit; a class that takes part
    multiplies as PyTorch does, so a zero weight on a ``-inf`` logit is NaN
    (`_formulas.weighted_terms`).

    Derivatives (the rule below): ``row_max`` is a constant shift (tangent 0);
    the others use `label_gradient`, `weighted_gradient` and ``p``; the weights
    may be differentiated too (gradient ``-log p`` for the classes that take
    part, 0 for the others).
    """
    outputs, _ = _terms(x, labels, weights, included)
    return outputs


def _row_dot(gradient: jax.Array, tangent: jax.Array) -> jax.Array:
    return jnp.sum(gradient * tangent, axis=-1)


def _softmax_terms_jvp(primals: tuple[Any, ...], tangents: tuple[Any, ...]) -> tuple[Any, Any]:
    x, labels, weights, included = primals
    dx, _, dweights, _ = tangents
    outputs, p = _terms(x, labels, weights, included)
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
            # d/da_c sum_c a_c (-log p_c) = -log p_c for the classes that take
            # part, and for those left out only for a zero target on a finite
            # -log p (a soft label's gradient there); 0 for the others.
            neg_log_p = log_normalizer[..., None] - (x - row_max[..., None])
            counts = None if included is None else included | jnp.isfinite(neg_log_p)
            tangent_weighted = tangent_weighted + jnp.sum(
                _formulas.weighted_terms(dweights, neg_log_p, counts), axis=-1
            )
    return outputs, (
        jnp.zeros_like(row_max),
        tangent_normalizer,
        tangent_nll,
        tangent_weighted,
    )


softmax_terms.defjvp(_softmax_terms_jvp, symbolic_zeros=True)
