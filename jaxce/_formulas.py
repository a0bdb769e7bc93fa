"""The row formulas of softmax cross-entropy, written once for every path.

Every implementation (the XLA losses, the Pallas kernels, the
vocabulary-parallel completion, the fused chunk loop, the closed forms) owns
its loop over the classes (one pass, blocks, shards, chunks) and calls these
for what happens inside it:

- the finite shift ``m`` of a row (its maximum, 0 where that is infinite) and
  the log-sum-exp ``lse = m + log sum_c exp(x_c - m)``, direct
  (:func:`shifted_exponentials`, :func:`log_of_total`) or online over blocks
  of classes (:func:`online_total`);
- log-probabilities and probabilities from a kept log-normaliser
  (:func:`log_probabilities`, :func:`probabilities`);
- the label logit (:func:`label_logit`);
- label smoothing, PyTorch's mix ``(1 - eps) a + (eps / C) b``
  (:func:`smoothing_coefficients`, :func:`smoothing_mix`, :func:`smoothed_targets`);
- the z-loss ``z lse^2`` and its slope ``2 z lse`` (:func:`z_loss_term`, :func:`z_loss_slope`);
- the soft cap and the temperature of the fused loss (:func:`soften`,
  :func:`soften_slope`);
- the rule for a zero weight on an infinite term (:func:`weighted_terms`): a
  class excluded by ``where`` contributes nothing, whatever its weight; a class
  that takes part multiplies as PyTorch does (``0 * inf`` is NaN there, and
  here).

`jaxce._references` shares none of this on purpose: it is what the tests trust.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Complete = Callable[[jax.Array], jax.Array]


def _identity(x: jax.Array) -> jax.Array:
    return x


def finite_shift(row_max: jax.Array) -> jax.Array:
    """The row maximum as a shift: 0 for an infinite one (no ``inf - inf``), NaN kept.

    A NaN logit makes the maximum NaN, and so the whole row NaN, as it must:
    a row with a NaN in it has no meaningful loss.
    """
    return jnp.where(jnp.isinf(row_max), jnp.zeros_like(row_max), row_max)


def row_shift(
    x: jax.Array,
    axis: int | tuple[int, ...] = -1,
    complete_max: Complete = _identity,
    local_max: jax.Array | None = None,
) -> jax.Array:
    """The stop-gradient finite shift of the row maximum over ``axis`` (kept as size-1 axes).

    A constant: the log-sum-exp does not depend on it, so its gradient would
    only add ``0 * (...)`` terms. ``complete_max`` completes the maximum over
    the classes other devices hold (``pmax``); ``local_max`` is the maximum
    over ``axis`` when the caller formed it already (axes reduced away).
    """
    if local_max is None:
        local_max = jnp.max(x, axis=axis)
    # Shifted at the reduced shape, then expanded: with `keepdims` XLA:CPU
    # fuses less of the row's work (up to 1.3x slower at ten classes, measured).
    shift = finite_shift(complete_max(jax.lax.stop_gradient(local_max)))
    return jnp.expand_dims(shift, axis)


def shifted_exponentials(
    x: jax.Array,
    complete_max: Complete = _identity,
    complete_sum: Complete = _identity,
    local_max: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(shift, exps, total)`` over the last axis of ``x``: ``exp(x - shift)`` and its row sum.

    ``shift`` (``[..., 1]``) is the stop-gradient finite shift of the row
    maximum, so every ``exp(x - shift)`` is at most 1 (no overflow) and the
    sum is at least 1 on a row with a finite entry. ``complete_max`` and
    ``complete_sum`` complete the per-row maximum and sum over the classes
    other devices hold (``pmax`` / ``psum``); the identity on one device.
    ``local_max`` (``[...]``): the row maximum, when the caller formed it in
    a pass that also read something else.
    """
    shift = row_shift(x, -1, complete_max, local_max)
    exps = jnp.exp(x - shift)
    return shift, exps, complete_sum(jnp.sum(exps, axis=-1))


def log_of_total(total: jax.Array) -> jax.Array:
    """``log(total)`` of a row sum of exponentials: ``-inf`` for an empty row, NaN kept.

    ``log(0)`` stays out of the differentiated path, so an empty row (every
    class excluded or ``-inf``) has a zero gradient, not ``0 * inf``. The test
    is ``total == 0``, not ``total > 0``: a NaN sum must stay NaN.
    """
    empty = total == 0
    return jnp.where(empty, -jnp.inf, jnp.log(jnp.where(empty, 1, total)))


def reciprocal_of_total(total: jax.Array) -> jax.Array:
    """``1 / total``: 0 for an empty row (so ``p = 0``, never NaN), NaN kept."""
    empty = total == 0
    return jnp.where(empty, 0, 1 / jnp.where(empty, 1, total))


def online_total(total: jax.Array, shift: jax.Array, new_shift: jax.Array) -> jax.Array:
    """A running ``sum exp(x - shift)`` moved to ``new_shift``: ``total exp(shift - new_shift)``.

    For a loop that walks the classes in blocks: when the running maximum grows
    the shift moves, and the sum so far is rescaled. A sum of nothing (0) stays
    0: before the first finite logit the shift is 0 and the next one may be far
    below it (a row of logits under -88.7 in float32), where
    ``exp(shift - new_shift)`` overflows and ``0 * inf`` would be NaN. Otherwise
    the shift only grows, so the factor is at most 1.
    """
    return jnp.where(total == 0, total, total * jnp.exp(shift - new_shift))


