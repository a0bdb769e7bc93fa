"""The integer-label loss with its per-row terms from the Pallas kernels.

`softmax_terms` returns what `jaxce._closed_form.softmax_terms` returns,
``(shift, log_normalizer, nll, smooth)`` per row, with a reverse-mode rule
(``custom_vjp``) instead of a forward-mode one: the forward kernel's per-row
shift ``m`` and log-normaliser ``L`` are all it saves (two float32 per row:
``m + L`` alone would round ``L`` away at logits of 1e30), and the backward
kernel turns the per-row cotangents into the ``[N, C]`` gradient in one pass.
The derivatives are `jaxce._closed_form`'s, per row:

- ``d L / dx = p`` (the shift is a constant, as there);
- ``d(-log p_y) / dx = p - onehot(y)``;
- ``d(sum_c w_c (-log p_c)) / dx = p sum_c w_c - w``, and ``-log p_c`` for ``w_c``.

Everything after the per-row terms (which examples count, class weights,
smoothing, z-loss, NaN for invalid input, reductions) is `_integer_labels`',
the same code the XLA path runs; JAX differentiates it into the per-row
cotangents the backward kernel takes.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxce import _checks, _formulas, _integer_labels
from jaxce._pallas import kernels
from jaxce._reduce import Reduction


def runs_kernel(logits: jax.Array, mask: jax.Array | None) -> bool:
    """Whether ``implementation="pallas"`` runs the kernel on these inputs.

    Not for float64 logits (the kernel computes in float32), for a ``where``
    mask per class (``[..., C]``: a per-example mask, ``[..., 1]``, is fine) or
    for an empty batch: those take the XLA path.
    """
    num_classes = logits.shape[-1]
    per_class_mask = mask is not None and mask.shape[-1] != 1 and num_classes != 1
    return logits.dtype != jnp.float64 and logits.size > 0 and not per_class_mask


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def softmax_terms(
    logits: jax.Array,
    labels: jax.Array,
    class_weight: jax.Array | None,
    row_included: jax.Array | None,
    spec: kernels.RowSpec,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """``(shift, log_normalizer, nll, smooth)``, float32 ``[N]``, of ``[N, C]`` logits.

    ``labels``: int32 ``[N]`` in ``[0, C)``; ``class_weight``: float32 ``[C]``
    for weighted smoothing, else None; ``smooth`` is None without smoothing.
    ``row_included``: bool ``[N]``, False for rows a ``where`` mask excludes
    (None: all), whose classes take no part in the class weights' gradient.
    """
    return _as_terms(kernels.forward(logits, labels, class_weight, spec))


def _as_terms(outputs: list[jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    shift, log_normalizer, nll = outputs[:3]
    return shift, log_normalizer, nll, outputs[3] if len(outputs) == 4 else None


def _softmax_terms_forward(
    logits: jax.Array,
    labels: jax.Array,
    class_weight: jax.Array | None,
    row_included: jax.Array | None,
    spec: kernels.RowSpec,
) -> tuple[Any, Any]:
    terms = _as_terms(kernels.forward(logits, labels, class_weight, spec))
    shift, log_normalizer, _, _ = terms
    return terms, (logits, labels, class_weight, row_included, shift, log_normalizer)


def _softmax_terms_backward(spec: kernels.RowSpec, residuals: Any, cotangents: Any) -> Any:
    logits, labels, class_weight, row_included, shift, log_normalizer = residuals
    # The shift is a constant (tangent 0, as in `_closed_form`): its cotangent plays no part.
    _, d_log_normalizer, d_nll, d_smooth = cotangents
    # The row's gradient: d_L p + d_nll (p - onehot(y)) + d_smooth (p W - w), W = sum_c w_c.
    on_probability = d_log_normalizer + d_nll
    if spec.smoothing is not None:
        total_weight = (
            jnp.float32(spec.num_classes) if class_weight is None else jnp.sum(class_weight)
        )
        on_probability = on_probability + d_smooth * total_weight
    coefficients = kernels.RowCoefficients(
        on_probability, d_nll, None if spec.smoothing is None else d_smooth
    )
    d_logits = kernels.backward(
        logits, labels, shift, log_normalizer, coefficients, class_weight, spec
    )
    d_class_weight = None
    if class_weight is not None:
        d_class_weight = _class_weight_gradient(
            logits, shift, log_normalizer, d_smooth, row_included
        )
    return d_logits, None, d_class_weight, None


def _class_weight_gradient(
    logits: jax.Array,
    shift: jax.Array,
    log_normalizer: jax.Array,
    d_smooth: jax.Array,
    row_included: jax.Array | None,
) -> jax.Array:
    """``sum_n d_smooth_n (-log p_nc)``, the smoothing term's gradient in the class weights.

    Plain XLA, a second read of the logits: only a loss differentiated with
    respect to ``weight`` uses it (under ``jit``, XLA drops it otherwise).
    """
    neg_log_p = log_normalizer[:, None] - (logits.astype(jnp.float32) - shift[:, None])
    included = None if row_included is None else row_included[:, None]
    return jnp.sum(_formulas.weighted_terms(d_smooth[:, None], neg_log_p, included), axis=0)


softmax_terms.defvjp(_softmax_terms_forward, _softmax_terms_backward)

# Called eagerly, `pallas_call` traces its kernel and compiles it again on every
# call (about 330 ms each): under `jit` the trace is cached per shape and spec.
# Inside a caller's `jit` this one is inlined. Only the terms are jitted: the
# label rules around them run in the caller's trace, where `jaxce.checked`
# reports an index into the whole batch under `vmap`.
_softmax_terms_jit = jax.jit(softmax_terms, static_argnums=4)


def integer_label_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    row_included: jax.Array | None,
    class_weight: jax.Array | None,
    ignore_index: int | None,
    label_smoothing: ArrayLike,
    z_loss: ArrayLike,
    reduction: Reduction,
) -> jax.Array:
    """`jaxce._softmax.integer_label_loss` with the per-row terms from the kernels.

    ``logits``: ``[..., C]`` in their own dtype (float32, bfloat16 or float16:
    the kernels upcast block by block, and the gradient comes back in that
    dtype); ``row_included``: ``[...]``, False for examples a ``where`` mask
    excludes (None: all included); ``class_weight``: float32 ``[C]`` or None.
    """
    batch_shape, num_classes = logits.shape[:-1], logits.shape[-1]
    smoothing: kernels.Smoothing | None = None
    if not _checks.is_concrete_zero(label_smoothing):
        smoothing = "uniform" if class_weight is None else "weighted"
    spec = kernels.RowSpec(
        num_classes,
        kernels.kernel_config(logits.dtype, num_classes),
        smoothing,
    )
    # Out-of-range labels are NaN (or ignored) by `_integer_labels`' rule; the
    # kernels read a class in range either way.
    kernel_labels = jnp.clip(labels, 0, num_classes - 1).astype(jnp.int32).reshape(-1)
    terms = _softmax_terms_jit(
        logits.reshape(-1, num_classes),
        kernel_labels,
        class_weight if smoothing == "weighted" else None,
        None if row_included is None else row_included.reshape(-1),
        spec,
    )
    shift, log_normalizer, nll, smooth = terms
    return _integer_labels.loss(
        labels,
        nll.reshape(batch_shape),
        None if smooth is None else smooth.reshape(batch_shape),
        (log_normalizer + shift).reshape(batch_shape),
        num_classes=num_classes,
        class_weight=class_weight,
        ignore_index=ignore_index,
        row_included=row_included,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        reduction=reduction,
    )
