r"""Closed-form gradients of every jaxce loss, with no autodiff inside.

``jaxce.derivatives.<loss>(<the loss's arguments>)`` returns the gradient of
that loss with respect to its first argument: of ``loss(...).sum()`` for
``reduction="none"`` and of the scalar for ``"sum"`` and ``"mean"``.
:func:`linear_cross_entropy` returns the gradients with respect to ``hidden``,
``weight`` and ``bias``.

Textbooks state the per-sample derivatives,
:math:`\sigma(x) - y` and :math:`\operatorname{softmax}(x) - y` with respect to
logits and :math:`-y/p + (1-y)/(1-p)` and :math:`-y/p` with respect to
probabilities. They are the gradients of ``reduction="sum"``; ``"mean"``
divides each by the mean's denominator :math:`n` (the number of elements or
examples, or PyTorch's summed class weights), the factor ``1/n`` that a
per-sample formula leaves out.

Conventions shared by every function here:

- Computed in float32 for half-precision inputs (float64 stays float64) and
  returned in the dtype of the argument it is the gradient of.
- Elements or classes excluded by ``where``, examples whose label is
  ``ignore_index``, and everything a mean over zero examples touches have an
  exactly zero gradient.
- Invalid values (a label outside ``[0, C)``, a probability outside ``[0, 1]``)
  make the loss NaN. The closed form then gives the affected elements a zero
  gradient, which is what ``jax.grad`` of the shipped loss gives; the NaN loss
  is the signal, and ``jaxce.checked`` raises. Negative weights are valid, as
  in PyTorch, and enter the gradients as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxce import (
    _binary,
    _checks,
    _closed_form,
    _divergence,
    _formulas,
    _integer_labels,
    _layout,
    _linear,
    _polynomial,
    _probabilities,
    _reduce,
    _softmax,
)
from jaxce._reduce import Reduction

__all__ = [
    "binary_cross_entropy",
    "categorical_cross_entropy",
    "linear_cross_entropy",
    "linear_distillation_loss",
    "log1m_sigmoid",
    "log_sigmoid",
    "log_softmax",
    "logsumexp",
    "sigmoid_binary_cross_entropy",
    "sigmoid_focal_loss",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
]


def _sigmoid(x: jax.Array) -> jax.Array:
    # 1 / (1 + e^-x) for x >= 0 and e^x / (1 + e^x) otherwise: no exp overflows.
    decay = jnp.exp(-jnp.abs(x))
    return jnp.where(x >= 0, 1 / (1 + decay), decay / (1 + decay))


def log_sigmoid(x: ArrayLike) -> jax.Array:
    r"""Derivative of :func:`jaxce.log_sigmoid`: :math:`\frac{d}{dx}\log\sigma(x) = \sigma(-x)`.

    Args:
      x: any floating array.

    Returns:
      :math:`\sigma(-x)`, ``x``'s shape and dtype (the gradient of
      ``log_sigmoid(x).sum()``).

    Example:
      >>> import jaxce.derivatives
      >>> print(jaxce.derivatives.log_sigmoid(0.0))
      0.5

    Finite for every ``x``; ``+-inf`` give ``0`` and ``1``.
    """
    x = _checks.as_float_array(x, "x")
    return _sigmoid(-x.astype(_checks.compute_dtype(x))).astype(x.dtype)


def log1m_sigmoid(x: ArrayLike) -> jax.Array:
    r"""Derivative of :func:`jaxce.log1m_sigmoid`: :math:`\frac{d}{dx}\log(1-\sigma(x)) = -\sigma(x)`.

    Args:
      x: any floating array.

    Returns:
      :math:`-\sigma(x)`, ``x``'s shape and dtype.

    Example:
      >>> import jaxce.derivatives
      >>> print(jaxce.derivatives.log1m_sigmoid(0.0))
      -0.5

    Finite for every ``x``.
    """
    x = _checks.as_float_array(x, "x")
    return (-_sigmoid(x.astype(_checks.compute_dtype(x)))).astype(x.dtype)


def _softmax_parts(
    x: jax.Array, mask: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(p, log_normalizer, row_max, x)`` over the last axis of compute-dtype ``x``.

    Excluded classes become ``-inf`` logits and go through
    `_closed_form.softmax_parts`, the function the losses' derivative rule
    uses: ``p`` is 0 for excluded classes and for rows without any finite
    logit, never NaN.
    """
    if mask is not None:
        x = jnp.where(mask, x, -jnp.inf)
    row_max, log_normalizer, p, _ = _closed_form.softmax_parts(x)
    return p, log_normalizer, row_max, x


