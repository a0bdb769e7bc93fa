"""The chunk loops: ``N`` tokens ``chunk`` at a time, never the ``[N, V]`` logits.

- :func:`weighted_loss`: ``sum_i r_i loss_i`` (``r`` the row weights of the
  reduction), one matrix product.
- :func:`weighted_loss_and_grads`: that sum and its gradients in one pass,
  three matrix products, by :func:`_gradients_blocked` (float32, float16,
  float64) or :func:`_gradients_whole` (bfloat16, or a vocabulary shard).
- :func:`per_token_forward` and :func:`per_token_tangent`: the per-token losses
  (keeping a shift and a log-normaliser per token) and the tangent map that reverse mode
  transposes, recomputing each chunk's logits once.

Vocabulary-parallel (``config.axis_name``, inside ``shard_map``): ``weight``
holds this device's slice of the classes, and each chunk's per-row maximum and
sums over the classes are completed over the shards (:func:`vocab_max`,
:func:`vocab_sum`: ``O(chunk)`` words per chunk). The losses are then the same
on every shard; each shard's gradients are those of its own classes, and its
hidden gradient is its share of the sum over the shards.

For one row with ``p = softmax(x)``, ``lse = log sum exp x`` and smoothing
``eps``, the gradient of ``(1 - eps)(lse - x_y) + (eps / V) sum_c (lse - x_c)
+ z lse^2`` with respect to the logits ``x`` is
``p (1 + 2 z lse) - eps / V - (1 - eps) onehot(y)``; the soft cap multiplies
it by ``1 - (x / c)^2``.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jaxce import _formulas, _integer_labels
from jaxce._linear import xla_cpu
from jaxce._linear.prepare import Config, Inputs

CONTRACT_DIM = (((1,), (1,)), ((), ()))  # [C, D] x [V, D] -> [C, V]
CONTRACT_VOCAB = (((1,), (0,)), ((), ()))  # [C, V] x [V, D] -> [C, D]
CONTRACT_TOKENS = (((0,), (0,)), ((), ()))  # [C, V] x [C, D] -> [V, D]


def is_zero(tangent: Any) -> bool:
    return tangent is None or isinstance(tangent, SymbolicZero)


def nonzero_tangent(tangent: Any, dtype: Any) -> jax.Array | None:
    """``tangent`` in ``dtype``, or None for a symbolic zero."""
    return None if is_zero(tangent) else tangent.astype(dtype)


def vocab_sum(config: Config, partial: jax.Array) -> jax.Array:
    """Per-row sums over this device's classes completed over all of them."""
    return partial if config.axis_name is None else jax.lax.psum(partial, config.axis_name)


def vocab_max(config: Config, partial: jax.Array) -> jax.Array:
    """Per-row maxima over this device's classes completed over all of them."""
    return partial if config.axis_name is None else jax.lax.pmax(partial, config.axis_name)


def varying_like(init: Any, *references: Any) -> Any:
    """``init`` (a loop's initial carry) typed as varying over every mesh axis the references vary over.

    Inside ``shard_map`` a loop's carry must keep its type: an accumulator
    that starts as replicated zeros and takes values that differ per device
    (inputs sharded over a batch axis; a slice of the classes) is declared
    varying from the start. Outside ``shard_map`` nothing varies.
    """
    axes = frozenset().union(*map(_vma, jax.tree_util.tree_leaves(references)))

    def cast(leaf: jax.Array) -> jax.Array:
        missing = tuple(axis for axis in axes if axis not in _vma(leaf))
        return jax.lax.pcast(leaf, missing, to="varying") if missing else leaf

    return jax.tree_util.tree_map(cast, init)


def _vma(value: Any) -> frozenset[Any]:
    """The mesh axes ``value`` varies over (none outside ``shard_map``).

    JAX spells it ``aval.mat.varying`` (0.10) or ``aval.vma`` (earlier).
    """
    aval = jax.typeof(value)
    mat = getattr(aval, "mat", None)
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def _token_side(inputs: Inputs) -> tuple[Any, ...]:
    """The inputs per-token values depend on (not ``weight``, which vocabulary shards split)."""
    return (inputs.hidden, inputs.target, inputs.row_weight, inputs.smoothing, inputs.z_coefficient)


