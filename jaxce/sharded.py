"""Vocabulary-parallel cross-entropy: logits sharded over the classes, inside ``shard_map``.

Megatron-style vocabulary parallelism splits the class (vocabulary) axis of the
logits, and of the output embedding that produces them, into contiguous slices
over a named mesh axis: device ``k`` of ``n`` holds classes
``[k * V / n, (k + 1) * V / n)``. The losses here run inside
:func:`jax.shard_map` on one such slice and give every device the loss of the
whole row. They never gather the logits: per row they exchange one maximum
(``pmax``) and a few sums (``psum``), so the communication per device is
``O(rows)``, independent of the vocabulary size.

The plain ``jaxce`` losses need nothing from this module for batch (data)
parallelism: under ``jit`` with inputs sharded over the batch, XLA's SPMD
partitioner computes the same result as one device, the weighted-mean
denominator included.

Gradients are those of the single-device loss, whether ``jax.grad`` is taken
of the ``shard_map``-ped function or inside its body. Inside the body this
needs ``shard_map``'s default ``check_vma=True``: with ``check_vma=False`` JAX
transposes each ``psum`` into another ``psum`` and the gradient comes out
``n`` times too large.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Literal, NamedTuple, overload

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxce import _checks, _formulas, _integer_labels, _layout, _linear
from jaxce._reduce import Reduction

__all__ = ["linear_cross_entropy", "softmax_cross_entropy_with_integer_labels"]

AxisName = Hashable | Sequence[Hashable]


def _shard_layout(axis_name: AxisName, shard_classes: int) -> tuple[int, jax.Array]:
    """Returns the global number of classes and this shard's first class."""
    try:
        num_shards = jax.lax.axis_size(axis_name)
    except NameError:
        raise NameError(
            f"`axis_name` {axis_name!r} is not a mesh axis bound here: call "
            "jaxce.sharded losses inside `jax.shard_map` over a mesh with that axis."
        ) from None
    offset = jax.lax.axis_index(axis_name) * shard_classes
    return num_shards * shard_classes, offset


def _global_class_weight(
    weight: ArrayLike | None, num_classes: int, shard_classes: int, axis_name: AxisName
) -> jax.Array | None:
    if weight is None:
        return None
    weight = _checks.as_float_array(weight, "weight")
    if weight.shape != (num_classes,):
        raise ValueError(
            f"`weight` must be the global class-weight vector of shape ({num_classes},): "
            f"`logits_shard` holds {shard_classes} classes on each of the "
            f"{num_classes // shard_classes} devices of mesh axis {axis_name!r}, "
            f"got shape {weight.shape}. If the vocabulary does not split evenly over "
            f"{axis_name!r}, pad it to a multiple of the axis size (and mask the padding "
            "with `where`)."
        )
    return weight


