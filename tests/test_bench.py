"""``jaxce.bench`` and ``jaxce bench``: interleaved timing, one ratio convention, the report."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from jaxce import __main__ as cli
from jaxce import bench


@pytest.mark.parametrize("loss", bench.LOSSES)
@pytest.mark.parametrize("mode", ["value_and_grad", "forward"])
def test_competitors_compute_the_same_loss(loss, mode):
    report = bench.compare(loss, (16, 7), mode=mode, runs=2, warmup=1)
    assert [t.name for t in report.timings] == ["jaxce", "optax", "plain jnp"]
    for t in report.timings:
        assert t.runs == 2 and 0 < t.min_ms <= t.median_ms <= t.max_ms
        assert t.compile_ms > 0 and t.temp_bytes is not None
        assert t.max_loss_difference < 1e-5, t
        assert (t.max_gradient_difference is None) == (mode == "forward")
        assert mode == "forward" or t.max_gradient_difference < 1e-6, t
    assert report.timing("jaxce").speedup == 1.0
    assert report.device == jax.devices()[0].platform
    assert json.loads(json.dumps(report.to_dict()))["shape"] == [16, 7]


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
    ],
    ids=["unknown-loss", "unknown-mode", "empty-shape"],
)
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
    with pytest.raises(SystemExit, match="JAX_ENABLE_X64"):
        cli.main([*options, "--dtype", "float64"])
