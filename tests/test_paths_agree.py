"""Every implementation path of the integer-label softmax cross-entropy, on the same hostile inputs.

DESIGN.md: "Every implementation path (XLA, Pallas, vocabulary-parallel, fused
under every plan, soft labels with one-hot targets, closed forms) gives the same
values, gradients and NaN/inf pattern". This file holds them to it. `CASES` is
a table of named batches: ordinary rows with hostile rows among them (logits
below -88, ties, +-1e30, +-3e38, -inf on and off the label, +inf, NaN, a row of
-inf, labels out of range or ignored, `where` per class and per example, zero
and negative class weights, a zero weight on a -inf logit) and the options of
the call. For every reduction, in float32 and bfloat16, each path:

- the Pallas kernel (interpret mode on CPU);
- the vocabulary-parallel loss in `jax.shard_map`, the classes over 4 devices
  and the batch over 2 (every case in one subprocess with 8 host devices,
  started with the module's first test so that it overlaps the others);
- the fused `linear_cross_entropy` with ``hidden = logits`` and ``weight = I``
  (exact for finite logits: finite rows only, no class weights, no `where`),
  under the default plan, CPU plans whose chunks and vocabulary blocks divide
  neither N nor C, bfloat16 gradient products, and the GPU and TPU plans;
- `softmax_cross_entropy` with one-hot targets (no `ignore_index`, no z-loss;
  its "mean" divides by the number of examples, so only without class weights;
  not on rows whose label `where` excludes, which docs/semantics.md makes differ);
- `jaxce.derivatives` against the gradient;

is compared with the reference: the same NaN pattern, the same infinities (same
sign), finite values within a tolerance derived from the dtype. Gradients are
of the reduced loss (of ``loss.sum()`` for ``"none"``), with respect to the
logits and, for the paths that take them, the class weights.

The reference is the XLA path, except where the documents decide: DESIGN.md's
Semantics and docs/semantics.md, transcribed plainly in float64 and
differentiated by `jax.grad` (`documented_loss`: PyTorch's products, so that a
zero class weight on a -inf logit that takes part is NaN while a class `where`
excludes contributes nothing), give the values and gradients of the rows whose
result those pages fix. Rows they leave open (+inf logits, a row of -inf) take
the XLA path's. `test_xla_path_agrees_with_the_documents` holds the XLA path
itself to the documented rows.

Tolerances (tests/conftest.py): every path computes in float32 and rounds a
half-precision gradient once to its dtype, so each is within
``half_precision_output_bound(dtype, OPERATIONS)`` of the exact value and two
within twice that of each other; ``OPERATIONS = 4 C + 16`` for a softmax row
with weights, smoothing and z-loss, plus ``N`` for the sums over the batch
(the fused loss's ``N + D + V + 16`` is smaller: D = V = C). Each row is
compared on its own scale, ``max(1, |loss|)`` and ``max(floor, max |gradient
row|)``, so that a row at 1e30 does not hide an error beside it.

Each compiled program takes the arrays as arguments, so the cases with the same
`Options` share one compilation per path and dtype: that keeps the quick run
within a minute. The bfloat16 half of every case and most fused plans are in
the slow sweep (``-m slow``; `make test` deselects it).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    REDUCTIONS,
    assert_normwise_close,
    half_precision_output_bound,
    rounding_bound,
    start_on_eight_host_devices,
)

import jaxce

NUM_CLASSES = 8  # two classes on each of the 4 devices of the vocabulary axis
BATCH = 10  # five rows on each of the 2 devices of the batch axis; chunks of 3 and 4 leave a rest
OPERATIONS = 4 * NUM_CLASSES + 16 + BATCH
INF, NAN = float("inf"), float("nan")


# --- the cases --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    """One example: its logits and label (None: drawn at random) and its `where` flags.

    ``classes``: the row's per-class `where` (None: every class takes part);
    ``included``: its per-example `where`. ``documented``: whether DESIGN.md and
    docs/semantics.md fix its loss (if not, the XLA path is the reference).
    """

    logits: tuple[float, ...] | None = None
    label: int | None = None
    classes: tuple[bool, ...] | None = None
    included: bool = True
    documented: bool = True

    @property
    def finite(self) -> bool:
        return self.logits is None or bool(np.all(np.isfinite(self.logits)))

    @property
    def label_in_range(self) -> bool:
        return self.label is None or 0 <= self.label < NUM_CLASSES

    @property
    def label_included(self) -> bool:
        return self.classes is None or self.label is None or self.classes[self.label]


def _except(*excluded: int) -> tuple[bool, ...]:
    return tuple(c not in excluded for c in range(NUM_CLASSES))


_BELOW_88 = tuple(-100.0 - c for c in range(NUM_CLASSES))  # every exp(x) underflows
_TIES = (3.0, 3.0, 3.0, -1.0, 0.0, 1.0, 3.0, -2.0)
_HUGE = (1e30, -1e30, 0.0, 1.0, 2.0, -3.0, 1e30, 5.0)
_NEAR_MAX = (3e38, -3e38, 0.0, 1.0, 2.0, -3.0, 4.0, 5.0)  # x - max(x) overflows to -inf
_MINUS_INF = (0.0, -INF, 1.0, 2.0, -1.0, 0.5, 0.0, 1.0)  # at class 1
_PLUS_INF = (0.0, INF, 1.0, 2.0, -1.0, 0.5, 0.0, 1.0)
_WITH_NAN = (0.0, NAN, 1.0, 2.0, -1.0, 0.5, 0.0, 1.0)

ROWS: dict[str, Row] = {
    "below_-88": Row(_BELOW_88, 3),
    "below_-88_label_max": Row(_BELOW_88, 0),
    "ties_label_tied": Row(_TIES, 1),
    "ties_label_not_tied": Row(_TIES, 3),
    "1e30_label": Row(_HUGE, 0),  # tied with another 1e30: loss log 2
    "1e30_other": Row(_HUGE, 3),  # loss 1e30
    "-1e30_label": Row(_HUGE, 1),  # loss 2e30
    "3e38_label": Row(_NEAR_MAX, 0),  # loss 0
    "-3e38_label": Row(_NEAR_MAX, 1),  # loss 6e38: inf in float32
    "minus_inf_other": Row(_MINUS_INF, 0),
    "minus_inf_label": Row(_MINUS_INF, 1),  # loss inf
    "plus_inf_other": Row(_PLUS_INF, 0, documented=False),
    "plus_inf_label": Row(_PLUS_INF, 1, documented=False),
    "nan_logit": Row(_WITH_NAN, 0),  # loss NaN
    "all_minus_inf": Row((-INF,) * NUM_CLASSES, 0, documented=False),
    "label_C": Row(label=NUM_CLASSES),  # loss NaN
    "label_-1": Row(label=-1),  # loss NaN (optax wraps it to the last class)
    "label_-100": Row(label=-100),  # ignored with ignore_index=-100, else NaN
    # Per-class `where`.
    "where_excludes_two": Row(label=0, classes=_except(2, 5)),
    "where_excludes_label": Row(label=4, classes=_except(4)),  # loss inf
    "where_excludes_all": Row(label=0, classes=_except(*range(NUM_CLASSES))),  # loss 0
    "where_excludes_nan": Row(_WITH_NAN, 0, classes=_except(1)),  # finite
    "where_excludes_minus_inf": Row(_MINUS_INF, 0, classes=_except(1)),
    "where_includes_minus_inf": Row(_MINUS_INF, 0, classes=_except(6)),
    # Per-example `where`.
    "excluded_example": Row(included=False),
    "excluded_nan_example": Row(_WITH_NAN, 0, included=False),  # loss 0
}

BELOW_88 = ("below_-88", "below_-88_label_max")
TIES = ("ties_label_tied", "ties_label_not_tied")
HUGE = ("1e30_label", "1e30_other", "-1e30_label")
NEAR_MAX = ("3e38_label", "-3e38_label")
MINUS_INF = ("minus_inf_other", "minus_inf_label")
WHERE_CLASSES = (
    "where_excludes_two",
    "where_excludes_label",
    "where_excludes_all",
    "where_excludes_nan",
    "where_excludes_minus_inf",
    "where_includes_minus_inf",
)

# A zero (class 3) and a negative (class 5) weight; class 1, the -inf logits', has 0.5.
CLASS_WEIGHTS = (1.0, 0.5, 2.0, 0.0, 1.5, -0.5, 1.0, 0.75)
# A zero weight on class 1, the -inf logits'.
ZERO_ON_MINUS_INF = (1.0, 0.0, 2.0, 0.5, 1.5, 1.0, 1.0, 0.75)


@dataclasses.dataclass(frozen=True)
class Options:
    """Everything but the arrays: cases with equal options share their compiled programs."""

    where: Literal["classes", "examples"] | None = None
    weighted: bool = False
    ignore_index: int | None = None
    label_smoothing: float = 0.0
    z_loss: float = 0.0

    def keywords(self) -> dict[str, Any]:
        """The keyword options every integer-label path takes (`where` and `weight` apart)."""
        return {
            "ignore_index": self.ignore_index,
            "label_smoothing": self.label_smoothing,
            "z_loss": self.z_loss,
        }


@dataclasses.dataclass(frozen=True)
class Case:
    """A batch (the named hostile rows among ordinary ones) and the options of one call."""

    name: str
    rows: tuple[str, ...]
    where: Literal["classes", "examples"] | None = None
    weight: tuple[float, ...] | None = None
    ignore_index: int | None = None
    label_smoothing: float = 0.0
    z_loss: float = 0.0

    def __str__(self) -> str:
        return self.name

    @property
    def options(self) -> Options:
        return Options(
            self.where,
            self.weight is not None,
            self.ignore_index,
            self.label_smoothing,
            self.z_loss,
        )

    def all_rows(self, predicate: Callable[[Row], bool]) -> bool:
        return all(predicate(ROWS[name]) for name in self.rows)

    @property
    def fused(self) -> bool:
        """`linear_cross_entropy` takes it: finite logits, no class weights, no `where`."""
        return self.all_rows(lambda row: row.finite) and self.weight is None and self.where is None

    @property
    def soft(self) -> bool:
        """One-hot targets say the same: labels in range, no ignore_index, no z-loss."""
        labels = self.all_rows(lambda row: row.label_in_range)
        return labels and self.ignore_index is None and self.z_loss == 0


ALL_OPTIONS: dict[str, Any] = {
    "weight": CLASS_WEIGHTS,
    "ignore_index": -100,
    "label_smoothing": 0.1,
    "z_loss": 1e-3,
}
ZERO_WEIGHT_OPTIONS = {**ALL_OPTIONS, "weight": ZERO_ON_MINUS_INF}

# Each row kind has its own case under each set of options, so that a failing
# id names it; cases with the same options share their compilations.
CASES = [
    # Each kind of hostile row, no options.
    Case("below_-88", BELOW_88),
    Case("ties", TIES),
    Case("plus_minus_1e30", HUGE),
    Case("plus_minus_3e38", NEAR_MAX),
    Case("minus_inf", MINUS_INF),
    Case("plus_inf", ("plus_inf_other", "plus_inf_label")),
    Case("nan_logit", ("nan_logit",)),
    Case("row_of_minus_inf", ("all_minus_inf",)),
    Case("labels_out_of_range_C_-1_-100", ("label_C", "label_-1", "label_-100")),
    Case("ignore_index_-100", ("label_-100", *TIES), ignore_index=-100),
    Case("where_per_class", WHERE_CLASSES, where="classes"),
    Case(
        "where_per_example", (*HUGE, "excluded_example", "excluded_nan_example"), where="examples"
    ),
    # Each option alone.
    Case("smoothing_0.1_below_-88_and_ties", BELOW_88 + TIES, label_smoothing=0.1),
    # (Smoothing sums x_c - m over the classes before scaling by eps / C: logits
    # beyond about 1.7e38 overflow that sum, so the near-maximum rows go without it.)
    Case("smoothing_0.1_1e30", HUGE, label_smoothing=0.1),
    Case("smoothing_0.1_minus_inf", MINUS_INF, label_smoothing=0.1),
    Case("z_loss_1e-3_below_-88_and_ties", BELOW_88 + TIES, z_loss=1e-3),
    Case("z_loss_1e-3_1e30", HUGE, z_loss=1e-3),
    Case("z_loss_1e-3_minus_inf", MINUS_INF, z_loss=1e-3),
    Case("class_weights_below_-88_and_ties", BELOW_88 + TIES, weight=CLASS_WEIGHTS),
    Case("class_weights_1e30", HUGE, weight=CLASS_WEIGHTS),
    Case("class_weights_minus_inf", MINUS_INF, weight=CLASS_WEIGHTS),
    Case("zero_weight_on_minus_inf_label", ("minus_inf_label",), weight=ZERO_ON_MINUS_INF),
    # Every option the fused loss takes.
    Case(
        "smoothing_z_loss_ignore_index_below_-88_and_ties",
        (*BELOW_88, *TIES, "label_-100"),
        ignore_index=-100,
        label_smoothing=0.1,
        z_loss=1e-3,
    ),
    Case(
        "smoothing_z_loss_ignore_index_1e30",
        (*HUGE, "label_-100"),
        ignore_index=-100,
        label_smoothing=0.1,
        z_loss=1e-3,
    ),
    # Every option. A zero class weight on a -inf logit in the smoothing term:
    # NaN where the class takes part (PyTorch's 0 * inf, "and here"), nothing
    # where `where` excludes it.
    Case("all_options_zero_weight_on_minus_inf", ("minus_inf_other", *TIES), **ZERO_WEIGHT_OPTIONS),
    Case(
        "all_options_zero_weight_on_minus_inf_where_includes_it",
        ("where_includes_minus_inf",),
        where="classes",
        **ZERO_WEIGHT_OPTIONS,
    ),
    Case(
        "all_options_zero_weight_on_minus_inf_where_excludes_it",
        ("where_excludes_minus_inf",),
        where="classes",
        **ZERO_WEIGHT_OPTIONS,
    ),
    Case(
        "all_options_zero_weight_on_minus_inf_where_per_example",
        ("minus_inf_other", *TIES),
        where="examples",
        **ZERO_WEIGHT_OPTIONS,
    ),
    Case(
        "all_options_where_per_example",
        (*TIES, "1e30_other", *MINUS_INF, "label_-100", "excluded_example"),
        where="examples",
        **ALL_OPTIONS,
    ),
    Case(
        "all_options_where_per_class",
        (*HUGE, *WHERE_CLASSES[:4], "label_-100"),
        where="classes",
        **ALL_OPTIONS,
    ),
    Case(
        "all_options_invalid_labels",
        ("ties_label_tied", "minus_inf_other", "label_C", "label_-1", "label_-100"),
        **ALL_OPTIONS,
    ),
    Case(
        "all_options_every_finite_and_minus_inf_row",
        (*BELOW_88, *TIES, "1e30_other", "-1e30_label", *MINUS_INF, "label_-100"),
        **ALL_OPTIONS,
    ),
]
CASES_BY_NAME = {case.name: case for case in CASES}
assert len(CASES_BY_NAME) == len(CASES)
assert all(len(case.rows) <= BATCH for case in CASES)

# Every case in float32 in the quick run, in bfloat16 in the slow sweep: the
# half-precision paths upcast to the float32 code, and both dtypes together take
# about four times the minute the quick run may.
QUICK = [(case, "float32") for case in CASES]
SLOW = [(case, "bfloat16") for case in CASES]


@dataclasses.dataclass(frozen=True)
class Inputs:
    logits: np.ndarray  # [N, C], the case's dtype
    labels: np.ndarray  # [N] int32
    where: np.ndarray | None  # [N, C] or [N] bool
    weight: np.ndarray | None  # [C] float32
    documented: np.ndarray  # [N] bool: the documents fix the row's loss
    soft: np.ndarray  # [N] bool: one-hot targets give the row the same loss


@functools.cache
def make_inputs(case_name: str, dtype: str) -> Inputs:
    """The case's hostile rows at odd positions first, ordinary rows between them."""
    case = CASES_BY_NAME[case_name]
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 2.0, (BATCH, NUM_CLASSES))
    labels = rng.integers(0, NUM_CLASSES, BATCH)
    classes = np.ones((BATCH, NUM_CLASSES), bool)
    included = np.ones(BATCH, bool)
    documented = np.ones(BATCH, bool)
    soft = np.ones(BATCH, bool)
    slots = [*range(1, BATCH, 2), *range(0, BATCH, 2)]
    for slot, name in zip(slots, case.rows, strict=False):
        row = ROWS[name]
        if row.logits is not None:
            logits[slot] = row.logits
        if row.label is not None:
            labels[slot] = row.label
        if row.classes is not None:
            classes[slot] = row.classes
        included[slot] = row.included
        documented[slot] = row.documented
        # docs/semantics.md: "Soft labels on an excluded class are ignored (as in
        # optax); an integer label on an excluded class costs inf."
        soft[slot] = row.label_included
    where = {"classes": classes, "examples": included, None: None}[case.where]
    weight = None if case.weight is None else np.asarray(case.weight, np.float32)
    return Inputs(
        np.asarray(jnp.asarray(logits, dtype)),
        labels.astype(np.int32),
        where,
        weight,
        documented,
        soft,
    )