def _vocab_parallel_loss(
    logits_shard: jax.Array,
    labels: jax.Array,
    *,
    axis_name: AxisName,
    mask: jax.Array | None,
    class_weight: jax.Array | None,
    ignore_index: int | None,
    label_smoothing: ArrayLike,
    z_loss: ArrayLike,
    reduction: Reduction,
    batch_axis_name: AxisName | None,
) -> jax.Array:
    """``_softmax.integer_label_loss`` on ``[..., V / n]`` logits (compute dtype).

    ``class_weight`` is the global ``[V]`` vector, already checked.
    """
    shard_classes = logits_shard.shape[-1]
    num_classes, offset = _shard_layout(axis_name, shard_classes)

    if mask is not None:
        logits_shard = jnp.where(mask, logits_shard, -jnp.inf)
    # The shift m = max_j x_j is a constant (stop_gradient): log-sum-exp does
    # not depend on it. pmax of the shard maxima is the global row maximum;
    # the sums are completed below, in one psum.
    shift, _, sum_exp = _formulas.shifted_exponentials(
        logits_shard, lambda local_max: jax.lax.pmax(local_max, axis_name)
    )
    shifted = logits_shard - shift
    row_max = shift[..., 0]
    classes = offset + jax.lax.broadcasted_iota(labels.dtype, shifted.shape, shifted.ndim - 1)
    is_label = classes == labels[..., None]
    smoothing_on = not _checks.is_concrete_zero(label_smoothing)
    shard_weight = (
        None
        if class_weight is None
        else jax.lax.dynamic_slice_in_dim(class_weight, offset, shard_classes)
    )

    # Every per-row partial sum goes into one psum: O(rows) words per device.
    partial = _PartialSums(
        sum_exp=sum_exp,
        # x_y - m from the one shard that holds class y (0 elsewhere), picked
        # with a select so that its gradient fuses with the softmax term.
        label_shifted=jnp.sum(jnp.where(is_label, shifted, 0), axis=-1),
        included=None if mask is None else jnp.sum(mask, axis=-1, dtype=shifted.dtype),
    )
    if smoothing_on:
        # sum_c w_c (-log p_c) = L sum_c w_c - sum_c w_c (x_c - m) with
        # L = log sum_j exp(x_j - m) >= 0 and x_c - m <= 0: for w >= 0 both
        # terms are non-negative, so the split adds without cancellation.
        weights = (
            jnp.ones_like(shifted)
            if shard_weight is None
            else jnp.broadcast_to(shard_weight, shifted.shape)
        )
        weighted = _formulas.weighted_terms(weights, shifted, mask)
        if mask is not None:
            weights = jnp.where(mask, weights, 0)
        partial = partial._replace(
            weight_total=jnp.sum(weights, axis=-1),
            weighted_shifted=jnp.sum(weighted, axis=-1),
        )
    total = jax.lax.psum(partial, axis_name)

    # log(0) stays out of the differentiated path: an empty row has a zero gradient.
    log_normalizer = _formulas.log_of_total(total.sum_exp)
    # -log p_y = L - (x_y - m), both in the shifted frame (no lse(x) - x_y cancellation).
    nll = log_normalizer - total.label_shifted
    smooth = None
    if total.weight_total is not None and total.weighted_shifted is not None:
        smooth = log_normalizer * total.weight_total - total.weighted_shifted

    def batch_total(x: jax.Array) -> jax.Array:
        x = jnp.sum(x)
        return x if batch_axis_name is None else jax.lax.psum(x, batch_axis_name)

    # The global weight vector is on every device: w_y is a local lookup.
    return _integer_labels.loss(
        labels,
        nll,
        smooth,
        log_normalizer + row_max,
        num_classes=num_classes,
        class_weight=class_weight,
        ignore_index=ignore_index,
        row_included=None if total.included is None else total.included > 0,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        reduction=reduction,
        total=batch_total,
    )


class _PartialSums(NamedTuple):
    """Per-row sums over this shard's classes, added over the shards by one ``psum``."""

    sum_exp: jax.Array
    label_shifted: jax.Array
    included: jax.Array | None = None
    weight_total: jax.Array | None = None
    weighted_shifted: jax.Array | None = None


