"""Timing under ``jit``: will jaxce be faster than optax here, on this device, at my shapes?

``jaxce bench`` (or ``python -m jaxce bench``) answers it for one loss at the user's shape and
dtype, on whatever device JAX runs on; :func:`compare` does the same from Python. The timing
rules, which the repository's benchmark suite (``benchmarks/``) uses too:

- compile apart: every competitor is compiled once, ahead of time, from
  ``jax.ShapeDtypeStruct``\\ s (:func:`prepare`); the compile time is reported on its own and
  the temporaries come from XLA's ``memory_analysis()`` of that executable;
- wait for the result: every timed call ends in ``jax.block_until_ready``;
- warm up, then interleave: a few untimed calls each, then rounds of one call per competitor
  in a fresh (seeded) random order (:func:`interleaved_times`), so load from other processes
  hits every competitor alike;
- medians: of the times, and of the per-round time ratios (:func:`median_ratio`), which is
  steadier than a ratio of two medians on a noisy machine.

One convention for ratios: ``speedup`` is a competitor's time over jaxce's time, so a speedup
above 1 means jaxce is faster.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxce._optional import import_extra
from jaxce._progress import Progress

__all__ = [
    "LOSSES",
    "MAX_RUNS",
    "BenchReport",
    "Prepared",
    "Timing",
    "compare",
    "interleaved_times",
    "main",
    "median_ratio",
    "prepare",
]

Runner = Callable[[], Any]
Mode = Literal["value_and_grad", "forward"]

#: The most rounds :func:`interleaved_times` grows to when asked for a minimum duration.
MAX_RUNS = 1000


@dataclasses.dataclass
class Prepared:
    """A competitor ready to time: a call without arguments, and what building it measured."""

    run: Runner
    compile_ms: float | None = None
    temp_bytes: int | None = None


def prepare(fn: Callable[..., Any], args: Sequence[Any]) -> Prepared:
    """Compiles ``jax.jit(fn)`` from the arguments' shapes alone and binds it to ``args`` on device.

    The compile time covers tracing, lowering and XLA compilation; ``temp_bytes`` is XLA's
    ``temp_size_in_bytes`` (arguments and outputs excluded), read without running anything.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxce import bench
      >>> prepared = bench.prepare(jnp.sum, (jnp.ones(4),))
      >>> float(prepared.run()), prepared.compile_ms > 0
      (4.0, True)
    """
    device_args = [jax.device_put(a) for a in args]
    jax.block_until_ready(device_args)
    structs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), device_args)
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*structs).compile()
    compile_ms = (time.perf_counter() - start) * 1e3
    analysis = compiled.memory_analysis()
    temp_bytes = None if analysis is None else int(analysis.temp_size_in_bytes)
    return Prepared(lambda: compiled(*device_args), compile_ms, temp_bytes)


def interleaved_times(
    runners: dict[str, Runner],
    *,
    runs: int,
    warmup: int = 2,
    min_seconds: float = 0.0,
    on_round: Callable[[int, int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Seconds per call of each runner, in rounds of one call each, shuffled per round.

    Each runner is called ``warmup`` times first (not timed). Every call waits for its result
    with ``jax.block_until_ready`` (a no-op for results that are not JAX arrays). With
    ``min_seconds``, one more untimed round estimates a round's duration and the number of
    rounds grows from ``runs`` (up to :data:`MAX_RUNS`) until the rounds take about
    ``min_seconds``: a call of a few milliseconds needs hundreds of rounds for a steady
    median. ``on_round(done, total)`` is called after each round.

    Example:
      >>> from jaxce import bench
      >>> times = bench.interleaved_times({"a": lambda: 1, "b": lambda: 2}, runs=5)
      >>> {name: len(t) for name, t in times.items()}
      {'a': 5, 'b': 5}
    """
    for run in runners.values():
        for _ in range(warmup):
            jax.block_until_ready(run())
    if min_seconds > 0:
        start = time.perf_counter()
        for run in runners.values():
            jax.block_until_ready(run())
        per_round = max(time.perf_counter() - start, 1e-9)
        runs = max(runs, min(MAX_RUNS, math.ceil(min_seconds / per_round)))
    times: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    order = np.random.default_rng(0)
    for done in range(1, runs + 1):
        # A call pays for what the one before it left behind (inputs evicted from the cache,
        # another library's spinning threads): one pair measured 1.58x in one order and 0.92x
        # in the other. A fresh order every round spreads that over every competitor alike.
        for name in order.permutation(names):
            start = time.perf_counter()
            jax.block_until_ready(runners[name]())
            times[name].append(time.perf_counter() - start)
        if on_round is not None:
            on_round(done, runs)
    return {name: np.asarray(t) for name, t in times.items()}


