"""``implementation="pallas"`` compiled by Triton and run on a CUDA GPU (skipped elsewhere).

`tests/test_pallas.py` proves the kernel bodies in interpret mode and that
they lower for CUDA; what only a GPU can show is that Triton compiles them and
that the compiled kernels compute the same thing: every row written, at real
vocabulary widths, in the three dtypes. Run on a GPU machine with
``pytest tests/test_pallas_gpu.py``. Tolerances as in `tests/test_pallas.py`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_normwise_close, half_precision_output_bound

import jaxce

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "gpu", reason="the Triton kernels need a CUDA GPU"
)

loss_fn = jaxce.softmax_cross_entropy_with_integer_labels


def _value_and_grad(
    logits: jax.Array, labels: jax.Array, implementation: str, **options: Any
) -> tuple[jax.Array, jax.Array]:
    def loss(x: jax.Array) -> jax.Array:
        return loss_fn(x, labels, implementation=implementation, **options)

    return jax.jit(jax.value_and_grad(loss))(logits)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize(
    ("num_rows", "num_classes"),
    [(7, 1), (33, 1000), (64, 128256), (8, 262144)],
    ids=["C1", "C1000", "C128256", "C262144"],
)
@pytest.mark.parametrize(
    "options",
    [
        {"reduction": "mean"},
        {"label_smoothing": 0.1, "z_loss": 1e-4, "ignore_index": 3, "reduction": "mean"},
    ],
    ids=["plain", "options"],
)
def test_compiled_kernels_match_xla(
    dtype: str, num_rows: int, num_classes: int, options: dict[str, Any]
) -> None:
    rng = np.random.default_rng(num_classes)
    logits = jnp.asarray(rng.normal(size=(num_rows, num_classes)) * 4, dtype)
    labels = jnp.asarray(rng.integers(0, num_classes, size=num_rows))
    weight = jnp.asarray(rng.uniform(0.5, 2.0, size=num_classes), jnp.float32)
    kernel = _value_and_grad(logits, labels, "pallas", weight=weight, **options)
    xla = _value_and_grad(logits, labels, "xla", weight=weight, **options)
    bound = 2 * half_precision_output_bound(dtype, num_classes + 16)
    assert_normwise_close(
        kernel[0], xla[0], 2 * half_precision_output_bound("float32", num_classes + 16)
    )
    assert_normwise_close(kernel[1], xla[1], bound)


def test_every_gradient_row_is_written() -> None:
    """Rows that take no part get an exact 0, the others a gradient summing to ~0."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(513, 128256)), jnp.bfloat16)
    labels = jnp.asarray(rng.integers(0, 128256, size=513)).at[::2].set(-100)
    _, grad = _value_and_grad(logits, labels, "pallas", ignore_index=-100, reduction="sum")
    grad = np.asarray(grad.astype(jnp.float32))
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad[::2], 0.0)
    np.testing.assert_allclose(grad[1::2].sum(axis=-1), 0.0, atol=0.05)
    assert np.all(np.abs(grad[1::2]).max(axis=-1) > 0)
