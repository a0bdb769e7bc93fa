"""The notebooks execute top to bottom (each ends in assertions), use the public API only, and
are committed executed, with outputs a fresh execution reproduces (``make notebooks`` refreshes
them)."""

from __future__ import annotations

import difflib
import pathlib
import re

import nbformat
import pytest

from notebooks import execute

NOTEBOOKS = sorted(execute.NOTEBOOKS.glob("*.ipynb"))


def test_all_six_notebooks_are_there() -> None:
    assert [path.name[:3] for path in NOTEBOOKS] == ["01_", "02_", "03_", "04_", "05_", "06_"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_committed_notebook_is_executed_without_errors(path: pathlib.Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, "no code cells"
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), (
        "commit the notebook executed top to bottom in a fresh kernel (make notebooks)"
    )
    for cell in code:
        assert all(output.output_type != "error" for output in cell.outputs), cell.source[:80]
    assert "all claims hold" in "".join(output.get("text", "") for output in code[-1].outputs), (
        "the last cell must assert the notebook's claims"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_uses_the_public_api_only(path: pathlib.Path) -> None:
    source = "\n".join(
        cell.source for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"
    )
    assert "sys.path" not in source
    assert not re.search(
        r"\bjaxce\._(?!_)|from jaxce import _(?!_)|^from benchmarks|^import benchmarks",
        source,
        re.M,
    )


def test_outputs_compare_text_and_mask_numbers_of_timing_cells_only() -> None:
    def notebook(text: str, tags: list[str]) -> nbformat.NotebookNode:
        cell = nbformat.v4.new_code_cell("print()", metadata={"tags": tags})
        # A stream split in two by an early flush reads the same as one.
        cell.outputs = [
            nbformat.v4.new_output("stream", name="stdout", text=text[:3]),
            nbformat.v4.new_output("stream", name="stdout", text=text[3:]),
            nbformat.v4.new_output(
                "display_data", data={"image/png": text, "text/plain": "<Figure>"}
            ),
        ]
        return nbformat.v4.new_notebook(cells=[cell])

    assert execute.outputs(notebook("loss 0.25, 3.1 ms", [])) == [
        ["stdout: loss 0.25, 3.1 ms", "display_data [image/png, text/plain]: <Figure>"]
    ]
    assert execute.outputs(notebook("loss 0.25", [])) != execute.outputs(notebook("loss 0.26", []))
    timing = ["timing"]
    assert execute.outputs(notebook("9.5 ms, 1e-3", timing)) == execute.outputs(
        notebook("12 ms, 2.5e-07", timing)
    )
    assert execute.outputs(notebook("jaxce 9 ms", timing)) != execute.outputs(
        notebook("optax 9 ms", timing)
    )


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_executes_its_claims_hold_and_its_outputs_are_current(path: pathlib.Path) -> None:
    with execute.current_interpreter_kernel() as kernel_name:
        # A failing assertion raises CellExecutionError with the cell and the traceback.
        fresh = execute.execute(path, kernel_name)
    committed = execute.outputs(nbformat.read(path, as_version=4))
    for index, (old, new) in enumerate(zip(committed, execute.outputs(fresh), strict=True)):
        difference = "\n".join(
            difflib.unified_diff(
                "\n".join(old).splitlines(), "\n".join(new).splitlines(), lineterm="", n=1
            )
        )
        assert old == new, (
            f"code cell {index + 1}: committed outputs are stale (run `make notebooks` and "
            f"commit; tag a cell 'timing' if its numbers vary from run to run):\n{difference}"
        )
