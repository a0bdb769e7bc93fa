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
    """How `[...]` inputs with class axes `axes` map to `[*batch_shape, num_classes]`."""

    ndim: int
    axes: tuple[int, ...]
    batch_shape: tuple[int, ...]
    class_shape: tuple[int, ...]

    @classmethod
    def of(cls, shape: tuple[int, ...], axis: int | Sequence[int]) -> ClassLayout:
        axes = _checks.normalize_axes(axis, len(shape))
        batch_shape = tuple(d for i, d in enumerate(shape) if i not in axes)
        class_shape = tuple(shape[a] for a in axes)
        return cls(len(shape), axes, batch_shape, class_shape)

    @property
    def num_classes(self) -> int:
        return math.prod(self.class_shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.batch_shape, self.num_classes)

    def classes_last(self, x: jax.Array) -> jax.Array:
        """`[...]` (full rank, broadcast already) to `[*batch_shape, num_classes]`."""
        batch_axes = tuple(i for i in range(self.ndim) if i not in self.axes)
        permutation = batch_axes + self.axes
        if permutation != tuple(range(self.ndim)):
            x = jnp.transpose(x, permutation)
        return x.reshape(*x.shape[: len(batch_axes)], -1)

    def full_shape(self) -> tuple[int, ...]:
        shape = [0] * self.ndim
        batch = iter(self.batch_shape)
        classes = iter(self.class_shape)
        for i in range(self.ndim):
            shape[i] = next(classes) if i in self.axes else next(batch)
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
            _checks.check_broadcastable(mask, self.full_shape(), "where", "`logits`")
            return self.classes_last(jnp.broadcast_to(mask, self.full_shape()))
        if mask.ndim == len(self.batch_shape):
            _checks.check_broadcastable(mask, self.batch_shape, "where", "the batch")
            return jnp.broadcast_to(mask, self.batch_shape)[..., None]
        raise ValueError(
            f"`where` has rank {mask.ndim} (shape {mask.shape}); expected the "
            f"rank of `logits` ({self.ndim}, one flag per element) or of the "
            f"batch ({len(self.batch_shape)}, shape {self.batch_shape}, one flag "
            "per example)."
        )

    def class_weight(self, weight: Any) -> jax.Array | None:
        """A `[num_classes]` class-weight vector from `[num_classes]` or the class shape."""
        if weight is None:
            return None
        weight = _checks.as_float_array(weight, "weight")
        if weight.shape not in ((self.num_classes,), self.class_shape):
            raise ValueError(
                f"`weight` must hold one weight per class: shape "
                f"({self.num_classes},), got {weight.shape}."
            )
        return weight.reshape(self.num_classes)


def check_class_weight_values(weight: jax.Array) -> None:
    _checks.check_values(weight >= 0, weight, "weight", "non-negative")


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


def dense_labels(labels: jax.Array, layout: ClassLayout) -> jax.Array:
    """Probability labels broadcast to the logits' shape, classes last."""
    _checks.check_broadcastable(labels, layout.full_shape(), "labels", "`logits`")
    return layout.classes_last(jnp.broadcast_to(labels, layout.full_shape()))
