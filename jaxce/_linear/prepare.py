"""Arguments checked, flattened and bundled once: what the chunk loops read."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxce import _checks, _integer_labels
from jaxce._linear.options import Options
from jaxce._linear.plan import plan_linear_cross_entropy
from jaxce._reduce import Reduction


@dataclasses.dataclass(frozen=True)
class Config:
    """Trace-time configuration of one call (hashable: a static argument)."""

    num_tokens: int
    chunk: int
    vocab_block: int
    softcap: float | None
    smoothing: bool
    z_loss: bool
    # Vocabulary parallelism (`jaxce.sharded`): `weight` holds this device's
    # contiguous slice of the classes, one of `num_shards` along `axis_name`.
    axis_name: Hashable | None = None
    num_shards: int = 1
    # Logits divided by a temperature (after the soft cap).
    temperature: bool = False
    # The classes at or past `vocab_size` (all devices counted) are padding:
    # probability 0 and zero gradients. None: every row of `weight` is a class.
    vocab_size: int | None = None
    # The per-token log-normaliser, entropy and argmax are formed too.
    aux: bool = False
    # bfloat16 inputs: the logits' gradient enters its products rounded to
    # bfloat16, or split into two bfloat16 halves (the hidden gradient's
    # product; the weight gradient's too with `split_weight_product`, else it
    # multiplies in float32). See the plan's `gradient_products`.
    bfloat16_products: bool = False
    split_weight_product: bool = False

    @property
    def num_chunks(self) -> int:
        return -(-self.num_tokens // self.chunk)

    def num_classes(self, local_vocab: int) -> int:
        """The real classes (all devices, padding left out), from the rows this device holds."""
        return local_vocab * self.num_shards if self.vocab_size is None else self.vocab_size


class Inputs(NamedTuple):
    """The arrays the chunk loops read (a pytree, differentiated as one argument)."""

    hidden: jax.Array  # [N, D] in the matmul dtype
    weight: jax.Array  # [V, D] in the matmul dtype
    bias: jax.Array | None  # [V]
    target: jax.Array  # [N] int32 labels clipped to [0, V)
    row_weight: jax.Array  # [N] weight of each token's loss for the reduction
    smoothing: jax.Array  # label smoothing, in the compute dtype
    z_coefficient: jax.Array  # z-loss coefficient, in the compute dtype
    temperature: jax.Array  # the logits' divisor (1 without one), in the compute dtype


class PreparedCall(NamedTuple):
    """One call, checked: its configuration (None without tokens), inputs and label rule."""

    config: Config | None
    inputs: Inputs
    rule: _integer_labels.LabelRule  # [N]: which tokens count, which are invalid
    compute: Any  # the dtype of the logits and of every accumulation
    labels_shape: tuple[int, ...]
    token_weights: jax.Array | None  # [N], shifted like the labels
    options: Options


def prepare_call(
    hidden: ArrayLike,
    weight: ArrayLike,
    labels: ArrayLike,
    bias: ArrayLike | None,
    options: Options,
    *,
    axis_name: Hashable | None = None,
    total: Callable[[jax.Array], jax.Array] = jnp.sum,
) -> PreparedCall:
    """Checks the arrays against the options and flattens the tokens; no work on the logits.

    With ``axis_name`` (inside ``shard_map``), ``weight`` is this device's
    slice of the classes along that mesh axis and ``labels`` are global;
    ``total`` sums over all the tokens (a ``psum`` over a batch axis too), for
    the mean's denominator.
    """
    hidden = _checks.as_float_array(hidden, "hidden")
    weight = _checks.as_float_array(weight, "weight")
    labels = _checks.as_integer_labels(labels)
    bias = _checks.optional_float(bias, "bias")
    _check_arrays(hidden, weight, labels, bias, options)
    compute = jnp.result_type(_checks.compute_dtype(hidden), _checks.compute_dtype(weight))
    matmul_dtype = jnp.result_type(hidden.dtype, weight.dtype)
    hidden, weight = hidden.astype(matmul_dtype), weight.astype(matmul_dtype)
    vocab, dim = weight.shape  # this device's classes
    num_shards = 1 if axis_name is None else jax.lax.axis_size(axis_name)
    check_vocab_size(options.vocab_size, vocab * num_shards)
    num_classes = vocab * num_shards if options.vocab_size is None else options.vocab_size

    shifted = _shift_labels(labels, options)
    rule = _integer_labels.label_rule(
        shifted.labels,
        num_classes,
        class_weight=None,
        ignore_index=options.ignore_index,
        row_included=shifted.positions,
        label_smoothing=options.label_smoothing,
        z_loss=options.z_loss,
    )
    options_valid = _checks.all_valid(rule.options_valid, options.temperature_valid())
    rule = rule._replace(options_valid=options_valid)
    token_weights = None
    if shifted.token_weights is not None:
        token_weights = shifted.token_weights.astype(compute)
    flat_hidden = hidden.reshape(-1, dim)
    num_tokens = flat_hidden.shape[0]
    config = None
    if num_tokens:
        config = _config(options, num_tokens, dim, vocab, matmul_dtype, axis_name, num_shards)
    inputs = Inputs(
        hidden=flat_hidden,
        weight=weight,
        bias=bias,
        target=jnp.clip(shifted.labels, 0, num_classes - 1).astype(jnp.int32),
        row_weight=_row_weights(rule, token_weights, options.reduction, compute, total),
        smoothing=jnp.asarray(options.label_smoothing, compute),
        z_coefficient=jnp.asarray(options.z_loss, compute),
        temperature=jnp.asarray(
            1.0 if options.temperature is None else options.temperature, compute
        ),
    )
    return PreparedCall(config, inputs, rule, compute, labels.shape, token_weights, options)


class _ShiftedLabels(NamedTuple):
    """The flattened labels (and token weights) each position predicts."""

    labels: jax.Array  # [N]
    token_weights: jax.Array | None  # [N]
    positions: jax.Array | None  # [N] False at the last k positions with shift=k; None: all


def _shift_labels(labels: jax.Array, options: Options) -> _ShiftedLabels:
    """Position ``t`` takes label ``t + k``; the last ``k`` positions predict nothing.

    The labels are shifted, not ``hidden`` (which slicing would copy); the last
    ``k`` positions get the valid label 0 and are left out of the count.
    """
    shift = options.shift
    token_weights = None if options.token_weights is None else jnp.asarray(options.token_weights)
    positions = None
    if shift:
        labels = jnp.concatenate(
            [labels[..., shift:], jnp.zeros_like(labels[..., :shift])], axis=-1
        )
        if token_weights is not None:
            token_weights = jnp.concatenate(
                [token_weights[..., shift:], jnp.zeros_like(token_weights[..., :shift])], axis=-1
            )
        positions = jnp.arange(labels.shape[-1]) < labels.shape[-1] - shift
        positions = jnp.broadcast_to(positions, labels.shape).reshape(-1)
    flat_weights = None if token_weights is None else jnp.reshape(token_weights, -1)
    return _ShiftedLabels(labels.reshape(-1), flat_weights, positions)


def _row_weights(
    rule: _integer_labels.LabelRule,
    token_weights: jax.Array | None,
    reduction: Reduction,
    compute: Any,
    total: Callable[[jax.Array], jax.Array],
) -> jax.Array:
    """``[N]``: what each token's loss is multiplied by in the reduced sum.

    Without class weights the cross-entropy and z-loss terms of a token are
    scaled alike: 1 for a counted token, or 1 / (number counted) for "mean".
    Token weights scale both; "mean" then divides by their sum over the
    counted tokens (as for class weights).
    """
    if token_weights is not None:
        # A token of weight 0 is masked out: a mask that masks every token is
        # an empty mean (0, with zero gradients), as `ignore_index` makes it.
        counted = rule.counted & (token_weights != 0)
        rule = rule._replace(counted=counted, label_weight=token_weights, all_count=False)
    row_weight = _integer_labels.gradient_scales(rule, reduction, compute, total).cross_entropy
    return row_weight if token_weights is None else row_weight * token_weights


def _config(
    options: Options,
    num_tokens: int,
    dim: int,
    vocab: int,
    matmul_dtype: Any,
    axis_name: Hashable | None,
    num_shards: int,
) -> Config:
    """The trace-time configuration: the plan's chunk and block, and which options are on."""
    plan = options.plan
    if plan is None:
        plan = plan_linear_cross_entropy(
            num_tokens, dim, vocab, matmul_dtype, reduction=options.reduction
        )
    chunk = plan.chunk_size if options.chunk_size is None else options.chunk_size
    bfloat16 = matmul_dtype == jnp.bfloat16
    vocab_size = options.vocab_size
    return Config(
        num_tokens=num_tokens,
        chunk=min(chunk, num_tokens),
        vocab_block=min(plan.vocab_block, vocab),
        softcap=None if options.softcap is None else float(options.softcap),
        smoothing=not _checks.is_concrete_zero(options.label_smoothing),
        z_loss=not _checks.is_concrete_zero(options.z_loss),
        axis_name=axis_name,
        num_shards=num_shards,
        temperature=options.temperature is not None,
        vocab_size=None if vocab_size == vocab * num_shards else vocab_size,
        aux=options.return_aux,
        bfloat16_products=bfloat16 and plan.gradient_products == "bfloat16",
        split_weight_product=bfloat16
        and plan.gradient_products == "split"
        and plan.platform != "cpu",
    )