def logsumexp(
    x: ArrayLike, axis: int | Sequence[int] | None = -1, where: ArrayLike | None = None
) -> jax.Array:
    r"""Derivative of :func:`jaxce.logsumexp`: :math:`\partial_j \log\sum_c e^{x_c} = p_j`.

    :math:`p = \operatorname{softmax}(x)` over ``axis``, 0 for excluded entries.

    Args:
      x: floating array.
      axis: reduced axis or axes (``None``: all).
      where: optional boolean mask broadcastable to ``x``.

    Returns:
      ``softmax(x)``, ``x``'s shape and dtype (the gradient of ``logsumexp(x).sum()``).

    Example:
      >>> import jax.numpy as jnp, jaxce.derivatives
      >>> print(jaxce.derivatives.logsumexp(jnp.array([0.0, 0.0])))
      [0.5 0.5]

    A row whose entries are all excluded or ``-inf`` has a zero gradient.
    """
    x = _checks.as_float_array(x, "x")
    # As `jaxce.logsumexp` takes it: None is every axis; a list of axes as a tuple.
    if axis is None:
        axis = tuple(range(x.ndim))
    elif isinstance(axis, Sequence):
        axis = tuple(axis)
    layout = _layout.ClassLayout.of(x.shape, axis)
    mask = None
    if where is not None:
        full = jnp.broadcast_to(_checks.as_mask(where, x.shape), x.shape)
        mask = layout.classes_last(full)
    x_last = layout.classes_last(x).astype(_checks.compute_dtype(x))
    p, _, _, _ = _softmax_parts(x_last, mask)
    return layout.unlayout(p).astype(x.dtype)


def log_softmax(
    x: ArrayLike, axis: int | Sequence[int] = -1, where: ArrayLike | None = None
) -> jax.Array:
    r"""Derivative of ``jaxce.log_softmax(x).sum()``: :math:`1 - K p_j`.

    :math:`\sum_i \log p_i = \sum_i x_i - K \log\sum_c e^{x_c}` over the
    :math:`K` included entries of a row, so :math:`\partial_j = 1 - K p_j`
    for included :math:`j` and 0 for excluded ones.

    Args:
      x: floating array.
      axis: class axis or axes.
      where: optional boolean mask broadcastable to ``x``.

    Returns:
      ``x``'s shape and dtype.

    Example:
      >>> import jax.numpy as jnp, jaxce.derivatives
      >>> print(jaxce.derivatives.log_softmax(jnp.array([0.0, 0.0])))
      [0. 0.]

    Entries excluded by ``where`` get a zero gradient.
    """
    x = _checks.as_float_array(x, "x")
    layout = _layout.ClassLayout.of(x.shape, axis)
    mask = None
    if where is not None:
        full = jnp.broadcast_to(_checks.as_mask(where, x.shape), x.shape)
        mask = layout.classes_last(full)
    x_last = layout.classes_last(x).astype(_checks.compute_dtype(x))
    p, _, _, _ = _softmax_parts(x_last, mask)
    if mask is None:
        gradient = 1 - x_last.shape[-1] * p
    else:
        included = jnp.sum(mask, axis=-1, keepdims=True, dtype=x_last.dtype)
        gradient = jnp.where(mask, 1 - included * p, 0)
    return layout.unlayout(gradient).astype(x.dtype)


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
    r"""Gradient of :func:`jaxce.sigmoid_binary_cross_entropy` with respect to ``logits``.

    With :math:`\ell = w[p_w \tilde y\, \mathrm{softplus}(-x) + (1-\tilde y)\,
    \mathrm{softplus}(x)]`, :math:`\mathrm{softplus}'(x) = \sigma(x)` and
    :math:`\mathrm{softplus}'(-x) \cdot (-1) = -\sigma(-x) = \sigma(x) - 1`:

    .. math::
        \frac{\partial \ell}{\partial x}
          = w\left[(1 - \tilde y)\,\sigma(x) - p_w \tilde y\,(1 - \sigma(x))\right]
          = w\left[(1 + (p_w - 1)\tilde y)\,\sigma(x) - p_w \tilde y\right],

    which is the textbook :math:`\sigma(x) - y` when :math:`w = p_w = 1`
    and there is no smoothing (:math:`\tilde y = (1-\varepsilon) y + \varepsilon/2`).
    That is the per-element gradient of ``"none"`` (of its sum) and of
    ``"sum"``; ``"mean"`` divides it by the number :math:`n` of included
    elements.

    Args:
      logits, labels, weight, pos_weight, label_smoothing, where, reduction:
        as in :func:`jaxce.sigmoid_binary_cross_entropy`.

    Returns:
      ``logits``' shape and dtype.

    Example:
      >>> import jax.numpy as jnp, jaxce.derivatives
      >>> x, y = jnp.array([0.0, 2.0]), jnp.array([1.0, 0.0])
      >>> print(jaxce.derivatives.sigmoid_binary_cross_entropy(x, y, reduction="mean"))
      [-0.25       0.4403985]

    Finite for every finite logit.
    """
    dtype = _checks.as_float_array(logits, "logits").dtype
    x, y, mask, _ = _binary.elementwise_inputs(logits, labels, where, reduction)
    _checks.check_unit_interval(label_smoothing, "label_smoothing")
    weight = _binary.elementwise_weight(weight, x.shape, "weight")
    pos_weight = _binary.elementwise_weight(pos_weight, x.shape, "pos_weight")
    y = jnp.broadcast_to(y, x.shape)
    if not _checks.is_concrete_zero(label_smoothing):
        y = _formulas.smoothed_targets(y, jnp.asarray(label_smoothing, x.dtype), 2)
    s = _sigmoid(x)
    if pos_weight is None:
        gradient = s - y
    else:
        pos_weight = jnp.broadcast_to(pos_weight, x.shape)
        pw = pos_weight.astype(x.dtype)
        gradient = (1 - y) * s - pw * y * (1 - s)
    if weight is not None:
        gradient = jnp.broadcast_to(weight, x.shape).astype(x.dtype) * gradient
    gradient = gradient * _reduce.element_gradient_scale(mask, x.shape, reduction, x.dtype)
    return jnp.broadcast_to(gradient, x.shape).astype(dtype)


