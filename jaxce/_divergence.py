"""Kullback-Leibler divergence from log-predictions (optax's, with PyTorch ``kl_div``'s reductions)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxce import _checks, _layout, _reduce, _softmax

# The divergences' reductions: every loss's, and PyTorch `kl_div`'s "batchmean". Local to
# these two functions: `_reduce.Reduction` stays the one every other loss takes.
DivergenceReduction = Literal["none", "sum", "mean", "batchmean"]
DIVERGENCE_REDUCTIONS: tuple[DivergenceReduction, ...] = get_args(DivergenceReduction)


def check_reduction(reduction: DivergenceReduction) -> None:
    if reduction not in DIVERGENCE_REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {DIVERGENCE_REDUCTIONS}, got {reduction!r}.")


class DivergenceInputs(NamedTuple):
    """Checked inputs of a divergence, classes last, in the compute dtype."""

    layout: _layout.ClassLayout
    log_predictions: jax.Array  # 0 where `where` excludes
    targets: jax.Array  # t = exp(log t) for log targets; 0 where `where` excludes
    log_targets: jax.Array  # log t where t > 0 (anything elsewhere)
    mask: jax.Array | None
    valid_rows: jax.Array  # [*batch]: every included target valid
    batch_size: int  # "batchmean"'s denominator: the first axis of `log_predictions`


def divergence_inputs(
    log_predictions: ArrayLike,
    targets: ArrayLike,
    axis: int | Sequence[int] | None,
    where: ArrayLike | None,
    reduction: DivergenceReduction,
    *,
    log_target: bool,
) -> DivergenceInputs:
    """Checks and lays out the inputs; shared by both divergences and their closed forms.

    ``targets`` are probabilities, or their logs with ``log_target``. An
    included target outside ``[0, 1]`` (a log target above 0), NaN included,
    makes its row invalid, and `jaxce.checked` names it by its index in
    ``targets`` (broadcast to ``log_predictions``' shape). Excluded entries are
    replaced by ``0`` (``-inf`` for a log target): whatever they hold reaches
    neither the loss nor any gradient.
    """
    argument = "log_targets" if log_target else "targets"
    log_predictions = _checks.as_float_array(log_predictions, "log_predictions")
    targets = _checks.as_float_array(targets, argument)
    check_reduction(reduction)
    if axis is None:
        axis = tuple(range(log_predictions.ndim))
    layout = _layout.ClassLayout.of(log_predictions.shape, axis, "log_predictions")
    mask = layout.mask(where)
    compute = _checks.compute_dtype(log_predictions)
    predicted = layout.classes_last(log_predictions).astype(compute)
    given = _layout.dense_labels(targets, layout, argument).astype(compute)
    valid = given <= 0 if log_target else (given >= 0) & (given <= 1)
    if mask is not None:
        valid = valid | ~mask
        predicted = jnp.where(mask, predicted, 0)
        given = jnp.where(mask, given, -jnp.inf if log_target else 0)
    if _checks.checking_values(given):
        expectation = "log-probabilities (<= 0)" if log_target else "probabilities in [0, 1]"
        _checks.check_values(layout.unlayout(valid), layout.unlayout(given), argument, expectation)
    if log_target:
        probabilities, logs = jnp.exp(given), given
    else:
        positive = given > 0
        probabilities, logs = given, jnp.log(jnp.where(positive, given, 1))
    # `layout` has a class axis: `log_predictions` has at least one axis.
    batch_size = log_predictions.shape[0]
    return DivergenceInputs(
        layout, predicted, probabilities, logs, mask, jnp.all(valid, axis=-1), batch_size
    )


def _reduce_divergence(
    loss: jax.Array, inputs: DivergenceInputs, reduction: DivergenceReduction
) -> jax.Array:
    if reduction != "batchmean":
        return _reduce.reduce_examples(loss, inputs.mask, reduction)
    return _reduce.safe_divide(jnp.sum(loss), jnp.asarray(inputs.batch_size, loss.dtype))


def gradient_scale(inputs: DivergenceInputs, reduction: DivergenceReduction) -> jax.Array:
    """What the closed forms multiply ``-t`` by: 1, the mean's ``1 / n`` or ``1 / batch_size``."""
    dtype = inputs.log_predictions.dtype
    if reduction == "batchmean":
        return _reduce.safe_divide(jnp.ones((), dtype), jnp.asarray(inputs.batch_size, dtype))
    return _reduce.example_gradient_scale(inputs.mask, inputs.layout.batch_shape, reduction, dtype)


def _divergence(
    log_predictions: ArrayLike,
    targets: ArrayLike,
    axis: int | Sequence[int] | None,
    where: ArrayLike | None,
    reduction: DivergenceReduction,
    log_target: bool,
) -> jax.Array:
    inputs = divergence_inputs(
        log_predictions, targets, axis, where, reduction, log_target=log_target
    )
    t, predicted = inputs.targets, inputs.log_predictions
    positive = t > 0
    # t (log t - log q) where t > 0. A zero target contributes exactly 0 (0 log 0 = 0),
    # whatever its log prediction (-inf included, where optax gives NaN), but for NaN:
    # a NaN log prediction that takes part makes its row NaN.
    contribution = t * (inputs.log_targets - jnp.where(positive, predicted, 0))
    terms = jnp.where(positive, contribution, jnp.where(jnp.isnan(predicted), jnp.nan, 0))
    loss = jnp.where(inputs.valid_rows, jnp.sum(terms, axis=-1), jnp.nan)
    _softmax.check_logits(
        jnp.asarray(log_predictions), inputs.layout, inputs.mask, argument="log_predictions"
    )
    return _reduce_divergence(loss, inputs, reduction)


def kl_divergence(
    log_predictions: ArrayLike,
    targets: ArrayLike,
    axis: int | Sequence[int] | None = -1,
    where: ArrayLike | None = None,
    *,
    reduction: DivergenceReduction = "none",
) -> jax.Array:
    r"""Kullback-Leibler divergence of predictions from targets (optax's ``kl_divergence``).

    .. math::
        \ell = \mathrm{KL}(t \,\|\, q) = \sum_c t_c \left(\log t_c - \log q_c\right),
        \qquad 0 \log 0 = 0,

    with ``log_predictions`` :math:`\log q` (e.g. a ``log_softmax``) and
    probability ``targets`` :math:`t`. PyTorch's ``kl_div(log_predictions,
    targets)`` is the same sum, elementwise.

    Reductions: ``"none"`` (one divergence per example, summed over the class
    axes, optax's), ``"sum"``, ``"mean"`` (over the examples with an included
    class, as every jaxce loss of probability targets; for 2-D inputs this is
    PyTorch's ``"batchmean"``), and ``"batchmean"``: PyTorch's exactly, the
    total divided by ``log_predictions.shape[0]``, whatever ``axis`` and
    ``where`` are; for a 1-D input that is the number of classes, as in
    PyTorch. PyTorch's elementwise ``"mean"`` divides by
    every element: for 2-D inputs it is jaxce's ``"mean"`` divided by the
    number of classes. A mean over nothing is 0 (PyTorch: NaN).

    Args:
      log_predictions: ``[..., num_classes]`` log-probabilities :math:`\log q`
        (not checked: any floats, as optax and PyTorch take them).
      targets: probabilities :math:`t \in [0, 1]`, broadcastable to
        ``log_predictions``' shape.
      axis: class axis or tuple of axes; ``None``: every axis.
      where: boolean mask of ``log_predictions``' shape (excluded entries take
        no part) or of the batch shape (excluded examples).
      reduction: ``"none"`` (``[...]``), ``"sum"``, ``"mean"`` or
        ``"batchmean"``.

    Returns:
      The divergence, float32 for half-precision ``log_predictions``.

    Example:
      >>> import jax.numpy as jnp, jaxce
      >>> log_q = jnp.log(jnp.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]))
      >>> t = jnp.array([[0.25, 0.25, 0.5], [0.0, 1.0, 0.0]])
      >>> print(jaxce.kl_divergence(log_q, t))
      [0.1732868  0.22314353]

    A zero target contributes exactly 0, even where its log prediction is
    ``-inf`` (optax: NaN) or ``+inf``; a positive target on a ``-inf`` log
    prediction gives ``+inf``. A target outside ``[0, 1]`` (NaN included) or
    a NaN log prediction that ``where`` does not exclude makes that example's
    divergence NaN (``jaxce.checked`` raises, naming it).

    References:
      - S. Kullback and R. A. Leibler, "On Information and Sufficiency", Annals
        of Mathematical Statistics 22(1), 1951. https://doi.org/10.1214/aoms/1177729694
      - optax, ``optax.losses.kl_divergence``.
        https://optax.readthedocs.io/en/latest/api/losses.html
      - PyTorch, ``torch.nn.KLDivLoss`` (``"batchmean"``).
        https://pytorch.org/docs/stable/generated/torch.nn.KLDivLoss.html
    """
    return _divergence(log_predictions, targets, axis, where, reduction, log_target=False)


def kl_divergence_with_log_targets(
    log_predictions: ArrayLike,
    log_targets: ArrayLike,
    axis: int | Sequence[int] | None = -1,
    where: ArrayLike | None = None,
    *,
    reduction: DivergenceReduction = "none",
) -> jax.Array:
    r"""Kullback-Leibler divergence with targets in log space (optax's, PyTorch's ``log_target=True``).

    .. math::
        \ell = \sum_c e^{\log t_c} \left(\log t_c - \log q_c\right),

    :func:`kl_divergence` of :math:`t = e^{\log t}`, without taking the log
    of the targets (and so exact for targets too small for their float). The
    reductions are :func:`kl_divergence`'s, ``"batchmean"`` included.

    Args:
      log_predictions: ``[..., num_classes]`` log-probabilities :math:`\log q`.
      log_targets: log-probabilities :math:`\log t \le 0` (``-inf`` for a zero
        target), broadcastable to ``log_predictions``' shape.
      axis: class axis or tuple of axes; ``None``: every axis.
      where: boolean mask of ``log_predictions``' shape or of the batch shape.
      reduction: ``"none"`` (``[...]``), ``"sum"``, ``"mean"`` or
        ``"batchmean"``.

    Returns:
      The divergence, float32 for half-precision ``log_predictions``.

    Example:
      >>> import jax.numpy as jnp, jaxce
      >>> log_q = jnp.log(jnp.array([[0.5, 0.25, 0.25]]))
      >>> log_t = jnp.log(jnp.array([[0.25, 0.25, 0.5]]))
      >>> print(jaxce.kl_divergence_with_log_targets(log_q, log_t))
      [0.1732868]

    A ``-inf`` log target contributes exactly 0, whatever its log prediction
    (optax: NaN). A log target above 0 (NaN included) or a NaN log prediction
    that ``where`` does not exclude makes that example's divergence NaN
    (``jaxce.checked`` raises, naming it).

    References:
      - optax, ``optax.losses.kl_divergence_with_log_targets``.
        https://optax.readthedocs.io/en/latest/api/losses.html
      - PyTorch, ``torch.nn.KLDivLoss`` with ``log_target=True``.
        https://pytorch.org/docs/stable/generated/torch.nn.KLDivLoss.html
    """
    return _divergence(log_predictions, log_targets, axis, where, reduction, log_target=True)
