"""Softmax cross-entropy reshaped by powers of ``1 - p``: the softmax focal loss and Poly-1.

Both take probability labels and share `softmax_cross_entropy`'s inputs, layout and
log-softmax (`_softmax.soft_label_inputs`, `_closed_form`): the focal loss multiplies each
class's term by ``(1 - p_c)^gamma``, Poly-1 adds ``epsilon (1 - p)`` to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxce import _checks, _closed_form, _layout, _reduce, _softmax
from jaxce._reduce import Reduction


class FocalInputs(NamedTuple):
    """Checked inputs of `softmax_focal_loss`, classes last, in the compute dtype."""

    soft: _softmax.SoftLabelInputs
    weights: jax.Array  # a = alpha y~, 0 where `where` excludes
    included: jax.Array  # the classes that take part (`_softmax.soft_label_classes`)
    gamma: jax.Array  # 0 where a traced gamma is out of range
    valid: jax.Array | None  # traced options in range; None when all are concrete


def _class_alpha(alpha: ArrayLike, layout: _layout.ClassLayout) -> jax.Array | None:
    """``alpha`` as a ``[C]`` vector (or ``[1]`` for a scalar, the same weight for every class)."""
    if jnp.ndim(alpha) == 0:
        _checks.check_scalar(alpha, "alpha")
        return jnp.reshape(jnp.asarray(alpha), (1,))
    return layout.class_weight(alpha, "alpha")


def focal_inputs(
    logits: ArrayLike,
    labels: ArrayLike,
    alpha: ArrayLike,
    gamma: ArrayLike,
    axis: int | Sequence[int] | None,
    where: ArrayLike | None,
    label_smoothing: ArrayLike,
    reduction: Reduction,
) -> FocalInputs:
    """Checks and lays out the inputs; shared by the loss and its closed-form derivative.

    A concrete ``gamma`` below 0 (or NaN) raises; a traced one is replaced by 0
    and ``valid`` is False (the loss is NaN, `jaxce.checked` names it), so that
    no NaN reaches a gradient, as `sigmoid_focal_loss` does.
    """
    soft = _softmax.soft_label_inputs(logits, labels, axis, where, reduction, label_smoothing)
    _checks.check_nonnegative(gamma, "gamma")
    class_alpha = _class_alpha(alpha, soft.layout)
    gamma_valid = _checks.option_valid(gamma, "gamma")
    gamma_array = jnp.asarray(gamma, soft.x.dtype)
    if gamma_valid is not None:
        gamma_array = jnp.where(gamma_valid, gamma_array, 0)
    weights = _softmax.class_weighted(soft.targets, class_alpha, soft.mask)
    included = _softmax.soft_label_classes(soft.targets, soft.mask)
    valid = _checks.all_valid(soft.valid, gamma_valid)
    return FocalInputs(soft, weights, included, gamma_array, valid)


def softmax_focal_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    alpha: ArrayLike = 0.25,
    gamma: ArrayLike = 2.0,
    axis: int | Sequence[int] | None = -1,
    where: ArrayLike | None = None,
    label_smoothing: ArrayLike = 0.0,
    reduction: Reduction = "none",
) -> jax.Array:
    r"""Focal loss over a softmax (Keras' ``CategoricalFocalCrossentropy(from_logits=True)``).

    .. math::
        \ell = -\sum_c \alpha_c\, (1 - p_c)^\gamma\, \tilde y_c \log p_c, \qquad
        \tilde y = (1 - \varepsilon)\, y + \varepsilon / C, \qquad
        p = \operatorname{softmax}(x).

    :math:`\log p_c` is computed in the max-shifted frame and :math:`1 - p_c`
    as :math:`-\operatorname{expm1}(\log p_c)`, exact where :math:`p_c` is
    near 1; :math:`(1 - p)^0 = 1` exactly, also at :math:`p = 1`. With
    ``alpha=1, gamma=0`` it is :func:`softmax_cross_entropy`.
    ``reduction="mean"`` divides by the number of examples with an included
    class (as :func:`softmax_cross_entropy`; Keras' default averages the same
    per-example losses).

    Args:
      logits: ``[..., num_classes]`` floating logits.
      labels: probabilities (one-hot or soft) broadcastable to ``logits``' shape.
      alpha: weight of every class (a scalar) or ``[num_classes]`` per-class
        weights (Keras suggests inverse class frequencies; any sign, as
        PyTorch's class weights); may be traced.
      gamma: focusing exponent :math:`\gamma \ge 0`; may be traced.
      axis: class axis or tuple of axes (flattened in that order); ``None``:
        every axis.
      where: boolean mask of the logits' shape (excluded classes take no part)
        or of the batch shape (excluded examples).
      label_smoothing: :math:`\varepsilon \in [0, 1)` (Keras' definition); may
        be traced.
      reduction: ``"none"`` (``[...]``), ``"sum"`` or ``"mean"``.

    Returns:
      The loss, float32 for half-precision logits.

    Example:
      >>> import jax.numpy as jnp, jaxce
      >>> logits = jnp.array([[8.0, 1.0, 1.0], [2.0, 3.0, 5.0]])
      >>> print(jaxce.softmax_focal_loss(logits, jnp.eye(3)[jnp.array([0, 2])]))
      [1.5093714e-09 1.0360642e-03]

    Logits of ``+-1e30`` give finite losses and gradients, and so does
    :math:`p_c \to 1` with :math:`0 < \gamma < 1`, where the textbook
    derivative is ``inf * 0``. A class with label 0 contributes 0 even on a
    ``-inf`` logit; positive label mass there gives ``+inf``. A NaN logit of a
    class that takes part makes the example's loss NaN. A concrete ``gamma``
    below 0 or NaN raises ``ValueError``; a traced ``gamma`` below 0 or
    ``label_smoothing`` outside ``[0, 1)`` (NaN included) makes the loss NaN
    (``jaxce.checked`` raises).

    References:
      - T.-Y. Lin, P. Goyal, R. Girshick, K. He and P. Dollár, "Focal Loss for
        Dense Object Detection", ICCV 2017. https://arxiv.org/abs/1708.02002
      - Keras, ``keras.losses.CategoricalFocalCrossentropy`` (``alpha``,
        ``gamma``, ``label_smoothing``, ``from_logits=True``).
        https://keras.io/api/losses/probabilistic_losses/#categoricalfocalcrossentropy-class
    """
    inputs = focal_inputs(logits, labels, alpha, gamma, axis, where, label_smoothing, reduction)
    soft = inputs.soft
    # The closed form (u - p sum_c u_c) is the loss's derivative rule: `_closed_form`.
    loss = _closed_form.focal_terms(soft.x, inputs.weights, inputs.gamma, inputs.included)
    loss = _checks.nan_unless(inputs.valid, loss)
    _softmax.check_logits(jnp.asarray(logits), soft.layout, soft.mask)
    return _reduce.reduce_examples(loss, soft.mask, reduction)


class PolyInputs(NamedTuple):
    """Checked inputs of `poly_loss_cross_entropy`, classes last, in the compute dtype."""

    soft: _softmax.SoftLabelInputs
    targets: jax.Array  # y, 0 where `where` excludes
    epsilon: jax.Array  # 0 where a traced epsilon is not finite
    valid: jax.Array | None


def poly_inputs(
    logits: ArrayLike,
    labels: ArrayLike,
    epsilon: ArrayLike,
    axis: int | Sequence[int] | None,
    where: ArrayLike | None,
    reduction: Reduction,
) -> PolyInputs:
    """Checks and lays out the inputs; shared by the loss and its closed-form derivative."""
    soft = _softmax.soft_label_inputs(logits, labels, axis, where, reduction)
    _checks.check_finite(epsilon, "epsilon")
    valid = _checks.finite_valid(epsilon, "epsilon")
    epsilon_array = jnp.asarray(epsilon, soft.x.dtype)
    if valid is not None:
        epsilon_array = jnp.where(valid, epsilon_array, 0)
    targets = _softmax.class_weighted(soft.targets, None, soft.mask)
    return PolyInputs(soft, targets, epsilon_array, valid)


def poly_loss_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    epsilon: ArrayLike = 2.0,
    axis: int | Sequence[int] | None = -1,
    where: ArrayLike | None = None,
    *,
    reduction: Reduction = "none",
) -> jax.Array:
    r"""Poly-1 loss (Leng et al., 2022): cross-entropy plus :math:`\epsilon` times :math:`1 - p_t`.

    .. math::
        \ell = -\sum_c y_c \log p_c + \epsilon \sum_c y_c (1 - p_c), \qquad
        p = \operatorname{softmax}(x),

    optax's ``poly_loss_cross_entropy``: for one-hot labels the second term is
    :math:`\epsilon (1 - p_t)`, the first term of the expansion of
    :math:`-\log p_t` in powers of :math:`1 - p_t`, reweighted. The
    cross-entropy is :func:`softmax_cross_entropy`'s (the same shifted frame);
    ``reduction="mean"`` divides by the number of examples with an included
    class.

    Args:
      logits: ``[..., num_classes]`` floating logits.
      labels: probabilities (one-hot or soft) broadcastable to ``logits``' shape.
      epsilon: coefficient :math:`\epsilon` of the first polynomial term, any
        finite real (the paper: 2 for ImageNet classification, -1 for
        detection); may be traced. Positional, as in optax before 0.2.7.
      axis: class axis or tuple of axes; ``None``: every axis.
      where: boolean mask of the logits' shape (excluded classes take no part)
        or of the batch shape (excluded examples).
      reduction: ``"none"`` (``[...]``), ``"sum"`` or ``"mean"``.

    Returns:
      The loss, float32 for half-precision logits.

    Example:
      >>> import jax.numpy as jnp, jaxce
      >>> logits = jnp.array([[4.0, 2.0, 1.0], [0.0, 5.0, 1.0]])
      >>> labels = jnp.array([[1.0, 0.0, 0.0], [0.0, 0.8, 0.2]])
      >>> print(jaxce.poly_loss_cross_entropy(logits, labels))
      [0.48225665 1.2567039 ]

    Logits of ``+-1e30`` give finite losses and gradients. A class with label
    0 contributes 0 even on a ``-inf`` logit (optax: NaN); positive label mass
    there gives ``+inf``. A NaN logit of a class that takes part makes the
    example's loss NaN. A concrete ``epsilon`` that is NaN or infinite raises
    ``ValueError``; a traced one makes the loss NaN (``jaxce.checked`` raises).

    References:
      - Z. Leng, M. Tan, C. Liu, E. D. Cubuk, X. Shi, S. Cheng and D. Anguelov,
        "PolyLoss: A Polynomial Expansion Perspective of Classification Loss
        Functions", ICLR 2022. https://arxiv.org/abs/2204.12511
      - optax, ``optax.losses.poly_loss_cross_entropy`` (same arguments and
        values). https://optax.readthedocs.io/en/latest/api/losses.html
    """
    inputs = poly_inputs(logits, labels, epsilon, axis, where, reduction)
    soft, targets = inputs.soft, inputs.targets
    _, _, _, cross_entropy = _closed_form.softmax_terms(
        soft.x, None, targets, _softmax.soft_label_classes(soft.targets, soft.mask)
    )
    # sum_c y_c (1 - p_c), every term >= 0 (no cancellation), with p from the same
    # shifted exponentials (XLA computes exp(x - m) once for both).
    _, _, p, _ = _closed_form.softmax_parts(soft.x)
    miss = jnp.sum(targets * (1 - p), axis=-1)
    loss = _checks.nan_unless(inputs.valid, cross_entropy + inputs.epsilon * miss)
    _softmax.check_logits(jnp.asarray(logits), soft.layout, soft.mask)
    return _reduce.reduce_examples(loss, soft.mask, reduction)
