"""The plan: how many tokens per chunk and vocabulary rows per block, per platform."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxce import _checks
from jaxce._reduce import Reduction

# Default chunk. Each chunk costs weight-sized memory traffic besides its
# products (the vocabulary blocks of `weight` are copied for the hidden
# gradient, and the weight gradient is read and written once), a share of the
# time that shrinks as 1 / chunk: at N = 2048, D = 512, V = 65536 on a 2-core
# CPU, 128 rows took 1.07-1.09x the three bare matrix products and 205 rows
# 1.01-1.03x. So a chunk takes `_CHUNK_ROWS` rows where their `[chunk, V]`
# float32 buffer (the largest thing "mean" / "sum" hold) fits in
# `_CHUNK_BYTES_MAX`, as many rows as fit in it otherwise, and more rows, up
# to `_CHUNK_BYTES` in all, for small vocabularies; within [_MIN_CHUNK,
# _MAX_CHUNK] rows.
_CHUNK_ROWS = 256
_CHUNK_BYTES = 32 * 2**20
_CHUNK_BYTES_MAX = 56 * 2**20
_MIN_CHUNK = 16
_MAX_CHUNK = 1024
# The weight gradient is accumulated in row blocks of about this many bytes,
# and at least this many rows (small blocks cost loop overhead).
_WEIGHT_BLOCK_BYTES = 2**20
_MIN_WEIGHT_BLOCK_ROWS = 256


def default_chunk_size(
    num_tokens: int, vocab_size: int, *, per_token: bool = False, bfloat16: bool = False
) -> int:
    """The chunk size ``chunk_size=None`` picks.

    ``rows`` is 256 if a float32 ``[256, V]`` buffer fits in 56 MiB, else as
    many rows as fit in 56 MiB, and more if more fit in 32 MiB (small
    vocabularies); clipped to ``[16, 1024]``. Both budgets are halved for
    ``per_token`` (``"none"``, whose backward pass holds up to three such
    buffers for bfloat16, and two for float32 when a vocabulary block is the
    whole vocabulary) and for ``bfloat16`` inputs (whose gradient holds the
    logits' bytes twice). The tokens are then split into ``ceil(num_tokens / rows)``
    equal chunks (rounded up), so that the last one overlaps the one before it
    by as few rows as possible.
    """
    halve = 2 if per_token or bfloat16 else 1
    row_bytes = 4 * max(vocab_size, 1)
    rows = max(
        _CHUNK_BYTES // halve // row_bytes,
        min(_CHUNK_ROWS, _CHUNK_BYTES_MAX // halve // row_bytes),
    )
    rows = max(_MIN_CHUNK, min(_MAX_CHUNK, rows))
    num_chunks = -(-num_tokens // rows)
    return max(1, -(-num_tokens // max(num_chunks, 1)))


_PLATFORMS = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}
# Accelerators: token chunks of at least this many rows, in multiples of
# `_ACCELERATOR_ROW_MULTIPLE`, and products over the whole vocabulary, so that a
# call is tens of loop iterations of large products, not thousands of small ones.
_ACCELERATOR_MIN_CHUNK = 512
_ACCELERATOR_ROW_MULTIPLE = 256
# By default the largest temporary, one [chunk, V] float32 buffer, is at most
# this fraction of the materialised [N, V] float32 logits.
_ACCELERATOR_LOGITS_FRACTION = 8


@dataclasses.dataclass(frozen=True)
class LinearCrossEntropyPlan:
    """How :func:`jaxce.linear_cross_entropy` splits its work, for one platform.

    Made by :func:`jaxce.plan_linear_cross_entropy`; pass it as ``plan=`` to
    override the plan chosen for the default backend.

    Attributes:
      platform: ``"cpu"``, ``"gpu"`` or ``"tpu"``: whose plan this is.
      chunk_size: tokens per chunk (one ``[chunk_size, V]`` logits buffer at a time).
      vocab_block: vocabulary rows of ``weight`` per gradient product
        (``V``: one product over the whole vocabulary per chunk).
      accumulation_dtype: the dtype the logits and gradients are accumulated in.
      estimated_temporaries: bytes of temporary memory of the loss and its
        gradients, gradient accumulators included: what XLA:CPU's
        ``memory_analysis().temp_size_in_bytes`` shows for this plan, within
        15% at the shapes the tests sweep (up to 2^16 classes), except
        bfloat16 with ``"mean"``/``"sum"``, which XLA:CPU sometimes fits in
        one chunk-sized buffer fewer (up to 35% above), and whose
        accelerator plans at large ``D`` it compiles into more (up to 30%
        below), and bfloat16 ``"none"`` on accelerator plans (up to 20%
        either way). For GPU and TPU plans this is XLA:CPU's count for the same
        program; the device's compiler has not been measured.
      gradient_products: for bfloat16 inputs, how the float32 gradient of the
        logits ``G`` enters the two gradient products (``G W`` and
        ``G^T h``). ``"bfloat16"`` (the default on GPU and TPU): rounded to
        bfloat16, one product each, as in the forward pass, as every peer
        and the materialised bfloat16 computation do: three products with
        the vocabulary in all, the floor's count. Its gradients are as close
        to exact as those of the materialised bfloat16 computation (``h @
        W.T`` in bfloat16 with float32 accumulation, then the loss,
        differentiated): within 1.25x of that error, tested on CPU; a
        bfloat16 gradient holds no more. ``"split"`` (the default on CPU,
        where it costs nothing; the opt-in for more precision elsewhere):
        as two bfloat16 products of ``G``'s high and low halves, accumulated
        in float32 (relative error about 2^-17 before the gradients are
        rounded to bfloat16; on CPU ``G^T h`` multiplies in float32
        instead), five products on GPU and TPU. Choose with
        ``dataclasses.replace(plan, gradient_products=...)``. Other dtypes
        multiply in their own (``"float32"``, ``"float64"``, ...).
    """

    platform: str
    chunk_size: int
    vocab_block: int
    accumulation_dtype: str
    estimated_temporaries: int
    gradient_products: str = "float32"

    def __post_init__(self) -> None:
        for name in ("chunk_size", "vocab_block"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")
        if self.gradient_products not in ("bfloat16", "split", "float16", "float32", "float64"):
            raise ValueError(
                "`gradient_products` must be 'bfloat16' or 'split' (bfloat16 inputs) or the "
                f"inputs' dtype, got {self.gradient_products!r}."
            )

    def __str__(self) -> str:
        return (
            f"LinearCrossEntropyPlan({self.platform}: {self.chunk_size}-token chunks, "
            f"{self.vocab_block}-row vocabulary blocks, {self.accumulation_dtype} "
            f"accumulation, {self.gradient_products} gradient products, "
            f"~{self.estimated_temporaries / 2**20:.1f} MiB of temporaries)"
        )


def _estimated_temporaries(
    num_tokens: int,
    dim: int,
    vocab: int,
    chunk: int,
    vocab_block: int,
    *,
    bfloat16: bool,
    accelerator: bool,
    per_token: bool,
) -> int:
    """Temporaries of the value and gradients, as XLA:CPU allocates them.

    In units of one float32 ``[chunk, V]`` buffer (the logits, then their
    exponentials), of the weight's and hidden's float32 gradients, and of a
    float32 ``[chunk, vocab_block]`` tile; the counts are those XLA:CPU's
    ``memory_analysis()`` shows for each path (``tests/test_linear_plan.py``
    compares them over a grid of shapes):

    - float32 (float16, float64) on the CPU plan: the gradients accumulate in
      place, in the output buffers, a block of rows at a time; one chunk, plus
      a tile and a few blocks of ``weight`` ("mean", whose blocks are
      sliced from the chunk), or one block ("none", whose tiles stand alone;
      two chunks when a block is the whole vocabulary).
    - bfloat16 (float32 accumulators, bfloat16 outputs): the accumulators,
      and the chunk's gradient beside its exponentials (one and a half
      chunks: XLA:CPU fits part of one in place); for "none" on the CPU
      plan one chunk (its tiles stand alone).
    - Whole-vocabulary products (accelerator plans) form each chunk's weight
      product before adding it to the accumulator: a weight-sized buffer.
    """
    chunk_f32 = 4 * chunk * vocab
    weight_f32 = 4 * vocab * dim
    hidden_f32 = 4 * num_tokens * dim
    blocked = vocab_block < vocab
    if bfloat16:
        chunks = 1.5 if accelerator or not per_token else 1
        return int(chunks * chunk_f32) + weight_f32 + hidden_f32
    if accelerator:
        if per_token:
            return chunk_f32 + max(chunk_f32, weight_f32) + hidden_f32
        return chunk_f32 + weight_f32 + hidden_f32
    weight_block = 4 * vocab_block * dim
    if per_token:
        return (chunk_f32 if blocked else 2 * chunk_f32) + min(weight_f32, weight_block)
    tile = 4 * chunk * vocab_block if blocked else 0
    return chunk_f32 + tile + min(weight_f32, 4 * weight_block)


def plan_linear_cross_entropy(
    num_tokens: int,
    dim: int,
    vocab: int,
    dtype: Any,
    *,
    platform: str | None = None,
    reduction: Reduction = "mean",
    memory_budget: int | None = None,
) -> LinearCrossEntropyPlan:
    """The plan :func:`jaxce.linear_cross_entropy` uses for these shapes on ``platform``.

    - CPU (tuned for its caches): 256-token chunks where a float32
      ``[256, V]`` buffer fits in 56 MiB (fewer rows where it does not, more
      for small vocabularies), halved for ``reduction="none"`` and bfloat16,
      and vocabulary blocks of about 1 MiB of ``weight``.
    - GPU and TPU: chunks of at least 512 tokens, in multiples of 256, as
      large as keeps the largest temporary (one float32 ``[chunk, V]``
      buffer) within 1/8 of the materialised float32 logits, and products
      over the whole vocabulary: tens of loop iterations, not thousands.

    Args:
      num_tokens: ``N``, the tokens of one call (``hidden``'s leading dimensions).
      dim: ``D``, the hidden size.
      vocab: ``V``, the vocabulary size (rows of ``weight``).
      dtype: the inputs' dtype (bfloat16 plans for its extra buffer).
      platform: ``"cpu"``, ``"gpu"`` (``"cuda"``, ``"rocm"``) or ``"tpu"``;
        None for ``jax.default_backend()``.
      reduction: the reduction the plan is for (``"none"`` holds more per chunk).
      memory_budget: bytes the temporaries may take; the chunk is the largest
        the platform's rule allows within it (more memory, fewer chunks), or
        the smallest it allows (16 tokens on CPU, 512 on accelerators) when
        even the gradient accumulators exceed the budget.

    Returns:
      A frozen, printable :class:`LinearCrossEntropyPlan`.

    Example:
      >>> import jax.numpy as jnp, jaxce
      >>> plan = jaxce.plan_linear_cross_entropy(8192, 2304, 256000, jnp.bfloat16, platform="gpu")
      >>> plan.chunk_size, plan.vocab_block
      (1024, 256000)
    """
    for name, value, minimum in (
        ("num_tokens", num_tokens, 0),
        ("dim", dim, 1),
        ("vocab", vocab, 1),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    if memory_budget is not None and (
        not isinstance(memory_budget, int) or isinstance(memory_budget, bool) or memory_budget < 1
    ):
        raise ValueError(
            f"`memory_budget` must be a positive int (bytes) or None, got {memory_budget!r}."
        )
    _checks.check_reduction(reduction)
    key = jax.default_backend() if platform is None else platform
    if key not in _PLATFORMS:
        raise ValueError(f"`platform` must be one of {sorted(_PLATFORMS)} or None, got {key!r}.")
    resolved = _PLATFORMS[key]
    accelerator = resolved != "cpu"
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"`dtype` must be a floating dtype, got {dtype}.")
    bfloat16 = dtype == jnp.bfloat16
    per_token = reduction == "none"
    tokens = max(num_tokens, 1)
    # The chunks the platform's rule allows, largest (the default) first.
    if resolved == "cpu":
        vocab_block = min(
            vocab, max(_MIN_WEIGHT_BLOCK_ROWS, _WEIGHT_BLOCK_BYTES // (4 * max(dim, 1)))
        )
        default = default_chunk_size(tokens, vocab, per_token=per_token, bfloat16=bfloat16)
        allowed = range(default, min(_MIN_CHUNK, default) - 1, -1)
    else:
        vocab_block = vocab
        multiple, smallest = _ACCELERATOR_ROW_MULTIPLE, _ACCELERATOR_MIN_CHUNK
        # Without a budget, N / 8 rows; with one, as many as it allows.
        rows = tokens if memory_budget is not None else tokens // _ACCELERATOR_LOGITS_FRACTION
        # A batch of fewer than `smallest` tokens is one chunk of every token.
        smallest = min(smallest, -(-tokens // multiple) * multiple)
        rows = min(max(rows // multiple * multiple, smallest), -(-tokens // multiple) * multiple)
        allowed = range(rows, smallest - 1, -multiple)
    estimate = functools.partial(
        _estimated_temporaries,
        num_tokens,
        dim,
        vocab,
        vocab_block=vocab_block,
        bfloat16=bfloat16,
        accelerator=accelerator,
        per_token=per_token,
    )
    chunk = allowed[0]
    if memory_budget is not None:
        fitting = (c for c in allowed if estimate(min(c, tokens)) <= memory_budget)
        chunk = next(fitting, allowed[-1])
    chunk = min(chunk, tokens)
    accumulation = "float64" if dtype == jnp.float64 else "float32"
    estimated = estimate(chunk)
    # Accelerators: three products with bfloat16 operands, as every peer and the
    # materialised computation; the CPU multiplies the split halves as fast.
    products = ("bfloat16" if accelerator else "split") if bfloat16 else dtype.name
    return LinearCrossEntropyPlan(resolved, chunk, vocab_block, accumulation, estimated, products)
