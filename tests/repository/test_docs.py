"""The documentation site builds without a warning and has a page for every public name.

The build runs on a copy of docs/ (the notebooks link resolved into files), so it writes
nothing into the repository. The notebooks are rendered from their committed outputs;
docs/conf.py turns execution off.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import types
import zlib

import myst_nb  # noqa: F401  (the docs extra, in the test extra: missing fails, never skips)
import pytest
import sphinx  # noqa: F401  (the docs extra, as above)

import jaxce

ROOT = pathlib.Path(__file__).resolve().parents[2]
TIMEOUT_S = 300


def public_names() -> list[str]:
    """``jaxce.__all__``, which is exactly what ``import jaxce`` shows.

    What it shows is ``dir(jaxce)``, not ``vars(jaxce)``: the tooling modules (``bench``,
    ``verify``) are listed there before their first use loads them.
    """
    shown = sorted(
        name
        for name in dir(jaxce)
        if not name.startswith("_")
        and (
            value.__name__.startswith("jaxce.")
            if isinstance(value := getattr(jaxce, name), types.ModuleType)
            else getattr(value, "__module__", "").startswith("jaxce")
        )
    )
    assert sorted(jaxce.__all__) == shown, (jaxce.__all__, shown)
    return shown


def module_members(module: types.ModuleType) -> list[str]:
    """A public module's ``__all__``, or the functions and classes it defines."""
    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names)
    return [
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and callable(value)
        and getattr(value, "__module__", None) == module.__name__
    ]


def inventory(objects_inv: pathlib.Path) -> dict[str, str]:
    """``{object name: page}`` from Sphinx's ``objects.inv`` (4 header lines, then zlib)."""
    data = objects_inv.read_bytes()
    body = data.split(b"\n", 4)[4]
    entries = {}
    for line in zlib.decompress(body).decode().splitlines():
        name, _domain_role, _priority, uri = line.split(" ", 4)[:4]
        entries[name] = uri.split("#")[0]
    return entries


@pytest.fixture(scope="module")
def built_site(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    work = tmp_path_factory.mktemp("docs")
    source = work / "source"
    # symlinks=False copies what docs/notebooks points at, not the link.
    shutil.copytree(
        ROOT / "docs",
        source,
        ignore=shutil.ignore_patterns("_build", "_autosummary", "jupyter_execute"),
    )
    html = work / "html"
    # The options of `make docs`: warnings are errors, all of them reported.
    options = ["-W", "--keep-going", "-q", "-b", "html", "-d", str(work / "doctrees")]
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", *options, str(source), str(html)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=work,
    )
    if result.returncode != 0:
        pytest.fail(
            "`make docs` would fail (warnings are errors):\n"
            f"{result.stderr[-8000:]}{result.stdout[-2000:]}",
            pytrace=False,
        )
    return html


def test_builds_without_warnings(built_site: pathlib.Path) -> None:
    assert (built_site / "index.html").exists()
    for page in ("semantics", "api", "command", "flax", "notebooks"):
        assert (built_site / f"{page}.html").exists(), page


def test_every_public_name_has_its_own_page(built_site: pathlib.Path) -> None:
    objects = inventory(built_site / "objects.inv")
    missing = [
        name
        for name in public_names()
        if objects.get(f"jaxce.{name}") != f"_autosummary/jaxce.{name}.html"
    ]
    assert not missing, (
        f"public names without an API page: {missing}; add them to docs/api.rst's autosummary"
    )


def test_every_member_of_a_public_module_is_documented(built_site: pathlib.Path) -> None:
    objects = inventory(built_site / "objects.inv")
    modules = [
        getattr(jaxce, name)
        for name in public_names()
        if isinstance(getattr(jaxce, name), types.ModuleType)
    ]
    assert {m.__name__ for m in modules} >= {
        "jaxce.bench",
        "jaxce.derivatives",
        "jaxce.sharded",
        "jaxce.verify",
    }
    missing = [
        f"{module.__name__}.{name}"
        for module in modules
        for name in module_members(module)
        if f"{module.__name__}.{name}" not in objects
    ]
    assert not missing, f"documented nowhere: {missing}"


def test_every_notebook_is_rendered_with_its_outputs(built_site: pathlib.Path) -> None:
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks
    for notebook in notebooks:
        page = built_site / "notebooks" / f"{notebook.stem}.html"
        assert page.exists(), f"{notebook.name} is not rendered; add it to docs/notebooks.md"
        # The committed outputs are on the page: every notebook prints or plots something.
        assert 'class="cell_output' in page.read_text(encoding="utf-8"), notebook.name
