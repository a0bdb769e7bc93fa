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


@jax.custom_jvp
def gather_rows(array: jax.Array, indices: jax.Array) -> jax.Array:
    """``array[indices]`` (rows); bfloat16 rows are gathered as their ``uint16`` bits.

    The derivative is the gather of the tangent (bits carry none).
    """
    if array.dtype != jnp.bfloat16:
        return jnp.take(array, indices, axis=0)
    bits = jax.lax.bitcast_convert_type(array, jnp.uint16)
    return jax.lax.bitcast_convert_type(jnp.take(bits, indices, axis=0), jnp.bfloat16)


@gather_rows.defjvp
def _gather_rows_jvp(
    primals: tuple[jax.Array, jax.Array], tangents: tuple[Any, Any]
) -> tuple[jax.Array, jax.Array]:
    array, indices = primals
    return gather_rows(array, indices), jnp.take(tangents[0], indices, axis=0)


def max_and_label_column(
    logits: jax.Array, label_mask: jax.Array, loop_index: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The row maximum ``[C]`` and ``logits[i, target[i]]`` ``[C]``, in one pass over the logits.

    The label column comes from the logits themselves, so it rounds as the
    log-sum-exp's terms do. A gather (or a masked sum of its own) is fused by
    XLA into the first consumer of the log-sum-exp, after the exponential,
    which keeps the logits alive beside their exponentials (two ``[C, V]``
    buffers instead of one); one variadic reduction with the maximum reads
    them before the exponential is written over them. The other columns are
    selected away with a zero made from ``loop_index`` (exactly 0): XLA:CPU
    hoists a constant zero's ``[C, V]`` broadcast out of the chunk loop as a
    buffer of its own, and a product with the one-hot mask would make
    ``0 * -inf`` NaN at padding columns.
    """
    dtype = logits.dtype
    zero = loop_index.astype(dtype) * 0
    row_max, label = jax.lax.reduce(
        (logits, jnp.where(label_mask, logits, zero)),
        (jnp.array(-jnp.inf, dtype), jnp.array(0, dtype)),
        lambda x, y: (jnp.maximum(x[0], y[0]), x[1] + y[1]),
        (logits.ndim - 1,),
    )
    return row_max, label
