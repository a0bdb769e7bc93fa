"""The benchmark suite's measurements: cases timed, ratios, bandwidth, stamps and progress.

The timing itself is `jaxce.bench`'s (re-exported here under the suite's names). Every JAX
competitor is compiled once, ahead of time, from `jax.ShapeDtypeStruct`s:
the compile time is measured on its own and the temporaries come from XLA's
`memory_analysis()` of that same executable, so nothing is allocated to measure
memory. The timed calls then run that executable on device-resident inputs
and wait with `jax.block_until_ready`.

Competitors of one case run interleaved (A B C A B C ...) in one process, so
load from other processes hits all of them alike; the ratio of two competitors
is the median of the per-round ratios, which is steadier than a ratio of
medians on a noisy machine.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxce import bench

# The timing loop is the package's (`jaxce bench` uses it too), under the suite's names.
MAX_RUNS = bench.MAX_RUNS
Prepared = bench.Prepared
Runner = bench.Runner
interleaved_times = bench.interleaved_times
median_ratio = bench.median_ratio
prepare_jax = bench.prepare


@dataclasses.dataclass
class Measurement:
    """One competitor on one case; times in milliseconds."""

    case: str
    implementation: str
    median_ms: float | None
    min_ms: float | None
    max_ms: float | None
    compile_ms: float | None
    temp_bytes: int | None
    runs: int
    ratio_to_baseline: float | None = None
    ratio_to_floor: float | None = None
    error: str | None = None
    # A named competitor to compare with besides the baseline (e.g. jax-cce).
    peer: str | None = None
    ratio_to_peer: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def measure_case(
    case: str,
    prepared: dict[str, Prepared | BaseException],
    *,
    runs: int,
    warmup: int,
    baseline: str | None,
    floor: str | None,
    min_seconds: float = 0.0,
) -> list[Measurement]:
    """Times every prepared competitor of one case, interleaved, and reports ratios.

    Competitors that failed to build appear with their error and no times.
    """
    ready = {name: p for name, p in prepared.items() if isinstance(p, Prepared)}
    times = interleaved_times(
        {n: p.run for n, p in ready.items()}, runs=runs, warmup=warmup, min_seconds=min_seconds
    )
    results = []
    for name, item in prepared.items():
        if not isinstance(item, Prepared):
            error = f"{type(item).__name__}: {item}"
            results.append(Measurement(case, name, None, None, None, None, None, 0, error=error))
            continue
        t = times[name] * 1e3
        results.append(
            Measurement(
                case,
                name,
                median_ms=float(np.median(t)),
                min_ms=float(np.min(t)),
                max_ms=float(np.max(t)),
                compile_ms=item.compile_ms,
                temp_bytes=item.temp_bytes,
                runs=len(t),
                ratio_to_baseline=(
                    median_ratio(times[name], times[baseline]) if baseline in times else None
                ),
                ratio_to_floor=median_ratio(times[name], times[floor]) if floor in times else None,
            )
        )
    return results


def memory_bandwidth(num_bytes: int = 1 << 28, runs: int = 10) -> dict[str, float]:
    """The machine's measured memory bandwidth in GB/s (1e9 bytes per second).

    `read`: a sum over a `num_bytes` float32 array. `copy`: the same array
    scaled into a fresh output (bytes read + bytes written), which on CPU
    includes the first-touch cost of the fresh output pages, as every
    benchmarked gradient does. `copy_in_place`: the same with the input
    donated, so XLA writes over it.
    """
    n = num_bytes // 4
    x = jnp.ones((n,), jnp.float32)
    read = jax.jit(jnp.sum)
    copy = jax.jit(lambda a: a * 2)
    halve = jax.jit(lambda a: a * 0.5, donate_argnums=0)
    result = {}
    times = interleaved_times({"read": lambda: read(x), "copy": lambda: copy(x)}, runs=runs)
    result["read_gbps"] = num_bytes / float(np.median(times["read"])) / 1e9
    result["copy_gbps"] = 2 * num_bytes / float(np.median(times["copy"])) / 1e9
    in_place = []
    y = jax.block_until_ready(x * 1)
    for _ in range(runs + 2):
        start = time.perf_counter()
        y = jax.block_until_ready(halve(y))
        in_place.append(time.perf_counter() - start)
    result["copy_in_place_gbps"] = 2 * num_bytes / float(np.median(in_place[2:])) / 1e9
    return result


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else `platform.processor()`."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name() -> str:
    """A folder name for this device: `cpu-<model>-<n>cores`, or the accelerator's kind."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        name = f"cpu-{cpu_model()}-{os.cpu_count()}cores"
    else:
        name = device.device_kind
    return "".join(c if c.isalnum() or c in "-." else "-" for c in name).strip("-").lower()


def stamp(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Where and how the numbers were produced."""
    import jaxlib

    argv = sys.argv if argv is None else argv
    device = jax.devices()[0]
    return {
        "device": device_name(),
        "device_kind": device.device_kind,
        "platform": device.platform,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks " + shlex.join(list(argv[1:])),
    }


class Progress:
    """One line per case on stderr: `[3/20  41s] case: name 1.23 ms, ...`."""

    def __init__(self, total: int, stream: Any = None) -> None:
        self.total = total
        self.done = 0
        self.start = time.perf_counter()
        self.stream = sys.stderr if stream is None else stream

    def begin(self, case: str) -> None:
        self.stream.write(f"[{self.done + 1}/{self.total} {self.elapsed():4.0f}s] {case} ...")
        self.stream.flush()

    def end(self, results: Sequence[Measurement]) -> None:
        self.done += 1
        parts = [
            f"{r.implementation} {r.median_ms:.2f} ms"
            if r.median_ms is not None
            else f"{r.implementation} failed"
            for r in results
        ]
        self.stream.write(" " + ", ".join(parts) + "\n")
        self.stream.flush()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
