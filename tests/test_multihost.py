"""Many hosts: two JAX processes (gloo CPU collectives) train like one process."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from helpers import rounding_bound

from examples import two_process_training as example
from jaxce import _references

EXAMPLE = pathlib.Path(__file__).parents[1] / "examples" / "two_process_training.py"


def _initial_loss_in_float64() -> float:
    """The example's loss at its initial parameters, from the plain reference in float64."""
    params, features, labels = example.problem()
    with jax.enable_x64(True):
        hidden = jnp.tanh(np.float64(features) @ np.float64(params["proj"]))
        loss = _references.linear_cross_entropy(
            hidden, np.float64(params["embed"]), labels, bias=np.float64(params["bias"]),
            reduction="mean", **example.OPTIONS,
        )  # fmt: skip
    return float(loss)


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
    rows = [line.split() for line in output.splitlines() if line[:4].strip().isdigit()]
    steps = np.array([[float(v) for v in row[1:]] for row in rows])
    assert steps.shape == (example.STEPS, 3), output
    process_0, process_1, one_process = steps.T
    # The numbers, not the example's verdict. Both processes compute the same global
    # loss (the vocabulary-parallel pieces are all-reduced): equal as printed.
    np.testing.assert_array_equal(process_0, process_1)
    # Against one process: float32 losses of the same model summed in another order
    # (over 2 x 2 shards instead of one loop), after the same 4 Adam steps. A loss is a
    # 64-class log-sum-exp of 16-term products, averaged over 14 tokens: about
    # 64 + 16 + 14 + 16 = 110 roundings, 2^-24 each of the loss (~4), on each side;
    # Adam's normalised steps do not amplify a relative gradient error. The table
    # prints 7 decimals: 5e-8 each.
    tolerance = 2 * rounding_bound(jnp.float32, 110) * np.max(np.abs(one_process)) + 1e-7
    np.testing.assert_allclose(process_0, one_process, rtol=0, atol=tolerance)
    # The first loss, before any update, is the float64 reference's at the initial
    # parameters (inputs and parameters are float32 values, exact in float64).
    first_tolerance = rounding_bound(jnp.float32, 110) * abs(one_process[0]) + 5e-8
    assert abs(one_process[0] - _initial_loss_in_float64()) <= first_tolerance
    # Training moved: the last loss is below the first, in every column.
    assert np.all(steps[-1] < steps[0])