# --- the paths: one compiled program per path, options and dtype ---------------------------

Result = dict[str, np.ndarray]  # "value", "grad" (logits), "grad_weight" (if the path takes it)
Results = dict[str, Result]  # by reduction
# (logits, labels, where, weight, reduction) -> the loss
Loss = Callable[[jax.Array, jax.Array, Any, Any, str], jax.Array]


def every_reduction(loss: Loss) -> Callable[..., Any]:
    """A jitted ``(logits, labels, where, weight) -> Results``: values and gradients.

    The gradient of each reduction's loss (of ``loss.sum()`` for ``"none"``)
    with respect to the logits and to ``weight`` (None without one).
    """

    def program(x: jax.Array, labels: jax.Array, where: Any, weight: Any) -> Any:
        results = {}
        for reduction in REDUCTIONS:

            def scalar(x: jax.Array, weight: Any, reduction: str = reduction) -> Any:
                value = loss(x, labels, where, weight, reduction)
                return (jnp.sum(value) if reduction == "none" else value), value

            (_, value), (grad, grad_weight) = jax.value_and_grad(
                scalar, argnums=(0, 1), has_aux=True
            )(x, weight)
            results[reduction] = {"value": value, "grad": grad}
            if grad_weight is not None:
                results[reduction]["grad_weight"] = grad_weight
        return results

    return jax.jit(program)


