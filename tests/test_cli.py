"""The ``jaxce`` command: sub-commands, help, hints for missing extras, progress display."""

from __future__ import annotations

import argparse
import io
import json
import pathlib
import subprocess
import sys

import pytest

from jaxce import __main__ as cli
from jaxce import _optional, _progress, bench, verify


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_no_command_and_unknown_command_exit_2_with_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2
    assert "required: COMMAND" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["verfiy"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'verfiy' (choose from 'verify', 'bench')" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["verify", "--loss", "typo"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("command", [[], ["verify"], ["bench"]], ids=["top", "verify", "bench"])
def test_help_has_a_description_and_examples(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: ")
    assert "examples:\n  jaxce " in text
    assert len(text.splitlines()) > 15


@pytest.mark.parametrize("module", [verify, bench], ids=["verify", "bench"])
def test_each_command_module_registers_its_own_parser(module):
    # The command's parser, help and examples come from its own module; `jaxce` only calls
    # `register`.
    name = module.__name__.removeprefix("jaxce.")
    top = argparse.ArgumentParser(prog="top")
    commands = top.add_subparsers(dest="command")
    parser = module.register(commands)
    assert parser.prog == f"top {name}"
    assert (parser.description, parser.epilog) == (module.DESCRIPTION, module.EPILOG)
    listed = [line.split() for line in top.format_help().splitlines()]
    assert any(words[:1] == [name] and len(words) > 2 for words in listed), "no summary"
    options = top.parse_args([name])
    assert options.command == name and callable(options.run)


def test_version(capsys):
    import jaxce

    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.split()[-1] == jaxce.__version__


def test_missing_extra_is_one_line_naming_the_extra(capsys, monkeypatch):
    # `import optax` fails as it would where the `cli` extra is not installed.
    monkeypatch.setitem(sys.modules, "optax", None)
    assert cli.main(["bench", "--shape", "8", "3", "--runs", "1", "--min-seconds", "0"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    # One line, said once (not "jaxce bench: jaxce bench needs ..."), with the extra that
    # pyproject.toml defines and README.md documents.
    assert captured.err == (
        "jaxce bench needs optax, which is not installed: pip install 'jaxce[cli]'\n"
    )
    with pytest.raises(_optional.MissingExtra, match=r"jaxce\[demo\]"):
        _optional.import_extra("optax", extra="demo", needed_by="this")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--shape", "0", "10"], "argument --shape: dimensions must be positive integers, got 0"),
        (["--shape", "4096", "-1"], "argument --shape: dimensions must be positive integers, got -1"),
        (["--shape", "4096", "1e3"], "argument --shape: dimensions must be positive integers, got 1e3"),
        (["--runs", "0"], "argument --runs: must be a positive integer, got 0"),
        (["--warmup", "-1"], "argument --warmup: must be a non-negative integer, got -1"),
        (["--min-seconds", "-1"],
         "argument --min-seconds: must be a finite, non-negative number of seconds, got -1"),
        (["--min-seconds", "nan"],
         "argument --min-seconds: must be a finite, non-negative number of seconds, got nan"),
        (["--loss", "linear_cross_entropy", "--shape", "4096", "1000"],
         "argument --shape: --loss linear_cross_entropy takes three sizes N D V (hidden [N, D], "
         "weight [V, D], labels [N]), got 2: 4096 1000"),
        (["--shape", "64", "32", "128", "--loss", "linear_cross_entropy", "--dtype", "float64"],
         "argument --dtype: float64 needs JAX_ENABLE_X64=1"),
    ],
    ids=["zero-dimension", "negative-dimension", "float-dimension", "zero-runs",
         "negative-warmup", "negative-min-seconds", "nan-min-seconds", "linear-two-dimensions",
         "float64-without-x64"],
)  # fmt: skip
def test_bad_bench_arguments_exit_2_naming_the_argument(capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", *arguments])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("usage: ")
    assert captured.err.splitlines()[-1].endswith(f"bench: error: {message}")


def test_bad_bench_arguments_through_python_dash_m_have_no_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "jaxce", "bench", "--shape", "4096", "-1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        "python -m jaxce bench: error: argument --shape: dimensions must be positive integers, "
        "got -1"
    )


def test_console_script_runs_verify_with_json():
    script = pathlib.Path(sys.executable).parent / "jaxce"
    assert script.exists(), "pip install -e . installs the `jaxce` console script"
    result = subprocess.run(
        [str(script), "verify", "--loss", "binary_cross_entropy", "--dtype", "float64", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert output["passed"] is True and len(output["reports"]) == 2
    # Not a terminal: no progress display on stderr either.
    assert result.stderr == ""


@pytest.mark.parametrize("with_tqdm", [True, False], ids=["tqdm", "plain-line"])
def test_progress_shows_on_a_terminal_only(monkeypatch, with_tqdm):
    if not with_tqdm:
        monkeypatch.setitem(sys.modules, "tqdm", None)
    terminal = Terminal()
    with _progress.Progress(3, "verify", stream=terminal) as progress:
        for label in ("a", "b", "c"):
            progress.advance(label)
    drawn = terminal.getvalue()
    assert "verify" in drawn and "/3" in drawn and (with_tqdm or "[3/3] c" in drawn)
    pipe = io.StringIO()
    with _progress.Progress(3, "verify", stream=pipe) as progress:
        progress.advance("a")
    assert pipe.getvalue() == ""