def softmax_cross_entropy_with_integer_labels(
    logits_shard: ArrayLike,
    labels: ArrayLike,
    *,
    axis_name: AxisName,
    weight: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: ArrayLike = 0.0,
    z_loss: ArrayLike = 0.0,
    where: ArrayLike | None = None,
    reduction: Reduction = "none",
    batch_axis_name: AxisName | None = None,
) -> jax.Array:
    r"""Integer-label softmax cross-entropy with the classes sharded over ``axis_name``.

    Call it inside :func:`jax.shard_map`. Each of the ``n`` devices along mesh
    axis ``axis_name`` holds the contiguous class slice
    ``[k V / n, (k + 1) V / n)`` of the logits (``in_specs`` ``P(..., axis_name)``);
    the result is the loss of
    :func:`jaxce.softmax_cross_entropy_with_integer_labels` on the full logits,
    the same on every device of ``axis_name`` (``out_specs`` without
    ``axis_name``), values and gradients:

    .. math::
        \ell = (1 - \varepsilon)\, w_y\, (L - s_y)
             + \frac{\varepsilon}{V} \Bigl(L \sum_c w_c - \sum_c w_c s_c\Bigr)
             + z\, (L + m)^2,

    with :math:`m = \operatorname{pmax}_k \max_{j \in k} x_j`,
    :math:`s = x - m`, :math:`L = \log \operatorname{psum}_k \sum_{j \in k} e^{s_j}`,
    and :math:`s_y`, :math:`\sum_c w_c`, :math:`\sum_c w_c s_c` psums of
    per-shard partial sums. Communication per device: one ``pmax`` of ``N``
    words and one ``psum`` of ``2N`` to ``5N`` words (``N`` rows), whatever
    ``V``; the logits and ``weight`` are never gathered.

    Args:
      logits_shard: ``[..., V / n]`` floating logits, this device's classes
        (classes last).
      labels: ``[...]`` global integer class indices in ``[0, V)``, replicated
        over ``axis_name``.
      axis_name: the mesh axis (or tuple of axes) the classes are split over.
      weight: ``[V]`` global class weights (any sign, as in PyTorch), replicated; each shard
        uses its slice.
      ignore_index: label value of examples to skip.
      label_smoothing: :math:`\varepsilon \in [0, 1)`; may be traced.
      z_loss: coefficient :math:`z` of PaLM's auxiliary loss; may be traced.
      where: boolean mask of ``logits_shard``'s shape (this shard's classes)
        or of the batch shape ``[...]`` (examples).
      reduction: ``"none"`` (``[...]``), ``"sum"`` or ``"mean"`` (scalars).
      batch_axis_name: mesh axis (or axes) the batch is split over, if any:
        ``"sum"`` and ``"mean"`` then add over it too, so the result is the
        global sum or mean (PyTorch's weighted-mean denominator over the whole
        batch). Leave None to reduce only this device's rows.

    Returns:
      The loss, float32 for half-precision logits (float64 for float64).

    Example:
      >>> import jax, jax.numpy as jnp, jaxce.sharded
      >>> from jax.sharding import PartitionSpec as P
      >>> mesh = jax.sharding.Mesh(jax.devices()[:1], ("vocab",))
      >>> loss = jax.shard_map(
      ...     lambda x, y: jaxce.sharded.softmax_cross_entropy_with_integer_labels(
      ...         x, y, axis_name="vocab"),
      ...     mesh=mesh, in_specs=(P(None, "vocab"), P()), out_specs=P())
      >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
      >>> print(loss(logits, jnp.array([0, 1])))
      [0.2761297 2.951799 ]

    As in the single-device loss: logits of ``+-1e30`` give finite losses and
    gradients, a ``-inf`` logit or an excluded class gets probability 0 and a
    zero gradient, and a label outside ``[0, V)`` that is not ``ignore_index``
    gives that example a NaN loss (``jaxce.checked`` raises instead).

    References:
      - M. Shoeybi, M. Patwary, R. Puri, P. LeGresley, J. Casper and B. Catanzaro,
        "Megatron-LM: Training Multi-Billion Parameter Language Models Using Model
        Parallelism", 2019 (vocabulary-parallel cross-entropy).
        https://arxiv.org/abs/1909.08053
      - A. Chowdhery et al., "PaLM: Scaling Language Modeling with Pathways", 2022
        (the auxiliary z-loss). https://arxiv.org/abs/2204.02311
    """
    logits_shard = _checks.as_float_array(logits_shard, "logits_shard")
    labels = _checks.as_integer_labels(labels)
    _integer_labels.check_options(reduction, label_smoothing, z_loss, ignore_index)
    if logits_shard.ndim == 0:
        raise ValueError("`logits_shard` must have a class axis, got a scalar.")
    layout = _layout.ClassLayout.of(logits_shard.shape, -1)
    _layout.require_classes(layout, "logits_shard")
    labels = _layout.batch_labels(labels, layout)
    mask = layout.mask(where)
    shard_classes = logits_shard.shape[-1]
    num_classes, _ = _shard_layout(axis_name, shard_classes)
    class_weight = _global_class_weight(weight, num_classes, shard_classes, axis_name)
    compute = _checks.compute_dtype(logits_shard)
    return _vocab_parallel_loss(
        logits_shard.astype(compute),
        labels,
        axis_name=axis_name,
        mask=mask,
        class_weight=None if class_weight is None else class_weight.astype(compute),
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        reduction=reduction,
        batch_axis_name=batch_axis_name,
    )


@overload
def linear_cross_entropy(
    hidden: ArrayLike,
    weight_shard: ArrayLike,
    labels: ArrayLike,
    *,
    axis_name: AxisName,
    bias_shard: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: ArrayLike = 0.0,
    z_loss: ArrayLike = 0.0,
    softcap: float | None = None,
    shift: int = 0,
    chunk_size: int | None = None,
    plan: _linear.LinearCrossEntropyPlan | None = None,
    reduction: Reduction = "mean",
    batch_axis_name: AxisName | None = None,
    temperature: ArrayLike | None = None,
    token_weights: ArrayLike | None = None,
    vocab_size: int | None = None,
    return_aux: Literal[False] = False,
) -> jax.Array: ...


