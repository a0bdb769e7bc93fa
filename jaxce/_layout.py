"""Moving the class axes of multiclass inputs to one trailing axis."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxce import _checks


@dataclasses.dataclass(frozen=True)
class ClassLayout:
    """How `[...]` inputs with class axes `axes` map to `[*batch_shape, num_classes]`.

    `argument` names the laid-out input in error messages (``logits``, ``probs``,
    ``log_predictions``).
    """

    ndim: int
    axes: tuple[int, ...]
    batch_shape: tuple[int, ...]
    class_shape: tuple[int, ...]
    argument: str = "logits"

    @classmethod
    def of(
        cls, shape: tuple[int, ...], axis: int | Sequence[int], argument: str = "logits"
    ) -> ClassLayout:
        axes = _checks.normalize_axes(axis, len(shape), argument)
        batch_shape = tuple(d for i, d in enumerate(shape) if i not in axes)
        class_shape = tuple(shape[a] for a in axes)
        return cls(len(shape), axes, batch_shape, class_shape, argument)

    @property
    def num_classes(self) -> int:
        return math.prod(self.class_shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.batch_shape, self.num_classes)

    def classes_last(self, x: jax.Array) -> jax.Array:
        """`[...]` (full rank, broadcast already) to `[*batch_shape, num_classes]`.

        The class axes are flattened in the order `axes` gives them.
        """
        permutation = self.batch_axes + self.axes
        if permutation != tuple(range(self.ndim)):
            x = jnp.transpose(x, permutation)
        # The class count is spelt out: `-1` cannot be inferred for an empty batch.
        return x.reshape(*x.shape[: len(self.batch_axes)], self.num_classes)

    def unlayout(self, x: jax.Array) -> jax.Array:
        """Inverse of `classes_last`: `[*batch_shape, num_classes]` back to the input's layout."""
        x = x.reshape(*self.batch_shape, *self.class_shape)
        permutation = self.batch_axes + self.axes
        if permutation == tuple(range(self.ndim)):
            return x
        return jnp.transpose(x, tuple(int(i) for i in np.argsort(permutation)))

    @property
    def batch_axes(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.ndim) if i not in self.axes)

    def full_shape(self) -> tuple[int, ...]:
        shape = [0] * self.ndim
        for i, d in zip(self.batch_axes, self.batch_shape, strict=True):
            shape[i] = d
        for i, d in zip(self.axes, self.class_shape, strict=True):
            shape[i] = d
        return tuple(shape)

    def mask(self, where: Any) -> jax.Array | None:
        """`where` of the logits' rank (per element) or the batch rank (per example).

        Returns a boolean mask broadcastable to `[*batch_shape, num_classes]`.
        """
        if where is None:
            return None
        mask = jnp.asarray(where)
        if mask.dtype != jnp.bool_:
            raise TypeError(f"`where` must be a boolean array, got {mask.dtype}.")
        if mask.ndim == self.ndim:
            _checks.check_broadcastable(mask, self.full_shape(), "where", f"`{self.argument}`")
            return self.classes_last(jnp.broadcast_to(mask, self.full_shape()))
        if mask.ndim == len(self.batch_shape):
            _checks.check_broadcastable(mask, self.batch_shape, "where", "the batch")
            return jnp.broadcast_to(mask, self.batch_shape)[..., None]
        raise ValueError(
            f"`where` has rank {mask.ndim} (shape {mask.shape}); expected the "
            f"rank of `{self.argument}` ({self.ndim}, one flag per element) or of the "
            f"batch ({len(self.batch_shape)}, shape {self.batch_shape}, one flag "
            "per example)."
        )

    def class_weight(self, weight: Any, argument: str = "weight") -> jax.Array | None:
        """A `[num_classes]` class-weight vector from `[num_classes]` or the class shape."""
        if weight is None:
            return None
        weight = _checks.as_float_array(weight, argument)
        if weight.shape not in ((self.num_classes,), self.class_shape):
            raise ValueError(
                f"`{argument}` must hold one weight per class: shape "
                f"({self.num_classes},), got {weight.shape}."
            )
        return weight.reshape(self.num_classes)


def require_classes(layout: ClassLayout, argument: str = "logits") -> None:
    """A softmax needs at least one class: raise for a class axis of size 0."""
    if layout.num_classes == 0:
        raise ValueError(
            f"`{argument}` has no classes: its class axes {layout.axes} have sizes "
            f"{layout.class_shape}. A softmax cross-entropy needs at least one class."
        )


def batch_labels(labels: jax.Array, layout: ClassLayout) -> jax.Array:
    """Integer labels broadcast to the batch shape."""
    try:
        shape = np.broadcast_shapes(labels.shape, layout.batch_shape)
    except ValueError:
        shape = None
    if shape != layout.batch_shape:
        raise ValueError(
            f"`labels` has shape {labels.shape}; expected the batch shape "
            f"{layout.batch_shape} (the shape of `logits` {layout.full_shape()} "
            f"without the class axes {layout.axes})."
        )
    return jnp.broadcast_to(labels, layout.batch_shape)


def dense_labels(labels: jax.Array, layout: ClassLayout, argument: str = "labels") -> jax.Array:
    """Probability labels broadcast to the logits' shape, classes last."""
    _checks.check_broadcastable(labels, layout.full_shape(), argument, f"`{layout.argument}`")
    return layout.classes_last(jnp.broadcast_to(labels, layout.full_shape()))


def per_class(class_weight: jax.Array, ndim: int) -> jax.Array:
    """``[C]`` class weights as ``[1, ..., 1, C]``, to broadcast against ``ndim``-d classes-last arrays.

    Explicit leading axes keep this valid under ``jax_numpy_rank_promotion="raise"``.
    """
    return class_weight.reshape((1,) * (ndim - 1) + class_weight.shape)
