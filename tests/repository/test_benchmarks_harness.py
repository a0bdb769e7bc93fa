"""Smoke test of the benchmark harness on tiny shapes: timing, ratios, failures, reports.

It also checks that the competitors of every case compute the same loss and
gradient, so the published ratios compare like with like.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import __main__ as cli
from benchmarks import cases, harness, report


def _tiny_case(name: str = "tiny/vg/8x5") -> cases.Case:
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 5), dtype=np.float32))

    def broken() -> harness.Prepared:
        raise RuntimeError("competitor not importable")

    def competitors() -> cases.Competitors:
        return {
            "double": cases.jax_competitor(lambda a: a * 2, x),
            "optax": cases.jax_competitor(lambda a: a + 1, x),
            "floor": cases.jax_competitor(lambda a: a, x),
            "broken": broken,
        }

    return cases.Case(name, "a tiny case", competitors, quick=True)


def test_run_cases_reports_times_ratios_and_failures():
    results = cli.run_cases([_tiny_case()], runs=10, warmup=1)
    by_name = {r.implementation: r for r in results}
    assert set(by_name) == {"double", "optax", "floor", "broken"}
    for name in ("double", "optax", "floor"):
        r = by_name[name]
        assert r.runs == 10
        assert 0 < r.min_ms <= r.median_ms <= r.max_ms
        assert r.compile_ms is not None and r.compile_ms > 0
        assert r.temp_bytes is not None and r.temp_bytes >= 0
        assert r.ratio_to_baseline is not None and r.ratio_to_baseline > 0
    assert by_name["optax"].ratio_to_baseline == 1.0
    assert by_name["floor"].ratio_to_floor == 1.0
    assert "competitor not importable" in by_name["broken"].error
    assert by_name["broken"].median_ms is None


def test_interleaved_times_runs_round_robin():
    calls = []
    runners = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = harness.interleaved_times(runners, runs=3, warmup=1)
    # One warm-up round, then rounds of one call each, in shuffled orders.
    assert calls[:2] == ["a", "b"]
    assert all(sorted(calls[i : i + 2]) == ["a", "b"] for i in range(2, 8, 2))
    assert {k: v.shape for k, v in times.items()} == {"a": (3,), "b": (3,)}


def test_prepare_jax_reports_temporaries_from_memory_analysis():
    x = np.zeros((64, 64), np.float32)
    # The sum of an outer product needs its [64, 64, 64] intermediate only if
    # XLA cannot fuse it away; the copy needs none: temp must not be negative.
    prepared = harness.prepare_jax(lambda a: a + 1, (x,))
    assert prepared.temp_bytes is not None and prepared.temp_bytes >= 0
    np.testing.assert_array_equal(np.asarray(prepared.run()), x + 1)


def test_stamp_names_device_versions_and_command():
    s = harness.stamp(["benchmarks", "--quick", "--only", "ce int"])
    assert s["jax"] == jax.__version__
    assert s["cpu_count"] >= 1
    assert s["command"] == "python -m benchmarks --quick --only 'ce int'"
    assert s["device"] and "/" not in s["device"]


def test_reports_are_written(tmp_path):
    measurements = cli.run_cases([_tiny_case()], runs=10, warmup=1)
    results = {
        "stamp": harness.stamp(["benchmarks", "--quick"]),
        "bandwidth_gbps": harness.memory_bandwidth(num_bytes=1 << 20, runs=2),
        "cases": {"tiny/vg/8x5": {"description": "a tiny case", "baseline": "optax"}},
        "measurements": [m.as_dict() for m in measurements],
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert report.main([str(tmp_path)]) == 0
    table = (tmp_path / "results.md").read_text()
    assert "## `tiny/vg/8x5`" in table and "| double |" in table and "failed" in table
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Performance" in (tmp_path / "readme_section.md").read_text()


def test_case_names_are_unique_and_quick_is_a_subset():
    all_cases = cases.all_cases()
    names = [c.name for c in all_cases]
    assert len(names) == len(set(names))
    assert 0 < sum(c.quick for c in all_cases) < len(all_cases)


TINY = (16, 7)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(
            lambda: cases.integer_ce_case(TINY, forward=False, quick=True), id="ce-int-vg"
        ),
        pytest.param(
            lambda: cases.integer_ce_case(TINY, forward=True, quick=True), id="ce-int-fwd"
        ),
        pytest.param(lambda: cases.integer_ce_options_case(TINY), id="ce-int-options"),
        pytest.param(lambda: cases.soft_ce_case(TINY), id="ce-soft"),
        pytest.param(lambda: cases.binary_case(TINY, options=False), id="bce"),
        pytest.param(lambda: cases.binary_case(TINY, options=True), id="bce-options"),
    ],
)
def test_competitors_agree(case):
    """Same loss (and gradient) from jaxce, optax, naive jnp and torch on one case."""
    outputs = {}
    for name, prepare in case().competitors().items():
        if name in ("floor", "jaxce plain") or (name == "optax" and "options" in case().name):
            continue
        value = prepare().run()
        if name.startswith("torch"):
            loss, grad = value if isinstance(value, tuple) else (value, None)
            value = (loss, None if grad is None else grad.detach().float().numpy())
        elif isinstance(value, tuple):
            value = (float(value[0]), np.asarray(value[1]))
        else:
            value = (float(value), None)
        outputs[name] = value
    reference_loss, reference_grad = next(iter(outputs.values()))
    for name, (loss, grad) in outputs.items():
        np.testing.assert_allclose(loss, reference_loss, rtol=2e-5, err_msg=name)
        if grad is not None and reference_grad is not None:
            np.testing.assert_allclose(grad, reference_grad, rtol=1e-4, atol=1e-7, err_msg=name)


def test_derivatives_case_agrees_with_jax_grad():
    case = cases.derivatives_case(TINY)
    assert case is not None, "jaxce.derivatives has softmax_cross_entropy_with_integer_labels"
    grads = {
        name: np.asarray(prepare().run())
        for name, prepare in case.competitors().items()
        if name != "floor"
    }
    for name, grad in grads.items():
        np.testing.assert_allclose(grad, grads["optax"], rtol=1e-5, atol=1e-7, err_msg=name)


def test_linear_rows_become_measurements_with_ratios(monkeypatch):
    rows = [
        {
            "case": "lin",
            "implementation": "materialised",
            "median_ms": 4.0,
            "min_ms": 3.0,
            "max_ms": 5.0,
            "compile_ms": 1.0,
            "temp_bytes": 100,
            "runs": 10,
        },
        {
            "case": "lin",
            "implementation": "jaxce",
            "median_ms": 2.0,
            "min_ms": 1.0,
            "max_ms": 3.0,
            "compile_ms": 1.0,
            "temp_bytes": 10,
            "runs": 10,
        },
    ]
    fake = type(sys)("benchmarks.linear")
    fake.run = lambda quick: rows
    monkeypatch.setitem(sys.modules, "benchmarks.linear", fake)
    measurements, descriptions = cli.linear_measurements(quick=True)
    assert [m.ratio_to_baseline for m in measurements] == [1.0, 0.5]
    assert set(descriptions) == {"lin"}


def test_linear_run_on_tiny_shapes_reports_paired_ratios(monkeypatch):
    """benchmarks.linear itself (tiny shapes): every competitor, the floor, jax-cce's ratio."""
    from benchmarks import linear

    monkeypatch.setattr(linear, "NUM_TOKENS", 64)
    monkeypatch.setattr(linear, "DIM", 16)
    monkeypatch.setattr(linear, "CASES", ((256, "float32"), (128, "bfloat16")))
    monkeypatch.setattr(linear, "PER_TOKEN_CASES", ((192, "float32"),))
    rows = linear.run(quick=False)
    names = {r["implementation"] for r in rows}
    assert {linear.MATERIALISED, linear.JAXCE, linear.FLOOR} <= names
    assert {linear.JAXCE_NONE, linear.JAXCE_TOKEN_WEIGHTS} <= names
    assert len({r["case"] for r in rows}) == 3
    for r in rows:
        assert r["runs"] == 15 and 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert r["ratio_to_baseline"] > 0 and r["ratio_to_floor"] > 0
        if r["implementation"] == linear.MATERIALISED:
            assert r["ratio_to_baseline"] == 1.0
        if r["implementation"] == linear.FLOOR:
            assert r["ratio_to_floor"] == 1.0
    mine = [r for r in rows if r["implementation"] == linear.JAXCE]
    assert all(r["peer"] == linear.JAX_CCE and r["ratio_to_peer"] > 0 for r in mine)
    # The floor computes the products a gradient needs, in the right shapes.
    h, w, _ = linear.inputs(256)
    d_hidden, d_weight = linear.three_matmuls(h[:64, :16], w[:, :16])
    assert d_hidden.shape == (64, 16) and d_weight.shape == (256, 16)
    table = linear.format_table(rows)
    assert table.count("\n") == len(rows) + 1
    # The per-token competitors compute the same weighted sum.
    h, w, y = linear.inputs(192)
    losses = linear.per_token_competitors(jnp.linspace(-1.0, 1.0, 64)).values()
    values = [float(loss(h, w, y)) for loss in losses]
    np.testing.assert_allclose(values, values[0], rtol=1e-5)


