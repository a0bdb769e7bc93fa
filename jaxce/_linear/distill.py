r"""Distillation through the fused loop: a student's softmax toward a teacher's, chunk by chunk.

For each token, the student's logits ``z = h W^T`` and the teacher's
``z' = h' W'^T`` are formed a chunk of tokens at a time, divided by the
temperature ``T`` (``s = z / T``, ``t = z' / T``), and never held for every
token at once. With ``Q = softmax(s)``, ``P = softmax(t)``:

- ``beta = 0``: forward KL, ``sum_c P_c (log P_c - log Q_c)``;
- ``beta = 1``: reverse KL, ``sum_c Q_c (log Q_c - log P_c)``;
- between: the generalized Jensen-Shannon divergence
  ``beta KL(P || M) + (1 - beta) KL(Q || M)``, ``M = beta P + (1 - beta) Q``.

``hard_label_weight = lambda`` mixes in the cross-entropy of the untempered
student logits on the labels: ``(1 - lambda) D + lambda CE``.

The gradient of each with respect to the student's logits ``s`` follows from
``d log Q_j / d s_k = [j = k] - Q_k``: with ``u_j = dD / d log Q_j`` it is
``u - Q sum_j u_j``, which gives

- forward KL: ``Q - P``;
- reverse KL: ``Q (log Q - log P - KL(Q || P))``;
- JSD: ``(1 - beta) Q (log Q - log M - KL(Q || M))``;

and ``d/dz = (1/T) d/ds``; the cross-entropy adds ``lambda (softmax(z) - onehot(y))``.
The teacher is a constant. Everything else is the fused loss's: the plan's
chunk size, its loop (:func:`chunks._loop`), its rows (:func:`chunks.chunk_rows`,
the last chunk overlapping the one before), and the shifted log-sum-exp of
`jaxce._formulas`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxce import _checks, _closed_form, _formulas, _integer_labels, _reduce
from jaxce._linear import chunks, xla_cpu
from jaxce._linear.options import check_count, check_plan, check_temperature
from jaxce._linear.plan import LinearCrossEntropyPlan, plan_linear_cross_entropy
from jaxce._reduce import Reduction


@dataclasses.dataclass(frozen=True)
class Config:
    """Trace-time configuration of one call (hashable: a static argument)."""

    num_tokens: int
    chunk: int
    beta: float
    temperature: bool  # the logits are divided by a temperature
    hard: bool  # the cross-entropy on the labels is mixed in

    @property
    def num_chunks(self) -> int:
        return -(-self.num_tokens // self.chunk)


class Inputs(NamedTuple):
    """The arrays the loop reads; only ``hidden`` and ``weight`` are differentiated."""

    hidden: jax.Array  # [N, D]
    weight: jax.Array  # [V, D]
    teacher_hidden: jax.Array  # [N, D']
    teacher_weight: jax.Array  # [V, D']
    target: jax.Array  # [N] int32 labels clipped to [0, V)
    temperature: jax.Array  # in the compute dtype
    hard_weight: jax.Array  # lambda, in the compute dtype


class Pass(NamedTuple):
    """What one pass over the chunks forms: the weighted sum, per-token losses, gradients."""

    total: jax.Array  # sum_i r_i loss_i
    losses: jax.Array | None  # [N]
    hidden: jax.Array | None  # [N, D]
    weight: jax.Array | None  # [V, D]


def _log_softmax(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(log softmax(x), softmax(x))`` over the last axis, in the shifted frame."""
    row_max, log_normalizer, p, _ = _closed_form.softmax_parts(x)
    return _formulas.log_probabilities(x - row_max[:, None], log_normalizer[:, None]), p


def _expectation(p: jax.Array, values: jax.Array) -> jax.Array:
    """``sum_c p_c values_c`` with ``0 * anything = 0`` (a class of probability 0 adds nothing)."""
    return jnp.sum(jnp.where(p > 0, p * values, 0), axis=-1)