def median_ratio(numerator: np.ndarray, denominator: np.ndarray) -> float:
    """The median over rounds of the per-round time ratio (both timed in the same rounds)."""
    return float(np.median(np.asarray(numerator) / np.asarray(denominator)))


# --- one loss against optax and a plain formulation -------------------------------------


@dataclasses.dataclass(frozen=True)
class _Competitors:
    """One loss three ways, each a mean over the batch: jaxce, optax, plain ``jax.numpy``."""

    jaxce: Callable[[jax.Array, jax.Array], jax.Array]
    optax: Callable[[Any], Callable[[jax.Array, jax.Array], jax.Array]]
    plain: Callable[[jax.Array, jax.Array], jax.Array]
    labels: Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]


def _integer_labels(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, shape[-1], size=shape[:-1], dtype=np.int32)


def _soft_labels(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    scores = rng.exponential(size=shape).astype(np.float32)
    return scores / scores.sum(axis=-1, keepdims=True)


def _binary_labels(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return (rng.random(shape) < 0.3).astype(np.float32)


def _log_softmax(logits: jax.Array) -> jax.Array:
    logits = logits.astype(jnp.float32)
    return logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)


def _competitors(loss: str) -> _Competitors:
    import jaxce

    if loss == "softmax_cross_entropy_with_integer_labels":
        return _Competitors(
            jaxce=lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(
                x, y, reduction="mean"
            ),
            optax=lambda optax: (
                lambda x, y: jnp.mean(optax.losses.softmax_cross_entropy_with_integer_labels(x, y))
            ),
            plain=lambda x, y: (
                -jnp.mean(jnp.take_along_axis(_log_softmax(x), y[..., None], axis=-1))
            ),
            labels=_integer_labels,
        )
    if loss == "softmax_cross_entropy":
        return _Competitors(
            jaxce=lambda x, y: jaxce.softmax_cross_entropy(x, y, reduction="mean"),
            optax=lambda optax: lambda x, y: jnp.mean(optax.losses.softmax_cross_entropy(x, y)),
            plain=lambda x, y: -jnp.mean(jnp.sum(y * _log_softmax(x), axis=-1)),
            labels=_soft_labels,
        )
    return _Competitors(
        jaxce=lambda x, y: jaxce.sigmoid_binary_cross_entropy(x, y, reduction="mean"),
        optax=lambda optax: lambda x, y: jnp.mean(optax.losses.sigmoid_binary_cross_entropy(x, y)),
        # The plain textbook form: log of the sigmoid, which overflows for |x| > ~88 in float32.
        plain=lambda x, y: (
            -jnp.mean(y * jnp.log(jax.nn.sigmoid(x)) + (1 - y) * jnp.log(1 - jax.nn.sigmoid(x)))
        ),
        labels=_binary_labels,
    )


#: The losses ``jaxce bench`` and :func:`compare` time (``--loss``), the first by default.
LOSSES = (
    "softmax_cross_entropy_with_integer_labels",
    "softmax_cross_entropy",
    "sigmoid_binary_cross_entropy",
)


@dataclasses.dataclass(frozen=True)
class Timing:
    """One competitor: times in milliseconds, and its time over jaxce's (> 1: jaxce is faster)."""

    name: str
    median_ms: float
    min_ms: float
    max_ms: float
    compile_ms: float
    temp_bytes: int | None
    runs: int
    speedup: float
    max_loss_difference: float
    max_gradient_difference: float | None


@dataclasses.dataclass(frozen=True)
class BenchReport:
    """What :func:`compare` measured, with where and how."""

    loss: str
    mode: str
    shape: tuple[int, ...]
    dtype: str
    device: str
    jax_version: str
    warmup: int
    timings: tuple[Timing, ...]

    def timing(self, name: str) -> Timing:
        return next(t for t in self.timings if t.name == name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        runs = self.timings[0].runs
        lines = [
            f"{self.loss}, {self.mode}, logits {list(self.shape)} {self.dtype}",
            f"device {self.device}, jax {self.jax_version}; {runs} interleaved rounds after "
            f"{self.warmup} warm-up calls each; compile timed apart",
            "",
            f"{'':10}  {'median ms':>10}  {'min-max ms':>17}  {'compile ms':>10}  "
            f"{'temp MiB':>8}  {'jaxce speedup':>13}",
        ]
        for t in self.timings:
            spread = f"{t.min_ms:.3g}-{t.max_ms:.3g}"
            temp = "-" if t.temp_bytes is None else f"{t.temp_bytes / 2**20:.1f}"
            lines.append(
                f"{t.name:10}  {t.median_ms:10.3g}  {spread:>17}  {t.compile_ms:10.0f}  "
                f"{temp:>8}  {t.speedup:12.2f}x"
            )
        differences = ", ".join(
            f"{t.name} {t.max_loss_difference:.1e}"
            + ("" if t.max_gradient_difference is None else f" / {t.max_gradient_difference:.1e}")
            for t in self.timings
            if t.name != "jaxce"
        )
        what = "loss / gradient" if self.mode == "value_and_grad" else "loss"
        lines += [
            "",
            "jaxce speedup: that competitor's time over jaxce's, median over rounds;",
            "above 1, jaxce is faster.",
            f"Largest difference from jaxce's {what}: {differences}.",
        ]
        return "\n".join(lines)


def compare(
    loss: str = "softmax_cross_entropy_with_integer_labels",
    shape: Sequence[int] = (4096, 1000),
    dtype: str = "float32",
    *,
    mode: Mode = "value_and_grad",
    runs: int = 30,
    warmup: int = 2,
    min_seconds: float = 0.0,
    seed: int = 0,
    on_round: Callable[[int, int], None] | None = None,
) -> BenchReport:
    """Times jaxce's ``loss`` against optax's and a plain ``jax.numpy`` formulation.

    Each competitor computes the mean loss (``mode="forward"``) or the mean loss and its
    gradient with respect to the logits (``"value_and_grad"``) of random logits of ``shape``
    and ``dtype`` (the last axis holds the classes) on JAX's default device. optax comes from
    the ``cli`` extra.

    Args:
      loss: one of :data:`LOSSES`.
      shape: the logits' shape, ``[..., num_classes]``.
      dtype: the logits' dtype name (``"float32"``, ``"bfloat16"``, ...).
      mode: ``"value_and_grad"`` or ``"forward"``.
      runs: timed rounds (at least; see ``min_seconds``).
      warmup: untimed calls of each competitor first.
      min_seconds: grow the rounds until they take about this long.
      seed: seed of the random inputs.
      on_round: called with ``(done, total)`` after each round.

    Returns:
      A :class:`BenchReport`: one :class:`Timing` per competitor, jaxce first; ``speedup``
      above 1 means jaxce is faster.
    """
    if loss not in LOSSES:
        raise ValueError(f"`loss` must be one of {list(LOSSES)}, got {loss!r}.")
    if mode not in ("value_and_grad", "forward"):
        raise ValueError(f"`mode` must be 'value_and_grad' or 'forward', got {mode!r}.")
    shape = tuple(int(n) for n in shape)
    if not shape or min(shape) < 1:
        raise ValueError(f"`shape` must have at least one axis, all positive, got {shape}.")
    optax = import_extra("optax", extra="cli", needed_by="jaxce bench")
    competitors = _competitors(loss)
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(3 * rng.standard_normal(shape, dtype=np.float32), dtype)
    labels = jnp.asarray(competitors.labels(rng, shape))
    functions = {
        "jaxce": competitors.jaxce,
        "optax": competitors.optax(optax),
        "plain jnp": competitors.plain,
    }
    wrap = jax.value_and_grad if mode == "value_and_grad" else (lambda f: f)
    prepared = {name: prepare(wrap(f), (logits, labels)) for name, f in functions.items()}
    results = {name: p.run() for name, p in prepared.items()}
    times = interleaved_times(
        {name: p.run for name, p in prepared.items()},
        runs=runs,
        warmup=warmup,
        min_seconds=min_seconds,
        on_round=on_round,
    )
    timings = []
    for name, p in prepared.items():
        t = times[name] * 1e3
        loss_difference, gradient_difference = _differences(results[name], results["jaxce"], mode)
        timings.append(
            Timing(
                name=name,
                median_ms=float(np.median(t)),
                min_ms=float(np.min(t)),
                max_ms=float(np.max(t)),
                compile_ms=float(p.compile_ms or 0.0),
                temp_bytes=p.temp_bytes,
                runs=len(t),
                speedup=median_ratio(times[name], times["jaxce"]),
                max_loss_difference=loss_difference,
                max_gradient_difference=gradient_difference,
            )
        )
    device = jax.devices()[0]
    return BenchReport(
        loss=loss,
        mode=mode,
        shape=shape,
        dtype=jnp.dtype(dtype).name,
        device=device.platform
        if device.device_kind == device.platform
        else f"{device.platform} ({device.device_kind})",
        jax_version=jax.__version__,
        warmup=warmup,
        timings=tuple(timings),
    )


def _differences(result: Any, reference: Any, mode: str) -> tuple[float, float | None]:
    def largest(a: Any, b: Any) -> float:
        return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))

    if mode == "forward":
        return largest(result, reference), None
    return largest(result[0], reference[0]), largest(result[1], reference[1])


