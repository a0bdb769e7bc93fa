"""``jaxce.bench`` and ``jaxce bench``: interleaved timing, one ratio convention, the report."""

from __future__ import annotations

import importlib.util
import json
import sys

import jax
import numpy as np
import pytest

from jaxce import __main__ as cli
from jaxce import bench

# A small shape per loss; the fused linear loss takes N D V (hidden [N, D], weight [V, D]).
SMALL_SHAPES = {**dict.fromkeys(bench.LOSSES, (16, 7)), "linear_cross_entropy": (16, 8, 24)}
HAS_JAX_CCE = importlib.util.find_spec("jax_cce") is not None
COMPETITORS = {
    **dict.fromkeys(bench.LOSSES, ("jaxce", "optax", "plain jnp")),
    "linear_cross_entropy": ("jaxce", "materialised", *(("jax-cce",) if HAS_JAX_CCE else ())),
}


@pytest.mark.parametrize("loss", bench.LOSSES)
@pytest.mark.parametrize("mode", ["value_and_grad", "forward"])
def test_competitors_compute_the_same_loss(loss, mode):
    shape = SMALL_SHAPES[loss]
    report = bench.compare(loss, shape, mode=mode, runs=2, warmup=1)
    assert tuple(t.name for t in report.timings) == COMPETITORS[loss]
    for t in report.timings:
        assert t.runs == 2 and 0 < t.min_ms <= t.median_ms <= t.max_ms
        assert t.compile_ms > 0 and t.temp_bytes is not None
        assert t.max_loss_difference < 1e-5, t
        assert (t.max_gradient_difference is None) == (mode == "forward")
        assert mode == "forward" or t.max_gradient_difference < 1e-6, t
    assert report.timing("jaxce").speedup == 1.0
    assert report.device == jax.devices()[0].platform
    assert json.loads(json.dumps(report.to_dict()))["shape"] == list(shape)


def test_linear_cross_entropy_competes_with_jax_cce_only_where_installed(monkeypatch):
    # `import jax_cce` fails, as where the `bench` extra is not installed: no jax-cce row.
    monkeypatch.setitem(sys.modules, "jax_cce", None)
    report = bench.compare("linear_cross_entropy", (8, 4, 16), runs=1, warmup=0)
    assert [t.name for t in report.timings] == ["jaxce", "materialised"]
    assert str(report).startswith(
        "linear_cross_entropy, value_and_grad, hidden [8, 4], weight [16, 4] float32"
    )


def test_default_shapes_fit_their_loss():
    assert set(bench.DEFAULT_SHAPES) == set(bench.LOSSES)
    assert bench.DEFAULT_SHAPES["linear_cross_entropy"] == (2048, 512, 16384)
    assert bench.DEFAULT_SHAPES["softmax_cross_entropy"] == (4096, 1000)


def test_speedup_above_one_means_jaxce_is_faster(monkeypatch):
    # jaxce takes 1 s a round, optax 3 s, the plain formulation 0.5 s.
    fixed = {"jaxce": [1.0, 1.0, 1.0], "optax": [3.0, 3.0, 3.0], "plain jnp": [0.5, 0.5, 0.5]}
    monkeypatch.setattr(
        bench, "interleaved_times", lambda runners, **_: {n: np.array(fixed[n]) for n in runners}
    )
    report = bench.compare(shape=(4, 3), runs=3)
    assert report.timing("optax").speedup == 3.0
    assert report.timing("plain jnp").speedup == 0.5
    assert report.timing("optax").median_ms == 3000.0
    assert "above 1, jaxce is faster" in str(report)


def test_interleaved_times_warms_up_shuffles_rounds_and_reports_progress():
    calls, rounds = [], []
    runners = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = bench.interleaved_times(
        runners, runs=4, warmup=1, on_round=lambda done, total: rounds.append((done, total))
    )
    assert calls[:2] == ["a", "b"]
    assert all(sorted(calls[i : i + 2]) == ["a", "b"] for i in range(2, 10, 2))
    assert {name: t.shape for name, t in times.items()} == {"a": (4,), "b": (4,)}
    assert rounds == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert bench.median_ratio(np.array([2.0, 4.0, 9.0]), np.array([1.0, 1.0, 1.0])) == 4.0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"loss": "hinge"}, "`loss` must be one of"),
        ({"mode": "backward"}, "`mode` must be"),
        ({"shape": (0, 3)}, "`shape` must have at least one axis"),
        ({"loss": "linear_cross_entropy", "shape": (4, 3)},
         r"`shape` of linear_cross_entropy must be three sizes N D V \(hidden \[N, D\]"),
        ({"runs": 0}, "`runs` must be at least 1, got 0"),
        ({"warmup": -1}, "`warmup` must be at least 0, got -1"),
        ({"min_seconds": -0.5}, "`min_seconds` must be finite and at least 0, got -0.5"),
        ({"min_seconds": float("inf")}, "`min_seconds` must be finite and at least 0, got inf"),
    ],
    ids=["unknown-loss", "unknown-mode", "empty-shape", "linear-two-dimensions", "zero-runs",
         "negative-warmup", "negative-min-seconds", "infinite-min-seconds"],
)  # fmt: skip
def test_bad_arguments_are_named(arguments, message):
    with pytest.raises(ValueError, match=message):
        bench.compare(**arguments)


def test_command_prints_the_table_or_json(capsys):
    options = ["bench", "--shape", "32", "10", "--runs", "3", "--min-seconds", "0"]
    assert cli.main(options) == 0
    text = capsys.readouterr().out
    assert text.startswith("softmax_cross_entropy_with_integer_labels, value_and_grad")
    assert "jaxce speedup" in text and "plain jnp" in text
    assert cli.main([*options, "--forward", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "forward" and len(report["timings"]) == 3
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*options, "--dtype", "float64"])
    assert exit_info.value.code == 2
    assert "argument --dtype: float64 needs JAX_ENABLE_X64=1" in capsys.readouterr().err


def test_command_times_linear_cross_entropy(capsys):
    options = ["--loss", "linear_cross_entropy", "--shape", "64", "32", "128", "--runs", "2"]
    assert cli.main(["bench", *options, "--warmup", "1", "--min-seconds", "0.01"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(
        "linear_cross_entropy, value_and_grad, hidden [64, 32], weight [128, 32] float32"
    )
    competitors = COMPETITORS["linear_cross_entropy"]
    rows = text.splitlines()[4 : 4 + len(competitors)]
    assert tuple(row.split()[0] for row in rows) == competitors
    assert bench.main([*options, "--forward", "--json", "--min-seconds", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["shape"] == [64, 32, 128] and report["mode"] == "forward"
    assert tuple(t["name"] for t in report["timings"]) == competitors
