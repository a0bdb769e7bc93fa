"""Multiclass (log-softmax) cross-entropy from logits."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxce import _checks, _closed_form, _layout, _reduce


def _trailing(class_weight: jax.Array, ndim: int) -> jax.Array:
    """``[C]`` class weights as ``[1, ..., 1, C]``, to broadcast against ``ndim``-d logits."""
    return class_weight.reshape((1,) * (ndim - 1) + class_weight.shape)


def label_status(
    labels: jax.Array,
    num_classes: int,
    ignore_index: int | None,
    row_has_class: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """``(counted, invalid)`` per example for integer labels.

    An example counts when its label is in ``[0, num_classes)``, is not
    ``ignore_index`` and its row has an included class (``row_has_class``, None
    for all). An invalid label (out of range, not ignored, row included) makes
    that example's loss NaN; under ``jaxce.checked`` it raises instead.
    """
    in_range = (labels >= 0) & (labels < num_classes)
    ignored = (labels == ignore_index) if ignore_index is not None else jnp.zeros_like(in_range)
    _checks.check_values(
        in_range | ignored,
        labels,
        "labels",
        f"class indices in [0, {num_classes})"
        + (f" or ignore_index={ignore_index}" if ignore_index is not None else ""),
    )
    active = ~ignored
    if row_has_class is not None:
        active = active & row_has_class
    return active & in_range, active & ~in_range


def integer_label_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    mask: jax.Array | None,
    class_weight: jax.Array | None,
    ignore_index: int | None,
    label_smoothing: ArrayLike,
    z_loss: ArrayLike,
    reduction: str,
) -> jax.Array:
    """The integer-label loss on `[..., C]` logits (compute dtype), labels `[...]`.

    This is the one implementation behind `softmax_cross_entropy_with_integer_labels`
    and `linear_cross_entropy`'s reference path.
    """
    num_classes = logits.shape[-1]
    if mask is not None:
        # An excluded class is a -inf logit: probability 0, zero gradient.
        logits = jnp.where(mask, logits, -jnp.inf)
    smoothing_on = not _checks.is_concrete_zero(label_smoothing)
    smooth_weights = None
    if smoothing_on:
        # PyTorch: (1 - eps) w_y (-log p_y) + (eps / C) sum_c w_c (-log p_c).
        # Explicit leading axes keep this valid under jax_numpy_rank_promotion="raise".
        # Without class weights, one weight of 1 stands for every class.
        smooth_weights = (
            jnp.ones((1,) * logits.ndim, logits.dtype)
            if class_weight is None
            else _trailing(class_weight, logits.ndim)
        )
        if mask is not None:
            smooth_weights = jnp.where(mask, smooth_weights, 0)
    # -log p_y = log sum_j exp(x_j - m) - (x_y - m) and sum_c w_c (-log p_c) are
    # computed in the shifted frame, so logits of 1e4 lose nothing to
    # `lse(x) - x_y` cancellation in float32, and in the same pass over the
    # logits as exp(x - m). The derivative rules (softmax minus one-hot, and
    # p sum_c w_c - w) live in `_closed_form`, shared with `jaxce.derivatives`.
    # Without a mask every class weight multiplies a logit as given (PyTorch:
    # a zero weight on a -inf logit is NaN); with one, excluded classes are
    # -inf logits of weight 0 that must contribute 0.
    row_max, log_normalizer, nll, smooth = _closed_form.softmax_terms(
        logits, labels, smooth_weights, mask is not None
    )

    counted, invalid = label_status(
        labels, num_classes, ignore_index, None if mask is None else jnp.any(mask, axis=-1)
    )

    if class_weight is None:
        label_weight = jnp.ones_like(nll)
    else:
        label_weight = class_weight[jnp.clip(labels, 0, num_classes - 1)]
    loss = label_weight * nll
    if smoothing_on:
        smoothing = jnp.asarray(label_smoothing, loss.dtype)
        loss = (1 - smoothing) * loss + (smoothing / num_classes) * smooth
    if class_weight is not None:
        _layout.check_class_weight_values(class_weight)
        loss = jnp.where(jnp.any(class_weight < 0), jnp.nan, loss)
    loss = jnp.where(counted, loss, 0)
    loss = jnp.where(invalid, jnp.nan, loss)

    if _checks.is_concrete_zero(z_loss):
        z_term = None
    else:
        log_partition = log_normalizer + row_max
        z_coefficient = jnp.asarray(z_loss, log_partition.dtype)
        # Uncounted rows (an empty row has log Z = -inf) stay out of the product.
        log_partition = jnp.where(counted, log_partition, 0)
        z_term = _closed_form.z_loss_term(z_coefficient, log_partition)
        z_term = jnp.where(counted, z_term, 0)

    if reduction == "none":
        return loss if z_term is None else loss + z_term
    if reduction == "sum":
        return jnp.sum(loss) if z_term is None else jnp.sum(loss) + jnp.sum(z_term)
    # PyTorch's weighted mean: divide by the summed weights of counted examples.
    count = jnp.sum(counted, dtype=loss.dtype)
    denominator = count if class_weight is None else jnp.sum(jnp.where(counted, label_weight, 0))
    mean = _reduce.safe_divide(jnp.sum(loss), denominator)
    # z-loss is not class-weighted: its mean is over counted examples.
    return mean if z_term is None else mean + _reduce.safe_divide(jnp.sum(z_term), count)


def softmax_cross_entropy_with_integer_labels(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int | Sequence[int] = -1,
    weight: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: ArrayLike = 0.0,
    z_loss: ArrayLike = 0.0,
    where: ArrayLike | None = None,
    reduction: str = "none",
) -> jax.Array:
    r"""Softmax cross-entropy with integer class labels (PyTorch's ``cross_entropy``).

    For logits :math:`x \in \mathbb{R}^C`, label :math:`y`, class weights
    :math:`w` (all ones by default) and smoothing :math:`\varepsilon`:

    .. math::
        \ell = (1 - \varepsilon)\, w_y\, (-\log p_y)
             + \frac{\varepsilon}{C} \sum_c w_c\, (-\log p_c)
             + z \,(\log \textstyle\sum_c e^{x_c})^2,
        \qquad p = \operatorname{softmax}(x).

    ``reduction="mean"`` divides the summed cross-entropy by the summed
    :math:`w_y` of counted examples (PyTorch's weighted mean) and the summed
    z-loss by the number of counted examples. Examples whose label equals
    ``ignore_index``, or whose classes are all excluded by ``where``, are not
    counted; a mean over nothing is 0, with zero gradients (PyTorch: NaN).

    Args:
      logits: ``[..., num_classes]`` floating logits.
      labels: ``[...]`` integer class indices (the logits' shape without the
        class axes). With a tuple ``axis`` a label indexes the flattened class
        slice.
      axis: class axis, or a tuple of class axes.
      weight: ``[num_classes]`` non-negative class weights.
      ignore_index: label value of examples to skip (e.g. ``-100``).
      label_smoothing: :math:`\varepsilon \in [0, 1)`; may be traced.
      z_loss: coefficient :math:`z` of PaLM's auxiliary loss; may be traced.
      where: boolean mask, of the logits' shape (excluded classes get
        probability 0) or of the batch shape (excluded examples).
      reduction: ``"none"`` (``[...]``), ``"sum"`` or ``"mean"`` (scalars).

    Returns:
      The loss, float32 for half-precision logits (float64 for float64).

    Example:
      >>> import jax.numpy as jnp, jaxce
      >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
      >>> print(jaxce.softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 1])))
      [0.2761297 2.951799 ]

    Logits of ``+-1e30`` give finite losses and gradients. A ``-inf`` logit or
    an excluded class gets probability 0 and an exactly zero gradient. A label
    outside ``[0, num_classes)`` that is not ``ignore_index`` (negative ones
    included) gives that example a NaN loss; ``jaxce.checked`` raises instead.
    """
    logits = _checks.as_float_array(logits, "logits")
    labels = _checks.as_integer_labels(labels)
    _checks.check_reduction(reduction)
    _checks.check_unit_interval(label_smoothing, "label_smoothing")
    _checks.check_scalar(z_loss, "z_loss")
    if ignore_index is not None and not isinstance(ignore_index, int):
        raise TypeError(f"`ignore_index` must be an int or None, got {ignore_index!r}.")
    layout = _layout.ClassLayout.of(logits.shape, axis)
    labels = _layout.batch_labels(labels, layout)
    mask = layout.mask(where)
    class_weight = layout.class_weight(weight)
    compute = _checks.compute_dtype(logits)
    return integer_label_loss(
        layout.classes_last(logits).astype(compute),
        labels,
        mask=mask,
        class_weight=None if class_weight is None else class_weight.astype(compute),
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        reduction=reduction,
    )


def softmax_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int | Sequence[int] | None = -1,
    weight: ArrayLike | None = None,
    label_smoothing: ArrayLike = 0.0,
    where: ArrayLike | None = None,
    reduction: str = "none",
) -> jax.Array:
    r"""Softmax cross-entropy against probability (one-hot or soft) labels.

    .. math::
        \ell = -\sum_c w_c\, \tilde y_c \log p_c, \qquad
        \tilde y = (1 - \varepsilon)\, y + \varepsilon / C, \qquad
        p = \operatorname{softmax}(x).

    ``reduction="mean"`` divides by the number of examples, weights or not
    (PyTorch's rule for probability targets); examples excluded by ``where``
    are not counted.

    Args:
      logits: ``[..., num_classes]`` floating logits.
      labels: probabilities broadcastable to ``logits``' shape.
      axis: class axis or tuple of axes; ``None`` (as in optax): every axis.
      weight: ``[num_classes]`` class weights.
      label_smoothing: :math:`\varepsilon \in [0, 1)`; may be traced.
      where: boolean mask of the logits' shape (excluded classes take no part)
        or of the batch shape (excluded examples).
      reduction: ``"none"`` (``[...]``), ``"sum"`` or ``"mean"``.

    Returns:
      The loss, float32 for half-precision logits.

    Example:
      >>> import jax.numpy as jnp, jaxce
      >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
      >>> labels = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
      >>> print(jaxce.softmax_cross_entropy(logits, labels))
      [0.2761297 2.951799 ]

    A class with label 0 contributes 0 even when its logit is ``-inf``
    (:math:`0 \log 0 = 0`, where optax gives NaN); positive label mass on a
    ``-inf`` logit gives ``+inf``.
    """
    logits = _checks.as_float_array(logits, "logits")
    labels = _checks.as_float_array(labels, "labels")
    _checks.check_reduction(reduction)
    _checks.check_unit_interval(label_smoothing, "label_smoothing")
    if axis is None:
        axis = tuple(range(logits.ndim))
    layout = _layout.ClassLayout.of(logits.shape, axis)
    mask = layout.mask(where)
    class_weight = layout.class_weight(weight)
    compute = _checks.compute_dtype(logits)
    x = layout.classes_last(logits).astype(compute)
    targets = _layout.dense_labels(labels, layout).astype(compute)
    if not _checks.is_concrete_zero(label_smoothing):
        smoothing = jnp.asarray(label_smoothing, compute)
        targets = (1 - smoothing) * targets + smoothing / layout.num_classes
    weighted_targets = (
        targets
        if class_weight is None
        else targets * _trailing(class_weight.astype(compute), x.ndim)
    )
    weighted_targets = jnp.broadcast_to(weighted_targets, x.shape)
    if mask is not None:
        x = jnp.where(mask, x, -jnp.inf)
        weighted_targets = jnp.where(mask, weighted_targets, 0)
    # -sum_c a_c log p_c = sum_c a_c (L - (x_c - m)) in the shifted frame, in
    # the pass that computes exp(x - m); a zero target contributes 0 even on a
    # -inf logit. The derivative rule (p sum_c a_c - a, and -log p for the
    # targets) lives in `_closed_form`, shared with `jaxce.derivatives`.
    _, _, _, loss = _closed_form.softmax_terms(x, None, weighted_targets, True)
    if class_weight is not None:
        _layout.check_class_weight_values(class_weight)
        loss = jnp.where(jnp.any(class_weight < 0), jnp.nan, loss)
    return _reduce.reduce_examples(loss, mask, reduction)
