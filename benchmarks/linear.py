"""Fused linear cross-entropy: jaxce against the materialised formulation and jax-cce.

`python -m benchmarks.linear [--quick]` prints a table; `run(quick)` returns one
dict per measurement for the harness, and `memory_sweep()` the temporaries
against the vocabulary size (for the plot). Each competitor is `value_and_grad`
of the mean loss with respect to `hidden` and `weight`, compiled once; the
competitors are timed interleaved (`harness.interleaved_times`: rounds of one
call each, in shuffled orders) so that load from other processes hits them alike, and every ratio is the median over rounds of the
per-round ratio (steadier than a ratio of medians on a shared machine). The
floor is the three matrix products any formulation must do (logits, hidden
gradient, weight gradient), timed in the same rounds. "temp" is XLA's
`memory_analysis().temp_size_in_bytes` (outputs excluded). jax-cce (the
`bench` extra) is skipped when it is not installed.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxce
from benchmarks import harness

NUM_TOKENS, DIM = 2048, 512
# (vocabulary, dtype) cases; the quick run takes the first.
CASES = ((32768, "float32"), (65536, "float32"), (32768, "bfloat16"))
# Per-token losses (RL advantages, masks): a weighted sum of `reduction="none"`,
# against the same with `token_weights` and "sum"; not in the quick run.
PER_TOKEN_CASES = ((32768, "float32"),)
MEMORY_VOCABS = (8192, 16384, 32768, 65536, 131072)
MATERIALISED = "materialised (matmul + optax)"
JAX_CCE = "jax-cce 0.1.0"
JAXCE = "jaxce.linear_cross_entropy"
JAXCE_NONE = 'jaxce reduction="none", weighted sum'
JAXCE_TOKEN_WEIGHTS = 'jaxce token_weights, reduction="sum"'
FLOOR = "floor (three matmuls)"

LossFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def materialised(hidden: jax.Array, weight: jax.Array, labels: jax.Array) -> jax.Array:
    """The `[N, V]` logits, then optax's integer-label cross-entropy."""
    return optax.softmax_cross_entropy_with_integer_labels(hidden @ weight.T, labels).mean()


def fused(hidden: jax.Array, weight: jax.Array, labels: jax.Array) -> jax.Array:
    return jaxce.linear_cross_entropy(hidden, weight, labels)


def competitors() -> dict[str, LossFn]:
    found: dict[str, LossFn] = {MATERIALISED: materialised}
    if importlib.util.find_spec("jax_cce") is not None:
        import jax_cce

        found[JAX_CCE] = lambda h, w, y: jax_cce.linear_cross_entropy(h, w, y)
    found[JAXCE] = fused
    return found


def per_token_competitors(advantages: jax.Array) -> dict[str, LossFn]:
    """``sum_i a_i loss_i`` for per-token advantages ``a``, three ways."""

    def materialised_sum(hidden: jax.Array, weight: jax.Array, labels: jax.Array) -> jax.Array:
        losses = optax.softmax_cross_entropy_with_integer_labels(hidden @ weight.T, labels)
        return jnp.sum(advantages * losses)

    def none(hidden: jax.Array, weight: jax.Array, labels: jax.Array) -> jax.Array:
        losses = jaxce.linear_cross_entropy(hidden, weight, labels, reduction="none")
        return jnp.sum(advantages * losses)

    def weighted(hidden: jax.Array, weight: jax.Array, labels: jax.Array) -> jax.Array:
        return jaxce.linear_cross_entropy(
            hidden, weight, labels, token_weights=advantages, reduction="sum"
        )

    return {MATERIALISED: materialised_sum, JAXCE_NONE: none, JAXCE_TOKEN_WEIGHTS: weighted}


