"""``import jaxce``: the losses only, the tooling on first use, and a version from a checkout.

Each test runs a fresh interpreter: what ``import jaxce`` loads, and what a missing
distribution does, can only be seen before anything else has been imported.
"""

from __future__ import annotations

import ast
import os
import pathlib
import shutil
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 120
# The command line's tooling: `import jaxce` must load none of it (argparse and tqdm cost
# import time; optax is an extra, so `import jaxce` must work without it).
TOOLING = ("jaxce.bench", "jaxce.verify", "jaxce._progress", "argparse", "tqdm", "optax")


def _python(code: str, *, path: pathlib.Path = ROOT) -> str:
    """Runs ``code`` in a fresh interpreter whose ``jaxce`` is the one under ``path``."""
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        # `python -c` looks in the working directory first, then PYTHONPATH.
        cwd=path,
        env={**os.environ, "PYTHONPATH": str(path)},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _imported_modules(importtime_log: str) -> set[str]:
    """The modules named in ``python -X importtime``'s log (``import time: us | us | name``)."""
    return {
        line.split("|")[-1].strip()
        for line in importtime_log.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }


def _modules_imported_by(statement: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", statement],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return _imported_modules(result.stderr)


def test_import_jaxce_loads_no_tooling():
    """What `import jaxce` adds to `import jax` holds no tooling.

    JAX itself may import `argparse` (through `etils.epath`, when flax's
    dependencies are installed): only what jaxce brings in is jaxce's.
    """
    imported = _modules_imported_by("import jaxce")
    assert "jaxce" in imported and "jaxce.derivatives" in imported
    added = imported - _modules_imported_by("import jax")
    loaded = sorted(
        name
        for name in added
        if any(name == tool or name.startswith(f"{tool}.") for tool in TOOLING)
    )
    assert not loaded, f"`import jaxce` loads tooling: {loaded}"


def test_tooling_modules_load_on_first_use_and_are_listed():
    output = _python(
        "import sys, jaxce\n"
        "listed = {'bench', 'verify'} <= set(dir(jaxce))\n"
        "before = [m for m in ('jaxce.bench', 'jaxce.verify') if m in sys.modules]\n"
        "from jaxce import verify\n"
        "print(listed, before, callable(jaxce.verify.run_all), callable(jaxce.bench.compare),\n"
        "      verify is jaxce.verify, sorted(jaxce.__all__) == sorted(set(jaxce.__all__)))\n"
        "try:\n"
        "    jaxce.not_a_name\n"
        "except AttributeError as error:\n"
        "    print(error)\n"
    )
    assert output.splitlines() == [
        "True [] True True True True",
        "module 'jaxce' has no attribute 'not_a_name'",
    ]


def test_star_import_resolves_every_public_name():
    output = _python("from jaxce import *\nprint(bench.__name__, verify.__name__)")
    assert output.split() == ["jaxce.bench", "jaxce.verify"]


def _imports(module: pathlib.Path) -> set[str]:
    """The modules ``module`` imports, at any depth (``from jaxce import x`` as ``jaxce.x``)."""
    names = set()
    for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("command", ["bench", "verify"])
def test_command_modules_do_not_import_the_command_line(command):
    # Imports run one way: __main__ imports the commands, each command registers itself.
    imported = _imports(ROOT / "jaxce" / f"{command}.py")
    assert "jaxce.__main__" not in imported
    assert f"jaxce.{command}" in _imports(ROOT / "jaxce" / "__main__.py")
    output = _python(
        f"import sys\nfrom jaxce import {command}\n"
        f"print(hasattr({command}, 'register'), 'jaxce.__main__' in sys.modules)"
    )
    assert output.split() == ["True", "False"]


# Runs in the child: `importlib.metadata` finds no `jaxce` distribution, as when the checkout
# is on PYTHONPATH and jaxce is not installed, then prints the version and where jaxce is from.
NOT_INSTALLED = """
import importlib.metadata as metadata
installed = metadata.version
def version(name):
    if name == "jaxce":
        raise metadata.PackageNotFoundError(name)
    return installed(name)
metadata.version = version
import jaxce
print(jaxce.__version__)
print(jaxce.__file__)
"""


def _copy_of_the_package(directory: pathlib.Path) -> pathlib.Path:
    shutil.copytree(
        ROOT / "jaxce", directory / "jaxce", ignore=shutil.ignore_patterns("__pycache__")
    )
    return directory / "jaxce" / "__init__.py"


def test_version_of_a_checkout_that_is_not_installed_is_pyprojects(tmp_path):
    package = _copy_of_the_package(tmp_path)
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "jaxce"\nversion = "9.8.7"\n')
    version, location = _python(NOT_INSTALLED, path=tmp_path).split()
    assert location == str(package)
    assert version == "9.8.7"


def test_version_of_this_checkout_when_not_installed():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    version, location = _python(NOT_INSTALLED).split()
    assert location == str(ROOT / "jaxce" / "__init__.py")
    assert version == pyproject["project"]["version"]


@pytest.mark.parametrize(
    "pyproject",
    [None, '[project]\nname = "another"\nversion = "2.0"\n', "not toml ["],
    ids=["no-pyproject", "another-project", "unreadable"],
)
def test_version_is_unknown_without_a_jaxce_pyproject(tmp_path, pyproject):
    _copy_of_the_package(tmp_path)
    if pyproject is not None:
        (tmp_path / "pyproject.toml").write_text(pyproject)
    version, _ = _python(NOT_INSTALLED, path=tmp_path).split()
    assert version == "0+unknown"
