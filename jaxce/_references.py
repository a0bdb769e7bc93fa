"""Plain reference formulations of every loss, for `jaxce.verify`.

They share no code with the shipped losses: each is written from the
definition with `jax.nn` and `jax.numpy` only, without the stability tricks
(no shared shifted frame, no fused selects, no clamps beyond PyTorch's), so
that `jax.grad` of a reference is an independent witness. They are meant for
moderate inputs in float64; they check no arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def _reduce_mean(total: jax.Array, count: jax.Array) -> jax.Array:
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1), 0)


def _reduce(loss: jax.Array, included: jax.Array, reduction: str) -> jax.Array:
    loss = jnp.where(included, loss, 0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return jnp.sum(loss)
    return _reduce_mean(jnp.sum(loss), jnp.sum(included.astype(loss.dtype)))


def _move_classes_last(x: Any, axis: Any, ndim: int) -> jax.Array:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    axes = tuple(sorted(a % ndim for a in axes))
    x = jnp.moveaxis(jnp.asarray(x), axes, tuple(range(ndim - len(axes), ndim)))
    return x.reshape(*x.shape[: ndim - len(axes)], -1)


def _num_axes(axis: Any) -> int:
    return 1 if isinstance(axis, int) else len(axis)


def _per_class(weight: Any, ndim: int, dtype: Any) -> Any:
    """`[C]` (or class-shaped) weights as `[1, ..., 1, C]`; 1.0 without weights."""
    if weight is None:
        return 1.0
    return jnp.ravel(jnp.asarray(weight, dtype)).reshape((1,) * (ndim - 1) + (-1,))


def _class_mask(where: Any, shape: tuple[int, ...], axis: Any) -> jax.Array:
    """`where` of the full shape or of the batch shape, as `[*batch, C]`-broadcastable."""
    ndim = len(shape)
    if where is None:
        return jnp.ones((1,) * (ndim - _num_axes(axis)) + (1,), bool)
    where = jnp.asarray(where)
    if where.ndim == ndim:
        return _move_classes_last(jnp.broadcast_to(where, shape), axis, ndim)
    return where[..., None]


def sigmoid_binary_cross_entropy(
    logits, labels, *, weight=None, pos_weight=None, label_smoothing=0.0, where=None,
    reduction="none",
):  # fmt: skip
    x = jnp.asarray(logits)
    y = (
        jnp.broadcast_to(jnp.asarray(labels, x.dtype), x.shape) * (1 - label_smoothing)
        + 0.5 * label_smoothing
    )
    positive = 1.0 if pos_weight is None else jnp.broadcast_to(pos_weight, x.shape)
    loss = -(positive * y * jax.nn.log_sigmoid(x) + (1 - y) * jax.nn.log_sigmoid(-x))
    if weight is not None:
        loss = jnp.broadcast_to(weight, x.shape) * loss
    included = jnp.ones(x.shape, bool) if where is None else jnp.broadcast_to(where, x.shape)
    return _reduce(loss, included, reduction)


def sigmoid_focal_loss(logits, labels, *, alpha=None, gamma=2.0, where=None, reduction="none"):
    x = jnp.asarray(logits)
    y = jnp.broadcast_to(jnp.asarray(labels, x.dtype), x.shape)
    p = jax.nn.sigmoid(x)
    cross_entropy = -(y * jnp.log(p) + (1 - y) * jnp.log(1 - p))
    p_t = y * p + (1 - y) * (1 - p)
    loss = (1 - p_t) ** gamma * cross_entropy
    if alpha is not None:
        loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
    included = jnp.ones(x.shape, bool) if where is None else jnp.broadcast_to(where, x.shape)
    return _reduce(loss, included, reduction)


def binary_cross_entropy(probs, labels, *, weight=None, where=None, reduction="none"):
    p = jnp.asarray(probs)
    y = jnp.broadcast_to(jnp.asarray(labels, p.dtype), p.shape)
    loss = -(y * jnp.maximum(jnp.log(p), -100) + (1 - y) * jnp.maximum(jnp.log(1 - p), -100))
    if weight is not None:
        loss = jnp.broadcast_to(weight, p.shape) * loss
    included = jnp.ones(p.shape, bool) if where is None else jnp.broadcast_to(where, p.shape)
    return _reduce(loss, included, reduction)


def _example_reduce(loss: jax.Array, mask: jax.Array, reduction: str) -> jax.Array:
    counted = jnp.broadcast_to(jnp.any(mask, axis=-1), loss.shape)
    return _reduce(loss, counted, reduction)


def categorical_cross_entropy(
    probs, labels, *, axis=-1, weight=None, label_smoothing=0.0, where=None, reduction="none"
):
    probs = jnp.asarray(probs)
    p = _move_classes_last(probs, axis, probs.ndim)
    y = _move_classes_last(jnp.broadcast_to(labels, probs.shape), axis, probs.ndim)
    y = y.astype(p.dtype) * (1 - label_smoothing) + label_smoothing / p.shape[-1]
    mask = _class_mask(where, probs.shape, axis)
    w = _per_class(weight, p.ndim, p.dtype)
    terms = jnp.where(mask & (y != 0), w * y * jnp.maximum(jnp.log(p), -100), 0)
    return _example_reduce(-jnp.sum(terms, axis=-1), mask, reduction)


def _masked_log_softmax(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """log softmax over the included classes; 0 (not -inf) at excluded ones."""
    mask = jnp.broadcast_to(mask, x.shape)
    row_has_class = jnp.any(mask, axis=-1, keepdims=True)
    safe = jnp.where(mask, x, -jnp.inf)
    safe = jnp.where(row_has_class, safe, 0)
    log_z = jax.nn.logsumexp(safe, axis=-1, keepdims=True)
    return jnp.where(mask, x - log_z, 0), log_z


def softmax_cross_entropy(
    logits, labels, *, axis=-1, weight=None, label_smoothing=0.0, where=None, reduction="none"
):
    logits = jnp.asarray(logits)
    x = _move_classes_last(logits, axis, logits.ndim)
    y = _move_classes_last(jnp.broadcast_to(labels, logits.shape), axis, logits.ndim)
    y = y.astype(x.dtype) * (1 - label_smoothing) + label_smoothing / x.shape[-1]
    mask = _class_mask(where, logits.shape, axis)
    log_p, _ = _masked_log_softmax(x, mask)
    w = _per_class(weight, x.ndim, x.dtype)
    terms = jnp.where(mask & (y != 0), w * y * log_p, 0)
    return _example_reduce(-jnp.sum(terms, axis=-1), mask, reduction)


def softmax_focal_loss(
    logits, labels, *, alpha=0.25, gamma=2.0, axis=-1, where=None, label_smoothing=0.0,
    reduction="none",
):  # fmt: skip
    """Keras' categorical focal cross-entropy from logits: -sum_c alpha_c (1 - p_c)^gamma y_c log p_c."""
    logits = jnp.asarray(logits)
    if axis is None:
        axis = tuple(range(logits.ndim))
    x = _move_classes_last(logits, axis, logits.ndim)
    y = _move_classes_last(jnp.broadcast_to(labels, logits.shape), axis, logits.ndim)
    y = y.astype(x.dtype) * (1 - label_smoothing) + label_smoothing / x.shape[-1]
    mask = _class_mask(where, logits.shape, axis)
    log_p, _ = _masked_log_softmax(x, mask)
    p = jnp.where(mask, jnp.exp(log_p), 0)
    a = _per_class(alpha, x.ndim, x.dtype) * y
    terms = jnp.where(mask & (y != 0), a * (1 - p) ** gamma * log_p, 0)
    return _example_reduce(-jnp.sum(terms, axis=-1), mask, reduction)


