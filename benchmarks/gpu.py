"""`python -m benchmarks --suite gpu [--out DIR]`: jaxce against its peers on one GPU (an H200).

What it measures (CONTRIBUTING.md says how to run it on a machine with a GPU: `bash benchmarks/gpu.sh`):

- Fused linear cross-entropy, bfloat16 `hidden` and `weight`, `value_and_grad` of the mean loss
  with respect to both, at shape A (N=8192, D=2304, V=256000, Gemma 2) and B (N=8192, D=4096,
  V=128256, Llama 3): `jaxce.linear_cross_entropy`, the naive materialised formulation (float32
  logits, optax), jax-cce and tokamax's chunked XLA op (when their wheels are importable), and
  the floor: the three bare matrix products (bfloat16, float32 accumulation). Per competitor:
  times, compile time, XLA's temporaries, and the norm-wise relative error of the loss and of
  both gradients against the float32 materialised formulation (`Precision.HIGHEST`, no TF32).
- Plain integer-label cross-entropy at 8192 x 128256, float32 and bfloat16 logits,
  `value_and_grad` of the mean loss: jaxce (`implementation="xla"`), jaxce
  (`implementation="pallas"`, where this checkout's jaxce takes that argument), optax, and the
  floor: a copy of the logits (one read, one write). Per competitor: the mean loss's and the
  gradient's relative error against float64.
- The PyTorch peers (torch, Liger Kernel, Apple's CCE) on the same cases, through
  `benchmarks.gpu_peers` in a process of its own, run first (before JAX takes the GPU's memory).

The timing is `benchmarks.harness`'s: every JAX competitor compiled once ahead of time (compile
time and `memory_analysis()` apart), warm-up calls, then rounds of one call each in a fresh
random order; medians. One ratio throughout: `x floor` = time / the floor's time (lower is
better; 1.00 is the floor). For JAX rows it is the median of per-round ratios (timed in the same
rounds as the floor); for PyTorch rows, their median over the JAX floor's median (another
process, not interleaved).

A peer that is not installed, or fails, is a row that says so. Results go to
`DIR/<device>/gpu_results.json` and `gpu_results.md` (default `benchmarks/results/`), rewritten
after each case so that a run cut short keeps what it measured. `--shapes tiny` runs the same
cases at tiny shapes (the CPU tests use it); the full shapes refuse to run without a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import gpu_peers, harness

RESULTS = pathlib.Path(__file__).parent / "results"
REPO = pathlib.Path(__file__).resolve().parents[1]
JSON_NAME = "gpu_results.json"
MARKDOWN_NAME = "gpu_results.md"
MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The suite's shapes, its runs and its time limits."""

    fused: tuple[tuple[str, int, int, int], ...]  # (label, N, D, V)
    plain: tuple[int, int]  # (N, V)
    plain_dtypes: tuple[str, ...]
    matmul: int  # the side of the square bfloat16 product that measures the matmul rate
    bandwidth_bytes: int  # the array that measures the copy bandwidth
    runs: int
    warmup: int
    # Plain CE rounds take milliseconds: more rounds, up to about this long.
    plain_min_seconds: float
    # Rounds of one case are cut to fit this (each at least 3).
    case_budget_s: float
    torch_timeout_s: float
    # After this many seconds the JAX cases not yet started are reported as not run.
    deadline_s: float
    # The blocks tokamax's chunked XLA functions take (its defaults; smaller for tiny shapes).
    tokamax_blocks: tuple[int, int]


SHAPES = {
    "full": Shapes(
        fused=(("A", 8192, 2304, 256000), ("B", 8192, 4096, 128256)),
        plain=(8192, 128256),
        plain_dtypes=gpu_peers.PLAIN_DTYPES,
        matmul=8192,
        bandwidth_bytes=1 << 32,
        runs=10,
        warmup=2,
        plain_min_seconds=1.5,
        case_budget_s=60.0,
        torch_timeout_s=200.0,
        deadline_s=420.0,
        tokamax_blocks=(1024, 2048),
    ),
    "tiny": Shapes(
        fused=(("A", 256, 64, 2048), ("B", 256, 32, 1000)),
        plain=(64, 1000),
        plain_dtypes=gpu_peers.PLAIN_DTYPES,
        matmul=128,
        bandwidth_bytes=1 << 20,
        runs=3,
        warmup=1,
        plain_min_seconds=0.0,
        case_budget_s=5.0,
        torch_timeout_s=60.0,
        deadline_s=120.0,
        tokamax_blocks=(128, 512),
    ),
}

# Competitors.
JAXCE_FUSED = "jaxce.linear_cross_entropy"
JAXCE_FUSED_SPLIT = 'jaxce.linear_cross_entropy (gradient_products="split")'
JAXCE_FUSED_PER_TOKEN = 'jaxce.linear_cross_entropy (reduction="none", then the mean)'
NAIVE = "naive JAX (float32 logits, optax)"
JAX_CCE = "jax-cce"
TOKAMAX = "tokamax chunked_xla"
FUSED_FLOOR = "floor (3 matmuls, bfloat16, float32 accumulation)"
JAXCE_XLA = 'jaxce (implementation="xla")'
JAXCE_PALLAS = 'jaxce (implementation="pallas")'
OPTAX = "optax"
PLAIN_FLOOR = "floor (copy: one read, one write)"

