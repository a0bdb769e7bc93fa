"""Many hosts: two JAX processes (gloo CPU collectives) train like one process."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys

EXAMPLE = pathlib.Path(__file__).parents[1] / "examples" / "two_process_training.py"


def test_two_process_training_matches_one_process() -> None:
    # A session of its own: on timeout the whole group (launcher and both
    # workers) is killed, so no process outlives the test.
    launcher = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--timeout", "150"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = launcher.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        output, _ = launcher.communicate()
        raise AssertionError(f"two-process example timed out:\n{output[-4000:]}") from None
    assert launcher.returncode == 0, output[-6000:]
    assert "two processes match one process" in output
    steps = [line.split() for line in output.splitlines() if line[:4].strip().isdigit()]
    assert len(steps) == 5, output
    # Training moved: the last loss is below the first, in every column.
    assert all(float(a) > float(b) for a, b in zip(steps[0][1:], steps[-1][1:], strict=True))