def run(program: Callable[..., Any], inputs: Inputs, weight: Any) -> Results:
    computed = program(inputs.logits, inputs.labels, inputs.where, weight)
    return {r: {k: np.asarray(v, np.float64) for k, v in d.items()} for r, d in computed.items()}


@functools.cache
def integer_label_program(options: Options, implementation: str) -> Callable[..., Any]:
    def loss(x: jax.Array, labels: jax.Array, where: Any, weight: Any, reduction: str) -> Any:
        return jaxce.softmax_cross_entropy_with_integer_labels(
            x,
            labels,
            -1,
            where,
            weight=weight,
            reduction=reduction,
            implementation=implementation,
            **options.keywords(),
        )

    return every_reduction(loss)


@functools.cache
def soft_label_program(options: Options) -> Callable[..., Any]:
    def loss(x: jax.Array, labels: jax.Array, where: Any, weight: Any, reduction: str) -> Any:
        return jaxce.softmax_cross_entropy(
            x,
            jax.nn.one_hot(labels, NUM_CLASSES, dtype=jnp.float32),
            where=where,
            weight=weight,
            label_smoothing=options.label_smoothing,
            reduction=reduction,
        )

    return every_reduction(loss)


@functools.cache
def closed_form_program(options: Options) -> Callable[..., Any]:
    def program(x: jax.Array, labels: jax.Array, where: Any, weight: Any) -> Any:
        return {
            reduction: {
                "grad": jaxce.derivatives.softmax_cross_entropy_with_integer_labels(
                    x, labels, -1, where, weight=weight, reduction=reduction, **options.keywords()
                )
            }
            for reduction in REDUCTIONS
        }

    return jax.jit(program)


