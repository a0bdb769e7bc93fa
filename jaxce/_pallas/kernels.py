"""The two row kernels of the integer-label softmax cross-entropy, and their launch.

One program per row of ``[N, C]`` logits. Each program walks its row in
blocks of ``block_classes`` logits (a row of 128k or 256k classes does not fit
one program's registers or shared memory), upcasting each block to float32:

- forward: one read of the row. An online log-sum-exp keeps the running
  maximum ``M`` and ``S = sum_c exp(x_c - m)`` for the finite shift ``m``
  (`jaxce._formulas.finite_shift`); when the shift moves from ``m`` to ``m'``,
  ``S <- S exp(m - m') + sum_block exp(x - m')`` (`jaxce._formulas.online_total`).
  With label smoothing it also keeps ``T = sum_c w_c (x_c - m)`` and the
  weight seen so far ``W``: ``T <- T - (m' - m) W + sum_block w (x - m')``,
  every term of one sign for ``w >= 0``, so nothing cancels. It writes four
  float32 scalars per row: ``m``, ``L = log S``, ``-log p_y = L - (x_y - m)``
  and ``sum_c w_c (-log p_c) = W L - T`` (``L`` taken as 0 when ``W = 0``).
- backward: one read of the row and one write of its gradient,
  ``a p - b onehot(y) - c w`` with ``p = exp((x - m) - L)`` and per-row
  coefficients ``a, b, c`` (`jaxce._pallas.terms` derives them from the
  cotangents); a row whose coefficients are all 0 gets an exact 0.

Padding columns past ``C`` in the last block load as ``-inf`` (probability 0,
no contribution) and are never stored. On CUDA the kernels are compiled by
Pallas' Triton backend; on CPU they run in Pallas interpret mode (the same
kernel body, evaluated with XLA operations), which is how the tests check
them. Other platforms (TPU, ROCm), for which no kernel is written, compute
the same per-row values and gradient with plain XLA operations
(:func:`forward_xla`, :func:`backward_xla`) rather than interpret a kernel
there, which would be many times slower.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from jaxce import _formulas

# The launch model, in one place (`kernel_config`), for a GPU run to confirm or
# replace. One program per row walks it in blocks; the kernel is bound by
# memory bandwidth (one read of the row, and one write of its gradient in the
# backward pass), so a block is sized for the loads, not for arithmetic:
# - bytes per program per step: `_BLOCK_BYTES` = 16 KiB of logits (4096
#   float32 or 8192 bfloat16/float16), that is 16 bytes per thread per load
#   (one 128-bit vector load) at 8 warps of 32 threads;
# - registers: a block upcast to float32 is 16 (float32) or 32 (bfloat16)
#   values per thread at 8 warps, well within Hopper's 255 per thread;
# - occupancy: about 2 blocks of 8 warps (16 KiB each, with `num_stages=3`
#   software pipelining of the loads: 48 KiB of shared memory per program) per
#   SM of 228 KiB, i.e. 16 of 64 warps resident per SM, which the row count
#   (8192 rows for 132 SMs) keeps busy; rows narrower than a block take fewer
#   warps (`block // 512`, at least 1) so that small classifiers waste no
#   threads on padding.
# Measured on no GPU yet: these are the model's numbers.
_BLOCK_BYTES = 16 * 1024
# Smallest block: Triton wants power-of-two blocks, and narrow rows (C = 1)
# still run a whole block, mostly padding.
_MIN_BLOCK = 128

Smoothing = Literal["uniform", "weighted"]


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """How a program walks its row: block width and Triton's launch settings."""

    block_classes: int
    num_warps: int
    num_stages: int