def chunk_rows(config: Config, index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Start row of chunk ``index`` and which of its rows no earlier chunk covered.

    The last chunk is moved back to end at the last token (it overlaps the one
    before it) so that every chunk has the same static shape without padding,
    which would copy ``hidden``.
    """
    start = jnp.minimum(index * config.chunk, config.num_tokens - config.chunk)
    rows = start + jnp.arange(config.chunk)
    return start, rows >= index * config.chunk


def block_start(vocab: int, block: int, v_index: jax.Array) -> jax.Array:
    """First row of vocabulary block ``v_index``: the last block ends at the last row.

    It overlaps the one before it, so that every block has the same static
    shape (:func:`_without_covered_columns` drops the covered columns).
    """
    return jnp.minimum(v_index * block, vocab - block)


def label_mask(target: jax.Array, vocab: int) -> jax.Array:
    """``[C, V]``: True at each row's label column."""
    return jnp.arange(vocab)[None, :] == target[:, None]


def _logit_chain(config: Config, inputs: Inputs, x: jax.Array) -> jax.Array | None:
    """``dx / dz`` for the logits ``x = cap(z) / T`` (None when ``x = z``), from ``x``."""
    return _formulas.soften_slope(x, config.softcap, _temperature(config, inputs))


def _real_classes(config: Config, local_vocab: int, start: Any, width: int) -> jax.Array | None:
    """``[width]``: True at this device's columns ``start ..`` that are real classes.

    None without padding (``vocab_size``): every column is.
    """
    if config.vocab_size is None:
        return None
    first = start
    if config.axis_name is not None:
        first = first + jax.lax.axis_index(config.axis_name) * local_vocab
    return first + jnp.arange(width) < config.vocab_size


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


class Chunk(NamedTuple):
    """One chunk's rows and logits ``softcap(hidden @ weight.T + bias)``."""

    start: jax.Array  # first row
    fresh: jax.Array  # [C] rows no earlier chunk covered
    hidden: jax.Array  # [C, D] in the matmul dtype
    target: jax.Array  # [C] label columns among this device's classes
    logits: jax.Array  # [C, V] in the compute dtype, capped, tempered, -inf at padding
    local_max: jax.Array  # [C] the largest of this device's logits, per row
    label_logit: jax.Array  # [C], capped and tempered


def chunk_logits(config: Config, inputs: Inputs, index: jax.Array, compute: Any) -> Chunk:
    """The logits of chunk ``index``, their row maximum and their label column.

    The label column comes from the same product as the log-sum-exp, so that
    both round alike (a label that is the largest logit has ``x_y - m = 0``
    exactly, and ``-log p_y >= 0``). It is not gathered from the logits: XLA
    fuses such a gather into the first consumer of the log-sum-exp, after the
    exponential, so the logits would stay alive beside their exponential
    instead of being written over by it (two ``[C, V]`` buffers instead of
    one); it is read in the pass that finds the row maximum
    (:func:`xla_cpu.max_and_label_column`).
    """
    start, fresh = chunk_rows(config, index)
    hidden = xla_cpu.take_rows(inputs.hidden, start, config.chunk)
    target = jax.lax.dynamic_slice_in_dim(inputs.target, start, config.chunk)
    weight, bias = inputs.weight, inputs.bias
    if config.axis_name is not None:
        # The label's column among this device's classes (outside [0, V / n)
        # when another device holds it).
        target = target - jax.lax.axis_index(config.axis_name) * weight.shape[0]
    logits = jax.lax.dot_general(hidden, weight, CONTRACT_DIM, preferred_element_type=compute)
    if bias is not None:
        logits = logits + bias.astype(compute)[None, :]
    logits = soften(config, inputs, logits)
    real = _real_classes(config, weight.shape[0], 0, weight.shape[0])
    if real is not None:
        logits = jnp.where(real[None, :], logits, -jnp.inf)
    local_max, label_logit = xla_cpu.max_and_label_column(
        logits, label_mask(target, logits.shape[-1]), index
    )
    label_logit = vocab_sum(config, label_logit)
    return Chunk(start, fresh, hidden, target, logits, local_max, label_logit)


def _temperature(config: Config, inputs: Inputs) -> Any:
    """The temperature, None when it is not set."""
    return inputs.temperature if config.temperature else None


def soften(config: Config, inputs: Inputs, logits: jax.Array) -> jax.Array:
    """The soft cap and the temperature, if any (`_formulas.soften`)."""
    return _formulas.soften(logits, config.softcap, _temperature(config, inputs))


class RowLoss(NamedTuple):
    """Per-row cross-entropy (+ z-loss) of a chunk, and the softmax pieces it was made of."""

    loss: jax.Array  # [C]
    nll: jax.Array  # [C] -log p_label
    smooth: jax.Array | None  # [C] sum_c -log p_c, with smoothing
    exps: jax.Array  # [C, V] exp(x - row_max), written over the logits
    sum_exp: jax.Array  # [C]
    row_max: jax.Array  # [C, 1]
    log_partition: jax.Array  # [C] logsumexp(x)
    shifted_sum: jax.Array | None  # [C] sum_c (x_c - m) over the classes, with smoothing
    mean_shifted: jax.Array | None  # [C] sum_c p_c (x_c - m), for the entropy and d/dT
    argmax: jax.Array | None  # [C] the class of the largest logit (the first), with aux


def row_loss(
    config: Config, inputs: Inputs, chunk: Chunk, *, mean_shifted: bool = False
) -> RowLoss:
    """The rows' losses; ``mean_shifted`` (also with ``config.aux``) forms ``E_p[x] - m``."""
    logits = chunk.logits
    local_vocab = logits.shape[-1]
    vocab = config.num_classes(local_vocab)
    # lse = m + log sum_j exp(x_j - m) with m the row max: no exp overflows, and
    # -log p_y = log sum_j exp(x_j - m) - (x_y - m) has no lse - x_y cancellation.
    row_max, exps, sum_exp = _formulas.shifted_exponentials(
        logits,
        functools.partial(vocab_max, config),
        functools.partial(vocab_sum, config),
        chunk.local_max,
    )
    # sum_c -log p_c = V log sum_j exp(x_j - m) - sum_c (x_c - m)
    shifted_sum = None
    if config.smoothing:
        shifted = logits - row_max
        real = _real_classes(config, local_vocab, 0, local_vocab)
        if real is not None:
            shifted = jnp.where(real[None, :], shifted, 0)
        shifted_sum = vocab_sum(config, jnp.sum(shifted, axis=-1))
    log_normalizer = _formulas.log_of_total(sum_exp)
    nll = log_normalizer - (chunk.label_logit - row_max[:, 0])
    log_partition = log_normalizer + row_max[:, 0]
    loss, smooth = nll, None
    if shifted_sum is not None:
        smooth = vocab * log_normalizer - shifted_sum
        loss = _integer_labels.mix(nll, smooth, inputs.smoothing, vocab)
    if config.z_loss:
        loss = loss + _formulas.z_loss_term(inputs.z_coefficient, log_partition)
    expected = None
    if mean_shifted or config.aux:
        # sum_c p_c (x_c - m) = sum_c e_c log e_c / sum_c e_c with e = exp(x - m),
        # from the exponentials alone (the logits may already be written over).
        plogp = jnp.sum(jnp.where(exps > 0, exps * jnp.log(exps), 0), axis=-1)
        expected = vocab_sum(config, plogp) / sum_exp
    argmax = None
    if config.aux:
        argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        if config.axis_name is not None:
            # The first class of the largest logit: the lowest index among the
            # shards that hold the row maximum.
            offset = jax.lax.axis_index(config.axis_name) * local_vocab
            candidate = jnp.where(chunk.local_max == row_max[:, 0], argmax + offset, vocab)
            argmax = jax.lax.pmin(candidate, config.axis_name)
    return RowLoss(
        loss, nll, smooth, exps, sum_exp, row_max, log_partition, shifted_sum, expected, argmax
    )


def _smoothing(config: Config, inputs: Inputs, local_vocab: int) -> tuple[Any, Any]:
    """``(1 - eps, eps / V)``, the label's and every class's weight (``(1, 0)`` without smoothing)."""
    if not config.smoothing:
        return 1, 0
    return _formulas.smoothing_coefficients(inputs.smoothing, config.num_classes(local_vocab))


def _temperature_derivative(
    config: Config, inputs: Inputs, chunk: Chunk, losses: RowLoss
) -> jax.Array:
    """``[C]``: ``d loss_r / dT`` for the logits ``x = cap(z) / T``.

    ``dx / dT = -x / T``, so it is ``-(1/T) sum_c (d loss_r / dx_c) x_c`` with
    ``d loss_r / dx = p (1 + 2 z lse) - eps / V - (1 - eps) onehot(y)``: row sums
    the forward pass has (``sum_c p_c x_c = m + E_p[x - m]``), no pass over
    the logits.
    """
    assert losses.mean_shifted is not None
    row_max = losses.row_max[:, 0]
    p_term = row_max + losses.mean_shifted
    if config.z_loss:
        p_term = p_term * (1 + _formulas.z_loss_slope(inputs.z_coefficient, losses.log_partition))
    on_label, per_class = _smoothing(config, inputs, chunk.logits.shape[-1])
    label_term = on_label * chunk.label_logit
    if config.smoothing:
        assert losses.shifted_sum is not None
        vocab = config.num_classes(chunk.logits.shape[-1])
        p_term = p_term - per_class * (losses.shifted_sum + vocab * row_max)
    return -(p_term - label_term) / inputs.temperature


def _row_weights(config: Config, inputs: Inputs, chunk: Chunk) -> jax.Array:
    """``[C]`` row weights of the chunk, 0 on rows an earlier chunk covered."""
    weights = jax.lax.dynamic_slice_in_dim(inputs.row_weight, chunk.start, config.chunk)
    return jnp.where(chunk.fresh, weights, 0)


def _weighted_sum(weights: jax.Array, values: jax.Array) -> jax.Array:
    """``sum_i w_i v_i`` over the rows with ``w_i != 0`` (the others may be NaN or inf)."""
    return jnp.sum(jnp.where(weights != 0, weights * values, 0))


class LinearCrossEntropyAux(NamedTuple):
    """Per-token diagnostics from :func:`jaxce.linear_cross_entropy` with ``return_aux=True``.

    Each has the shape of the per-token losses (``labels``' shape, or
    ``[..., T - k]`` with ``shift=k``) and describes the softmax the loss uses:
    that of the logits after the soft cap and the temperature, padding
    classes left out. They are computed in the loss's own pass over the
    chunks (no extra matrix product) and are diagnostics: no gradient flows
    through them.
    """

    logsumexp: jax.Array  #: the log-normaliser ``log sum_c exp(x_c)`` (float32 for half inputs)
    entropy: jax.Array  #: the softmax's entropy ``-sum_c p_c log p_c``
    argmax: jax.Array  #: int32, the most probable class (the first of equal ones)


def _empty_aux(config: Config, inputs: Inputs) -> LinearCrossEntropyAux | None:
    if not config.aux:
        return None
    compute = inputs.row_weight.dtype
    floats = jnp.zeros((config.num_tokens,), compute)
    return varying_like(
        LinearCrossEntropyAux(floats, floats, jnp.zeros((config.num_tokens,), jnp.int32)),
        _token_side(inputs),
    )


def _put_rows(values: Any, start: jax.Array, chunk_values: Any) -> Any:
    """Writes a chunk's per-row values (a pytree) at rows ``start ..`` of ``[N]`` arrays.

    The rows the last chunk shares with the one before get the same values again.
    """
    return jax.tree_util.tree_map(
        lambda whole, part: jax.lax.dynamic_update_slice_in_dim(whole, part, start, 0),
        values,
        chunk_values,
    )


def _chunk_aux(
    aux: LinearCrossEntropyAux | None, chunk: Chunk, losses: RowLoss
) -> LinearCrossEntropyAux | None:
    """``aux`` with this chunk's rows written in."""
    if aux is None:
        return None
    assert losses.mean_shifted is not None and losses.argmax is not None
    entropy = jnp.log(losses.sum_exp) - losses.mean_shifted
    rows = LinearCrossEntropyAux(losses.log_partition, entropy, losses.argmax)
    return _put_rows(aux, chunk.start, rows)


def weighted_loss(config: Config, inputs: Inputs) -> tuple[jax.Array, LinearCrossEntropyAux | None]:
    """``sum_i row_weight_i * loss_i`` (and the aux) without gradients: one matrix product."""
    compute = inputs.row_weight.dtype

    def body(
        index: jax.Array, carry: tuple[jax.Array, LinearCrossEntropyAux | None]
    ) -> tuple[jax.Array, LinearCrossEntropyAux | None]:
        total, aux = carry
        chunk = chunk_logits(config, inputs, index, compute)
        losses = row_loss(config, inputs, chunk)
        total = total + _weighted_sum(_row_weights(config, inputs, chunk), losses.loss)
        return total, _chunk_aux(aux, chunk, losses)

    init = (varying_like(jnp.zeros((), compute), _token_side(inputs)), _empty_aux(config, inputs))
    return jax.lax.fori_loop(0, config.num_chunks, body, init)


class Wants(NamedTuple):
    """Which derivatives to form (those whose tangent is not a symbolic zero)."""

    hidden: bool
    weight: bool
    bias: bool
    temperature: bool = False
    row_weight: bool = False  # the per-token losses (d total / d row_weight)


class Totals(NamedTuple):
    """The carry of :func:`weighted_loss_and_grads`: the sum and its derivatives."""

    total: jax.Array
    smoothing: jax.Array | None  # d total / d label_smoothing
    z_loss: jax.Array | None  # d total / d z_loss
    temperature: jax.Array | None  # d total / d temperature
    token_losses: jax.Array | None  # [N] d total / d row_weight: each token's loss
    aux: LinearCrossEntropyAux | None
    hidden: jax.Array | None  # [N, D]
    weight: jax.Array | None  # [V, D]
    bias: jax.Array | None  # [V]


class Gradients(NamedTuple):
    """The gradients a vocabulary-block loop accumulates."""

    hidden: jax.Array | None  # [C, D]: the chunk's rows
    weight: jax.Array | None  # [V, D]
    bias: jax.Array | None  # [V]


class ChunkCoefficients(NamedTuple):
    """Per-row coefficients of a chunk's logit gradient (rows weighted by the reduction)."""

    row_scale: jax.Array  # [C, 1] weight (1 + 2 z lse) / sum exps: times exps, p's term
    offset: jax.Array  # [C, 1] weight eps / V: the smoothing term
    label: jax.Array  # [C] weight (1 - eps) dx_y/dz_y: the one-hot term


def _coefficients(
    config: Config, inputs: Inputs, chunk: Chunk, losses: RowLoss, weights: jax.Array
) -> ChunkCoefficients:
    scale = weights
    if config.z_loss:
        scale = scale * (1 + _formulas.z_loss_slope(inputs.z_coefficient, losses.log_partition))
    on_label, per_class = _smoothing(config, inputs, chunk.logits.shape[-1])
    label = on_label * weights
    chain = _logit_chain(config, inputs, chunk.label_logit)
    if chain is not None:
        label = label * chain
    offset = per_class * weights[:, None]
    return ChunkCoefficients((scale / losses.sum_exp)[:, None], offset, label)


def _dense_gradient(
    config: Config,
    inputs: Inputs,
    exps: jax.Array,
    logits: jax.Array,
    coefficients: ChunkCoefficients,
    real: jax.Array | None,
) -> jax.Array:
    """The gradient w.r.t. the logit columns ``logits``, all but the one-hot term.

    Exactly 0 at padding columns (``real`` False).
    """
    g = exps * coefficients.row_scale
    if config.smoothing:
        g = g - coefficients.offset
    chain = _logit_chain(config, inputs, logits)
    if chain is not None:
        g = g * chain
    if real is not None:
        g = jnp.where(real[None, :], g, 0)
    return g


def _add_row_values(
    config: Config,
    totals: Totals,
    inputs: Inputs,
    chunk: Chunk,
    losses: RowLoss,
    weights: jax.Array,
) -> Totals:
    """The sum and, as cheap by-products, its derivatives by the options and the row weights."""
    total = totals.total + _weighted_sum(weights, losses.loss)
    smoothing, z_loss, temperature = totals.smoothing, totals.z_loss, totals.temperature
    if config.smoothing:
        assert smoothing is not None and losses.smooth is not None
        vocab = config.num_classes(losses.exps.shape[-1])
        smoothing = smoothing + _weighted_sum(weights, losses.smooth / vocab - losses.nll)
    if config.z_loss:
        assert z_loss is not None
        z_loss = z_loss + _weighted_sum(weights, jnp.square(losses.log_partition))
    if temperature is not None:
        d_temperature = _temperature_derivative(config, inputs, chunk, losses)
        temperature = temperature + _weighted_sum(weights, d_temperature)
    token_losses = totals.token_losses
    if token_losses is not None:
        token_losses = _put_rows(token_losses, chunk.start, losses.loss)
    return totals._replace(
        total=total,
        smoothing=smoothing,
        z_loss=z_loss,
        temperature=temperature,
        token_losses=token_losses,
        aux=_chunk_aux(totals.aux, chunk, losses),
    )


def _store_hidden(config: Config, totals: Totals, chunk: Chunk, d_hidden: jax.Array) -> Totals:
    """Writes the chunk's fresh rows of the hidden gradient."""
    assert totals.hidden is not None
    old = jax.lax.dynamic_slice_in_dim(totals.hidden, chunk.start, config.chunk)
    rows = jnp.where(chunk.fresh[:, None], d_hidden, old)
    return totals._replace(
        hidden=jax.lax.dynamic_update_slice_in_dim(totals.hidden, rows, chunk.start, axis=0)
    )


def _add_rows(accumulator: jax.Array, start: jax.Array, update: jax.Array) -> jax.Array:
    """``accumulator[start:start + len(update)] += update``, in place."""
    old = jax.lax.dynamic_slice_in_dim(accumulator, start, update.shape[0])
    return jax.lax.dynamic_update_slice_in_dim(accumulator, old + update, start, axis=0)


def _without_covered_columns(
    g_block: jax.Array, v_index: jax.Array, v_start: jax.Array, vocab: int
) -> jax.Array:
    """Block ``v_index`` of the logit gradient, its columns an earlier block covered zeroed.

    The last block ends at the last column (so that every block has the same
    static shape); where it overlaps the one before it, those columns must not
    be added twice.
    """
    block = g_block.shape[-1]
    if vocab % block == 0:
        return g_block
    fresh = v_start + jnp.arange(block) >= v_index * block
    return jnp.where(fresh[None, :], g_block, 0)


def _add_weight_and_bias(
    carry: Gradients,
    g_block: jax.Array,
    hidden: jax.Array,
    v_start: jax.Array,
    *,
    split: bool = False,
) -> Gradients:
    """Adds ``g_block.T @ hidden`` and ``sum(g_block)`` to the block's rows of the gradients.

    The product multiplies in ``hidden``'s dtype (``g_block`` rounded to it,
    or for bfloat16 ``hidden`` and ``split`` by :func:`split_product`) and
    accumulates in the gradient's.
    """
    weight, bias = carry.weight, carry.bias
    if weight is not None:
        if split and hidden.dtype == jnp.bfloat16:
            update = split_product(g_block, hidden, CONTRACT_TOKENS)
        else:
            update = jax.lax.dot_general(
                g_block.astype(hidden.dtype),
                hidden,
                CONTRACT_TOKENS,
                preferred_element_type=weight.dtype,
            )
        weight = _add_rows(weight, v_start, update)
    if bias is not None:
        bias = _add_rows(bias, v_start, jnp.sum(g_block, axis=0))
    return carry._replace(weight=weight, bias=bias)


def weighted_loss_and_grads(config: Config, inputs: Inputs, wants: Wants) -> Totals:
    """The weighted loss and its gradients, chunk by chunk, in one pass.

    One ``[chunk, V]`` buffer is held per chunk (two for bfloat16): the logits,
    then their exponentials ``exp(x - row_max)`` written over them.
    Accumulation is in the compute dtype.
    """
    compute = inputs.row_weight.dtype
    vocab, dim = inputs.weight.shape

    def zeros(wanted: bool, shape: tuple[int, ...]) -> jax.Array | None:
        return jnp.zeros(shape, compute) if wanted else None

    # The sums are per token (the same on every vocabulary shard); the
    # gradients are each shard's own.
    total, smoothing, z_loss, temperature, token_losses = varying_like(
        (
            jnp.zeros((), compute),
            zeros(config.smoothing, ()),
            zeros(config.z_loss, ()),
            zeros(config.temperature and wants.temperature, ()),
            zeros(wants.row_weight, (config.num_tokens,)),
        ),
        _token_side(inputs),
    )
    hidden, weight, bias = varying_like(
        (
            zeros(wants.hidden, (config.num_tokens, dim)),
            zeros(wants.weight, (vocab, dim)),
            zeros(wants.bias, (vocab,)),
        ),
        inputs,
    )
    init = Totals(
        total,
        smoothing,
        z_loss,
        temperature,
        token_losses,
        _empty_aux(config, inputs),
        hidden,
        weight,
        bias,
    )
    if inputs.weight.dtype == jnp.bfloat16 or config.axis_name is not None:
        body = functools.partial(_gradients_whole, config, inputs, wants, compute)
    else:
        body = functools.partial(_gradients_blocked, config, inputs, wants, compute)
    return _loop(config.num_chunks, body, init)


def _gradients_blocked(
    config: Config, inputs: Inputs, wants: Wants, compute: Any, index: jax.Array, totals: Totals
) -> Totals:
    """One chunk (float32, float16, float64): the gradient formed a vocabulary block at a time.

    The dense part of the logit gradient (all but the one-hot term) is formed
    ``vocab_block`` columns at a time from the exponentials and pushed through
    the linear layer at once: the chunk's hidden gradient accumulates
    ``g_block @ W_block`` and the weight gradient's block of rows
    ``g_block.T @ h_chunk``, in place. With a soft cap the logits stay (the
    cap's derivative reads them) and the exponentials are recomputed block by
    block, so one ``[chunk, V]`` buffer is still all the chunk holds. The
    one-hot term is a gather of ``chunk`` rows of ``W`` and a scatter-add into
    ``chunk`` rows of the weight gradient.
    """
    weight = inputs.weight
    vocab, dim = weight.shape
    block = config.vocab_block
    chunk = chunk_logits(config, inputs, index, compute)
    losses = row_loss(config, inputs, chunk, mean_shifted=totals.temperature is not None)
    weights = _row_weights(config, inputs, chunk)
    totals = _add_row_values(config, totals, inputs, chunk, losses, weights)
    coefficients = _coefficients(config, inputs, chunk, losses, weights)
    hidden_up = chunk.hidden.astype(compute)

    def block_step(v_index: jax.Array, carry: Gradients) -> Gradients:
        v_start = block_start(vocab, block, v_index)
        x = jax.lax.dynamic_slice_in_dim(chunk.logits, v_start, block, axis=1)
        if config.softcap is None:
            exps = jax.lax.dynamic_slice_in_dim(losses.exps, v_start, block, axis=1)
        else:
            exps = jnp.exp(x - losses.row_max)
        real = _real_classes(config, vocab, v_start, block)
        g = _dense_gradient(config, inputs, exps, x, coefficients, real)
        g = _without_covered_columns(g, v_index, v_start, vocab)
        hidden = carry.hidden
        if hidden is not None:
            w_block = jax.lax.dynamic_slice_in_dim(weight, v_start, block).astype(compute)
            hidden = hidden + jax.lax.dot_general(
                g, w_block, CONTRACT_VOCAB, preferred_element_type=compute
            )
        return _add_weight_and_bias(carry._replace(hidden=hidden), g, hidden_up, v_start)

    blocks = Gradients(
        hidden=varying_like(jnp.zeros((config.chunk, dim), compute), inputs)
        if wants.hidden
        else None,
        weight=totals.weight,
        bias=totals.bias,
    )
    if wants.hidden or wants.weight or wants.bias:
        blocks = _loop(-(-vocab // block), block_step, blocks)
    # The one-hot term, -coefficients.label at (row, label).
    label = coefficients.label
    if wants.hidden:
        assert blocks.hidden is not None
        label_rows = xla_cpu.gather_rows(inputs.weight, chunk.target).astype(compute)
        totals = _store_hidden(config, totals, chunk, blocks.hidden - label[:, None] * label_rows)
    if wants.weight:
        assert blocks.weight is not None
        totals = totals._replace(
            weight=blocks.weight.at[chunk.target].add(-label[:, None] * hidden_up)
        )
    if wants.bias:
        assert blocks.bias is not None
        totals = totals._replace(bias=blocks.bias.at[chunk.target].add(-label))
    return totals


def _gradients_whole(
    config: Config, inputs: Inputs, wants: Wants, compute: Any, index: jax.Array, totals: Totals
) -> Totals:
    """One chunk (bfloat16, or a vocabulary shard): the whole logit gradient, then its blocks.

    The chunk's logit gradient, one-hot term included, is formed once in
    float32 (over the exponentials, which it replaces in memory); the hidden
    gradient is one product over the whole vocabulary (for bfloat16 by
    :func:`split_product`: no float32 copy of ``weight``, and no block of it
    sliced, which XLA:CPU would do through a float32 copy of the whole array),
    and the weight and bias gradients take its columns a block at a time. On a
    vocabulary shard the one-hot term is there only on the shard that holds
    the label, with no gather of label rows.
    """
    weight = inputs.weight
    vocab = weight.shape[0]
    block = config.vocab_block
    chunk = chunk_logits(config, inputs, index, compute)
    losses = row_loss(config, inputs, chunk, mean_shifted=totals.temperature is not None)
    weights = _row_weights(config, inputs, chunk)
    totals = _add_row_values(config, totals, inputs, chunk, losses, weights)
    coefficients = _coefficients(config, inputs, chunk, losses, weights)
    real = _real_classes(config, vocab, 0, vocab)
    g = _dense_gradient(config, inputs, losses.exps, chunk.logits, coefficients, real)
    # Rounded to bfloat16 for the products, the one-hot term (-1 / N per token
    # under "mean", the largest entry of a row) would carry bfloat16's whole
    # relative error into every gradient alike; kept out, it is added exactly.
    one_hot_apart = config.bfloat16_products
    label, target = coefficients.label, chunk.target
    if one_hot_apart:
        on_device = (target >= 0) & (target < vocab)
        label, target = jnp.where(on_device, label, 0), jnp.clip(target, 0, vocab - 1)
    else:
        g = g - jnp.where(label_mask(chunk.target, vocab), coefficients.label[:, None], 0)
    if wants.hidden:
        d_hidden = _times_weight(config, g, weight)
        if one_hot_apart:
            label_rows = xla_cpu.gather_rows(weight, target).astype(compute)
            d_hidden = d_hidden - label[:, None] * label_rows
        totals = _store_hidden(config, totals, chunk, d_hidden)
    # The weight gradient's product: bfloat16 rows of `hidden` as they are
    # (with `g` rounded to bfloat16 or split in two), or float32 ones.
    bfloat16_rows = config.bfloat16_products or config.split_weight_product
    hidden_up = chunk.hidden if bfloat16_rows else chunk.hidden.astype(compute)

    def block_step(v_index: jax.Array, carry: Gradients) -> Gradients:
        v_start = block_start(vocab, block, v_index)
        g_block = jax.lax.dynamic_slice_in_dim(g, v_start, block, axis=1)
        g_block = _without_covered_columns(g_block, v_index, v_start, vocab)
        return _add_weight_and_bias(
            carry, g_block, hidden_up, v_start, split=config.split_weight_product
        )

    if wants.weight or wants.bias:
        blocks = _loop(-(-vocab // block), block_step, Gradients(None, totals.weight, totals.bias))
        weight_grad, bias_grad = blocks.weight, blocks.bias
        if one_hot_apart and weight_grad is not None:
            update = -label[:, None] * chunk.hidden.astype(weight_grad.dtype)
            weight_grad = weight_grad.at[target].add(update)
        if one_hot_apart and bias_grad is not None:
            bias_grad = bias_grad.at[target].add(-label.astype(bias_grad.dtype))
        totals = totals._replace(weight=weight_grad, bias=bias_grad)
    return totals


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def split_product(g: jax.Array, other: jax.Array, dimension_numbers: Any) -> jax.Array:
    """``dot_general(g, other)`` for float32 ``g`` and bfloat16 ``other``, accumulated in float32.

    ``g`` is split into two bfloat16 parts, ``hi = bf16(g)`` and ``lo = bf16(g
    - hi)``, each multiplied by ``other`` as it is:
    ``hi + lo`` carries 16 of float32's 24 significant bits (relative error
    about 2^-17, far below bfloat16's 2^-9), and a float32 copy of ``other``
    (twice its size) is never made. Its derivative is that of the float32
    product.
    """
    hi = g.astype(other.dtype)
    lo = (g - hi.astype(g.dtype)).astype(other.dtype)
    product = functools.partial(
        jax.lax.dot_general,
        rhs=other,
        dimension_numbers=dimension_numbers,
        preferred_element_type=g.dtype,
    )
    return product(hi) + product(lo)


@split_product.defjvp
def _split_product_jvp(
    dimension_numbers: Any,
    primals: tuple[jax.Array, jax.Array],
    tangents: tuple[jax.Array, jax.Array],
) -> tuple[jax.Array, jax.Array]:
    g, other = primals
    t_g, t_other = tangents
    product = functools.partial(jax.lax.dot_general, dimension_numbers=dimension_numbers)
    tangent = product(t_g, other.astype(g.dtype)) + product(g, t_other.astype(g.dtype))
    return split_product(g, other, dimension_numbers), tangent


def _times_weight(config: Config, g: jax.Array, weight: jax.Array) -> jax.Array:
    """``g @ weight`` in ``g``'s dtype (the compute dtype).

    For bfloat16 ``weight``: ``g`` rounded to bfloat16 (``config.bfloat16_products``)
    or split into two bfloat16 halves (:func:`split_product`).
    """
    if weight.dtype == jnp.bfloat16 and config.bfloat16_products:
        return jax.lax.dot_general(
            g.astype(weight.dtype), weight, CONTRACT_VOCAB, preferred_element_type=g.dtype
        )
    if weight.dtype == jnp.bfloat16:
        return split_product(g, weight, CONTRACT_VOCAB)
    return jax.lax.dot_general(g, weight.astype(g.dtype), CONTRACT_VOCAB)


class PerToken(NamedTuple):
    """What the per-token forward pass keeps: a few floats per token."""

    loss: jax.Array  # [N]
    # [N] each token's log-sum-exp as its shift m and log-normaliser L, kept
    # apart: m + L would round L away at logits of 1e30 (ties there have p = 1/k).
    shift: jax.Array
    log_normalizer: jax.Array
    d_smoothing: jax.Array | None  # [N] d loss_i / d label_smoothing, with smoothing
    d_temperature: jax.Array | None  # [N] d loss_i / d temperature, when asked for
    aux: LinearCrossEntropyAux | None


def per_token_forward(config: Config, inputs: Inputs, *, temperature: bool = False) -> PerToken:
    """``[N]`` losses and log-normalisers (and the aux): one matrix product.

    ``temperature`` forms each loss's derivative by the temperature too.
    """
    compute = inputs.row_weight.dtype

    def body(index: jax.Array, out: PerToken) -> PerToken:
        chunk = chunk_logits(config, inputs, index, compute)
        losses = row_loss(config, inputs, chunk, mean_shifted=temperature)
        rows = out._replace(
            loss=losses.loss,
            shift=losses.row_max[:, 0],
            log_normalizer=_formulas.log_of_total(losses.sum_exp),
            aux=None,
        )
        if out.d_smoothing is not None:
            assert losses.smooth is not None
            vocab = config.num_classes(chunk.logits.shape[-1])
            rows = rows._replace(d_smoothing=losses.smooth / vocab - losses.nll)
        if out.d_temperature is not None:
            d_temperature = _temperature_derivative(config, inputs, chunk, losses)
            rows = rows._replace(d_temperature=d_temperature)
        aux = _chunk_aux(out.aux, chunk, losses)
        out = _put_rows(out._replace(aux=None), chunk.start, rows)
        return out._replace(aux=aux)

    empty = varying_like(jnp.zeros((config.num_tokens,), compute), _token_side(inputs))
    init = PerToken(
        empty,
        empty,
        empty,
        empty if config.smoothing else None,
        empty if temperature and config.temperature else None,
        _empty_aux(config, inputs),
    )
    return jax.lax.fori_loop(0, config.num_chunks, body, init)


class Tile(NamedTuple):
    """One (chunk, vocabulary block) tile of the per-token backward pass."""

    start: jax.Array  # first row of the chunk
    v_start: jax.Array  # first row of the vocabulary block
    hidden: jax.Array  # [C, D] the chunk's rows, in the matmul dtype
    weight: jax.Array  # [B, D] the block's rows of `weight`, in the matmul dtype
    gradient: jax.Array  # [C, B] the losses differentiated by the block's logits


def _tile(
    config: Config,
    inputs: Inputs,
    forward: PerToken,
    index: jax.Array,
    v_index: jax.Array,
    compute: Any,
) -> Tile:
    """Chunk ``index``'s losses differentiated by the logits (before the cap) of block ``v_index``.

    The block's logits are recomputed from its rows of ``weight``, and
    ``p = exp((x - m) - L)`` from the shift and log-normaliser the forward pass kept, so no
    row maximum or sum is needed: every (chunk, block) tile stands alone.
    The gradient is exactly 0 on rows an earlier chunk covered, on columns an
    earlier block covered, and on padding columns, so that summing over all
    tiles counts each (token, class) pair once.
    """
    weight = inputs.weight
    vocab = weight.shape[0]
    block = config.vocab_block
    start, fresh = chunk_rows(config, index)
    v_start = block_start(vocab, block, v_index)
    hidden = xla_cpu.take_rows(inputs.hidden, start, config.chunk)
    w_block = xla_cpu.take_rows(weight, v_start, block)
    x = jax.lax.dot_general(hidden, w_block, CONTRACT_DIM, preferred_element_type=compute)
    if inputs.bias is not None:
        x = x + jax.lax.dynamic_slice_in_dim(inputs.bias, v_start, block).astype(compute)[None, :]
    x = soften(config, inputs, x)
    shift = jax.lax.dynamic_slice_in_dim(forward.shift, start, config.chunk)
    log_normalizer = jax.lax.dynamic_slice_in_dim(forward.log_normalizer, start, config.chunk)
    p = _formulas.probabilities(x - shift[:, None], log_normalizer[:, None])
    if config.z_loss:
        lse = shift + log_normalizer
        p = p * (1 + _formulas.z_loss_slope(inputs.z_coefficient, lse))[:, None]
    target = jax.lax.dynamic_slice_in_dim(inputs.target, start, config.chunk) - v_start
    if config.axis_name is not None:
        target = target - jax.lax.axis_index(config.axis_name) * vocab
    on_label, per_class = _smoothing(config, inputs, vocab)
    g = p - jnp.where(label_mask(target, block), on_label, 0)
    if config.smoothing:
        g = g - per_class
    chain = _logit_chain(config, inputs, x)
    if chain is not None:
        g = g * chain
    real = _real_classes(config, vocab, v_start, block)
    if real is not None:
        g = jnp.where(real[None, :], g, 0)
    g = _without_covered_columns(g, v_index, v_start, vocab)
    return Tile(start, v_start, hidden, w_block, jnp.where(fresh[:, None], g, 0))


def per_token_tangent(
    config: Config, inputs: Inputs, forward: PerToken, tangents: Inputs
) -> jax.Array:
    """``[N]``: the tangent of each token's loss, ``<d loss_i / d inputs, tangents>``.

    Linear in the tangents, a (chunk, vocabulary block) tile at a time: with
    ``G`` a tile's logit gradient, ``t_i += <t_h_i, (G W_b)_i> + <G_i, h_i
    t_{W_b}^T + t_{b_b}>``. Reverse mode transposes it into ``d_h += c G W_b``,
    ``d_{W_b} += (c G)^T h`` and ``d_{b_b} += c G`` for the per-token
    cotangent ``c``: with the forward pass, four matrix products. Each tile
    reads its blocks of the tangents by slicing, which transposes into an
    in-place update of that block of the cotangent accumulators (XLA rewrites
    ``acc + update_slice(zeros, u)`` as ``update_slice(acc, acc_b + u)``), so
    the backward pass holds no weight-sized buffer besides the weight's
    cotangent. The tile is rematerialised: the backward pass recomputes its
    logits from the kept log-normaliser and saves nothing per tile. ``t_W``
    is cast to the compute dtype outside the loop, so that the weight's
    cotangent accumulates in float32 for bfloat16 inputs.
    """
    compute = forward.loss.dtype
    t_hidden = nonzero_tangent(tangents.hidden, compute)
    t_weight = nonzero_tangent(tangents.weight, compute)
    t_bias = nonzero_tangent(tangents.bias, compute)
    block = config.vocab_block
    num_blocks = -(-inputs.weight.shape[0] // block)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def tile_tangent(index: jax.Array, v_index: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The tile's first row and its ``[C]`` part of the tangent."""
        tile = _tile(config, inputs, forward, index, v_index, compute)
        g = tile.gradient
        tangent = jnp.zeros((config.chunk,), compute)
        if t_hidden is not None:
            t_rows = jax.lax.dynamic_slice_in_dim(t_hidden, tile.start, config.chunk)
            tangent = tangent + jnp.sum(t_rows * _times_weight(config, g, tile.weight), axis=-1)
        if t_weight is not None:
            t_block = jax.lax.dynamic_slice_in_dim(t_weight, tile.v_start, block)
            t_logits = jax.lax.dot_general(tile.hidden.astype(compute), t_block, CONTRACT_DIM)
            tangent = tangent + jnp.sum(g * t_logits, axis=-1)
        if t_bias is not None:
            tangent = tangent + g @ jax.lax.dynamic_slice_in_dim(t_bias, tile.v_start, block)
        return tile.start, tangent

    def step(total: jax.Array, tile: jax.Array) -> tuple[jax.Array, None]:
        start, tangent = tile_tangent(*jnp.divmod(tile, num_blocks))
        return _add_rows(total, start, tangent), None

    tangent = jnp.zeros((config.num_tokens,), compute)
    if t_hidden is not None or t_weight is not None or t_bias is not None:
        tiles = jnp.arange(config.num_chunks * num_blocks)
        tangent, _ = jax.lax.scan(
            step, varying_like(tangent, inputs, t_hidden, t_weight, t_bias), tiles
        )
        tangent = vocab_sum(config, tangent)
    t_smoothing = nonzero_tangent(tangents.smoothing, compute)
    if config.smoothing and t_smoothing is not None:
        assert forward.d_smoothing is not None
        tangent = tangent + forward.d_smoothing * t_smoothing
    t_z = nonzero_tangent(tangents.z_coefficient, compute)
    if config.z_loss and t_z is not None:
        tangent = tangent + jnp.square(forward.shift + forward.log_normalizer) * t_z
    t_temperature = nonzero_tangent(tangents.temperature, compute)
    if config.temperature and t_temperature is not None:
        assert forward.d_temperature is not None
        tangent = tangent + forward.d_temperature * t_temperature
    return tangent
