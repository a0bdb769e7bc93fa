"""What the chunk loops do differently because of XLA:CPU, in one place.

XLA:CPU does not slice or gather bfloat16 arrays natively: it converts the
whole array to float32 once, outside the loop, and slices or gathers that, a
float32 copy of ``hidden`` or ``weight`` (twice the array) for one small read
per chunk. The two functions here read bfloat16 rows without that copy; on
other backends they compute the same values at no extra cost.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def take_rows(array: jax.Array, start: jax.Array, size: int) -> jax.Array:
    """``array[start:start + size]``; bfloat16 rows are sliced as their ``uint16`` bits.

    A ``uint16`` view costs nothing to form and slices natively. The derivative
    is the slice of the tangent (bits carry none).
    """
    if array.dtype != jnp.bfloat16:
        return jax.lax.dynamic_slice_in_dim(array, start, size)
    bits = jax.lax.bitcast_convert_type(array, jnp.uint16)
    rows = jax.lax.dynamic_slice_in_dim(bits, start, size)
    return jax.lax.bitcast_convert_type(rows, jnp.bfloat16)


@take_rows.defjvp
def _take_rows_jvp(
    size: int, primals: tuple[jax.Array, jax.Array], tangents: tuple[Any, Any]
) -> tuple[jax.Array, jax.Array]:
    array, start = primals
    tangent = jax.lax.dynamic_slice_in_dim(tangents[0], start, size)
    return take_rows(array, start, size), tangent


def label_column(logits: jax.Array, label_mask: jax.Array) -> jax.Array:
    """``logits[i, target[i]]`` as a sum of the row masked by ``label_mask`` (exact: one term).

    Used for bfloat16 ``weight``, whose label rows ``weight[target]`` would be
    gathered through a float32 copy of the whole array.
    """
    return jnp.sum(jnp.where(label_mask, logits, 0), axis=-1)