def test_report_shows_peer_ratio_and_linear_memory_plot(tmp_path):
    rows = [
        {"case": "lin", "implementation": "materialised", "median_ms": 4.0, "min_ms": 3.0,
         "max_ms": 5.0, "compile_ms": 1.0, "temp_bytes": 2**30, "runs": 10,
         "ratio_to_baseline": 1.0},
        {"case": "lin", "implementation": "jax-cce", "median_ms": 3.0, "min_ms": 3.0,
         "max_ms": 3.0, "compile_ms": 1.0, "temp_bytes": 64 * 2**20, "runs": 10,
         "ratio_to_baseline": 0.75},
        {"case": "lin", "implementation": "jaxce.linear_cross_entropy", "median_ms": 2.0,
         "min_ms": 1.0, "max_ms": 3.0, "compile_ms": 1.0, "temp_bytes": 42 * 2**20, "runs": 10,
         "ratio_to_baseline": 0.5, "peer": "jax-cce", "ratio_to_peer": 0.8},
    ]  # fmt: skip
    results = {
        "stamp": harness.stamp(["benchmarks"]),
        "cases": {"lin": {"description": "linear", "baseline": "materialised"}},
        "measurements": rows,
        "linear_memory": [
            {"vocab": v, "implementation": name, "temp_bytes": v * k}
            for v in (1024, 2048)
            for name, k in (("materialised", 4096), ("jaxce", 16))
        ],
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert report.main([str(tmp_path)]) == 0
    section = (tmp_path / "readme_section.md").read_text()
    assert "is 1.25x faster than jax-cce (speedup), 42.0 MiB" in section
    assert "against 64.0 MiB" in section and "linear_memory.png" in section
    assert (tmp_path / "linear_memory.png").read_bytes()[:4] == b"\x89PNG"


def test_interleaved_times_adds_rounds_for_short_calls():
    calls = []
    runners = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = harness.interleaved_times(runners, runs=3, warmup=1, min_seconds=0.01)
    rounds = len(times["a"])
    assert 3 < rounds <= harness.MAX_RUNS and len(times["b"]) == rounds
    # warm-up, the calibration round, then the timed rounds, shuffled.
    assert calls[:4] == ["a", "b"] * 2 and sorted(calls) == ["a"] * (rounds + 2) + ["b"] * (
        rounds + 2
    )


def test_plot_colours_each_family_apart():
    colours = {
        name: report.family_colour(name)
        for name in ("jaxce", "jaxce options", "optax", "torch", "naive jnp", "jax-cce 0.1.0")
    }
    assert colours["jaxce"] == colours["jaxce options"]
    assert len({colours[n] for n in ("jaxce", "optax", "torch", "naive jnp", "jax-cce 0.1.0")}) == 5
    assert report.family_colour("floor") == report.OTHER_COLOUR