def sigmoid_focal_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    alpha: ArrayLike | None = None,
    gamma: ArrayLike = 2.0,
    where: ArrayLike | None = None,
    reduction: Reduction = "none",
) -> jax.Array:
    r"""Gradient of :func:`jaxce.sigmoid_focal_loss` with respect to ``logits``.

    With :math:`s = \sigma(x)`, :math:`q = 1 - p_t = y(1-s) + (1-y)s`,
    :math:`\mathrm{CE} = y\,\mathrm{softplus}(-x) + (1-y)\,\mathrm{softplus}(x)`,
    :math:`\mathrm{CE}' = s - y` and :math:`q' = (1 - 2y)\,s(1-s)`, the product
    rule on :math:`\ell = a_t q^\gamma \mathrm{CE}` gives

    .. math::
        \frac{\partial \ell}{\partial x}
          = a_t\left[\gamma\, q^{\gamma - 1} (1 - 2y)\, s (1 - s)\, \mathrm{CE}
            + q^\gamma (s - y)\right].

    :math:`q^{\gamma-1} s (1-s)` is evaluated as
    :math:`\exp((\gamma - 1)\log q + \log s + \log(1-s))` with every log from
    log-sigmoids, so it neither overflows when :math:`q \to 0` nor rounds
    :math:`s(1-s)` to 0. For :math:`\gamma = 0` this is the BCE gradient
    :math:`a_t(s - y)`. Per element for ``"none"``/``"sum"``; ``"mean"``
    divides by the number :math:`n` of included elements.

    Args:
      logits, labels, alpha, gamma, where, reduction: as in
        :func:`jaxce.sigmoid_focal_loss`.

    Returns:
      ``logits``' shape and dtype.

    Example:
      >>> import jax.numpy as jnp, jaxce.derivatives
      >>> print(jaxce.derivatives.sigmoid_focal_loss(jnp.array([0.0]), jnp.array([1.0])))
      [-0.2982868]

    Finite for every finite logit.
    """
    dtype = _checks.as_float_array(logits, "logits").dtype
    x, y, mask, _ = _binary.elementwise_inputs(logits, labels, where, reduction)
    options = _binary.FocalOptions.of(alpha, gamma, x.dtype)
    y = jnp.broadcast_to(y, x.shape)
    g = options.gamma
    # log s = -softplus(-x), log(1 - s) = -softplus(x), both without overflow.
    log_s = -jnp.logaddexp(-x, 0)
    log_1ms = -jnp.logaddexp(x, 0)
    cross_entropy = -y * log_s - (1 - y) * log_1ms
    log_q = jnp.logaddexp(_binary.safe_log(y) + log_1ms, _binary.safe_log(1 - y) + log_s)
    modulation = jnp.exp(g * log_q)
    slope = jnp.exp((g - 1) * log_q + log_s + log_1ms)
    gradient = g * (1 - 2 * y) * slope * cross_entropy + modulation * (jnp.exp(log_s) - y)
    if options.alpha is not None:
        a = options.alpha
        gradient = (a * y + (1 - a) * (1 - y)) * gradient
    if options.valid is not None:  # a traced option out of range: NaN loss, zero gradient
        gradient = jnp.where(options.valid, gradient, 0)
    gradient = gradient * _reduce.element_gradient_scale(mask, x.shape, reduction, x.dtype)
    return jnp.broadcast_to(gradient, x.shape).astype(dtype)


