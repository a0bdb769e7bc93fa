"""Arguments checked, flattened and bundled once: what the chunk loops read."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxce import _checks, _integer_labels
from jaxce._linear.plan import LinearCrossEntropyPlan, plan_linear_cross_entropy


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


class Prepared(NamedTuple):
    """One call, checked: its configuration (None without tokens), inputs and label rule."""

    config: Config | None
    inputs: Inputs
    rule: _integer_labels.LabelRule  # [N]: which tokens count, which are invalid
    compute: Any  # the dtype of the logits and of every accumulation
    labels_shape: tuple[int, ...]
    token_weights: jax.Array | None  # [N], shifted like the labels
    return_aux: bool


def prepare(
    hidden: ArrayLike,
    weight: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None,
    ignore_index: int | None,
    label_smoothing: ArrayLike,
    z_loss: ArrayLike,
    softcap: float | None,
    shift: int,
    chunk_size: int | None,
    plan: LinearCrossEntropyPlan | None,
    reduction: str,
    temperature: ArrayLike | None = None,
    token_weights: ArrayLike | None = None,
    vocab_size: int | None = None,
    return_aux: bool = False,
    axis_name: Hashable | None = None,
    total: Callable[[jax.Array], jax.Array] = jnp.sum,
) -> Prepared:
    """Checks the arguments and flattens the tokens; no work on the logits.

    With ``axis_name`` (inside ``shard_map``), ``weight`` is this device's
    slice of the classes along that mesh axis and ``labels`` are global;
    ``total`` sums over all the tokens (a ``psum`` over a batch axis too), for
    the mean's denominator.
    """
    hidden = _checks.as_float_array(hidden, "hidden")
    weight = _checks.as_float_array(weight, "weight")
    labels = _checks.as_integer_labels(labels)
    bias = _checks.optional_float(bias, "bias")
    _integer_labels.check_options(reduction, label_smoothing, z_loss, ignore_index)
    _check_arguments(hidden, weight, labels, bias, softcap, shift, chunk_size)
    temperature_valid = check_temperature(temperature)
    if token_weights is not None:
        token_weights = _checks.as_float_array(token_weights, "token_weights")
        if token_weights.shape != labels.shape:
            raise ValueError(
                f"`token_weights` must have the shape of `labels`, {labels.shape} (one "
                f"weight per token, aligned with the labels), got {token_weights.shape}."
            )
    if not isinstance(return_aux, bool):
        raise TypeError(f"`return_aux` must be True or False, got {return_aux!r}.")
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
    vocab, dim = weight.shape  # this device's classes
    num_shards = 1 if axis_name is None else jax.lax.axis_size(axis_name)
    check_vocab_size(vocab_size, vocab * num_shards)
    num_classes = vocab * num_shards if vocab_size is None else vocab_size
    labels_shape = labels.shape

    position_counts = None
    if shift:
        # Shift the labels, not `hidden` (which slicing would copy): position t
        # takes label t + k, and the last k positions (padded with the valid
        # label 0) are left out.
        labels = jnp.concatenate(
            [labels[..., shift:], jnp.zeros_like(labels[..., :shift])], axis=-1
        )
        if token_weights is not None:
            token_weights = jnp.concatenate(
                [token_weights[..., shift:], jnp.zeros_like(token_weights[..., :shift])], axis=-1
            )
        position_counts = jnp.arange(labels.shape[-1]) < labels.shape[-1] - shift
        position_counts = jnp.broadcast_to(position_counts, labels.shape).reshape(-1)
    labels = labels.reshape(-1)
    rule = _integer_labels.label_rule(
        labels,
        num_classes,
        class_weight=None,
        ignore_index=ignore_index,
        row_included=position_counts,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
    )
    rule = rule._replace(options_valid=_checks.all_valid(rule.options_valid, temperature_valid))
    target = jnp.clip(labels, 0, num_classes - 1).astype(jnp.int32)
    flat_hidden = hidden.reshape(-1, dim)
    num_tokens = flat_hidden.shape[0]
    # Without class weights the cross-entropy and z-loss terms of a token are
    # scaled alike: 1 for a counted token, or 1 / (number counted) for "mean".
    # Token weights scale both; "mean" then divides by their sum over the
    # counted tokens (as for class weights).
    flat_weights = None
    if token_weights is not None:
        flat_weights = token_weights.reshape(-1).astype(compute)
        rule = rule._replace(label_weight=flat_weights)
    row_weight = _integer_labels.gradient_scales(rule, reduction, compute, total).cross_entropy
    if flat_weights is not None:
        row_weight = row_weight * flat_weights

    config = None
    bfloat16 = matmul_dtype == jnp.bfloat16
    if num_tokens:
        if plan is None:
            plan = plan_linear_cross_entropy(
                num_tokens, dim, vocab, matmul_dtype, reduction=reduction
            )
        config = Config(
            num_tokens=num_tokens,
            chunk=min(plan.chunk_size if chunk_size is None else chunk_size, num_tokens),
            vocab_block=min(plan.vocab_block, vocab),
            softcap=None if softcap is None else float(softcap),
            smoothing=not _checks.is_concrete_zero(label_smoothing),
            z_loss=not _checks.is_concrete_zero(z_loss),
            axis_name=axis_name,
            num_shards=num_shards,
            temperature=temperature is not None,
            vocab_size=None if vocab_size == vocab * num_shards else vocab_size,
            aux=return_aux,
            bfloat16_products=bfloat16 and plan.gradient_products == "bfloat16",
            split_weight_product=bfloat16
            and plan.gradient_products == "split"
            and plan.platform != "cpu",
        )
    inputs = Inputs(
        hidden=flat_hidden,
        weight=weight,
        bias=bias,
        target=target,
        row_weight=row_weight,
        smoothing=jnp.asarray(label_smoothing, compute),
        z_coefficient=jnp.asarray(z_loss, compute),
        temperature=jnp.asarray(1.0 if temperature is None else temperature, compute),
    )
    return Prepared(config, inputs, rule, compute, labels_shape, flat_weights, return_aux)


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


def check_temperature(temperature: Any) -> jax.Array | None:
    """A positive, finite temperature: raises if concrete, else the validity flag (traced)."""
    if temperature is None:
        return None
    if isinstance(temperature, jax.core.Tracer):
        _checks.check_scalar(temperature, "temperature")
        valid = (temperature > 0) & jnp.isfinite(temperature)
        _checks.check_values(valid, temperature, "temperature", "positive and finite")
        return valid
    try:
        value = np.asarray(temperature, np.float64)
    except (TypeError, ValueError):
        value = np.asarray(np.nan)
    if value.ndim != 0 or not 0 < value < np.inf:
        raise ValueError(
            f"`temperature` must be a positive, finite scalar or None, got {temperature!r}."
        )
    return None


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
