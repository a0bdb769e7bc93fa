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
import importlib.util
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jaxce
from jaxce._optional import MissingExtra, import_extra
from jaxce._progress import Progress

__all__ = [
    "DEFAULT_SHAPES",
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
    "register",
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


# --- one loss against optax, a plain formulation or the materialised logits -----------

Loss = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class _Problem:
    """One loss several ways, each a mean over the batch: jaxce first, then its competitors.

    ``differentiated`` are the positions of the arguments ``value_and_grad`` differentiates.
    """

    competitors: dict[str, Loss]
    args: tuple[jax.Array, ...]
    differentiated: tuple[int, ...]


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


def _plain_integer_labels(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return -jnp.mean(jnp.take_along_axis(_log_softmax(logits), labels[..., None], axis=-1))


def _plain_soft_labels(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return -jnp.mean(jnp.sum(labels * _log_softmax(logits), axis=-1))


def _plain_binary(logits: jax.Array, labels: jax.Array) -> jax.Array:
    # The textbook form: log of the sigmoid, which overflows for |x| > ~88 in float32.
    probabilities = jax.nn.sigmoid(logits)
    return -jnp.mean(labels * jnp.log(probabilities) + (1 - labels) * jnp.log(1 - probabilities))


class _LogitsLoss(NamedTuple):
    """A loss of logits: how to draw its labels, and its plain ``jax.numpy`` formulation."""

    labels: Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]
    plain: Loss


_LOGITS_LOSSES = {
    "softmax_cross_entropy_with_integer_labels": _LogitsLoss(
        _integer_labels, _plain_integer_labels
    ),
    "softmax_cross_entropy": _LogitsLoss(_soft_labels, _plain_soft_labels),
    "sigmoid_binary_cross_entropy": _LogitsLoss(_binary_labels, _plain_binary),
}


def _logits_problem(
    loss: str, shape: tuple[int, ...], dtype: str, rng: np.random.Generator, optax: Any
) -> _Problem:
    """jaxce's ``loss`` against optax's and the plain formulation, on random logits."""
    jaxce_loss, optax_loss = getattr(jaxce, loss), getattr(optax.losses, loss)
    logits = jnp.asarray(3 * rng.standard_normal(shape, dtype=np.float32), dtype)
    labels = jnp.asarray(_LOGITS_LOSSES[loss].labels(rng, shape))
    competitors = {
        "jaxce": lambda x, y: jaxce_loss(x, y, reduction="mean"),
        "optax": lambda x, y: jnp.mean(optax_loss(x, y)),
        "plain jnp": _LOGITS_LOSSES[loss].plain,
    }
    return _Problem(competitors, (logits, labels), differentiated=(0,))


def _linear_problem(
    shape: tuple[int, ...], dtype: str, rng: np.random.Generator, optax: Any
) -> _Problem:
    """The fused linear cross-entropy against the materialised logits, and jax-cce if present."""
    tokens, hidden_size, vocabulary = shape
    hidden = jnp.asarray(rng.standard_normal((tokens, hidden_size), dtype=np.float32), dtype)
    # Scaled by 1/sqrt(D), so that the logits are of order 1 whatever D.
    scale = 1 / np.sqrt(hidden_size, dtype=np.float32)
    weight = jnp.asarray(scale * rng.standard_normal((vocabulary, hidden_size), np.float32), dtype)
    labels = jnp.asarray(rng.integers(0, vocabulary, size=tokens, dtype=np.int32))

    def materialised(hidden: jax.Array, weight: jax.Array, labels: jax.Array) -> jax.Array:
        """The ``[N, V]`` logits, then optax's integer-label cross-entropy."""
        logits = hidden @ weight.T
        return jnp.mean(optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels))

    competitors: dict[str, Loss] = {
        "jaxce": lambda h, w, y: jaxce.linear_cross_entropy(h, w, y),
        "materialised": materialised,
    }
    # jax-cce (the `bench` extra) is a competitor where it is installed, and silently not
    # where it is not.
    if importlib.util.find_spec("jax_cce") is not None:
        import jax_cce

        competitors["jax-cce"] = lambda h, w, y: jax_cce.linear_cross_entropy(h, w, y)
    return _Problem(competitors, (hidden, weight, labels), differentiated=(0, 1))


#: The losses ``jaxce bench`` and :func:`compare` time (``--loss``), the first by default.
LOSSES = (*_LOGITS_LOSSES, "linear_cross_entropy")

#: The shape :func:`compare` and ``jaxce bench`` use when none is given: the logits'
#: ``[..., num_classes]``, or ``(N, D, V)`` for ``linear_cross_entropy`` (hidden ``[N, D]``,
#: weight ``[V, D]``, labels ``[N]``).
DEFAULT_SHAPES: dict[str, tuple[int, ...]] = {
    **dict.fromkeys(_LOGITS_LOSSES, (4096, 1000)),
    "linear_cross_entropy": (2048, 512, 16384),
}

_LINEAR_SHAPE = "three sizes N D V (hidden [N, D], weight [V, D], labels [N])"


def _inputs(loss: str, shape: tuple[int, ...]) -> str:
    """The inputs of ``loss`` at ``shape``, in words: ``logits [4096, 1000]``."""
    if loss == "linear_cross_entropy":
        tokens, hidden_size, vocabulary = shape
        return f"hidden [{tokens}, {hidden_size}], weight [{vocabulary}, {hidden_size}]"
    return f"logits {list(shape)}"


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
        width = max(10, *(len(t.name) for t in self.timings))
        lines = [
            f"{self.loss}, {self.mode}, {_inputs(self.loss, self.shape)} {self.dtype}",
            f"device {self.device}, jax {self.jax_version}; {runs} interleaved rounds after "
            f"{self.warmup} warm-up calls each; compile timed apart",
            "",
            f"{'':{width}}  {'median ms':>10}  {'min-max ms':>17}  {'compile ms':>10}  "
            f"{'temp MiB':>8}  {'jaxce speedup':>13}",
        ]
        for t in self.timings:
            spread = f"{t.min_ms:.3g}-{t.max_ms:.3g}"
            temp = "-" if t.temp_bytes is None else f"{t.temp_bytes / 2**20:.1f}"
            lines.append(
                f"{t.name:{width}}  {t.median_ms:10.3g}  {spread:>17}  {t.compile_ms:10.0f}  "
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
    loss: str = LOSSES[0],
    shape: Sequence[int] | None = None,
    dtype: str = "float32",
    *,
    mode: Mode = "value_and_grad",
    runs: int = 30,
    warmup: int = 2,
    min_seconds: float = 0.0,
    seed: int = 0,
    on_round: Callable[[int, int], None] | None = None,
) -> BenchReport:
    """Times jaxce's ``loss`` against its competitors at ``shape`` and ``dtype``.

    For a loss of logits the competitors are optax's loss and a plain ``jax.numpy``
    formulation, on random logits (the last axis holds the classes). For
    ``linear_cross_entropy`` they are the materialised form (``hidden @ weight.T``, then
    optax's integer-label loss) and, where it is installed, jax-cce. Each competitor computes
    the mean loss (``mode="forward"``) or the mean loss and its gradient with respect to the
    logits (hidden and weight for ``linear_cross_entropy``; ``"value_and_grad"``) on JAX's
    default device. optax comes from the ``cli`` extra.

    Args:
      loss: one of :data:`LOSSES`.
      shape: the logits' shape, ``[..., num_classes]``; for ``linear_cross_entropy`` three
        sizes ``(N, D, V)``: hidden ``[N, D]``, weight ``[V, D]``, labels ``[N]``. Default:
        :data:`DEFAULT_SHAPES`.
      dtype: the floating inputs' dtype name (``"float32"``, ``"bfloat16"``, ...).
      mode: ``"value_and_grad"`` or ``"forward"``.
      runs: timed rounds, at least 1 (more with ``min_seconds``).
      warmup: untimed calls of each competitor first, at least 0.
      min_seconds: grow the rounds until they take about this long (0: exactly ``runs``).
      seed: seed of the random inputs.
      on_round: called with ``(done, total)`` after each round.

    Returns:
      A :class:`BenchReport`: one :class:`Timing` per competitor, jaxce first; ``speedup``
      above 1 means jaxce is faster.
    """
    shape = _checked_arguments(loss, shape, mode, runs, warmup, min_seconds)
    optax = import_extra("optax", extra="cli", needed_by="jaxce bench")
    rng = np.random.default_rng(seed)
    problem = (
        _linear_problem(shape, dtype, rng, optax)
        if loss == "linear_cross_entropy"
        else _logits_problem(loss, shape, dtype, rng, optax)
    )

    def timed(loss: Loss) -> Callable[..., Any]:
        if mode == "forward":
            return loss
        return jax.value_and_grad(loss, argnums=problem.differentiated)

    prepared = {name: prepare(timed(f), problem.args) for name, f in problem.competitors.items()}
    results = {name: p.run() for name, p in prepared.items()}
    times = interleaved_times(
        {name: p.run for name, p in prepared.items()},
        runs=runs,
        warmup=warmup,
        min_seconds=min_seconds,
        on_round=on_round,
    )
    timings = tuple(
        _timing(
            name,
            p,
            times[name],
            times["jaxce"],
            _differences(results[name], results["jaxce"], mode),
        )
        for name, p in prepared.items()
    )
    return BenchReport(
        loss=loss,
        mode=mode,
        shape=shape,
        dtype=jnp.dtype(dtype).name,
        device=_device(),
        jax_version=jax.__version__,
        warmup=warmup,
        timings=timings,
    )


def _checked_arguments(
    loss: str,
    shape: Sequence[int] | None,
    mode: str,
    runs: int,
    warmup: int,
    min_seconds: float,
) -> tuple[int, ...]:
    """Raises a ValueError naming the first bad argument of :func:`compare`; returns the shape."""
    if loss not in LOSSES:
        raise ValueError(f"`loss` must be one of {list(LOSSES)}, got {loss!r}.")
    if mode not in ("value_and_grad", "forward"):
        raise ValueError(f"`mode` must be 'value_and_grad' or 'forward', got {mode!r}.")
    shape = DEFAULT_SHAPES[loss] if shape is None else tuple(int(n) for n in shape)
    if not shape or min(shape) < 1:
        raise ValueError(f"`shape` must have at least one axis, all positive, got {shape}.")
    if loss == "linear_cross_entropy" and len(shape) != 3:
        raise ValueError(f"`shape` of linear_cross_entropy must be {_LINEAR_SHAPE}, got {shape}.")
    if runs < 1:
        raise ValueError(f"`runs` must be at least 1, got {runs}.")
    if warmup < 0:
        raise ValueError(f"`warmup` must be at least 0, got {warmup}.")
    if not 0 <= min_seconds < math.inf:
        raise ValueError(f"`min_seconds` must be finite and at least 0, got {min_seconds}.")
    return shape


def _timing(
    name: str,
    prepared: Prepared,
    seconds: np.ndarray,
    jaxce_seconds: np.ndarray,
    differences: tuple[float, float | None],
) -> Timing:
    milliseconds = seconds * 1e3
    return Timing(
        name=name,
        median_ms=float(np.median(milliseconds)),
        min_ms=float(np.min(milliseconds)),
        max_ms=float(np.max(milliseconds)),
        compile_ms=float(prepared.compile_ms or 0.0),
        temp_bytes=prepared.temp_bytes,
        runs=len(milliseconds),
        speedup=median_ratio(seconds, jaxce_seconds),
        max_loss_difference=differences[0],
        max_gradient_difference=differences[1],
    )


def _device() -> str:
    device = jax.devices()[0]
    if device.device_kind == device.platform:
        return device.platform
    return f"{device.platform} ({device.device_kind})"


def _differences(result: Any, reference: Any, mode: str) -> tuple[float, float | None]:
    """The largest difference of the loss, and of the gradients (every argument's)."""

    def largest(a: Any, b: Any) -> float:
        return max(
            float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        )

    if mode == "forward":
        return largest(result, reference), None
    return largest(result[0], reference[0]), largest(result[1], reference[1])


# --- jaxce bench ---------------------------------------------------------------------

DESCRIPTION = """\
Times jaxce against optax and a plain jax.numpy formulation of the same loss, for your shape
and dtype, on the device JAX picks (set JAX_PLATFORMS=cpu, cuda or tpu to choose); the fused
linear_cross_entropy against the materialised logits (and jax-cce, where installed). Each
competitor is compiled ahead of time (compile time reported apart), called a few times
untimed, then timed in interleaved rounds; the table gives medians, the min-max spread and
jaxce's speedup over each competitor (above 1: jaxce is faster)."""

EPILOG = """\
examples:
  jaxce bench                                   integer labels, logits [4096, 1000] float32
  jaxce bench --shape 8 2048 32000 --dtype bfloat16
  jaxce bench --loss sigmoid_binary_cross_entropy --shape 4096 4096 --forward
  jaxce bench --loss linear_cross_entropy --shape 8192 1024 32000   N D V
  JAX_PLATFORMS=cpu jaxce bench --json > cpu.json

needs optax (pip install 'jaxce[cli]')."""


def _number_parser(
    convert: Callable[[str], Any], *, minimum: float, requirement: str
) -> Callable[[str], Any]:
    """An argparse ``type``: ``convert(text)``, finite and at least ``minimum``, or an error
    that says ``requirement`` and what was given."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not minimum <= value < math.inf:
            raise argparse.ArgumentTypeError(f"{requirement}, got {text}")
        return value

    return parse


def register(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds ``jaxce bench`` to the ``jaxce`` command's sub-commands (``add_subparsers()``)."""
    parser = commands.add_parser(
        "bench",
        help="time jaxce against optax and a plain formulation",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--loss",
        choices=LOSSES,
        default=LOSSES[0],
        metavar="NAME",
        help=f"the loss to time (default {LOSSES[0]}); one of: {', '.join(LOSSES)}",
    )
    parser.add_argument(
        "--shape",
        type=_number_parser(int, minimum=1, requirement="dimensions must be positive integers"),
        nargs="+",
        metavar="N",
        help="the logits' shape, classes last (default: 4096 1000); for linear_cross_entropy "
        "N D V: hidden [N, D], weight [V, D], labels [N] (default: 2048 512 16384)",
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
    parser.add_argument(
        "--runs",
        type=_number_parser(int, minimum=1, requirement="must be a positive integer"),
        default=30,
        help="timed rounds, at least (default 30)",
    )
    parser.add_argument(
        "--min-seconds",
        type=_number_parser(
            float, minimum=0, requirement="must be a finite, non-negative number of seconds"
        ),
        default=2.0,
        help="add rounds until they take about this long (default 2; 0: exactly --runs)",
    )
    parser.add_argument(
        "--warmup",
        type=_number_parser(int, minimum=0, requirement="must be a non-negative integer"),
        default=2,
        help="untimed calls first (default 2)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")

    def checked_run(options: argparse.Namespace) -> int:
        _check_options(parser, options)
        return run(options)

    parser.set_defaults(run=checked_run)
    return parser


def _check_options(parser: argparse.ArgumentParser, options: argparse.Namespace) -> None:
    """What each option cannot check alone: ``--shape`` against ``--loss``, ``--dtype``
    against JAX's settings. Fills in the loss's default shape."""
    if options.shape is None:
        options.shape = list(DEFAULT_SHAPES[options.loss])
    elif options.loss == "linear_cross_entropy" and len(options.shape) != 3:
        parser.error(
            f"argument --shape: --loss linear_cross_entropy takes {_LINEAR_SHAPE}, "
            f"got {len(options.shape)}: {' '.join(map(str, options.shape))}"
        )
    if jax.dtypes.canonicalize_dtype(options.dtype) != np.dtype(options.dtype):
        parser.error(f"argument --dtype: {options.dtype} needs JAX_ENABLE_X64=1")


def run(options: argparse.Namespace) -> int:
    """Runs ``jaxce bench`` with checked options; prints the table (or JSON). Returns 0.

    Without optax, it prints one line on stderr naming the extra that installs it and
    returns 1.
    """
    with Progress(options.runs, "jaxce bench") as progress:

        def on_round(done: int, total: int) -> None:
            progress.set_total(total)
            progress.advance(f"round {done}")

        try:
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
        except MissingExtra as error:
            print(error, file=sys.stderr)
            return 1
    print(json.dumps(report.to_dict(), indent=1) if options.json else report)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``jaxce bench [options]`` (see ``jaxce bench --help``), parsed and run from Python.

    ``argv`` defaults to ``sys.argv[1:]``. Returns the exit status; a missing optional package
    is one line on stderr naming the extra, and status 1; bad arguments exit with status 2
    through argparse. For the report itself, call :func:`compare`.
    """
    command = argparse.ArgumentParser(prog="jaxce")
    register(command.add_subparsers(required=True))
    options = command.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return int(options.run(options))
