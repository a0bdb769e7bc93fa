"""`checked`: turn the NaN of invalid values into an error that names them."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

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
    :func:`jax.experimental.checkify.checkify` under ``jax.jit``, and raises
    ``checkify.JaxRuntimeError`` naming the argument, the first offending
    index and its value (under ``vmap``, the index into the whole batched
    array, vmapped axes first). The arrays among the arguments are traced;
    every other argument (a ``reduction``, a Python ``label_smoothing``) is
    static, as with ``jit``'s ``static_argnums``. The compiled function is
    kept per ``fn``, non-array arguments and array shapes and dtypes, so
    later calls (through this wrapper or another ``checked(fn)``) do not
    compile again; with an unhashable non-array argument each call compiles.
    ``fn`` may be ``jax.jit``-ed (it is traced again, with the checks, apart
    from its plain calls, which carry none and are not slowed down); call
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
        split = _Call.of(fn, args, kwargs)
        if split is None:  # something unhashable to key a compiled function on
            error, out = _checkify_eagerly(fn, args, kwargs)
        else:
            error, out = _checked_jit(*split)
        error.throw()
        return out

    return wrapper


def _is_array(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray))


class _Call(NamedTuple):
    """A call's static part: the function, the arguments' structure and their non-array
    leaves. Hashable: the key (with the arrays' shapes and dtypes) of a compiled call.
    It holds no array: jit's cache keeps it."""

    fn: Callable[..., Any]
    treedef: Any
    static_leaves: tuple[Any, ...]  # None where an array goes

    @classmethod
    def of(
        cls, fn: Callable[..., Any], args: Any, kwargs: Any
    ) -> tuple[_Call, tuple[Any, ...]] | None:
        """The static part and the arrays, or None if the static part is unhashable."""
        leaves, treedef = jax.tree.flatten((args, kwargs))
        call = cls(fn, treedef, tuple(None if _is_array(leaf) else leaf for leaf in leaves))
        try:
            hash(call)
        except TypeError:
            return None
        return call, tuple(leaf for leaf in leaves if _is_array(leaf))

    def rebuild(self, arrays: tuple[jax.Array, ...]) -> tuple[Any, Any]:
        remaining = iter(arrays)
        leaves = [next(remaining) if s is None else s for s in self.static_leaves]
        return jax.tree.unflatten(self.treedef, leaves)


def _traced(call: _Call, arrays: tuple[jax.Array, ...]) -> Any:
    args, kwargs = call.rebuild(arrays)
    with _checks.value_checks_enabled():
        return call.fn(*args, **kwargs)


# One compiled, checkified function per function, argument structure and
# non-array arguments (static: a Python `label_smoothing=0.0` stays a concrete
# zero), and per the arrays' shapes and dtypes (jit's own cache). A `checked(fn)`
# call no longer traces and compiles `fn` each time, wrapper kept or made anew.
@functools.partial(jax.jit, static_argnums=0)
def _checked_jit(call: _Call, arrays: tuple[jax.Array, ...]) -> tuple[checkify.Error, Any]:
    return checkify.checkify(functools.partial(_traced, call), errors=checkify.user_checks)(arrays)


def _checkify_eagerly(fn: Callable[..., Out], args: Any, kwargs: Any) -> tuple[Any, Out]:
    """Unhashable arguments: trace and compile this call alone."""
    # NumPy arrays become JAX arrays: closed over as NumPy constants, a
    # `vmap` inside `fn` fails to trace them under checkify.
    args, kwargs = jax.tree.map(
        lambda leaf: jnp.asarray(leaf) if isinstance(leaf, np.ndarray) else leaf,
        (args, kwargs),
    )

    def call() -> Out:
        with _checks.value_checks_enabled():
            return fn(*args, **kwargs)

    return checkify.checkify(call, errors=checkify.user_checks)()
