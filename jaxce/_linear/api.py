"""The public fused loss, its derivative rules, and :func:`gradients`."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Literal, cast, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxce import _checks, _integer_labels
from jaxce._linear import chunks
from jaxce._linear.options import Options
from jaxce._linear.plan import LinearCrossEntropyPlan
from jaxce._linear.prepare import Config, Inputs, PreparedCall, prepare_call
from jaxce._reduce import Reduction

Aux = chunks.LinearCrossEntropyAux


def _zero_tangents(aux: Aux | None) -> Aux | None:
    """The aux's tangents: zeros (float0 for the integer argmax).

    Inside ``shard_map`` each zero varies over the mesh axes its primal varies
    over (a batch axis), as JAX requires of a rule's tangents.
    """
    if aux is None:
        return None
    zeros = Aux(
        jnp.zeros_like(aux.logsumexp),
        jnp.zeros_like(aux.entropy),
        cast(jax.Array, np.zeros(aux.argmax.shape, jax.dtypes.float0)),
    )
    return Aux(
        *(chunks.varying_like(zero, primal) for zero, primal in zip(zeros, aux, strict=True))
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _weighted_loss(config: Config, inputs: Inputs) -> tuple[jax.Array, Aux | None]:
    """``sum_i row_weight_i * loss_i`` (``"mean"`` and ``"sum"``), and the aux if asked for.

    Its rule computes the gradients with respect to ``hidden``, ``weight`` and
    ``bias`` in the same pass as the loss: three matrix products in total, the
    same as the unfused formulation. The tangent is the inner product of those
    gradients with the input tangents, which is linear, so reverse mode
    transposes it into "scale the saved gradients by the cotangent" (no
    logits are saved) and forward mode works too.
    """
    return chunks.weighted_loss(config, inputs)


@_weighted_loss.defjvp
def _weighted_loss_jvp(
    config: Config, primals: tuple[Inputs], tangents: tuple[Inputs]
) -> tuple[tuple[jax.Array, Aux | None], tuple[jax.Array, Aux | None]]:
    (inputs,), (t,) = primals, tangents
    wants = chunks.Wants(
        hidden=not chunks.is_zero(t.hidden),
        weight=not chunks.is_zero(t.weight),
        bias=not chunks.is_zero(t.bias),
        temperature=not chunks.is_zero(t.temperature),
        row_weight=not chunks.is_zero(t.row_weight),
    )
    totals = chunks.weighted_loss_and_grads(config, inputs, wants)
    compute = inputs.row_weight.dtype

    def inner(pairs: tuple[tuple[jax.Array | None, jax.Array | None], ...]) -> jax.Array | None:
        terms = []
        for derivative, t_input in pairs:
            t_input = chunks.nonzero_tangent(t_input, compute)
            if derivative is not None and t_input is not None:
                terms.append(jnp.sum(derivative * t_input))
        return sum(terms[1:], terms[0]) if terms else None

    # On a vocabulary shard the linear layer's gradients are this shard's
    # share: their part of the tangent is summed over the shards.
    linear = inner(((totals.hidden, t.hidden), (totals.weight, t.weight), (totals.bias, t.bias)))
    options = inner(
        (
            (totals.smoothing, t.smoothing),
            (totals.z_loss, t.z_coefficient),
            (totals.temperature, t.temperature),
            (totals.token_losses, t.row_weight),
        )
    )
    tangent = jnp.zeros((), compute)
    if linear is not None:
        tangent = tangent + chunks.vocab_sum(config, linear)
    if options is not None:
        tangent = tangent + options
    return (totals.total, totals.aux), (tangent, _zero_tangents(totals.aux))


_weighted_loss.defjvp(_weighted_loss_jvp, symbolic_zeros=True)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _per_token_loss(config: Config, inputs: Inputs) -> tuple[jax.Array, Aux | None]:
    """``[N]`` losses (``"none"``), and the aux if asked for.

    Its rule keeps a shift and a log-normaliser per token and a tangent map that reverse
    mode transposes into a second pass recomputing each (chunk, vocabulary
    block) tile once (:func:`chunks.per_token_tangent`): four matrix
    products, and the temporaries of "mean" give or take a chunk-sized buffer.
    """
    forward = chunks.per_token_forward(config, inputs)
    return forward.loss, forward.aux


def _per_token_loss_jvp(
    config: Config, primals: tuple[Inputs], tangents: tuple[Inputs]
) -> tuple[tuple[jax.Array, Aux | None], tuple[jax.Array, Aux | None]]:
    (inputs,), (t,) = primals, tangents
    forward = chunks.per_token_forward(
        config, inputs, temperature=not chunks.is_zero(t.temperature)
    )
    tangent = chunks.per_token_tangent(config, inputs, forward, t)
    return (forward.loss, forward.aux), (tangent, _zero_tangents(forward.aux))


_per_token_loss.defjvp(_per_token_loss_jvp, symbolic_zeros=True)

# The entry points of the chunk loops, compiled once per configuration. Each
# call builds fresh loop bodies (closures), so without `jit` here an eager
# call would trace and compile its loops anew every time; inside a caller's
# `jit` these are inlined.
_weighted_loss_jit = jax.jit(_weighted_loss, static_argnums=0)
_per_token_loss_jit = jax.jit(_per_token_loss, static_argnums=0)
_weighted_loss_and_grads_jit = jax.jit(chunks.weighted_loss_and_grads, static_argnums=(0, 2))


@overload
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
    reduction: Reduction = "mean",
    temperature: ArrayLike | None = None,
    token_weights: ArrayLike | None = None,
    vocab_size: int | None = None,
    return_aux: Literal[False] = False,
) -> jax.Array: ...


@overload
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
    reduction: Reduction = "mean",
    temperature: ArrayLike | None = None,
    token_weights: ArrayLike | None = None,
    vocab_size: int | None = None,
    return_aux: Literal[True],
) -> tuple[jax.Array, chunks.LinearCrossEntropyAux]: ...


@overload
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
    reduction: Reduction = "mean",
    temperature: ArrayLike | None = None,
    token_weights: ArrayLike | None = None,
    vocab_size: int | None = None,
    return_aux: bool = False,
) -> jax.Array | tuple[jax.Array, chunks.LinearCrossEntropyAux]: ...


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
    reduction: Reduction = "mean",
    temperature: ArrayLike | None = None,
    token_weights: ArrayLike | None = None,
    vocab_size: int | None = None,
    return_aux: bool = False,
) -> jax.Array | tuple[jax.Array, chunks.LinearCrossEntropyAux]:
    r"""Cross-entropy of ``softcap(hidden @ weight.T + bias)`` without holding the logits.

    Equal to :func:`softmax_cross_entropy_with_integer_labels` on the logits

    .. math::
        x = c \tanh\bigl((h W^\top + b) / c\bigr) / T

    (no ``tanh`` when ``softcap`` is None, ``T = 1`` without a
    ``temperature``), with the same ``ignore_index``,
    ``label_smoothing``, ``z_loss`` and reductions, but the ``[N, V]`` logits
    are never materialised: the ``N`` tokens are processed ``chunk_size`` at a
    time, and the largest temporaries are one to three float32
    ``[chunk_size, V]`` buffers besides the gradients themselves (the plan's
    ``estimated_temporaries`` counts them). With ``reduction="mean"`` or
    ``"sum"`` the gradients are computed during the forward pass (three
    matrix products in total, like the unfused formulation); with ``"none"``
    the backward pass recomputes the logits a vocabulary block at a time
    (four products, and about the temporaries of ``"mean"``). To
    differentiate a weighted sum of per-token losses (advantages, masks),
    pass the weights as ``token_weights`` with ``"sum"``: three products.

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
      temperature: :math:`T > 0` dividing the logits after the soft cap
        (the cap bounds the model's logits; the temperature then sharpens
        or flattens their softmax), or None; may be traced, and its gradient
        is exact. ``z_loss`` applies to the log-normaliser of ``x``.
      token_weights: ``[...]`` (``labels``' shape, aligned with the labels:
        with ``shift=k`` the weight of label ``t + k`` scales the prediction
        at ``t``), multiplying each token's loss (its z-loss term too): a
        loss mask, or RL advantages. ``"mean"`` then divides by the sum of
        the weights of the counted tokens (as class weights do in
        :func:`softmax_cross_entropy_with_integer_labels`; with signed
        weights prefer ``"sum"``). May be traced; gradients with respect to
        it are exact.
      vocab_size: the number of real classes when ``weight``'s rows are
        padded (embedding tables padded to a multiple of 128): rows at or
        past it get probability 0 and exactly zero gradients, also under the
        soft cap, and a label at or past it is invalid. None: every row of
        ``weight`` is a class.
      return_aux: also return a :class:`jaxce.LinearCrossEntropyAux` of
        per-token diagnostics (log-normaliser, entropy, argmax: accuracy is
        ``aux.argmax == labels``), formed in the same pass over the chunks
        with no extra matrix product. No gradient flows through them, and
        asking for them changes neither the loss nor its gradients.

    Returns:
      The loss, float32 for half-precision inputs (float64 for float64), or
      ``(loss, aux)`` with ``return_aux=True``.
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

    References:
      - E. Wijmans, B. Huval, A. Hertzberg, V. Koltun and P. Krähenbühl, "Cut Your
        Losses in Large-Vocabulary Language Models", ICLR 2025 (Cut Cross-Entropy:
        the loss without the logits in memory). https://arxiv.org/abs/2411.09009
      - Gemma Team, "Gemma 2: Improving Open Language Models at a Practical Size",
        2024 (the logit soft cap). https://arxiv.org/abs/2408.00118
      - A. Chowdhery et al., "PaLM: Scaling Language Modeling with Pathways", 2022
        (the auxiliary z-loss). https://arxiv.org/abs/2204.02311
      - F. Gloeckle, B. Youbi Idrissi, B. Rozière, D. Lopez-Paz and G. Synnaeve,
        "Better & Faster Large Language Models via Multi-token Prediction", ICML
        2024 (``shift=k``). https://arxiv.org/abs/2404.19737
    """
    options = Options(
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
    return reduced_loss(prepare_call(hidden, weight, labels, bias, options))


def reduced_loss(
    prepared: PreparedCall, total: Callable[[jax.Array], jax.Array] = jnp.sum
) -> jax.Array | tuple[jax.Array, Aux]:
    """The loss of a prepared call (and its aux, if asked for).

    ``total`` adds the sums over a batch axis, if any.
    """
    options = prepared.options
    aux = None
    if options.reduction == "none":
        loss, aux = _per_token_losses(prepared)
    elif prepared.config is None:
        loss = jnp.zeros((), prepared.compute)
    else:
        loss, aux = _weighted_loss_jit(prepared.config, prepared.inputs)
        loss = total(loss)
        loss = loss + _integer_labels.nan_if_invalid(prepared.rule, prepared.compute, total)
    if not options.return_aux:
        return loss
    return loss, _per_token_aux(prepared, aux)


def _per_token(prepared: PreparedCall, values: jax.Array) -> jax.Array:
    """``[N]`` per-token values as ``[...]`` (``[..., T - k]`` with ``shift=k``)."""
    labels_shape, shift = prepared.labels_shape, prepared.options.shift
    values = values.reshape(labels_shape)
    return values[..., : labels_shape[-1] - shift] if shift else values


def _per_token_aux(prepared: PreparedCall, aux: Aux | None) -> Aux:
    """The aux in the shape of the per-token losses, cut off from the gradients."""
    if aux is None:  # no tokens
        empty = jnp.zeros(prepared.labels_shape, prepared.compute)
        aux = Aux(empty, empty, jnp.zeros(prepared.labels_shape, jnp.int32))
    else:
        aux = Aux(*(_per_token(prepared, values) for values in aux))
    return jax.lax.stop_gradient(aux)


def _per_token_losses(prepared: PreparedCall) -> tuple[jax.Array, Aux | None]:
    """``[...]`` (``[..., T - k]`` with ``shift=k``): 0 where not counted, NaN where invalid."""
    if prepared.config is None:
        return jnp.zeros(prepared.labels_shape, prepared.compute), None
    loss, aux = _per_token_loss_jit(prepared.config, prepared.inputs)
    if prepared.token_weights is not None:
        loss = loss * prepared.token_weights
    loss = jnp.where(prepared.rule.counted, loss, 0)
    loss = _integer_labels.nan_where_invalid(prepared.rule, loss)
    return _per_token(prepared, loss), aux


def gradients(
    hidden: ArrayLike,
    weight: ArrayLike,
    labels: ArrayLike,
    bias: ArrayLike | None,
    options: Options,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Gradients of :func:`linear_cross_entropy` w.r.t. ``hidden``, ``weight``, ``bias``.

    Computed by the code of the loss's own derivative rule (chunk by chunk,
    three matrix products, no ``[N, V]`` logits, no autodiff). For
    ``reduction="none"`` they are the gradients of the summed per-token loss.
    ``options.chunk_size`` and ``options.plan`` change only rounding.

    Returns:
      ``(d_hidden, d_weight, d_bias)`` in the shapes and dtypes of ``hidden``,
      ``weight`` and ``bias`` (accumulated in float32, or float64);
      ``d_bias`` is None without a bias. Tokens that are ignored, that
      ``shift=1`` leaves out, or whose label is out of range get zero
      ``hidden`` gradients and contribute nothing.
    """
    if options.reduction == "none":
        options = dataclasses.replace(options, reduction="sum")
    prepared = prepare_call(hidden, weight, labels, bias, options)
    # The gradients come back in the (floating) dtypes of the inputs.
    hidden_dtype = _checks.as_float_array(hidden, "hidden").dtype
    weight_dtype = _checks.as_float_array(weight, "weight").dtype
    hidden_shape = jnp.shape(hidden)
    inputs = prepared.inputs
    vocab, dim = inputs.weight.shape
    bias_dtype = None if inputs.bias is None else inputs.bias.dtype
    if prepared.config is None:
        d_hidden = jnp.zeros(hidden_shape, hidden_dtype)
        d_weight = jnp.zeros((vocab, dim), weight_dtype)
        d_bias = None if bias_dtype is None else jnp.zeros((vocab,), bias_dtype)
        return d_hidden, d_weight, d_bias
    wants = chunks.Wants(hidden=True, weight=True, bias=inputs.bias is not None)
    totals = _weighted_loss_and_grads_jit(prepared.config, inputs, wants)
    assert totals.hidden is not None and totals.weight is not None
    d_hidden = totals.hidden.reshape(hidden_shape).astype(hidden_dtype)
    d_weight = totals.weight.astype(weight_dtype)
    d_bias = None if totals.bias is None else totals.bias.astype(bias_dtype)
    return d_hidden, d_weight, d_bias