# The fused loss's plans. Chunks of 3 and 4 tokens and vocabulary blocks of 3 and
# 5 rows divide neither N = 10 nor C = 8; "bfloat16" gradient products are the
# opt-out of the split ones; GPU and TPU plans are planned for this batch and,
# valid for any smaller one, for 4096 tokens. DESIGN.md: the plan is "Valid for
# every `num_tokens >= 0` on every platform".
PLANS = (
    "default",
    "cpu_chunk3_block3",
    "gpu_planned_for_this_batch",
    "cpu_chunk4_block5",
    "cpu_chunk3_block3_bfloat16_products",
    "tpu_planned_for_this_batch",
    "gpu_planned_for_4096_tokens",
)
_CPU_PLANS = {
    "cpu_chunk3_block3": (3, 3, None),
    "cpu_chunk4_block5": (4, 5, None),
    "cpu_chunk3_block3_bfloat16_products": (3, 3, "bfloat16"),
}


def make_plan(name: str, dtype: Any, reduction: str) -> jaxce.LinearCrossEntropyPlan | None:
    dtype = jnp.dtype(dtype)
    if name == "default":
        return None
    if name in _CPU_PLANS:
        chunk, block, products = _CPU_PLANS[name]
        products = products or ("split" if dtype == jnp.bfloat16 else dtype.name)
        return jaxce.LinearCrossEntropyPlan("cpu", chunk, block, "float32", 0, products)
    platform = name.split("_")[0]
    tokens = 4096 if name.endswith("4096_tokens") else BATCH
    return jaxce.plan_linear_cross_entropy(
        tokens, NUM_CLASSES, NUM_CLASSES, dtype, platform=platform, reduction=reduction
    )


