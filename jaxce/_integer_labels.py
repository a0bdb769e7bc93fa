"""The integer-label rules, written once.

Every path computes the per-row terms of an integer-label loss in its own loop,
with the row formulas of `jaxce._formulas`:
`softmax_cross_entropy_with_integer_labels` (from the logits, or the Pallas
kernels), the vocabulary-parallel loss in `jaxce.sharded` (from per-shard
partial sums), `jaxce.derivatives` (the closed-form gradient) and
`linear_cross_entropy` (chunk by chunk). What combines the terms is here:

- which examples count: a label in ``[0, C)`` that is not ``ignore_index``, in a
  row with an included class; a label that is neither in range nor ignored is
  invalid and makes the loss NaN (an error under ``jaxce.checked``);
- PyTorch's class weighting and smoothing mix,
  ``(1 - eps) w_y (-log p_y) + (eps / C) sum_c w_c (-log p_c)``
  (`jaxce._formulas.smoothing_mix`), and the z-loss ``z (log Z)^2`` (not
  class-weighted);
- the reductions: ``"mean"`` divides the cross-entropy by the summed ``w_y`` of
  counted examples (their number without class weights; PyTorch's weighted
  mean, which divides by zero when counted weights sum to zero, as PyTorch
  does) and the z-loss by the number of counted examples; a mean over no
  counted example is 0. Invalid labels, and traced hyperparameters out of
  range, make every reduction NaN.

The reductions take a ``total`` function that sums over the batch: `jnp.sum`,
or a sum followed by a ``psum`` over the devices that share the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxce import _checks, _formulas
from jaxce._reduce import Reduction

Total = Callable[[jax.Array], jax.Array]


def check_options(
    reduction: Reduction, label_smoothing: Any, z_loss: Any, ignore_index: Any
) -> None:
    """The eager checks of the integer-label options every caller takes."""
    _checks.check_reduction(reduction)
    _checks.check_unit_interval(label_smoothing, "label_smoothing")
    _checks.check_nonnegative(z_loss, "z_loss")
    check_ignore_index(ignore_index)


def check_ignore_index(ignore_index: Any) -> None:
    """An int that fits in int64, or None."""
    if ignore_index is not None and (
        not isinstance(ignore_index, int) or isinstance(ignore_index, bool)
    ):
        raise TypeError(f"`ignore_index` must be an int or None, got {ignore_index!r}.")
    if ignore_index is not None and not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"`ignore_index` must fit in int64, got {ignore_index!r}.")


class LabelRule(NamedTuple):
    """Per example: whether it counts, whether its label is invalid, its class weight."""

    counted: jax.Array  # [...] bool
    invalid: jax.Array  # [...] bool: NaN loss
    label_weight: jax.Array | None  # [...] w_y; None without class weights
    options_valid: jax.Array | None  # scalar: traced hyperparameters in range
    # No ignore_index and no `where`: every example counts but those with an
    # invalid label, whose NaN is in any sum of the terms.
    all_count: bool = False


def ignored_labels(labels: jax.Array, ignore_index: int | None) -> jax.Array:
    """Where ``labels`` equal ``ignore_index`` (bool, ``labels``' shape)."""
    if ignore_index is None:
        return jnp.zeros(labels.shape, bool)
    if jnp.iinfo(labels.dtype).min <= ignore_index <= jnp.iinfo(labels.dtype).max:
        return labels == ignore_index
    return jnp.zeros(labels.shape, bool)  # an int64 ignore_index with int32 labels: none equal


def label_rule(
    labels: jax.Array,
    num_classes: int,
    *,
    class_weight: jax.Array | None,
    ignore_index: int | None,
    row_included: jax.Array | None,
    label_smoothing: ArrayLike = 0.0,
    z_loss: ArrayLike = 0.0,
) -> LabelRule:
    """Which examples count and with what weight.

    ``labels`` come from `_checks.as_integer_labels` (int32 or int64, so every
    class index and ``ignore_index`` compare exactly); ``row_included`` is
    False for rows whose classes are all excluded (None: all included);
    ``class_weight`` is the ``[C]`` vector (any sign, as in PyTorch).
    """
    in_range = (labels >= 0) & (labels < num_classes)
    ignored = ignored_labels(labels, ignore_index)
    # An example that `where` excludes takes no part: its label is not checked.
    _checks.check_values(
        in_range | ignored if row_included is None else in_range | ignored | ~row_included,
        labels,
        "labels",
        f"class indices in [0, {num_classes})"
        + (f" or ignore_index={ignore_index}" if ignore_index is not None else ""),
    )
    active = ~ignored if row_included is None else ~ignored & row_included
    label_weight = None
    if class_weight is not None:
        label_weight = class_weight[jnp.clip(labels, 0, num_classes - 1)]
    options_valid = _checks.all_valid(
        _checks.option_valid(label_smoothing, "label_smoothing", high=1.0),
        _checks.option_valid(z_loss, "z_loss"),
    )
    all_count = ignore_index is None and row_included is None
    return LabelRule(active & in_range, active & ~in_range, label_weight, options_valid, all_count)


def mix(
    label: jax.Array, smooth: jax.Array | None, label_smoothing: ArrayLike, num_classes: int
) -> jax.Array:
    """PyTorch's ``(1 - eps) w_y (-log p_y) + (eps / C) sum_c w_c (-log p_c)``.

    ``label`` is ``w_y (-log p_y)`` and ``smooth`` ``sum_c w_c (-log p_c)``
    (None without smoothing), or their gradients.
    """
    if smooth is None:
        return label
    smoothing = jnp.asarray(label_smoothing, label.dtype)
    return _formulas.smoothing_mix(label, smooth, smoothing, num_classes)


def loss(
    labels: jax.Array,
    nll: jax.Array,
    smooth: jax.Array | None,
    log_partition: jax.Array,
    *,
    num_classes: int,
    class_weight: jax.Array | None,
    ignore_index: int | None,
    row_included: jax.Array | None,
    label_smoothing: ArrayLike,
    z_loss: ArrayLike,
    reduction: Reduction,
    total: Total = jnp.sum,
) -> jax.Array:
    """The reduced integer-label loss from its per-row terms.

    ``nll`` is ``-log p_y``, ``smooth`` ``sum_c w_c (-log p_c)`` (None without
    smoothing) and ``log_partition`` ``log Z``; `label_rule`, `row_terms` and
    `reduce_terms` do the rest.
    """
    rule = label_rule(
        labels,
        num_classes,
        class_weight=class_weight,
        ignore_index=ignore_index,
        row_included=row_included,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
    )
    terms = row_terms(
        rule,
        nll,
        smooth,
        log_partition,
        num_classes=num_classes,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
    )
    return reduce_terms(rule, terms, reduction, total)


class Terms(NamedTuple):
    """Per example, the parts of the loss, 0 where the example does not count.

    Kept apart until the reduction, which mixes them as PyTorch does: its mean
    divides the label term and the smoothing term by the denominator each.
    """

    label: jax.Array  # w_y (-log p_y)
    smooth: jax.Array | None  # sum_c w_c (-log p_c); None without smoothing
    z: jax.Array | None  # z (log Z)^2; None when z_loss is a concrete zero
    label_smoothing: ArrayLike
    num_classes: int

    def mixed(self, label: jax.Array, smooth: jax.Array | None) -> jax.Array:
        return mix(label, smooth, self.label_smoothing, self.num_classes)


def row_terms(
    rule: LabelRule,
    nll: jax.Array,
    smooth: jax.Array | None,
    log_partition: jax.Array,
    *,
    num_classes: int,
    label_smoothing: ArrayLike,
    z_loss: ArrayLike,
) -> Terms:
    """The per-example `Terms` of the loss from ``-log p_y``, the smoothing sum and ``log Z``."""
    # Selected before the class weight multiplies it: an uncounted row's -log p_y
    # may be NaN or inf (every class excluded), and its weight's gradient must be 0.
    label = jnp.where(rule.counted, nll, 0)
    if rule.label_weight is not None:
        label = rule.label_weight * label
    if rule.label_weight is None:
        # An invalid label's NaN enters the sums with its example's term (no
        # reduction of its own); selected, so the valid examples' gradients
        # stay. Not with class weights: the weighted mean's denominator
        # depends on them, and a NaN sum would reach their gradient.
        label = jnp.where(rule.invalid, jnp.nan, label)
    if smooth is not None:
        smooth = jnp.where(rule.counted, smooth, 0)
    z_term = None
    if not _checks.is_concrete_zero(z_loss):
        # Uncounted rows (an empty row has log Z = -inf) stay out of the product.
        log_partition = jnp.where(rule.counted, log_partition, 0)
        z_term = _formulas.z_loss_term(jnp.asarray(z_loss, log_partition.dtype), log_partition)
        z_term = jnp.where(rule.counted, z_term, 0)
    return Terms(label, smooth, z_term, label_smoothing, num_classes)


def reduce_terms(
    rule: LabelRule, terms: Terms, reduction: Reduction, total: Total = jnp.sum
) -> jax.Array:
    """Applies ``reduction`` to the `Terms`, with NaN for invalid input."""
    smooth = terms.smooth
    if reduction == "none":
        per_example = terms.mixed(terms.label, smooth)
        if terms.z is not None:
            per_example = per_example + terms.z
        return nan_where_invalid(rule, per_example)
    if reduction == "sum":
        result = terms.mixed(total(terms.label), None if smooth is None else total(smooth))
        if terms.z is not None:
            result = result + total(terms.z)
    elif _plain_mean(rule, terms, total):
        result = _sum_over_examples(terms.label)
    else:
        mean = _Denominators.of(rule, terms.label.dtype, total)

        def average(x: jax.Array, denominator: jax.Array) -> jax.Array:
            return jnp.where(mean.anything, total(x) / denominator, 0)

        result = terms.mixed(
            average(terms.label, mean.cross_entropy),
            None if smooth is None else average(smooth, mean.cross_entropy),
        )
        if terms.z is not None:
            result = result + average(terms.z, mean.z_loss)
    # Without class weights the invalid labels' NaN is in the sums already,
    # except where a mean over no counted example selects 0.
    in_sums = rule.label_weight is None and (reduction == "sum" or _plain_mean(rule, terms, total))
    return result + nan_if_invalid(rule, result.dtype, total, labels=not in_sums)


def _plain_mean(rule: LabelRule, terms: Terms, total: Total) -> bool:
    """A mean without options on one device: only the label terms and their count."""
    options = terms.smooth is not None or terms.z is not None or rule.label_weight is not None
    return rule.all_count and not options and total is jnp.sum


def _sum_over_examples(label: jax.Array) -> jax.Array:
    """``sum(label) / N``: the mean without options, with no select around it.

    Every example counts (no ``ignore_index``, no ``where``), so the
    denominator is the number of examples, a constant: no pass over the
    labels forms it. An invalid label's NaN is in the sum, which makes the
    mean NaN whatever it is divided by. An empty batch sums to 0: the mean is 0.
    """
    return jnp.sum(label) / max(label.size, 1)


def nan_where_invalid(rule: LabelRule, per_example: jax.Array) -> jax.Array:
    """Per-example losses, NaN for invalid labels (everywhere for invalid options)."""
    per_example = jnp.where(rule.invalid, jnp.nan, per_example)
    return _checks.nan_unless(rule.options_valid, per_example)


def nan_if_invalid(
    rule: LabelRule, dtype: Any, total: Total = jnp.sum, *, labels: bool = True
) -> jax.Array:
    """NaN if any label is invalid (with ``labels``) or a traced option out of range, else 0.

    Added to a reduced loss, not selected, so that the gradients of the valid
    examples stay those of the summed per-example losses.
    """
    poisoned = total(rule.invalid.astype(dtype)) > 0 if labels else None
    if rule.options_valid is not None:
        valid = rule.options_valid
        poisoned = ~valid if poisoned is None else poisoned | ~valid
    if poisoned is None:
        return jnp.zeros((), dtype)
    return jnp.where(poisoned, jnp.nan, 0).astype(dtype)


class _Denominators(NamedTuple):
    """PyTorch's weighted-mean denominators (1 where no example counts)."""

    anything: jax.Array  # some example counts
    cross_entropy: jax.Array  # summed w_y of counted examples (their number without weights)
    z_loss: jax.Array  # number of counted examples

    @classmethod
    def of(cls, rule: LabelRule, dtype: Any, total: Total) -> _Denominators:
        # Only "no example counted" avoids the division: counted examples whose
        # class weights sum to 0 divide by 0 (inf or NaN), as in PyTorch.
        # Without ignore_index or `where` every example counts: an invalid
        # label makes the loss NaN whatever the denominator, which is then the
        # number of examples, a constant (no pass over the labels).
        if rule.all_count:
            count = total(jnp.ones(rule.counted.shape, dtype))
            weights = count if rule.label_weight is None else total(rule.label_weight.astype(dtype))
        else:
            count = total(rule.counted.astype(dtype))
            weights = (
                count
                if rule.label_weight is None
                else total(jnp.where(rule.counted, rule.label_weight, 0).astype(dtype))
            )
        anything = count > 0
        return cls(anything, jnp.where(anything, weights, 1), jnp.where(anything, count, 1))


class GradientScales(NamedTuple):
    """Per example, what the gradients of its two terms are multiplied by."""

    cross_entropy: jax.Array  # [...]
    z_loss: jax.Array  # [...]


def gradient_scales(
    rule: LabelRule, reduction: Reduction, dtype: Any, total: Total = jnp.sum
) -> GradientScales:
    """1 (``"none"``, ``"sum"``) or the mean's ``1 / denominator`` for counted examples.

    0 for the others (ignored, excluded or invalid: their loss does not depend
    on the inputs), and for every example when none counts.
    """
    counted = rule.counted
    if reduction != "mean":
        one = counted.astype(dtype)
        return GradientScales(one, one)
    mean = _Denominators.of(rule, dtype, total)
    counted = counted & mean.anything
    return GradientScales(
        jnp.where(counted, 1 / mean.cross_entropy, 0), jnp.where(counted, 1 / mean.z_loss, 0)
    )
