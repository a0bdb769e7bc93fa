"""Closed-form softmax gradients, shared by the losses' derivative rule and `jaxce.derivatives`.

With :math:`p = \\operatorname{softmax}(x)` and :math:`-\\log p_c = L - (x_c - m)`
(:math:`m` the row maximum, :math:`L = \\log \\sum_j e^{x_j - m}`):

- :math:`\\partial L / \\partial x = p` (`softmax_parts`' ``p``);
- :math:`\\partial(-\\log p_y) / \\partial x = p - \\text{onehot}(y)` (`label_gradient`);
- :math:`\\partial \\big(\\sum_c a_c (-\\log p_c)\\big) / \\partial x = p \\sum_c a_c - a`
  (`weighted_gradient`: label smoothing with :math:`a = w`, soft labels with
  :math:`a = w \\tilde y`), and with respect to :math:`a` it is :math:`-\\log p`;
- :math:`\\partial\\, z (m + L)^2 / \\partial x = 2 z (m + L)\\, p` (`z_loss_gradient`);
- the softmax focal loss :math:`-\\sum_c a_c (1 - p_c)^\\gamma \\log p_c`: with
  :math:`u_c` its derivative with respect to :math:`\\log p_c` (`focal_slopes`), the gradient
  is :math:`u - p \\sum_c u_c` (`focal_gradient`), carried by `focal_terms`' rule.

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


# --------------------------------------------------------------------------- #
# The softmax focal loss: sum_c a_c (1 - p_c)^gamma (-log p_c).
# --------------------------------------------------------------------------- #


def focal_parts(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(p, -log p, 1 - p)`` over the last axis of compute-dtype ``x`` (excluded classes ``-inf``).

    ``-log p = L - (x - m)`` in the shifted frame (no ``lse(x) - x`` cancellation)
    and ``1 - p = -expm1(log p)``, exact where ``p`` is near 1 (``1 - p`` would
    round to 0 there: ``p = 1 - 1e-9`` in float32). A ``-inf`` logit has ``p = 0``,
    ``-log p = inf`` and ``1 - p = 1``.
    """
    row_max, log_normalizer, p, _ = softmax_parts(x)
    log_p = _formulas.log_probabilities(x - row_max[..., None], log_normalizer[..., None])
    return p, -log_p, -jnp.expm1(log_p)


def focal_modulation(miss: jax.Array, gamma: jax.Array) -> jax.Array:
    """``(1 - p)^gamma`` from ``miss = 1 - p``: ``0^0 = 1``, so ``gamma = 0`` is exactly 1.

    ``exp(gamma log(1 - p))`` where ``1 - p > 0``; the log never sees 0, so no
    ``0 * inf`` reaches a derivative (``jax.hessian`` differentiates this).
    """
    zero = miss == 0
    power = jnp.exp(gamma * jnp.log(jnp.where(zero, 1, miss)))
    return jnp.where(zero, (gamma == 0).astype(miss.dtype), power)


def focal_slopes(
    p: jax.Array,
    neg_log_p: jax.Array,
    miss: jax.Array,
    weights: jax.Array,
    gamma: jax.Array,
    included: jax.Array | None,
) -> jax.Array:
    """``u_c = d loss / d log p_c = a_c [gamma (1-p_c)^(gamma-1) p_c log p_c - (1-p_c)^gamma]``.

    Written as ``-a_c (1-p_c)^gamma (1 + gamma p_c r_c)`` with ``r_c = -log p_c /
    (1 - p_c)`` (in ``[1, inf)``, 1 at ``p_c = 1``), which is bounded where the
    first form is ``inf * 0`` (``p_c -> 1`` with ``gamma < 1``), and ``p_c r_c = 0``
    at ``p_c = 0``. Classes that take no part (`_formulas.weighted_terms`) have
    ``u_c = 0``.
    """
    # Every select is made before the arithmetic it guards, so that no inf reaches a
    # product or a quotient whose derivative is taken (`jax.hessian` differentiates this).
    zero_miss, zero_p = miss == 0, p == 0
    ratio = jnp.where(zero_p, 0, neg_log_p) / jnp.where(zero_miss, 1, miss)
    p_ratio = p * jnp.where(zero_miss, 1, ratio)
    terms = focal_modulation(miss, gamma) * (1 + gamma * p_ratio)
    return -_formulas.weighted_terms(weights, terms, included)


