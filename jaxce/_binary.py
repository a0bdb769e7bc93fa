"""Binary (log-sigmoid) cross-entropy and focal loss from logits."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxce import _checks, _formulas, _reduce
from jaxce._reduce import Reduction


def elementwise_inputs(
    logits: ArrayLike,
    labels: ArrayLike,
    where: ArrayLike | None,
    reduction: Reduction,
    argument: str = "logits",
) -> tuple[jax.Array, jax.Array, jax.Array | None, Any]:
    """Checks and converts the inputs every elementwise loss shares.

    Returns logits and labels in the compute dtype, the mask broadcast to the
    logits' shape (or None), and the original dtype of `logits`. A NaN logit
    that takes part fails under `jaxce.checked` (probabilities have their own
    check, NaN included).
    """
    logits = _checks.as_float_array(logits, argument)
    labels = jnp.asarray(labels)
    if not (
        jnp.issubdtype(labels.dtype, jnp.floating)
        or jnp.issubdtype(labels.dtype, jnp.integer)
        or labels.dtype == jnp.bool_
    ):
        raise TypeError(f"`labels` must be numeric (0/1 or probabilities), got {labels.dtype}.")
    _checks.check_broadcastable(labels, logits.shape, "labels", f"`{argument}`")
    _checks.check_reduction(reduction)
    compute = _checks.compute_dtype(logits)
    logits = logits.astype(compute)
    labels = jnp.broadcast_to(labels.astype(compute), logits.shape)
    mask = None
    if where is not None:
        mask = jnp.broadcast_to(_checks.as_mask(where, logits.shape), logits.shape)
    if argument == "logits":
        _checks.check_not_nan(logits, mask, "logits")
    if mask is not None:
        # An excluded element takes no part, in the loss or in any gradient: a
        # NaN there must not reach the gradient through `0 * NaN`.
        logits = jnp.where(mask, logits, 0)
        labels = jnp.where(mask, labels, 0)
    return logits, labels, mask, compute


def elementwise_weight(
    weight: ArrayLike | None, shape: tuple[int, ...], argument: str
) -> jax.Array | None:
    if weight is None:
        return None
    weight = _checks.as_float_array(weight, argument)
    _checks.check_broadcastable(weight, shape, argument, "`logits`")
    return jnp.broadcast_to(weight, shape)


@jax.custom_jvp
def softplus_pair(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(softplus(x), softplus(-x)) = (-log(1 - sigmoid(x)), -log sigmoid(x))``.

    Both share ``log1p(exp(-|x|))``: softplus(x) = max(x, 0) + log1p(exp(-|x|)),
    which never overflows, and the pair costs one exp and one log1p. The JVP is
    written out because autodiff of ``max`` and ``|x|`` at the kink ``x = 0``
    gives 1 instead of ``sigmoid(0) = 0.5``.
    """
    tail = jnp.log1p(jnp.exp(-jnp.abs(x)))
    # -min(x, 0) is max(-x, 0) exactly; spelt this way XLA:CPU fuses the pair
    # into the loss's reduction instead of materialising -x (measured).
    return jnp.maximum(x, 0) + tail, -jnp.minimum(x, 0) + tail


@softplus_pair.defjvp
def _softplus_pair_jvp(
    primals: tuple[jax.Array], tangents: tuple[jax.Array]
) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    (x,), (tangent,) = primals, tangents
    # d softplus(x) / dx = sigmoid(x); d softplus(-x) / dx = -sigmoid(-x).
    return softplus_pair(x), (jax.nn.sigmoid(x) * tangent, -jax.nn.sigmoid(-x) * tangent)