def three_matmuls(hidden: jax.Array, weight: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The floor: the logits and the two products that push a `[N, V]` gradient back."""
    logits = jnp.dot(hidden, weight.T, preferred_element_type=jnp.float32).astype(hidden.dtype)
    return logits @ weight, logits.T @ hidden


def inputs(
    vocab: int, seed: int = 0, dtype: str = "float32"
) -> tuple[jax.Array, jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(NUM_TOKENS, DIM)), dtype)
    weight = jnp.asarray(rng.normal(size=(vocab, DIM)) / np.sqrt(DIM), dtype)
    labels = jnp.asarray(rng.integers(0, vocab, NUM_TOKENS), jnp.int32)
    return hidden, weight, labels


def compile_value_and_grad(loss: LossFn, args: tuple[Any, ...]) -> tuple[Any, float]:
    start = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
    return compiled, (time.perf_counter() - start) * 1e3


def temp_bytes(loss: LossFn, vocab: int, dtype: str = "float32") -> int:
    """Temporaries of `value_and_grad`, from lowering alone (nothing allocated)."""
    args = (
        jax.ShapeDtypeStruct((NUM_TOKENS, DIM), dtype),
        jax.ShapeDtypeStruct((vocab, DIM), dtype),
        jax.ShapeDtypeStruct((NUM_TOKENS,), jnp.int32),
    )
    compiled, _ = compile_value_and_grad(loss, args)
    return int(compiled.memory_analysis().temp_size_in_bytes)


def run(quick: bool) -> list[dict[str, Any]]:
    """One dict per (case, implementation): times in ms, ratios, compile time, temporaries.

    ``ratio_to_baseline`` is against the materialised formulation,
    ``ratio_to_floor`` against the three matrix products; jaxce's row also has
    ``peer`` (jax-cce) and ``ratio_to_peer``. The full run adds the
    per-token cases (:data:`PER_TOKEN_CASES`).
    """
    runs = 3 if quick else 15
    results = []
    for vocab, dtype in CASES[:1] if quick else CASES:
        case = f"linear CE value_and_grad N={NUM_TOKENS} D={DIM} V={vocab} {dtype}"
        description = (
            f"value_and_grad of the mean loss w.r.t. hidden and weight, {dtype}; "
            "baseline: the materialised logits + optax; floor: the three matrix "
            "products alone"
        )
        results += _measure(case, description, competitors(), inputs(vocab, dtype=dtype), runs)
    for vocab, dtype in () if quick else PER_TOKEN_CASES:
        case = f"linear CE per-token value_and_grad N={NUM_TOKENS} D={DIM} V={vocab} {dtype}"
        description = (
            f"value_and_grad of sum_i a_i loss_i (per-token advantages a) w.r.t. hidden and "
            f"weight, {dtype}; baseline: the materialised logits + optax's per-token losses; "
            "floor: the three matrix products alone"
        )
        advantages = jnp.asarray(np.random.default_rng(1).normal(size=NUM_TOKENS), jnp.float32)
        found = per_token_competitors(advantages)
        results += _measure(case, description, found, inputs(vocab, dtype=dtype), runs)
    return results


def _measure(
    case: str,
    description: str,
    losses: dict[str, LossFn],
    args: tuple[jax.Array, jax.Array, jax.Array],
    runs: int,
) -> list[dict[str, Any]]:
    """The competitors and the floor, compiled apart and timed interleaved."""
    compiled = {name: compile_value_and_grad(loss, args) for name, loss in losses.items()}
    start = time.perf_counter()
    floor = jax.jit(three_matmuls).lower(*args[:2]).compile()
    compiled[FLOOR] = (floor, (time.perf_counter() - start) * 1e3)
    calls: dict[str, harness.Runner] = {
        name: functools.partial(fn, *(args[:2] if name == FLOOR else args))
        for name, (fn, _) in compiled.items()
    }
    times = harness.interleaved_times(calls, runs=runs, warmup=1)
    results = []
    for name, (fn, compile_ms) in compiled.items():
        ms = times[name] * 1e3
        row = {
            "case": case,
            "implementation": name,
            "median_ms": float(np.median(ms)),
            "min_ms": float(np.min(ms)),
            "max_ms": float(np.max(ms)),
            "compile_ms": compile_ms,
            "temp_bytes": int(fn.memory_analysis().temp_size_in_bytes),
            "runs": runs,
            "ratio_to_baseline": harness.median_ratio(times[name], times[MATERIALISED]),
            "ratio_to_floor": harness.median_ratio(times[name], times[FLOOR]),
            "description": description,
        }
        if name == JAXCE and JAX_CCE in times:
            row["peer"] = JAX_CCE
            row["ratio_to_peer"] = harness.median_ratio(times[name], times[JAX_CCE])
        results.append(row)
    return results


def memory_sweep(vocabs: tuple[int, ...] = MEMORY_VOCABS) -> list[dict[str, Any]]:
    """Temporaries against V (float32; for the plot): lowering only, nothing is run."""
    return [
        {"vocab": vocab, "implementation": name, "temp_bytes": temp_bytes(loss, vocab)}
        for vocab in vocabs
        for name, loss in competitors().items()
    ]


def format_table(results: list[dict[str, Any]]) -> str:
    """Speedups (the other's time over this one's: above 1 is faster) and time / floor."""
    lines = [
        "| case | implementation | median ms | speedup vs materialised | time / floor "
        "| speedup vs jax-cce | compile ms | temp MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        peer = f"{1 / r['ratio_to_peer']:.2f}" if "ratio_to_peer" in r else "-"
        lines.append(
            f"| {r['case']} | {r['implementation']} | {r['median_ms']:.0f} "
            f"| {1 / r['ratio_to_baseline']:.2f} | {r['ratio_to_floor']:.2f} | {peer} "
            f"| {r['compile_ms']:.0f} | {r['temp_bytes'] / 2**20:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.linear", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="V = 32768 float32 only, 3 runs")
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, command: {' '.join(sys.argv)}")
    print(format_table(run(args.quick)))


if __name__ == "__main__":
    main(sys.argv[1:])
