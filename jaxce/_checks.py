"""Eager argument checks shared by every loss.

Everything here runs at trace time on shapes, dtypes and Python values, so a
mistake raises before anything is compiled. Checks on *values* (labels out of
range, probabilities outside [0, 1]) cannot raise under `jit`; the losses turn
them into NaN and `jaxce.checked` turns that into an error.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from jaxce._reduce import REDUCTIONS, Reduction

# Set by `jaxce.checked` while it traces the user's function: the value checks
# are emitted then, and only then. It is a JAX configuration state that keys
# jit's caches and trace contexts, so a function jitted and called plainly and
# the same function under `jaxce.checked` are traced apart: a plain trace holds
# no check (no checkify effect, which would keep jit off its fast dispatch
# path: up to 1.3x slower calls at classifier shapes), and a checked trace is
# never reused by a plain call or the reverse. Where JAX lacks the mechanism,
# the checks are emitted whenever the values are traced (a plain `jit` then
# carries them, unused).
_value_checks: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "jaxce_value_checks", default=False
)
try:
    from jax._src import config as _jax_config

    _value_checks_state: Any = _jax_config.bool_state(
        "jaxce_value_checks",
        False,
        help="Emit jaxce's value checks (set by jaxce.checked while it traces).",
        include_in_jit_key=True,
        include_in_trace_context=True,
    )
except (ImportError, AttributeError, TypeError):  # pragma: no cover - another JAX
    _value_checks_state = None


@contextlib.contextmanager
def value_checks_enabled() -> Iterator[None]:
    token = _value_checks.set(True)
    try:
        if _value_checks_state is None:
            yield
        else:
            with _value_checks_state(True):
                yield
    finally:
        _value_checks.reset(token)


def check_values(valid: jax.Array, values: jax.Array, argument: str, expectation: str) -> None:
    """Under `jaxce.checked`, fails naming the first invalid element of `values`.

    The check is a `checkify.debug_check`: a no-op unless the computation is
    checkified. It is emitted only while `jaxce.checked` traces (see
    `_value_checks_state`: plain and checked traces are cached apart).
    """
    if not checking_values(values):
        return
    valid, values = _whole_batch(valid, values)
    if not jnp.size(values):
        return  # an empty batch holds nothing to check
    valid = jnp.broadcast_to(valid, jnp.shape(values)).ravel()
    flat_values = jnp.ravel(values)
    first_bad = jnp.argmin(valid)
    index = jnp.unravel_index(first_bad, jnp.shape(values))
    checkify.debug_check(
        jnp.all(valid),
        f"`{argument}` must be {expectation}; got {{value}} at index {{index}}",
        value=flat_values[first_bad],
        index=jnp.stack([jnp.asarray(i) for i in index]) if index else first_bad,
    )


def checking_values(values: Any) -> bool:
    """Whether `check_values` emits checks on ``values``: under `jaxce.checked`.

    Lets a caller skip building a check's mask when no check is emitted.
    """
    if _value_checks_state is not None:
        return bool(_value_checks_state.value)
    return _value_checks.get() or isinstance(values, jax.core.Tracer)


def check_not_nan(values: jax.Array, takes_part: jax.Array | None, argument: str) -> None:
    """Under `jaxce.checked`, fails naming the first NaN of ``values`` that takes part.

    ``takes_part`` is a boolean broadcastable to ``values`` (None: every
    element); a NaN it excludes changes nothing and is not reported.
    """
    if not checking_values(values):
        return
    valid = ~jnp.isnan(values)
    if takes_part is not None:
        valid = valid | ~takes_part
    check_values(valid, values, argument, "a number (not NaN) where it takes part")


def _whole_batch(valid: Any, values: Any) -> tuple[Any, Any]:
    """Under ``vmap``, the whole batched arrays (vmapped axes first), so that the
    reported index is the user's index into the batch, not into one slice.

    This reads JAX's batching tracers (not public API): where they are not
    what it expects, the check stays on the slice and reports the slice's index.
    """
    try:
        from jax._src.interpreters.batching import BatchTracer
    except ImportError:  # pragma: no cover - a JAX without this module
        return valid, values

    def unbatch(x: Any) -> tuple[Any, int]:
        levels = 0
        while isinstance(x, BatchTracer):
            axis = getattr(x, "batch_dim", None)
            if not isinstance(axis, int):
                break
            x = jnp.moveaxis(jnp.asarray(x.val), axis, 0)
            levels += 1
        return x, levels

    whole_values, levels = unbatch(values)
    whole_valid, valid_levels = unbatch(valid)
    if levels == 0 or valid_levels != levels or jnp.ndim(whole_valid) != jnp.ndim(whole_values):
        return valid, values
    return whole_valid, whole_values


def compute_dtype(x: jax.Array) -> Any:
    """float64 stays float64; every other float is computed in float32."""
    return jnp.float64 if x.dtype == jnp.float64 else jnp.float32


def as_float_array(x: Any, argument: str) -> jax.Array:
    """Converts `x` to a JAX array and requires a floating dtype."""
    array = jnp.asarray(x)
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise TypeError(
            f"`{argument}` must have a floating dtype (float16, bfloat16, float32 "
            f"or float64), got {array.dtype}. Cast it first, e.g. "
            f"`{argument}.astype(jnp.float32)`."
        )
    return array


def as_integer_labels(labels: Any, argument: str = "labels") -> jax.Array:
    """Integer labels as int32 (int64 stays int64), whatever their dtype.

    Labels are compared with class indices and `ignore_index` and used to
    index, so they must be in a dtype that holds every class index and the
    `ignore_index`: in int16, class 40000 does not exist, and in uint8,
    `ignore_index=-100` is class 156. A uint32 or uint64 label too large for
    the signed type wraps to a negative value, which is out of range (NaN),
    as the label is.
    """
    array = jnp.asarray(labels)
    if not jnp.issubdtype(array.dtype, jnp.integer):
        raise TypeError(
            f"`{argument}` must have an integer dtype (class indices), got "
            f"{array.dtype}. For one-hot or soft labels use "
            "`softmax_cross_entropy`."
        )
    index_dtype = jnp.int64 if array.dtype.itemsize == 8 else jnp.int32
    return array.astype(index_dtype)


def optional_float(x: Any, argument: str) -> jax.Array | None:
    return None if x is None else as_float_array(x, argument)


def check_reduction(reduction: Reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}.")


def is_concrete_zero(x: Any) -> bool:
    """True for a Python (or concrete NumPy) zero: the option is off at trace time."""
    return isinstance(x, (int, float, np.number)) and not isinstance(x, bool) and x == 0


def _concrete_scalar(x: Any, argument: str) -> np.ndarray:
    value = np.asarray(x)
    if value.shape != ():
        raise ValueError(f"`{argument}` must be a scalar, got shape {value.shape}.")
    if value.dtype == np.bool_ or not (
        np.issubdtype(value.dtype, np.integer) or np.issubdtype(value.dtype, np.floating)
    ):
        raise TypeError(f"`{argument}` must be a real number, got {x!r}.")
    return value


def _traced_scalar(x: jax.core.Tracer, argument: str) -> None:
    if x.shape != ():
        raise ValueError(f"`{argument}` must be a scalar, got shape {x.shape}.")
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
        raise TypeError(f"`{argument}` must be a real number, got a traced {x.dtype}.")


def check_unit_interval(x: Any, argument: str, *, closed_right: bool = False) -> None:
    """Checks a hyperparameter in [0, 1) (or [0, 1]) when its value is concrete.

    Traced values pass through: a hyperparameter may be a traced array so that
    changing it does not retrace (`option_valid` then makes the loss NaN).
    """
    if isinstance(x, jax.core.Tracer):
        _traced_scalar(x, argument)
        return
    value = _concrete_scalar(x, argument)
    upper_ok = value <= 1 if closed_right else value < 1
    if not (value >= 0 and upper_ok):
        interval = "[0, 1]" if closed_right else "[0, 1)"
        raise ValueError(f"`{argument}` must be in {interval}, got {x!r}.")


def check_scalar(x: Any, argument: str) -> None:
    if isinstance(x, jax.core.Tracer):
        _traced_scalar(x, argument)
        return
    _concrete_scalar(x, argument)


def check_nonnegative(x: Any, argument: str) -> None:
    """Checks a scalar hyperparameter that must be >= 0 (e.g. `z_loss`) when concrete."""
    check_scalar(x, argument)
    if not isinstance(x, jax.core.Tracer) and not np.asarray(x) >= 0:
        raise ValueError(f"`{argument}` must be non-negative, got {x!r}.")


def check_finite(x: Any, argument: str) -> None:
    """Checks a scalar hyperparameter that may be any finite real (Poly-1's ``epsilon``) when concrete."""
    check_scalar(x, argument)
    if not isinstance(x, jax.core.Tracer) and not np.isfinite(np.asarray(x)):
        raise ValueError(f"`{argument}` must be a finite real number, got {x!r}.")


def finite_valid(x: Any, argument: str) -> jax.Array | None:
    """`option_valid` for a hyperparameter that may be any finite real: False for NaN and inf."""
    if not isinstance(x, jax.core.Tracer):
        return None
    valid = jnp.isfinite(x)
    check_values(valid, x, argument, "a finite real number")
    return valid


def option_valid(
    x: Any,
    argument: str,
    *,
    low: float = 0.0,
    high: float | None = None,
    closed_right: bool = False,
) -> jax.Array | None:
    """For a traced hyperparameter, a scalar that is False when it is out of range.

    A concrete value was checked eagerly (None here). A traced one cannot
    raise; the loss becomes NaN where this is False (never a plausible
    number), and under `jaxce.checked` it fails naming the argument.
    """
    if not isinstance(x, jax.core.Tracer):
        return None
    valid = x >= low
    if high is not None:
        valid = valid & ((x <= high) if closed_right else (x < high))
    interval = f"[{low:g}, {'inf' if high is None else f'{high:g}'}" + (
        "]" if closed_right else ")"
    )
    check_values(valid, x, argument, f"in {interval}")
    return valid


def all_valid(*flags: jax.Array | None) -> jax.Array | None:
    """The conjunction of the flags that are not None (None if all are)."""
    present = [f for f in flags if f is not None]
    if not present:
        return None
    result = present[0]
    for flag in present[1:]:
        result = result & flag
    return result


def nan_unless(valid: jax.Array | None, loss: jax.Array) -> jax.Array:
    """``loss``, or NaN where ``valid`` (broadcastable) is False."""
    if valid is None:
        return loss
    return jnp.where(valid, loss, jnp.nan)


def normalize_axes(
    axis: int | Sequence[int], ndim: int, argument: str = "logits"
) -> tuple[int, ...]:
    """Returns the class axes as non-negative, distinct ints, in the order given.

    The order matters: a tuple of class axes is flattened in that order (as
    optax does), and an integer label indexes the flattened slice.
    """
    if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool):
        axes: tuple[int, ...] = (int(axis),)
    elif isinstance(axis, tuple) and all(
        isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in axis
    ):
        axes = tuple(int(a) for a in axis)
        if not axes:
            raise ValueError("`axis` must name at least one axis, got ().")
    else:
        raise TypeError(
            f"`axis` must be an int or a tuple of ints, got {type(axis).__name__} {axis!r}."
        )
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(
                f"`axis` {a} is out of range for `{argument}` of rank {ndim}: expected "
                f"an axis in [{-ndim}, {ndim})."
            )
    canonical = tuple(a % ndim for a in axes)
    if len(set(canonical)) != len(canonical):
        raise ValueError(f"`axis` has repeated axes: {axis!r}.")
    return canonical


def check_broadcastable(x: jax.Array, shape: tuple[int, ...], argument: str, target: str) -> None:
    try:
        np.broadcast_shapes(x.shape, shape)
    except ValueError:
        raise ValueError(
            f"`{argument}` has shape {x.shape}, which does not broadcast to {target} shape {shape}."
        ) from None
    if np.broadcast_shapes(x.shape, shape) != tuple(shape):
        raise ValueError(
            f"`{argument}` has shape {x.shape}, which would broadcast {target} "
            f"shape {shape} to a larger shape {np.broadcast_shapes(x.shape, shape)}."
        )


def as_mask(where: Any, shape: tuple[int, ...], argument: str = "where") -> jax.Array:
    mask = jnp.asarray(where)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"`{argument}` must be a boolean array, got {mask.dtype}.")
    check_broadcastable(mask, shape, argument, "the")
    return mask
