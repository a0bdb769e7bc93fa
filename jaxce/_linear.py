"""Linear + cross-entropy for large vocabularies."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxce import _checks, _softmax


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
    reduction: str = "mean",
) -> jax.Array:
    r"""Cross-entropy of ``softcap(hidden @ weight.T + bias)`` against integer labels.

    .. math::
        \ell = \mathrm{CE}(c \tanh((h W^\top + b) / c),\ y)

    with the semantics of :func:`softmax_cross_entropy_with_integer_labels`.
    ``shift=1`` is next-token prediction: ``hidden[..., t, :]`` predicts
    ``labels[..., t + 1]``.

    Args:
      hidden: ``[..., D]`` hidden states.
      weight: ``[V, D]`` output embedding.
      labels: ``[...]`` integer labels.
      bias: optional ``[V]``.
      ignore_index, label_smoothing, z_loss, reduction: as in
        :func:`softmax_cross_entropy_with_integer_labels`.
      softcap: Gemma 2's logit soft cap :math:`c`, or None.
      shift: 0, or 1 for next-token prediction.
      chunk_size: tokens per chunk (None: chosen from the shapes).

    Returns:
      The loss (float32 for half-precision inputs).

    Example:
      >>> import jax.numpy as jnp, jaxce
      >>> h, w = jnp.ones((2, 4)), jnp.zeros((3, 4))
      >>> print(f"{float(jaxce.linear_cross_entropy(h, w, jnp.array([0, 2]))):.6f}")
      1.098612
    """
    del chunk_size
    hidden = _checks.as_float_array(hidden, "hidden")
    weight = _checks.as_float_array(weight, "weight")
    labels = _checks.as_integer_labels(labels)
    _checks.check_reduction(reduction)
    if shift not in (0, 1):
        raise ValueError(f"`shift` must be 0 or 1, got {shift!r}.")
    if shift:
        hidden, labels = hidden[..., :-1, :], labels[..., 1:]
    compute = _checks.compute_dtype(hidden)
    logits = jnp.einsum("...d,vd->...v", hidden, weight, preferred_element_type=compute)
    if bias is not None:
        logits = logits + _checks.as_float_array(bias, "bias").astype(compute)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    return _softmax.softmax_cross_entropy_with_integer_labels(
        logits,
        labels,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        reduction=reduction,
    )
