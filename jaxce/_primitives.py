"""Numerically stable primitives: log-sigmoid, log-sum-exp, log-softmax."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxce import _checks, _formulas


def log_sigmoid(x: ArrayLike) -> jax.Array:
    r"""Stable :math:`\log \sigma(x) = -\operatorname{softplus}(-x)`.

    Args:
      x: any floating array.

    Returns:
      An array of ``x``'s shape and dtype.

    Example:
      >>> import jaxce
      >>> print(f"{float(jaxce.log_sigmoid(0.0)):.6f}")
      -0.693147

    Exact for all finite ``x``: ``log_sigmoid(-1e30) == -1e30`` (the naive
    ``log(sigmoid(x))`` gives ``-inf``), ``log_sigmoid(1e30) == 0``; the
    gradient ``sigmoid(-x)`` is finite everywhere.
    """
    x = _checks.as_float_array(x, "x")
    # log(1 / (1 + e^-x)) = -log1p(e^-x) = -softplus(-x); softplus(z) is
    # computed as max(z, 0) + log1p(exp(-|z|)), which never overflows.
    return -jnp.logaddexp(-x, jnp.zeros((), x.dtype))


def log1m_sigmoid(x: ArrayLike) -> jax.Array:
    r"""Stable :math:`\log(1 - \sigma(x)) = \log \sigma(-x) = -\operatorname{softplus}(x)`.

    Args:
      x: any floating array.

    Returns:
      An array of ``x``'s shape and dtype.

    Example:
      >>> import jaxce
      >>> print(f"{float(jaxce.log1m_sigmoid(0.0)):.6f}")
      -0.693147

    Never rounds ``1 - sigmoid(x)`` to 0: ``log1m_sigmoid(1e30) == -1e30``.
    """
    x = _checks.as_float_array(x, "x")
    # 1 - sigmoid(x) = sigmoid(-x), so this is log_sigmoid(-x) = -softplus(x).
    return -jnp.logaddexp(x, jnp.zeros((), x.dtype))


def shifted_logits(
    x: jax.Array, axes: tuple[int, ...], mask: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """Returns ``(x - m, m)`` with ``m`` the stop-gradient row max, excluded entries at ``-inf``.

    ``m`` is 0 for rows without a finite entry, so ``x - m`` never makes
    ``inf - inf = nan``.
    """
    if mask is not None:
        x = jnp.where(mask, x, -jnp.inf)
    row_max = _formulas.row_shift(x, axes)
    return x - row_max, row_max


def log_sum_exp_shifted(shifted: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """``log(sum(exp(shifted)))`` over ``axes`` (kept): ``-inf`` for an empty row, never NaN.

    The guard keeps ``log(0)`` out of the differentiated path, so an all-excluded
    row has a zero gradient instead of ``0 * inf = nan``.
    """
    return _formulas.log_of_total(jnp.sum(jnp.exp(shifted), axis=axes, keepdims=True))


def _float_axes(x: jax.Array, axis: int | Sequence[int] | None) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(x.ndim))
    if isinstance(axis, (int, np.integer)):
        return _checks.normalize_axes(int(axis), x.ndim, "x")
    return _checks.normalize_axes(tuple(axis), x.ndim, "x")


def logsumexp(
    x: ArrayLike, axis: int | Sequence[int] | None = -1, where: ArrayLike | None = None
) -> jax.Array:
    r"""Stable :math:`\log \sum_j \exp x_j` over ``axis``, counting only ``where``.

    Computed as :math:`m + \log \sum_j \exp(x_j - m)` with :math:`m` the
    (stop-gradient) maximum, in float32 for half-precision inputs.

    Args:
      x: floating array ``[..., num_classes]``.
      axis: axis or axes to reduce (``None``: all).
      where: optional boolean mask broadcastable to ``x``; excluded entries
        count as ``-inf``.

    Returns:
      ``x`` reduced over ``axis``, in ``x``'s dtype.

    Example:
      >>> import jax.numpy as jnp, jaxce
      >>> print(f"{float(jaxce.logsumexp(jnp.array([1e30, 1e30]))):.4g}")
      1e+30

    A row with every entry excluded or ``-inf`` gives ``-inf`` with a zero
    gradient (not NaN); ``+inf`` entries give ``+inf``.

    References:
      - P. Blanchard, D. J. Higham and N. J. Higham, "Accurately computing the
        log-sum-exp and softmax functions", IMA Journal of Numerical Analysis
        41(4), 2021. https://doi.org/10.1093/imanum/draa038
    """
    x = _checks.as_float_array(x, "x")
    axes = _float_axes(x, axis)
    mask = None if where is None else _checks.as_mask(where, x.shape)
    x_compute = x.astype(_checks.compute_dtype(x))
    shifted, row_max = shifted_logits(x_compute, axes, mask)
    # log sum_j exp(x_j) = m + log sum_j exp(x_j - m): no term exceeds 1.
    result = log_sum_exp_shifted(shifted, axes) + row_max
    return jnp.squeeze(result, axes).astype(x.dtype)


def log_softmax(
    x: ArrayLike, axis: int | Sequence[int] = -1, where: ArrayLike | None = None
) -> jax.Array:
    r"""Stable :math:`\log \operatorname{softmax}(x)_i = (x_i - m) - \log \sum_j \exp(x_j - m)`.

    Args:
      x: floating array ``[..., num_classes]``.
      axis: class axis or axes.
      where: optional boolean mask broadcastable to ``x``; excluded entries get
        probability 0 (log-probability ``-inf``) and a zero gradient.

    Returns:
      An array of ``x``'s shape and dtype.

    Example:
      >>> import jax.numpy as jnp, jaxce
      >>> print(jaxce.log_softmax(jnp.array([0.0, 0.0])))
      [-0.6931472 -0.6931472]

    Logits of ``+-1e30`` give finite log-probabilities (``0`` and ``-2e30``);
    an excluded or ``-inf`` entry gives ``-inf`` and no NaN in any gradient.

    References:
      - P. Blanchard, D. J. Higham and N. J. Higham, "Accurately computing the
        log-sum-exp and softmax functions", IMA Journal of Numerical Analysis
        41(4), 2021. https://doi.org/10.1093/imanum/draa038
    """
    x = _checks.as_float_array(x, "x")
    axes = _checks.normalize_axes(axis, x.ndim, "x")
    mask = None if where is None else _checks.as_mask(where, x.shape)
    x_compute = x.astype(_checks.compute_dtype(x))
    shifted, _ = shifted_logits(x_compute, axes, mask)
    result = shifted - log_sum_exp_shifted(shifted, axes)
    if mask is not None:
        result = jnp.where(mask, result, -jnp.inf)
    return result.astype(x.dtype)