# --- jaxce bench ---------------------------------------------------------------------

DESCRIPTION = """\
Times jaxce against optax and a plain jax.numpy formulation of the same loss, for your shape
and dtype, on the device JAX picks (set JAX_PLATFORMS=cpu, cuda or tpu to choose). Each
competitor is compiled ahead of time (compile time reported apart), called a few times
untimed, then timed in interleaved rounds; the table gives medians, the min-max spread and
jaxce's speedup over each competitor (above 1: jaxce is faster)."""

EPILOG = """\
examples:
  jaxce bench                                   integer labels, logits [4096, 1000] float32
  jaxce bench --shape 8 2048 32000 --dtype bfloat16
  jaxce bench --loss sigmoid_binary_cross_entropy --shape 4096 4096 --forward
  JAX_PLATFORMS=cpu jaxce bench --json > cpu.json

needs optax (pip install 'jaxce[cli]')."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``jaxce bench``."""
    parser.add_argument(
        "--loss",
        choices=LOSSES,
        default=LOSSES[0],
        metavar="NAME",
        help=f"the loss to time (default {LOSSES[0]}); one of: {', '.join(LOSSES)}",
    )
    parser.add_argument(
        "--shape",
        type=int,
        nargs="+",
        default=[4096, 1000],
        metavar="N",
        help="the logits' shape, classes last (default: 4096 1000)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16", "float64"),
        help="the logits' dtype (default float32; float64 needs JAX_ENABLE_X64=1)",
    )
    parser.add_argument(
        "--forward", action="store_true", help="time the loss alone, not value_and_grad"
    )
    parser.add_argument("--runs", type=int, default=30, help="timed rounds, at least (default 30)")
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=2.0,
        help="add rounds until they take about this long (default 2; 0: exactly --runs)",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(run=run)


def run(options: argparse.Namespace) -> int:
    """Runs ``jaxce bench`` with parsed options; prints the table (or JSON). Returns 0."""
    if jax.dtypes.canonicalize_dtype(options.dtype) != np.dtype(options.dtype):
        raise SystemExit(f"jaxce bench: --dtype {options.dtype} needs JAX_ENABLE_X64=1")
    with Progress(options.runs, "jaxce bench") as progress:

        def on_round(done: int, total: int) -> None:
            progress.set_total(total)
            progress.advance(f"round {done}")

        report = compare(
            options.loss,
            options.shape,
            options.dtype,
            mode="forward" if options.forward else "value_and_grad",
            runs=options.runs,
            warmup=options.warmup,
            min_seconds=options.min_seconds,
            on_round=on_round,
        )
    print(json.dumps(report.to_dict(), indent=1) if options.json else report)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``jaxce bench [options]`` (see ``jaxce bench --help``): the ``jaxce`` command's parser.

    ``argv`` defaults to ``sys.argv[1:]``. Returns the exit status; a missing optional package
    is one line on stderr naming the extra, and status 1.
    """
    from jaxce import __main__ as command

    return command.main(["bench", *(sys.argv[1:] if argv is None else argv)])
