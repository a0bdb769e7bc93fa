"""Fused linear cross-entropy: jaxce against the materialised formulation and jax-cce.

`python -m benchmarks.linear [--quick]` prints a table; `run(quick)` returns one
dict per measurement for the harness. Each competitor is `value_and_grad` of the
mean loss with respect to `hidden` and `weight` (float32), compiled once; the
competitors are timed interleaved (A B C A B C ...) so that load from other
processes hits them alike, and the median is reported. "temp" is XLA's
`memory_analysis().temp_size_in_bytes` (outputs excluded). jax-cce (the `bench`
extra) is skipped when it is not installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxce

NUM_TOKENS, DIM = 2048, 512
VOCABS = (32768, 65536)
MEMORY_VOCABS = (8192, 16384, 32768, 65536, 131072)

LossFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def materialised(hidden: jax.Array, weight: jax.Array, labels: jax.Array) -> jax.Array:
    """The `[N, V]` logits, then optax's integer-label cross-entropy."""
    return optax.softmax_cross_entropy_with_integer_labels(hidden @ weight.T, labels).mean()


def fused(hidden: jax.Array, weight: jax.Array, labels: jax.Array) -> jax.Array:
    return jaxce.linear_cross_entropy(hidden, weight, labels)


def competitors() -> dict[str, LossFn]:
    found: dict[str, LossFn] = {"materialised (matmul + optax)": materialised}
    if importlib.util.find_spec("jax_cce") is not None:
        import jax_cce

        found["jax-cce 0.1.0"] = lambda h, w, y: jax_cce.linear_cross_entropy(h, w, y)
    found["jaxce.linear_cross_entropy"] = fused
    return found


def inputs(vocab: int, seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(NUM_TOKENS, DIM)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(vocab, DIM)) / np.sqrt(DIM), jnp.float32)
    labels = jnp.asarray(rng.integers(0, vocab, NUM_TOKENS), jnp.int32)
    return hidden, weight, labels


def compile_value_and_grad(loss: LossFn, args: tuple[Any, ...]) -> tuple[Any, float]:
    start = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
    return compiled, (time.perf_counter() - start) * 1e3


def temp_bytes(loss: LossFn, vocab: int) -> int:
    """Temporaries of `value_and_grad`, from lowering alone (nothing allocated)."""
    args = (
        jax.ShapeDtypeStruct((NUM_TOKENS, DIM), jnp.float32),
        jax.ShapeDtypeStruct((vocab, DIM), jnp.float32),
        jax.ShapeDtypeStruct((NUM_TOKENS,), jnp.int32),
    )
    compiled, _ = compile_value_and_grad(loss, args)
    return int(compiled.memory_analysis().temp_size_in_bytes)


def run(quick: bool) -> list[dict[str, Any]]:
    """One dict per (case, implementation): times in ms, compile time, temporaries."""
    runs = 3 if quick else 10
    results = []
    for vocab in VOCABS[:1] if quick else VOCABS:
        case = f"linear CE value_and_grad N={NUM_TOKENS} D={DIM} V={vocab} f32"
        args = inputs(vocab)
        compiled = {}
        for name, loss in competitors().items():
            compiled[name] = compile_value_and_grad(loss, args)
            jax.block_until_ready(compiled[name][0](*args))  # warm-up
        times: dict[str, list[float]] = {name: [] for name in compiled}
        for _ in range(runs):
            for name, (fn, _) in compiled.items():
                start = time.perf_counter()
                jax.block_until_ready(fn(*args))
                times[name].append((time.perf_counter() - start) * 1e3)
        for name, (fn, compile_ms) in compiled.items():
            results.append(
                {
                    "case": case,
                    "implementation": name,
                    "median_ms": statistics.median(times[name]),
                    "min_ms": min(times[name]),
                    "max_ms": max(times[name]),
                    "compile_ms": compile_ms,
                    "temp_bytes": int(fn.memory_analysis().temp_size_in_bytes),
                    "runs": runs,
                }
            )
        del args, compiled
    return results


def memory_sweep(vocabs: tuple[int, ...] = MEMORY_VOCABS) -> list[dict[str, Any]]:
    """Temporaries against V (for the plot): lowering only, nothing is run."""
    return [
        {"vocab": vocab, "implementation": name, "temp_bytes": temp_bytes(loss, vocab)}
        for vocab in vocabs
        for name, loss in competitors().items()
    ]


def format_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| case | implementation | median ms | min ms | x materialised | compile ms | temp MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    baselines = {
        r["case"]: r["median_ms"] for r in results if r["implementation"].startswith("materialised")
    }
    for r in results:
        ratio = r["median_ms"] / baselines[r["case"]] if r["case"] in baselines else float("nan")
        lines.append(
            f"| {r['case']} | {r['implementation']} | {r['median_ms']:.0f} | {r['min_ms']:.0f} "
            f"| {ratio:.2f} | {r['compile_ms']:.0f} | {r['temp_bytes'] / 2**20:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.linear", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="V = 32768 only, 3 runs")
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, command: {' '.join(sys.argv)}")
    print(format_table(run(args.quick)))


if __name__ == "__main__":
    main(sys.argv[1:])