def binary_cross_entropy(
    probs: ArrayLike,
    labels: ArrayLike,
    *,
    weight: ArrayLike | None = None,
    where: ArrayLike | None = None,
    reduction: Reduction = "none",
) -> jax.Array:
    r"""Gradient of :func:`jaxce.binary_cross_entropy` with respect to ``probs``.

    The textbook form :math:`\ell = -w[y \log p + (1-y)\log(1-p)]` gives

    .. math::
        \frac{\partial \ell}{\partial p} = w\left[-\frac{y}{p} + \frac{1-y}{1-p}\right]
          = w\,\frac{p - y}{p(1-p)}.

    Each log is clamped at -100 (PyTorch), so a term whose log is clamped
    (:math:`p \le e^{-100}`, or :math:`1 - p \le e^{-100}`) is constant and
    contributes 0: :math:`\ell` is flat there. Per element for
    ``"none"``/``"sum"``; ``"mean"`` divides by the number :math:`n` of
    included elements.

    Args:
      probs, labels, weight, where, reduction: as in
        :func:`jaxce.binary_cross_entropy`.

    Returns:
      ``probs``' shape and dtype.

    Example:
      >>> import jax.numpy as jnp, jaxce.derivatives
      >>> p, y = jnp.array([0.5, 0.2]), jnp.array([1.0, 0.0])
      >>> print(jaxce.derivatives.binary_cross_entropy(p, y))
      [-2.    1.25]

    :math:`y/p` overflows to ``inf`` in float32 for ``p`` below about ``y *
    3e-39`` (a subnormal ``p`` above :math:`e^{-100}`; as ``jax.grad``
    does), and is 0 where :math:`w y = 0`; a probability outside ``[0, 1]``
    (NaN loss) gives a zero gradient.
    """
    dtype = _checks.as_float_array(probs, "probs").dtype
    p, y, mask, _ = _binary.elementwise_inputs(probs, labels, where, reduction)
    weight = _binary.elementwise_weight(weight, p.shape, "weight")
    y = jnp.broadcast_to(y, p.shape)
    # d/dp max(log p, -100) = 1/p above the clamp (subnormal p included) and 0 below it.
    gradient = _probabilities.binary_slope(p, y, None if weight is None else weight.astype(p.dtype))
    gradient = jnp.where((p >= 0) & (p <= 1), gradient, 0)
    gradient = gradient * _reduce.element_gradient_scale(mask, p.shape, reduction, p.dtype)
    return jnp.broadcast_to(gradient, p.shape).astype(dtype)


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
    r"""Gradient of :func:`jaxce.categorical_cross_entropy` with respect to ``probs``.

    The textbook form :math:`\ell = -\sum_c w_c \tilde y_c \log p_c`
    (:math:`\tilde y = (1-\varepsilon) y + \varepsilon/C`) gives

    .. math::
        \frac{\partial \ell}{\partial p_c} = -\frac{w_c\, \tilde y_c}{p_c},

    with 0 where :math:`\tilde y_c = 0`, where the class is excluded by ``where``, and
    where the log is clamped at -100 (:math:`p_c \le e^{-100}`, PyTorch's
    clamp). The probabilities are independent inputs here (no softmax), so
    the rows do not sum to anything in particular. Per example for
    ``"none"``/``"sum"``; ``"mean"`` divides by the number :math:`n` of
    counted examples.

    Args:
      probs, labels, axis, weight, label_smoothing, where, reduction: as in
        :func:`jaxce.categorical_cross_entropy`.

    Returns:
      ``probs``' shape and dtype.

    Example:
      >>> import jax.numpy as jnp, jaxce.derivatives
      >>> p, y = jnp.array([[0.5, 0.25, 0.25]]), jnp.array([[1.0, 0.0, 0.0]])
      >>> print(jaxce.derivatives.categorical_cross_entropy(p, y))
      [[-2.  0.  0.]]

    A row with a probability outside ``[0, 1]`` (NaN loss), and a traced
    ``label_smoothing`` outside ``[0, 1)``, give a zero gradient.
    """
    inputs = _probabilities.categorical_inputs(
        probs, labels, axis, weight, where, reduction, label_smoothing
    )
    layout, p, targets, mask = inputs.layout, inputs.p, inputs.targets, inputs.mask
    compute = inputs.p.dtype
    take_part = targets != 0 if mask is None else mask & (targets != 0)
    gradient = _probabilities.clamped_log_slope(p, jnp.where(take_part, -targets, 0))
    in_range = (p >= 0) & (p <= 1)
    # Entries excluded by `where` take no part: their values are not checked.
    valid_row = jnp.all(in_range if mask is None else in_range | ~mask, axis=-1, keepdims=True)
    if inputs.valid is not None:
        valid_row = valid_row & inputs.valid
    gradient = jnp.where(valid_row, gradient, 0)
    gradient = gradient * _reduce.example_gradient_scale(
        mask, layout.batch_shape, reduction, compute
    )
    return layout.unlayout(gradient).astype(jnp.result_type(probs))


def _divergence_gradient(
    log_predictions: ArrayLike,
    targets: ArrayLike,
    axis: int | Sequence[int] | None,
    where: ArrayLike | None,
    reduction: _divergence.DivergenceReduction,
    log_target: bool,
) -> jax.Array:
    inputs = _divergence.divergence_inputs(
        log_predictions, targets, axis, where, reduction, log_target=log_target
    )
    # d/d log q_c of t_c (log t_c - log q_c) = -t_c; 0 where t_c = 0 (the term is 0),
    # where `where` excludes (t_c = 0 there) and on invalid rows (NaN loss).
    gradient = jnp.where(inputs.valid_rows[..., None], -inputs.targets, 0)
    gradient = gradient * _divergence.gradient_scale(inputs, reduction)
    return inputs.layout.unlayout(gradient).astype(jnp.result_type(log_predictions))


def kl_divergence(
    log_predictions: ArrayLike,
    targets: ArrayLike,
    axis: int | Sequence[int] | None = -1,
    where: ArrayLike | None = None,
    *,
    reduction: _divergence.DivergenceReduction = "none",
) -> jax.Array:
    r"""Gradient of :func:`jaxce.kl_divergence` with respect to ``log_predictions``.

    :math:`\ell = \sum_c t_c (\log t_c - \log q_c)` is linear in :math:`\log q`:

    .. math::
        \frac{\partial \ell}{\partial \log q_c} = -t_c,

    0 where :math:`t_c = 0` and where ``where`` excludes. Per example for
    ``"none"``/``"sum"``; ``"mean"`` divides by the number of counted
    examples, ``"batchmean"`` by ``log_predictions.shape[0]``.

    Args:
      log_predictions, targets, axis, where, reduction: as in
        :func:`jaxce.kl_divergence`.

    Returns:
      ``log_predictions``' shape and dtype.

    Example:
      >>> import jax.numpy as jnp, jaxce.derivatives
      >>> log_q, t = jnp.zeros((2, 2)), jnp.array([[0.25, 0.75], [1.0, 0.0]])
      >>> print(jaxce.derivatives.kl_divergence(log_q, t, reduction="batchmean"))
      [[-0.125 -0.375]
       [-0.5   -0.   ]]

    A row with a target outside ``[0, 1]`` (NaN loss) gives a zero gradient.
    """
    return _divergence_gradient(log_predictions, targets, axis, where, reduction, False)


