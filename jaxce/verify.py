r"""Gradient verification: ``jax.grad`` against closed forms, references and finite differences.

:func:`check_gradients` evaluates, for one loss at one point,

- ``jax.grad`` of the shipped loss (in the inputs' dtype),
- the closed-form derivative (in the inputs' dtype),
- ``jax.grad`` of a plain reference formulation that shares no code with the
  loss (from ``jaxce._references`` for the library's losses, or your own),
  in float64,
- central finite differences of the loss in float64, with a step per element
  :math:`h_i = \epsilon^{1/3} \max(1, |x_i|)` (:math:`\epsilon` the float64
  machine epsilon: the step that balances truncation error :math:`O(h^2)`
  against rounding error :math:`O(\epsilon / h)`),
- forward mode: the ``jax.jvp`` tangent along random directions :math:`v`
  against :math:`\nabla \ell \cdot v` from the closed form,

and reports, for each pair, the maximum absolute error and the norm-wise
relative error :math:`\max_i |a_i - b_i| / \max_i |b_i|` (for the directional
pair, :math:`|t - g \cdot v| / \sum_i |g_i v_i|`). Norm-wise, because an
element-wise relative error is meaningless for entries that cancel to nearly
0 (``softmax(x) - onehot(y)``).

Tolerances (:data:`TOLERANCES`) are per input dtype:

- float64: ``1e-12`` between analytic forms, ``1e-7`` against finite
  differences (their own error is about :math:`\epsilon^{2/3} \approx 4
  \times 10^{-11}` times the third derivative).
- float32: ``1e-6`` for every pair (float32 rounding is :math:`6 \times
  10^{-8}`; the losses lose a few units of it).
- bfloat16: ``1e-2``. The gradient is computed in float32 and rounded to
  bfloat16 (8 significant bits), so two correct results of the same float32
  math may differ by one bfloat16 unit in the last place, :math:`2^{-7}
  \approx 7.8 \times 10^{-3}` of the element; against the exact float64
  values the rounding is half of that. ``1e-2`` admits one unit and nothing
  more: a wrong formula (a sign, a missing ``1/n``) is off by 100% or more.
- float16: ``2e-3`` by the same argument with 11 significant bits
  (:math:`2^{-10} \approx 9.8 \times 10^{-4}`).

``jaxce verify`` (or ``python -m jaxce verify``) runs the check for every loss of the library
under its main option sets in float32, float64 and bfloat16; :func:`run_all` does the same from
Python and returns the reports.

References:
  - J. Nocedal and S. J. Wright, *Numerical Optimization*, 2nd ed., Springer, 2006,
    section 8.1 (finite-difference derivative approximations and their step).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxce
from jaxce import _references, derivatives
from jaxce._progress import Progress
from jaxce._reduce import Reduction

__all__ = [
    "TOLERANCES",
    "Comparison",
    "GradientReport",
    "check_gradients",
    "format_table",
    "loss_names",
    "main",
    "register",
    "run_all",
]


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Norm-wise relative tolerances: between analytic forms, and against finite differences."""

    analytic: float
    finite_differences: float


#: Per input dtype: the tolerance between analytic forms and against finite differences.
TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(analytic=1e-12, finite_differences=1e-7),
    "float32": Tolerance(analytic=1e-6, finite_differences=1e-6),
    "bfloat16": Tolerance(analytic=1e-2, finite_differences=1e-2),
    "float16": Tolerance(analytic=2e-3, finite_differences=2e-3),
}

CLOSED_VS_GRAD = "closed form vs jax.grad"
CLOSED_VS_REFERENCE = "closed form vs reference"
GRAD_VS_REFERENCE = "jax.grad vs reference"
CLOSED_VS_FINITE_DIFFERENCES = "closed form vs finite differences"
JVP_VS_CLOSED = "jvp vs closed form . v"
PAIRS = (
    CLOSED_VS_GRAD,
    CLOSED_VS_REFERENCE,
    GRAD_VS_REFERENCE,
    CLOSED_VS_FINITE_DIFFERENCES,
    JVP_VS_CLOSED,
)

# Losses whose derivative returns one gradient per differentiated argument.
_DEFAULT_WRT: dict[str, tuple[int | str, ...]] = {
    "linear_cross_entropy": (0, 1, "bias"),
    "linear_distillation_loss": (0, 1),
}


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One pair of gradients for one argument: max absolute and norm-wise relative error."""

    pair: str
    argument: str
    max_abs: float
    max_rel: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return bool(self.max_rel <= self.tolerance)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; an infinite or NaN error becomes the string ``"inf"``/``"nan"``."""
        data = {
            key: value if not isinstance(value, float) or math.isfinite(value) else str(value)
            for key, value in dataclasses.asdict(self).items()
        }
        return {**data, "passed": self.passed}


