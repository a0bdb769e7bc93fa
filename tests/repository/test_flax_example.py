"""``examples/flax_nnx.py`` at a tiny size: Flax NNX models trained with jaxce losses.

flax is in the ``demo`` and ``test`` extras: a missing flax fails here, it never skips.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_normwise_close, rounding_bound

from examples import flax_nnx, training

DOCS_PAGE = pathlib.Path(__file__).resolve().parents[2] / "docs" / "flax.md"


def fused_bound(tokens: int, dim: int, vocab: int) -> float:
    """float32 roundings of the fused loss and of the materialised one (``N + D + V + 16``)."""
    return 2 * rounding_bound(jnp.float32, tokens + dim + vocab + 16)


def test_classifier_loss_decreases_under_nnx_jit() -> None:
    run = flax_nnx.train_classifier(
        training.load("digits"), hidden=16, epochs=3, batch_size=256, learning_rate=3e-2
    )
    assert len(run.epoch_losses) == 3
    assert run.epoch_losses[-1] < run.epoch_losses[0], run.epoch_losses
    assert 0.0 <= run.test_accuracy <= 1.0


@pytest.mark.parametrize("tied", [True, False], ids=["tied-nnx-embed", "nnx-linear-head"])
def test_language_model_fused_loss_equals_materialised_and_decreases(tied: bool) -> None:
    run = flax_nnx.train_language_model(
        tied=tied, vocab=16, dim=8, sequences=4, length=9, steps=10, learning_rate=5e-2
    )
    assert len(run.losses) == 10
    bound = fused_bound(4 * 8, 8, 16)
    assert_normwise_close(run.losses[0], run.first_materialised, bound, "loss at the start")
    assert run.losses[-1] < run.losses[0], run.losses


@pytest.mark.parametrize("tied", [True, False], ids=["tied-nnx-embed", "nnx-linear-head"])
def test_fused_gradients_equal_the_materialised_ones(tied: bool) -> None:
    model = flax_nnx.TinyLanguageModel(12, 8, tied=tied, rngs=nnx.Rngs(1))
    tokens = jax.numpy.asarray(flax_nnx.markov_tokens(12, 3, 7, seed=1))
    ours = nnx.grad(flax_nnx.fused_loss)(model, tokens)
    theirs = nnx.grad(flax_nnx.materialised_loss)(model, tokens)
    for ours_leaf, theirs_leaf in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(ours_leaf, theirs_leaf, rtol=1e-5, atol=1e-7)


def test_output_weight_is_the_table_or_the_transposed_kernel() -> None:
    tied = flax_nnx.TinyLanguageModel(12, 8, tied=True, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(tied.output_weight(), tied.embed.embedding[...])
    untied = flax_nnx.TinyLanguageModel(12, 8, tied=False, rngs=nnx.Rngs(0))
    assert untied.head is not None and untied.head.kernel[...].shape == (8, 12)
    np.testing.assert_array_equal(untied.output_weight(), untied.head.kernel[...].T)


def test_claims_hold_for_a_report_that_meets_them_and_fail_otherwise() -> None:
    good = flax_nnx.Report(
        flax_nnx.ClassifierRun((1.2, 0.5), 0.97),
        (flax_nnx.LanguageModelRun(True, 64, (4.2, 0.7), 4.2),),
    )
    assert all(holds for holds, _ in flax_nnx.claims(good))
    bad = flax_nnx.Report(
        flax_nnx.ClassifierRun((1.2, 0.5), 0.97),
        (flax_nnx.LanguageModelRun(False, 64, (4.2, 3.9), 4.3),),
    )
    failed = [claim for holds, claim in flax_nnx.claims(bad) if not holds]
    assert len(failed) == 2 and all("nnx.Linear head" in claim for claim in failed), failed


def test_docs_page_blocks_run_in_order() -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOCS_PAGE.read_text(encoding="utf-8"), re.DOTALL)
    assert len(blocks) == 2
    namespace: dict[str, Any] = {"__name__": "flax_page"}
    for block in blocks:
        exec(compile(block, str(DOCS_PAGE), "exec"), namespace)
    assert np.isfinite(float(namespace["loss"]))
