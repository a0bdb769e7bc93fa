"""`python -m benchmarks [--quick] [--only PATTERN] [--out DIR]`, or `--suite gpu`.

Runs the cases of `benchmarks.cases` (all of them, or the `--quick` subset with
fewer runs), prints progress, and writes `results.json`, `results.md`,
`results.png` and `readme_section.md` under `DIR/<device>/` (default
`benchmarks/results/<device>/`).

`--suite gpu` runs `benchmarks.gpu` instead (made for an H200: the fused loss at
shapes A and B and plain cross-entropy at 8192 x 128256 against their peers) and
writes `gpu_results.json` and `gpu_results.md` under `DIR/<device>/`.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import pathlib
import re
import sys
from collections.abc import Sequence
from typing import Any

from benchmarks import cases as cases_module
from benchmarks import harness, report

RESULTS = pathlib.Path(__file__).parent / "results"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a subset, 10 runs (< 2 min)")
    parser.add_argument("--only", metavar="PATTERN", help="cases whose name matches this regex")
    parser.add_argument("--out", metavar="DIR", type=pathlib.Path, default=RESULTS)
    parser.add_argument("--runs", type=int, help="timed runs per competitor (>= 10)")
    parser.add_argument(
        "--suite",
        choices=("cpu", "gpu"),
        default="cpu",
        help="cpu: the cases above (default); gpu: benchmarks.gpu (needs a GPU)",
    )
    parser.add_argument(
        "--shapes",
        choices=("full", "tiny"),
        default="full",
        help="--suite gpu only: tiny runs the GPU suite's cases small, anywhere (the tests)",
    )
    parser.add_argument(
        "--no-torch-peers",
        action="store_true",
        help="--suite gpu only: skip the PyTorch peers' process (their rows say so)",
    )
    return parser.parse_args(argv)


def run_cases(
    selected: Sequence[cases_module.Case],
    *,
    runs: int,
    warmup: int,
    progress: harness.Progress | None = None,
    min_seconds: float = 0.0,
) -> list[harness.Measurement]:
    """Measures each case in turn; a competitor that fails to build is reported, not fatal."""
    measurements = []
    for case in selected:
        if progress is not None:
            progress.begin(case.name)
        prepared: dict[str, Any] = {}
        for name, prepare in case.competitors().items():
            try:
                prepared[name] = prepare()
            except Exception as error:  # a broken competitor must not stop the run
                prepared[name] = error
        results = harness.measure_case(
            case.name,
            prepared,
            runs=runs,
            warmup=warmup,
            baseline=case.baseline,
            floor=case.floor,
            min_seconds=min_seconds,
        )
        del prepared
        gc.collect()
        if progress is not None:
            progress.end(results)
        measurements.extend(results)
    return measurements


def linear_measurements(
    quick: bool, memory: list[dict[str, Any]] | None = None
) -> tuple[list[harness.Measurement], dict[str, str]]:
    """The fused linear cross-entropy cases of `benchmarks.linear`, when that module exists.

    With a `memory` list, also appends the temporaries against V (`memory_sweep`).
    """
    try:
        linear = importlib.import_module("benchmarks.linear")
    except ImportError as error:
        sys.stderr.write(f"benchmarks.linear not importable, skipped: {error}\n")
        return [], {}
    try:
        rows = linear.run(quick)
        if memory is not None:
            memory.extend(linear.memory_sweep())
    except Exception as error:  # report it, keep the other results
        failed = harness.Measurement(
            "linear", "benchmarks.linear", None, None, None, None, None, 0, error=repr(error)
        )
        return [failed], {"linear": "fused linear cross-entropy (failed)"}
    fields = {f.name for f in harness.Measurement.__dataclass_fields__.values()}
    # benchmarks.linear reports medians only: its ratios are ratios of medians,
    # against the materialised (matmul + loss) formulation.
    baselines = {
        row["case"]: row["median_ms"]
        for row in rows
        if str(row["implementation"]).startswith("materialised")
    }
    measurements = []
    for row in rows:
        known = {k: v for k, v in row.items() if k in fields}
        known.setdefault("runs", row.get("runs", 0))
        if "ratio_to_baseline" not in known and row["case"] in baselines:
            known["ratio_to_baseline"] = row["median_ms"] / baselines[row["case"]]
        measurements.append(harness.Measurement(**known))
    descriptions = {
        row["case"]: row.get("description", "fused linear CE against the materialised logits")
        for row in rows
    }
    return measurements, descriptions


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.suite == "gpu":
        from benchmarks import gpu

        gpu.run_suite(
            args.shapes,
            args.out,
            torch_peers=not args.no_torch_peers,
            argv=["benchmarks", *argv],
        )
        return 0
    runs = args.runs or (10 if args.quick else 20)
    if runs < 10:
        raise SystemExit("--runs must be at least 10")
    selected = [c for c in cases_module.all_cases() if c.quick or not args.quick]
    if args.only:
        selected = [c for c in selected if re.search(args.only, c.name)]
    include_linear = not args.quick and (not args.only or re.search(args.only, "linear"))
    progress = harness.Progress(len(selected) + bool(include_linear))
    stamp = harness.stamp(["benchmarks", *argv])
    sys.stderr.write(f"{stamp['device']}, jax {stamp['jax']}: measuring bandwidth ...\n")
    bandwidth = harness.memory_bandwidth()
    measurements = run_cases(
        selected,
        runs=runs,
        warmup=1 if args.quick else 2,
        progress=progress,
        # Short cases get more rounds (a 3 ms call is noisy over 20 rounds).
        min_seconds=0.5 if args.quick else 3.0,
    )
    descriptions = {c.name: c.description for c in selected}
    baselines = {c.name: c.baseline for c in selected}
    linear_memory: list[dict[str, Any]] = []
    if include_linear:
        progress.begin("linear (benchmarks/linear.py)")
        linear, linear_descriptions = linear_measurements(args.quick, linear_memory)
        progress.end(linear)
        measurements += linear
        descriptions.update(linear_descriptions)
        for m in linear:
            if m.implementation.startswith("materialised"):
                baselines[m.case] = m.implementation
    results = {
        "stamp": stamp,
        "bandwidth_gbps": bandwidth,
        "cases": {
            name: {"description": descriptions[name], "baseline": baselines.get(name)}
            for name in descriptions
        },
        "measurements": [m.as_dict() for m in measurements],
        "linear_memory": linear_memory,
    }
    out = args.out / stamp["device"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    report.write_all(results, out)
    sys.stderr.write(f"wrote {out}/results.json, results.md, results.png, readme_section.md\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