@dataclasses.dataclass(frozen=True)
class GradientReport:
    """What :func:`check_gradients` found: one :class:`Comparison` per pair and argument."""

    name: str
    dtype: str
    options: str
    rows: tuple[Comparison, ...]

    @property
    def passed(self) -> bool:
        return all(row.passed for row in self.rows)

    def worst(self, pair: str) -> Comparison | None:
        """The row of ``pair`` with the largest relative error (over arguments)."""
        rows = [row for row in self.rows if row.pair == pair]
        return max(rows, key=lambda row: _sortable(row.max_rel)) if rows else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "options": self.options,
            "passed": self.passed,
            "rows": [row.to_dict() for row in self.rows],
        }

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        title = f"{self.name}({self.options}) [{self.dtype}]: {verdict}"
        header = f"  {'pair':<34} {'argument':<10} {'max abs':>10} {'max rel':>10} {'tol':>8}"
        lines = [title, header]
        for row in self.rows:
            mark = "ok" if row.passed else "FAIL"
            lines.append(
                f"  {row.pair:<34} {row.argument:<10} {row.max_abs:>10.2e} "
                f"{row.max_rel:>10.2e} {row.tolerance:>8.0e} {mark}"
            )
        return "\n".join(lines)


def _sortable(value: float) -> float:
    return math.inf if math.isnan(value) else value