def kl_divergence_with_log_targets(
    log_predictions: ArrayLike,
    log_targets: ArrayLike,
    axis: int | Sequence[int] | None = -1,
    where: ArrayLike | None = None,
    *,
    reduction: _divergence.DivergenceReduction = "none",
) -> jax.Array:
    r"""Gradient of :func:`jaxce.kl_divergence_with_log_targets` w.r.t. ``log_predictions``.

    .. math::
        \frac{\partial \ell}{\partial \log q_c} = -e^{\log t_c},

    0 where ``where`` excludes; scaled by the reduction as
    :func:`kl_divergence`'s.

    Args:
      log_predictions, log_targets, axis, where, reduction: as in
        :func:`jaxce.kl_divergence_with_log_targets`.

    Returns:
      ``log_predictions``' shape and dtype.

    Example:
      >>> import jax.numpy as jnp, jaxce.derivatives
      >>> log_q, log_t = jnp.zeros((1, 2)), jnp.log(jnp.array([[0.25, 0.75]]))
      >>> print(jaxce.derivatives.kl_divergence_with_log_targets(log_q, log_t))
      [[-0.25 -0.75]]

    A row with a log target above 0 (NaN loss) gives a zero gradient.
    """
    return _divergence_gradient(log_predictions, log_targets, axis, where, reduction, True)


def softmax_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | Sequence[int] | None = -1,
    where: ArrayLike | None = None,
    *,
    weight: ArrayLike | None = None,
    label_smoothing: ArrayLike = 0.0,
    reduction: Reduction = "none",
) -> jax.Array:
    r"""Gradient of :func:`jaxce.softmax_cross_entropy` with respect to ``logits``.

    With :math:`a_c = w_c \tilde y_c` (:math:`\tilde y = (1-\varepsilon) y +
    \varepsilon/C`) and :math:`\partial \log p_c / \partial x_j = \delta_{cj} - p_j`,

    .. math::
        \frac{\partial \ell}{\partial x_j} = -\sum_c a_c (\delta_{cj} - p_j)
          = p_j \sum_c a_c - a_j,

    the textbook :math:`\operatorname{softmax}(x) - y` when the labels sum to
    1, there are no class weights and no smoothing. Classes excluded by
    ``where`` have :math:`p_j = 0` and take no part (gradient 0). Per example
    for ``"none"``/``"sum"``; ``"mean"`` divides by the number :math:`n` of
    counted examples (weights or not, PyTorch's rule for probability targets).

    Args:
      logits, labels, axis, weight, label_smoothing, where, reduction: as in
        :func:`jaxce.softmax_cross_entropy`.

    Returns:
      ``logits``' shape and dtype.

    Example:
      >>> import jax.numpy as jnp, jaxce.derivatives
      >>> x, y = jnp.array([[0.0, 0.0]]), jnp.array([[1.0, 0.0]])
      >>> print(jaxce.derivatives.softmax_cross_entropy(x, y))
      [[-0.5  0.5]]

    Finite for logits of ``+-1e30`` and ``-inf`` (a ``-inf`` class has
    :math:`p_j = 0`); a row without any finite logit has a zero gradient.
    """
    inputs = _softmax.soft_label_inputs(logits, labels, axis, where, reduction, label_smoothing)
    layout, x, mask = inputs.layout, inputs.x, inputs.mask
    weighted = _softmax.class_weighted(inputs.targets, layout.class_weight(weight), mask)
    p, _, _, _ = _softmax_parts(x, mask)
    # p_j sum_c a_c - a_j: the function the loss's derivative rule uses.
    gradient = _closed_form.weighted_gradient(p, weighted)
    return _soft_label_gradient(gradient, inputs, reduction, logits, inputs.valid)


