"""The fused loss's options as one frozen value, checked once when it is made."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxce import _checks, _integer_labels
from jaxce._linear.plan import LinearCrossEntropyPlan
from jaxce._reduce import Reduction


@dataclasses.dataclass(frozen=True, eq=False)
class Options:
    """Every option of :func:`jaxce.linear_cross_entropy` but the arrays it multiplies.

    Made once by each public entry point (the loss, the vocabulary-parallel
    loss, the closed form) from its keyword arguments, and passed whole to
    what checks the arrays and runs the loops. What can be checked without
    the arrays is checked here; a traced ``label_smoothing``, ``z_loss`` or
    ``temperature`` out of range makes the loss NaN instead (and an error
    under ``jaxce.checked``).
    """

    ignore_index: int | None = None
    label_smoothing: ArrayLike = 0.0
    z_loss: ArrayLike = 0.0
    softcap: float | None = None
    temperature: ArrayLike | None = None
    shift: int = 0
    token_weights: ArrayLike | None = None
    vocab_size: int | None = None
    chunk_size: int | None = None
    plan: LinearCrossEntropyPlan | None = None
    reduction: Reduction = "mean"
    return_aux: bool = False

    def __post_init__(self) -> None:
        _integer_labels.check_options(
            self.reduction, self.label_smoothing, self.z_loss, self.ignore_index
        )
        check_softcap(self.softcap)
        check_count(self.shift, "shift", minimum=0, optional=False)
        check_count(self.chunk_size, "chunk_size", minimum=1, optional=True)
        if not isinstance(self.return_aux, bool):
            raise TypeError(f"`return_aux` must be True or False, got {self.return_aux!r}.")
        check_plan(self.plan)
        if self.plan is not None and self.chunk_size is not None:
            raise ValueError(
                "Pass `chunk_size` or `plan`, not both (`chunk_size` is a shortcut for a "
                "plan's chunk size)."
            )
        if not isinstance(self.temperature, jax.core.Tracer):
            check_temperature(self.temperature)
        if self.token_weights is not None:
            token_weights = _checks.as_float_array(self.token_weights, "token_weights")
            object.__setattr__(self, "token_weights", token_weights)

    def temperature_valid(self) -> jax.Array | None:
        """For a traced temperature, whether it is positive and finite (None when concrete)."""
        return check_temperature(self.temperature)


def check_plan(plan: Any) -> None:
    """A `LinearCrossEntropyPlan`, or None."""
    if plan is not None and not isinstance(plan, LinearCrossEntropyPlan):
        raise TypeError(
            "`plan` must be a LinearCrossEntropyPlan from "
            f"`jaxce.plan_linear_cross_entropy`, got {type(plan).__name__}."
        )


def check_count(value: Any, name: str, *, minimum: int, optional: bool) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        expected = "a non-negative int" if minimum == 0 else "a positive int"
        raise ValueError(
            f"`{name}` must be {expected}{' or None' if optional else ''}, got {value!r}."
        )


def check_softcap(softcap: Any) -> None:
    if softcap is not None and (
        isinstance(softcap, (jax.core.Tracer, bool))
        or not isinstance(softcap, (int, float))
        or not softcap > 0
        or softcap == float("inf")
    ):
        raise ValueError(
            f"`softcap` must be a positive, finite Python float or None, got {softcap!r}."
        )


def check_temperature(temperature: Any) -> jax.Array | None:
    """A positive, finite temperature: raises if concrete, else the validity flag (traced)."""
    if temperature is None:
        return None
    if isinstance(temperature, jax.core.Tracer):
        _checks.check_scalar(temperature, "temperature")
        valid = (temperature > 0) & jnp.isfinite(temperature)
        _checks.check_values(valid, temperature, "temperature", "positive and finite")
        return valid
    try:
        value = np.asarray(temperature, np.float64)
    except (TypeError, ValueError):
        value = np.asarray(np.nan)
    if value.ndim != 0 or not 0 < value < np.inf:
        raise ValueError(
            f"`temperature` must be a positive, finite scalar or None, got {temperature!r}."
        )
    return None
