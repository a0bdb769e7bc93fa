"""Cross-entropy from probabilities (PyTorch's ``BCELoss`` semantics)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxce import _binary, _checks, _layout, _reduce
from jaxce._reduce import Reduction

# PyTorch's BCELoss clamps each log at -100 so that p = 0 or 1 gives a finite loss.
LOG_CLAMP = -100.0


def clamped_log(p: jax.Array) -> jax.Array:
    """``max(log p, -100)``; its gradient is ``1/p`` above the clamp and 0 below (never NaN)."""
    above = p > jnp.exp(jnp.asarray(LOG_CLAMP, p.dtype))
    return jnp.where(above, jnp.log(jnp.where(above, p, 1)), LOG_CLAMP)


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
    loss = -(y * clamped_log(p) + (1 - y) * clamped_log(1 - p))
    if weight is not None:
        loss = weight.astype(p.dtype) * loss
    loss = jnp.where(valid, loss, jnp.nan)
    return _reduce.reduce_elements(loss, mask, reduction)


class CategoricalInputs(NamedTuple):
    """Checked inputs of `categorical_cross_entropy`, classes last, in the compute dtype."""

    layout: _layout.ClassLayout
    p: jax.Array
    targets: jax.Array  # labels times class weights
    mask: jax.Array | None


def categorical_inputs(
    probs: ArrayLike,
    labels: ArrayLike,
    axis: int | Sequence[int],
    weight: ArrayLike | None,
    where: ArrayLike | None,
    reduction: Reduction,
) -> CategoricalInputs:
    """Checks and lays out the inputs; shared by the loss and its closed-form derivative."""
    probs = _checks.as_float_array(probs, "probs")
    labels = _checks.as_float_array(labels, "labels")
    _checks.check_reduction(reduction)
    layout = _layout.ClassLayout.of(probs.shape, axis)
    mask = layout.mask(where)
    class_weight = layout.class_weight(weight)
    compute = _checks.compute_dtype(probs)
    p = layout.classes_last(probs).astype(compute)
    targets = _layout.dense_labels(labels, layout).astype(compute)
    if class_weight is not None:
        targets = targets * class_weight.astype(compute).reshape((1,) * (p.ndim - 1) + (-1,))
    return CategoricalInputs(layout, p, targets, mask)


def categorical_cross_entropy(
    probs: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int | Sequence[int] = -1,
    weight: ArrayLike | None = None,
    where: ArrayLike | None = None,
    reduction: Reduction = "none",
) -> jax.Array:
    r"""Categorical cross-entropy from predicted probabilities.

    .. math::
        \ell = -\sum_c w_c\, y_c \max(\log p_c, -100)

    the form the textbooks teach; its derivative is :math:`-w_c y_c / p_c`
    (divided by :math:`n` under ``"mean"``). Prefer
    :func:`softmax_cross_entropy` on logits.

    Args:
      probs: ``[..., num_classes]`` probabilities (rows summing to 1).
      labels: one-hot or soft labels broadcastable to ``probs``.
      axis: class axis or tuple of axes.
      weight: ``[num_classes]`` class weights (any sign, as in PyTorch).
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
    example's loss NaN (``jaxce.checked`` raises).

    References:
      - I. Goodfellow, Y. Bengio and A. Courville, *Deep Learning*, MIT Press,
        2016, section 6.2 (cross-entropy as maximum likelihood).
        https://www.deeplearningbook.org/contents/mlp.html
      - PyTorch, ``torch.nn.NLLLoss`` applied to ``log(probs)`` (class
        ``weight``). https://pytorch.org/docs/stable/generated/torch.nn.NLLLoss.html
    """
    inputs = categorical_inputs(probs, labels, axis, weight, where, reduction)
    p, targets, mask = inputs.p, inputs.targets, inputs.mask
    take_part = targets != 0 if mask is None else mask & (targets != 0)
    loss = -jnp.sum(jnp.where(take_part, targets * clamped_log(p), 0), axis=-1)
    loss = jnp.where(jnp.all(_valid_probabilities(p, mask), axis=-1), loss, jnp.nan)
    return _reduce.reduce_examples(loss, mask, reduction)