def sigmoid_binary_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    weight: ArrayLike | None = None,
    pos_weight: ArrayLike | None = None,
    label_smoothing: ArrayLike = 0.0,
    where: ArrayLike | None = None,
    reduction: Reduction = "none",
) -> jax.Array:
    r"""Binary cross-entropy from logits (PyTorch's ``binary_cross_entropy_with_logits``).

    .. math::
        \ell = -w \left[ p_w\, \tilde y \log \sigma(x) + (1 - \tilde y) \log(1 - \sigma(x)) \right],
        \qquad \tilde y = (1 - \varepsilon)\, y + \varepsilon / 2

    (Keras' binary label smoothing), computed as
    :math:`w [p_w \tilde y\, \mathrm{softplus}(-x) + (1 - \tilde y)\, \mathrm{softplus}(x)]`.

    Args:
      logits: floating array, any shape.
      labels: 0/1 labels or probabilities, broadcastable to ``logits``.
      weight: elementwise weight broadcastable to ``logits`` (any sign, as in
        PyTorch).
      pos_weight: weight of positive examples, broadcastable to ``logits``
        (PyTorch: one per class along the last axis; any sign); may be traced.
      label_smoothing: :math:`\varepsilon \in [0, 1)`; may be traced.
      where: boolean mask broadcastable to ``logits``; excluded elements give 0.
      reduction: ``"none"`` (``logits``' shape), ``"sum"``, or ``"mean"`` over
        the (included) elements, weights or not.

    Returns:
      The loss, float32 for half-precision logits.

    Example:
      >>> import jax.numpy as jnp, jaxce
      >>> print(jaxce.sigmoid_binary_cross_entropy(jnp.array([0.0, 2.0]), jnp.array([1.0, 0.0])))
      [0.6931472 2.126928 ]

    Finite for all finite logits (``+-1e30`` included), with finite gradients.
    A NaN logit gives that element a NaN loss, unless ``where`` excludes it
    (then it has no effect, on the loss or on any gradient); a traced
    ``label_smoothing`` outside ``[0, 1)`` makes the loss NaN (``jaxce.checked``
    raises).

    References:
      - PyTorch, ``torch.nn.BCEWithLogitsLoss`` (``weight``, ``pos_weight``,
        reductions).
        https://pytorch.org/docs/stable/generated/torch.nn.BCEWithLogitsLoss.html
      - Keras, ``keras.losses.BinaryCrossentropy`` (``label_smoothing``).
        https://keras.io/api/losses/probabilistic_losses/
    """
    x, y, mask, _ = elementwise_inputs(logits, labels, where, reduction)
    _checks.check_unit_interval(label_smoothing, "label_smoothing")
    weight = elementwise_weight(weight, x.shape, "weight")
    pos_weight = elementwise_weight(pos_weight, x.shape, "pos_weight")
    if not _checks.is_concrete_zero(label_smoothing):
        y = _formulas.smoothed_targets(y, jnp.asarray(label_smoothing, x.dtype), 2)
    softplus_x, softplus_neg_x = softplus_pair(x)
    positive = y * softplus_neg_x
    if pos_weight is not None:
        positive = pos_weight.astype(x.dtype) * positive
    # (1 - y) s = s - y s: the same value, and no [..] temporary for `1 - y` on
    # XLA:CPU, so value and gradient take one pass each (measured).
    loss = positive + (softplus_x - y * softplus_x)
    if weight is not None:
        loss = weight.astype(x.dtype) * loss
    loss = _checks.nan_unless(
        _checks.option_valid(label_smoothing, "label_smoothing", high=1.0), loss
    )
    return _reduce.reduce_elements(loss, mask, reduction)