def _errors(actual: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """Max absolute error and norm-wise relative error; mismatched NaN/inf count as inf."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    same_special = (np.isnan(actual) & np.isnan(expected)) | (
        np.isinf(actual) & (actual == expected)
    )
    difference = np.where(same_special, 0.0, np.abs(actual - expected))
    difference = np.where(np.isnan(difference), np.inf, difference)
    max_abs = float(np.max(difference, initial=0.0))
    if max_abs == 0.0:
        return 0.0, 0.0
    scale = float(np.max(np.abs(np.where(np.isfinite(expected), expected, 0)), initial=0.0))
    return max_abs, (max_abs / scale if scale > 0 else math.inf)


def _substitute(
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    wrt: Sequence[int | str],
    values: Sequence[Any],
) -> tuple[list[Any], dict[str, Any]]:
    new_args, new_kwargs = list(args), dict(kwargs)
    for key, value in zip(wrt, values, strict=True):
        if isinstance(key, int):
            new_args[key] = value
        else:
            new_kwargs[key] = value
    return new_args, new_kwargs


def _argument_name(loss: Callable[..., Any], key: int | str) -> str:
    if isinstance(key, str):
        return key
    try:
        import inspect

        parameters = list(inspect.signature(loss).parameters)
        return parameters[key]
    except (TypeError, ValueError, IndexError):
        return f"arg{key}"


def _finite_differences(
    scalar: Callable[[tuple[jax.Array, ...]], jax.Array], values: tuple[jax.Array, ...]
) -> list[jax.Array]:
    """Central differences in float64 with step eps^(1/3) max(1, |x_i|), one per element."""
    gradients = []
    for k, value in enumerate(values):
        flat = value.ravel()
        step = np.cbrt(np.finfo(np.float64).eps) * jnp.maximum(1.0, jnp.abs(flat))
        directions = jnp.diag(step)

        def at(delta: jax.Array, k: int = k, value: jax.Array = value) -> jax.Array:
            moved = list(values)
            moved[k] = (value.ravel() + delta).reshape(value.shape)
            return scalar(tuple(moved))

        # Divide by the steps actually taken, after rounding of x + h and x - h.
        span = (flat + step) - (flat - step)
        plus = jax.vmap(at)(directions)
        minus = jax.vmap(at)(-directions)
        gradients.append(((plus - minus) / span).reshape(value.shape))
    return gradients


def _as_tuple(gradient: Any) -> tuple[Any, ...]:
    return tuple(gradient) if isinstance(gradient, (tuple, list)) else (gradient,)


def check_gradients(
    loss: Callable[..., jax.Array],
    derivative: Callable[..., Any],
    *args: Any,
    reference: Callable[..., jax.Array] | None = None,
    wrt: Sequence[int | str] | None = None,
    num_directions: int = 3,
    seed: int = 0,
    options: str | None = None,
    **kwargs: Any,
) -> GradientReport:
    r"""Compares every available gradient of ``loss`` at ``(*args, **kwargs)``.

    The differentiated function is ``loss(*args, **kwargs).sum()``. ``derivative``
    is called with the same arguments and returns the gradient with respect to
    the argument(s) in ``wrt`` (one array, or a tuple in ``wrt``'s order, with
    None for an argument that is absent).

    Args:
      loss: a pure, jit-able JAX function; any of jaxce's losses or your own.
      derivative: its closed-form gradient, same arguments (jit-able).
      *args: positional arguments of ``loss``.
      reference: an independent formulation of the same loss, same arguments,
        differentiated with ``jax.grad`` in float64. Defaults to jaxce's own
        reference for jaxce's losses; None for other losses skips that pair.
      wrt: positions (ints) or keyword names (strs) of the differentiated
        arguments; default ``(0,)`` (``(0, 1, "bias")`` for
        ``linear_cross_entropy``).
      num_directions: random directions for the forward-mode check.
      seed: seed of those directions.
      options: a label for the report (default: the keyword arguments).
      **kwargs: keyword arguments of ``loss``.

    Returns:
      A :class:`GradientReport`; ``report.passed`` is the verdict against
      :data:`TOLERANCES` for the differentiated arguments' dtype.

    Example:
      >>> import jax.numpy as jnp, jaxce, jaxce.derivatives
      >>> from jaxce import verify
      >>> x, y = jnp.array([[0.5, -1.0, 2.0]]), jnp.array([[0.0, 1.0, 0.0]])
      >>> report = verify.check_gradients(
      ...     jaxce.softmax_cross_entropy, jaxce.derivatives.softmax_cross_entropy, x, y
      ... )
      >>> report.passed
      True

    Finite differences evaluate the loss ``2 n`` times (``n`` elements of the
    differentiated arguments), batched with ``vmap``: keep the inputs small,
    and keep the point a few steps away from kinks and domain edges (a
    probability within ``1e-5`` of 0 or 1). A NaN or inf in one gradient
    that the other does not have counts as an infinite error.
    """
    name = getattr(loss, "__name__", "loss")
    if wrt is None:
        wrt = _DEFAULT_WRT.get(name, (0,))
    if reference is None:
        reference = _library_reference(loss)
    if options is None:
        options = ", ".join(f"{k}={_describe(v)}" for k, v in kwargs.items())
    present = [
        key
        for key in wrt
        if (key < len(args) if isinstance(key, int) else kwargs.get(key) is not None)
    ]
    with jax.enable_x64(True):
        values = tuple(jnp.asarray(args[k] if isinstance(k, int) else kwargs[k]) for k in present)
        dtype = jnp.result_type(*values)
        tolerance = TOLERANCES.get(jnp.dtype(dtype).name, TOLERANCES["float32"])

        def scalar_of(function: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
            def scalar(vals: tuple[jax.Array, ...]) -> jax.Array:
                new_args, new_kwargs = _substitute(args, kwargs, present, vals)
                return jnp.sum(function(*new_args, **new_kwargs))

            return scalar

        def closed_form(vals: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
            new_args, new_kwargs = _substitute(args, kwargs, present, vals)
            result = _as_tuple(derivative(*new_args, **new_kwargs))
            by_key = dict(zip(wrt, result, strict=True))
            return tuple(by_key[key] for key in present)

        rng = np.random.default_rng(seed)
        directions = tuple(
            jnp.asarray(rng.standard_normal((num_directions, *v.shape)), v.dtype) for v in values
        )

        @_fast_jit
        def evaluate(vals: tuple[jax.Array, ...]) -> dict[str, Any]:
            wide = tuple(v.astype(jnp.float64) for v in vals)
            scalar = scalar_of(loss)
            result: dict[str, Any] = {
                "grad": jax.grad(scalar)(vals),
                "closed": closed_form(vals),
                "fd": _finite_differences(scalar, wide),
                "jvp": jax.vmap(lambda d: jax.jvp(scalar, (vals,), (d,))[1])(directions),
            }
            if reference is not None:
                result["reference"] = jax.grad(scalar_of(reference))(wide)
            return result

        results = jax.tree.map(np.asarray, evaluate(values))

    rows = []
    for index, key in enumerate(present):
        argument = _argument_name(loss, key)
        closed = results["closed"][index]
        pairs = [
            (CLOSED_VS_GRAD, closed, results["grad"][index], tolerance.analytic),
            (
                CLOSED_VS_FINITE_DIFFERENCES,
                closed,
                results["fd"][index],
                tolerance.finite_differences,
            ),
        ]
        if reference is not None:
            ref = results["reference"][index]
            pairs.insert(1, (CLOSED_VS_REFERENCE, closed, ref, tolerance.analytic))
            pairs.insert(2, (GRAD_VS_REFERENCE, results["grad"][index], ref, tolerance.analytic))
        for pair, actual, expected, tol in pairs:
            max_abs, max_rel = _errors(actual, expected)
            rows.append(Comparison(pair, argument, max_abs, max_rel, tol))
    rows.append(_directional_row(results, directions, present, tolerance.analytic))
    return GradientReport(name, jnp.dtype(dtype).name, options, tuple(rows))


def _directional_row(
    results: dict[str, Any],
    directions: tuple[jax.Array, ...],
    present: Sequence[int | str],
    tolerance: float,
) -> Comparison:
    worst_abs, worst_rel = 0.0, 0.0
    for index, tangent in enumerate(results["jvp"]):
        terms = [
            np.asarray(g, np.float64) * np.asarray(d[index], np.float64)
            for g, d in zip(results["closed"], directions, strict=True)
        ]
        predicted = sum(float(np.sum(t)) for t in terms)
        magnitude = sum(float(np.sum(np.abs(t))) for t in terms)
        error = abs(float(tangent) - predicted)
        if math.isnan(error):
            error = math.inf
        worst_abs = max(worst_abs, error)
        if error:
            worst_rel = max(worst_rel, error / magnitude if magnitude else math.inf)
    label = "all" if len(present) > 1 else "direction"
    return Comparison(JVP_VS_CLOSED, label, worst_abs, worst_rel, tolerance)


def _library_reference(loss: Callable[..., Any]) -> Callable[..., jax.Array] | None:
    name = getattr(loss, "__name__", "")
    if getattr(jaxce, name, None) is loss:
        return _references.REFERENCES.get(name)
    return None


def _describe(value: Any) -> str:
    if isinstance(value, (jax.Array, np.ndarray)):
        return f"[{'x'.join(map(str, value.shape))}]" if value.shape else str(value)
    return repr(value)


# --- python -m jaxce verify ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One loss under one option set: how to build its arguments from a seeded generator."""

    name: str
    options: str
    build: Callable[[np.random.Generator, Any], tuple[tuple[Any, ...], dict[str, Any]]]


def _cases() -> list[Case]:
    def logits(rng: np.random.Generator, dtype: Any, shape: tuple[int, ...]) -> jax.Array:
        return jnp.asarray(2 * rng.standard_normal(shape), dtype)

    def soft(rng: np.random.Generator, shape: tuple[int, ...], axis: int = -1) -> np.ndarray:
        raw = rng.uniform(0.05, 1.0, shape)
        return raw / raw.sum(axis=axis, keepdims=True)

    def class_weight(rng: np.random.Generator, size: int) -> np.ndarray:
        return rng.uniform(0.5, 2.0, size).astype(np.float32)

    batch, classes = (3, 4), 5
    shape = (*batch, classes)
    cases = [
        Case("sigmoid_binary_cross_entropy", "defaults",
             lambda r, d: ((logits(r, d, shape), r.uniform(0, 1, shape)), {})),
        Case("sigmoid_binary_cross_entropy", "weight, pos_weight, mean",
             lambda r, d: ((logits(r, d, shape), (r.uniform(size=shape) > 0.5) * 1.0),
                           {"weight": class_weight(r, classes), "pos_weight": class_weight(r, classes),
                            "reduction": "mean"})),
        Case("sigmoid_binary_cross_entropy", "label_smoothing, where, sum",
             lambda r, d: ((logits(r, d, shape), (r.uniform(size=shape) > 0.5) * 1.0),
                           {"label_smoothing": 0.1, "where": r.uniform(size=shape) > 0.3,
                            "reduction": "sum"})),
        Case("binary_cross_entropy", "defaults",
             lambda r, d: ((jnp.asarray(r.uniform(0.05, 0.95, shape), d), r.uniform(0, 1, shape)), {})),
        Case("binary_cross_entropy", "weight, where, mean",
             lambda r, d: ((jnp.asarray(r.uniform(0.05, 0.95, shape), d), (r.uniform(size=shape) > 0.5) * 1.0),
                           {"weight": r.uniform(0.5, 2.0, shape).astype(np.float32),
                            "where": r.uniform(size=shape) > 0.3, "reduction": "mean"})),
        Case("softmax_cross_entropy", "defaults",
             lambda r, d: ((logits(r, d, shape), soft(r, shape)), {})),
        Case("softmax_cross_entropy", "weight, label_smoothing, mean",
             lambda r, d: ((logits(r, d, shape), soft(r, shape)),
                           {"weight": class_weight(r, classes), "label_smoothing": 0.1,
                            "reduction": "mean"})),
        Case("softmax_cross_entropy", "axis=(0, 2), where, sum",
             lambda r, d: ((logits(r, d, shape), soft(r, shape)),
                           {"axis": (0, 2), "where": r.uniform(size=shape) > 0.2, "reduction": "sum"})),
        Case("softmax_cross_entropy_with_integer_labels", "defaults",
             lambda r, d: ((logits(r, d, shape), r.integers(0, classes, batch)), {})),
        Case("softmax_cross_entropy_with_integer_labels", "weight, ignore_index, mean",
             lambda r, d: ((logits(r, d, shape), np.where(r.uniform(size=batch) > 0.25,
                                                           r.integers(0, classes, batch), -100)),
                           {"weight": class_weight(r, classes), "ignore_index": -100,
                            "reduction": "mean"})),
        Case("softmax_cross_entropy_with_integer_labels", "label_smoothing, z_loss, weight, mean",
             lambda r, d: ((logits(r, d, shape), r.integers(0, classes, batch)),
                           {"label_smoothing": 0.1, "z_loss": 1e-2,
                            "weight": class_weight(r, classes), "reduction": "mean"})),
        Case("softmax_cross_entropy_with_integer_labels", "axis=0, where, sum",
             lambda r, d: _labels_kept_by_where(logits(r, d, shape), r, "sum")),
        Case("categorical_cross_entropy", "defaults",
             lambda r, d: ((jnp.asarray(soft(r, shape), d), soft(r, shape)), {})),
        Case("categorical_cross_entropy", "weight, label_smoothing, where, mean",
             lambda r, d: ((jnp.asarray(soft(r, shape), d), soft(r, shape)),
                           {"weight": class_weight(r, classes), "label_smoothing": 0.1,
                            "where": r.uniform(size=batch) > 0.3, "reduction": "mean"})),
        Case("softmax_focal_loss", "defaults",
             lambda r, d: ((logits(r, d, shape), soft(r, shape)), {})),
        Case("softmax_focal_loss", "alpha[C], gamma=0.5, label_smoothing, where, mean",
             lambda r, d: ((logits(r, d, shape), soft(r, shape)),
                           {"alpha": class_weight(r, classes), "gamma": 0.5, "label_smoothing": 0.1,
                            "where": r.uniform(size=shape) > 0.2, "reduction": "mean"})),
        Case("poly_loss_cross_entropy", "defaults",
             lambda r, d: ((logits(r, d, shape), soft(r, shape)), {})),
        Case("poly_loss_cross_entropy", "epsilon=-1, axis=0, where, sum",
             lambda r, d: ((logits(r, d, shape), soft(r, shape, axis=0)),
                           {"epsilon": -1.0, "axis": 0, "where": r.uniform(size=shape) > 0.2,
                            "reduction": "sum"})),
        Case("kl_divergence", "defaults",
             lambda r, d: ((jnp.asarray(np.log(soft(r, shape)), d), soft(r, shape)), {})),
        Case("kl_divergence", "where, batchmean",
             lambda r, d: ((jnp.asarray(np.log(soft(r, shape)), d), soft(r, shape)),
                           {"where": r.uniform(size=shape) > 0.2, "reduction": "batchmean"})),
        Case("kl_divergence_with_log_targets", "defaults",
             lambda r, d: ((jnp.asarray(np.log(soft(r, shape)), d), np.log(soft(r, shape))), {})),
        Case("kl_divergence_with_log_targets", "axis=(0, 2), where, mean",
             lambda r, d: ((jnp.asarray(np.log(soft(r, shape)), d), np.log(soft(r, shape))),
                           {"axis": (0, 2), "where": r.uniform(size=batch[1:]) > 0.3,
                            "reduction": "mean"})),
        Case("sigmoid_focal_loss", "defaults",
             lambda r, d: ((logits(r, d, shape), (r.uniform(size=shape) > 0.5) * 1.0), {})),
        Case("sigmoid_focal_loss", "alpha, gamma=1.5, where, mean",
             lambda r, d: ((logits(r, d, shape), r.uniform(0, 1, shape)),
                           {"alpha": 0.25, "gamma": 1.5, "where": r.uniform(size=shape) > 0.3,
                            "reduction": "mean"})),
        Case("linear_cross_entropy", "defaults",
             lambda r, d: ((jnp.asarray(r.standard_normal((2, 6, 8)), d),
                            jnp.asarray(0.5 * r.standard_normal((11, 8)), d),
                            r.integers(0, 11, (2, 6))), {})),
        Case("linear_cross_entropy", "bias, softcap, shift, ignore_index, smoothing, z_loss",
             lambda r, d: ((jnp.asarray(r.standard_normal((2, 6, 8)), d),
                            jnp.asarray(0.5 * r.standard_normal((11, 8)), d),
                            np.where(r.uniform(size=(2, 6)) > 0.2, r.integers(0, 11, (2, 6)), -100)),
                           {"bias": jnp.asarray(r.standard_normal(11), d), "softcap": 3.0, "shift": 1,
                            "ignore_index": -100, "label_smoothing": 0.1, "z_loss": 1e-3})),
        Case("linear_cross_entropy", "sum",
             lambda r, d: ((jnp.asarray(r.standard_normal((5, 8)), d),
                            jnp.asarray(0.5 * r.standard_normal((11, 8)), d),
                            r.integers(0, 11, (5,))), {"reduction": "sum"})),
        Case("linear_distillation_loss", "defaults (forward KL)",
             lambda r, d: ((jnp.asarray(r.standard_normal((2, 6, 8)), d),
                            jnp.asarray(0.5 * r.standard_normal((11, 8)), d),
                            jnp.asarray(r.standard_normal((2, 6, 5)), d),
                            jnp.asarray(r.standard_normal((11, 5)), d)), {})),
        Case("linear_distillation_loss", "beta=0.5, temperature, hard labels, ignore_index, sum",
             lambda r, d: ((jnp.asarray(r.standard_normal((7, 8)), d),
                            jnp.asarray(0.5 * r.standard_normal((11, 8)), d),
                            jnp.asarray(r.standard_normal((7, 5)), d),
                            jnp.asarray(r.standard_normal((11, 5)), d),
                            np.where(r.uniform(size=7) > 0.2, r.integers(0, 11, 7), -100)),
                           {"beta": 0.5, "temperature": 2.0, "hard_label_weight": 0.3,
                            "ignore_index": -100, "reduction": "sum"})),
        Case("linear_distillation_loss", "beta=1 (reverse KL), mean",
             lambda r, d: ((jnp.asarray(r.standard_normal((7, 8)), d),
                            jnp.asarray(0.5 * r.standard_normal((11, 8)), d),
                            jnp.asarray(r.standard_normal((7, 5)), d),
                            jnp.asarray(r.standard_normal((11, 5)), d)),
                           {"beta": 1.0, "reduction": "mean"})),
    ]  # fmt: skip
    return cases


def _labels_kept_by_where(
    logits: jax.Array, rng: np.random.Generator, reduction: Reduction
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Integer labels over axis 0 and a class mask that never excludes the label itself.

    (An excluded label class has probability 0: an infinite loss, no derivative to check.)
    """
    num_classes, *batch = logits.shape
    labels = rng.integers(0, num_classes, batch)
    where = rng.uniform(size=logits.shape) > 0.3
    where[labels, *np.indices(batch)] = True
    return (logits, labels), {"axis": 0, "where": where, "reduction": reduction}


DTYPES = ("float32", "float64", "bfloat16")


def loss_names() -> list[str]:
    """The losses :func:`run_all` checks (the values ``--loss`` accepts), in run order."""
    return list(dict.fromkeys(case.name for case in _cases()))


def run_all(
    dtypes: Sequence[str] = DTYPES,
    losses: Sequence[str] | None = None,
    *,
    on_report: Callable[[GradientReport], None] | None = None,
) -> list[GradientReport]:
    """Runs :func:`check_gradients` for every loss, main option set and dtype.

    This is ``jaxce verify`` from Python (the module :mod:`jaxce.verify` itself is not
    callable): the same checks, as reports instead of a table and an exit status.

    Args:
      dtypes: the input dtypes to check each option set in.
      losses: only these losses (names from :func:`loss_names`); default all.
      on_report: called with each report as soon as it is ready.

    Returns:
      One :class:`GradientReport` per loss, option set and dtype, in run order.
      ``jaxce verify`` exits 0 exactly when every report ``passed``.

    Example:
      >>> from jaxce import verify
      >>> reports = verify.run_all(["float64"], ["binary_cross_entropy"])
      >>> all(report.passed for report in reports), len(reports)
      (True, 2)
      >>> print(verify.format_table(reports).splitlines()[2])
      binary_cross_entropy
    """
    unknown = sorted(set(losses or ()) - set(loss_names()))
    if unknown:
        raise ValueError(f"unknown loss(es) {unknown}; expected some of {loss_names()}")
    reports = []
    for case_index, case in enumerate(_cases()):
        if losses and case.name not in losses:
            continue
        for dtype_name in dtypes:
            with jax.enable_x64(True):
                rng = np.random.default_rng(case_index)
                args, kwargs = case.build(rng, jnp.dtype(dtype_name))
            report = check_gradients(
                getattr(jaxce, case.name),
                getattr(derivatives, case.name),
                *args,
                options=case.options,
                **kwargs,
            )
            reports.append(report)
            if on_report is not None:
                on_report(report)
    return reports


def _count_checks(dtypes: Sequence[str], losses: Sequence[str] | None) -> int:
    return len(dtypes) * sum(1 for case in _cases() if not losses or case.name in losses)


SHORT_PAIR_NAMES = {
    CLOSED_VS_GRAD: "cf~grad",
    CLOSED_VS_REFERENCE: "cf~ref",
    GRAD_VS_REFERENCE: "grad~ref",
    CLOSED_VS_FINITE_DIFFERENCES: "cf~fd",
    JVP_VS_CLOSED: "jvp~cf",
}
# The narrow table's two columns: the analytic comparisons, and finite differences.
AUTODIFF_PAIRS = (CLOSED_VS_GRAD, CLOSED_VS_REFERENCE, GRAD_VS_REFERENCE, JVP_VS_CLOSED)


def format_table(reports: Sequence[GradientReport], *, wide: bool = False) -> str:
    """One row per option set and dtype, under its loss's name: the worst relative errors.

    The narrow table has two error columns, ``autodiff`` (the worst of the four analytic
    comparisons) and ``finite diff``; ``wide=True`` gives one column per comparison
    (:data:`PAIRS`). :func:`legend` explains the columns.
    """
    columns: list[tuple[str, tuple[str, ...]]] = (
        [(SHORT_PAIR_NAMES[pair], (pair,)) for pair in PAIRS]
        if wide
        else [("autodiff", AUTODIFF_PAIRS), ("finite diff", (CLOSED_VS_FINITE_DIFFERENCES,))]
    )
    width = max((len(r.options) + 2 for r in reports), default=0)
    width = max(width, *(len(r.name) for r in reports), len("loss / options"))
    header = f"{'loss / options':<{width}}  {'dtype':<8}"
    header += "".join(f"  {title:>11}" for title, _ in columns) + "  verdict"
    lines = [header, "-" * len(header)]
    previous = None
    for report in reports:
        if report.name != previous:
            lines.append(report.name)
            previous = report.name
        line = f"{'  ' + report.options:<{width}}  {report.dtype:<8}"
        for _, pairs in columns:
            rows = [row for pair in pairs if (row := report.worst(pair)) is not None]
            worst = max((row.max_rel for row in rows), key=_sortable, default=None)
            line += f"  {worst:>11.1e}" if worst is not None else f"  {'-':>11}"
        lines.append(line + ("  ok" if report.passed else "  FAIL"))
    return "\n".join(lines)


def legend(*, wide: bool = False) -> str:
    """What the columns of :func:`format_table` mean, and the tolerances."""
    if wide:
        columns = [
            "cf~grad   the closed form (jaxce.derivatives) against jax.grad of the loss",
            "cf~ref    the closed form against jax.grad of an independent reference, float64",
            "grad~ref  jax.grad of the loss against jax.grad of that reference",
            "cf~fd     the closed form against central finite differences, float64",
            "jvp~cf    forward mode (jax.jvp along random directions) against closed form . v",
        ]
    else:
        columns = [
            "autodiff     the worst of: the closed form (jaxce.derivatives) against jax.grad of",
            "             the loss and against jax.grad of an independent float64 reference,",
            "             jax.grad against that reference, and forward mode (jax.jvp) against",
            "             the closed form (--wide: one column each)",
            "finite diff  the closed form against central finite differences in float64",
        ]
    tolerances = ", ".join(
        f"{name} {t.analytic:g}"
        + (
            ""
            if t.analytic == t.finite_differences
            else f" ({t.finite_differences:g} against finite differences)"
        )
        for name, t in TOLERANCES.items()
    )
    return "\n".join(
        [
            "Each number is a norm-wise relative error, max|a - b| / max|b|, the worst over the",
            "differentiated arguments:",
            *(f"  {line}" for line in columns),
            "A row is ok when every comparison is within its dtype's tolerance:",
            *textwrap.wrap(tolerances, 88, initial_indent="  ", subsequent_indent="  "),
        ]
    )


DESCRIPTION = """\
Checks the gradient of every jaxce loss, under its main option sets, in several dtypes: the
closed form (jaxce.derivatives) against jax.grad of the loss, against jax.grad of an
independent reference formulation and against central finite differences in float64, and
forward mode (jax.jvp) against the closed form. Prints the worst relative error of each
comparison and exits 1 if any is beyond its tolerance, 0 if all pass."""

EPILOG = """\
examples:
  jaxce verify                                   every loss, float32 / float64 / bfloat16
  jaxce verify --loss sigmoid_focal_loss --dtype float64 -v
  jaxce verify --json > report.json              "passed" is true exactly when it exits 0

exit status: 0 every check passed; 1 a check failed (or nothing ran); 2 bad arguments."""


def register(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds ``jaxce verify`` to the ``jaxce`` command's sub-commands (``add_subparsers()``)."""
    parser = commands.add_parser(
        "verify",
        help="check every loss's gradient four ways",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    names = loss_names()
    parser.add_argument("--json", action="store_true", help="print the reports as JSON")
    parser.add_argument(
        "--dtype",
        action="append",
        choices=sorted(TOLERANCES),
        help=f"repeatable (default: {' '.join(DTYPES)})",
    )
    parser.add_argument(
        "--loss",
        action="append",
        choices=names,
        metavar="NAME",
        help=f"only this loss (repeatable); one of: {', '.join(names)}",
    )
    parser.add_argument(
        "--wide", action="store_true", help="one table column per comparison instead of two"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="print every comparison")
    parser.set_defaults(run=run)
    return parser


def run(options: argparse.Namespace) -> int:
    """Runs ``jaxce verify`` with parsed options: 0 when every check passes, else 1."""
    dtypes = options.dtype or DTYPES
    start = time.perf_counter()
    with Progress(_count_checks(dtypes, options.loss), "jaxce verify") as progress:
        reports = run_all(
            dtypes,
            options.loss,
            on_report=lambda r: progress.advance(f"{r.name} [{r.dtype}]"),
        )
    elapsed = time.perf_counter() - start
    failed = [r for r in reports if not r.passed]
    passed = bool(reports) and not failed
    if options.json:
        print(json.dumps({"passed": passed, "reports": [r.to_dict() for r in reports]}, indent=1))
    else:
        print(format_table(reports, wide=options.wide))
        if options.verbose or failed:
            print()
            for report in reports if options.verbose else failed:
                print(report)
        print(f"\n{legend(wide=options.wide)}")
        print(f"\n{len(reports) - len(failed)}/{len(reports)} passed in {elapsed:.1f} s")
    return 0 if passed else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``jaxce verify [--json] [--dtype D ...] [--loss NAME ...] [--wide] [-v]``.

    The command line of ``jaxce verify``, parsed and run from Python; ``argv`` defaults to
    ``sys.argv[1:]``. Returns 0 when every check passes and 1 otherwise (also when nothing
    ran); with ``--json`` the printed ``"passed"`` is true exactly when it returns 0. Bad
    arguments (an unknown ``--loss`` or ``--dtype``) exit with status 2 and a message on
    stderr naming the valid values, as argparse does. For the reports themselves, call
    :func:`run_all`.
    """
    command = argparse.ArgumentParser(prog="jaxce")
    register(command.add_subparsers(required=True))
    options = command.parse_args(["verify", *(sys.argv[1:] if argv is None else argv)])
    return int(options.run(options))


# The checks run once each: XLA's slow optimisation passes cost more than they save.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _fast_jit(f: Callable[..., Any]) -> Callable[..., Any]:
    return jax.jit(f, compiler_options=_FAST_COMPILE)