# Targets: the best peer measured on an H200, and the floors (benchmarks/README.md).
FUSED_X_FLOOR = 1.15
FUSED_GRAD_ERROR = 2e-4
FUSED_LOSS_ERROR = 1e-5
PLAIN_X_FLOOR = 1.6
PLAIN_BF16_LOSS_ERROR = 1e-6

RATIO_NOTE = (
    "`x floor` = time / the floor's time (lower is better, 1.00 = at the floor). JAX rows: the "
    "median of per-round ratios, timed in the same rounds as the floor; PyTorch rows: their "
    "median over the JAX floor's median (another process, not interleaved)."
)


class Unavailable(Exception):
    """A competitor that cannot run here (not installed, or not in this checkout)."""


@dataclasses.dataclass
class Entry:
    """One JAX competitor of a case: how to build it, and how to read its gradients."""

    name: str
    # Returns the function to compile and its (device) arguments; raises `Unavailable`.
    build: Callable[[], tuple[Callable[..., Any], tuple[Any, ...]]]
    version: str | None = None
    # Maps the competitor's output to (loss, hidden gradient, [V, D] weight gradient).
    outputs: Callable[[Any], tuple[Any, Any, Any]] | None = None


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


def _error(error: BaseException) -> str:
    if isinstance(error, Unavailable):
        return f"not available: {error}"
    return f"{type(error).__name__}: {str(error)[:300]}"


# ------------------------------------------------------------------ formulations


def naive_linear(hidden: jax.Array, weight: jax.Array, labels: jax.Array) -> jax.Array:
    """The `[N, V]` float32 logits of one product, then optax's mean cross-entropy."""
    import optax

    logits = jnp.dot(hidden, weight.T, preferred_element_type=jnp.float32)
    return optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def reference_linear(hidden: jax.Array, weight: jax.Array, labels: jax.Array) -> jax.Array:
    """The float32 materialised formulation, true float32 products (no TF32)."""
    logits = jnp.dot(
        hidden.astype(jnp.float32),
        weight.astype(jnp.float32).T,
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )
    picked = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - picked)


def three_matmuls(hidden: jax.Array, weight: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The fused floor: the logits, and the two products that push a `[N, V]` gradient back."""
    f32 = jnp.float32
    logits = jnp.dot(hidden, weight.T, preferred_element_type=f32).astype(hidden.dtype)
    grad_hidden = jnp.dot(logits, weight, preferred_element_type=f32).astype(hidden.dtype)
    grad_weight = jnp.dot(logits.T, hidden, preferred_element_type=f32).astype(weight.dtype)
    return grad_hidden, grad_weight


def copy_floor(logits: jax.Array) -> jax.Array:
    """The plain floor: read the logits once, write an array of their size once."""
    return logits * 2


def rounded_to(x: jax.Array, dtype: Any) -> jax.Array:
    """`x` rounded to `dtype`'s precision, kept in `x`'s dtype.

    `lax.reduce_precision`, not `x.astype(dtype).astype(x.dtype)`: XLA may drop such a round
    trip (it allows excess precision by default).
    """
    info = jnp.finfo(dtype)
    if info.bits >= jnp.finfo(x.dtype).bits:
        return x
    return jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


@jax.jit
def _relative_errors(got: jax.Array, want: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`got`'s relative error against `want`, and `want`'s own once rounded to `got`'s dtype."""
    want32 = want.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(want32 * want32))
    diff = got.astype(jnp.float32) - want32
    rounded = rounded_to(want32, got.dtype) - want32
    return jnp.sqrt(jnp.sum(diff * diff)) / norm, jnp.sqrt(jnp.sum(rounded * rounded)) / norm