def sigmoid_focal_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    alpha: ArrayLike | None = None,
    gamma: ArrayLike = 2.0,
    where: ArrayLike | None = None,
    reduction: Reduction = "none",
) -> jax.Array:
    r"""Focal loss (Lin et al., 2017) from logits, as in ``optax.sigmoid_focal_loss``.

    .. math::
        \ell = a_t\, (1 - p_t)^\gamma\, \mathrm{BCE}(x, y), \qquad
        1 - p_t = y (1 - \sigma(x)) + (1 - y)\, \sigma(x), \qquad
        a_t = \alpha y + (1 - \alpha)(1 - y)

    (:math:`a_t = 1` when ``alpha`` is None). :math:`\log(1 - p_t)` is a
    log-sum-exp of log-sigmoids, so the modulating factor never underflows to
    ``0 ** 0``.

    Args:
      logits: floating array, any shape.
      labels: 0/1 labels or probabilities, broadcastable to ``logits``.
      alpha: weight of positives in ``[0, 1]``, or None; may be traced.
      gamma: focusing exponent :math:`\ge 0`; may be traced.
      where: boolean mask broadcastable to ``logits``.
      reduction: ``"none"``, ``"sum"`` or ``"mean"`` over included elements.

    Returns:
      The loss, float32 for half-precision logits.

    Example:
      >>> import jax.numpy as jnp, jaxce
      >>> print(jaxce.sigmoid_focal_loss(jnp.array([0.0]), jnp.array([1.0])))
      [0.1732868]

    Finite, with finite gradients, for all finite logits. A ``gamma`` below 0
    or an ``alpha`` outside ``[0, 1]`` (NaN included) raises ``ValueError``;
    traced, it makes the loss NaN (``jaxce.checked`` raises).

    References:
      - T.-Y. Lin, P. Goyal, R. Girshick, K. He and P. Dollár, "Focal Loss for
        Dense Object Detection", ICCV 2017. https://arxiv.org/abs/1708.02002
      - optax, ``optax.losses.sigmoid_focal_loss`` (same arguments and values).
        https://optax.readthedocs.io/en/latest/api/losses.html
    """
    x, y, mask, _ = elementwise_inputs(logits, labels, where, reduction)
    options = FocalOptions.of(alpha, gamma, x.dtype)
    softplus_x, softplus_neg_x = softplus_pair(x)
    cross_entropy = y * softplus_neg_x + (1 - y) * softplus_x
    # log(1 - p_t) = log(y e^{-softplus(x)} + (1 - y) e^{-softplus(-x)}).
    log_miss = jnp.logaddexp(safe_log(y) - softplus_x, safe_log(1 - y) - softplus_neg_x)
    loss = jnp.exp(options.gamma * log_miss) * cross_entropy
    if options.alpha is not None:
        loss = (options.alpha * y + (1 - options.alpha) * (1 - y)) * loss
    loss = _checks.nan_unless(options.valid, loss)
    return _reduce.reduce_elements(loss, mask, reduction)


class FocalOptions(NamedTuple):
    """``alpha`` (or None) and ``gamma`` in the compute dtype, checked."""

    alpha: jax.Array | None
    gamma: jax.Array
    valid: jax.Array | None  # traced options in range; None when both are concrete

    @classmethod
    def of(cls, alpha: ArrayLike | None, gamma: ArrayLike, dtype: Any) -> FocalOptions:
        """Checks ``gamma >= 0`` and ``alpha`` in ``[0, 1]`` when concrete (NaN fails).

        A traced one out of range cannot raise: ``valid`` is False (the loss
        is NaN, and `jaxce.checked` names it), and it is replaced by 0, so
        that no NaN reaches a gradient (zero, as for every invalid value).
        """
        _checks.check_nonnegative(gamma, "gamma")
        if alpha is not None:
            _checks.check_unit_interval(alpha, "alpha", closed_right=True)
        valid = _checks.all_valid(
            _checks.option_valid(gamma, "gamma"),
            None
            if alpha is None
            else _checks.option_valid(alpha, "alpha", high=1.0, closed_right=True),
        )
        gamma = jnp.asarray(gamma, dtype)
        alpha = None if alpha is None else jnp.asarray(alpha, dtype)
        if valid is not None:
            gamma = jnp.where(valid, gamma, 0)
            alpha = None if alpha is None else jnp.where(valid, alpha, 0)
        return cls(alpha, gamma, valid)


def safe_log(x: jax.Array) -> jax.Array:
    """``log(x)`` with ``log(0) = -inf`` and no ``inf`` in the gradient at 0."""
    positive = x > 0
    return jnp.where(positive, jnp.log(jnp.where(positive, x, 1)), -jnp.inf)
