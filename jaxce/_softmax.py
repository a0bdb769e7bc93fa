"""Multiclass (log-softmax) cross-entropy from logits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxce import _checks, _closed_form, _formulas, _integer_labels, _layout, _reduce
from jaxce._reduce import Reduction

Implementation = Literal["xla", "pallas"]
IMPLEMENTATIONS = (None, "xla", "pallas")


def check_implementation(implementation: object) -> None:
    known = implementation is None or (
        isinstance(implementation, str) and implementation in IMPLEMENTATIONS
    )
    if not known:
        raise ValueError(
            f"`implementation` must be one of {IMPLEMENTATIONS}, got {implementation!r}."
        )


def check_logits(
    logits: jax.Array,
    layout: _layout.ClassLayout,
    mask: jax.Array | None,
    rows: jax.Array | None = None,
    argument: str = "logits",
) -> None:
    """Under `jaxce.checked`, a NaN logit that takes part fails, named by its index in ``logits``.

    A logit takes part unless ``mask`` (classes last) excludes its class or
    ``rows`` (the batch shape; None: all) its example. Called after the loss,
    so that an invalid label, checked inside it, is reported first. ``argument``
    names the input (``log_predictions`` for the divergences).
    """
    if not _checks.checking_values(logits):
        return
    takes_part = jnp.ones(layout.shape, bool)
    if rows is not None:
        takes_part = takes_part & rows[..., None]
    if mask is not None:
        takes_part = takes_part & mask
    _checks.check_not_nan(logits, layout.unlayout(takes_part), argument)


def integer_label_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    mask: jax.Array | None,
    class_weight: jax.Array | None,
    ignore_index: int | None,
    label_smoothing: ArrayLike,
    z_loss: ArrayLike,
    reduction: Reduction,
) -> jax.Array:
    """The integer-label loss on `[..., C]` logits (compute dtype), labels `[...]`.

    The per-row terms come from the logits here; the rules that combine them
    (what counts, weighting, smoothing, z-loss, NaN, reductions) are
    `_integer_labels`', shared with the sharded, closed-form and fused losses.
    """
    num_classes = logits.shape[-1]
    if mask is not None:
        # An excluded class is a -inf logit: probability 0, zero gradient.
        logits = jnp.where(mask, logits, -jnp.inf)
    smooth_weights = None
    if not _checks.is_concrete_zero(label_smoothing):
        # The smoothing term sum_c w_c (-log p_c). Explicit leading axes keep
        # this valid under jax_numpy_rank_promotion="raise". Without class
        # weights, one weight of 1 stands for every class.
        smooth_weights = (
            jnp.ones((1,) * logits.ndim, logits.dtype)
            if class_weight is None
            else _layout.per_class(class_weight, logits.ndim)
        )
        if mask is not None:
            smooth_weights = jnp.where(mask, smooth_weights, 0)
    # -log p_y = log sum_j exp(x_j - m) - (x_y - m) and sum_c w_c (-log p_c) are
    # computed in the shifted frame, so logits of 1e4 lose nothing to
    # `lse(x) - x_y` cancellation in float32, and in the same pass over the
    # logits as exp(x - m). The derivative rules (softmax minus one-hot, and
    # p sum_c w_c - w) live in `_closed_form`, shared with `jaxce.derivatives`.
    # Excluded classes contribute nothing; the others multiply as PyTorch does.
    row_max, log_normalizer, nll, smooth = _closed_form.softmax_terms(
        logits, labels, smooth_weights, mask
    )
    return _integer_labels.loss(
        labels,
        nll,
        smooth,
        log_normalizer + row_max,
        num_classes=num_classes,
        class_weight=class_weight,
        ignore_index=ignore_index,
        row_included=None if mask is None else jnp.any(mask, axis=-1),
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        reduction=reduction,
    )


def softmax_cross_entropy_with_integer_labels(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | Sequence[int] = -1,
    where: ArrayLike | None = None,
    *,
    weight: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: ArrayLike = 0.0,
    z_loss: ArrayLike = 0.0,
    reduction: Reduction = "none",
    implementation: Implementation | None = None,
) -> jax.Array:
    r"""Softmax cross-entropy with integer class labels (PyTorch's ``cross_entropy``).

    For logits :math:`x \in \mathbb{R}^C`, label :math:`y`, class weights
    :math:`w` (all ones by default) and smoothing :math:`\varepsilon`:

    .. math::
        \ell = (1 - \varepsilon)\, w_y\, (-\log p_y)
             + \frac{\varepsilon}{C} \sum_c w_c\, (-\log p_c)
             + z \,(\log \textstyle\sum_c e^{x_c})^2,
        \qquad p = \operatorname{softmax}(x).

    ``reduction="mean"`` divides the summed cross-entropy by the summed
    :math:`w_y` of counted examples (PyTorch's weighted mean) and the summed
    z-loss by the number of counted examples. Examples whose label equals
    ``ignore_index``, or whose classes are all excluded by ``where``, are not
    counted; a mean over nothing is 0, with zero gradients (PyTorch: NaN).
    Counted examples whose class weights sum to 0 divide by 0, as in PyTorch.

    Args:
      logits: ``[..., num_classes]`` floating logits.
      labels: ``[...]`` integer class indices, of any integer dtype (the logits' shape without the
        class axes). With a tuple ``axis`` a label indexes the flattened class
        slice.
      axis: class axis, or a tuple of class axes (flattened in that order).
      where: boolean mask, of the logits' shape (excluded classes get
        probability 0) or of the batch shape (excluded examples).
      weight: ``[num_classes]`` class weights (any sign, as in PyTorch).
      ignore_index: label value of examples to skip (e.g. ``-100``).
      label_smoothing: :math:`\varepsilon \in [0, 1)`; may be traced.
      z_loss: coefficient :math:`z \ge 0` of PaLM's auxiliary loss; may be
        traced.
      reduction: ``"none"`` (``[...]``), ``"sum"`` or ``"mean"`` (scalars).
      implementation: ``"xla"`` (plain JAX), ``"pallas"`` (a kernel) or
        ``None`` (the platform's default: ``"xla"`` everywhere until a GPU
        measurement says otherwise). ``"pallas"`` reads each row of logits once
        in the forward pass, keeping two float32 per row, and once more in the
        backward pass, which writes the gradient in the logits' dtype; it
        computes in float32 whatever the logits' dtype. On CUDA GPUs the kernel
        is compiled with Pallas' Triton backend; on CPU it runs in Pallas
        interpret mode (correct, slow: for tests); on TPU and ROCm, which
        have no kernel yet, the same per-row values and gradient are computed
        with plain XLA operations (the same derivative rule). It supports
        reverse-mode differentiation only (``grad``, ``vjp``; not ``jvp``
        or ``hessian``: use ``"xla"`` there). float64 logits, a per-class
        ``where`` mask and empty batches take the XLA path; a per-example
        ``where`` and tuple ``axis`` run the kernel (a tuple ``axis`` after a
        transpose). XLA does not partition the kernel: with batch-sharded
        logits, call the loss inside ``jax.shard_map``.

    Returns:
      The loss, float32 for half-precision logits (float64 for float64).

    Example:
      >>> import jax.numpy as jnp, jaxce
      >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
      >>> print(jaxce.softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 1])))
      [0.2761297 2.951799 ]

    Logits of ``+-1e30`` give finite losses and gradients. A ``-inf`` logit or
    an excluded class gets probability 0 and an exactly zero gradient. A label
    outside ``[0, num_classes)`` that is not ``ignore_index`` (negative ones
    included) gives that example a NaN loss, and so does a NaN logit of a class
    that takes part; a traced ``label_smoothing`` outside ``[0, 1)`` or a
    negative ``z_loss`` makes every loss NaN. ``jaxce.checked`` raises instead.

    References:
      - PyTorch, ``torch.nn.CrossEntropyLoss`` with class indices (``weight``,
        ``ignore_index``, ``label_smoothing``, the weighted mean).
        https://pytorch.org/docs/stable/generated/torch.nn.CrossEntropyLoss.html
      - C. Szegedy, V. Vanhoucke, S. Ioffe, J. Shlens and Z. Wojna, "Rethinking the
        Inception Architecture for Computer Vision", CVPR 2016 (label smoothing).
        https://arxiv.org/abs/1512.00567
      - A. Chowdhery et al., "PaLM: Scaling Language Modeling with Pathways", 2022
        (the auxiliary z-loss). https://arxiv.org/abs/2204.02311
    """
    logits = _checks.as_float_array(logits, "logits")
    labels = _checks.as_integer_labels(labels)
    _integer_labels.check_options(reduction, label_smoothing, z_loss, ignore_index)
    check_implementation(implementation)
    layout = _layout.ClassLayout.of(logits.shape, axis)
    _layout.require_classes(layout)
    labels = _layout.batch_labels(labels, layout)
    mask = layout.mask(where)
    class_weight = layout.class_weight(weight)
    compute = _checks.compute_dtype(logits)
    if implementation == "pallas":
        # Imported here: `import jaxce` does not load Pallas.
        from jaxce import _pallas

        classes_last = layout.classes_last(logits)
        if _pallas.runs_kernel(classes_last, mask):
            loss = _pallas.integer_label_loss(
                classes_last,
                labels,
                row_included=None if mask is None else mask[..., 0],
                class_weight=None if class_weight is None else class_weight.astype(compute),
                ignore_index=ignore_index,
                label_smoothing=label_smoothing,
                z_loss=z_loss,
                reduction=reduction,
            )
            rows = ~_integer_labels.ignored_labels(labels, ignore_index)
            check_logits(logits, layout, mask, rows)
            return loss
    loss = integer_label_loss(
        layout.classes_last(logits).astype(compute),
        labels,
        mask=mask,
        class_weight=None if class_weight is None else class_weight.astype(compute),
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        reduction=reduction,
    )
    check_logits(logits, layout, mask, ~_integer_labels.ignored_labels(labels, ignore_index))
    return loss


class SoftLabelInputs(NamedTuple):
    """Checked inputs of a loss of logits against probability labels, classes last."""

    layout: _layout.ClassLayout
    x: jax.Array  # [*batch, C] logits in the compute dtype; classes `where` excludes are -inf
    targets: jax.Array  # the labels (smoothed), broadcast to `x`'s shape, in the compute dtype
    mask: jax.Array | None  # `where`, broadcastable to `x` (None: every class takes part)
    valid: jax.Array | None  # a traced `label_smoothing` in [0, 1) (None when concrete)


def smoothed_labels(
    targets: jax.Array, label_smoothing: ArrayLike, num_classes: int
) -> tuple[jax.Array, jax.Array | None]:
    """Probability labels mixed with the uniform distribution, and whether the mix is valid.

    `_formulas.smoothed_targets` unless ``label_smoothing`` is a concrete 0.
    The flag is None for a concrete ``label_smoothing`` (checked already); a
    traced one out of ``[0, 1)`` is replaced by 0, so that no NaN reaches a
    gradient, and the flag is False: the caller's loss makes itself NaN, and
    `jaxce.checked` names it.
    """
    valid = _checks.option_valid(label_smoothing, "label_smoothing", high=1.0)
    if _checks.is_concrete_zero(label_smoothing):
        return targets, valid
    smoothing = jnp.asarray(label_smoothing, targets.dtype)
    if valid is not None:
        smoothing = jnp.where(valid, smoothing, 0)
    return _formulas.smoothed_targets(targets, smoothing, num_classes), valid


def soft_label_inputs(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | Sequence[int] | None,
    where: ArrayLike | None,
    reduction: Reduction,
    label_smoothing: ArrayLike = 0.0,
) -> SoftLabelInputs:
    """Checks and lays out what every soft-label loss of logits shares, and its closed form.

    ``axis=None`` is every axis (optax's). The labels are mixed with the
    uniform distribution (`_formulas.smoothed_targets`) when ``label_smoothing``
    is not a concrete 0; a traced one out of range is replaced by 0 (so that
    no NaN reaches a gradient) and ``valid`` says so: the loss makes itself
    NaN, and `jaxce.checked` names it.
    """
    logits = _checks.as_float_array(logits, "logits")
    labels = _checks.as_float_array(labels, "labels")
    _checks.check_reduction(reduction)
    _checks.check_unit_interval(label_smoothing, "label_smoothing")
    if axis is None:
        axis = tuple(range(logits.ndim))
    layout = _layout.ClassLayout.of(logits.shape, axis)
    _layout.require_classes(layout)
    mask = layout.mask(where)
    compute = _checks.compute_dtype(logits)
    x = layout.classes_last(logits).astype(compute)
    targets = _layout.dense_labels(labels, layout).astype(compute)
    targets, valid = smoothed_labels(targets, label_smoothing, layout.num_classes)
    targets = jnp.broadcast_to(targets, x.shape)
    if mask is not None:
        x = jnp.where(mask, x, -jnp.inf)
    return SoftLabelInputs(layout, x, targets, mask, valid)


def class_weighted(
    targets: jax.Array, class_weight: jax.Array | None, mask: jax.Array | None
) -> jax.Array:
    """``a = w y``: targets times ``[C]`` class weights (None: none), 0 where ``mask`` excludes."""
    weighted = targets
    if class_weight is not None:
        weighted = targets * _layout.per_class(class_weight.astype(targets.dtype), targets.ndim)
    return weighted if mask is None else jnp.where(mask, weighted, 0)


def soft_label_classes(targets: jax.Array, mask: jax.Array | None) -> jax.Array:
    """The classes that take part in a soft-label loss: included, with a nonzero target.

    A zero target contributes 0 whatever its logit (``0 log 0 = 0`` on a
    ``-inf`` logit, or one whose ``x - m`` overflows; optax gives NaN); every
    other included class multiplies as PyTorch does, so a zero class weight
    under a positive target on a ``-inf`` logit is NaN, as with integer labels.
    """
    included = targets != 0
    return included if mask is None else included & mask


def softmax_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | Sequence[int] | None = -1,
    where: ArrayLike | None = None,
    *,
    weight: ArrayLike | None = None,
    label_smoothing: ArrayLike = 0.0,
    reduction: Reduction = "none",
) -> jax.Array:
    r"""Softmax cross-entropy against probability (one-hot or soft) labels.

    .. math::
        \ell = -\sum_c w_c\, \tilde y_c \log p_c, \qquad
        \tilde y = (1 - \varepsilon)\, y + \varepsilon / C, \qquad
        p = \operatorname{softmax}(x).

    ``reduction="mean"`` divides by the number of examples, weights or not
    (PyTorch's rule for probability targets); examples excluded by ``where``
    are not counted.

    Args:
      logits: ``[..., num_classes]`` floating logits.
      labels: probabilities broadcastable to ``logits``' shape.
      axis: class axis or tuple of axes (flattened in that order); ``None``
        (as in optax): every axis.
      where: boolean mask of the logits' shape (excluded classes take no part)
        or of the batch shape (excluded examples).
      weight: ``[num_classes]`` class weights (any sign, as in PyTorch).
      label_smoothing: :math:`\varepsilon \in [0, 1)`; may be traced.
      reduction: ``"none"`` (``[...]``), ``"sum"`` or ``"mean"``.

    Returns:
      The loss, float32 for half-precision logits.

    Example:
      >>> import jax.numpy as jnp, jaxce
      >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
      >>> labels = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
      >>> print(jaxce.softmax_cross_entropy(logits, labels))
      [0.2761297 2.951799 ]

    A class with label 0 contributes 0 even when its logit is ``-inf``
    (:math:`0 \log 0 = 0`, where optax gives NaN); positive label mass on a
    ``-inf`` logit gives ``+inf`` (``-inf`` for a negative class weight). A NaN
    logit of a class that takes part makes the example's loss NaN; so does a
    traced ``label_smoothing`` outside ``[0, 1)`` (``jaxce.checked`` raises).

    References:
      - PyTorch, ``torch.nn.CrossEntropyLoss`` with class probabilities.
        https://pytorch.org/docs/stable/generated/torch.nn.CrossEntropyLoss.html
      - C. Szegedy, V. Vanhoucke, S. Ioffe, J. Shlens and Z. Wojna, "Rethinking the
        Inception Architecture for Computer Vision", CVPR 2016 (label smoothing).
        https://arxiv.org/abs/1512.00567
    """
    inputs = soft_label_inputs(logits, labels, axis, where, reduction, label_smoothing)
    layout, x, targets, mask = inputs.layout, inputs.x, inputs.targets, inputs.mask
    class_weight = layout.class_weight(weight)
    # -sum_c a_c log p_c = sum_c a_c (L - (x_c - m)) in the shifted frame, in
    # the pass that computes exp(x - m). The derivative rule (p sum_c a_c - a,
    # and -log p for the targets) lives in `_closed_form`, shared with
    # `jaxce.derivatives`.
    _, _, _, loss = _closed_form.softmax_terms(
        x, None, class_weighted(targets, class_weight, mask), soft_label_classes(targets, mask)
    )
    loss = _checks.nan_unless(inputs.valid, loss)
    check_logits(jnp.asarray(logits), layout, mask)
    return _reduce.reduce_examples(loss, mask, reduction)