def poly_loss_cross_entropy(logits, labels, epsilon=2.0, axis=-1, where=None, *, reduction="none"):
    """Leng et al.'s Poly-1: cross-entropy + epsilon sum_c y_c (1 - p_c)."""
    logits = jnp.asarray(logits)
    if axis is None:
        axis = tuple(range(logits.ndim))
    x = _move_classes_last(logits, axis, logits.ndim)
    y = _move_classes_last(jnp.broadcast_to(labels, logits.shape), axis, logits.ndim)
    y = y.astype(x.dtype)
    mask = _class_mask(where, logits.shape, axis)
    log_p, _ = _masked_log_softmax(x, mask)
    p = jnp.where(mask, jnp.exp(log_p), 0)
    cross_entropy = -jnp.sum(jnp.where(mask & (y != 0), y * log_p, 0), axis=-1)
    miss = jnp.sum(jnp.where(mask, y * (1 - p), 0), axis=-1)
    return _example_reduce(cross_entropy + epsilon * miss, mask, reduction)


def _divergence_reduce(loss, mask, reduction, shape):
    if reduction != "batchmean":
        return _example_reduce(loss, mask, reduction)
    return _reduce_mean(jnp.sum(loss), jnp.asarray(shape[0], loss.dtype))


def kl_divergence(log_predictions, targets, axis=-1, where=None, *, reduction="none"):
    """sum_c t_c (log t_c - log q_c), 0 log 0 = 0; "batchmean" divides by the first axis."""
    log_predictions = jnp.asarray(log_predictions)
    shape = log_predictions.shape
    if axis is None:
        axis = tuple(range(len(shape)))
    log_q = _move_classes_last(log_predictions, axis, len(shape))
    t = _move_classes_last(jnp.broadcast_to(targets, shape), axis, len(shape)).astype(log_q.dtype)
    mask = _class_mask(where, shape, axis)
    take_part = mask & (t > 0)
    terms = jnp.where(take_part, t * (jnp.log(jnp.where(take_part, t, 1)) - log_q), 0)
    return _divergence_reduce(jnp.sum(terms, axis=-1), mask, reduction, shape)


