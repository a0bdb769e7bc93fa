"""The GPU suite's PyTorch peers: torch's own losses, Liger Kernel and Apple's Cut Cross-Entropy.

`python -m benchmarks.gpu_peers OUT.json [--fused LABEL:N:D:V ...] [--plain N:V] [--runs R]`
writes one row per (case, implementation) to `OUT.json`. `benchmarks.gpu` runs it in a process
of its own, before JAX touches the GPU (JAX takes most of the device's memory once it starts),
and merges the rows into its results.

It began as the script behind the project's first PyTorch measurements of these peers, kept in
the repository so that the suite runs from a checkout alone, and was changed to: take the shapes as arguments, interleave the
competitors of a case (rounds of one call each in a fresh random order, CUDA-event times,
medians after warm-up), measure each one's peak extra memory on its own, record the accuracy
(gradients against a float32 formulation without TF32, mean loss against float64), and report
a peer that cannot run as a row that says so. It imports no JAX.

Peers: `torch.nn.functional.cross_entropy` (plain CE; fused: `F.linear` then `F.cross_entropy`
in float32, the "torch naive" row), Liger Kernel's `LigerCrossEntropyLoss` and
`LigerFusedLinearCrossEntropyLoss`, and CCE's `linear_cross_entropy` (default, which drops
small gradient entries, and exact with `filter_eps=None`). Liger's plain CE writes its
gradient into the logits it is given, so it gets a copy of its own.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

# Case names: `benchmarks.gpu` builds the same ones, so the rows of both processes meet.
FUSED_DTYPE = "bfloat16"
PLAIN_DTYPES = ("float32", "bfloat16")

TORCH_CE = "torch F.cross_entropy"
LIGER_CE = "Liger LigerCrossEntropyLoss"
TORCH_NAIVE = "torch naive (F.linear, F.cross_entropy in float32)"
LIGER_FUSED = "Liger LigerFusedLinearCrossEntropyLoss"
CCE_DEFAULT = "CCE linear_cross_entropy (default: approximate gradients)"
CCE_EXACT = "CCE linear_cross_entropy (filter_eps=None: exact)"
PLAIN_COMPETITORS = (TORCH_CE, LIGER_CE)
FUSED_COMPETITORS = (TORCH_NAIVE, LIGER_FUSED, CCE_DEFAULT, CCE_EXACT)

# Where the peers run: "cuda", or "cpu" for the tests' dry run (`run(..., allow_cpu=True)`:
# host timers, no memory measurement, and Liger and CCE, which need CUDA, not available).
DEVICE = "cuda"


def fused_case(label: str, n: int, d: int, v: int) -> str:
    return f"fused {label}: N={n} D={d} V={v} {FUSED_DTYPE}"


def plain_case(n: int, v: int, dtype: str) -> str:
    return f"plain CE: N={n} V={v} {dtype}"


def _versions() -> dict[str, str | None]:
    import importlib.metadata

    found: dict[str, str | None] = {}
    for name in ("torch", "triton", "liger-kernel", "cut-cross-entropy"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def _unavailable(case: str, name: str, reason: str) -> dict[str, Any]:
    return {"case": case, "implementation": name, "source": "torch", "error": reason}


def _grad_errors(torch: Any, prefix: str, got: Any, want: Any) -> dict[str, float]:
    """Norm-wise relative error, the reference's own rounding to `got`'s dtype, and the rest
    (`benchmarks.gpu.gradient_errors`, in PyTorch)."""
    want = want.double()
    norm = torch.linalg.vector_norm(want)
    error = float(torch.linalg.vector_norm(got.double() - want) / norm)
    rounding = float(torch.linalg.vector_norm(want.to(got.dtype).double() - want) / norm)
    return {
        f"{prefix}_rel_error": error,
        f"{prefix}_rounding": rounding,
        f"{prefix}_beyond_rounding": max(error**2 - rounding**2, 0.0) ** 0.5,
    }


def _sync(torch: Any) -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _empty_cache(torch: Any) -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def _timed_ms(torch: Any, step: Callable[[], Any]) -> float:
    """One call's milliseconds: CUDA events around it (host clock on the CPU dry run)."""
    if DEVICE != "cuda":
        import time

        start_s = time.perf_counter()
        step()
        return (time.perf_counter() - start_s) * 1e3
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    torch.cuda.synchronize()
    return float(start.elapsed_time(end))


def _time_interleaved(
    torch: Any, steps: dict[str, Callable[[], Any]], runs: int, warmup: int
) -> dict[str, list[float]]:
    """Milliseconds per call, rounds of one call each in a fresh random order."""
    import random

    for step in steps.values():
        for _ in range(warmup):
            step()
    _sync(torch)
    order = random.Random(0)
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for _ in range(runs):
        order.shuffle(names)
        for name in names:
            times[name].append(_timed_ms(torch, steps[name]))
    return times