@jax.jit
def reference_value_and_grads(
    hidden: jax.Array, weight: jax.Array, labels: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """`reference_linear`'s value and float32 gradients at float32 copies of the inputs."""
    f32 = jnp.float32
    return jax.value_and_grad(reference_linear, argnums=(0, 1))(
        hidden.astype(f32), weight.astype(f32), labels
    )


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def fused_inputs(n: int, d: int, v: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """bfloat16 `hidden` `[N, D]` and `weight` `[V, D]` (entries of about `D**-0.25`, so logits
    of about 1) and int32 labels, drawn on the device in one compiled call."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(n + v), 3)
    scale = d**0.25
    hidden = (jax.random.normal(k1, (n, d), jnp.float32) / scale).astype(jnp.bfloat16)
    weight = (jax.random.normal(k2, (v, d), jnp.float32) / scale).astype(jnp.bfloat16)
    return hidden, weight, jax.random.randint(k3, (n,), 0, v, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def plain_inputs(n: int, v: int, dtype: str) -> tuple[jax.Array, jax.Array]:
    """Logits `3 * normal` in `dtype` and int32 labels, on the device in one compiled call."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    logits = (3 * jax.random.normal(k1, (n, v), jnp.float32)).astype(dtype)
    return logits, jax.random.randint(k2, (n,), 0, v, dtype=jnp.int32)


def gradient_errors(prefix: str, got: jax.Array, want: jax.Array) -> dict[str, float]:
    """`got`'s norm-wise relative error against `want`, and what rounding alone explains.

    A gradient returned in bfloat16 is at least `rounding` away from a float32 reference (the
    reference itself rounded to bfloat16: about 1.5e-3); `beyond_rounding`,
    `sqrt(error**2 - rounding**2)`, estimates the error of the computation itself (rounding
    errors being independent of it).
    """
    error, rounding = (float(e) for e in _relative_errors(got, want))
    return {
        f"{prefix}_rel_error": error,
        f"{prefix}_rounding": rounding,
        f"{prefix}_beyond_rounding": max(error**2 - rounding**2, 0.0) ** 0.5,
    }


def _enable_x64() -> Any:
    """`jax.enable_x64(True)`; an AttributeError where this JAX has no such context manager
    (the callers then compute on the host)."""
    return jax.enable_x64(True)


def float64_reference(
    logits: jax.Array, labels: jax.Array
) -> tuple[float, Callable[[jax.Array], dict[str, float]]]:
    """The float64 mean loss of these logits, and a gradient's relative errors against it
    (as `gradient_errors` reports them).

    The float64 gradient, `(softmax(x) - onehot(y)) / N`, is recomputed inside the error
    function (fused by XLA) rather than held.
    """

    def pieces(x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        x64 = x.astype(jnp.float64)
        lse = jax.nn.logsumexp(x64, axis=-1)
        loss = jnp.mean(lse - jnp.take_along_axis(x64, y[:, None], axis=-1)[:, 0])
        grad = jnp.exp(x64 - lse[:, None]) - jax.nn.one_hot(y, x.shape[-1], dtype=jnp.float64)
        return loss, grad / x.shape[0]

    def loss_only(x: jax.Array, y: jax.Array) -> jax.Array:
        return pieces(x, y)[0]

    def grad_error(x: jax.Array, y: jax.Array, got: jax.Array) -> tuple[jax.Array, jax.Array]:
        want = pieces(x, y)[1]
        norm = jnp.sqrt(jnp.sum(want * want))
        diff = got.astype(jnp.float64) - want
        rounded = rounded_to(want, got.dtype) - want
        return jnp.sqrt(jnp.sum(diff * diff)) / norm, jnp.sqrt(jnp.sum(rounded**2)) / norm

    try:
        with _enable_x64():
            loss = float(jax.jit(loss_only)(logits, labels))
    except Exception as error:  # no float64 in this JAX: the loss on the host, no gradient
        _log(f"float64 on the device failed ({_error(error)}): the mean loss on the host")
        return _float64_loss_on_host(logits, labels), lambda got: {}
    compiled_error = jax.jit(grad_error)

    def errors(got: jax.Array) -> dict[str, float]:
        with _enable_x64():
            error, rounding = (float(e) for e in compiled_error(logits, labels, got))
        return {
            "grad_rel_error": error,
            "grad_rounding": rounding,
            "grad_beyond_rounding": max(error**2 - rounding**2, 0.0) ** 0.5,
        }

    return loss, errors


def _float64_loss_on_host(logits: jax.Array, labels: jax.Array, rows: int = 512) -> float:
    """The float64 mean loss in NumPy, `rows` rows at a time."""
    y = np.asarray(labels)
    total = 0.0
    for start in range(0, logits.shape[0], rows):
        x = np.asarray(logits[start : start + rows].astype(jnp.float32)).astype(np.float64)
        top = x.max(axis=-1)
        lse = top + np.log(np.exp(x - top[:, None]).sum(axis=-1))
        total += float(np.sum(lse - x[np.arange(x.shape[0]), y[start : start + rows]]))
    return total / logits.shape[0]


# ------------------------------------------------------------------ competitors


def _jax_cce_loss() -> Callable[..., Any]:
    if importlib.util.find_spec("jax_cce") is None:
        raise Unavailable("jax-cce is not installed (its wheel was not carried)")
    import jax_cce

    return lambda h, w, y: jax_cce.linear_cross_entropy(h, w, y)


def _tokamax_loss(blocks: tuple[int, int]) -> tuple[Callable[..., Any], str]:
    """tokamax's chunked XLA linear cross-entropy, `(hidden, labels, weight [D, V])`, and how.

    Its public op first (`tokamax.linear_softmax_cross_entropy_loss(...,
    implementation="chunked_xla")`), which needs tokamax's many dependencies; failing that, the
    op's own forward and backward functions, read from the installed wheel's `chunked_xla.py`
    (its module imports the whole package) and joined by a `custom_vjp` the way the op joins
    them, with the op's default blocks (1024 tokens, 2048 vocabulary rows).
    """
    spec = importlib.util.find_spec("tokamax")
    if spec is None or not spec.submodule_search_locations:
        raise Unavailable("tokamax is not installed (its wheel was not carried)")
    try:
        tokamax = importlib.import_module("tokamax")
        op = tokamax.linear_softmax_cross_entropy_loss

        def public(h: jax.Array, y: jax.Array, wt: jax.Array) -> jax.Array:
            return op(h, y, wt, reduction="mean", implementation="chunked_xla")

        return public, "public op"
    except Exception as error:
        why = f"{type(error).__name__}: {str(error)[:120]}"
    package = pathlib.Path(next(iter(spec.submodule_search_locations)))
    source = (package / "_src/ops/linear_softmax_cross_entropy_loss/chunked_xla.py").read_text()
    start = source.index("@functools.partial(")
    end = source.index("@dataclasses.dataclass")
    namespace: dict[str, Any] = {"functools": functools, "jax": jax, "jnp": jnp}
    header = "from typing import Literal\nfrom jaxtyping import Array, Integer, Real\n"
    exec(compile(header + source[start:end], str(package / "chunked_xla.py"), "exec"), namespace)
    forward = namespace["linear_softmax_cross_entropy_loss_fwd_chunked_xla"]
    backward = namespace["linear_softmax_cross_entropy_loss_bwd_chunked_xla"]
    sizes = {"b_block_sz": blocks[0], "v_block_sz": blocks[1]}

    @jax.custom_vjp
    def loss(h: jax.Array, y: jax.Array, wt: jax.Array) -> jax.Array:
        return forward(h, y, wt, reduction="mean", **sizes)[0]

    def loss_fwd(h: jax.Array, y: jax.Array, wt: jax.Array) -> tuple[jax.Array, Any]:
        value, lse = forward(h, y, wt, reduction="mean", **sizes)
        return value, (lse, h, y, wt)

    def loss_bwd(residuals: Any, g: jax.Array) -> tuple[Any, None, Any]:
        lse, h, y, wt = residuals
        dh, dw = backward(g, lse, h, y, wt, reduction="mean", **sizes)
        return dh, None, dw

    loss.defvjp(loss_fwd, loss_bwd)
    return loss, f"its fwd/bwd functions, blocks {blocks} (public op: {why})"


def fused_entries(
    n: int, d: int, v: int, shapes: Shapes, notes: dict[str, str]
) -> tuple[list[Entry], tuple[jax.Array, jax.Array, jax.Array]]:
    """The fused case's competitors and its inputs (on the device)."""
    import jaxce

    hidden, weight, labels = args = fused_inputs(n, d, v)

    def grad_of(loss: Callable[..., Any]) -> Callable[..., Any]:
        return jax.value_and_grad(loss, argnums=(0, 1))

    def standard(out: Any) -> tuple[Any, Any, Any]:
        loss, (dh, dw) = out
        return loss, dh, dw

    def jax_cce() -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return grad_of(_jax_cce_loss()), args

    def tokamax() -> tuple[Callable[..., Any], tuple[Any, ...]]:
        loss, how = _tokamax_loss(shapes.tokamax_blocks)
        notes[TOKAMAX] = how
        # Its weight is [D, V]: transposed once here, outside the timed call.
        weight_t = jnp.asarray(weight.T)

        def f(h: jax.Array, wt: jax.Array, y: jax.Array) -> jax.Array:
            return loss(h, y, wt)

        return grad_of(f), (hidden, weight_t, labels)

    def split_products() -> tuple[Callable[..., Any], tuple[Any, ...]]:
        # The opt-in for more precision: the logits' float32 gradient enters each
        # gradient product as two bfloat16 halves (two products each, five in all).
        try:
            plan = dataclasses.replace(
                jaxce.plan_linear_cross_entropy(n, d, v, jnp.bfloat16),
                gradient_products="split",
            )
        except (TypeError, ValueError) as error:
            raise Unavailable(f"this checkout's plan has no gradient_products: {error}") from None

        def loss(h: jax.Array, w: jax.Array, y: jax.Array) -> Any:
            return jaxce.linear_cross_entropy(h, w, y, plan=plan)

        return grad_of(loss), args

    def per_token() -> tuple[Callable[..., Any], tuple[Any, ...]]:
        # The per-token losses' own rule (four products: the backward pass
        # recomputes the logits), reduced outside; the same value as "mean".
        def loss(h: jax.Array, w: jax.Array, y: jax.Array) -> Any:
            return jnp.mean(jaxce.linear_cross_entropy(h, w, y, reduction="none"))

        return grad_of(loss), args

    def tokamax_outputs(out: Any) -> tuple[Any, Any, Any]:
        loss, (dh, dwt) = out
        return loss, dh, dwt.T

    entries = [
        Entry(
            JAXCE_FUSED,
            lambda: (grad_of(lambda h, w, y: jaxce.linear_cross_entropy(h, w, y)), args),
            _version("jaxce"),
            standard,
        ),
        Entry(JAXCE_FUSED_SPLIT, split_products, _version("jaxce"), standard),
        Entry(JAXCE_FUSED_PER_TOKEN, per_token, _version("jaxce"), standard),
        Entry(NAIVE, lambda: (grad_of(naive_linear), args), _version("optax"), standard),
        Entry(JAX_CCE, jax_cce, _version("jax-cce"), standard),
        Entry(TOKAMAX, tokamax, _version("tokamax"), tokamax_outputs),
        Entry(FUSED_FLOOR, lambda: (three_matmuls, args[:2])),
    ]
    return entries, args


def _takes_implementation() -> bool:
    import jaxce

    try:
        parameters = inspect.signature(jaxce.softmax_cross_entropy_with_integer_labels).parameters
    except (TypeError, ValueError):
        return False
    return "implementation" in parameters


def plain_entries(logits: jax.Array, labels: jax.Array) -> list[Entry]:
    import optax

    import jaxce

    args = (logits, labels)
    has_implementation = _takes_implementation()

    def jaxce_entry(implementation: str) -> Callable[[], tuple[Callable[..., Any], tuple]]:
        def build() -> tuple[Callable[..., Any], tuple]:
            options: dict[str, Any] = {}
            if has_implementation:
                options["implementation"] = implementation
            elif implementation != "xla":
                raise Unavailable(
                    "this checkout's jaxce.softmax_cross_entropy_with_integer_labels takes no "
                    "`implementation` argument"
                )

            def loss(x: jax.Array, y: jax.Array) -> jax.Array:
                return jaxce.softmax_cross_entropy_with_integer_labels(
                    x, y, reduction="mean", **options
                )

            return jax.value_and_grad(loss), args

        return build

    def optax_loss(x: jax.Array, y: jax.Array) -> jax.Array:
        return optax.losses.softmax_cross_entropy_with_integer_labels(x, y).mean()

    def outputs(out: Any) -> tuple[Any, Any, Any]:
        loss, grad = out
        return loss, grad, None

    version = _version("jaxce")
    return [
        Entry(JAXCE_XLA, jaxce_entry("xla"), version, outputs),
        Entry(JAXCE_PALLAS, jaxce_entry("pallas"), version, outputs),
        Entry(OPTAX, lambda: (jax.value_and_grad(optax_loss), args), _version("optax"), outputs),
        Entry(PLAIN_FLOOR, lambda: (copy_floor, (logits,))),
    ]


# ------------------------------------------------------------------ measuring


def time_case(
    case: str,
    entries: Sequence[Entry],
    *,
    floor: str,
    shapes: Shapes,
    min_seconds: float = 0.0,
) -> tuple[dict[str, dict[str, Any]], dict[str, harness.Prepared]]:
    """Compiles every competitor (compile time and temporaries apart), then times them
    interleaved; returns one row per competitor and the prepared calls (for accuracy)."""
    rows: dict[str, dict[str, Any]] = {}
    prepared: dict[str, harness.Prepared] = {}
    for entry in entries:
        row: dict[str, Any] = {
            "case": case,
            "implementation": entry.name,
            "source": "jax",
            "version": entry.version,
        }
        try:
            fn, args = entry.build()
            ready = harness.prepare_jax(fn, args)
            row.update(compile_ms=ready.compile_ms, temp_bytes=ready.temp_bytes)
            prepared[entry.name] = ready
        except Exception as error:  # a peer that fails is a finding, not a crash
            row["error"] = _error(error)
        rows[entry.name] = row
    # One call each: the first warm-up call, and the length of a round.
    probe: dict[str, float] = {}
    for name, ready in list(prepared.items()):
        try:
            start = time.perf_counter()
            jax.block_until_ready(ready.run())
            probe[name] = time.perf_counter() - start
        except Exception as error:
            rows[name]["error"] = _error(error)
            del prepared[name]
    if prepared:
        round_s = max(sum(probe.values()), 1e-9)
        runs = max(3, min(shapes.runs, int(shapes.case_budget_s / round_s)))
        times = harness.interleaved_times(
            {name: ready.run for name, ready in prepared.items()},
            runs=runs,
            warmup=max(shapes.warmup - 1, 0),
            min_seconds=min(min_seconds, shapes.case_budget_s),
        )
        for name, seconds in times.items():
            ms = seconds * 1e3
            rows[name].update(
                median_ms=float(np.median(ms)),
                min_ms=float(np.min(ms)),
                max_ms=float(np.max(ms)),
                runs=len(ms),
                x_floor=harness.median_ratio(seconds, times[floor]) if floor in times else None,
            )
    return rows, prepared


def fused_case(
    label: str, n: int, d: int, v: int, shapes: Shapes, results: dict[str, Any]
) -> list[dict[str, Any]]:
    import jaxce

    case = gpu_peers.fused_case(label, n, d, v)
    plan = jaxce.plan_linear_cross_entropy(n, d, v, jnp.bfloat16)
    _log(f"{case}: {plan}")
    results["plans"][case] = str(plan)
    notes: dict[str, str] = {}
    entries, args = fused_entries(n, d, v, shapes, notes)
    by_name = {e.name: e for e in entries}
    rows, prepared = time_case(case, entries, floor=FUSED_FLOOR, shapes=shapes)
    ref_loss, (ref_dh, ref_dw) = reference_value_and_grads(*args)
    ref = float(ref_loss)
    for name, ready in prepared.items():
        outputs = by_name[name].outputs
        if outputs is None:
            continue
        try:
            loss, dh, dw = outputs(ready.run())
            rows[name].update(
                loss=float(loss),
                loss_rel_error=abs(float(loss) - ref) / abs(ref),
                **gradient_errors("hidden_grad", dh, ref_dh),
                **gradient_errors("weight_grad", dw, ref_dw),
            )
            del loss, dh, dw
        except Exception as error:
            rows[name]["accuracy_error"] = _error(error)
    for name, note in notes.items():
        rows[name]["note"] = note
    limits = results.get("limits", {})
    info: dict[str, Any] = {
        "description": (
            "value_and_grad of the mean loss w.r.t. hidden and weight (bfloat16); errors: "
            "norm-wise relative, against the float32 materialised formulation"
        ),
        "floor": FUSED_FLOOR,
        "reference_loss": ref,
        "naive": NAIVE,
        "weight_accumulator_bytes": 4 * v * d,
    }
    if limits.get("matmul_tflops"):
        info["floor_from_matmul_rate_ms"] = 6 * n * d * v / (limits["matmul_tflops"] * 1e12) * 1e3
    results["cases"][case] = info
    del prepared, args, ref_dh, ref_dw
    return list(rows.values())


def plain_case(
    n: int, v: int, dtype: str, shapes: Shapes, results: dict[str, Any]
) -> list[dict[str, Any]]:
    case = gpu_peers.plain_case(n, v, dtype)
    logits, labels = plain_inputs(n, v, dtype)
    entries = plain_entries(logits, labels)
    by_name = {e.name: e for e in entries}
    rows, prepared = time_case(
        case, entries, floor=PLAIN_FLOOR, shapes=shapes, min_seconds=shapes.plain_min_seconds
    )
    info: dict[str, Any] = {
        "description": (
            "value_and_grad of the mean loss w.r.t. the logits; errors: relative, against "
            "float64 (mean loss; gradient norm-wise)"
        ),
        "floor": PLAIN_FLOOR,
    }
    try:
        ref, grad_errors = float64_reference(logits, labels)
        info["reference_loss"] = ref
    except Exception as error:
        info["reference_error"] = _error(error)
        ref = None
    for name, ready in prepared.items():
        outputs = by_name[name].outputs
        if outputs is None or ref is None:
            continue
        try:
            loss, grad, _ = outputs(ready.run())
            rows[name].update(
                loss=float(loss),
                loss_rel_error=abs(float(loss) - ref) / abs(ref),
                **grad_errors(grad),
            )
            del loss, grad
        except Exception as error:
            rows[name]["accuracy_error"] = _error(error)
    results["cases"][case] = info
    del prepared, logits
    return list(rows.values())


def measure_limits(shapes: Shapes) -> dict[str, float]:
    """The copy bandwidth (`harness.memory_bandwidth`) and the bfloat16 matmul rate."""
    limits = dict(harness.memory_bandwidth(num_bytes=shapes.bandwidth_bytes))
    m = shapes.matmul
    a = jax.random.normal(jax.random.PRNGKey(1), (m, m), jnp.bfloat16)
    product = harness.prepare_jax(lambda p, q: p @ q, (a, a))
    seconds = harness.interleaved_times({"matmul": product.run}, runs=10)["matmul"]
    limits["matmul_tflops"] = 2 * m**3 / float(np.median(seconds)) / 1e12
    return limits


# ------------------------------------------------------------------ the PyTorch peers


def run_torch_peers(shapes: Shapes, folder: pathlib.Path) -> dict[str, Any]:
    """`benchmarks.gpu_peers` in a process of its own; its rows, or rows saying why none."""
    path = folder / "torch_peers.json"
    command = [sys.executable, "-m", "benchmarks.gpu_peers", str(path)]
    command += ["--plain", f"{shapes.plain[0]}:{shapes.plain[1]}"]
    for dtype in shapes.plain_dtypes:
        command += ["--plain-dtype", dtype]
    for label, n, d, v in shapes.fused:
        command += ["--fused", f"{label}:{n}:{d}:{v}"]
    command += ["--runs", str(shapes.runs), "--warmup", str(shapes.warmup)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    why = None
    try:
        done = subprocess.run(command, cwd=REPO, env=env, timeout=shapes.torch_timeout_s)
        if done.returncode != 0:
            why = f"the PyTorch peers' process exited with {done.returncode}"
    except subprocess.TimeoutExpired:
        why = f"the PyTorch peers' process ran past {shapes.torch_timeout_s:.0f} s"
    result: dict[str, Any] = {}
    if path.exists():
        result = json.loads(path.read_text())
    rows = result.get("rows", [])
    have = {(r["case"], r["implementation"]) for r in rows}
    reason = f"not measured: {why}" if why else "not measured"
    rows += [
        r
        for r in gpu_peers.all_unavailable(shapes.fused, shapes.plain, reason, shapes.plain_dtypes)
        if (r["case"], r["implementation"]) not in have
    ]
    result["rows"] = rows
    if why:
        result["error"] = why
    return result


def _torch_ratios(rows: list[dict[str, Any]]) -> None:
    """PyTorch rows' `x floor`: their median over the JAX floor's median of the same case."""
    floors = {
        r["case"]: r["median_ms"]
        for r in rows
        if r["implementation"] in (FUSED_FLOOR, PLAIN_FLOOR) and r.get("median_ms")
    }
    for r in rows:
        if r.get("source") == "torch" and r.get("median_ms") and r["case"] in floors:
            r["x_floor"] = r["median_ms"] / floors[r["case"]]


# ------------------------------------------------------------------ the report


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def _grad_cell(row: dict[str, Any], prefix: str) -> str:
    """`error (rounding)`: the error, and the part the gradient dtype's rounding explains."""
    error = row.get(f"{prefix}_rel_error")
    if error is None:
        return "-"
    return f"{error:.1e} ({_fmt(row.get(f'{prefix}_rounding'), '.1e')})"


def _target(ok: bool | None) -> str:
    return "not measured" if ok is None else "met" if ok else "MISSED"


def targets(results: dict[str, Any]) -> list[str]:
    """One line per target, for jaxce's rows."""
    lines = []
    rows = results["rows"]
    for case, info in results["cases"].items():
        mine = {r["implementation"]: r for r in rows if r["case"] == case}
        if case.startswith("fused"):
            r = mine.get(JAXCE_FUSED, {})
            naive = mine.get(NAIVE, {})
            x = r.get("x_floor")
            lines.append(
                f"- `{case}`: x floor {_fmt(x, '.2f')} (target <= {FUSED_X_FLOOR}): "
                f"{_target(None if x is None else x <= FUSED_X_FLOOR)}"
            )
            if r.get("temp_bytes") is not None and naive.get("temp_bytes") is not None:
                limit = 0.1 * naive["temp_bytes"] + info["weight_accumulator_bytes"]
                lines.append(
                    f"  temp {r['temp_bytes'] / MIB:.0f} MiB (target <= 10% of naive's + one "
                    f"float32 weight = {limit / MIB:.0f} MiB): {_target(r['temp_bytes'] <= limit)}"
                )
            raw = [r.get(f"{g}_grad_rel_error") for g in ("hidden", "weight")]
            rounding = [r.get(f"{g}_grad_rounding") for g in ("hidden", "weight")]
            beyond = [r.get(f"{g}_grad_beyond_rounding") for g in ("hidden", "weight")]

            def worst(errors: list[Any]) -> bool | None:
                known = [e for e in errors if e is not None]
                return None if len(known) < 2 else max(known) <= FUSED_GRAD_ERROR

            loss_error = r.get("loss_rel_error")
            lines.append(
                f"  hidden, weight gradient errors {', '.join(_fmt(e, '.1e') for e in raw)} "
                f"(target <= {FUSED_GRAD_ERROR:.0e}): {_target(worst(raw))}; of which "
                f"{', '.join(_fmt(e, '.1e') for e in rounding)} is the reference's own rounding "
                f"to the gradients' dtype, and {', '.join(_fmt(e, '.1e') for e in beyond)} "
                f"beyond it: {_target(worst(beyond))}"
            )
            lines.append(
                f"  loss error {_fmt(loss_error, '.1e')} (target <= {FUSED_LOSS_ERROR:.0e}): "
                f"{_target(None if loss_error is None else loss_error <= FUSED_LOSS_ERROR)}"
            )
        else:
            for name in (JAXCE_XLA, JAXCE_PALLAS):
                r = mine.get(name, {})
                x = r.get("x_floor")
                line = (
                    f"- `{case}` {name}: x floor {_fmt(x, '.2f')} (target <= {PLAIN_X_FLOOR}): "
                    f"{_target(None if x is None else x <= PLAIN_X_FLOOR)}"
                )
                if case.endswith("bfloat16"):
                    e = r.get("loss_rel_error")
                    line += (
                        f"; mean loss error {_fmt(e, '.1e')} (target <= "
                        f"{PLAIN_BF16_LOSS_ERROR:.0e}): "
                        f"{_target(None if e is None else e <= PLAIN_BF16_LOSS_ERROR)}"
                    )
                lines.append(line)
    return lines


def markdown(results: dict[str, Any]) -> str:
    s = results["stamp"]
    limits = results.get("limits", {})
    torch = results.get("torch_peers", {})
    versions = torch.get("versions", {})
    lines = [
        "# jaxce GPU suite results",
        "",
        f"Device `{s['device']}` ({s['device_kind']}), jax {s['jax']} / jaxlib {s['jaxlib']}, "
        f"Python {s['python']}, {s['date']}. Command: `{s['command']}` ({results['shapes']} "
        "shapes).",
        "PyTorch peers: "
        + ", ".join(f"{k} {v}" for k, v in versions.items() if v)
        + (f" ({torch['error']})" if torch.get("error") else "")
        + ".",
    ]
    if limits:
        lines.append(
            f"Measured limits: copy {limits.get('copy_gbps', 0):.0f} GB/s (read + write), read "
            f"{limits.get('read_gbps', 0):.0f} GB/s, bfloat16 matmul "
            f"{limits.get('matmul_tflops', 0):.0f} TFLOP/s."
        )
    lines += ["", f"Times are medians after warm-up, competitors interleaved. {RATIO_NOTE}"]
    lines += [
        "`temp`: XLA's `temp_size_in_bytes` (outputs excluded); PyTorch: peak memory allocated "
        "beyond what was allocated before the call. Errors: relative, against float32 (fused: "
        "the materialised formulation, no TF32) or float64 (plain); gradients norm-wise, "
        "`error (rounding)` where `rounding` is the reference's own error once rounded to the "
        "gradient's dtype (bfloat16 gradients cannot be closer than that).",
        "",
        "## Targets (jaxce)",
        "",
        *targets(results),
    ]
    for case, info in results["cases"].items():
        lines += ["", f"## `{case}`", "", info["description"] + "."]
        if case in results.get("plans", {}):
            lines.append(f"jaxce's plan: `{results['plans'][case]}`.")
        if info.get("floor_from_matmul_rate_ms"):
            lines.append(
                f"The 3-matmul floor from the measured matmul rate: "
                f"{info['floor_from_matmul_rate_ms']:.1f} ms."
            )
        fused = case.startswith("fused")
        grads = "hidden grad err | weight grad err" if fused else "grad err"
        lines += [
            "",
            f"| implementation | median ms | min-max ms | x floor (time / floor) | compile ms "
            f"| temp MiB | loss err | {grads} |",
            "|---|---|---|---|---|---|---|" + ("---|---|" if fused else "---|"),
        ]
        for r in results["rows"]:
            if r["case"] != case:
                continue
            name = r["implementation"] + (f" {r['version']}" if r.get("version") else "")
            if r.get("source") == "torch":
                name += " (PyTorch)"
            if r.get("median_ms") is None:
                cells = 6 if fused else 5
                lines.append(f"| {name} | {r.get('error', 'not measured')} |" + " |" * cells)
                continue
            temp = r.get("temp_bytes", r.get("peak_extra_bytes"))
            prefixes = ("hidden_grad", "weight_grad") if fused else ("grad",)
            lines.append(
                f"| {name} | {r['median_ms']:.2f} | {r['min_ms']:.2f}-{r['max_ms']:.2f} "
                f"| {_fmt(r.get('x_floor'), '.2f')} | {_fmt(r.get('compile_ms'), '.0f')} "
                f"| {_fmt(temp, '.0f', 1 / MIB)} | {_fmt(r.get('loss_rel_error'), '.1e')} | "
                + " | ".join(_grad_cell(r, p) for p in prefixes)
                + " |"
            )
        notes = [r for r in results["rows"] if r["case"] == case and r.get("note")]
        for r in notes:
            lines.append(f"\n{r['implementation']}: {r['note']}.")
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], folder: pathlib.Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / JSON_NAME).write_text(json.dumps(results, indent=1) + "\n")
    (folder / MARKDOWN_NAME).write_text(markdown(results))


# ------------------------------------------------------------------ the suite


def run_suite(
    shapes_name: str | Shapes = "full",
    out: pathlib.Path = RESULTS,
    *,
    torch_peers: bool = True,
    argv: Sequence[str] = ("benchmarks", "--suite", "gpu"),
) -> pathlib.Path:
    """Runs the whole suite; returns the folder holding `gpu_results.json` and `.md`.

    `shapes_name`: `"full"` (needs a GPU), `"tiny"`, or a `Shapes` of one's own (the tests).
    """
    if isinstance(shapes_name, Shapes):
        shapes, shapes_name = shapes_name, "custom"
    else:
        shapes = SHAPES[shapes_name]
    start = time.perf_counter()
    # The PyTorch peers first: once JAX starts on a GPU it holds most of its memory.
    with tempfile.TemporaryDirectory() as scratch:
        if torch_peers:
            _log("PyTorch peers (benchmarks.gpu_peers) ...")
            torch_result = run_torch_peers(shapes, pathlib.Path(scratch))
        else:
            reason = "not measured: the PyTorch peers were not run"
            torch_result = {
                "rows": gpu_peers.all_unavailable(
                    shapes.fused, shapes.plain, reason, shapes.plain_dtypes
                )
            }
    stamp = harness.stamp(list(argv))
    if shapes_name == "full" and stamp["platform"] != "gpu":
        raise SystemExit(
            f"--suite gpu needs a GPU (JAX runs on {stamp['platform']}); "
            "--shapes tiny runs it small anywhere"
        )
    folder = out / stamp["device"]
    results: dict[str, Any] = {
        "suite": "gpu",
        "shapes": shapes_name,
        "stamp": stamp,
        "ratio": RATIO_NOTE,
        "limits": {},
        "plans": {},
        "cases": {},
        "rows": [],
        "torch_peers": {k: v for k, v in torch_result.items() if k != "rows"},
    }
    torch_rows = torch_result["rows"]

    def publish() -> None:
        rows = results["rows"]
        cases = set(results["cases"])
        merged = [r for r in rows if r.get("source") != "torch"]
        merged += [r for r in torch_rows if r["case"] in cases]
        results["rows"] = merged
        _torch_ratios(results["rows"])
        write(results, folder)

    _log(f"{stamp['device']}, jax {stamp['jax']}: measuring the limits ...")
    results["limits"] = measure_limits(shapes)
    jobs: list[tuple[str, Callable[[], list[dict[str, Any]]]]] = [
        (
            gpu_peers.fused_case(label, n, d, v),
            functools.partial(fused_case, label, n, d, v, shapes, results),
        )
        for label, n, d, v in shapes.fused
    ]
    n, v = shapes.plain
    jobs += [
        (
            gpu_peers.plain_case(n, v, dtype),
            functools.partial(plain_case, n, v, dtype, shapes, results),
        )
        for dtype in shapes.plain_dtypes
    ]
    for case, job in jobs:
        elapsed = time.perf_counter() - start
        if elapsed > shapes.deadline_s:
            _log(f"{case}: not run ({elapsed:.0f} s past the {shapes.deadline_s:.0f} s limit)")
            results["cases"][case] = {"description": "not run: the suite's time limit"}
            publish()
            continue
        _log(f"[{elapsed:4.0f}s] {case} ...")
        try:
            rows = job()
        except Exception as error:  # one broken case must not lose the others
            rows = [{"case": case, "implementation": "(the case)", "error": _error(error)}]
            results["cases"].setdefault(case, {"description": "failed"})
        results["rows"] += rows
        publish()
        for r in rows:
            _log(
                "   ",
                json.dumps(
                    {
                        k: r.get(k)
                        for k in ("implementation", "median_ms", "x_floor", "error")
                        if k in r
                    }
                ),
            )
    publish()
    _log(f"wrote {folder / JSON_NAME} and {MARKDOWN_NAME} in {time.perf_counter() - start:.0f} s")
    print(markdown(results))
    return folder
