"""The GPU suite (`python -m benchmarks --suite gpu`) on this CPU, at tiny shapes only.

The real shapes need a GPU (CONTRIBUTING.md, "The GPU suite"); here the suite's cases must
build, one tiny run must write the JSON and the table with every expected row, and a peer that
is missing must be a row that says so, never a crash.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import pytest

from benchmarks import __main__ as cli
from benchmarks import gpu, gpu_peers

# The fused case's JAX competitors, in the suite's order (the floor comes after them).
FUSED_JAX_COMPETITORS = (
    gpu.JAXCE_FUSED,
    gpu.JAXCE_FUSED_SPLIT,
    gpu.JAXCE_FUSED_PER_TOKEN,
    gpu.NAIVE,
    gpu.JAX_CCE,
    gpu.TOKAMAX,
)

# One fused shape and one plain dtype: the end-to-end run stays within a few seconds.
SMALL = dataclasses.replace(
    gpu.SHAPES["tiny"],
    fused=(("A", 128, 16, 384),),
    plain=(16, 256),
    plain_dtypes=("bfloat16",),
    runs=3,
    warmup=1,
)


def test_full_shapes_are_the_issues_and_never_run_here():
    full = gpu.SHAPES["full"]
    assert full.fused == (("A", 8192, 2304, 256000), ("B", 8192, 4096, 128256))
    assert full.plain == (8192, 128256)
    assert full.plain_dtypes == ("float32", "bfloat16")
    if jax.default_backend() != "gpu":
        with pytest.raises(SystemExit, match="needs a GPU"):
            gpu.run_suite("full", pathlib.Path("/nonexistent"), torch_peers=False)


def test_fused_case_list_builds_at_tiny_shapes():
    _, n, d, v = gpu.SHAPES["tiny"].fused[-1]  # V=1000: not a multiple of any block
    notes: dict[str, str] = {}
    entries, (hidden, weight, labels) = gpu.fused_entries(n, d, v, gpu.SHAPES["tiny"], notes)
    assert [e.name for e in entries] == [*FUSED_JAX_COMPETITORS, gpu.FUSED_FLOOR]
    assert hidden.shape == (n, d) and weight.shape == (v, d) and labels.shape == (n,)
    assert hidden.dtype == weight.dtype == jnp.bfloat16
    built = {}
    for entry in entries:
        try:
            built[entry.name] = entry.build()
        except gpu.Unavailable:
            assert entry.name in (gpu.JAX_CCE, gpu.TOKAMAX)  # optional peers only
    fused = (gpu.JAXCE_FUSED, gpu.JAXCE_FUSED_SPLIT, gpu.JAXCE_FUSED_PER_TOKEN, gpu.NAIVE)
    for name in (*fused, gpu.FUSED_FLOOR):
        fn, args = built[name]
        assert callable(fn) and args[0] is hidden and args[1] is weight


def test_plain_case_list_builds_and_detects_the_implementation_argument():
    logits = jnp.zeros((4, 10), jnp.float32)
    labels = jnp.zeros((4,), jnp.int32)
    entries = gpu.plain_entries(logits, labels)
    names = [e.name for e in entries]
    assert names == [gpu.JAXCE_XLA, gpu.JAXCE_PALLAS, gpu.OPTAX, gpu.PLAIN_FLOOR]
    pallas = entries[1]
    if gpu._takes_implementation():
        _, args = pallas.build()
        assert args[0] is logits
    else:
        with pytest.raises(gpu.Unavailable, match="implementation"):
            pallas.build()


def test_a_missing_peer_is_a_row_that_says_so(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    missing = {"jax_cce", "tokamax"}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a)
    )
    rows, prepared = gpu.time_case(
        "tiny",
        [
            gpu.Entry("cce", lambda: (gpu._jax_cce_loss(), ())),
            gpu.Entry("tokamax", lambda: (gpu._tokamax_loss((128, 512))[0], ())),
            gpu.Entry("floor", lambda: (gpu.copy_floor, (jnp.ones((4, 4)),))),
        ],
        floor="floor",
        shapes=SMALL,
    )
    assert rows["cce"]["error"].startswith("not available: jax-cce is not installed")
    assert rows["tokamax"]["error"].startswith("not available: tokamax is not installed")
    assert set(prepared) == {"floor"} and rows["floor"]["x_floor"] == 1.0


def test_torch_peers_without_cuda_are_rows_that_say_so():
    shapes = (("A", 128, 16, 384),)
    result = gpu_peers.run(shapes, (16, 256), plain_dtypes=("bfloat16",))
    rows = result["rows"]
    expected = [(gpu_peers.plain_case(16, 256, "bfloat16"), c) for c in gpu_peers.PLAIN_COMPETITORS]
    expected += [(gpu_peers.fused_case(*shapes[0]), c) for c in gpu_peers.FUSED_COMPETITORS]
    assert [(r["case"], r["implementation"]) for r in rows] == expected
    try:
        import torch
    except ImportError:
        return
    if not torch.cuda.is_available():
        assert all(r["error"].startswith("not available: no CUDA") for r in rows)


def test_torch_peers_dry_run_on_cpu_measures_torch_and_reports_the_rest():
    pytest.importorskip("torch")
    result = gpu_peers.run([("A", 64, 16, 300)], (16, 200), runs=3, warmup=1, allow_cpu=True)
    rows = {(r["case"].split(":")[0], r["implementation"]): r for r in result["rows"]}
    rows.update({(r["case"], r["implementation"]): r for r in result["rows"]})
    naive = rows[("fused A", gpu_peers.TORCH_NAIVE)]
    assert naive["median_ms"] > 0 and naive["runs"] == 3
    # bfloat16 gradients: the error is the reference's rounding and a little more.
    assert 0 < naive["weight_grad_rounding"] < 1e-2 and naive["weight_grad_rel_error"] < 1e-2
    plain = rows[(gpu_peers.plain_case(16, 200, "float32"), gpu_peers.TORCH_CE)]
    assert plain["loss_rel_error"] < 1e-6  # float32, the first case
    for key, row in rows.items():
        if "median_ms" not in row:
            assert row["error"].startswith("not available"), key


def test_tiny_end_to_end_run_writes_json_and_markdown(tmp_path, monkeypatch):
    # As if jaxce had no Pallas kernel (its interpret mode is slow to compile): a "not
    # available" row of our own; the build test above covers the kernel's entry.
    monkeypatch.setattr(gpu, "_takes_implementation", lambda: False)
    folder = gpu.run_suite(SMALL, tmp_path, torch_peers=False, argv=["benchmarks", "test"])
    results = json.loads((folder / gpu.JSON_NAME).read_text())
    table = (folder / gpu.MARKDOWN_NAME).read_text()
    fused_case = gpu_peers.fused_case("A", 128, 16, 384)
    plain_case = gpu_peers.plain_case(16, 256, "bfloat16")
    assert list(results["cases"]) == [fused_case, plain_case]
    assert fused_case in results["plans"]
    assert results["limits"]["matmul_tflops"] > 0
    rows = {(r["case"], r["implementation"]): r for r in results["rows"]}
    expected = [(fused_case, n) for n in FUSED_JAX_COMPETITORS]
    expected += [(fused_case, gpu.FUSED_FLOOR)]
    expected += [(fused_case, c) for c in gpu_peers.FUSED_COMPETITORS]
    expected += [(plain_case, n) for n in (gpu.JAXCE_XLA, gpu.JAXCE_PALLAS, gpu.OPTAX)]
    expected += [(plain_case, gpu.PLAIN_FLOOR)]
    expected += [(plain_case, c) for c in gpu_peers.PLAIN_COMPETITORS]
    assert sorted(rows) == sorted(expected)
    for name in (gpu.JAXCE_FUSED, gpu.JAXCE_FUSED_PER_TOKEN, gpu.NAIVE):
        row = rows[(fused_case, name)]
        assert row["median_ms"] > 0 and row["compile_ms"] > 0 and row["temp_bytes"] >= 0
        assert row["x_floor"] > 0 and row["loss_rel_error"] < 1e-5
        assert 0 < row["weight_grad_rounding"] < 1e-2 and row["weight_grad_rel_error"] < 1e-2
    assert rows[(fused_case, gpu.FUSED_FLOOR)]["x_floor"] == 1.0
    for name in (gpu.JAXCE_XLA, gpu.OPTAX):
        row = rows[(plain_case, name)]
        assert row["median_ms"] > 0 and row["loss_rel_error"] < 1e-2
    assert rows[(plain_case, gpu.JAXCE_XLA)]["loss_rel_error"] < 1e-6
    # The float64 reference (on the device) agrees with the host's fallback.
    logits, labels = gpu.plain_inputs(16, 256, "bfloat16")
    host = gpu._float64_loss_on_host(logits, labels, rows=5)
    assert results["cases"][plain_case]["reference_loss"] == pytest.approx(host, rel=1e-12)
    grad = rows[(plain_case, gpu.OPTAX)]
    assert 0 < grad["grad_rounding"] < 1e-2 and grad["grad_rel_error"] < 1e-2
    assert rows[(plain_case, gpu.JAXCE_PALLAS)]["error"].startswith("not available: this")
    for (_, name), row in rows.items():
        if row.get("source") == "torch":
            assert row["error"].startswith("not measured"), name
        assert "median_ms" in row or row.get("error"), name
    assert "x floor (time / floor)" in table and "## Targets (jaxce)" in table
    assert f"## `{fused_case}`" in table and f"## `{plain_case}`" in table


def test_cli_routes_the_gpu_suite(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(gpu, "run_suite", lambda *a, **k: calls.append((a, k)))
    assert cli.main(["--suite", "gpu", "--shapes", "tiny", "--out", str(tmp_path)]) == 0
    (shapes, out), options = calls[0]
    assert shapes == "tiny" and out == tmp_path and options["torch_peers"] is True
