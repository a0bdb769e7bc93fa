"""The gradient verification tool: it passes correct gradients and catches wrong ones."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxce
import jaxce.derivatives as derivatives
from jaxce import verify


def _logits_and_labels(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.standard_normal((4, 5)), dtype), jnp.asarray(rng.integers(0, 5, (4,)))


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_library_loss_passes_with_every_pair(dtype):
    with jax.enable_x64(True):
        logits, labels = _logits_and_labels(jnp.dtype(dtype))
    report = verify.check_gradients(
        jaxce.softmax_cross_entropy_with_integer_labels,
        derivatives.softmax_cross_entropy_with_integer_labels,
        logits,
        labels,
        label_smoothing=0.1,
        reduction="mean",
    )
    assert report.passed, str(report)
    assert report.dtype == dtype
    assert {row.pair for row in report.rows} == set(verify.PAIRS)
    tolerance = verify.TOLERANCES[dtype]
    assert {row.tolerance for row in report.rows} <= {
        tolerance.analytic,
        tolerance.finite_differences,
    }


def test_sign_error_is_caught():
    logits, labels = _logits_and_labels()

    def wrong_sign(*args, **kwargs):
        return -derivatives.softmax_cross_entropy_with_integer_labels(*args, **kwargs)

    report = verify.check_gradients(
        jaxce.softmax_cross_entropy_with_integer_labels, wrong_sign, logits, labels
    )
    assert not report.passed
    failed = {row.pair for row in report.rows if not row.passed}
    assert failed == {
        verify.CLOSED_VS_GRAD,
        verify.CLOSED_VS_REFERENCE,
        verify.CLOSED_VS_FINITE_DIFFERENCES,
        verify.JVP_VS_CLOSED,
    }
    # The two independent autodiff gradients still agree: the closed form is what is wrong.
    assert report.worst(verify.GRAD_VS_REFERENCE).passed
    assert "FAIL" in str(report)


def test_missing_one_over_n_is_caught():
    logits, labels = _logits_and_labels()

    def per_sample(*args, **kwargs):
        # The documents' per-sample formula, used for the mean without dividing by n.
        return derivatives.sigmoid_binary_cross_entropy(*args, **{**kwargs, "reduction": "sum"})

    targets = jax.nn.one_hot(labels, 5)
    report = verify.check_gradients(
        jaxce.sigmoid_binary_cross_entropy, per_sample, logits, targets, reduction="mean"
    )
    assert not report.passed
    row = report.worst(verify.CLOSED_VS_FINITE_DIFFERENCES)
    # Off by a factor n = 20: the relative error is n - 1.
    assert row.max_rel == pytest.approx(19, rel=1e-3)


def test_user_loss_with_own_derivative_and_reference():
    def squared_error(prediction, target, *, scale=1.0):
        return scale * jnp.square(prediction - target)

    def squared_error_derivative(prediction, target, *, scale=1.0):
        return 2 * scale * (prediction - target)

    def squared_error_reference(prediction, target, *, scale=1.0):
        difference = prediction - target
        return scale * difference * difference

    x = jnp.linspace(-1.0, 2.0, 6)
    target = jnp.ones(6)
    report = verify.check_gradients(
        squared_error,
        squared_error_derivative,
        x,
        target,
        scale=0.5,
        reference=squared_error_reference,
    )
    assert report.passed, str(report)
    assert report.name == "squared_error"
    assert "scale=0.5" in report.options
    without_reference = verify.check_gradients(
        squared_error, squared_error_derivative, x, target, scale=0.5
    )
    pairs = {row.pair for row in without_reference.rows}
    assert verify.CLOSED_VS_REFERENCE not in pairs and verify.GRAD_VS_REFERENCE not in pairs
    assert without_reference.passed


def test_linear_cross_entropy_checks_every_argument():
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)
    weight = jnp.asarray(rng.standard_normal((7, 4)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(7), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 7, (6,)))
    report = verify.check_gradients(
        jaxce.linear_cross_entropy,
        derivatives.linear_cross_entropy,
        hidden,
        weight,
        labels,
        bias=bias,
        softcap=2.0,
    )
    assert report.passed, str(report)
    assert {row.argument for row in report.rows} >= {"hidden", "weight", "bias"}


def test_report_serializes():
    logits, labels = _logits_and_labels()
    report = verify.check_gradients(
        jaxce.softmax_cross_entropy_with_integer_labels,
        derivatives.softmax_cross_entropy_with_integer_labels,
        logits,
        labels,
    )
    data = json.loads(json.dumps(report.to_dict()))
    assert data["passed"] is True
    assert data["name"] == "softmax_cross_entropy_with_integer_labels"
    assert all(
        {"pair", "max_abs", "max_rel", "tolerance", "passed"} <= set(r) for r in data["rows"]
    )
    text = str(report)
    assert text.startswith("softmax_cross_entropy_with_integer_labels(")
    assert "closed form vs finite differences" in text


def test_infinite_errors_serialize_as_strict_json():
    row = verify.Comparison("closed form vs jax.grad", "logits", np.inf, np.nan, 1e-6)
    assert json.loads(json.dumps(row.to_dict(), allow_nan=False))["max_abs"] == "inf"
    assert not row.passed


def test_nan_in_one_gradient_only_is_an_infinite_error():
    assert verify._errors(np.array([1.0, np.nan]), np.array([1.0, 2.0])) == (np.inf, np.inf)
    assert verify._errors(np.array([1.0, np.nan]), np.array([1.0, np.nan])) == (0.0, 0.0)


def test_command_line_json_and_exit_code(capsys):
    code = verify.main(["--loss", "sigmoid_focal_loss", "--dtype", "float32", "--json"])
    output = json.loads(capsys.readouterr().out)
    assert code == 0
    assert output["passed"] is True
    assert {r["name"] for r in output["reports"]} == {"sigmoid_focal_loss"}


def _double_binary_cross_entropy_derivative(monkeypatch):
    original = derivatives.binary_cross_entropy
    monkeypatch.setattr(derivatives, "binary_cross_entropy", lambda *a, **k: 2 * original(*a, **k))


def test_command_line_table_and_failure(capsys, monkeypatch):
    _double_binary_cross_entropy_derivative(monkeypatch)
    code = verify.main(["--loss", "binary_cross_entropy", "--dtype", "float64"])
    output = capsys.readouterr().out
    assert code == 1
    assert "binary_cross_entropy" in output.splitlines()[2]
    assert "FAIL" in output


@pytest.mark.parametrize("broken", [False, True], ids=["passing", "failing"])
def test_command_line_json_passed_agrees_with_exit_code(capsys, monkeypatch, broken):
    if broken:
        _double_binary_cross_entropy_derivative(monkeypatch)
    code = verify.main(["--loss", "binary_cross_entropy", "--dtype", "float64", "--json"])
    output = json.loads(capsys.readouterr().out)
    assert code == (1 if broken else 0)
    assert output["passed"] is (code == 0)
    assert output["passed"] is all(r["passed"] for r in output["reports"])


def test_command_line_nothing_run_is_not_a_pass(capsys, monkeypatch):
    # No report at all must not read as success, in the table or in JSON.
    monkeypatch.setattr(verify, "run_all", lambda *a, **k: [])
    assert verify.main(["--json"]) == 1
    assert json.loads(capsys.readouterr().out) == {"passed": False, "reports": []}
    assert verify.main([]) == 1
    assert "0/0 passed" in capsys.readouterr().out


@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["table", "json"])
def test_command_line_unknown_loss_lists_valid_names(capsys, json_flag):
    with pytest.raises(SystemExit) as exit_info:
        verify.main(["--loss", "softmax_cross_entropy_with_int_labels", *json_flag])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "invalid choice: 'softmax_cross_entropy_with_int_labels'" in captured.err
    for name in verify.loss_names():
        assert f"'{name}'" in captured.err


def test_command_line_unknown_loss_through_python_dash_m():
    result = subprocess.run(
        [sys.executable, "-m", "jaxce", "verify", "--loss", "typo", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert "--loss: invalid choice: 'typo'" in result.stderr
    assert "'softmax_cross_entropy_with_integer_labels'" in result.stderr


def test_loss_names_cover_every_case_and_exist():
    names = verify.loss_names()
    assert len(names) == len(set(names))
    assert set(names) == {case.name for case in verify._cases()}
    for name in names:
        assert callable(getattr(jaxce, name)) and callable(getattr(derivatives, name))
    with pytest.raises(ValueError, match="typo"):
        verify.run_all(["float32"], ["typo"])
    assert verify.format_table([]).startswith("loss")


def test_narrow_table_groups_by_loss_with_a_legend_and_wide_has_every_pair(capsys):
    code = verify.main(["--loss", "softmax_cross_entropy", "--dtype", "float64"])
    output = capsys.readouterr().out
    assert code == 0
    table = output.split("\n\n")[0].splitlines()
    assert table[0].split() == ["loss", "/", "options", "dtype", "autodiff", "finite", "diff",
                                "verdict"]  # fmt: skip
    assert table[2] == "softmax_cross_entropy"
    assert all(line.startswith("  ") and line.endswith("  ok") for line in table[3:])
    assert max(len(line) for line in table) < 100
    assert "autodiff     the worst of" in output and "float64 1e-12" in output
    verify.main(["--loss", "softmax_cross_entropy", "--dtype", "float64", "--wide"])
    wide = capsys.readouterr().out
    assert all(short in wide.splitlines()[0] for short in verify.SHORT_PAIR_NAMES.values())
    assert "cf~fd     the closed form against central finite differences" in wide


def test_progress_reports_every_check_in_order():
    seen = []
    reports = verify.run_all(["float32"], ["sigmoid_focal_loss"], on_report=seen.append)
    assert seen == reports and len(reports) == verify._count_checks(
        ["float32"], ["sigmoid_focal_loss"]
    )


def _python_blocks(path: pathlib.Path) -> list[str]:
    """The Python blocks of a Markdown file (```python fences) or an reST file (code-block)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    markdown = path.suffix == ".md"
    opening = "```python" if markdown else ".. code-block:: python"
    blocks = []
    for start in (i + 1 for i, line in enumerate(lines) if line.strip() == opening):
        end = start
        while end < len(lines) and (
            not lines[end].startswith("```")
            if markdown
            else (not lines[end].strip() or lines[end].startswith(" "))
        ):
            end += 1
        blocks.append(textwrap.dedent("\n".join(lines[start:end])).strip())
    return blocks


def test_the_documented_python_entry_point_runs(capsys):
    # `jaxce.verify` is a module, so `jaxce.verify()` fails; README.md and the API page show
    # `run_all` instead, in one snippet that must run as written.
    root = pathlib.Path(__file__).resolve().parents[1]
    snippets = {
        page: [block for block in _python_blocks(root / page) if "verify.run_all(" in block]
        for page in ("README.md", "docs/api.rst")
    }
    assert snippets["README.md"] == snippets["docs/api.rst"] and len(snippets["README.md"]) == 1
    exec(compile(snippets["README.md"][0], "README.md", "exec"), {})
    table = capsys.readouterr().out.splitlines()
    assert table[2] == "binary_cross_entropy" and all(line.endswith("ok") for line in table[3:])
    with pytest.raises(TypeError, match="'module' object is not callable"):
        jaxce.verify()


def test_stated_tolerances_are_the_ones_applied():
    """README and the module docstring state 1e-12 (1e-7 against finite differences) in
    float64, 1e-6 in float32, 1e-2 in bfloat16, 2e-3 in float16."""
    assert verify.TOLERANCES == {
        "float64": verify.Tolerance(analytic=1e-12, finite_differences=1e-7),
        "float32": verify.Tolerance(analytic=1e-6, finite_differences=1e-6),
        "bfloat16": verify.Tolerance(analytic=1e-2, finite_differences=1e-2),
        "float16": verify.Tolerance(analytic=2e-3, finite_differences=2e-3),
    }


# A closed form off by a factor: 0.05% is 500 times float32's tolerance and must fail; 1e-7,
# within float32 rounding (u = 6e-8, the stated 1e-6 is ~16 u), must pass.
SCALED_CLOSED_FORMS = [
    pytest.param(1.0005, False, id="0.05%-off-fails"),
    pytest.param(1 + 1e-7, True, id="1e-7-off-passes"),
]


@pytest.mark.parametrize(("factor", "passes"), SCALED_CLOSED_FORMS)
@pytest.mark.parametrize(
    "loss", ["softmax_cross_entropy_with_integer_labels", "sigmoid_binary_cross_entropy"]
)
def test_float32_tolerance_catches_a_closed_form_slightly_off(monkeypatch, loss, factor, passes):
    true_derivative = getattr(derivatives, loss)

    def scaled(*args, **kwargs):
        gradient = true_derivative(*args, **kwargs)
        return (gradient.astype(jnp.float64) * factor).astype(gradient.dtype)

    monkeypatch.setattr(derivatives, loss, scaled)
    (report,) = verify.run_all(["float32"], [loss])[:1]
    assert report.dtype == "float32"
    assert report.passed is passes, str(report)
    if not passes:
        failed = {row.pair for row in report.rows if not row.passed}
        assert verify.CLOSED_VS_GRAD in failed and verify.CLOSED_VS_REFERENCE in failed
        # jax.grad and the reference still agree: the closed form is what is wrong.
        assert report.worst(verify.GRAD_VS_REFERENCE).passed