def plans_for(dtype: str) -> tuple[str, ...]:
    """Bfloat16 gradient products only for bfloat16 inputs (float32 ones multiply in float32)."""
    return tuple(p for p in PLANS if dtype == "bfloat16" or not p.endswith("bfloat16_products"))


@functools.cache
def fused_program(options: Options, plan: str) -> Callable[..., Any]:
    """`linear_cross_entropy(logits, I, labels)`: its ``hidden`` gradient is the logits' one."""

    def loss(x: jax.Array, labels: jax.Array, where: Any, weight: Any, reduction: str) -> Any:
        identity = jnp.eye(NUM_CLASSES, dtype=x.dtype)  # logits @ I.T: exact for finite logits
        return jaxce.linear_cross_entropy(
            x,
            identity,
            labels,
            reduction=reduction,
            plan=make_plan(plan, x.dtype, reduction),
            **options.keywords(),
        )

    return every_reduction(loss)


@functools.cache
def results(path: str, case_name: str, dtype: str, plan: str = "default") -> Results:
    case, inputs = CASES_BY_NAME[case_name], make_inputs(case_name, dtype)
    if path == "closed_form":
        return run(closed_form_program(case.options), inputs, inputs.weight)
    if path == "soft_labels":
        return run(soft_label_program(case.options), inputs, inputs.weight)
    if path == "fused":
        return run(fused_program(case.options, plan), inputs, None)
    return run(integer_label_program(case.options, path), inputs, inputs.weight)


# --- the reference: the documented semantics in float64, the XLA path where they are silent ---


class Settings(NamedTuple):
    """A case's options as arrays, so that one compiled reference serves every case."""

    classes: Any  # [N, C] bool: the classes that take part
    examples: Any  # [N] bool: the examples that take part
    label_smoothing: Any
    z_loss: Any
    ignoring: Any  # bool: whether ignore_index is set
    ignore_index: Any  # int32


def documented_loss(
    x: jax.Array, labels: jax.Array, settings: Settings, weight: jax.Array, reduction: str
) -> jax.Array:
    """DESIGN.md's Semantics and docs/semantics.md, written plainly for `jax.grad` in float64.

    PyTorch's ``(1 - eps) w_y (-log p_y) + eps / C sum_c w_c (-log p_c)``, plus
    ``z (log Z)^2``, over the classes `where` includes: an excluded class
    contributes nothing whatever its weight (its terms are selected away before
    any product, so no NaN reaches a gradient); one that takes part multiplies
    as PyTorch does, so a zero weight on a -inf logit is ``0 * inf = NaN``, and
    the gradients are autodiff's, as PyTorch's are. An excluded label costs
    inf. Ignored examples, examples `where` excludes and rows with no class
    included count nowhere: loss 0, zero gradients. A label out of range makes
    its loss and every reduction NaN, with zero gradients. "mean" divides the
    cross-entropy by the summed ``w_y`` of the counted examples and the z-loss
    by their number (every example's, without ignore_index and `where`), and is 0 with zero
    gradients over nothing.
    """
    num_classes = x.shape[-1]
    eps, z, classes = settings.label_smoothing, settings.z_loss, settings.classes
    ignored = settings.ignoring & (labels == settings.ignore_index)
    in_range = (labels >= 0) & (labels < num_classes)
    invalid = settings.examples & ~ignored & ~in_range
    counted = settings.examples & ~ignored & in_range & jnp.any(classes, axis=-1)
    # Rows that do not count compute on zeros: nothing of theirs reaches a gradient.
    x = jnp.where(counted[:, None], jnp.where(classes, x, -jnp.inf), 0.0)
    row_max = jax.lax.stop_gradient(jnp.max(x, axis=-1))
    row_max = jnp.where(jnp.isinf(row_max), 0.0, row_max)
    log_normalizer = jnp.log(jnp.sum(jnp.exp(x - row_max[:, None]), axis=-1))
    neg_log_p = log_normalizer[:, None] - (x - row_max[:, None])  # inf where excluded
    label = jnp.clip(labels, 0, num_classes - 1)
    label_weight = weight[label]
    label_term = jnp.take_along_axis(neg_log_p, label[:, None], axis=-1)[:, 0]
    # Without smoothing (z-loss) there is no such term at all, not 0 * inf.
    taking_part = jnp.where(classes & (eps != 0), neg_log_p, 0.0)
    smooth = jnp.sum(weight[None, :] * taking_part, axis=-1)
    cross_entropy = (1 - eps) * label_weight * label_term + eps / num_classes * smooth
    log_partition = jnp.where(z != 0, row_max + log_normalizer, 0.0)
    z_term = z * log_partition**2
    # Each example's terms as float32 values, as the paths hold them: a reduction over
    # an example whose loss is beyond float32 (logits near its maximum) is inf.
    cross_entropy = jnp.where(counted, cross_entropy, 0.0).astype(jnp.float32).astype(x.dtype)
    z_term = jnp.where(counted, z_term, 0.0).astype(jnp.float32).astype(x.dtype)
    poison = jnp.where(jnp.any(invalid), jnp.nan, 0.0)
    if reduction == "none":
        return jnp.where(invalid, jnp.nan, cross_entropy + z_term)
    if reduction == "sum":
        return jnp.sum(cross_entropy) + jnp.sum(z_term) + poison
    # Without ignore_index and `where` every example counts: "mean" divides by their number
    # (a label out of range makes it NaN whatever the denominator).
    every_example = ~settings.ignoring & jnp.all(settings.examples) & jnp.all(settings.classes)
    counts = counted | every_example
    anything = jnp.any(counts)
    weights = jnp.where(anything, jnp.sum(jnp.where(counts, label_weight, 0.0)), 1.0)
    count = jnp.where(anything, jnp.sum(counts), 1)
    mean = jnp.sum(cross_entropy) / weights + jnp.sum(z_term) / count
    return jnp.where(anything, mean, 0.0) + poison