def _check_arrays(
    hidden: jax.Array,
    weight: jax.Array,
    labels: jax.Array,
    bias: jax.Array | None,
    options: Options,
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
    token_weights = options.token_weights
    if token_weights is not None and jnp.shape(token_weights) != labels.shape:
        raise ValueError(
            f"`token_weights` must have the shape of `labels`, {labels.shape} (one "
            f"weight per token, aligned with the labels), got {jnp.shape(token_weights)}."
        )
    shift = options.shift
    if shift and (not labels.shape or labels.shape[-1] <= shift):
        raise ValueError(
            f"`shift={shift}` needs `hidden` of shape [..., T, D] and `labels` [..., T] "
            f"with T > {shift} (position t predicts label t + {shift}); got `labels` of "
            f"shape {labels.shape}."
        )


def check_vocab_size(vocab_size: Any, rows: int) -> None:
    """``1 <= vocab_size <= rows`` (the rows of the embedding, all devices counted)."""
    if vocab_size is None:
        return
    if (
        not isinstance(vocab_size, int)
        or isinstance(vocab_size, bool)
        or not 1 <= vocab_size <= rows
    ):
        raise ValueError(
            f"`vocab_size` must be an int in [1, {rows}] (the rows of `weight`; the rows "
            f"past it are padding) or None, got {vocab_size!r}."
        )
