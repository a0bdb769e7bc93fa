"""What `pip install .` gets: one version, the license, dependencies the library imports."""

from __future__ import annotations

import ast
import importlib.metadata
import pathlib
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

import jaxce

REPO = pathlib.Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_version_has_one_source():
    assert jaxce.__version__ == PYPROJECT["project"]["version"]
    assert jaxce.__version__ == importlib.metadata.version("jaxce")
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert f"## {jaxce.__version__}" in changelog


def _imported_top_level_modules(package: pathlib.Path) -> set[str]:
    """Top-level modules imported anywhere in the package (lazily or not), stdlib excluded."""
    modules = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - {"jaxce"}


def test_runtime_dependencies_are_what_the_library_imports():
    imported = _imported_top_level_modules(REPO / "jaxce")
    # Imported only by a command, through jaxce._optional.import_extra, or guarded (jax_cce:
    # `jaxce bench --loss linear_cross_entropy` adds it as a competitor where installed).
    optional = {"tqdm", "jax_cce"}
    required = {
        requirement.split(">")[0].split("=")[0].split("[")[0].strip()
        for requirement in PYPROJECT["project"]["dependencies"]
    }
    # jaxlib comes with jax; importing it directly would be a dependency on it too.
    assert imported - optional == required, (imported, required)
    cli_extra = " ".join(PYPROJECT["project"]["optional-dependencies"]["cli"])
    assert "tqdm" in cli_extra and "optax" in cli_extra
    assert "sklearn" not in imported and "optax" not in imported


@pytest.mark.slow
def test_wheel_holds_the_library_the_license_and_the_command(tmp_path):
    # Built from a copy: setuptools reuses (and would ship) whatever an earlier build left in
    # the checkout's build/ folder.
    source = tmp_path / "source"
    shutil.copytree(REPO / "jaxce", source / "jaxce", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(source)],
        check=True,
        timeout=300,
        capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("jaxce-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "jaxce/py.typed" in names and "jaxce/bench.py" in names
    assert not any(name.startswith(("tests/", "benchmarks/", "examples/")) for name in names)
    assert not any("_demo" in name or "_training" in name for name in names)
    dist_info = f"jaxce-{jaxce.__version__}.dist-info"
    license_text = zipfile.ZipFile(wheel).read(f"{dist_info}/licenses/LICENSE").decode()
    assert "Apache License" in license_text and "END OF TERMS AND CONDITIONS" in license_text
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    assert "jaxce = jaxce.__main__:main" in entry_points
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    unconditional = [line for line in requires if "extra ==" not in line]
    assert sorted(unconditional) == ["Requires-Dist: jax>=0.10", "Requires-Dist: numpy>=1.26"]
    assert "Classifier: Typing :: Typed" in metadata


def test_project_urls_name_one_repository():
    urls = PYPROJECT["project"]["urls"]
    assert set(urls) == {"Homepage", "Repository", "Documentation", "Changelog", "Issues"}
    repository = urls["Repository"]
    assert all(url.startswith(repository + "/") or url == repository for url in urls.values())
    assert urls["Changelog"].endswith("/CHANGELOG.md") and (REPO / "CHANGELOG.md").exists()
    assert urls["Documentation"].endswith("/docs") and (REPO / "docs" / "index.md").exists()