documented_program = every_reduction(documented_loss)


@functools.cache
def documented_results(case_name: str, dtype: str) -> Results:
    case, inputs = CASES_BY_NAME[case_name], make_inputs(case_name, dtype)
    settings = Settings(
        inputs.where if case.where == "classes" else np.ones((BATCH, NUM_CLASSES), bool),
        inputs.where if case.where == "examples" else np.ones(BATCH, bool),
        np.float64(case.label_smoothing),
        np.float64(case.z_loss),
        case.ignore_index is not None,
        np.int32(case.ignore_index or 0),
    )
    weight = np.ones(NUM_CLASSES) if inputs.weight is None else inputs.weight
    with jax.enable_x64(True):
        # float32 and bfloat16 values are exact in float64.
        computed = documented_program(
            np.asarray(inputs.logits, np.float64),
            inputs.labels,
            settings,
            weight.astype(np.float64),
        )
        computed = jax.tree.map(np.asarray, computed)
    # Rounded as the paths round their float32 results (1e57 is inf there).
    with np.errstate(over="ignore"):
        return jax.tree.map(lambda a: a.astype(np.float32).astype(np.float64), computed)


def reference(case_name: str, dtype: str, reduction: str) -> Result:
    """What every path must give: the documented result where the documents fix it, else XLA's.

    Per row for the losses of "none" and the gradients of the logits (a row's
    gradient depends on its own logits only); a reduced loss and the class
    weights' gradient only where every row is documented.
    """
    inputs = make_inputs(case_name, dtype)
    documented = documented_results(case_name, dtype)[reduction]
    xla = results("xla", case_name, dtype)[reduction]
    rows, every_row = inputs.documented, bool(inputs.documented.all())
    merged = {"grad": np.where(rows[:, None], documented["grad"], xla["grad"])}
    if reduction == "none":
        merged["value"] = np.where(rows, documented["value"], xla["value"])
    else:
        merged["value"] = documented["value"] if every_row else xla["value"]
    if "grad_weight" in xla:
        merged["grad_weight"] = documented["grad_weight"] if every_row else xla["grad_weight"]
    return merged


# --- comparison ------------------------------------------------------------------------


def _show(x: Any) -> str:
    return np.array2string(np.asarray(x, np.float64), precision=8, max_line_width=150)


def _mismatch(actual: Any, expected: Any, tolerance: float, what: str, floor: float) -> list[str]:
    try:
        assert_normwise_close(actual, expected, tolerance, what, floor=floor)
    except AssertionError as error:
        lines = [line for line in str(error).splitlines() if line.startswith(what)]
        reason = lines[0] if lines else f"{what}: {error}"
        return [f"{reason}\n    expected {_show(expected)}\n    got      {_show(actual)}"]
    return []


def compare(
    actual: Result, expected: Result, dtype: str, reduction: str, what: str, rows: Any = None
) -> list[str]:
    """Mismatches of ``actual`` against ``expected`` (the keys ``expected`` has), row by row.

    ``rows``: a boolean [N] of the rows to compare (None: all).
    """
    value_tolerance = 2 * rounding_bound(jnp.float32, OPERATIONS)  # losses are float32
    grad_tolerance = 2 * half_precision_output_bound(dtype, OPERATIONS)
    # A mean's gradients are divided by about the number of counted rows.
    grad_floor = 1 / BATCH if reduction == "mean" else 1.0
    selected = np.flatnonzero(np.ones(BATCH, bool) if rows is None else rows)
    problems = []
    if "value" in expected:
        if reduction == "none":
            for i in selected:
                problems += _mismatch(
                    actual["value"][i],
                    expected["value"][i],
                    value_tolerance,
                    f"{what} loss[{i}]",
                    1,
                )
        else:
            problems += _mismatch(
                actual["value"], expected["value"], value_tolerance, f"{what} loss", 1
            )
    if "grad" in expected:
        for i in selected:
            problems += _mismatch(
                actual["grad"][i],
                expected["grad"][i],
                grad_tolerance,
                f"{what} d/dlogits[{i}]",
                grad_floor,
            )
    if "grad_weight" in expected:
        problems += _mismatch(
            actual.get("grad_weight", np.full_like(expected["grad_weight"], NAN)),
            expected["grad_weight"],
            value_tolerance,
            f"{what} d/dweight",
            grad_floor,
        )
    return problems


def assert_agree(problems: list[str], inputs: Inputs) -> None:
    assert not problems, "\n".join(problems) + (
        f"\nlogits=\n{_show(inputs.logits)}\nlabels={inputs.labels}\nwhere=\n{inputs.where}"
    )


