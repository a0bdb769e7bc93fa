"""The per-platform plans of linear_cross_entropy, proved on CPU.

Speed cannot be measured here, so these tests check the structure it depends
on: accelerator plans lowered for CUDA and TPU make large products (at least
512 token rows, whole vocabulary) and no tensor beyond 1/8 of the logits;
their results on CPU equal a float64 formula; and the plan's estimate of the
temporaries agrees with XLA's own memory analysis.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import compile_as_users_do

import jaxce
from jaxce import _linear

# (name, N tokens, D, V): the Gemma 2 head and the Llama 3 head of the benchmarks.
HEADS = [("A", 8192, 2304, 256000), ("B", 8192, 4096, 128256)]
BYTES = {"f32": 4, "bf16": 2, "f16": 2, "i32": 4, "i1": 1, "ui16": 2, "ui32": 4}


def test_plan_is_frozen_printable_and_the_cpu_plan_is_the_tuned_rule():
    plan = jaxce.plan_linear_cross_entropy(2048, 512, 65536, jnp.float32, platform="cpu")
    assert isinstance(plan, jaxce.LinearCrossEntropyPlan)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.chunk_size = 1  # type: ignore[misc]
    assert plan.chunk_size == _linear.default_chunk_size(2048, 65536)
    assert plan.vocab_block == 512  # 1 MiB of a D = 512 float32 weight
    assert plan.accumulation_dtype == "float32"
    assert "cpu: 205-token chunks" in str(plan)
    # None plans for the default backend (CPU here), per reduction and dtype.
    assert jaxce.plan_linear_cross_entropy(2048, 512, 65536, jnp.float32) == plan
    per_token = jaxce.plan_linear_cross_entropy(2048, 512, 65536, "float32", reduction="none")
    assert per_token.chunk_size == _linear.default_chunk_size(2048, 65536, per_token=True)


@pytest.mark.parametrize("platform", ["gpu", "cuda", "tpu"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize(("head", "tokens", "dim", "vocab"), HEADS, ids=[h[0] for h in HEADS])
def test_accelerator_plans_make_tens_of_large_products(head, tokens, dim, vocab, dtype, platform):
    plan = jaxce.plan_linear_cross_entropy(tokens, dim, vocab, dtype, platform=platform)
    assert plan.platform == ("tpu" if platform == "tpu" else "gpu")
    assert plan.chunk_size >= 512 and plan.chunk_size % 256 == 0
    assert plan.vocab_block == vocab  # whole-vocabulary products
    assert -(-tokens // plan.chunk_size) <= 64  # tens of iterations, not thousands
    assert plan.chunk_size * vocab * 4 <= tokens * vocab * 4 / 8


def _tensors(module: str) -> list[tuple[int, tuple[int, ...]]]:
    """(bytes, shape) of every ranked tensor type in StableHLO text."""
    found = []
    for match in re.finditer(r"tensor<((?:\d+x)+)(\w+)>", module):
        shape = tuple(int(d) for d in match.group(1).rstrip("x").split("x"))
        found.append((int(np.prod(shape)) * BYTES.get(match.group(2), 4), shape))
    return found


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize(("head", "tokens", "dim", "vocab"), HEADS, ids=[h[0] for h in HEADS])
def test_accelerator_plan_lowers_to_large_products_within_an_eighth_of_the_logits(
    head, tokens, dim, vocab, dtype, platform, reduction
):
    """value_and_grad lowered for the accelerator (nothing allocated) at the real head shapes."""
    plan = jaxce.plan_linear_cross_entropy(
        tokens, dim, vocab, dtype, platform=platform, reduction=reduction
    )

    def loss(hidden, weight, labels):
        value = jaxce.linear_cross_entropy(
            hidden, weight, labels, plan=plan, label_smoothing=0.1, reduction=reduction
        )
        return jnp.sum(value)

    arguments = (
        jax.ShapeDtypeStruct((tokens, dim), dtype),
        jax.ShapeDtypeStruct((vocab, dim), dtype),
        jax.ShapeDtypeStruct((tokens,), jnp.int32),
    )
    lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(*arguments)
    module = lowered.lower(lowering_platforms=(platform,)).as_text()
    logits_bytes = tokens * vocab * 4
    too_large = {
        shape
        for size, shape in _tensors(module)
        if size > logits_bytes / 8 and shape != (vocab, dim)  # the weight and its gradient
    }
    assert not too_large, too_large
    products = re.findall(r"stablehlo\.dot_general.*: \((tensor<[^)]*)\)", module)
    with_vocab = [p for p in products if f"{vocab}x" in p or f"x{vocab}x" in p]
    assert len(with_vocab) >= 3  # logits, hidden gradient, weight gradient
    for operands in with_vocab:
        rows = {shape[0] for _, shape in _tensors(operands)} - {vocab}
        assert min(rows) >= 512, operands


def _temporaries(tokens, dim, vocab, dtype, plan, reduction="mean"):
    """XLA:CPU's temporaries for the value and gradients (hidden, weight), compiled, never run.

    "none" is differentiated through a weighted sum of the per-token losses.
    """
    token_weights = jnp.linspace(0.5, 1.5, tokens)

    def loss(hidden, weight, labels):
        value = jaxce.linear_cross_entropy(hidden, weight, labels, plan=plan, reduction=reduction)
        return jnp.sum(value * token_weights) if reduction == "none" else value

    arguments = (
        jax.ShapeDtypeStruct((tokens, dim), dtype),
        jax.ShapeDtypeStruct((vocab, dim), dtype),
        jax.ShapeDtypeStruct((tokens,), jnp.int32),
    )
    compiled = compile_as_users_do(
        jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*arguments)
    )
    return compiled.memory_analysis().temp_size_in_bytes


SMALL_SHAPES = [
    (1024, 64, 4096, "float32"),
    (600, 32, 3000, "float32"),
    (2048, 128, 8192, "bfloat16"),
    (4096, 64, 16384, "bfloat16"),
]
# Where the weight's gradient and the chunks are tens to hundreds of MiB.
LARGE_SHAPES = [(2048, 512, 32768), (8192, 512, 32768), (4096, 1024, 50304), (2048, 256, 65536)]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("platform", ["cpu", "gpu"])
@pytest.mark.parametrize(
    ("tokens", "dim", "vocab", "dtype"),
    SMALL_SHAPES,
    ids=["N1024-V4096-f32", "N600-V3000-f32", "N2048-V8192-bf16", "N4096-V16384-bf16"],
)
def test_estimated_temporaries_agree_with_xla_within_15_percent(
    tokens, dim, vocab, dtype, platform, reduction
):
    plan = jaxce.plan_linear_cross_entropy(
        tokens, dim, vocab, dtype, platform=platform, reduction=reduction
    )
    actual = _temporaries(tokens, dim, vocab, jnp.dtype(dtype), plan, reduction)
    assert abs(plan.estimated_temporaries - actual) <= 0.15 * actual, (plan, actual)


def _documented_band(dtype, platform, reduction):
    """The accuracy :class:`jaxce.LinearCrossEntropyPlan` documents for its estimate."""
    if dtype == "bfloat16" and reduction == "mean":
        return (0.85, 1.35) if platform == "cpu" else (0.7, 1.15)
    if dtype == "bfloat16" and platform != "cpu":
        return (0.8, 1.2)
    return (0.85, 1.15)


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("platform", ["cpu", "gpu"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    ("tokens", "dim", "vocab"), LARGE_SHAPES, ids=[f"N{n}-D{d}-V{v}" for n, d, v in LARGE_SHAPES]
)
def test_estimated_temporaries_at_large_shapes(tokens, dim, vocab, dtype, platform, reduction):
    """Within 15% at shapes where the weight's gradient and the chunks weigh tens of MiB,
    except where the plan's docstring says otherwise."""
    plan = jaxce.plan_linear_cross_entropy(
        tokens, dim, vocab, dtype, platform=platform, reduction=reduction
    )
    actual = _temporaries(tokens, dim, vocab, jnp.dtype(dtype), plan, reduction)
    low, high = _documented_band(dtype, platform, reduction)
    assert low * actual <= plan.estimated_temporaries <= high * actual, (plan, actual)


