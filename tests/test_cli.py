"""The ``jaxce`` command: sub-commands, help, hints for missing extras, progress display."""

from __future__ import annotations

import io
import json
import pathlib
import subprocess
import sys

import pytest

from jaxce import __main__ as cli
from jaxce import _optional, _progress


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
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert "jaxce bench needs optax, which is not installed: pip install 'jaxce[cli]'" in (
        captured.err
    )
    with pytest.raises(_optional.MissingExtra, match=r"jaxce\[demo\]"):
        _optional.import_extra("optax", extra="demo", needed_by="this")


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