def probabilities(shifted: jax.Array, log_normalizer: jax.Array) -> jax.Array:
    """``p = exp(shifted - L)`` from a kept log-normaliser ``L`` (``[..., 1]``); 0 on an empty row."""
    return jnp.exp(log_probabilities(shifted, log_normalizer))


def log_probabilities(shifted: jax.Array, log_normalizer: jax.Array) -> jax.Array:
    """``log p = shifted - L`` (``shifted = x - m``, ``L`` ``[..., 1]``); ``-inf`` on an empty row.

    A row of ``-inf`` logits has ``L = -inf``: it is taken as ``+inf`` so that
    ``log p = -inf`` (``p = 0``) instead of ``-inf + inf = NaN``.
    """
    log_normalizer = jnp.where(log_normalizer == -jnp.inf, jnp.inf, log_normalizer)
    return shifted - log_normalizer


def label_logit(x: jax.Array, labels: jax.Array) -> jax.Array:
    """``x[..., labels]`` over the last axis, labels clipped into range (callers mask invalid ones)."""
    safe = jnp.clip(labels, 0, x.shape[-1] - 1)
    return jnp.take_along_axis(x, safe[..., None], axis=-1)[..., 0]


def smoothing_coefficients(smoothing: Any, num_classes: int) -> tuple[Any, Any]:
    """``(1 - eps, eps / C)``: label smoothing's weights of the label and of every class.

    PyTorch's and Keras' definition: the targets are ``(1 - eps) onehot(y) + eps / C``.
    """
    return 1 - smoothing, smoothing / num_classes


def smoothing_mix(label_term: jax.Array, class_sum: jax.Array, smoothing: Any, num_classes: int):
    """``(1 - eps) a + (eps / C) b``: a label's term mixed with the sum over the classes.

    For the loss, ``a = w_y (-log p_y)`` and ``b = sum_c w_c (-log p_c)``; for
    its gradient the same coefficients weight the one-hot and the uniform part.
    """
    on_label, per_class = smoothing_coefficients(smoothing, num_classes)
    return on_label * label_term + per_class * class_sum


def smoothed_targets(targets: jax.Array, smoothing: Any, num_classes: int) -> jax.Array:
    """``(1 - eps) y + eps / C``: probability targets mixed with the uniform distribution.

    Binary labels are the two-class case (Keras: ``y (1 - eps) + eps / 2``).
    """
    on_label, per_class = smoothing_coefficients(smoothing, num_classes)
    return on_label * targets + per_class


def z_loss_term(z: jax.Array, log_partition: jax.Array) -> jax.Array:
    """``z (log Z)^2``, evaluated as ``(z log Z) log Z``.

    The order matters: a zero coefficient (traced or not) gives exactly 0 even
    when ``(log Z)^2`` overflows (logits of 1e30 in float32), where
    ``z * square(log Z)`` gives ``0 * inf = nan``; its gradients stay finite.
    """
    return (z * log_partition) * log_partition


def z_loss_slope(z: jax.Array, log_partition: jax.Array) -> jax.Array:
    """``d(z (log Z)^2) / d log Z = 2 z log Z`` (0 for ``z = 0``, even when ``log Z`` is huge)."""
    return 2 * z * log_partition


def soften(x: jax.Array, softcap: float | None, temperature: Any | None) -> jax.Array:
    """The fused loss's logits ``softcap tanh(x / softcap) / T`` (each part only when set)."""
    if softcap is not None:
        x = softcap * jnp.tanh(x / softcap)
    return x if temperature is None else x / temperature


def soften_slope(
    softened: jax.Array, softcap: float | None, temperature: Any | None
) -> jax.Array | None:
    """``d soften(x) / dx`` from the softened value ``s`` (None when the transform is the identity).

    ``d(c tanh(x / c)) / dx = 1 - tanh^2(x / c) = 1 - (cap / c)^2`` with ``cap = s T``.
    """
    slope = None
    if softcap is not None:
        capped = softened if temperature is None else softened * temperature
        slope = 1 - jnp.square(capped / softcap)
    if temperature is not None:
        slope = 1 / temperature if slope is None else slope / temperature
    return slope


def weighted_terms(weights: jax.Array, terms: jax.Array, included: jax.Array | None) -> jax.Array:
    """``weights * terms`` under the zero-weight rule.

    A class excluded by ``where`` (``included`` False) contributes 0, whatever
    its weight and however infinite its term (a ``-inf`` logit); a class that
    takes part multiplies as PyTorch does, so a zero weight on an infinite
    term is NaN. ``included`` None: every class takes part.
    """
    if included is None:
        return terms * weights
    # Selected before and after the product: an excluded class's infinite term
    # never meets its weight (no 0 * inf in the value or in the weights'
    # gradient), and its weight, whatever it is, never reaches the sum.
    return jnp.where(included, jnp.where(included, terms, 0) * weights, 0)