def _peak_extra_bytes(torch: Any, step: Callable[[], Any]) -> int | None:
    """Peak memory one call allocates beyond what was allocated before it (after warm-up)."""
    if DEVICE != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def _measure(
    torch: Any,
    case: str,
    steps: dict[str, Callable[[], Any] | str],
    check: Callable[[str], dict[str, Any]],
    runs: int,
    warmup: int,
) -> list[dict[str, Any]]:
    """Rows for one case: accuracy first (fresh inputs), then memory, then interleaved times.

    `steps` maps a name to a step (forward and backward once, returns the loss) or to the
    reason it is not available.
    """
    rows: dict[str, dict[str, Any]] = {}
    ready: dict[str, Callable[[], Any]] = {}
    for name, step in steps.items():
        if isinstance(step, str):
            rows[name] = _unavailable(case, name, step)
            continue
        row: dict[str, Any] = {"case": case, "implementation": name, "source": "torch"}
        try:
            row.update(check(name))
            for _ in range(warmup):
                step()
            row["peak_extra_bytes"] = _peak_extra_bytes(torch, step)
            ready[name] = step
        except Exception as error:  # a peer that fails is a finding, not a crash
            row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        rows[name] = row
    if ready:
        times = _time_interleaved(torch, ready, runs=runs, warmup=1)
        for name, ms in times.items():
            rows[name].update(
                median_ms=statistics.median(ms), min_ms=min(ms), max_ms=max(ms), runs=len(ms)
            )
    _empty_cache(torch)
    for row in rows.values():
        print(json.dumps(row), flush=True)
    return list(rows.values())


def _liger(name: str) -> Any:
    from liger_kernel import transformers

    return getattr(transformers, name)()


def plain_rows(
    torch: Any, n: int, v: int, runs: int, warmup: int, dtypes: Sequence[str] = PLAIN_DTYPES
) -> list[dict[str, Any]]:
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    labels = torch.randint(0, v, (n,), device=DEVICE, generator=generator)
    rows = []
    for dtype in dtypes:
        logits = (3 * torch.randn(n, v, device=DEVICE, generator=generator)).to(
            getattr(torch, dtype)
        )
        rows += _plain_case_rows(torch, plain_case(n, v, dtype), logits, labels, runs, warmup)
        _empty_cache(torch)
    return rows


def _plain_case_rows(
    torch: Any, case: str, logits: Any, labels: Any, runs: int, warmup: int
) -> list[dict[str, Any]]:
    F = torch.nn.functional
    logits64 = logits.detach().double().requires_grad_()
    reference_loss = F.cross_entropy(logits64, labels)
    reference_loss.backward()
    reference, reference_grad = float(reference_loss.detach()), logits64.grad
    del logits64, reference_loss

    def step_for(loss_fn: Callable[[Any, Any], Any], x: Any) -> Callable[[], Any]:
        x.requires_grad_()

        def step() -> Any:
            x.grad = None
            loss = loss_fn(x, labels)
            loss.backward()
            return loss

        return step

    steps: dict[str, Callable[[], Any] | str] = {TORCH_CE: step_for(F.cross_entropy, logits)}
    try:
        liger_ce = _liger("LigerCrossEntropyLoss")
        # Liger overwrites its input with the gradient: a copy of its own.
        liger_logits = logits.detach().clone()
        steps[LIGER_CE] = step_for(liger_ce, liger_logits)
    except Exception as error:
        steps[LIGER_CE] = f"not available: {type(error).__name__}: {error}"

    def check(name: str) -> dict[str, Any]:
        # The first call sees fresh logits (Liger's copy is overwritten afterwards).
        loss = float(steps[name]().detach())  # type: ignore[operator]
        x = logits if name == TORCH_CE else liger_logits
        return {
            "loss": loss,
            "loss_rel_error": abs(loss - reference) / abs(reference),
            **_grad_errors(torch, "grad", x.grad, reference_grad),
        }

    return _measure(torch, case, steps, check, runs, warmup)