def test_memory_budget_trades_memory_for_fewer_chunks():
    tokens, dim, vocab = 8192, 2304, 256000
    default = jaxce.plan_linear_cross_entropy(tokens, dim, vocab, "bfloat16", platform="gpu")
    roomy = jaxce.plan_linear_cross_entropy(
        tokens, dim, vocab, "bfloat16", platform="gpu", memory_budget=8 * 2**30
    )
    tight = jaxce.plan_linear_cross_entropy(
        tokens, dim, vocab, "bfloat16", platform="gpu", memory_budget=3584 * 2**20
    )
    assert roomy.chunk_size > default.chunk_size > tight.chunk_size >= 512
    assert roomy.estimated_temporaries <= 8 * 2**30
    assert tight.estimated_temporaries <= 3584 * 2**20
    # CPU, float32: the gradients accumulate in their output buffers, so the
    # temporaries are the chunk's (56 MiB by default here); 40 MiB leaves room
    # for chunks of 142 rows instead of 205.
    cpu = jaxce.plan_linear_cross_entropy(2048, 512, 65536, "float32", memory_budget=40 * 2**20)
    assert cpu.estimated_temporaries <= 40 * 2**20
    assert 16 <= cpu.chunk_size < _linear.default_chunk_size(2048, 65536)
    assert _temporaries(2048, 512, 65536, jnp.float32, cpu) <= 40 * 2**20
    # bfloat16: the weight's float32 accumulator alone is 128 MiB here.
    half = jaxce.plan_linear_cross_entropy(2048, 512, 65536, "bfloat16", memory_budget=160 * 2**20)
    assert half.estimated_temporaries <= 160 * 2**20
    assert 16 <= half.chunk_size < _linear.default_chunk_size(2048, 65536, bfloat16=True)
    starved = jaxce.plan_linear_cross_entropy(2048, 512, 65536, "float32", memory_budget=2**20)
    assert starved.chunk_size == 16  # the smallest CPU chunk: the budget cannot be met