@overload
def linear_cross_entropy(
    hidden: ArrayLike,
    weight_shard: ArrayLike,
    labels: ArrayLike,
    *,
    axis_name: AxisName,
    bias_shard: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: ArrayLike = 0.0,
    z_loss: ArrayLike = 0.0,
    softcap: float | None = None,
    shift: int = 0,
    chunk_size: int | None = None,
    plan: _linear.LinearCrossEntropyPlan | None = None,
    reduction: Reduction = "mean",
    batch_axis_name: AxisName | None = None,
    temperature: ArrayLike | None = None,
    token_weights: ArrayLike | None = None,
    vocab_size: int | None = None,
    return_aux: Literal[True],
) -> tuple[jax.Array, _linear.LinearCrossEntropyAux]: ...


@overload
def linear_cross_entropy(
    hidden: ArrayLike,
    weight_shard: ArrayLike,
    labels: ArrayLike,
    *,
    axis_name: AxisName,
    bias_shard: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: ArrayLike = 0.0,
    z_loss: ArrayLike = 0.0,
    softcap: float | None = None,
    shift: int = 0,
    chunk_size: int | None = None,
    plan: _linear.LinearCrossEntropyPlan | None = None,
    reduction: Reduction = "mean",
    batch_axis_name: AxisName | None = None,
    temperature: ArrayLike | None = None,
    token_weights: ArrayLike | None = None,
    vocab_size: int | None = None,
    return_aux: bool = False,
) -> jax.Array | tuple[jax.Array, _linear.LinearCrossEntropyAux]: ...