def focal_gradient(p: jax.Array, slopes: jax.Array) -> jax.Array:
    """``d loss / dx = u - p sum_c u_c`` from the slopes ``u`` (`focal_slopes`): ``d log p_c / dx_j
    = [c = j] - p_j``."""
    return slopes - p * jnp.sum(slopes, axis=-1, keepdims=True)


def _focal_terms(
    neg_log_p: jax.Array, miss: jax.Array, gamma: jax.Array, included: jax.Array | None
) -> jax.Array:
    """``(1 - p)^gamma (-log p)``, with ``-log p`` taken as 0 where ``included`` is False (its
    ``inf`` would reach the product's derivative; `_formulas.weighted_terms` drops it anyway)."""
    if included is not None:
        neg_log_p = jnp.where(included, neg_log_p, 0)
    return focal_modulation(miss, gamma) * neg_log_p


def _focal_loss(
    neg_log_p: jax.Array,
    miss: jax.Array,
    weights: jax.Array,
    gamma: jax.Array,
    included: jax.Array | None,
) -> jax.Array:
    terms = _focal_terms(neg_log_p, miss, gamma, included)
    return jnp.sum(_formulas.weighted_terms(weights, terms, included), axis=-1)


@jax.custom_jvp
def focal_terms(
    x: jax.Array, weights: jax.Array, gamma: jax.Array, included: jax.Array | None
) -> jax.Array:
    """``sum_c a_c (1 - p_c)^gamma (-log p_c)`` per row of ``x`` (``[..., C]``), ``a = weights``.

    ``included`` (as in `softmax_terms`) says which classes take part. The
    rule below is the closed form (`focal_gradient` of `focal_slopes`), so
    ``jax.grad`` and `jaxce.derivatives` agree and stay finite at ``p = 1``
    with ``0 < gamma < 1``, where autodiff of the definition meets ``inf * 0``;
    the weights and ``gamma`` may be differentiated too.
    """
    _, neg_log_p, miss = focal_parts(x)
    return _focal_loss(neg_log_p, miss, weights, gamma, included)


def _focal_terms_jvp(primals: tuple[Any, ...], tangents: tuple[Any, ...]) -> tuple[Any, Any]:
    x, weights, gamma, included = primals
    dx, dweights, dgamma, _ = tangents
    p, neg_log_p, miss = focal_parts(x)
    loss = _focal_loss(neg_log_p, miss, weights, gamma, included)
    tangent = jnp.zeros_like(loss)
    if not isinstance(dx, SymbolicZero):
        slopes = focal_slopes(p, neg_log_p, miss, weights, gamma, included)
        tangent = tangent + _row_dot(focal_gradient(p, slopes), dx)
    finite = jnp.isfinite(neg_log_p)
    if not isinstance(dweights, SymbolicZero):
        # d/da_c = (1 - p_c)^gamma (-log p_c) for the classes that take part, and for a
        # zero target on a finite -log p (a soft label's gradient there), as in `softmax_terms`.
        counts = None if included is None else included | finite
        terms = _focal_terms(neg_log_p, miss, gamma, counts)
        tangent = tangent + jnp.sum(_formulas.weighted_terms(dweights, terms, counts), axis=-1)
    if not isinstance(dgamma, SymbolicZero):
        # d/dgamma = sum_c a_c (1 - p_c)^gamma log(1 - p_c) (-log p_c): 0 in the limits
        # p_c -> 1 (log 1 = 0 beside -log p = 0) and p_c -> 0 (log(1 - p) -> 0 faster).
        log_miss = jnp.log(jnp.where(miss == 0, 1, miss))
        terms = focal_modulation(miss, gamma) * log_miss * jnp.where(finite, neg_log_p, 0)
        gamma_slope = jnp.sum(_formulas.weighted_terms(weights, terms, included), axis=-1)
        tangent = tangent + gamma_slope * dgamma
    return loss, tangent


focal_terms.defjvp(_focal_terms_jvp, symbolic_zeros=True)