def _float64_loss(hidden, weight, bias, labels, token_weights, *, softcap, label_smoothing, z_loss):
    """The materialised loss by hand in float64: per-token losses times ``token_weights``,
    summed and divided by the number of tokens whose label is not -100."""
    logits = hidden @ weight.T + bias[None, :]
    logits = softcap * jnp.tanh(logits / softcap)
    log_z = jax.scipy.special.logsumexp(logits, axis=-1)
    log_p = logits - log_z[:, None]
    counted = labels != -100
    picked = jnp.take_along_axis(log_p, jnp.where(counted, labels, 0)[:, None], -1)[:, 0]
    vocab = logits.shape[-1]
    per_token = (1 - label_smoothing) * -picked - label_smoothing / vocab * log_p.sum(-1)
    per_token = (per_token + z_loss * log_z**2) * token_weights
    return jnp.where(counted, per_token, 0).sum() / counted.sum(dtype=per_token.dtype)


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_accelerator_plan_runs_on_cpu_and_equals_float64_and_the_cpu_plan(platform, reduction):
    """At small shapes (N not a multiple of the chunk) every option, values and gradients."""
    rng = np.random.default_rng(5)
    tokens, dim, vocab = 1300, 16, 700
    hidden = rng.normal(size=(tokens, dim))
    weight = rng.normal(size=(vocab, dim)) / 2
    bias = rng.normal(size=vocab)
    labels = np.where(rng.random(tokens) < 0.1, -100, rng.integers(0, vocab, tokens))
    options = {"softcap": 5.0, "label_smoothing": 0.1, "z_loss": 1e-3}
    plan = jaxce.plan_linear_cross_entropy(
        tokens, dim, vocab, "float32", platform=platform, reduction=reduction
    )
    assert plan.chunk_size == 512 and plan.vocab_block == vocab
    # "none" is checked through a weighted sum of the per-token losses (its VJP).
    token_weights = rng.uniform(0.5, 1.5, tokens)

    def fused(plan):
        def loss(h, w, b):
            value = jaxce.linear_cross_entropy(
                h, w, labels, bias=b, ignore_index=-100, plan=plan, reduction=reduction, **options
            )
            if reduction == "none":
                counted = labels != -100
                value = jnp.sum(value * token_weights) / counted.sum(dtype=value.dtype)
            return value

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    arguments = [jnp.asarray(a, jnp.float32) for a in (hidden, weight, bias)]
    accelerator = fused(plan)(*arguments)
    cpu_plan = jaxce.plan_linear_cross_entropy(
        tokens, dim, vocab, "float32", platform="cpu", reduction=reduction
    )
    cpu = fused(cpu_plan)(*arguments)
    weights = np.ones(tokens) if reduction == "mean" else token_weights
    with jax.enable_x64(True):
        exact = jax.value_and_grad(
            lambda h, w, b: _float64_loss(
                h, w, b, jnp.asarray(labels), jnp.asarray(weights), **options
            ),
            argnums=(0, 1, 2),
        )(*(jnp.asarray(a, jnp.float64) for a in (hidden, weight, bias)))
    # float32 over sums of 700 classes and 1300 tokens: relative 1e-5 of each array's scale.
    for got, same, want in zip(jax.tree.leaves(accelerator), jax.tree.leaves(cpu),
                               jax.tree.leaves(exact), strict=True):  # fmt: skip
        scale = float(np.max(np.abs(np.asarray(want))))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5 * scale)
        np.testing.assert_allclose(np.asarray(got), np.asarray(same), atol=1e-5 * scale)


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_accelerator_chunk_rule_at_every_batch_size(platform):
    """N/8 rounded down to a multiple of 256, at least 512, clipped to N: for every N, not only
    multiples of 2048 (small batches, the README's 10 tokens, used to raise IndexError)."""
    sizes = [*range(0, 1100), *range(1100, 40000, 37), 65536, 100001]
    for tokens in sizes:
        plan = jaxce.plan_linear_cross_entropy(tokens, 64, 1000, "bfloat16", platform=platform)
        expected = min(max(tokens // 8 // 256 * 256, 512), max(tokens, 1))
        assert plan.chunk_size == expected, (tokens, plan.chunk_size, expected)
        assert plan.vocab_block == 1000


def test_accelerator_plans_run_small_batches():
    """A 10-token call with a GPU plan runs and equals the CPU plan (it used to fail to plan)."""
    rng = np.random.default_rng(8)
    hidden = jnp.asarray(rng.normal(size=(10, 16)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(50, 16)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 50, 10))
    losses = [
        jax.value_and_grad(jaxce.linear_cross_entropy, argnums=(0, 1))(
            hidden, weight, labels, plan=jaxce.plan_linear_cross_entropy(10, 16, 50, "float32",
                                                                           platform=platform)
        )
        for platform in ("gpu", "tpu", "cpu")
    ]  # fmt: skip
    for loss in losses[:2]:
        for ours, theirs in zip(jax.tree.leaves(loss), jax.tree.leaves(losses[2]), strict=True):
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_plan_arguments_are_checked():
    plan = jaxce.plan_linear_cross_entropy(4, 3, 5, "float32")
    hidden, weight, labels = jnp.ones((4, 3)), jnp.ones((5, 3)), jnp.zeros(4, jnp.int32)
    with pytest.raises(ValueError, match="Pass `chunk_size` or `plan`, not both"):
        jaxce.linear_cross_entropy(hidden, weight, labels, plan=plan, chunk_size=2)
    with pytest.raises(TypeError, match="`plan` must be a LinearCrossEntropyPlan"):
        jaxce.linear_cross_entropy(hidden, weight, labels, plan={"chunk_size": 2})
    with pytest.raises(ValueError, match="`platform` must be one of"):
        jaxce.plan_linear_cross_entropy(4, 3, 5, "float32", platform="metal")
    with pytest.raises(ValueError, match="`vocab` must be an int >= 1"):
        jaxce.plan_linear_cross_entropy(4, 3, 0, "float32")
    with pytest.raises(TypeError, match="`dtype` must be a floating dtype"):
        jaxce.plan_linear_cross_entropy(4, 3, 5, "int32")


@pytest.mark.parametrize("budget", [-5, 0, True, 1.5], ids=["-5", "0", "True", "1.5"])
@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_memory_budget_must_be_a_positive_int(budget, platform):
    """It was used as given: -5 or 0 bytes picked the smallest chunk, True one byte."""
    with pytest.raises(ValueError, match=r"`memory_budget` must be a positive int .* got"):
        jaxce.plan_linear_cross_entropy(
            64, 3, 5, "float32", platform=platform, memory_budget=budget
        )
    assert jaxce.plan_linear_cross_entropy(64, 3, 5, "float32", memory_budget=1).chunk_size >= 1


@pytest.mark.parametrize("value", [0, -1, True, 2.0, "8"], ids=["0", "-1", "True", "2.0", "'8'"])
@pytest.mark.parametrize("field", ["chunk_size", "vocab_block"])
def test_plan_built_by_hand_checks_its_sizes(field, value):
    """A hand-built plan with a zero chunk failed later, inside the loss, with ZeroDivisionError."""
    plan = jaxce.plan_linear_cross_entropy(4, 3, 5, "float32")
    with pytest.raises(
        ValueError, match=f"`{field}` must be an int >= 1, got {re.escape(repr(value))}"
    ):
        dataclasses.replace(plan, **{field: value})
    with pytest.raises(ValueError, match=f"`{field}`"):
        fields = dataclasses.asdict(plan) | {field: value}
        jaxce.LinearCrossEntropyPlan(**fields)


# The CUDA lowering of the default in `make test`; TPU and "split" in the slow sweep.
@pytest.mark.parametrize("platform", ["cuda", pytest.param("tpu", marks=pytest.mark.slow)])
@pytest.mark.parametrize(
    "products", [None, pytest.param("split", marks=pytest.mark.slow)], ids=["default", "split"]
)
@pytest.mark.parametrize("head", HEADS, ids=[head[0] for head in HEADS])
def test_bfloat16_accelerator_products_take_bfloat16_operands_only(head, products, platform):
    """Tensor cores multiply bfloat16: no float32 operand in a product with the vocabulary.

    At shapes A and B lowered for CUDA and TPU, "mean": the default plan makes
    exactly three products with the vocabulary (the floor's count), bfloat16 x
    bfloat16 with float32 results; ``"split"`` enters the logits' gradient in
    both gradient products as two bfloat16 halves (1 + 2 + 2 products).
    """
    _, tokens, dim, vocab = head
    plan = jaxce.plan_linear_cross_entropy(
        tokens, dim, vocab, "bfloat16", platform="gpu" if platform == "cuda" else platform
    )
    assert plan.gradient_products == "bfloat16"
    if products is not None:
        plan = dataclasses.replace(plan, gradient_products=products)

    def loss(hidden, weight, labels):
        return jaxce.linear_cross_entropy(hidden, weight, labels, plan=plan, softcap=30.0)

    arguments = (
        jax.ShapeDtypeStruct((tokens, dim), jnp.bfloat16),
        jax.ShapeDtypeStruct((vocab, dim), jnp.bfloat16),
        jax.ShapeDtypeStruct((tokens,), jnp.int32),
    )
    lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(*arguments)
    module = lowered.lower(lowering_platforms=(platform,)).as_text()
    dots = re.findall(
        r"stablehlo\.dot_general.*: \((tensor<[^)]*)\)\s*->\s*(tensor<[^>]*>)", module
    )
    with_vocab = [d for d in dots if f"{vocab}x" in d[0] or f"x{vocab}>" in d[0]]
    assert len(with_vocab) == (5 if products == "split" else 3), with_vocab
    for operands, result in with_vocab:
        assert re.findall(r"x([a-z]\w*)>", operands) == ["bf16", "bf16"], operands
        assert result.endswith("xf32>"), result


@pytest.mark.parametrize(
    ("tokens", "dim", "vocab"),
    # N = 777: 1/N is not a power of two (a one-hot term rounded to bfloat16 shows there).
    [pytest.param(1024, 256, 8192, marks=pytest.mark.slow), (777, 96, 3001)],
    ids=["N1024", "N777"],
)
def test_accelerator_default_meets_the_precision_contract(tokens, dim, vocab):
    """bfloat16 on GPU and TPU by default: loss within 1e-5 (relative) of float64; gradients
    within 1.25x of the materialised bfloat16 computation's error (``h @ W.T`` in bfloat16 with
    float32 accumulation, then the loss, differentiated), norm-wise against float64."""
    rng = np.random.default_rng(9)
    hidden = jnp.asarray(rng.normal(size=(tokens, dim)), jnp.bfloat16)
    weight = jnp.asarray(rng.normal(size=(vocab, dim)) / np.sqrt(dim) * 2, jnp.bfloat16)
    labels = jnp.asarray(rng.integers(0, vocab, tokens))

    def materialised(h, w):
        logits = jax.lax.dot_general(
            h, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )
        return jaxce.softmax_cross_entropy_with_integer_labels(logits, labels, reduction="mean")

    with jax.enable_x64(True):
        h64, w64 = hidden.astype(jnp.float64), weight.astype(jnp.float64)
        exact_loss, exact = jax.value_and_grad(materialised, (0, 1))(h64, w64)
    reference = jax.jit(jax.grad(materialised, (0, 1)))(hidden, weight)

    def error(grads):
        return max(
            np.linalg.norm(np.asarray(g, np.float64) - np.asarray(e)) / np.linalg.norm(e)
            for g, e in zip(grads, exact, strict=True)
        )

    for platform in ("gpu", "tpu"):
        plan = jaxce.plan_linear_cross_entropy(tokens, dim, vocab, "bfloat16", platform=platform)
        assert plan.gradient_products == "bfloat16"
        loss, grads = jax.jit(
            jax.value_and_grad(
                lambda h, w, plan=plan: jaxce.linear_cross_entropy(h, w, labels, plan=plan), (0, 1)
            )
        )(hidden, weight)
        assert abs(float(loss) - float(exact_loss)) <= 1e-5 * abs(float(exact_loss))
        assert error(grads) <= 1.25 * error(reference), (error(grads), error(reference))


def test_gradient_products_precision_on_cpu():
    """bfloat16 inputs, value and gradients on CPU with each plan, against float64.

    The gradients come back in bfloat16, so the float64 gradient rounded to
    bfloat16 is the best possible answer. The split products (error about
    2^-17 before that rounding) stay within 3e-4 of it norm-wise (they differ
    only where a value sits next to a rounding boundary). Rounding the logits'
    gradient to bfloat16 before the products adds errors of bfloat16's size
    to its small entries only (the one-hot term, a row's largest entry, is
    added exactly), which stay under 1e-3 of it; rounded with the one-hot
    term in, the error was 2e-3 and more (a -1/N entry off by bfloat16's
    relative error in every row alike).
    """
    rng = np.random.default_rng(0)
    tokens, dim, vocab = 1024, 128, 4096
    hidden = jnp.asarray(rng.normal(size=(tokens, dim)), jnp.bfloat16)
    weight = jnp.asarray(rng.normal(size=(vocab, dim)) / np.sqrt(dim) * 2, jnp.bfloat16)
    labels = jnp.asarray(rng.integers(0, vocab, tokens))
    with jax.enable_x64(True):
        exact = jax.grad(
            lambda h, w: jnp.mean(
                jax.nn.logsumexp(h @ w.T, axis=-1)
                - jnp.take_along_axis(h @ w.T, labels[:, None], axis=-1)[:, 0]
            ),
            argnums=(0, 1),
        )(hidden.astype(jnp.float64), weight.astype(jnp.float64))
        best = [np.asarray(g.astype(jnp.bfloat16), np.float64) for g in exact]

    def error(plan):
        grads = jax.jit(
            jax.grad(lambda h, w: jaxce.linear_cross_entropy(h, w, labels, plan=plan), (0, 1))
        )(hidden, weight)
        return max(
            np.linalg.norm(np.asarray(g, np.float64) - b) / np.linalg.norm(b)
            for g, b in zip(grads, best, strict=True)
        )

    for platform in ("cpu", "gpu"):
        plan = jaxce.plan_linear_cross_entropy(tokens, dim, vocab, "bfloat16", platform=platform)
        assert plan.gradient_products == ("split" if platform == "cpu" else "bfloat16")
        assert error(dataclasses.replace(plan, gradient_products="split")) < 3e-4, platform
        assert error(dataclasses.replace(plan, gradient_products="bfloat16")) < 1e-3, platform
    with pytest.raises(ValueError, match="gradient_products"):
        dataclasses.replace(plan, gradient_products="int8")