def _soft_label_gradient(
    gradient: jax.Array,
    inputs: _softmax.SoftLabelInputs,
    reduction: Reduction,
    logits: ArrayLike,
    valid: jax.Array | None = None,
) -> jax.Array:
    """A soft-label loss's ``[*batch, C]`` gradient scaled by the reduction, 0 where an option
    is invalid (``valid`` False; the loss is NaN), back in the logits' layout and dtype."""
    layout, x = inputs.layout, inputs.x
    gradient = gradient * _reduce.example_gradient_scale(
        inputs.mask, layout.batch_shape, reduction, x.dtype
    )
    if valid is not None:
        gradient = jnp.where(valid, gradient, 0)
    return layout.unlayout(gradient).astype(jnp.result_type(logits))


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
    r"""Gradient of :func:`jaxce.softmax_focal_loss` with respect to ``logits``.

    With :math:`a_c = \alpha_c \tilde y_c`, :math:`q_c = 1 - p_c` and
    :math:`\ell = -\sum_c a_c q_c^\gamma \log p_c`, the derivative with respect
    to :math:`\log p_c` (using :math:`\partial q_c / \partial \log p_c = -p_c`) is

    .. math::
        u_c = a_c \left[\gamma\, q_c^{\gamma - 1} p_c \log p_c - q_c^\gamma\right]
            = -a_c\, q_c^\gamma \left(1 + \gamma\, p_c\, \frac{-\log p_c}{q_c}\right),

    and :math:`\partial \log p_c / \partial x_j = \delta_{cj} - p_j` gives

    .. math::
        \frac{\partial \ell}{\partial x_j} = u_j - p_j \sum_c u_c.

    The second form of :math:`u_c` is bounded where the first is
    :math:`\infty \cdot 0` (:math:`p_c \to 1` with :math:`0 < \gamma < 1`):
    :math:`-\log p_c / q_c \to 1` there. For :math:`\gamma = 0`,
    :math:`\alpha = 1` it is :func:`softmax_cross_entropy`'s
    :math:`p_j \sum_c a_c - a_j`. Classes excluded by ``where`` get 0. Per
    example for ``"none"``/``"sum"``; ``"mean"`` divides by the number of
    counted examples.

    Args:
      logits, labels, alpha, gamma, axis, where, label_smoothing, reduction: as
        in :func:`jaxce.softmax_focal_loss`.

    Returns:
      ``logits``' shape and dtype.

    Example:
      >>> import jax.numpy as jnp, jaxce.derivatives
      >>> x, y = jnp.array([[0.0, 0.0]]), jnp.array([[1.0, 0.0]])
      >>> print(jaxce.derivatives.softmax_focal_loss(x, y, alpha=1.0, gamma=1.0))
      [[-0.4232868  0.4232868]]

    Finite for logits of ``+-1e30`` and ``-inf``; a traced ``gamma`` or
    ``label_smoothing`` out of range (NaN loss) gives a zero gradient.
    """
    inputs = _polynomial.focal_inputs(
        logits, labels, alpha, gamma, axis, where, label_smoothing, reduction
    )
    soft = inputs.soft
    # The functions the loss's derivative rule uses.
    p, neg_log_p, miss = _closed_form.focal_parts(soft.x)
    slopes = _closed_form.focal_slopes(
        p, neg_log_p, miss, inputs.weights, inputs.gamma, inputs.included
    )
    gradient = _closed_form.focal_gradient(p, slopes)
    return _soft_label_gradient(gradient, soft, reduction, logits, inputs.valid)


def poly_loss_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    epsilon: ArrayLike = 2.0,
    axis: int | Sequence[int] | None = -1,
    where: ArrayLike | None = None,
    *,
    reduction: Reduction = "none",
) -> jax.Array:
    r"""Gradient of :func:`jaxce.poly_loss_cross_entropy` with respect to ``logits``.

    The cross-entropy's :math:`p_j \sum_c y_c - y_j` plus :math:`\epsilon` times
    the derivative of :math:`\sum_c y_c (1 - p_c)`, with
    :math:`\partial p_c / \partial x_j = p_c (\delta_{cj} - p_j)`:

    .. math::
        \frac{\partial \ell}{\partial x_j}
          = p_j \sum_c y_c - y_j - \epsilon \Big(y_j p_j - p_j \sum_c y_c p_c\Big).

    Classes excluded by ``where`` get 0. Per example for ``"none"``/``"sum"``;
    ``"mean"`` divides by the number of counted examples.

    Args:
      logits, labels, epsilon, axis, where, reduction: as in
        :func:`jaxce.poly_loss_cross_entropy`.

    Returns:
      ``logits``' shape and dtype.

    Example:
      >>> import jax.numpy as jnp, jaxce.derivatives
      >>> x, y = jnp.array([[0.0, 0.0]]), jnp.array([[1.0, 0.0]])
      >>> print(jaxce.derivatives.poly_loss_cross_entropy(x, y, epsilon=2.0))
      [[-1.  1.]]

    Finite for logits of ``+-1e30`` and ``-inf``; a traced ``epsilon`` that is
    not finite (NaN loss) gives a zero gradient.
    """
    inputs = _polynomial.poly_inputs(logits, labels, epsilon, axis, where, reduction)
    soft, targets = inputs.soft, inputs.targets
    p, _, _, _ = _softmax_parts(soft.x, soft.mask)
    hit = targets * p
    miss_gradient = p * jnp.sum(hit, axis=-1, keepdims=True) - hit
    gradient = _closed_form.weighted_gradient(p, targets) + inputs.epsilon * miss_gradient
    return _soft_label_gradient(gradient, soft, reduction, logits, inputs.valid)


