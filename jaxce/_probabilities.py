"""Cross-entropy from probabilities (PyTorch's ``BCELoss`` semantics)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxce import _binary, _checks, _layout, _reduce, _softmax
from jaxce._reduce import Reduction

# PyTorch's BCELoss clamps each log at -100 so that p = 0 or 1 gives a finite loss.
LOG_CLAMP = -100.0

# A positive float32 subnormal is p = f 2^-126 with a fraction f = m 2^-23, its bits m an
# integer in (0, 2^23). XLA:CPU (and GPU code built with flush-to-zero) reads a subnormal
# operand as 0, so `log(p)` is -inf and `1 / p` is inf there, and `exp(-100)` (3.7e-44) is
# itself 0; PyTorch takes the log of a subnormal (87.5 at p = 1e-38) and clamps only the log.
# Subnormals are read from their bits instead: f is an exact normal float32. In float64
# every subnormal lies far below e^-100 and is clamped.
_FLOAT32_MIN_NORMAL_BITS = 0x00800000
_FLOAT32_ONE_BITS = 0x3F800000
_LOG_2_POW_126 = 126 * 0.6931471805599453


def _float32_subnormal(p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Whether float32 ``p`` is a positive subnormal, and its fraction ``f = p 2^126`` there.

    ``f = (1 + f) - 1``, where ``1 + f`` has ``p``'s fraction bits under 1's
    exponent: exact (Sterbenz), and out of reach of constant folding, which
    could merge two power-of-two factors into an infinite ``2^149``.
    """
    bits = jax.lax.bitcast_convert_type(p, jnp.int32)
    subnormal = (bits > 0) & (bits < _FLOAT32_MIN_NORMAL_BITS)
    one_plus_fraction = jax.lax.bitcast_convert_type(
        jnp.where(subnormal, bits, 1) | _FLOAT32_ONE_BITS, jnp.float32
    )
    return subnormal, one_plus_fraction - 1


def _log(p: jax.Array) -> jax.Array:
    """``log p``, subnormal float32 included: ``log f - 126 log 2``."""
    if p.dtype != jnp.float32:
        return jnp.log(p)
    subnormal, fraction = _float32_subnormal(p)
    return jnp.where(subnormal, jnp.log(fraction) - _LOG_2_POW_126, jnp.log(p))


def _scaled_reciprocal(scale: jax.Array, p: jax.Array) -> jax.Array:
    """``scale / p``, subnormal float32 ``p`` included: ``(scale / f) 2^126``.

    The power of two is an exact factor; it overflows to inf where ``scale /
    p`` does (``1 / p`` is beyond float32's range below ``p`` = 3e-39).
    """
    if p.dtype != jnp.float32:
        return scale / p
    subnormal, fraction = _float32_subnormal(p)
    return jnp.where(subnormal, (scale / fraction) * 2.0**126, scale / p)


def clamped_log_slope(p: jax.Array, scale: jax.Array) -> jax.Array:
    """``d/dp scale * max(log p, -100)``: ``scale / p`` above the clamp, 0 at and below it.

    0 where ``scale`` is 0 too: the term ``0 * max(log p, -100)`` is 0 whatever
    ``p``, so a label of 0 on a tiny ``p`` (whose ``1 / p`` overflows) gives no
    ``0 * inf``. The closed forms and the losses' derivative rule both use it.
    """
    above = (_log(p) > LOG_CLAMP) & (scale != 0)
    return jnp.where(above, _scaled_reciprocal(jnp.where(above, scale, 0), p), 0)


def clamped_log(p: jax.Array) -> jax.Array:
    """``max(log p, -100)``, the log of a subnormal ``p`` included (finite, never NaN for NaN ``p``)."""
    log_p = _log(p)
    return jnp.where(log_p > LOG_CLAMP, log_p, LOG_CLAMP)


@jax.custom_jvp
def weighted_clamped_log(scale: jax.Array, p: jax.Array) -> jax.Array:
    """``scale * max(log p, -100)``; its derivative in ``p`` is `clamped_log_slope`."""
    return scale * clamped_log(p)


