"""linear_cross_entropy(reduction="none"): what its derivative rule keeps, computes and holds.

Per-token losses (RL advantages, per-token weighting) are differentiated with
one cotangent per token. The rule keeps a few floats per token, and the
backward pass recomputes each (chunk, vocabulary block) tile once: four matrix
products in all, and on CPU the temporaries of "mean" give or take a few
chunk-sized buffers.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import compile_as_users_do
from jax._src.ad_checkpoint import saved_residuals

import jaxce
from jaxce import _references

OPTIONS = {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 4.0, "ignore_index": -100}


def _inputs(seed, num_tokens, dim, vocab, dtype):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(num_tokens, dim)), dtype)
    weight = jnp.asarray(rng.normal(size=(vocab, dim)) / np.sqrt(dim) * 3, dtype)
    labels = rng.integers(0, vocab, size=num_tokens)
    labels = jnp.asarray(np.where(rng.random(num_tokens) < 0.2, -100, labels))
    return hidden, weight, labels


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("options", [{}, OPTIONS], ids=["plain", "all-options"])
def test_backward_keeps_a_few_floats_per_token(dtype, options):
    """Besides the inputs themselves, every saved residual has at most N elements."""
    num_tokens, dim, vocab = 40, 8, 300
    hidden, weight, labels = _inputs(0, num_tokens, dim, vocab, dtype)

    def loss(h, w):
        return jaxce.linear_cross_entropy(h, w, labels, reduction="none", chunk_size=16, **options)

    residuals = saved_residuals(loss, hidden, weight)
    kept = [r for r, why in residuals if not why.startswith("from the argument")]
    assert kept, residuals
    for residual in kept:
        assert residual.size <= num_tokens, (residual.shape, residuals)
    # One float per token at least: the log-normaliser the backward pass reads.
    assert any(r.shape == (num_tokens,) and r.dtype == jnp.float32 for r in kept)


def _products(compiled_text: str) -> list[str]:
    return re.findall(r"= f32\[([\d,]+)\]\{[\d,]+\} dot\(", compiled_text)


@pytest.mark.parametrize(
    ("reduction", "expected"), [("mean", 3), ("none", 4)], ids=["mean-3", "none-4"]
)
def test_number_of_matrix_products(reduction, expected):
    """Value and gradients: 3 products for "mean" (gradients in the forward pass), 4 for "none".

    Counted in the compiled float32 program (one chunk per loop body), each of
    ``[chunk, V]`` or ``[chunk, D]`` or ``[V, D]`` shape: the forward logits,
    then for "none" the recomputed logits, ``G W`` and ``(c G)^T h``.
    """
    num_tokens, dim, vocab = 2048, 64, 4096
    args = (
        jax.ShapeDtypeStruct((num_tokens, dim), jnp.float32),
        jax.ShapeDtypeStruct((vocab, dim), jnp.float32),
        jax.ShapeDtypeStruct((num_tokens,), jnp.int32),
    )
    plan = jaxce.plan_linear_cross_entropy(
        num_tokens, dim, vocab, jnp.float32, platform="gpu", reduction=reduction
    )
    weights = jnp.linspace(0.5, 1.5, num_tokens)

    def loss(h, w, y):
        value = jaxce.linear_cross_entropy(h, w, y, reduction=reduction, plan=plan)
        return jnp.sum(value * weights) if reduction == "none" else value

    text = compile_as_users_do(jax.jit(jax.value_and_grad(loss, (0, 1))).lower(*args)).as_text()
    products = _products(text)
    assert len(products) == expected, products
    chunk = plan.chunk_size
    allowed = {f"{chunk},{vocab}", f"{chunk},{dim}", f"{vocab},{dim}"}
    assert set(products) <= allowed, products


def _temporaries(reduction, plan, dtype, num_tokens, dim, vocab):
    """Temporaries of value and gradients (hidden, weight), lowered and compiled, never run."""
    args = (
        jax.ShapeDtypeStruct((num_tokens, dim), dtype),
        jax.ShapeDtypeStruct((vocab, dim), dtype),
        jax.ShapeDtypeStruct((num_tokens,), jnp.int32),
    )
    weights = jnp.linspace(0.5, 1.5, num_tokens)

    def loss(h, w, y):
        value = jaxce.linear_cross_entropy(h, w, y, reduction=reduction, plan=plan)
        return jnp.sum(value * weights) if reduction == "none" else value

    compiled = compile_as_users_do(jax.jit(jax.value_and_grad(loss, (0, 1))).lower(*args))
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_temporaries_like_mean_on_cpu(dtype):
    """The CPU plan: "none" holds no weight-sized buffer besides those "mean" holds.

    Small chunks (64 tokens: a float32 chunk is 8 MiB, the weight's float32
    gradient 64 MiB), so that a second weight-sized buffer cannot hide in the
    margin of a few chunk-sized ones. The backward pass reads the blocks of
    the tangents by slicing, so the weight's cotangent is updated in place
    block by block.
    """
    num_tokens, dim, vocab = 4096, 512, 32768
    plan = dataclasses.replace(
        jaxce.plan_linear_cross_entropy(num_tokens, dim, vocab, dtype, platform="cpu"),
        chunk_size=64,
    )
    weight_f32, chunk_f32 = vocab * dim * 4, plan.chunk_size * vocab * 4
    mean = _temporaries("mean", plan, jnp.dtype(dtype), num_tokens, dim, vocab)
    none = _temporaries("none", plan, jnp.dtype(dtype), num_tokens, dim, vocab)
    assert none <= mean + 3 * chunk_f32, (none, mean)
    assert 3 * chunk_f32 < weight_f32 / 2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_temporaries_of_the_accelerator_plan(dtype):
    """The GPU plan (whole-vocabulary products), compiled by XLA:CPU: "none" holds
    what "mean" does, plus the weight's float32 cotangent and chunk-sized buffers.

    XLA:CPU forms each chunk's whole-vocabulary weight product before adding
    it to its accumulator: a second weight-sized float32 buffer on this backend.
    """
    num_tokens, dim, vocab = 8192, 512, 32768
    plan = jaxce.plan_linear_cross_entropy(num_tokens, dim, vocab, dtype, platform="gpu")
    weight_f32, chunk_f32 = vocab * dim * 4, plan.chunk_size * vocab * 4
    mean = _temporaries("mean", plan, jnp.dtype(dtype), num_tokens, dim, vocab)
    none = _temporaries("none", plan, jnp.dtype(dtype), num_tokens, dim, vocab)
    assert none <= mean + weight_f32 + 2 * chunk_f32, (none, mean)
    # Nothing of size tokens x vocabulary (the materialised float32 logits).
    assert none < num_tokens * vocab * 4 / 2, none


def test_traced_smoothing_and_z_loss_gradients_per_token():
    """d/d eps and d/d z of sum_i c_i loss_i, against the float64 materialised reference."""
    cotangent = np.random.default_rng(4).uniform(0.5, 1.5, 30)

    with jax.enable_x64(True):
        hidden, weight, labels = _inputs(3, 30, 6, 50, jnp.float64)

        def fused(eps, z, h, w):
            loss = jaxce.linear_cross_entropy(
                h, w, labels, label_smoothing=eps, z_loss=z, softcap=5.0,
                ignore_index=-100, reduction="none", chunk_size=7,
            )  # fmt: skip
            return jnp.sum(loss * cotangent)

        def reference(eps, z, h, w):
            loss = _references.linear_cross_entropy(
                h, w, labels, label_smoothing=eps, z_loss=z, softcap=5.0,
                ignore_index=-100, reduction="none",
            )  # fmt: skip
            return jnp.sum(loss * cotangent)

        arguments = (jnp.float64(0.15), jnp.float64(2e-3), hidden, weight)
        got = jax.grad(fused, argnums=(0, 1, 2, 3))(*arguments)
        want = jax.grad(reference, argnums=(0, 1, 2, 3))(*arguments)
        tangents = (jnp.float64(0.3), jnp.float64(-1e-3), hidden * 0.1, weight * -0.2)
        got_tangent = jax.jvp(fused, arguments, tangents)[1]
        want_tangent = jax.jvp(reference, arguments, tangents)[1]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(float(got_tangent), float(want_tangent), rtol=1e-10)


def test_second_order_across_overlapping_tiles():
    """Gradients and forward over reverse (a Hessian-vector product, as ``jax.hessian``
    computes it) through the tile loop, against float64.

    N = 7 in chunks of 3 and V = 10 in blocks of 4: the last chunk and the last
    block overlap the ones before them, and each (token, class) pair must count
    once in the gradient and in its derivative. Every option is on.
    """
    num_tokens, dim, vocab = 7, 3, 10
    options = {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 4.0, "ignore_index": -100}
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        hidden = jnp.asarray(rng.normal(size=(num_tokens, dim)))
        weight = jnp.asarray(rng.normal(size=(vocab, dim)))
        labels = jnp.asarray([3, 9, -100, 0, 7, 4, 9])
        advantages = jnp.linspace(-1.0, 1.5, num_tokens)
        plan = jaxce.plan_linear_cross_entropy(num_tokens, dim, vocab, jnp.float64)
        plan = dataclasses.replace(plan, chunk_size=3, vocab_block=4)

        def fused(h, w):
            losses = jaxce.linear_cross_entropy(
                h, w, labels, reduction="none", plan=plan, **options
            )
            return jnp.sum(advantages * losses)

        def reference(h, w):
            losses = _references.linear_cross_entropy(h, w, labels, reduction="none", **options)
            return jnp.sum(advantages * losses)

        for got, want in zip(
            jax.tree.leaves(jax.grad(fused, (0, 1))(hidden, weight)),
            jax.tree.leaves(jax.grad(reference, (0, 1))(hidden, weight)),
            strict=True,
        ):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)
        # Forward over reverse, as jax.hessian does, along one direction.
        directions = (
            jnp.asarray(rng.normal(size=hidden.shape)),
            jnp.asarray(rng.normal(size=weight.shape)),
        )
        _, got = jax.jvp(jax.grad(fused, (0, 1)), (hidden, weight), directions)
        _, want = jax.jvp(jax.grad(reference, (0, 1)), (hidden, weight), directions)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12)


def test_tiles_with_temperature_padding_and_shift():
    """Gradients of ``sum_i a_i loss_i`` with blocks of 4 rows over 10 padded to 8 real
    classes (the last block overlaps and holds both padding rows), a traced
    temperature and ``shift=1``, against the float64 materialised formula."""
    batch, length, dim, rows, real = 2, 5, 3, 10, 8
    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        hidden = jnp.asarray(rng.normal(size=(batch, length, dim)))
        weight = jnp.asarray(rng.normal(size=(rows, dim)) * 2)
        labels = jnp.asarray(rng.integers(0, real, size=(batch, length)))
        advantages = jnp.asarray(rng.normal(size=(batch, length - 1)))
        plan = jaxce.plan_linear_cross_entropy(batch * length, dim, rows, jnp.float64)
        plan = dataclasses.replace(plan, chunk_size=3, vocab_block=4)

        def fused(h, w, temperature):
            losses = jaxce.linear_cross_entropy(
                h, w, labels, shift=1, vocab_size=real, temperature=temperature,
                softcap=3.0, label_smoothing=0.1, reduction="none", plan=plan,
            )  # fmt: skip
            return jnp.sum(advantages * losses)

        def reference(h, w, temperature):
            logits = _references.materialised_logits(h[:, :-1], w[:real], softcap=3.0)
            losses = _references.softmax_cross_entropy_with_integer_labels(
                logits / temperature, labels[:, 1:], label_smoothing=0.1, reduction="none"
            )
            return jnp.sum(advantages * losses)

        args = (hidden, weight, jnp.float64(0.7))
        got = jax.grad(fused, (0, 1, 2))(*args)
        want = jax.grad(reference, (0, 1, 2))(*args)
        np.testing.assert_allclose(fused(*args), reference(*args), rtol=1e-12)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(got[1][:real], want[1][:real], rtol=1e-10, atol=1e-13)
        assert np.all(np.asarray(got[1][real:]) == 0)  # padding rows: exactly zero
        np.testing.assert_allclose(got[2], want[2], rtol=1e-10)
