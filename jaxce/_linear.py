"""Linear + cross-entropy for large vocabularies, without the ``[tokens, vocab]`` logits.

The tokens are processed in chunks of ``chunk_size`` rows inside a loop; a
chunk's ``[chunk_size, V]`` logits are the largest thing alive at any time.

``"mean"`` and ``"sum"`` (a scalar loss) use a ``custom_jvp`` whose rule
computes the gradients with respect to ``hidden``, ``weight`` and ``bias`` in
the same pass as the loss: three matrix products in total, the same as the
unfused formulation. The tangent of the loss is then the inner product of those
gradients with the input tangents, which is linear, so reverse mode transposes
it into "scale the saved gradients by the cotangent" and forward mode works
too. Within a chunk the exponentials of the logits are written over them, and
the gradient of the logits is formed from them a block of vocabulary columns at
a time and pushed through both matrix products at once, so one
``[chunk_size, V]`` buffer is all the chunk holds. :func:`gradients`
returns those gradients directly (``jaxce.derivatives`` uses it).
``"none"`` (a loss per token) cannot use that trick, because the weight
gradient would depend on one cotangent per token; it differentiates through a
chunk loop whose body is rematerialised (``jax.checkpoint``), so the backward
pass recomputes each chunk's logits: four matrix products.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jax.typing import ArrayLike

from jaxce import _checks, _closed_form, _integer_labels

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
    ``per_token`` (``"none"``, whose backward pass holds two or three such
    buffers) and for ``bfloat16`` inputs (whose gradient holds the logits'
    bytes twice). The tokens are then split into ``ceil(num_tokens / rows)``
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
        gradients (XLA's ``memory_analysis().temp_size_in_bytes`` on CPU, within
        about 15%), gradient accumulators included.
    """

    platform: str
    chunk_size: int
    vocab_block: int
    accumulation_dtype: str
    estimated_temporaries: int

    def __str__(self) -> str:
        return (
            f"LinearCrossEntropyPlan({self.platform}: {self.chunk_size}-token chunks, "
            f"{self.vocab_block}-row vocabulary blocks, {self.accumulation_dtype} "
            f"accumulation, ~{self.estimated_temporaries / 2**20:.1f} MiB of temporaries)"
        )


def _estimated_temporaries(
    num_tokens: int, dim: int, vocab: int, chunk: int, *, bfloat16: bool
) -> int:
    """Temporaries of the value and gradients, as XLA:CPU allocates them.

    One float32 ``[chunk, V]`` buffer (the logits, then their exponentials, and
    for float32 the gradient formed over them), a second one for bfloat16
    (where the chunk's whole logit gradient is formed); plus the float32
    gradient accumulators of ``weight`` and ``hidden``.
    """
    chunk_buffers = 2 if bfloat16 else 1
    return 4 * (chunk_buffers * chunk * vocab + vocab * dim + num_tokens * dim)


