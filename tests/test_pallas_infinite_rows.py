"""``implementation="pallas"`` on rows of ``-inf`` logits: the XLA path's values and gradients.

A row whose logits are all ``-inf`` has no finite normaliser: its loss is NaN (or inf), on
both paths. What the kernels must not do is differ from the XLA path, in the value or in
the gradient (its NaN pattern included): the forward kernel's online maximum starts at
``-inf`` and the backward kernel divides by the row's total, both places where an all
``-inf`` row is the edge case. (The kernels run in Pallas interpret mode on this CPU.)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REDUCTIONS

import jaxce

# 4500 classes: two blocks of the float32 kernel (4096 classes each), so the online
# maximum and sum pass from an all -inf block to the next.
BATCH, CLASSES = 5, 4500
ALL_MINUS_INF = 1
ALL_MINUS_INF_BUT_ONE = 2  # -inf except one class (in the second block), not the label's
LABEL_ONLY_FINITE_IN_SECOND_BLOCK = 3


def _inputs(dtype: str) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(17)
    logits = rng.normal(size=(BATCH, CLASSES)).astype(np.float32)
    labels = rng.integers(0, CLASSES, size=BATCH)
    logits[ALL_MINUS_INF] = -np.inf
    logits[ALL_MINUS_INF_BUT_ONE] = -np.inf
    logits[ALL_MINUS_INF_BUT_ONE, 4200] = 3.0
    labels[ALL_MINUS_INF_BUT_ONE] = 7
    logits[LABEL_ONLY_FINITE_IN_SECOND_BLOCK] = -np.inf
    labels[LABEL_ONLY_FINITE_IN_SECOND_BLOCK] = 4300
    logits[LABEL_ONLY_FINITE_IN_SECOND_BLOCK, 4300] = -2.0
    return jnp.asarray(logits, dtype), jnp.asarray(labels)


OPTIONS: dict[str, dict[str, Any]] = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-2},
    "weight_smoothing": {
        "weight": np.linspace(0.5, 2.0, CLASSES).astype(np.float32),
        "label_smoothing": 0.2,
    },
    "example_where": {"where": np.arange(BATCH) != 4},
}


def _values_and_grads(implementation: str, name: str):
    """Per reduction, the loss and the gradient of its sum, in one compiled function."""
    options = OPTIONS[name]

    def both(x, labels):
        result = {}
        for reduction in REDUCTIONS:

            def loss(x, reduction=reduction):
                return jaxce.softmax_cross_entropy_with_integer_labels(
                    x, labels, reduction=reduction, implementation=implementation, **options
                )

            result[reduction] = (loss(x), jax.grad(lambda x: jnp.sum(loss(x)))(x))
        return result

    return jax.jit(both)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_rows_of_minus_inf_match_the_xla_path(name: str, dtype: str) -> None:
    logits, labels = _inputs(dtype)
    kernel = _values_and_grads("pallas", name)(logits, labels)
    xla = _values_and_grads("xla", name)(logits, labels)
    for reduction in REDUCTIONS:
        _assert_same(kernel[reduction], xla[reduction], name, reduction, dtype)


def _assert_same(kernel: Any, xla: Any, name: str, reduction: str, dtype: str) -> None:
    kernel_loss, xla_loss = np.asarray(kernel[0]), np.asarray(xla[0])
    kernel_grad = np.asarray(kernel[1], np.float64)
    xla_grad = np.asarray(xla[1], np.float64)
    what = f"{name}, {reduction}"
    # The same NaN and inf pattern, and the same finite values up to the kernels' own order
    # of float32 sums (a few roundings over 4500 classes: 4 C u ~ 1e-3 of the row's total,
    # far smaller on these entries), then one rounding to the dtype.
    np.testing.assert_array_equal(np.isnan(kernel_loss), np.isnan(xla_loss), what)
    np.testing.assert_array_equal(np.isinf(kernel_loss), np.isinf(xla_loss), what)
    np.testing.assert_array_equal(np.isnan(kernel_grad), np.isnan(xla_grad), what)
    np.testing.assert_array_equal(np.isinf(kernel_grad), np.isinf(xla_grad), what)
    rtol = 2e-6 if dtype == "float32" else 2**-7
    np.testing.assert_allclose(kernel_loss, xla_loss, rtol=rtol, atol=1e-7, err_msg=what)
    np.testing.assert_allclose(kernel_grad, xla_grad, rtol=rtol, atol=1e-7, err_msg=what)
    if reduction == "none" and name != "example_where":
        # The row with no finite logit has no normaliser: NaN, never a finite loss.
        assert not np.isfinite(kernel_loss[ALL_MINUS_INF]), what
    # A row whose label's logit is its only finite one has a finite loss (smoothing puts
    # mass on the -inf classes, which costs inf).
    if reduction == "none" and "label_smoothing" not in OPTIONS[name]:
        assert np.isfinite(kernel_loss[LABEL_ONLY_FINITE_IN_SECOND_BLOCK]), what