def kl_divergence_with_log_targets(
    log_predictions, log_targets, axis=-1, where=None, *, reduction="none"
):
    """sum_c exp(log t_c) (log t_c - log q_c)."""
    log_predictions = jnp.asarray(log_predictions)
    shape = log_predictions.shape
    if axis is None:
        axis = tuple(range(len(shape)))
    log_q = _move_classes_last(log_predictions, axis, len(shape))
    log_t = _move_classes_last(jnp.broadcast_to(log_targets, shape), axis, len(shape))
    log_t = log_t.astype(log_q.dtype)
    mask = _class_mask(where, shape, axis)
    terms = jnp.where(mask, jnp.exp(log_t) * (log_t - log_q), 0)
    return _divergence_reduce(jnp.sum(terms, axis=-1), mask, reduction, shape)


def softmax_cross_entropy_with_integer_labels(
    logits, labels, *, axis=-1, weight=None, ignore_index=None, label_smoothing=0.0,
    z_loss=0.0, where=None, reduction="none",
):  # fmt: skip
    logits = jnp.asarray(logits)
    x = _move_classes_last(logits, axis, logits.ndim)
    num_classes = x.shape[-1]
    labels = jnp.broadcast_to(jnp.asarray(labels), x.shape[:-1])
    mask = jnp.broadcast_to(_class_mask(where, logits.shape, axis), x.shape)
    log_p, log_z = _masked_log_softmax(x, mask)
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=x.dtype)
    w = _per_class(jnp.ones((num_classes,)) if weight is None else weight, x.ndim, x.dtype)
    label_weight = jnp.sum(one_hot * w, axis=-1)
    nll = -jnp.sum(one_hot * log_p, axis=-1)
    smooth = -jnp.sum(w * log_p, axis=-1)
    loss = (1 - label_smoothing) * label_weight * nll + label_smoothing / num_classes * smooth
    counted = jnp.any(mask, axis=-1)
    if ignore_index is not None:
        counted = counted & (labels != ignore_index)
    z_term = z_loss * jnp.square(log_z[..., 0])
    loss = jnp.where(counted, loss, 0)
    z_term = jnp.where(counted, z_term, 0)
    if reduction == "none":
        return loss + z_term
    if reduction == "sum":
        return jnp.sum(loss) + jnp.sum(z_term)
    weights_total = jnp.sum(jnp.where(counted, label_weight, 0))
    count = jnp.sum(counted.astype(x.dtype))
    return _reduce_mean(jnp.sum(loss), weights_total) + _reduce_mean(jnp.sum(z_term), count)


