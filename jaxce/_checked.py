"""`checked`: turn the NaN of invalid values into an error that names them."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from jaxce import _checks

Out = TypeVar("Out")


def checked(fn: Callable[..., Out]) -> Callable[..., Out]:
    """Wraps ``fn`` (any function calling jaxce losses) so invalid values raise.

    Under ``jit`` a loss cannot raise on values: an out-of-range label, a
    probability outside ``[0, 1]``, a NaN logit or a traced ``label_smoothing``
    outside ``[0, 1)`` makes the loss NaN. Only what takes part is checked:
    not the label of an example excluded by ``where``, nor a NaN logit of an
    excluded class.
    ``checked(fn)`` traces ``fn`` with jaxce's value checks on, compiles it with
    :func:`jax.experimental.checkify.checkify`, and raises
    ``checkify.JaxRuntimeError`` naming the argument, the first offending
    index and its value (under ``vmap``, the index into the whole batched
    array, vmapped axes first). ``fn`` may be ``jax.jit``-ed (its compiled
    form is shared with plain calls, which the checks do not slow down); call
    the result outside ``jit``.

    Args:
      fn: a function whose jaxce calls should be checked.

    Returns:
      A function with ``fn``'s signature that raises on invalid values.

    Example:
      >>> import jax.numpy as jnp, jaxce
      >>> loss = jaxce.checked(jaxce.softmax_cross_entropy_with_integer_labels)
      >>> loss(jnp.zeros((2, 3)), jnp.array([0, 3]))
      Traceback (most recent call last):
        ...
      jax._src.checkify.JaxRuntimeError: `labels` must be class indices in [0, 3); got 3 at index [1]...
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Out:
        # NumPy arrays become JAX arrays: closed over as NumPy constants, a
        # `vmap` inside `fn` fails to trace them under checkify.
        args, kwargs = jax.tree.map(
            lambda leaf: jnp.asarray(leaf) if isinstance(leaf, np.ndarray) else leaf,
            (args, kwargs),
        )

        def call() -> Out:
            with _checks.value_checks_enabled():
                return fn(*args, **kwargs)

        error, out = checkify.checkify(call, errors=checkify.user_checks)()
        error.throw()
        return out

    return wrapper