def kernel_config(dtype: Any, num_classes: int) -> KernelConfig:
    """The block for ``num_classes``-wide rows of ``dtype`` logits."""
    widest = _BLOCK_BYTES // jnp.dtype(dtype).itemsize
    block = min(widest, pl.next_power_of_2(max(num_classes, _MIN_BLOCK)))
    return KernelConfig(block, num_warps=max(1, min(8, block // 512)), num_stages=3)


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """The static shape of one launch.

    ``smoothing``: None (no smoothing term), ``"uniform"`` (every class weight
    1) or ``"weighted"`` (a ``[C]`` class-weight input). Every class of a row
    takes part (a ``where`` mask reaches the kernels per row only), so a zero
    class weight on a ``-inf`` logit is NaN, as PyTorch's product.
    """

    num_classes: int
    config: KernelConfig
    smoothing: Smoothing | None

    @property
    def num_blocks(self) -> int:
        return pl.cdiv(self.num_classes, self.config.block_classes)


class _Block(NamedTuple):
    """One block of a row: where it starts, its class indices, which exist, its float32 logits."""

    start: jax.Array
    classes: jax.Array
    valid: jax.Array
    x: jax.Array

    @classmethod
    def load(cls, x_ref: Any, index: jax.Array, spec: RowSpec) -> _Block:
        width = spec.config.block_classes
        start = index * width
        classes = start + jax.lax.broadcasted_iota(jnp.int32, (width,), 0)
        valid = classes < spec.num_classes
        x = pl_triton.load(x_ref.at[pl.ds(start, width)], mask=valid, other=-jnp.inf)
        return cls(start, classes, valid, x.astype(jnp.float32))

    def weights(self, weight_ref: Any | None, spec: RowSpec) -> jax.Array | None:
        """The block's class weights (0 past the row), None for uniform smoothing."""
        if weight_ref is None:
            return None
        width = spec.config.block_classes
        return pl_triton.load(weight_ref.at[pl.ds(self.start, width)], mask=self.valid, other=0.0)


class _Running(NamedTuple):
    """The forward pass's per-row state after the blocks seen so far."""

    max: jax.Array  # M, the largest logit
    total: jax.Array  # S = sum_c exp(x_c - finite_shift(M))
    shifted: jax.Array  # T = sum_c w_c (x_c - finite_shift(M)); 0 without smoothing
    weight: jax.Array  # W = sum_c w_c over the classes seen; 0 without smoothing


def _smoothing_sums(
    block: _Block, weights: jax.Array | None, shift: jax.Array, spec: RowSpec
) -> tuple[jax.Array, jax.Array]:
    """``(sum_block w (x - shift), sum_block w)`` over the block's existing classes."""
    if weights is None:
        width = spec.config.block_classes
        existing = jnp.clip(spec.num_classes - block.start, 0, width).astype(jnp.float32)
        return jnp.sum(jnp.where(block.valid, block.x - shift, 0.0)), existing
    # Padding (weight 0, a -inf logit) takes no part; every class of the row does.
    products = _formulas.weighted_terms(weights, block.x - shift, block.valid)
    return jnp.sum(products), jnp.sum(weights)


def _forward_step(
    x_ref: Any, weight_ref: Any | None, spec: RowSpec, index: jax.Array, run: _Running
) -> _Running:
    block = _Block.load(x_ref, index, spec)
    new_max = jnp.maximum(run.max, jnp.max(block.x))
    shift, new_shift = _formulas.finite_shift(run.max), _formulas.finite_shift(new_max)
    # Every exp(x - new_shift) is at most 1 (no overflow).
    total = _formulas.online_total(run.total, shift, new_shift)
    total = total + jnp.sum(jnp.exp(block.x - new_shift))
    if spec.smoothing is None:
        return _Running(new_max, total, run.shifted, run.weight)
    block_shifted, block_weight = _smoothing_sums(
        block, block.weights(weight_ref, spec), new_shift, spec
    )
    shifted = run.shifted - (new_shift - shift) * run.weight + block_shifted
    return _Running(new_max, total, shifted, run.weight + block_weight)


def _forward_kernel(x_ref: Any, label_ref: Any, *refs: Any, spec: RowSpec) -> None:
    weight_ref = refs[0] if spec.smoothing == "weighted" else None
    outputs = refs[1:] if spec.smoothing == "weighted" else refs
    zero = jnp.float32(0)
    run = jax.lax.fori_loop(
        0,
        spec.num_blocks,
        functools.partial(_forward_step, x_ref, weight_ref, spec),
        _Running(jnp.float32(-jnp.inf), zero, zero, zero),
    )
    shift = _formulas.finite_shift(run.max)
    log_normalizer = _formulas.log_of_total(run.total)
    label_logit = x_ref[label_ref[...]].astype(jnp.float32)
    outputs[0][...] = shift
    outputs[1][...] = log_normalizer
    outputs[2][...] = log_normalizer - (label_logit - shift)
    if spec.smoothing is not None:
        # sum_c w_c (-log p_c) = W L - sum_c w_c (x_c - m); no weight, no L
        # (which may be -inf).
        outputs[3][...] = jnp.where(run.weight != 0, log_normalizer, 0.0) * run.weight - run.shifted


def _backward_kernel(
    x_ref: Any,
    label_ref: Any,
    shift_ref: Any,
    log_normalizer_ref: Any,
    probability_ref: Any,
    label_coefficient_ref: Any,
    *refs: Any,
    spec: RowSpec,
) -> None:
    weight_ref = refs[1] if spec.smoothing == "weighted" else None
    weight_coefficient_ref = refs[0] if spec.smoothing is not None else None
    dx_ref = refs[-1]
    label = label_ref[...]
    shift = shift_ref[...]
    log_normalizer = log_normalizer_ref[...]
    a = probability_ref[...]
    b = label_coefficient_ref[...]
    c = zero = jnp.float32(0)
    if weight_coefficient_ref is not None:
        c = weight_coefficient_ref[...]
    # A row that takes no part (masked, ignored, an empty mean) gets an exact
    # 0, whatever its logits hold.
    skip = (a == 0) & (b == 0) & (c == 0)

    @pl.loop(0, spec.num_blocks)
    def _(index: jax.Array) -> None:
        block = _Block.load(x_ref, index, spec)
        p = _formulas.probabilities(block.x - shift, log_normalizer)
        dx = a * p - jnp.where(block.classes == label, b, zero)
        if spec.smoothing is not None:
            weights = block.weights(weight_ref, spec)
            dx = dx - (c if weights is None else c * weights)
        dx = jnp.where(skip, zero, dx)
        width = spec.config.block_classes
        pl_triton.store(
            dx_ref.at[pl.ds(block.start, width)], dx.astype(dx_ref.dtype), mask=block.valid
        )


def _row_block(num_classes: int) -> pl.BlockSpec:
    return pl.BlockSpec((pl.squeezed, num_classes), lambda row: (row, 0))


def _scalar_block() -> pl.BlockSpec:
    return pl.BlockSpec((pl.squeezed,), lambda row: (row,))


def _shared_block(num_classes: int) -> pl.BlockSpec:
    return pl.BlockSpec((num_classes,), lambda row: (0,))


def _launch(
    kernel: Callable[..., None],
    name: str,
    in_specs: list[pl.BlockSpec],
    out_specs: list[pl.BlockSpec],
    out_shape: list[jax.ShapeDtypeStruct],
    spec: RowSpec,
    num_rows: int,
    without_kernel: Callable[..., Any],
) -> Callable[..., Any]:
    """The kernel compiled by Triton on CUDA, interpreted on CPU, ``without_kernel`` elsewhere."""

    def call(*args: jax.Array, interpret: bool) -> Any:
        config = spec.config
        return pl.pallas_call(
            functools.partial(kernel, spec=spec),
            grid=(num_rows,),
            in_specs=in_specs,
            out_specs=out_specs,
            out_shape=out_shape,
            interpret=interpret,
            compiler_params=None
            if interpret
            else pl_triton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
            name=name,
        )(*args)

    def on_platform(*args: jax.Array) -> Any:
        return jax.lax.platform_dependent(
            *args,
            cuda=functools.partial(call, interpret=False),
            cpu=functools.partial(call, interpret=True),
            default=without_kernel,
        )

    return on_platform


def forward(
    logits: jax.Array, labels: jax.Array, class_weight: jax.Array | None, spec: RowSpec
) -> list[jax.Array]:
    """``[shift, log_normalizer, nll, smooth?]`` per row of ``[N, C]`` logits (float32 ``[N]``).

    ``labels`` are int32 class indices in range (clipped by the caller);
    ``class_weight`` is the float32 ``[C]`` vector for weighted smoothing.
    """
    num_rows, num_classes = logits.shape
    in_specs = [_row_block(num_classes), _scalar_block()]
    args: list[Any] = [logits, labels]
    if spec.smoothing == "weighted":
        in_specs.append(_shared_block(num_classes))
        args.append(class_weight)
    num_outputs = 3 if spec.smoothing is None else 4
    scalar = jax.ShapeDtypeStruct((num_rows,), jnp.float32)
    launch = _launch(
        _forward_kernel,
        "jaxce_softmax_ce_forward",
        in_specs,
        [_scalar_block()] * num_outputs,
        [scalar] * num_outputs,
        spec,
        num_rows,
        lambda logits, labels, *weight: tuple(forward_xla(logits, labels, *weight, spec=spec)),
    )
    return list(launch(*args))


def forward_xla(
    logits: jax.Array, labels: jax.Array, class_weight: jax.Array | None = None, *, spec: RowSpec
) -> list[jax.Array]:
    """What :func:`forward`'s kernel writes, with XLA operations (platforms without the kernel)."""
    x = logits.astype(jnp.float32)
    shift, _, total = _formulas.shifted_exponentials(x)
    shifted = x - shift
    shift = shift[:, 0]
    log_normalizer = _formulas.log_of_total(total)
    label_logit = _formulas.label_logit(x, labels)
    outputs = [shift, log_normalizer, log_normalizer - (label_logit - shift)]
    if spec.smoothing is None:
        return outputs
    if spec.smoothing == "uniform":
        weighted_shifted = jnp.sum(shifted, axis=-1)
        weight = jnp.full_like(shift, spec.num_classes)
    else:
        assert class_weight is not None
        products = _formulas.weighted_terms(class_weight[None, :], shifted, None)
        weighted_shifted = jnp.sum(products, axis=-1)
        weight = jnp.broadcast_to(jnp.sum(class_weight), shift.shape)
    smooth = jnp.where(weight != 0, log_normalizer, 0.0) * weight - weighted_shifted
    return [*outputs, smooth]


class RowCoefficients(NamedTuple):
    """Per row, float32 ``[N]``: the gradient is ``probability p - label onehot(y) - weight w``."""

    probability: jax.Array
    label: jax.Array
    weight: jax.Array | None  # None without smoothing


def backward(
    logits: jax.Array,
    labels: jax.Array,
    shift: jax.Array,
    log_normalizer: jax.Array,
    coefficients: RowCoefficients,
    class_weight: jax.Array | None,
    spec: RowSpec,
) -> jax.Array:
    """The ``[N, C]`` gradient, in the logits' dtype, from the forward pass's per-row residuals."""
    num_rows, num_classes = logits.shape
    args: list[Any] = [
        logits,
        labels,
        shift,
        log_normalizer,
        coefficients.probability,
        coefficients.label,
    ]
    in_specs = [_row_block(num_classes)] + [_scalar_block()] * 5
    if spec.smoothing is not None:
        args.append(coefficients.weight)
        in_specs.append(_scalar_block())
    if spec.smoothing == "weighted":
        args.append(class_weight)
        in_specs.append(_shared_block(num_classes))
    launch = _launch(
        _backward_kernel,
        "jaxce_softmax_ce_backward",
        in_specs,
        [_row_block(num_classes)],
        [jax.ShapeDtypeStruct(logits.shape, logits.dtype)],
        spec,
        num_rows,
        lambda *arrays: (_backward_xla_arrays(*arrays, spec=spec),),
    )
    return launch(*args)[0]


def _backward_xla_arrays(
    logits: jax.Array,
    labels: jax.Array,
    shift: jax.Array,
    log_normalizer: jax.Array,
    probability: jax.Array,
    label: jax.Array,
    *rest: jax.Array,
    spec: RowSpec,
) -> jax.Array:
    """:func:`backward_xla` from the kernel's argument list."""
    weight = rest[0] if spec.smoothing is not None else None
    class_weight = rest[1] if spec.smoothing == "weighted" else None
    coefficients = RowCoefficients(probability, label, weight)
    return backward_xla(logits, labels, shift, log_normalizer, coefficients, class_weight, spec)


def backward_xla(
    logits: jax.Array,
    labels: jax.Array,
    shift: jax.Array,
    log_normalizer: jax.Array,
    coefficients: RowCoefficients,
    class_weight: jax.Array | None,
    spec: RowSpec,
) -> jax.Array:
    """What :func:`backward`'s kernel writes, with XLA operations (platforms without the kernel)."""
    x = logits.astype(jnp.float32)
    p = _formulas.probabilities(x - shift[:, None], log_normalizer[:, None])
    a, b = coefficients.probability[:, None], coefficients.label[:, None]
    classes = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
    dx = a * p - jnp.where(classes == labels[:, None], b, 0.0)
    c = jnp.zeros_like(a)
    if spec.smoothing is not None:
        assert coefficients.weight is not None
        c = coefficients.weight[:, None]
        dx = dx - (c if class_weight is None else c * class_weight[None, :])
    skip = (a == 0) & (b == 0) & (c == 0)
    return jnp.where(skip, 0.0, dx).astype(logits.dtype)