# --- parameters ------------------------------------------------------------------------


def _params(
    keep: Callable[[Case, str, str], bool], plans: Callable[[Case, str], tuple[str, ...]] | None
) -> list[Any]:
    """(case, dtype[, plan], reduction) for the quick run and, marked slow, the rest."""
    params = []
    for selection, marks in ((QUICK, ()), (SLOW, (pytest.mark.slow,))):
        for case, dtype in selection:
            for plan in (None,) if plans is None else plans_for(dtype):
                quick_plan = plans is None or plan in plans(case, dtype)
                for reduction in REDUCTIONS:
                    if not keep(case, dtype, reduction):
                        continue
                    values = (case.name, dtype, reduction)
                    if plan is not None:
                        values = (case.name, dtype, plan, reduction)
                    params.append(
                        pytest.param(
                            *values,
                            id="-".join(values),
                            marks=marks if quick_plan else (pytest.mark.slow,),
                        )
                    )
    return params


EVERY_CASE = _params(lambda case, dtype, reduction: True, None)


# --- the tests -------------------------------------------------------------------------


@pytest.mark.parametrize(("case_name", "dtype", "reduction"), EVERY_CASE)
def test_pallas_agrees_with_the_reference(case_name: str, dtype: str, reduction: str) -> None:
    """``implementation="pallas"``: the kernel, or the XLA path for a per-class `where`."""
    expected = reference(case_name, dtype, reduction)
    actual = results("pallas", case_name, dtype)[reduction]
    assert_agree(
        compare(actual, expected, dtype, reduction, "pallas"), make_inputs(case_name, dtype)
    )


@pytest.mark.parametrize(("case_name", "dtype", "reduction"), EVERY_CASE)
def test_closed_form_agrees_with_the_reference_gradient(
    case_name: str, dtype: str, reduction: str
) -> None:
    """`jaxce.derivatives` (same arguments) is the gradient of the loss.

    Of ``loss.sum()`` for "none": `jax.grad` of the XLA path, or of the
    documented loss on the rows whose result the documents fix.
    """
    expected = {"grad": reference(case_name, dtype, reduction)["grad"]}
    actual = results("closed_form", case_name, dtype)[reduction]
    assert_agree(
        compare(actual, expected, dtype, reduction, "jaxce.derivatives"),
        make_inputs(case_name, dtype),
    )


def _soft_comparable(case: Case, dtype: str, reduction: str) -> bool:
    # Reduced only where every row compares, and "mean" only without class
    # weights: it divides by the number of examples, not the summed weights.
    every_row = bool(make_inputs(case.name, dtype).soft.all())
    if reduction == "none":
        return case.soft
    return case.soft and every_row and (reduction == "sum" or case.weight is None)


@pytest.mark.parametrize(("case_name", "dtype", "reduction"), _params(_soft_comparable, None))
def test_soft_labels_agree_with_the_reference(case_name: str, dtype: str, reduction: str) -> None:
    """One-hot targets: PyTorch's definitions make the two losses equal, smoothing and weights too."""
    inputs = make_inputs(case_name, dtype)
    expected = reference(case_name, dtype, reduction)
    actual = results("soft_labels", case_name, dtype)[reduction]
    rows = inputs.soft if reduction == "none" else None
    assert_agree(compare(actual, expected, dtype, reduction, "soft labels", rows), inputs)


# The fused loss in the quick run: the cases without options under the default
# plan, and every option it takes under three plans (the TPU plan has the GPU
# plan's settings); the other cases and plans are slow.
_FUSED_QUICK_PLANS = ("default", "cpu_chunk3_block3", "gpu_planned_for_this_batch")
FUSED_QUICK = {
    # One compilation: the cases without options, under the default plan.
    **{
        (name, "float32"): ("default",)
        for name in (
            "below_-88",
            "ties",
            "plus_minus_1e30",
            "plus_minus_3e38",
            "labels_out_of_range_C_-1_-100",
        )
    },
    ("smoothing_z_loss_ignore_index_below_-88_and_ties", "float32"): _FUSED_QUICK_PLANS,
    ("smoothing_z_loss_ignore_index_1e30", "float32"): _FUSED_QUICK_PLANS,
}


def _quick_plans(case: Case, dtype: str) -> tuple[str, ...]:
    return FUSED_QUICK.get((case.name, dtype), ())


@pytest.mark.parametrize(
    ("case_name", "dtype", "plan", "reduction"),
    _params(lambda case, dtype, reduction: case.fused, _quick_plans),
)
def test_fused_linear_agrees_with_the_reference(
    case_name: str, dtype: str, plan: str, reduction: str
) -> None:
    """`linear_cross_entropy(logits, I, labels)` under each plan (finite logits only)."""
    expected = reference(case_name, dtype, reduction)
    actual = results("fused", case_name, dtype, plan)[reduction]
    assert_agree(
        compare(actual, expected, dtype, reduction, f"fused ({plan})"),
        make_inputs(case_name, dtype),
    )


# --- vocabulary-parallel: every case in one subprocess with 8 host devices -------------

SHARDED_CHILD = "JAXCE_PATHS_AGREE_SHARDED_CHILD"