def _integer_label_logit_gradient(
    x: jax.Array,
    labels: jax.Array,
    *,
    mask: jax.Array | None,
    class_weight: jax.Array | None,
    ignore_index: int | None,
    label_smoothing: ArrayLike,
    z_loss: ArrayLike,
    reduction: Reduction,
) -> jax.Array:
    """Gradient of the integer-label loss on `[..., C]` compute-dtype logits (classes last).

    Which examples count and what each term is scaled by (PyTorch's weighted
    mean) are `_integer_labels`' rules, the loss's own.
    """
    num_classes = x.shape[-1]
    p, log_normalizer, row_max, _ = _softmax_parts(x, mask)
    rule = _integer_labels.label_rule(
        labels,
        num_classes,
        class_weight=class_weight,
        ignore_index=ignore_index,
        row_included=None if mask is None else jnp.any(mask, axis=-1),
    )
    scales = _integer_labels.gradient_scales(rule, reduction, x.dtype)
    label_weight = rule.label_weight
    # d(-log p_y)/dx_j = p_j - [j = y]; every formula below is the one the
    # loss's derivative rule uses (`jaxce._closed_form`).
    gradient = _closed_form.label_gradient(p, labels)
    if label_weight is not None:
        gradient = label_weight[..., None] * gradient
    smooth = None
    if not _checks.is_concrete_zero(label_smoothing):
        # d/dx_j sum_c w_c (-log p_c) = p_j sum_c w_c - w_j.
        weights = jnp.ones((num_classes,), x.dtype) if class_weight is None else class_weight
        weights = _layout.per_class(weights, x.ndim)
        smooth = _closed_form.weighted_gradient(
            p, weights if mask is None else jnp.where(mask, weights, 0)
        )
    gradient = _integer_labels.mix(gradient, smooth, label_smoothing, num_classes)
    gradient = gradient * scales.cross_entropy[..., None]

    if not _checks.is_concrete_zero(z_loss):
        # d/dx_j z (log Z)^2 = 2 z log Z p_j; under "mean" averaged over counted examples.
        log_partition = jnp.where(rule.counted, log_normalizer + row_max, 0)
        z_coefficient = jnp.asarray(z_loss, x.dtype)
        z_gradient = _closed_form.z_loss_gradient(p, z_coefficient, log_partition)
        gradient = gradient + z_gradient * scales.z_loss[..., None]
    if mask is not None:
        # An excluded class is not a variable of the loss: its gradient is 0
        # (also when the mean's scale is infinite: counted weights summing to 0).
        gradient = jnp.where(mask, gradient, 0)
    return gradient


def softmax_cross_entropy_with_integer_labels(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | Sequence[int] = -1,
    where: ArrayLike | None = None,
    *,
    weight: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: ArrayLike = 0.0,
    z_loss: ArrayLike = 0.0,
    reduction: Reduction = "none",
) -> jax.Array:
    r"""Gradient of :func:`jaxce.softmax_cross_entropy_with_integer_labels` w.r.t. ``logits``.

    For one example with label :math:`y`, :math:`\partial(-\log p_c)/\partial
    x_j = p_j - \delta_{cj}`, so

    .. math::
        \frac{\partial \ell}{\partial x_j}
          = (1 - \varepsilon)\, w_y (p_j - \delta_{yj})
          + \frac{\varepsilon}{C}\Big(p_j \sum_c w_c - w_j\Big)
          + 2 z \log Z\, p_j,
        \qquad \log Z = \log \textstyle\sum_c e^{x_c},

    the textbook :math:`\operatorname{softmax}(x) - \text{onehot}(y)` when
    :math:`w = 1`, :math:`\varepsilon = z = 0`. The sums run over the classes
    ``where`` includes; excluded classes get 0. Per example for
    ``"none"``/``"sum"``; under ``"mean"`` the cross-entropy terms are divided
    by :math:`n = \sum w_y` over counted examples (their number without
    class weights) and the z-loss term by the number of counted examples.
    Ignored examples, and examples whose classes are all excluded, get 0.

    Args:
      logits, labels, axis, where, weight, ignore_index: as in
        :func:`jaxce.softmax_cross_entropy_with_integer_labels`.
      label_smoothing, z_loss, reduction: as there.

    Returns:
      ``logits``' shape and dtype.

    Example:
      >>> import jax.numpy as jnp, jaxce.derivatives
      >>> x = jnp.array([[0.0, 0.0], [0.0, 0.0]])
      >>> g = jaxce.derivatives.softmax_cross_entropy_with_integer_labels
      >>> print(g(x, jnp.array([0, 1]), reduction="mean"))
      [[-0.25  0.25]
       [ 0.25 -0.25]]

    Finite for logits of ``+-1e30`` and ``-inf``. An out-of-range label (NaN
    loss) gives its example a zero gradient and leaves the mean's denominator
    alone, as ``jax.grad`` of the loss does.
    """
    logits = _checks.as_float_array(logits, "logits")
    labels = _checks.as_integer_labels(labels)
    _integer_labels.check_options(reduction, label_smoothing, z_loss, ignore_index)
    layout = _layout.ClassLayout.of(logits.shape, axis)
    _layout.require_classes(layout)
    labels = _layout.batch_labels(labels, layout)
    mask = layout.mask(where)
    class_weight = layout.class_weight(weight)
    compute = _checks.compute_dtype(logits)
    gradient = _integer_label_logit_gradient(
        layout.classes_last(logits).astype(compute),
        labels,
        mask=mask,
        class_weight=None if class_weight is None else class_weight.astype(compute),
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        reduction=reduction,
    )
    return layout.unlayout(gradient).astype(logits.dtype)


