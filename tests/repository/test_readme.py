"""README.md's Python blocks run as written, in order, in one fresh interpreter.

The blocks share one namespace, like a notebook's cells. A block that is not meant to run
(a shell command, printed output) must be fenced as something other than Python.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
PYTHON_LANGUAGES = {"python", "py", "python3"}
TIMEOUT_S = 300
# The blocks as a user runs them (this machine's devices), and on 8 CPU devices, the setting
# of the README's sharding blocks.
EIGHT_CPU_DEVICES = {
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8",
}

# Runs in the child: executes the blocks in one namespace, compiled under README.md's path
# with its line numbers, so a traceback points at the README line. On an exception it prints
# the failing block's index on the last line of stderr and exits 1.
DRIVER = """
import json, sys, traceback
path, blocks = sys.argv[1], json.load(open(sys.argv[2]))
namespace = {"__name__": "__main__"}
for index, (line, code) in enumerate(blocks, 1):
    try:
        exec(compile("\\n" * (line - 1) + code, path, "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        print(f"README_BLOCK_FAILED {index}", file=sys.stderr)
        sys.exit(1)
"""


def fenced_blocks(text: str) -> list[tuple[str, int, str]]:
    """``(language, first code line (1-based), code)`` of each fenced block, in order."""
    blocks = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        opening = lines[index]
        if opening.startswith("```"):
            language = opening[3:].strip().split(" ")[0].lower()
            end = index + 1
            while end < len(lines) and not lines[end].startswith("```"):
                end += 1
            assert end < len(lines), f"README.md line {index + 1}: fence is never closed"
            blocks.append((language, index + 2, "\n".join(lines[index + 1 : end]) + "\n"))
            index = end
        index += 1
    return blocks


def python_blocks() -> list[tuple[int, str]]:
    blocks = fenced_blocks(README.read_text(encoding="utf-8"))
    return [(line, code) for language, line, code in blocks if language in PYTHON_LANGUAGES]


def test_every_fence_names_its_language() -> None:
    # An unlabelled fence would be neither run nor visibly excluded.
    blocks = fenced_blocks(README.read_text(encoding="utf-8"))
    unlabelled = [line - 1 for language, line, _ in blocks if not language]
    assert not unlabelled, f"README.md fences without a language at lines {unlabelled}"
    assert python_blocks(), "README.md has no ```python block"


@pytest.mark.parametrize(
    "environment", [{}, EIGHT_CPU_DEVICES], ids=["default-devices", "8-cpu-devices"]
)
def test_python_blocks_run_in_order_in_a_fresh_interpreter(
    tmp_path: pathlib.Path, environment: dict[str, str]
) -> None:
    blocks = python_blocks()
    blocks_file = tmp_path / "blocks.json"
    blocks_file.write_text(json.dumps(blocks))
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, str(README), str(blocks_file)],
        cwd=tmp_path,
        env={**os.environ, **environment},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    if result.returncode == 0:
        return
    stderr = result.stderr.rstrip()
    marker = stderr.rsplit("\n", 1)[-1]
    if marker.startswith("README_BLOCK_FAILED "):
        index = int(marker.split()[1])
        line, code = blocks[index - 1]
        where = (
            f"README.md python block {index} of {len(blocks)} (starting at line {line}), "
            f"environment {environment or 'inherited'}"
        )
        first_line = code.splitlines()[0] if code.strip() else ""
        pytest.fail(f"{where} failed; it begins {first_line!r}:\n{stderr[-6000:]}", pytrace=False)
    pytest.fail(
        f"the README.md blocks' interpreter exited with {result.returncode}:\n{stderr[-6000:]}",
        pytrace=False,
    )