def materialised_logits(hidden, weight, *, bias=None, softcap=None):
    """``softcap(hidden @ weight.T + bias)``, all ``[..., V]`` of them."""
    logits = jnp.einsum("...d,vd->...v", jnp.asarray(hidden), jnp.asarray(weight))
    if bias is not None:
        logits = logits + jnp.reshape(bias, (1,) * (logits.ndim - 1) + (-1,))
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    return logits


def linear_cross_entropy(
    hidden, weight, labels, *, bias=None, ignore_index=None, label_smoothing=0.0, z_loss=0.0,
    softcap=None, shift=0, chunk_size=None, plan=None, reduction="mean",
):  # fmt: skip
    """The fused loss materialised: the ``[..., V]`` logits, then the reference loss.

    The reference the tests, the benchmarks and ``jaxce.verify`` compare
    ``jaxce.linear_cross_entropy`` with. ``shift=k``: position ``t`` predicts
    label ``t + k``.
    """
    del chunk_size, plan
    hidden, labels = jnp.asarray(hidden), jnp.asarray(labels)
    if shift:
        length = labels.shape[-1] - shift
        hidden, labels = hidden[..., :length, :], labels[..., shift:]
    return softmax_cross_entropy_with_integer_labels(
        materialised_logits(hidden, weight, bias=bias, softcap=softcap),
        labels,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        reduction=reduction,
    )


def linear_distillation_loss(
    hidden, weight, teacher_hidden, teacher_weight, labels=None, *, temperature=1.0, beta=0.0,
    hard_label_weight=0.0, ignore_index=None, reduction="mean", chunk_size=None, plan=None,
):  # fmt: skip
    """Distillation materialised: both models' ``[..., V]`` logits, their log-softmax, the mixture."""
    del chunk_size, plan
    student = materialised_logits(hidden, weight)
    teacher = jax.lax.stop_gradient(materialised_logits(teacher_hidden, teacher_weight))
    log_q = jax.nn.log_softmax(student / temperature, axis=-1)
    log_p = jax.nn.log_softmax(teacher / temperature, axis=-1)
    q, p = jnp.exp(log_q), jnp.exp(log_p)
    if beta == 0:
        loss = jnp.sum(p * (log_p - log_q), axis=-1)
    elif beta == 1:
        loss = jnp.sum(q * (log_q - log_p), axis=-1)
    else:
        log_m = jnp.log(beta * p + (1 - beta) * q)
        loss = beta * jnp.sum(p * (log_p - log_m), axis=-1) + (1 - beta) * jnp.sum(
            q * (log_q - log_m), axis=-1
        )
    included = jnp.ones(loss.shape, bool)
    if labels is not None:
        labels = jnp.asarray(labels)
        if ignore_index is not None:
            included = labels != ignore_index
        if hard_label_weight:
            log_probs = jax.nn.log_softmax(student, axis=-1)
            safe = jnp.clip(labels, 0, student.shape[-1] - 1)
            nll = -jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
            loss = (1 - hard_label_weight) * loss + hard_label_weight * nll
    return _reduce(loss, included, reduction)


REFERENCES: dict[str, Callable[..., jax.Array]] = {
    "sigmoid_binary_cross_entropy": sigmoid_binary_cross_entropy,
    "binary_cross_entropy": binary_cross_entropy,
    "softmax_cross_entropy": softmax_cross_entropy,
    "softmax_cross_entropy_with_integer_labels": softmax_cross_entropy_with_integer_labels,
    "categorical_cross_entropy": categorical_cross_entropy,
    "sigmoid_focal_loss": sigmoid_focal_loss,
    "softmax_focal_loss": softmax_focal_loss,
    "poly_loss_cross_entropy": poly_loss_cross_entropy,
    "kl_divergence": kl_divergence,
    "kl_divergence_with_log_targets": kl_divergence_with_log_targets,
    "linear_cross_entropy": linear_cross_entropy,
    "linear_distillation_loss": linear_distillation_loss,
}
