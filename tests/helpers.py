"""Float64 NumPy references, the table of public losses the tests sweep, and tolerances.

The references share no code with jaxce: they are the formulas of the
docstrings written directly in NumPy, evaluated in float64. The tolerances are
derived from the dtype and the operation (see tests/conftest.py).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxce
import jaxce.derivatives

# The reductions every loss accepts, read from the library's `Reduction` literal: the sweeps
# grow with it instead of keeping a copy of their own.
from jaxce._reduce import REDUCTIONS as REDUCTIONS


def unit_roundoff(dtype: Any) -> float:
    """``u = 2^-p`` for a ``p``-bit significand: the largest relative error of one rounding.

    float64 ``2^-53``, float32 ``2^-24``, float16 ``2^-11``, bfloat16 ``2^-8``.
    """
    return float(jnp.finfo(dtype).eps) / 2


def rounding_bound(dtype: Any, operations: float) -> float:
    """Relative error of ``operations`` roundings in ``dtype`` (Higham's ``gamma_n = n u``).

    A sum of ``n`` terms, a product of ``n`` factors, or any chain of ``n``
    correctly rounded operations is within ``gamma_n`` of the exact result,
    relative to the sum of the magnitudes involved.
    """
    return operations * unit_roundoff(dtype)


def half_precision_output_bound(dtype: Any, operations: float) -> float:
    """A result computed in float32 and rounded once to ``dtype`` (jaxce's half-precision path).

    The rounding to ``dtype`` costs ``u(dtype)``; the float32 computation
    before it ``gamma_n`` in float32. For float32 or float64 there is no final
    rounding beyond the computation's own.
    """
    if jnp.dtype(dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        return rounding_bound(dtype, operations)
    return unit_roundoff(dtype) + rounding_bound(jnp.float32, operations)


def assert_normwise_close(
    actual: Any, expected: Any, tolerance: float, what: str = "", *, floor: float = 1.0
) -> None:
    """``max |actual - expected| <= tolerance * max(floor, max |expected|)``, NaN and inf in place.

    Norm-wise, as `jaxce.verify` measures: an element-wise relative error means
    nothing for entries that cancel to nearly 0 (``softmax(x) - onehot(y)``);
    ``floor=1`` where values below 1 carry absolute, not relative, rounding
    (sums of terms of order 1), ``floor=0`` where the whole array is one scale
    (a gradient that a mean divides by N).
    """
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected), err_msg=f"{what}: NaN")
    infinite = np.isinf(expected)
    np.testing.assert_array_equal(actual[infinite], expected[infinite], err_msg=f"{what}: inf")
    finite = np.isfinite(expected)
    assert np.all(np.isfinite(actual[finite])), what
    if not finite.any():
        return
    scale = max(floor, float(np.max(np.abs(expected[finite]))))
    error = float(np.max(np.abs(actual[finite] - expected[finite])))
    assert error <= tolerance * scale, (
        f"{what}: max error {error:.3g} > {tolerance:.3g} * scale {scale:.3g}"
    )


def np_logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def np_log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return x - np.expand_dims(np_logsumexp(x, axis), axis)


def np_softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(x, 0.0)


def np_integer_ce(
    x: np.ndarray,
    y: np.ndarray,
    *,
    weight: np.ndarray | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "none",
) -> np.ndarray:
    """PyTorch's cross_entropy (class indices) plus PaLM's z-loss, in float64 loops."""
    n, c = x.shape
    w = np.ones(c) if weight is None else weight
    losses, weights, z_terms, counted = [], [], [], []
    for i in range(n):
        if ignore_index is not None and y[i] == ignore_index:
            losses.append(0.0)
            weights.append(0.0)
            z_terms.append(0.0)
            counted.append(False)
            continue
        logp = np_log_softmax(x[i])
        nll = -w[y[i]] * logp[y[i]]
        smooth = -np.sum(w * logp)
        losses.append((1 - label_smoothing) * nll + label_smoothing / c * smooth)
        weights.append(w[y[i]])
        z_terms.append(z_loss * np_logsumexp(x[i]) ** 2)
        counted.append(True)
    losses_a, z_a = np.array(losses), np.array(z_terms)
    if reduction == "none":
        return losses_a + z_a
    if reduction == "sum":
        return np.sum(losses_a) + np.sum(z_a)
    den = np.sum(weights)
    count = np.sum(counted)
    ce = np.sum(losses_a) / den if den else 0.0
    return np.asarray(ce + (np.sum(z_a) / count if count else 0.0))


@dataclasses.dataclass(frozen=True)
class LossCase:
    """One public loss with inputs generated for a given batch shape and dtype."""

    name: str
    fn: Callable[..., Any]
    make_inputs: Callable[[np.random.Generator, int, int], tuple[np.ndarray, np.ndarray]]

    def __str__(self) -> str:
        return self.name


def _logits_int(rng: np.random.Generator, n: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.normal(size=(n, c)) * 2, rng.integers(0, c, size=(n,))


def _logits_soft(rng: np.random.Generator, n: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.normal(size=(n, c)) * 2, rng.dirichlet(np.ones(c), size=n)


def _logits_binary(rng: np.random.Generator, n: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.normal(size=(n, c)) * 2, rng.integers(0, 2, size=(n, c)).astype(float)


def _probs_binary(rng: np.random.Generator, n: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.uniform(0.05, 0.95, size=(n, c)), rng.integers(0, 2, size=(n, c)).astype(float)


def _probs_categorical(rng: np.random.Generator, n: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.dirichlet(np.ones(c) * 2, size=n), np.eye(c)[rng.integers(0, c, size=n)]


def _log_probs_soft(rng: np.random.Generator, n: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Log-predictions (a log-softmax) and probability targets."""
    return np_log_softmax(rng.normal(size=(n, c)) * 2), rng.dirichlet(np.ones(c), size=n)


def _log_probs_log_soft(rng: np.random.Generator, n: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Log-predictions and log-probability targets."""
    log_predictions, targets = _log_probs_soft(rng, n, c)
    return log_predictions, np.log(targets)


LOSSES = [
    LossCase(
        "softmax_cross_entropy_with_integer_labels",
        jaxce.softmax_cross_entropy_with_integer_labels,
        _logits_int,
    ),
    LossCase("softmax_cross_entropy", jaxce.softmax_cross_entropy, _logits_soft),
    LossCase("sigmoid_binary_cross_entropy", jaxce.sigmoid_binary_cross_entropy, _logits_binary),
    LossCase("sigmoid_focal_loss", jaxce.sigmoid_focal_loss, _logits_binary),
    LossCase("binary_cross_entropy", jaxce.binary_cross_entropy, _probs_binary),
    LossCase("categorical_cross_entropy", jaxce.categorical_cross_entropy, _probs_categorical),
    LossCase("softmax_focal_loss", jaxce.softmax_focal_loss, _logits_soft),
    LossCase("poly_loss_cross_entropy", jaxce.poly_loss_cross_entropy, _logits_soft),
    LossCase("kl_divergence", jaxce.kl_divergence, _log_probs_soft),
    LossCase(
        "kl_divergence_with_log_targets", jaxce.kl_divergence_with_log_targets, _log_probs_log_soft
    ),
]

# The losses of logits (the others take probabilities or log-probabilities).
LOGIT_LOSSES = [
    case
    for case in LOSSES
    if case.name not in ("binary_cross_entropy", "categorical_cross_entropy")
    and not case.name.startswith("kl_divergence")
]


EIGHT_DEVICES_FLAG = "JAXCE_EIGHT_DEVICES"
EIGHT_DEVICES_XLA_FLAG = "--xla_force_host_platform_device_count=8"


def start_on_eight_host_devices(command: list[str], flag: str = EIGHT_DEVICES_FLAG) -> Any:
    """Starts ``command`` (a ``subprocess.Popen``, output piped) with 8 CPU devices.

    JAX fixes its device count when its backend starts, so what needs 8
    devices runs in a child with ``XLA_FLAGS`` set and ``flag=1`` in its
    environment (which tells the child's module to define its multi-device
    part); the child imports the jaxce this process imported.
    """
    env = dict(os.environ)
    env[flag] = "1"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {EIGHT_DEVICES_XLA_FLAG}".strip()
    package_root = os.path.dirname(os.path.dirname(jaxce.__file__))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def run_on_eight_host_devices(test_file: str, timeout: float = 240) -> None:
    """Runs ``pytest test_file`` in a subprocess with 8 CPU devices, and fails with its report.

    A test file whose cases need 8 devices holds one parent test that calls
    this; only the child (``JAXCE_EIGHT_DEVICES=1``) defines the cases.
    """
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file]
    process = start_on_eight_host_devices(command)
    stdout, stderr = process.communicate(timeout=timeout)
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert result.returncode == 0, (
        f"8-device cases failed (rerun: {EIGHT_DEVICES_FLAG}=1 "
        f"XLA_FLAGS={EIGHT_DEVICES_XLA_FLAG} pytest {test_file}):\n"
        f"{result.stdout[-8000:]}\n{result.stderr[-4000:]}"
    )


# Rows with +inf logits: alone, beside finite ones, beside -inf, and two of them.
PLUS_INF_ROWS = np.array(
    [
        [0.0, np.inf, 2.0, 0.5],
        [np.inf, np.inf, 1.0, 0.0],
        [1.0, 2.0, np.inf, -np.inf],
        [np.inf, -np.inf, -np.inf, -np.inf],
    ],
    np.float32,
)


def value_grad_closed(name: str, x: Any, *rest: Any, **options: Any) -> list[np.ndarray]:
    """Jitted: jaxce's loss ``name``, ``jax.grad`` of its sum and its closed form, at ``x``."""

    def run(z: Any) -> tuple[Any, Any, Any]:
        loss = getattr(jaxce, name)
        total = lambda v: jnp.sum(loss(v, *rest, **options))  # noqa: E731
        closed = getattr(jaxce.derivatives, name)(z, *rest, **options)
        return loss(z, *rest, **options), jax.grad(total)(z), closed

    return [np.asarray(out) for out in jax.jit(run)(x)]


def compile_as_users_do(lowered: Any) -> Any:
    """``lowered.compile()`` with the fusion emitters XLA:CPU uses by default.

    tests/conftest.py compiles the suite with XLA:CPU's older elemental emitters (compiling
    takes half the time), which fuse a few operations differently. A test that reads what XLA
    compiled (its HLO, its passes over an array, ``memory_analysis()``) compiles with this,
    so that it reads what users get.
    """
    return lowered.compile(compiler_options={"xla_cpu_use_fusion_emitters": True})