@functools.cache
def sharded_program(options: Options) -> Callable[..., Any]:
    """The vocabulary-parallel loss: the classes over "model" (4 devices), the batch over "data" (2)."""
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    where_spec = P("data", "model") if options.where == "classes" else P("data")

    def loss(x: jax.Array, labels: jax.Array, where: Any, weight: Any, reduction: str) -> Any:
        def body(x: jax.Array, labels: jax.Array, where: Any, weight: Any) -> jax.Array:
            return jaxce.sharded.softmax_cross_entropy_with_integer_labels(
                x,
                labels,
                axis_name="model",
                weight=weight,
                where=where,
                reduction=reduction,
                batch_axis_name="data",
                **options.keywords(),
            )

        mapped = jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(
                P("data", "model"),
                P("data"),
                None if where is None else where_spec,
                None if weight is None else P(),
            ),
            out_specs=P("data") if reduction == "none" else P(),
        )
        return mapped(x, labels, where, weight)

    return every_reduction(loss)


def _sharded_child(output: str, keys: list[str]) -> None:
    """Writes the vocabulary-parallel results of ``case|dtype`` keys to ``output`` (.npz)."""
    jax.config.update("jax_numpy_rank_promotion", "raise")  # as tests/conftest.py
    arrays: dict[str, np.ndarray] = {}
    for key in keys:
        case_name, dtype = key.split("|")
        inputs = make_inputs(case_name, dtype)
        try:
            computed = run(sharded_program(CASES_BY_NAME[case_name].options), inputs, inputs.weight)
        except Exception as error:  # reported by this case's tests in the parent
            arrays[f"{key}|error"] = np.asarray(f"{type(error).__name__}: {error}")
            continue
        for reduction, result in computed.items():
            for name, array in result.items():
                arrays[f"{key}|{reduction}|{name}"] = array
    np.savez(output, **arrays)


class ShardedChild:
    """The subprocess computing the vocabulary-parallel results, started early, read on demand."""

    def __init__(self, keys: list[str], directory: str) -> None:
        self.output = os.path.join(directory, "sharded.npz")
        self.process = start_on_eight_host_devices(
            [sys.executable, __file__, self.output, *keys], flag=SHARDED_CHILD
        )
        self.arrays: dict[str, np.ndarray] | None = None

    def results(self) -> dict[str, np.ndarray]:
        if self.arrays is None:
            _, stderr = self.process.communicate(timeout=600)
            assert self.process.returncode == 0, f"sharded subprocess failed:\n{stderr[-6000:]}"
            with np.load(self.output) as loaded:
                self.arrays = {name: loaded[name] for name in loaded.files}
        return self.arrays


@pytest.fixture(scope="module", autouse=True)
def sharded_child(request: pytest.FixtureRequest) -> Iterator[ShardedChild | None]:
    """Starts the subprocess for the selected vocabulary-parallel tests with the module's first test."""
    keys = sorted(
        {
            f"{item.callspec.params['case_name']}|{item.callspec.params['dtype']}"
            for item in request.session.items
            if getattr(item, "originalname", None)
            == "test_vocabulary_parallel_agrees_with_the_reference"
            and item.module is request.module
        }
    )
    if not keys:
        yield None
        return
    with tempfile.TemporaryDirectory() as directory:
        child = ShardedChild(keys, directory)
        try:
            yield child
        finally:
            if child.process.poll() is None:
                child.process.kill()
                child.process.communicate()


@pytest.mark.parametrize(("case_name", "dtype", "reduction"), EVERY_CASE)
def test_vocabulary_parallel_agrees_with_the_reference(
    sharded_child: ShardedChild, case_name: str, dtype: str, reduction: str
) -> None:
    computed = sharded_child.results()
    key = f"{case_name}|{dtype}"
    assert f"{key}|error" not in computed, str(computed.get(f"{key}|error"))
    actual = {
        name: computed[f"{key}|{reduction}|{name}"]
        for name in ("value", "grad", "grad_weight")
        if f"{key}|{reduction}|{name}" in computed
    }
    expected = reference(case_name, dtype, reduction)
    assert_agree(
        compare(actual, expected, dtype, reduction, "vocabulary-parallel"),
        make_inputs(case_name, dtype),
    )


# --- the XLA path itself, against the documents ---------------------------------------


def _documented(case: Case, dtype: str, reduction: str) -> bool:
    # Reduced losses only where the documents fix every row.
    return reduction == "none" or case.all_rows(lambda row: row.documented)


@pytest.mark.parametrize(("case_name", "dtype", "reduction"), _params(_documented, None))
def test_xla_path_agrees_with_the_documents(case_name: str, dtype: str, reduction: str) -> None:
    """The reference's documented rows (where it is not XLA's own result), and +inf logits.

    docs/semantics.md: "a row holding [a +inf logit] has an infinite or NaN
    loss (its softmax has no finite normaliser), never a plausible finite
    number"; which of the two it is, the XLA path decides for the others.
    """
    inputs = make_inputs(case_name, dtype)
    expected = reference(case_name, dtype, reduction)
    actual = results("xla", case_name, dtype)[reduction]
    problems = compare(actual, expected, dtype, reduction, "xla", inputs.documented)
    plus_inf = np.any(np.asarray(inputs.logits, np.float64) == INF, axis=-1)
    if reduction == "none":
        finite = plus_inf & np.isfinite(actual["value"])
        problems += [
            f"xla loss[{i}]: finite ({actual['value'][i]}) with a +inf logit"
            for i in np.flatnonzero(finite)
        ]
    assert_agree(problems, inputs)


if __name__ == "__main__" and os.environ.get(SHARDED_CHILD) == "1":
    _sharded_child(sys.argv[1], sys.argv[2:])
