"""The notebooks execute top to bottom (each ends in assertions) and are committed executed."""

from __future__ import annotations

import json
import pathlib
import sys

import nbclient
import nbformat
import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 120
KERNEL_NAME = "jaxce-tests"


@pytest.fixture
def current_interpreter_kernel(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernel spec that runs this interpreter, ahead of any installed ``python3`` spec."""
    spec = tmp_path / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "jaxce tests", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return KERNEL_NAME


def test_all_five_notebooks_are_there() -> None:
    assert [path.name[:3] for path in NOTEBOOKS] == ["01_", "02_", "03_", "04_", "05_"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_committed_notebook_is_executed_without_errors(path: pathlib.Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, "no code cells"
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), (
        "commit the notebook executed top to bottom in a fresh kernel"
    )
    for cell in code:
        assert all(output.output_type != "error" for output in cell.outputs), cell.source[:80]
    assert "all claims hold" in "".join(output.get("text", "") for output in code[-1].outputs), (
        "the last cell must assert the notebook's claims"
    )


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_executes_and_its_claims_hold(
    path: pathlib.Path, current_interpreter_kernel: str
) -> None:
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name=current_interpreter_kernel,
        resources={"metadata": {"path": str(path.parent)}},
    )
    # A failing assertion raises CellExecutionError with the cell and the traceback.
    client.execute()