@weighted_clamped_log.defjvp
def _weighted_clamped_log_jvp(
    primals: tuple[jax.Array, jax.Array], tangents: tuple[jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array]:
    (scale, p), (scale_dot, p_dot) = primals, tangents
    log_p = clamped_log(p)
    return scale * log_p, log_p * scale_dot + clamped_log_slope(p, scale) * p_dot


@jax.custom_jvp
def binary_terms(p: jax.Array, y: jax.Array, weight: jax.Array) -> jax.Array:
    """PyTorch's BCELoss element ``-w [y max(log p, -100) + (1 - y) max(log(1 - p), -100)]``.

    Its derivative in ``p`` is `binary_slope`, 0 where the weight is 0 (the
    term is 0 whatever ``p``, though ``1 / p`` overflows float32 below 3e-39).
    """
    return weight * -(y * clamped_log(p) + (1 - y) * clamped_log(1 - p))


@binary_terms.defjvp
def _binary_terms_jvp(
    primals: tuple[jax.Array, jax.Array, jax.Array],
    tangents: tuple[jax.Array, jax.Array, jax.Array],
) -> tuple[jax.Array, jax.Array]:
    (p, y, weight), (p_dot, y_dot, weight_dot) = primals, tangents
    log_p, log_1mp = clamped_log(p), clamped_log(1 - p)
    unweighted = -(y * log_p + (1 - y) * log_1mp)
    tangent = (
        unweighted * weight_dot
        - weight * (log_p - log_1mp) * y_dot
        + binary_slope(p, y, weight) * p_dot
    )
    return weight * unweighted, tangent


def binary_slope(p: jax.Array, y: jax.Array, weight: jax.Array | None = None) -> jax.Array:
    """``d/dp`` of `binary_terms`: ``w [-y / p + (1 - y) / (1 - p)]`` where the logs are not
    clamped; 0 where ``w`` is 0."""
    slope = -clamped_log_slope(p, y) + clamped_log_slope(1 - p, 1 - y)
    if weight is None:
        return slope
    return jnp.where(weight == 0, 0, weight * slope)


def _valid_probabilities(probs: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Probabilities in [0, 1], or excluded by ``mask`` (which then take no part)."""
    valid = (probs >= 0) & (probs <= 1)
    if mask is not None:
        valid = valid | ~mask
    _checks.check_values(valid, probs, "probs", "probabilities in [0, 1]")
    return valid


def binary_cross_entropy(
    probs: ArrayLike,
    labels: ArrayLike,
    *,
    weight: ArrayLike | None = None,
    where: ArrayLike | None = None,
    reduction: Reduction = "none",
) -> jax.Array:
    r"""Binary cross-entropy from probabilities (PyTorch's ``BCELoss``).

    .. math::
        \ell = -w \left[ y \max(\log p, -100) + (1 - y) \max(\log(1 - p), -100) \right]

    The clamp at -100 is PyTorch's: ``p = 0`` or ``1`` gives a finite loss.
    Only the log is clamped: a subnormal ``p`` has a finite log (87.5 at
    ``p = 1e-38``, as in PyTorch), on every platform.
    Prefer :func:`sigmoid_binary_cross_entropy` on logits, which needs no clamp.
    Its derivative is :math:`w (p - y) / (p (1 - p))` per element, divided by
    :math:`n` under ``reduction="mean"``.

    Args:
      probs: probabilities in ``[0, 1]``, any shape.
      labels: 0/1 labels or probabilities, broadcastable to ``probs``.
      weight: elementwise weight broadcastable to ``probs``.
      where: boolean mask broadcastable to ``probs``.
      reduction: ``"none"``, ``"sum"`` or ``"mean"`` over included elements.

    Returns:
      The loss, float32 for half-precision inputs.

    Example:
      >>> import jax.numpy as jnp, jaxce
      >>> p, y = jnp.array([0.9, 0.1, 0.8, 0.2]), jnp.array([1.0, 0.0, 1.0, 0.0])
      >>> print(f"{float(jaxce.binary_cross_entropy(p, y, reduction='mean')):.6f}")
      0.164252

    A probability outside ``[0, 1]`` gives that element a NaN loss
    (``jaxce.checked`` raises instead).

    References:
      - PyTorch, ``torch.nn.BCELoss`` (the log clamp at -100, ``weight``,
        reductions). https://pytorch.org/docs/stable/generated/torch.nn.BCELoss.html
    """
    p, y, mask, _ = _binary.elementwise_inputs(probs, labels, where, reduction, "probs")
    weight = _binary.elementwise_weight(weight, p.shape, "weight")
    valid = _valid_probabilities(p)
    loss = binary_terms(p, y, jnp.ones((), p.dtype) if weight is None else weight.astype(p.dtype))
    loss = jnp.where(valid, loss, jnp.nan)
    return _reduce.reduce_elements(loss, mask, reduction)


class CategoricalInputs(NamedTuple):
    """Checked inputs of `categorical_cross_entropy`, classes last, in the compute dtype."""

    layout: _layout.ClassLayout
    p: jax.Array
    targets: jax.Array  # labels (smoothed) times class weights
    mask: jax.Array | None
    valid: jax.Array | None  # a traced `label_smoothing` in [0, 1) (None when concrete)


def categorical_inputs(
    probs: ArrayLike,
    labels: ArrayLike,
    axis: int | Sequence[int],
    weight: ArrayLike | None,
    where: ArrayLike | None,
    reduction: Reduction,
    label_smoothing: ArrayLike = 0.0,
) -> CategoricalInputs:
    """Checks and lays out the inputs; shared by the loss and its closed-form derivative.

    The labels are mixed with the uniform distribution before the class
    weights, as `softmax_cross_entropy` does; a traced ``label_smoothing`` out
    of range is replaced by 0 and ``valid`` is False (the loss is NaN).
    """
    probs = _checks.as_float_array(probs, "probs")
    labels = _checks.as_float_array(labels, "labels")
    _checks.check_reduction(reduction)
    _checks.check_unit_interval(label_smoothing, "label_smoothing")
    layout = _layout.ClassLayout.of(probs.shape, axis, "probs")
    mask = layout.mask(where)
    class_weight = layout.class_weight(weight)
    compute = _checks.compute_dtype(probs)
    p = layout.classes_last(probs).astype(compute)
    targets = _layout.dense_labels(labels, layout).astype(compute)
    targets, valid = _softmax.smoothed_labels(targets, label_smoothing, layout.num_classes)
    targets = _softmax.class_weighted(targets, class_weight, None)
    return CategoricalInputs(layout, p, targets, mask, valid)


def categorical_cross_entropy(
    probs: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int | Sequence[int] = -1,
    weight: ArrayLike | None = None,
    label_smoothing: ArrayLike = 0.0,
    where: ArrayLike | None = None,
    reduction: Reduction = "none",
) -> jax.Array:
    r"""Categorical cross-entropy from predicted probabilities.

    .. math::
        \ell = -\sum_c w_c\, \tilde y_c \max(\log p_c, -100), \qquad
        \tilde y = (1 - \varepsilon)\, y + \varepsilon / C,

    the form the textbooks teach; its derivative is :math:`-w_c \tilde y_c / p_c`
    (divided by :math:`n` under ``"mean"``). Label smoothing is Keras' (and
    :func:`softmax_cross_entropy`'s): the labels are mixed with the uniform
    distribution before the class weights. Keras clips the probabilities to
    :math:`[10^{-7}, 1 - 10^{-7}]` where jaxce clamps the log at -100
    (PyTorch's): the two agree for probabilities away from those edges. Prefer
    :func:`softmax_cross_entropy` on logits.

    Args:
      probs: ``[..., num_classes]`` probabilities (rows summing to 1).
      labels: one-hot or soft labels broadcastable to ``probs``.
      axis: class axis or tuple of axes.
      weight: ``[num_classes]`` class weights (any sign, as in PyTorch).
      label_smoothing: :math:`\varepsilon \in [0, 1)`; may be traced.
      where: boolean mask, of the probs' shape or of the batch shape;
        excluded entries take no part (their values are not checked).
      reduction: ``"none"`` (``[...]``), ``"sum"`` or ``"mean"`` over examples.

    Returns:
      The loss, float32 for half-precision inputs.

    Example:
      >>> import jax.numpy as jnp, jaxce
      >>> y = jnp.eye(3)
      >>> p = jnp.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5]])
      >>> print(f"{float(jaxce.categorical_cross_entropy(p, y, reduction='mean')):.6f}")
      0.424322

    A class with label 0 contributes 0 even at ``p = 0``; a probability outside
    ``[0, 1]`` (NaN included) that ``where`` does not exclude makes that
    example's loss NaN, and a traced ``label_smoothing`` outside ``[0, 1)``
    every loss (``jaxce.checked`` raises).

    References:
      - I. Goodfellow, Y. Bengio and A. Courville, *Deep Learning*, MIT Press,
        2016, section 6.2 (cross-entropy as maximum likelihood).
        https://www.deeplearningbook.org/contents/mlp.html
      - PyTorch, ``torch.nn.NLLLoss`` applied to ``log(probs)`` (class
        ``weight``). https://pytorch.org/docs/stable/generated/torch.nn.NLLLoss.html
      - Keras, ``keras.losses.CategoricalCrossentropy`` (``label_smoothing``).
        https://keras.io/api/losses/probabilistic_losses/#categoricalcrossentropy-class
    """
    inputs = categorical_inputs(probs, labels, axis, weight, where, reduction, label_smoothing)
    p, targets, mask = inputs.p, inputs.targets, inputs.mask
    take_part = targets != 0 if mask is None else mask & (targets != 0)
    # The scale of a class that takes no part is 0, so is its slope (no `0 * inf`).
    loss = -jnp.sum(weighted_clamped_log(jnp.where(take_part, targets, 0), p), axis=-1)
    loss = jnp.where(jnp.all(_valid_probabilities(p, mask), axis=-1), loss, jnp.nan)
    loss = _checks.nan_unless(inputs.valid, loss)
    return _reduce.reduce_examples(loss, mask, reduction)