def fused_rows(
    torch: Any, label: str, n: int, d: int, v: int, runs: int, warmup: int
) -> list[dict[str, Any]]:
    F = torch.nn.functional
    case = fused_case(label, n, d, v)
    generator = torch.Generator(device=DEVICE).manual_seed(n + v)
    scale = d**0.25
    hidden = (torch.randn(n, d, device=DEVICE, generator=generator) / scale).bfloat16()
    weight = (torch.randn(v, d, device=DEVICE, generator=generator) / scale).bfloat16()
    labels = torch.randint(0, v, (n,), device=DEVICE, generator=generator)
    hidden.requires_grad_()
    weight.requires_grad_()

    # The float32 formulation the gradients are measured against (no TF32).
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    h32 = hidden.detach().float().requires_grad_()
    w32 = weight.detach().float().requires_grad_()
    ref_loss = F.cross_entropy(h32 @ w32.T, labels)
    ref_loss.backward()
    torch.backends.cuda.matmul.allow_tf32 = tf32
    ref = (float(ref_loss.detach()), h32.grad, w32.grad)

    def step_for(loss_fn: Callable[[], Any]) -> Callable[[], Any]:
        def step() -> Any:
            hidden.grad = None
            weight.grad = None
            loss = loss_fn()
            loss.backward()
            return loss

        return step

    steps: dict[str, Callable[[], Any] | str] = {
        TORCH_NAIVE: step_for(lambda: F.cross_entropy((hidden @ weight.T).float(), labels))
    }
    try:
        flce = _liger("LigerFusedLinearCrossEntropyLoss")
        steps[LIGER_FUSED] = step_for(lambda: flce(weight, hidden, labels))
    except Exception as error:
        steps[LIGER_FUSED] = f"not available: {type(error).__name__}: {error}"
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        steps[CCE_DEFAULT] = step_for(lambda: cce(hidden, weight, labels))
        steps[CCE_EXACT] = step_for(lambda: cce(hidden, weight, labels, filter_eps=None))
    except Exception as error:
        reason = f"not available: {type(error).__name__}: {error}"
        steps[CCE_DEFAULT] = steps[CCE_EXACT] = reason

    def check(name: str) -> dict[str, Any]:
        loss = float(steps[name]().detach())  # type: ignore[operator]
        return {
            "loss": loss,
            "loss_rel_error": abs(loss - ref[0]) / abs(ref[0]),
            **_grad_errors(torch, "hidden_grad", hidden.grad, ref[1]),
            **_grad_errors(torch, "weight_grad", weight.grad, ref[2]),
        }

    return _measure(torch, case, steps, check, runs, warmup)


def all_unavailable(
    fused: Sequence[tuple[str, int, int, int]],
    plain: tuple[int, int] | None,
    reason: str,
    plain_dtypes: Sequence[str] = PLAIN_DTYPES,
) -> list[dict[str, Any]]:
    """Every row these shapes would have, each saying why it was not measured."""
    rows = []
    if plain is not None:
        for dtype in plain_dtypes:
            rows += [_unavailable(plain_case(*plain, dtype), c, reason) for c in PLAIN_COMPETITORS]
    for shape in fused:
        rows += [_unavailable(fused_case(*shape), c, reason) for c in FUSED_COMPETITORS]
    return rows


def run(
    fused: Sequence[tuple[str, int, int, int]],
    plain: tuple[int, int] | None,
    *,
    runs: int = 10,
    warmup: int = 2,
    plain_dtypes: Sequence[str] = PLAIN_DTYPES,
    on_update: Callable[[dict[str, Any]], None] | None = None,
    allow_cpu: bool = False,
) -> dict[str, Any]:
    """All the rows, and where they were measured; `on_update(result)` after each section.

    Without CUDA every row says so, unless `allow_cpu` (the tests' dry run on tiny shapes).
    """
    global DEVICE
    result: dict[str, Any] = {"python": platform.python_version(), "versions": _versions()}
    try:
        import torch
    except ImportError as error:
        reason = f"not available: torch: {error}"
        result["rows"] = all_unavailable(fused, plain, reason, plain_dtypes)
        return result
    if torch.cuda.is_available():
        DEVICE = "cuda"
        result["device"] = torch.cuda.get_device_name()
    elif allow_cpu:
        DEVICE = "cpu"
        result["device"] = "cpu (dry run)"
    else:
        reason = "not available: no CUDA device (torch.cuda.is_available() is False)"
        result["rows"] = all_unavailable(fused, plain, reason, plain_dtypes)
        return result
    torch.manual_seed(0)
    result["rows"] = rows = []
    if plain is not None:
        rows += plain_rows(torch, *plain, runs=runs, warmup=warmup, dtypes=plain_dtypes)
        if on_update is not None:
            on_update(result)
    for label, n, d, v in fused:
        rows += fused_rows(torch, label, n, d, v, runs=runs, warmup=warmup)
        _empty_cache(torch)
        if on_update is not None:
            on_update(result)
    return result


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(":"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_peers", description=__doc__)
    parser.add_argument("out", help="the JSON file to write")
    parser.add_argument("--fused", action="append", default=[], metavar="LABEL:N:D:V")
    parser.add_argument("--plain", metavar="N:V")
    parser.add_argument("--plain-dtype", action="append", choices=PLAIN_DTYPES)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    fused = []
    for spec in args.fused:
        label, rest = spec.split(":", 1)
        n, d, v = _ints(rest)
        fused.append((label, n, d, v))
    plain = None
    if args.plain:
        n, v = _ints(args.plain)
        plain = (n, v)

    def write(result: dict[str, Any]) -> None:
        # After each section, so that a run stopped by a time limit keeps what it measured.
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    dtypes = tuple(args.plain_dtype or PLAIN_DTYPES)
    result = run(
        fused, plain, runs=args.runs, warmup=args.warmup, plain_dtypes=dtypes, on_update=write
    )
    write(result)
    print(f"wrote {args.out}: {len(result['rows'])} rows", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