def linear_cross_entropy(
    hidden: ArrayLike,
    weight_shard: ArrayLike,
    labels: ArrayLike,
    *,
    axis_name: AxisName,
    bias_shard: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: ArrayLike = 0.0,
    z_loss: ArrayLike = 0.0,
    softcap: float | None = None,
    shift: int = 0,
    chunk_size: int | None = None,
    plan: _linear.LinearCrossEntropyPlan | None = None,
    reduction: Reduction = "mean",
    batch_axis_name: AxisName | None = None,
    temperature: ArrayLike | None = None,
    token_weights: ArrayLike | None = None,
    vocab_size: int | None = None,
    return_aux: bool = False,
) -> jax.Array | tuple[jax.Array, _linear.LinearCrossEntropyAux]:
    r"""Cross-entropy of ``softcap(hidden @ W.T + b)`` with ``W``'s rows sharded over ``axis_name``.

    Call it inside :func:`jax.shard_map`: each of the ``n`` devices along
    ``axis_name`` holds the contiguous rows ``[k V / n, (k + 1) V / n)`` of the
    ``[V, D]`` output embedding (``in_specs`` ``P(axis_name, None)``) and the
    whole ``hidden``. The result is :func:`jaxce.linear_cross_entropy` of the
    full embedding,

    .. math::
        \ell = \mathrm{CE}(c \tanh((h W^\top + b) / c),\ y),

    on every device of ``axis_name``, values and gradients (the gradient of
    ``hidden`` is summed over the shards by ``shard_map``'s transpose).

    Like :func:`jaxce.linear_cross_entropy` it never holds the logits, not
    even this device's ``[..., V / n]`` slice of them: the tokens go through
    the device's rows of ``W`` ``chunk_size`` at a time (the plan of
    :func:`jaxce.plan_linear_cross_entropy` for ``V / n`` classes), and each
    chunk's per-token maximum and sums over the classes are completed over
    the shards by one ``pmax`` and a few ``psum`` of ``chunk_size`` words.
    Communication per device: ``O(N)`` words for ``N`` tokens, whatever ``V``.
    With ``"mean"`` or ``"sum"`` the gradients are formed in the same pass
    (three matrix products per shard); with ``"none"`` the backward pass
    recomputes each chunk (four).

    Args:
      hidden: ``[..., D]`` hidden states, replicated over ``axis_name``.
      weight_shard: ``[V / n, D]`` this device's rows of the output embedding.
      labels: ``[...]`` global integer labels.
      axis_name: the mesh axis (or axes) the vocabulary is split over.
      bias_shard: optional ``[V / n]`` slice of the bias.
      ignore_index, label_smoothing, z_loss, reduction, batch_axis_name: as in
        :func:`softmax_cross_entropy_with_integer_labels`.
      softcap: Gemma 2's logit soft cap :math:`c > 0`, or None.
      shift: ``k >= 0``: ``hidden[..., t, :]`` predicts ``labels[..., t + k]``
        (1 for next-token prediction; needs ``T > k``).
      chunk_size, plan: as in :func:`jaxce.linear_cross_entropy`, for this
        device's ``V / n`` classes.
      temperature, token_weights, return_aux: as in
        :func:`jaxce.linear_cross_entropy` (``token_weights`` like
        ``labels``; the aux is the same on every device of ``axis_name``).
      vocab_size: the number of real classes, all shards counted, when the
        embedding's rows are padded to a multiple of ``n`` (or of 128 per
        shard): the padding rows are the last ones, on the last shards; they
        get probability 0 and zero gradients.

    Returns:
      The loss (float32 for half-precision inputs), or ``(loss, aux)``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxce.sharded
      >>> from jax.sharding import PartitionSpec as P
      >>> mesh = jax.sharding.Mesh(jax.devices()[:1], ("vocab",))
      >>> loss = jax.shard_map(
      ...     lambda h, w, y: jaxce.sharded.linear_cross_entropy(h, w, y, axis_name="vocab"),
      ...     mesh=mesh, in_specs=(P(), P("vocab", None), P()), out_specs=P())
      >>> h, w = jnp.ones((2, 4)), jnp.zeros((3, 4))
      >>> print(f"{float(loss(h, w, jnp.array([0, 2]))):.6f}")
      1.098612

    Non-finite behaviour is that of :func:`jaxce.linear_cross_entropy`.

    References:
      - M. Shoeybi, M. Patwary, R. Puri, P. LeGresley, J. Casper and B. Catanzaro,
        "Megatron-LM: Training Multi-Billion Parameter Language Models Using Model
        Parallelism", 2019 (vocabulary-parallel cross-entropy).
        https://arxiv.org/abs/1909.08053
      - E. Wijmans, B. Huval, A. Hertzberg, V. Koltun and P. Krähenbühl, "Cut Your
        Losses in Large-Vocabulary Language Models", ICLR 2025 (Cut Cross-Entropy:
        the loss without the logits in memory). https://arxiv.org/abs/2411.09009
      - Gemma Team, "Gemma 2: Improving Open Language Models at a Practical Size",
        2024 (the logit soft cap). https://arxiv.org/abs/2408.00118
    """
    hidden = _checks.as_float_array(hidden, "hidden")
    weight_shard = _checks.as_float_array(weight_shard, "weight_shard")
    if weight_shard.ndim != 2 or hidden.ndim == 0 or weight_shard.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"`weight_shard` must have shape [V / n, D] with D = hidden.shape[-1]; got "
            f"`weight_shard` {weight_shard.shape} and `hidden` {hidden.shape}."
        )
    if bias_shard is not None:
        bias_shard = _checks.as_float_array(bias_shard, "bias_shard")
        if bias_shard.shape != (weight_shard.shape[0],):
            raise ValueError(
                f"`bias_shard` must have shape ({weight_shard.shape[0]},), one bias per "
                f"row of `weight_shard`, got {bias_shard.shape}."
            )
    _shard_layout(axis_name, weight_shard.shape[0])  # a clear error outside shard_map
    if isinstance(axis_name, list):
        axis_name = tuple(axis_name)

    def batch_total(x: jax.Array) -> jax.Array:
        x = jnp.sum(x)
        return x if batch_axis_name is None else jax.lax.psum(x, batch_axis_name)

    options = _linear.Options(
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        temperature=temperature,
        shift=shift,
        token_weights=token_weights,
        vocab_size=vocab_size,
        chunk_size=chunk_size,
        plan=plan,
        reduction=reduction,
        return_aux=return_aux,
    )
    prepared = _linear.prepare_call(
        hidden, weight_shard, labels, bias_shard, options, axis_name=axis_name, total=batch_total
    )
    return _linear.reduced_loss(prepared, batch_total)
