"""Executes the notebooks top to bottom in a fresh kernel, and says when committed outputs are stale.

    python notebooks/execute.py [NAME ...]      (or `make notebooks`)

re-executes every notebook (or those whose file name contains a NAME) in place, with this
interpreter as the kernel; commit the result. ``tests/repository/test_notebooks.py`` executes
them the same way and fails when the committed outputs differ from fresh ones (:func:`outputs`).

What may differ between two executions, and so is not compared: images (the PNG bytes) and,
in cells tagged ``timing`` in their metadata, the numbers (times vary from run to run). All
other text output must be the same, digit for digit: a notebook whose code or library changed
without re-executing it fails the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import nbclient
import nbformat

NOTEBOOKS = pathlib.Path(__file__).resolve().parent
CELL_TIMEOUT_S = 120
KERNEL_NAME = "jaxce-notebooks"
TIMING_TAG = "timing"
# A number with the spaces that pad it to a column (its width varies with its value).
NUMBER = re.compile(r" *[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@contextlib.contextmanager
def current_interpreter_kernel() -> Iterator[str]:
    """A kernel spec that runs this interpreter, ahead of any installed ``python3`` spec."""
    saved = {"JUPYTER_PATH": os.environ.get("JUPYTER_PATH")}
    with tempfile.TemporaryDirectory() as directory:
        spec = pathlib.Path(directory) / "kernels" / KERNEL_NAME
        spec.mkdir(parents=True)
        argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        kernel = {"argv": argv, "display_name": "jaxce notebooks", "language": "python"}
        (spec / "kernel.json").write_text(json.dumps(kernel))
        os.environ["JUPYTER_PATH"] = directory
        try:
            yield KERNEL_NAME
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def execute(path: pathlib.Path, kernel_name: str) -> Any:
    """The notebook at ``path`` executed top to bottom in a fresh kernel (not written back).

    A failing cell (an assertion of the notebook's claims) raises ``CellExecutionError``.
    """
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name=kernel_name,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    return notebook


def outputs(notebook: Any) -> list[list[str]]:
    """Per code cell, its outputs as comparable text (see the module docstring)."""
    cells = []
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        timing = TIMING_TAG in cell.get("metadata", {}).get("tags", [])
        texts: list[str] = []
        previous_stream = None
        for output in cell.outputs:
            if output.output_type == "stream":
                # Where a stream is cut into outputs depends on when the kernel flushed.
                text = f"{output.name}: {output.text}"
                if previous_stream == output.name:
                    texts[-1] += output.text
                else:
                    texts.append(text)
                previous_stream = output.name
                continue
            previous_stream = None
            data = output.get("data", {})
            kinds = ", ".join(sorted(data))
            texts.append(f"{output.output_type} [{kinds}]: {data.get('text/plain', '')}")
        cells.append([NUMBER.sub(" #", text) if timing else text for text in texts])
    return cells


def main(argv: list[str]) -> int:
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    if argv:
        paths = [path for path in paths if any(name in path.name for name in argv)]
    with current_interpreter_kernel() as kernel_name:
        for path in paths:
            print(f"executing {path.name} ...", flush=True)
            nbformat.write(execute(path, kernel_name), path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