def plan_linear_cross_entropy(
    num_tokens: int,
    dim: int,
    vocab: int,
    dtype: Any,
    *,
    platform: str | None = None,
    reduction: str = "mean",
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
    _checks.check_reduction(reduction)
    key = jax.default_backend() if platform is None else platform
    if key not in _PLATFORMS:
        raise ValueError(f"`platform` must be one of {sorted(_PLATFORMS)} or None, got {key!r}.")
    resolved = _PLATFORMS[key]
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
        rows = min(max(rows // multiple * multiple, smallest), -(-tokens // multiple) * multiple)
        allowed = range(rows, smallest - 1, -multiple)
    chunk = allowed[0]
    if memory_budget is not None:
        fitting = (
            c
            for c in allowed
            if _estimated_temporaries(num_tokens, dim, vocab, min(c, tokens), bfloat16=bfloat16)
            <= memory_budget
        )
        chunk = next(fitting, allowed[-1])
    chunk = min(chunk, tokens)
    accumulation = "float64" if dtype == jnp.float64 else "float32"
    estimate = _estimated_temporaries(num_tokens, dim, vocab, chunk, bfloat16=bfloat16)
    return LinearCrossEntropyPlan(resolved, chunk, vocab_block, accumulation, estimate)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Trace-time configuration of one call (hashable: a `nondiff_argnum`)."""

    num_tokens: int
    chunk: int
    vocab_block: int
    softcap: float | None
    smoothing: bool
    z_loss: bool

    @property
    def num_chunks(self) -> int:
        return -(-self.num_tokens // self.chunk)


def _chunk_rows(static: _Static, index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Start row of chunk ``index`` and which of its rows no earlier chunk covered.

    The last chunk is moved back to end at the last token (it overlaps the one
    before it) so that every chunk has the same static shape without padding,
    which would copy ``hidden``.
    """
    start = jnp.minimum(index * static.chunk, static.num_tokens - static.chunk)
    rows = start + jnp.arange(static.chunk)
    return start, rows >= index * static.chunk


def _cap(static: _Static, logits: jax.Array) -> jax.Array:
    """The soft cap ``c * tanh(logits / c)``, if any."""
    if static.softcap is None:
        return logits
    return static.softcap * jnp.tanh(logits / static.softcap)


def _label_mask(target: jax.Array, vocab: int) -> jax.Array:
    """``[C, V]``: True at each row's label column."""
    return jnp.arange(vocab)[None, :] == target[:, None]


def _logits(
    static: _Static,
    hidden: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None,
    target: jax.Array,
    compute: Any,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """One chunk's logits ``softcap(hidden @ weight.T + bias)``, label column and label rows.

    In ``compute``; the label rows are ``weight[target]``, which the gradient's
    one-hot term reads too.

    The label column is not gathered from the logits: XLA fuses such a gather
    into the first consumer of the log-sum-exp, after the exponential, so the
    logits would stay alive beside their exponential instead of being written
    over by it (two ``[C, V]`` buffers instead of one). It is the dot product
    of the hidden rows with their label rows of ``weight``; for bfloat16
    ``weight``, which XLA:CPU gathers through a float32 copy of the whole
    array, a masked row sum of the logits instead (exact: one nonzero term),
    and the label rows returned are None.
    """
    logits = jax.lax.dot_general(
        hidden, weight, (((1,), (1,)), ((), ())), preferred_element_type=compute
    )
    if bias is not None:
        logits = logits + bias.astype(compute)[None, :]
    logits = _cap(static, logits)
    if weight.dtype == jnp.bfloat16:
        label_mask = _label_mask(target, logits.shape[-1])
        return logits, jnp.sum(jnp.where(label_mask, logits, 0), axis=-1), None
    label_rows = jnp.take(weight, target, axis=0).astype(compute)
    label_logit = jnp.sum(hidden.astype(compute) * label_rows, axis=-1)
    if bias is not None:
        label_logit = label_logit + jnp.take(bias, target).astype(compute)
    return logits, _cap(static, label_logit), label_rows


def _row_loss(
    static: _Static,
    logits: jax.Array,
    label_logit: jax.Array,
    smoothing: jax.Array,
    z_coefficient: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-row cross-entropy (+ z-loss) of ``[C, V]`` logits, and the softmax pieces."""
    vocab = logits.shape[-1]
    # lse = m + log sum_j exp(x_j - m) with m the row max: no exp overflows, and
    # -log p_y = log sum_j exp(x_j - m) - (x_y - m) has no lse - x_y cancellation.
    row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    # sum_c -log p_c = V log sum_j exp(x_j - m) - sum_c (x_c - m)
    shifted_sum = jnp.sum(logits - row_max, axis=-1) if static.smoothing else None
    # Where the gradient reads `exps`, XLA:CPU writes them over the logits in
    # one pass and sums that; its fused exp-and-sum (used when only the sum
    # reads them) measured two to six times slower than the two passes.
    exps = jnp.exp(logits - row_max)
    sum_exp = jnp.sum(exps, axis=-1)
    log_normalizer = jnp.log(sum_exp)
    nll = log_normalizer - (label_logit - row_max[:, 0])
    log_partition = log_normalizer + row_max[:, 0]
    pieces = {
        "exps": exps,
        "sum_exp": sum_exp,
        "row_max": row_max,
        "log_partition": log_partition,
        "nll": nll,
    }
    loss = nll
    if shifted_sum is not None:
        smooth = vocab * log_normalizer - shifted_sum
        pieces["smooth"] = smooth
        loss = _integer_labels.mix(nll, smooth, None, smoothing, vocab)
    if static.z_loss:
        loss = loss + _closed_form.z_loss_term(z_coefficient, log_partition)
    return loss, pieces


def _weighted_loss_primal(
    static: _Static,
    hidden: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None,
    target: jax.Array,
    row_weight: jax.Array,
    smoothing: jax.Array,
    z_coefficient: jax.Array,
) -> jax.Array:
    """``sum_i row_weight_i * loss_i`` without gradients: one matrix product."""
    compute = row_weight.dtype

    def body(index: jax.Array, total: jax.Array) -> jax.Array:
        start, fresh = _chunk_rows(static, index)
        hidden_c = _take_rows(hidden, start, static.chunk)
        target_c = jax.lax.dynamic_slice_in_dim(target, start, static.chunk)
        weight_c = jnp.where(
            fresh, jax.lax.dynamic_slice_in_dim(row_weight, start, static.chunk), 0
        )
        logits, label_logit, _ = _logits(static, hidden_c, weight, bias, target_c, compute)
        loss, _ = _row_loss(static, logits, label_logit, smoothing, z_coefficient)
        return total + jnp.sum(jnp.where(weight_c != 0, weight_c * loss, 0))

    return jax.lax.fori_loop(0, static.num_chunks, body, jnp.zeros((), compute))


def _loop(length: int, body: Any, init: Any) -> Any:
    """``fori_loop(0, length, body, init)`` as a ``while_loop``.

    A ``fori_loop`` with static bounds is a ``scan``, and when the surrounding
    computation is differentiated JAX hoists the parts of a scan body that
    depend only on the loop index and constants out of the loop, stacked over
    the iterations: here, the weight's vocabulary blocks, a copy of ``W``.
    A ``while_loop`` is left as written.
    """

    def step(state: tuple[jax.Array, Any]) -> tuple[jax.Array, Any]:
        index, carry = state
        return index + 1, body(index, carry)

    return jax.lax.while_loop(lambda state: state[0] < length, step, (jnp.int32(0), init))[1]


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _take_rows(array: jax.Array, start: jax.Array, size: int) -> jax.Array:
    """``array[start:start + size]``, without a float32 copy of a bfloat16 ``array``.

    XLA:CPU does not slice bfloat16 arrays natively: it converts the whole array
    to float32 once (outside the loop) and slices that. Slicing the same bits as
    ``uint16`` costs one ``uint16`` view of the array instead (half that size).
    The derivative is the slice of the tangent (bits carry none).
    """
    if array.dtype != jnp.bfloat16:
        return jax.lax.dynamic_slice_in_dim(array, start, size)
    bits = jax.lax.bitcast_convert_type(array, jnp.uint16)
    rows = jax.lax.dynamic_slice_in_dim(bits, start, size)
    return jax.lax.bitcast_convert_type(rows, jnp.bfloat16)


@_take_rows.defjvp
def _take_rows_jvp(
    size: int, primals: tuple[jax.Array, jax.Array], tangents: tuple[Any, Any]
) -> tuple[jax.Array, jax.Array]:
    array, start = primals
    tangent = jax.lax.dynamic_slice_in_dim(tangents[0], start, size)
    return _take_rows(array, start, size), tangent


def _dense_logit_gradient(
    static: _Static, exps: jax.Array, x: jax.Array, scale: jax.Array, offset: jax.Array
) -> jax.Array:
    """The gradient of the loss w.r.t. logit columns ``x``, all but the one-hot term.

    ``exps = exp(x - row_max)`` and ``scale`` (the row's weight over
    ``sum exps``, times ``1 + 2 z lse`` under z-loss) make ``p * weight``;
    then ``- offset`` under smoothing, times ``1 - (x / c)^2`` under a soft cap.
    ``scale`` and ``offset`` are ``[C, 1]``.
    """
    g = exps * scale
    if static.smoothing:
        g = g - offset
    if static.softcap is not None:
        g = g * (1 - jnp.square(x / static.softcap))
    return g


@jax.custom_jvp
def _split_product(g: jax.Array, weight: jax.Array) -> jax.Array:
    """``g @ weight`` for float32 ``g`` and bfloat16 ``weight``, accumulated in float32.

    ``g`` is split into two bfloat16 parts, ``hi = bf16(g)`` and ``lo = bf16(g
    - hi)``, each multiplied by ``weight`` as it is:
    ``hi + lo`` carries 16 of float32's 24 significant bits (relative error
    about 2^-17, far below bfloat16's 2^-9), and a float32 copy of ``weight``
    (twice its size) is never made. Its derivative is that of the float32
    product.
    """
    hi = g.astype(weight.dtype)
    lo = (g - hi.astype(g.dtype)).astype(weight.dtype)
    product = functools.partial(
        jax.lax.dot_general,
        rhs=weight,
        dimension_numbers=(((1,), (0,)), ((), ())),
        preferred_element_type=g.dtype,
    )
    return product(hi) + product(lo)


@_split_product.defjvp
def _split_product_jvp(
    primals: tuple[jax.Array, jax.Array], tangents: tuple[jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array]:
    g, weight = primals
    t_g, t_weight = tangents
    tangent = t_g @ weight.astype(g.dtype) + g @ t_weight.astype(g.dtype)
    return _split_product(g, weight), tangent


def _is_zero(tangent: Any) -> bool:
    return tangent is None or isinstance(tangent, SymbolicZero)


def _weighted_loss_and_grads(
    static: _Static,
    hidden: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None,
    target: jax.Array,
    row_weight: jax.Array,
    smoothing: jax.Array,
    z_coefficient: jax.Array,
    *,
    want_hidden: bool,
    want_weight: bool,
    want_bias: bool,
) -> dict[str, jax.Array]:
    """The weighted loss and its gradients, chunk by chunk, in one pass.

    For one row with ``p = softmax(x)``, ``lse = log sum exp x`` and smoothing
    ``eps``, the gradient of ``(1 - eps)(lse - x_y) + (eps / V) sum_c (lse - x_c)
    + z lse^2`` with respect to the logits ``x`` is
    ``p (1 + 2 z lse) - eps / V - (1 - eps) onehot(y)``; the soft cap multiplies
    it by ``1 - (x / c)^2``.

    One ``[chunk, V]`` buffer is held: the chunk's logits, then their
    exponentials ``exp(x - row_max)`` written over them (without a soft cap;
    with one the logits stay, for the cap's derivative, and the exponentials
    are recomputed block by block). The dense part of the gradient (all but
    the one-hot term) is formed ``vocab_block`` columns at a time from it and
    pushed through the linear layer at once: the hidden gradient of the chunk
    accumulates ``g_block @ W_block`` and the weight gradient's rows of the
    block ``g_block.T @ h_chunk``, in place. The one-hot term is a gather of
    ``chunk`` rows of ``W`` and a scatter-add into ``chunk`` rows of the
    weight gradient. Accumulation is in ``compute`` precision. For bfloat16
    inputs the chunk's whole logit gradient (one-hot term included) is formed
    once, the hidden gradient is one product over the whole vocabulary
    (:func:`_split_product`), and the blocks take their columns of it.
    """
    compute = row_weight.dtype
    vocab, dim = weight.shape
    block = static.vocab_block
    num_blocks = -(-vocab // block)
    contract_tokens = (((0,), (0,)), ((), ()))
    contract_vocab = (((1,), (0,)), ((), ()))

    def body(index: jax.Array, carry: dict[str, jax.Array]) -> dict[str, jax.Array]:
        start, fresh = _chunk_rows(static, index)
        hidden_c = _take_rows(hidden, start, static.chunk)
        target_c = jax.lax.dynamic_slice_in_dim(target, start, static.chunk)
        weight_c = jnp.where(
            fresh, jax.lax.dynamic_slice_in_dim(row_weight, start, static.chunk), 0
        )
        counted = weight_c != 0
        logits, label_logit, label_rows = _logits(static, hidden_c, weight, bias, target_c, compute)
        loss, pieces = _row_loss(static, logits, label_logit, smoothing, z_coefficient)
        carry = dict(carry)
        carry["total"] = carry["total"] + jnp.sum(jnp.where(counted, weight_c * loss, 0))

        # d total / d eps and d total / d z: cheap by-products, so that a traced
        # `label_smoothing` or `z_loss` is differentiable too.
        if static.smoothing:
            d_smoothing = pieces["smooth"] / vocab - pieces["nll"]
            carry["smoothing"] = carry["smoothing"] + jnp.sum(
                jnp.where(counted, weight_c * d_smoothing, 0)
            )
        if static.z_loss:
            carry["z_loss"] = carry["z_loss"] + jnp.sum(
                jnp.where(counted, weight_c * jnp.square(pieces["log_partition"]), 0)
            )

        # Per-row coefficients of the gradient (rows not counted have a zero
        # `weight_c`, hence zero gradients).
        scale = weight_c
        if static.z_loss:
            scale = scale * (1 + 2 * z_coefficient * pieces["log_partition"])
        label_coefficient = weight_c
        if static.smoothing:
            label_coefficient = (1 - smoothing) * weight_c
        if static.softcap is not None:
            label_coefficient = label_coefficient * (1 - jnp.square(label_logit / static.softcap))
        # The products run in `compute` precision. (float16 inputs are upcast:
        # XLA:CPU then converts all of `weight` to float32 once, outside the loop.)
        hidden_up = hidden_c.astype(compute)
        row_scale = (scale / pieces["sum_exp"])[:, None]
        offset = (smoothing / vocab) * weight_c[:, None]

        def dense(v_start: jax.Array | int, size: int) -> jax.Array:
            """The dense gradient of logit columns ``[v_start, v_start + size)``."""
            x = jax.lax.dynamic_slice_in_dim(logits, v_start, size, axis=1)
            if static.softcap is None:
                exps = jax.lax.dynamic_slice_in_dim(pieces["exps"], v_start, size, axis=1)
            else:
                # Recomputed: the logits are read again for the soft cap's
                # derivative, and keeping both would hold two `[C, V]` buffers.
                exps = jnp.exp(x - pieces["row_max"])
            return _dense_logit_gradient(static, exps, x, row_scale, offset)

        # bfloat16: the chunk's whole logit gradient, one-hot term included, is
        # formed once (over the exponentials, which it replaces in memory) and
        # the hidden gradient is one product over the whole vocabulary (a block
        # of `weight` would be sliced, and XLA:CPU slices bfloat16 arrays
        # through a float32 copy of the whole array); the blocks below take
        # their columns of it for the weight and bias gradients.
        whole = None
        if want_hidden and hidden.dtype == jnp.bfloat16:
            one_hot = jnp.where(_label_mask(target_c, vocab), label_coefficient[:, None], 0)
            whole = dense(0, vocab) - one_hot
            whole_hidden = _split_product(whole, weight)
        blocks_hidden = want_hidden and whole is None

        def dense_block(v_index: jax.Array, inner: dict[str, jax.Array]) -> dict[str, jax.Array]:
            v_start = jnp.minimum(v_index * block, vocab - block)
            if whole is None:
                g = dense(v_start, block)
            else:
                g = jax.lax.dynamic_slice_in_dim(whole, v_start, block, axis=1)
            if vocab % block:
                # The last block ends at the last column; columns an earlier
                # block covered are zeroed so that they are not added twice.
                g = jnp.where((v_start + jnp.arange(block) >= v_index * block)[None, :], g, 0)
            inner = dict(inner)
            if blocks_hidden:
                w_block = jax.lax.dynamic_slice_in_dim(weight, v_start, block).astype(compute)
                inner["hidden"] = inner["hidden"] + jax.lax.dot_general(
                    g, w_block, contract_vocab, preferred_element_type=compute
                )
            if want_weight:
                update = jax.lax.dot_general(
                    g, hidden_up, contract_tokens, preferred_element_type=compute
                )
                old = jax.lax.dynamic_slice_in_dim(inner["weight"], v_start, block)
                inner["weight"] = jax.lax.dynamic_update_slice_in_dim(
                    inner["weight"], old + update, v_start, axis=0
                )
            if want_bias:
                old = jax.lax.dynamic_slice_in_dim(inner["bias"], v_start, block)
                inner["bias"] = jax.lax.dynamic_update_slice_in_dim(
                    inner["bias"], old + jnp.sum(g, axis=0), v_start, axis=0
                )
            return inner

        inner = {}
        if blocks_hidden:
            inner["hidden"] = jnp.zeros((static.chunk, dim), compute)
        if want_weight:
            inner["weight"] = carry["weight"]
        if want_bias:
            inner["bias"] = carry["bias"]
        if inner:
            inner = _loop(num_blocks, dense_block, inner)

        # The one-hot term, -label_coefficient at (row, label), unless `whole`
        # carries it.
        if want_hidden:
            if label_rows is None:  # bfloat16: `whole` carries the one-hot term
                d_hidden = whole_hidden
            else:
                d_hidden = inner["hidden"] - label_coefficient[:, None] * label_rows
            old = jax.lax.dynamic_slice_in_dim(carry["hidden"], start, static.chunk)
            carry["hidden"] = jax.lax.dynamic_update_slice_in_dim(
                carry["hidden"], jnp.where(fresh[:, None], d_hidden, old), start, axis=0
            )
        if want_weight:
            carry["weight"] = inner["weight"]
            if whole is None:
                carry["weight"] = (
                    carry["weight"].at[target_c].add(-label_coefficient[:, None] * hidden_up)
                )
        if want_bias:
            carry["bias"] = inner["bias"]
            if whole is None:
                carry["bias"] = carry["bias"].at[target_c].add(-label_coefficient)
        return carry

    init = {"total": jnp.zeros((), compute)}
    if static.smoothing:
        init["smoothing"] = jnp.zeros((), compute)
    if static.z_loss:
        init["z_loss"] = jnp.zeros((), compute)
    if want_hidden:
        init["hidden"] = jnp.zeros((static.num_tokens, dim), compute)
    if want_weight:
        init["weight"] = jnp.zeros((vocab, dim), compute)
    if want_bias:
        init["bias"] = jnp.zeros((vocab,), compute)
    return _loop(static.num_chunks, body, init)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _weighted_loss(
    static: _Static,
    hidden: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None,
    target: jax.Array,
    row_weight: jax.Array,
    smoothing: jax.Array,
    z_coefficient: jax.Array,
) -> jax.Array:
    return _weighted_loss_primal(
        static, hidden, weight, bias, target, row_weight, smoothing, z_coefficient
    )


def _weighted_loss_jvp(
    static: _Static, primals: tuple[Any, ...], tangents: tuple[Any, ...]
) -> tuple[jax.Array, jax.Array]:
    hidden, weight, bias, target, row_weight, smoothing, z_coefficient = primals
    t_hidden, t_weight, t_bias, _, _, t_smoothing, t_z = tangents
    out = _weighted_loss_and_grads(
        static,
        hidden,
        weight,
        bias,
        target,
        row_weight,
        smoothing,
        z_coefficient,
        want_hidden=not _is_zero(t_hidden),
        want_weight=not _is_zero(t_weight),
        want_bias=not _is_zero(t_bias),
    )
    compute = row_weight.dtype
    # The loss is differentiable, so its tangent is <gradient, input tangent>:
    # linear in the tangents, which reverse mode transposes into a scaling of
    # the gradients computed above (no logits are saved for the backward pass).
    tangent = jnp.zeros((), compute)
    for name, t in (("hidden", t_hidden), ("weight", t_weight), ("bias", t_bias)):
        if not _is_zero(t):
            tangent = tangent + jnp.sum(out[name] * t.astype(compute))
    if static.smoothing and not _is_zero(t_smoothing):
        tangent = tangent + out["smoothing"] * t_smoothing.astype(compute)
    if static.z_loss and not _is_zero(t_z):
        tangent = tangent + out["z_loss"] * t_z.astype(compute)
    return out["total"], tangent


_weighted_loss.defjvp(_weighted_loss_jvp, symbolic_zeros=True)


def _per_token_loss(
    static: _Static,
    hidden: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None,
    target: jax.Array,
    smoothing: jax.Array,
    z_coefficient: jax.Array,
    compute: Any,
) -> jax.Array:
    """``[N]`` losses, differentiable by JAX: the backward pass recomputes each chunk."""

    # Rematerialised: the backward pass keeps only the chunk index per chunk
    # and recomputes that chunk's logits, never holding `[N, V]`.
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def chunk_loss(index: jax.Array) -> jax.Array:
        start, _ = _chunk_rows(static, index)
        hidden_c = _take_rows(hidden, start, static.chunk)
        target_c = jax.lax.dynamic_slice_in_dim(target, start, static.chunk)
        logits, label_logit, _ = _logits(static, hidden_c, weight, bias, target_c, compute)
        loss, _ = _row_loss(static, logits, label_logit, smoothing, z_coefficient)
        return loss

    stacked = jax.lax.map(chunk_loss, jnp.arange(static.num_chunks))
    # The last chunk ends at the last token; only its last rows are new.
    tail = static.num_tokens - (static.num_chunks - 1) * static.chunk
    return jnp.concatenate([stacked[:-1].reshape(-1), stacked[-1, static.chunk - tail :]])


# The entry points of the chunk loops, compiled once per configuration. Each
# call builds fresh loop bodies (closures), so without `jit` here an eager
# call would trace and compile its loops anew every time; inside a caller's
# `jit` these are inlined.
_weighted_loss_jit = jax.jit(_weighted_loss, static_argnums=0)
_weighted_loss_and_grads_jit = jax.jit(
    _weighted_loss_and_grads,
    static_argnums=0,
    static_argnames=("want_hidden", "want_weight", "want_bias"),
)
_per_token_loss_jit = jax.jit(_per_token_loss, static_argnums=(0, 7))


def linear_cross_entropy(
    hidden: ArrayLike,
    weight: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: ArrayLike = 0.0,
    z_loss: ArrayLike = 0.0,
    softcap: float | None = None,
    shift: int = 0,
    chunk_size: int | None = None,
    plan: LinearCrossEntropyPlan | None = None,
    reduction: str = "mean",
) -> jax.Array:
    r"""Cross-entropy of ``softcap(hidden @ weight.T + bias)`` without holding the logits.

    Equal to :func:`softmax_cross_entropy_with_integer_labels` on the logits

    .. math::
        x = c \tanh\bigl((h W^\top + b) / c\bigr)

    (no ``tanh`` when ``softcap`` is None), with the same ``ignore_index``,
    ``label_smoothing``, ``z_loss`` and reductions, but the ``[N, V]`` logits
    are never materialised: the ``N`` tokens are processed ``chunk_size`` at a
    time, and the largest temporary is one ``[chunk_size, V]`` buffer (two
    or three with ``reduction="none"``) besides the gradients themselves.
    With ``reduction="mean"`` or ``"sum"`` the gradients are computed during the forward pass (three
    matrix products in total, like the unfused formulation); with ``"none"``
    the backward pass recomputes each chunk's logits (four).

    ``shift=1`` is next-token prediction: ``hidden[..., t, :]`` predicts
    ``labels[..., t + 1]`` and the last position predicts nothing; ``shift=k``
    predicts ``labels[..., t + k]`` (multi-token prediction) and the last
    ``k`` positions predict nothing.

    Args:
      hidden: ``[..., D]`` hidden states (any leading dimensions; with
        ``shift=1``, ``[..., T, D]``).
      weight: ``[V, D]`` output embedding (the logits are ``hidden @ weight.T``).
      labels: ``[...]`` integer labels (``hidden``'s shape without ``D``).
      bias: optional ``[V]`` output bias.
      ignore_index: label value of tokens to skip (e.g. ``-100``).
      label_smoothing: :math:`\varepsilon \in [0, 1)`; may be traced.
      z_loss: coefficient of PaLM's ``z_loss * logsumexp(x)**2``; may be traced.
      softcap: Gemma 2's logit soft cap :math:`c > 0`, or None.
      shift: ``k >= 0``, the offset of the predicted label (1 for next-token
        prediction); needs ``T > k``.
      chunk_size: tokens per chunk: a shortcut that overrides the plan's.
      plan: a :class:`jaxce.LinearCrossEntropyPlan` (chunk size, vocabulary
        block) from :func:`jaxce.plan_linear_cross_entropy`; None plans for
        ``jax.default_backend()`` (CPU: chunks tuned for its caches; GPU and
        TPU: chunks of at least 512 tokens and whole-vocabulary products).
      reduction: ``"mean"`` (over counted tokens; 0 with zero gradients when
        none is counted), ``"sum"``, or ``"none"`` (``[...]``, or
        ``[..., T - k]`` with ``shift=k``).

    Returns:
      The loss, float32 for half-precision inputs (float64 for float64).
      Gradients with respect to ``hidden``, ``weight`` and ``bias`` come back
      in their dtypes, accumulated in float32 (or float64). With bfloat16
      inputs no float32 copy of ``weight`` is made: the hidden gradient's
      product takes it as it is, with the float32 gradient of the logits as
      two bfloat16 parts (relative error about 2^-17).

    Example:
      >>> import jax.numpy as jnp, jaxce
      >>> h, w = jnp.ones((2, 4)), jnp.zeros((3, 4))
      >>> print(f"{float(jaxce.linear_cross_entropy(h, w, jnp.array([0, 2]))):.6f}")
      1.098612

    Reverse mode, ``jit``, ``vmap``, ``jax.checkpoint`` and forward mode
    (``jvp``, ``hessian``) work; forward mode on ``"mean"`` / ``"sum"``
    computes all first-order gradients, so it costs three matrix products too.
    Second order works forward-over-reverse (``jax.hessian``, ``jax.jacfwd`` of
    ``jax.grad``), not reverse-over-reverse: the chunk loop is a
    ``lax.while_loop``, which JAX cannot transpose (a ``scan`` would keep a
    hoisted copy of ``weight``). A label outside ``[0, V)`` that is not ``ignore_index`` makes its loss (and
    a reduced loss) NaN, with finite gradients; ``jaxce.checked`` raises.
    Logits of any finite size give finite losses.
    """
    prepared = _prepare(
        hidden,
        weight,
        labels,
        bias,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
        shift,
        chunk_size,
        reduction,
        plan,
    )
    compute, labels_shape = prepared.compute, prepared.labels_shape
    if prepared.static is None:
        if reduction != "none":
            return jnp.zeros((), compute)
        empty = jnp.zeros(labels_shape, compute)
        return empty[..., : labels_shape[-1] - shift] if shift else empty

    if reduction == "none":
        loss = _per_token_loss_jit(
            prepared.static,
            prepared.hidden,
            prepared.weight,
            prepared.bias,
            prepared.target,
            prepared.smoothing,
            prepared.z_coefficient,
            compute,
        )
        loss = jnp.where(prepared.rule.counted, loss, 0)
        loss = _integer_labels.nan_where_invalid(prepared.rule, loss).reshape(labels_shape)
        return loss[..., : labels_shape[-1] - shift] if shift else loss

    total = _weighted_loss_jit(*prepared.weighted_arguments())
    return total + _integer_labels.nan_if_invalid(prepared.rule, compute)


def gradients(
    hidden: ArrayLike,
    weight: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: ArrayLike = 0.0,
    z_loss: ArrayLike = 0.0,
    softcap: float | None = None,
    shift: int = 0,
    chunk_size: int | None = None,
    plan: LinearCrossEntropyPlan | None = None,
    reduction: str = "mean",
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Gradients of :func:`linear_cross_entropy` w.r.t. ``hidden``, ``weight``, ``bias``.

    Computed by the code of the loss's own derivative rule (chunk by chunk,
    three matrix products, no ``[N, V]`` logits, no autodiff). For
    ``reduction="none"`` they are the gradients of the summed per-token loss.
    Arguments as in :func:`linear_cross_entropy`; ``chunk_size`` changes only
    rounding.

    Returns:
      ``(d_hidden, d_weight, d_bias)`` in the shapes and dtypes of ``hidden``,
      ``weight`` and ``bias`` (accumulated in float32, or float64);
      ``d_bias`` is None without a bias. Tokens that are ignored, that
      ``shift=1`` leaves out, or whose label is out of range get zero
      ``hidden`` gradients and contribute nothing.
    """
    prepared = _prepare(
        hidden,
        weight,
        labels,
        bias,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
        shift,
        chunk_size,
        "sum" if reduction == "none" else reduction,
        plan,
    )
    # The gradients come back in the (floating) dtypes of the inputs.
    hidden_dtype = _checks.as_float_array(hidden, "hidden").dtype
    weight_dtype = _checks.as_float_array(weight, "weight").dtype
    hidden_shape = jnp.shape(hidden)
    vocab, dim = prepared.weight.shape
    bias_array = prepared.bias
    if prepared.static is None:
        d_hidden = jnp.zeros(hidden_shape, hidden_dtype)
        d_weight = jnp.zeros((vocab, dim), weight_dtype)
        d_bias = None if bias_array is None else jnp.zeros((vocab,), bias_array.dtype)
        return d_hidden, d_weight, d_bias
    out = _weighted_loss_and_grads_jit(
        *prepared.weighted_arguments(),
        want_hidden=True,
        want_weight=True,
        want_bias=bias_array is not None,
    )
    d_hidden = out["hidden"].reshape(hidden_shape).astype(hidden_dtype)
    d_weight = out["weight"].astype(weight_dtype)
    d_bias = None if bias_array is None else out["bias"].astype(bias_array.dtype)
    return d_hidden, d_weight, d_bias


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """Checked, flattened inputs shared by the loss and :func:`gradients`."""

    static: _Static | None  # None when there are no tokens
    hidden: jax.Array  # [N, D] in the matmul dtype
    weight: jax.Array  # [V, D] in the matmul dtype
    bias: jax.Array | None
    target: jax.Array  # [N] int32 labels clipped to [0, V)
    rule: _integer_labels.LabelRule  # [N]: which tokens count, which are invalid
    row_weight: jax.Array  # [N] weight of each token's loss for `reduction`
    smoothing: jax.Array
    z_coefficient: jax.Array
    compute: Any
    labels_shape: tuple[int, ...]

    def weighted_arguments(self) -> tuple[Any, ...]:
        """The arguments of ``_weighted_loss`` / ``_weighted_loss_and_grads``."""
        return (
            self.static,
            self.hidden,
            self.weight,
            self.bias,
            self.target,
            self.row_weight,
            self.smoothing,
            self.z_coefficient,
        )


def _prepare(
    hidden: ArrayLike,
    weight: ArrayLike,
    labels: ArrayLike,
    bias: ArrayLike | None,
    ignore_index: int | None,
    label_smoothing: ArrayLike,
    z_loss: ArrayLike,
    softcap: float | None,
    shift: int,
    chunk_size: int | None,
    reduction: str,
    plan: LinearCrossEntropyPlan | None = None,
) -> _Prepared:
    hidden = _checks.as_float_array(hidden, "hidden")
    weight = _checks.as_float_array(weight, "weight")
    labels = _checks.as_integer_labels(labels)
    bias = _checks.optional_float(bias, "bias")
    _integer_labels.check_options(reduction, label_smoothing, z_loss, ignore_index)
    _check_arguments(hidden, weight, labels, bias, softcap, shift, chunk_size)
    if plan is not None and not isinstance(plan, LinearCrossEntropyPlan):
        raise TypeError(
            "`plan` must be a LinearCrossEntropyPlan from "
            f"`jaxce.plan_linear_cross_entropy`, got {type(plan).__name__}."
        )
    if plan is not None and chunk_size is not None:
        raise ValueError(
            "Pass `chunk_size` or `plan`, not both (`chunk_size` is a shortcut for a "
            "plan's chunk size)."
        )

    compute = jnp.result_type(_checks.compute_dtype(hidden), _checks.compute_dtype(weight))
    matmul_dtype = jnp.result_type(hidden.dtype, weight.dtype)
    hidden, weight = hidden.astype(matmul_dtype), weight.astype(matmul_dtype)
    vocab, dim = weight.shape
    labels_shape = labels.shape

    position_counts = None
    if shift:
        # Shift the labels, not `hidden` (which slicing would copy): position t
        # takes label t + k, and the last k positions (padded with the valid
        # label 0) are left out.
        labels = jnp.concatenate(
            [labels[..., shift:], jnp.zeros_like(labels[..., :shift])], axis=-1
        )
        position_counts = jnp.arange(labels.shape[-1]) < labels.shape[-1] - shift
        position_counts = jnp.broadcast_to(position_counts, labels.shape).reshape(-1)
    labels = labels.reshape(-1)
    rule = _integer_labels.label_rule(
        labels,
        vocab,
        class_weight=None,
        ignore_index=ignore_index,
        row_included=position_counts,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
    )
    target = jnp.clip(labels, 0, vocab - 1).astype(jnp.int32)
    flat_hidden = hidden.reshape(-1, dim)
    num_tokens = flat_hidden.shape[0]
    # Without class weights the cross-entropy and z-loss terms of a token are
    # scaled alike: 1 for a counted token, or 1 / (number counted) for "mean".
    row_weight = _integer_labels.gradient_scales(rule, reduction, compute).cross_entropy

    static = None
    if num_tokens:
        if plan is None:
            plan = plan_linear_cross_entropy(
                num_tokens, dim, vocab, matmul_dtype, reduction=reduction
            )
        static = _Static(
            num_tokens=num_tokens,
            chunk=min(plan.chunk_size if chunk_size is None else chunk_size, num_tokens),
            vocab_block=min(plan.vocab_block, vocab),
            softcap=None if softcap is None else float(softcap),
            smoothing=not _checks.is_concrete_zero(label_smoothing),
            z_loss=not _checks.is_concrete_zero(z_loss),
        )
    return _Prepared(
        static=static,
        hidden=flat_hidden,
        weight=weight,
        bias=bias,
        target=target,
        rule=rule,
        row_weight=row_weight,
        smoothing=jnp.asarray(label_smoothing, compute),
        z_coefficient=jnp.asarray(z_loss, compute),
        compute=compute,
        labels_shape=labels_shape,
    )


def _check_arguments(
    hidden: jax.Array,
    weight: jax.Array,
    labels: jax.Array,
    bias: jax.Array | None,
    softcap: Any,
    shift: Any,
    chunk_size: Any,
) -> None:
    if hidden.ndim < 1:
        raise ValueError("`hidden` must have shape [..., D], got a scalar.")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"`weight` must have shape [V, D] with D = {hidden.shape[-1]} (the last "
            f"axis of `hidden`), got {weight.shape}. The logits are `hidden @ weight.T`; "
            "pass the transpose if your weight is [D, V]."
        )
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(
            f"`weight` has shape {weight.shape}: the vocabulary V and the hidden size D "
            "must both be at least 1."
        )
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"`labels` must have shape {hidden.shape[:-1]} (`hidden`'s shape without "
            f"its last axis), got {labels.shape}."
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"`bias` must have shape ({weight.shape[0]},), got {bias.shape}.")
    check_softcap(softcap)
    check_shift(shift, labels.shape)
    if chunk_size is not None and (
        not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
    ):
        raise ValueError(f"`chunk_size` must be a positive int or None, got {chunk_size!r}.")


def check_softcap(softcap: Any) -> None:
    if softcap is not None and (
        isinstance(softcap, (jax.core.Tracer, bool))
        or not isinstance(softcap, (int, float))
        or not softcap > 0
        or softcap == float("inf")
    ):
        raise ValueError(
            f"`softcap` must be a positive, finite Python float or None, got {softcap!r}."
        )


def check_shift(shift: Any, labels_shape: tuple[int, ...]) -> None:
    """``shift = k >= 0``: position ``t`` predicts label ``t + k``, so ``T > k``."""
    if not isinstance(shift, int) or isinstance(shift, bool) or shift < 0:
        raise ValueError(f"`shift` must be a non-negative int, got {shift!r}.")
    if shift and (not labels_shape or labels_shape[-1] <= shift):
        raise ValueError(
            f"`shift={shift}` needs `hidden` of shape [..., T, D] and `labels` [..., T] "
            f"with T > {shift} (position t predicts label t + {shift}); got `labels` of "
            f"shape {labels_shape}."
        )