def linear_cross_entropy(
    hidden: ArrayLike,
    weight: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: ArrayLike = 0.0,
    z_loss: ArrayLike = 0.0,
    softcap: float | None = None,
    shift: int = 0,
    chunk_size: int | None = None,
    plan: _linear.LinearCrossEntropyPlan | None = None,
    reduction: Reduction = "mean",
    temperature: ArrayLike | None = None,
    token_weights: ArrayLike | None = None,
    vocab_size: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    r"""Gradients of :func:`jaxce.linear_cross_entropy` w.r.t. ``hidden``, ``weight``, ``bias``.

    With logits :math:`u = h W^\top + b`, capped logits :math:`s = c \tanh(u / c)`
    and :math:`G = \partial \ell / \partial s` the integer-label gradient of
    :func:`softmax_cross_entropy_with_integer_labels` (per token), the chain rule
    through :math:`\partial s / \partial u = 1 - \tanh^2(u / c)` gives

    .. math::
        G_u = G \odot (1 - \tanh^2(u/c)), \qquad
        \frac{\partial \ell}{\partial h} = G_u W, \qquad
        \frac{\partial \ell}{\partial W} = G_u^\top h, \qquad
        \frac{\partial \ell}{\partial b} = \textstyle\sum_{\text{tokens}} G_u

    (:math:`G_u = G` without a soft cap). With ``shift=1`` the last position
    of each sequence predicts nothing and gets a zero ``hidden`` gradient.
    The default ``reduction="mean"`` divides by the number of counted tokens.

    Args:
      hidden, weight, labels, bias, ignore_index, label_smoothing: as in
        :func:`jaxce.linear_cross_entropy`.
      z_loss, softcap, shift, reduction: as there.
      temperature, token_weights, vocab_size: as there (the temperature
        divides :math:`s`, so :math:`G_u` gains a factor :math:`1/T`; token
        weights scale each token's :math:`G`; padding rows get zero
        gradients).
      chunk_size, plan: as there; they do not change the result.

    Returns:
      ``(d_hidden, d_weight, d_bias)`` in the shapes and dtypes of ``hidden``,
      ``weight`` and ``bias``; ``d_bias`` is None without a bias.

    Example:
      >>> import jax.numpy as jnp, jaxce.derivatives
      >>> h, w = jnp.ones((2, 4)), jnp.zeros((3, 4))
      >>> dh, dw, db = jaxce.derivatives.linear_cross_entropy(h, w, jnp.array([0, 2]))
      >>> print([f"{float(v):.4f}" for v in dw[:, 0]])
      ['-0.1667', '0.3333', '-0.1667']

    These are computed by the code of the loss's own derivative rule
    (``jaxce._linear.gradients``: chunk by chunk, three matrix products, never
    the ``[N, V]`` logits, no autodiff), so the rule and this function are one
    implementation; ``python -m jaxce verify`` checks it against ``jax.grad``
    of an independent materialised formulation and finite differences.
    """
    options = _linear.Options(
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        temperature=temperature,
        shift=shift,
        token_weights=token_weights,
        vocab_size=vocab_size,
        chunk_size=chunk_size,
        plan=plan,
        reduction=reduction,
    )
    return _linear.gradients(hidden, weight, labels, bias, options)


def linear_distillation_loss(
    hidden: ArrayLike,
    weight: ArrayLike,
    teacher_hidden: ArrayLike,
    teacher_weight: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    temperature: ArrayLike = 1.0,
    beta: float = 0.0,
    hard_label_weight: ArrayLike = 0.0,
    ignore_index: int | None = None,
    reduction: Reduction = "mean",
    chunk_size: int | None = None,
    plan: _linear.LinearCrossEntropyPlan | None = None,
) -> tuple[jax.Array, jax.Array]:
    r"""Gradients of :func:`jaxce.linear_distillation_loss` w.r.t. ``hidden`` and ``weight``.

    With the student's tempered logits :math:`s = h W^\top / T`,
    :math:`Q = \operatorname{softmax}(s)`, the teacher's :math:`P` and
    :math:`M = \beta P + (1 - \beta) Q`, the gradient of the divergence with
    respect to :math:`s` is, per token,

    .. math::
        G = \begin{cases}
            Q - P & \beta = 0 \\
            Q \odot (\log Q - \log P - \mathrm{KL}(Q \,\|\, P)) & \beta = 1 \\
            (1 - \beta)\, Q \odot (\log Q - \log M - \mathrm{KL}(Q \,\|\, M)) & \text{otherwise}
        \end{cases}

    (from :math:`\partial \log Q_j / \partial s_k = [j = k] - Q_k`); with
    ``hard_label_weight`` :math:`\lambda` the logit gradient is
    :math:`G_z = (1 - \lambda) G / T + \lambda (\operatorname{softmax}(h W^\top) - e_y)`,
    and :math:`\partial \ell / \partial h = G_z W`,
    :math:`\partial \ell / \partial W = G_z^\top h`, divided by the
    counted tokens under ``"mean"``. The teacher's arguments get none.

    Args:
      hidden, weight, teacher_hidden, teacher_weight, labels: as in
        :func:`jaxce.linear_distillation_loss`.
      temperature, beta, hard_label_weight, ignore_index, reduction: as there.
      chunk_size, plan: as there; they do not change the result.

    Returns:
      ``(d_hidden, d_weight)`` in the shapes and dtypes of ``hidden`` and ``weight``.

    Computed by the code of the loss's own derivative rule (chunk by chunk,
    never the ``[N, V]`` logits, no autodiff); ``python -m jaxce verify``
    checks it against ``jax.grad`` of an independent materialised formulation.
    """
    return _linear.distill.gradients(
        hidden, weight, teacher_hidden, teacher_weight, labels,
        temperature=temperature, beta=beta, hard_label_weight=hard_label_weight,
        ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size, plan=plan,
    )  # fmt: skip