def divergence(
    beta: float, log_q: jax.Array, q: jax.Array, log_p: jax.Array, p: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``(D, dD/ds)`` per row for the student ``(log Q, Q)`` and the teacher ``(log P, P)``."""
    if beta == 0:
        return _expectation(p, log_p - log_q), q - p
    if beta == 1:
        log_ratio = log_q - log_p
        loss = _expectation(q, log_ratio)
        return loss, jnp.where(q > 0, q * (log_ratio - loss[:, None]), 0)
    log_m = jnp.logaddexp(math.log(beta) + log_p, math.log1p(-beta) + log_q)
    student = log_q - log_m
    kl_qm = _expectation(q, student)
    loss = beta * _expectation(p, log_p - log_m) + (1 - beta) * kl_qm
    return loss, (1 - beta) * jnp.where(q > 0, q * (student - kl_qm[:, None]), 0)


def _row_terms(
    config: Config, inputs: Inputs, hidden: jax.Array, teacher_hidden: jax.Array, target: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``(loss, d loss / d z)`` of a chunk's rows (``[C]``, ``[C, V]``) from its hidden states."""
    compute = inputs.temperature.dtype
    z = jax.lax.dot_general(
        hidden, inputs.weight, chunks.CONTRACT_DIM, preferred_element_type=compute
    )
    t = jax.lax.dot_general(
        teacher_hidden, inputs.teacher_weight, chunks.CONTRACT_DIM, preferred_element_type=compute
    )
    temperature = inputs.temperature if config.temperature else None
    log_q, q = _log_softmax(_formulas.soften(z, None, temperature))
    log_p, p = _log_softmax(_formulas.soften(t, None, temperature))
    loss, slope = divergence(config.beta, log_q, q, log_p, p)
    if temperature is not None:
        slope = slope / temperature
    if config.hard:
        # The cross-entropy of the untempered logits: with no temperature, the
        # student's log-softmax is theirs already.
        log_q1, q1 = (log_q, q) if temperature is None else _log_softmax(z)
        hard = inputs.hard_weight
        label = chunks.label_mask(target, z.shape[-1])
        nll = -jnp.sum(jnp.where(label, log_q1, 0), axis=-1)
        loss = (1 - hard) * loss + hard * nll
        slope = (1 - hard) * slope + hard * (q1 - label.astype(compute))
    return loss, slope


def one_pass(
    config: Config, inputs: Inputs, row_weight: jax.Array, *, losses: bool, gradients: bool
) -> Pass:
    """``sum_i r_i loss_i`` and, as asked, the per-token losses and the gradients of the sum.

    Per chunk: two products for the logits, and with ``gradients`` two more
    (``g W`` for the chunk's hidden gradient, ``g^T h`` added to the weight's).
    """
    compute = inputs.temperature.dtype
    vocab, dim = inputs.weight.shape

    def body(index: jax.Array, carry: Pass) -> Pass:
        start, fresh = chunks.chunk_rows(config, index)  # type: ignore[arg-type]
        hidden = xla_cpu.take_rows(inputs.hidden, start, config.chunk)
        teacher_hidden = xla_cpu.take_rows(inputs.teacher_hidden, start, config.chunk)
        target = jax.lax.dynamic_slice_in_dim(inputs.target, start, config.chunk)
        weights = jax.lax.dynamic_slice_in_dim(row_weight, start, config.chunk)
        weights = jnp.where(fresh, weights, 0)
        loss, slope = _row_terms(config, inputs, hidden, teacher_hidden, target)
        total = carry.total + jnp.sum(jnp.where(weights != 0, weights * loss, 0))
        token_losses = carry.losses
        if token_losses is not None:
            token_losses = jax.lax.dynamic_update_slice_in_dim(token_losses, loss, start, 0)
        d_hidden, d_weight = carry.hidden, carry.weight
        if gradients:
            assert d_hidden is not None and d_weight is not None
            g = jnp.where(weights[:, None] != 0, weights[:, None] * slope, 0)
            g_in = g.astype(inputs.weight.dtype)
            rows = jax.lax.dot_general(
                g_in, inputs.weight, chunks.CONTRACT_VOCAB, preferred_element_type=compute
            )
            old = jax.lax.dynamic_slice_in_dim(d_hidden, start, config.chunk)
            rows = jnp.where(fresh[:, None], rows, old)
            d_hidden = jax.lax.dynamic_update_slice_in_dim(d_hidden, rows, start, 0)
            d_weight = d_weight + jax.lax.dot_general(
                g_in, hidden, chunks.CONTRACT_TOKENS, preferred_element_type=compute
            )
        return Pass(total, token_losses, d_hidden, d_weight)

    def zeros(wanted: bool, shape: tuple[int, ...]) -> jax.Array | None:
        return jnp.zeros(shape, compute) if wanted else None

    init = Pass(
        jnp.zeros((), compute),
        zeros(losses, (config.num_tokens,)),
        zeros(gradients, (config.num_tokens, dim)),
        zeros(gradients, (vocab, dim)),
    )
    init = chunks.varying_like(init, inputs, row_weight)
    return chunks._loop(config.num_chunks, body, init)


def _teacher_constant(inputs: Inputs) -> Inputs:
    return inputs._replace(
        teacher_hidden=jax.lax.stop_gradient(inputs.teacher_hidden),
        teacher_weight=jax.lax.stop_gradient(inputs.teacher_weight),
        temperature=jax.lax.stop_gradient(inputs.temperature),
        hard_weight=jax.lax.stop_gradient(inputs.hard_weight),
    )


def _dot(gradient: jax.Array | None, tangent: Any) -> jax.Array:
    if gradient is None or chunks.is_zero(tangent):
        return jnp.zeros((), jnp.float32)
    return jnp.vdot(gradient, tangent.astype(gradient.dtype))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def weighted_total(
    config: Config, hidden: jax.Array, weight: jax.Array, inputs: Inputs, row_weight: jax.Array
) -> jax.Array:
    """``sum_i r_i loss_i``; its derivative rule forms the loss and the gradients in one pass."""
    inputs = inputs._replace(hidden=hidden, weight=weight)
    return one_pass(config, inputs, row_weight, losses=False, gradients=False).total


@weighted_total.defjvp
def _weighted_total_jvp(
    config: Config, primals: tuple[Any, ...], tangents: tuple[Any, ...]
) -> tuple[jax.Array, jax.Array]:
    hidden, weight, inputs, row_weight = primals
    hidden_dot, weight_dot, _, _ = tangents
    inputs = inputs._replace(hidden=hidden, weight=weight)
    out = one_pass(config, inputs, row_weight, losses=False, gradients=True)
    tangent = _dot(out.hidden, hidden_dot) + _dot(out.weight, weight_dot)
    return out.total, tangent.astype(out.total.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def token_losses(
    config: Config, hidden: jax.Array, weight: jax.Array, inputs: Inputs, row_weight: jax.Array
) -> jax.Array:
    """``[N]`` per-token losses (``r_i`` != 0 marks the tokens whose loss is formed)."""
    inputs = inputs._replace(hidden=hidden, weight=weight)
    out = one_pass(config, inputs, row_weight, losses=True, gradients=False)
    assert out.losses is not None
    return out.losses


def _token_losses_forward(
    config: Config, hidden: jax.Array, weight: jax.Array, inputs: Inputs, row_weight: jax.Array
) -> tuple[jax.Array, tuple[Any, ...]]:
    return token_losses(config, hidden, weight, inputs, row_weight), (
        hidden,
        weight,
        inputs,
        row_weight,
    )


def _token_losses_backward(
    config: Config, residuals: tuple[Any, ...], cotangent: jax.Array
) -> tuple[Any, ...]:
    """The cotangent's gradients: one more pass, with the cotangent as the row weights."""
    hidden, weight, inputs, row_weight = residuals
    inputs = inputs._replace(hidden=hidden, weight=weight)
    scale = jnp.where(row_weight != 0, cotangent.astype(row_weight.dtype), 0)
    out = one_pass(config, inputs, scale, losses=False, gradients=True)
    assert out.hidden is not None and out.weight is not None
    zero_inputs = jax.tree_util.tree_map(_zero_cotangent, inputs)
    return (
        out.hidden.astype(hidden.dtype),
        out.weight.astype(weight.dtype),
        zero_inputs,
        jnp.zeros_like(row_weight),
    )


def _zero_cotangent(x: jax.Array) -> Any:
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


token_losses.defvjp(_token_losses_forward, _token_losses_backward)


def chunk_size_for(
    num_tokens: int,
    dim: int,
    vocab: int,
    dtype: Any,
    chunk_size: int | None,
    plan: LinearCrossEntropyPlan | None,
) -> int:
    """The chunk: ``chunk_size``, else the plan's, else half of the fused loss's "none" plan.

    A chunk holds about four ``[chunk, V]`` float32 buffers (the two logits,
    their softmaxes, the gradient), twice the per-token cross-entropy's.
    """
    if chunk_size is not None:
        return max(1, min(chunk_size, num_tokens))
    if plan is not None:
        return max(1, min(plan.chunk_size, num_tokens))
    default = plan_linear_cross_entropy(num_tokens, dim, vocab, dtype, reduction="none")
    chunk = default.chunk_size if default.platform != "cpu" else max(16, default.chunk_size // 2)
    return max(1, min(chunk, num_tokens))


def check_beta(beta: Any) -> float:
    """``beta``, a concrete number in [0, 1] (it selects the formula at trace time)."""
    if isinstance(beta, jax.core.Tracer):
        raise TypeError(
            "`beta` must be a concrete Python float in [0, 1] (it selects the divergence "
            "when the function is traced), got a traced value."
        )
    try:
        value = float(np.asarray(beta, np.float64))
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(beta, bool) or np.ndim(beta) != 0 or not 0 <= value <= 1:
        raise ValueError(f"`beta` must be a float in [0, 1], got {beta!r}.")
    return value


def option_validity(temperature: Any, hard_label_weight: Any) -> jax.Array | None:
    """Concrete options are checked here (``ValueError``); traced ones give a validity flag."""
    _checks.check_unit_interval(hard_label_weight, "hard_label_weight", closed_right=True)
    return _checks.all_valid(
        check_temperature(temperature),
        _checks.option_valid(hard_label_weight, "hard_label_weight", high=1.0, closed_right=True),
    )


def _check_arrays(
    hidden: jax.Array,
    weight: jax.Array,
    teacher_hidden: jax.Array,
    teacher_weight: jax.Array,
    labels: jax.Array | None,
) -> None:
    for name, h, w, w_name in (
        ("hidden", hidden, weight, "weight"),
        ("teacher_hidden", teacher_hidden, teacher_weight, "teacher_weight"),
    ):
        if h.ndim < 1:
            raise ValueError(f"`{name}` must have shape [..., D], got a scalar.")
        if w.ndim != 2 or w.shape[1] != h.shape[-1] or 0 in w.shape:
            raise ValueError(
                f"`{w_name}` must have shape [V, D] with D = {h.shape[-1]} (the last axis of "
                f"`{name}`) and V >= 1, got {w.shape}. The logits are `{name} @ {w_name}.T`; "
                "pass the transpose if yours is [D, V]."
            )
    if teacher_hidden.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(
            f"`teacher_hidden` must have shape {(*hidden.shape[:-1], 'D_teacher')} (one row "
            f"per token of `hidden`), got {teacher_hidden.shape}."
        )
    if teacher_weight.shape[0] != weight.shape[0]:
        raise ValueError(
            f"`teacher_weight` must have the vocabulary of `weight`, {weight.shape[0]} rows, "
            f"got {teacher_weight.shape[0]}."
        )
    if labels is not None and labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"`labels` must have shape {hidden.shape[:-1]} (`hidden`'s shape without its "
            f"last axis), got {labels.shape}."
        )


def linear_distillation_loss(
    hidden: Any,
    weight: Any,
    teacher_hidden: Any,
    teacher_weight: Any,
    labels: Any | None = None,
    *,
    temperature: Any = 1.0,
    beta: float = 0.0,
    hard_label_weight: Any = 0.0,
    ignore_index: int | None = None,
    reduction: Reduction = "mean",
    chunk_size: int | None = None,
    plan: LinearCrossEntropyPlan | None = None,
) -> jax.Array:
    r"""Distills a student's linear head toward a teacher's, never holding either ``[N, V]`` logits.

    With the student's distribution :math:`Q = \operatorname{softmax}(h W^\top / T)`
    and the teacher's :math:`P = \operatorname{softmax}(h' W'^\top / T)` per token,

    .. math::
        D_\beta = \begin{cases}
            \mathrm{KL}(P \,\|\, Q) & \beta = 0 \text{ (forward KL)} \\
            \mathrm{KL}(Q \,\|\, P) & \beta = 1 \text{ (reverse KL)} \\
            \beta\, \mathrm{KL}(P \,\|\, M) + (1 - \beta)\, \mathrm{KL}(Q \,\|\, M),
            \ M = \beta P + (1 - \beta) Q & \text{otherwise}
        \end{cases}

    and the loss of a token is :math:`(1 - \lambda) D_\beta + \lambda\, \mathrm{CE}`,
    where :math:`\mathrm{CE} = -\log \operatorname{softmax}(h W^\top)_y` is the
    ordinary cross-entropy on the label at temperature 1 and
    :math:`\lambda` is ``hard_label_weight``. The divergence is not multiplied by
    :math:`T^2` (Hinton et al. do, to keep the gradients' scale as ``T``
    grows): multiply the loss yourself if you want it.

    The tokens are processed a chunk at a time, as in
    :func:`jaxce.linear_cross_entropy`: per chunk, two products form the
    student's and the teacher's logits, and two more push the gradient
    through the student's head. The teacher is a constant: no gradient flows
    to ``teacher_hidden``, ``teacher_weight``, ``temperature`` or
    ``hard_label_weight``. ``jax.grad``, ``jax.vjp`` and ``jax.jvp`` work for
    ``"mean"`` and ``"sum"``; ``"none"`` supports reverse mode (``grad``,
    ``vjp``). Its closed-form gradient is
    :func:`jaxce.derivatives.linear_distillation_loss`.

    Args:
      hidden: ``[..., D]`` the student's final hidden states.
      weight: ``[V, D]`` the student's output embedding (logits ``hidden @ weight.T``).
      teacher_hidden: ``[..., D_teacher]`` the teacher's hidden states for the same tokens
        (its hidden size may differ from the student's).
      teacher_weight: ``[V, D_teacher]`` the teacher's output embedding (same vocabulary).
      labels: ``[...]`` integer labels: needed for ``hard_label_weight > 0`` and
        ``ignore_index``; None otherwise.
      temperature: ``T > 0``, dividing both models' logits for the divergence; may be traced.
      beta: the divergence, a Python float in ``[0, 1]`` (static: it selects the formula).
      hard_label_weight: :math:`\lambda \in [0, 1]`; may be traced.
      ignore_index: tokens whose label equals it take no part (e.g. ``-100``).
      reduction: ``"mean"`` over the tokens that take part (0 over none), ``"sum"``,
        or ``"none"`` (``[...]``, 0 at ignored tokens).
      chunk_size: tokens per chunk; None for the plan's.
      plan: a :func:`jaxce.plan_linear_cross_entropy` plan whose chunk size to
        use; None: half of the chunk the fused cross-entropy's ``"none"`` plan
        takes on CPU (a chunk here holds twice its buffers), the same on GPU and TPU.

    Returns:
      The loss, float32 for half-precision inputs.

    Example:
      >>> import jax, jax.numpy as jnp, jaxce
      >>> keys = jax.random.split(jax.random.key(0), 4)
      >>> h, w = jax.random.normal(keys[0], (6, 8)), jax.random.normal(keys[1], (50, 8))
      >>> th, tw = jax.random.normal(keys[2], (6, 16)), jax.random.normal(keys[3], (50, 16))
      >>> loss = jaxce.linear_distillation_loss(h, w, th, tw, temperature=2.0, beta=0.5)
      >>> bool(loss > 0)
      True

    A label outside ``[0, V)`` that is not ``ignore_index`` gives its token a
    NaN loss when ``hard_label_weight`` is set; a traced ``temperature`` or
    ``hard_label_weight`` out of range makes the loss NaN (``jaxce.checked``
    raises instead).

    References:
      - G. Hinton, O. Vinyals and J. Dean, "Distilling the Knowledge in a Neural
        Network", 2015. https://arxiv.org/abs/1503.02531
      - R. Agarwal et al., "On-Policy Distillation of Language Models: Learning
        from Self-Generated Mistakes", ICLR 2024 (the generalized JSD).
        https://arxiv.org/abs/2306.13649
      - Liger-Kernel, ``LigerFusedLinearJSD`` (the same ``beta`` convention).
        https://github.com/linkedin/Liger-Kernel
    """
    prepared = prepare(
        hidden, weight, teacher_hidden, teacher_weight, labels,
        temperature=temperature, beta=beta, hard_label_weight=hard_label_weight,
        ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size, plan=plan,
    )  # fmt: skip
    config, inputs, row_weight = prepared.config, prepared.inputs, prepared.row_weight
    if config is None:
        loss = jnp.zeros(prepared.batch_shape if reduction == "none" else (), prepared.compute)
        return _checks.nan_unless(prepared.options_valid, loss)
    if reduction == "none":
        losses = token_losses(config, inputs.hidden, inputs.weight, inputs, row_weight)
        losses = jnp.where(prepared.counted, losses, 0)
        if prepared.invalid is not None:
            losses = jnp.where(prepared.invalid, jnp.nan, losses)
        return _checks.nan_unless(prepared.options_valid, losses.reshape(prepared.batch_shape))
    loss = weighted_total(config, inputs.hidden, inputs.weight, inputs, row_weight)
    if prepared.invalid is not None:
        loss = jnp.where(jnp.any(prepared.invalid), jnp.nan, loss)
    return _checks.nan_unless(prepared.options_valid, loss)


class Prepared(NamedTuple):
    """One call, checked: its configuration (None without tokens) and the arrays the loop reads."""

    config: Config | None
    inputs: Inputs
    row_weight: jax.Array  # [N] the reduction's weight of each token
    counted: jax.Array  # [N] tokens that take part
    invalid: jax.Array | None  # [N] counted tokens whose label the hard term cannot read
    options_valid: jax.Array | None  # traced options in range
    batch_shape: tuple[int, ...]
    compute: Any


def prepare(
    hidden: Any,
    weight: Any,
    teacher_hidden: Any,
    teacher_weight: Any,
    labels: Any | None,
    *,
    temperature: Any,
    beta: float,
    hard_label_weight: Any,
    ignore_index: int | None,
    reduction: Reduction,
    chunk_size: int | None,
    plan: LinearCrossEntropyPlan | None,
) -> Prepared:
    """Checks the arguments and bundles what the loop reads; no work on the logits."""
    hidden = _checks.as_float_array(hidden, "hidden")
    weight = _checks.as_float_array(weight, "weight")
    teacher_hidden = _checks.as_float_array(teacher_hidden, "teacher_hidden")
    teacher_weight = _checks.as_float_array(teacher_weight, "teacher_weight")
    labels = None if labels is None else _checks.as_integer_labels(labels)
    _check_arrays(hidden, weight, teacher_hidden, teacher_weight, labels)
    beta = check_beta(beta)
    _checks.check_reduction(reduction)
    options_valid = option_validity(temperature, hard_label_weight)
    hard = not _checks.is_concrete_zero(hard_label_weight)
    if labels is None and (hard or ignore_index is not None):
        raise ValueError(
            "`labels` are needed with `hard_label_weight` or `ignore_index`, got None."
        )
    _integer_labels.check_ignore_index(ignore_index)
    check_count(chunk_size, "chunk_size", minimum=1, optional=True)
    check_plan(plan)
    compute = jnp.result_type(
        _checks.compute_dtype(hidden),
        _checks.compute_dtype(weight),
        _checks.compute_dtype(teacher_hidden),
        _checks.compute_dtype(teacher_weight),
    )
    student_dtype = jnp.result_type(hidden.dtype, weight.dtype)
    teacher_dtype = jnp.result_type(teacher_hidden.dtype, teacher_weight.dtype)
    batch_shape = hidden.shape[:-1]
    vocab, dim = weight.shape
    num_tokens = math.prod(batch_shape)

    # Which tokens take part, and which have a label the hard term cannot read.
    counted = jnp.ones((num_tokens,), bool)
    target = jnp.zeros((num_tokens,), jnp.int32)
    invalid = None
    if labels is not None:
        flat = labels.reshape(-1)
        counted = ~_integer_labels.ignored_labels(flat, ignore_index)
        target = jnp.clip(flat, 0, vocab - 1).astype(jnp.int32)
        if hard:
            invalid = counted & ((flat < 0) | (flat >= vocab))
            _checks.check_values(
                ~invalid, flat, "labels", f"class indices in [0, {vocab}) or `ignore_index`"
            )
    count = jnp.sum(counted, dtype=compute)
    if reduction == "mean":
        row_weight = jnp.where(counted, _reduce.safe_divide(jnp.ones((), compute), count), 0)
    else:
        row_weight = counted.astype(compute)
    if invalid is not None:
        # Its loss is NaN; like every jaxce loss, it adds nothing to the gradients.
        row_weight = jnp.where(invalid, 0, row_weight)

    config = None if num_tokens == 0 else Config(
        num_tokens=num_tokens,
        chunk=chunk_size_for(num_tokens, dim, vocab, student_dtype, chunk_size, plan),
        beta=beta,
        temperature=not (
            isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
            and temperature == 1
        ),
        hard=hard,
    )  # fmt: skip
    inputs = Inputs(
        hidden=hidden.astype(student_dtype).reshape(num_tokens, dim),
        weight=weight.astype(student_dtype),
        teacher_hidden=teacher_hidden.astype(teacher_dtype).reshape(
            num_tokens, teacher_hidden.shape[-1]
        ),
        teacher_weight=teacher_weight.astype(teacher_dtype),
        target=target,
        temperature=jnp.asarray(temperature, compute),
        hard_weight=jnp.asarray(hard_label_weight, compute),
    )
    return Prepared(
        config, _teacher_constant(inputs), row_weight, counted, invalid, options_valid,
        batch_shape, compute,
    )  # fmt: skip


def gradients(
    hidden: Any,
    weight: Any,
    teacher_hidden: Any,
    teacher_weight: Any,
    labels: Any | None,
    **options: Any,
) -> tuple[jax.Array, jax.Array]:
    """``(d hidden, d weight)`` of :func:`linear_distillation_loss` by its own derivative rule.

    For ``reduction="none"``, of the summed per-token losses.
    """
    if options.get("reduction") == "none":
        options = {**options, "reduction": "sum"}
    prepared = prepare(hidden, weight, teacher_hidden, teacher_weight, labels, **options)
    hidden_dtype = _checks.as_float_array(hidden, "hidden").dtype
    weight_dtype = _checks.as_float_array(weight, "weight").dtype
    hidden_shape, weight_shape = jnp.shape(hidden), jnp.shape(weight)
    if prepared.config is None:
        return jnp.zeros(hidden_shape, hidden_dtype), jnp.zeros(weight_shape, weight_dtype)
    out = one_pass(
        prepared.config, prepared.inputs, prepared.row_weight, losses=False, gradients=True
    )
    assert out.hidden is not None and out.weight is not None
    return (
        out.hidden.reshape(hidden_shape).astype(hidden_dtype),
        out.weight.astype(weight_dtype),
    )
