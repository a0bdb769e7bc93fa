"""``implementation="pallas"``: the kernels in Pallas interpret mode on this CPU, lowered for CUDA.

Interpret mode runs the kernel bodies themselves (block loop, online
log-sum-exp, masked loads of the last block) with XLA operations, so every
value and gradient here is the kernel's. Each case is compared with the XLA
path on the same input and with the float64 reference (`jaxce._references`),
with tolerances from `helpers`: the kernel and XLA both compute in float32
and round the gradient once to the logits' dtype, so each is within
``half_precision_output_bound(dtype, C + 16)`` of the exact value, norm-wise
(a sum over ``C`` classes costs at most ``C`` float32 roundings, Higham's
``gamma_C``; 16 more cover exp, log and the few scalar operations around
them), and two of them within twice that of each other.

Most cases use a small block (128 float32 or 256 half-precision columns per
step, `small_blocks`) so that rows of a few hundred classes take several steps
and end on a partial block; one case runs 262144 classes at the default
block. The CUDA tests lower ``value_and_grad`` at Llama 3's and Gemma's
vocabularies without allocating anything and check that the module calls the
two Triton kernels.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REDUCTIONS, assert_normwise_close, half_precision_output_bound
from jax._src.ad_checkpoint import saved_residuals

import jaxce
from jaxce import _references
from jaxce._pallas import kernels

loss_fn = jaxce.softmax_cross_entropy_with_integer_labels
TRITON_CALL = "__gpu$xla.gpu.triton"
KERNEL_NAMES = ("jaxce_softmax_ce_forward", "jaxce_softmax_ce_backward")


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """512 bytes per step: 128 float32 or 256 bfloat16/float16 columns."""
    monkeypatch.setattr(kernels, "_BLOCK_BYTES", 512)


def tolerance(dtype: Any, num_classes: int) -> float:
    """One result's norm-wise bound: float32 sums over ``num_classes``, one rounding to ``dtype``."""
    return half_precision_output_bound(dtype, num_classes + 16)


def make_inputs(
    seed: int, batch: tuple[int, ...], num_classes: int, dtype: Any, scale: float = 3.0
) -> tuple[jax.Array, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(*batch, num_classes)) * scale, dtype)
    labels = rng.integers(0, num_classes, size=batch)
    return logits, labels


def value_and_grad(
    logits: jax.Array, labels: Any, cotangent: np.ndarray | None, **options: Any
) -> tuple[jax.Array, jax.Array]:
    """The loss and the gradient of ``sum(cotangent * loss)`` (of the loss itself when reduced)."""

    def scalar(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        loss = loss_fn(x, labels, **options)
        weighted = loss if cotangent is None else jnp.sum(loss * cotangent)
        return weighted, loss

    (_, loss), grad = jax.jit(jax.value_and_grad(scalar, has_aux=True))(logits)
    return loss, grad


def reference(
    logits: jax.Array, labels: Any, cotangent: np.ndarray | None, **options: Any
) -> tuple[np.ndarray, np.ndarray]:
    """The float64 reference's loss and gradient at the same (exactly upcast) logits."""
    options = {k: v for k, v in options.items() if k != "implementation"}
    with jax.enable_x64(True):
        x = jnp.asarray(np.asarray(logits.astype(jnp.float32), np.float64))
        weight = options.get("weight")
        if weight is not None:
            options["weight"] = jnp.asarray(np.asarray(weight, np.float64))

        def scalar(z: jax.Array) -> tuple[jax.Array, jax.Array]:
            loss = _references.softmax_cross_entropy_with_integer_labels(z, labels, **options)
            weighted = loss if cotangent is None else jnp.sum(loss * cotangent)
            return weighted, loss

        (_, loss), grad = jax.jit(jax.value_and_grad(scalar, has_aux=True))(x)
        return np.asarray(loss), np.asarray(grad)


def check_against_xla_and_float64(
    logits: jax.Array, labels: Any, *, seed: int = 0, **options: Any
) -> None:
    num_classes = logits.shape[-1]
    cotangent = None
    if options.get("reduction", "none") == "none":
        cotangent = np.random.default_rng(seed).uniform(0.5, 2.0, size=np.shape(labels))
    kernel = value_and_grad(logits, labels, cotangent, implementation="pallas", **options)
    xla = value_and_grad(logits, labels, cotangent, implementation="xla", **options)
    exact = reference(logits, labels, cotangent, **options)
    assert kernel[0].dtype == jnp.float32 and kernel[1].dtype == logits.dtype
    loss_bound = tolerance(jnp.float32, num_classes)
    grad_bound = tolerance(logits.dtype, num_classes)
    assert_normwise_close(kernel[0], xla[0], 2 * loss_bound, "loss vs xla")
    assert_normwise_close(kernel[1], xla[1], 2 * grad_bound, "gradient vs xla")
    assert_normwise_close(kernel[0], exact[0], loss_bound, "loss vs float64")
    assert_normwise_close(kernel[1], exact[1], grad_bound, "gradient vs float64")


def _weights(num_classes: int, seed: int = 1) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).uniform(0.2, 2.0, size=num_classes), jnp.float32)


NUM_CLASSES = 300  # 3 float32 steps of 128 (the last one partial), 2 half-precision ones of 256
OPTIONS: dict[str, dict[str, Any]] = {
    "plain-none": {},
    "ignore-weight-sum": {"ignore_index": 7, "weight": _weights(NUM_CLASSES), "reduction": "sum"},
    "smoothing-sum": {"label_smoothing": 0.2, "reduction": "sum"},
    "smoothing-weight-none": {"label_smoothing": 0.2, "weight": _weights(NUM_CLASSES)},
    "zloss-mean": {"z_loss": 1e-2, "reduction": "mean"},
    "all-mean": {
        "weight": _weights(NUM_CLASSES),
        "ignore_index": 7,
        "label_smoothing": 0.1,
        "z_loss": 1e-3,
        "reduction": "mean",
    },
}
# Every option in float32; in half precision, none and all of them.
SWEEP = [("float32", name) for name in OPTIONS] + [
    (dtype, name) for dtype in ("bfloat16", "float16") for name in ("plain-none", "all-mean")
]


# Every option together, in float32 and bfloat16: in `make test`; the whole sweep is slow.
ALL_OPTIONS = [("float32", "all-mean"), ("bfloat16", "all-mean")]


@pytest.mark.parametrize(("dtype", "case"), ALL_OPTIONS, ids=[f"{d}-{c}" for d, c in ALL_OPTIONS])
def test_every_option_matches_xla_and_float64(small_blocks: None, dtype: str, case: str) -> None:
    test_matches_xla_and_float64(small_blocks, dtype, case)


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "case"), SWEEP, ids=[f"{d}-{c}" for d, c in SWEEP])
def test_matches_xla_and_float64(small_blocks: None, dtype: str, case: str) -> None:
    logits, labels = make_inputs(0, (3, 5), NUM_CLASSES, dtype)
    labels[0, 1] = labels[2, 3] = 7  # ignored where ignore_index=7
    check_against_xla_and_float64(logits, labels, **OPTIONS[case])


@pytest.mark.parametrize(
    ("num_classes", "dtype", "block_bytes"),
    [(1, "float32", 512), (127, "float16", 512), (129, "float32", 512), (262144, "bfloat16", None)],
    ids=["C1", "C127-a-partial-block", "C129-a-block-and-one", "C262144-default-block"],
)
def test_awkward_widths(
    monkeypatch: pytest.MonkeyPatch, num_classes: int, dtype: str, block_bytes: int | None
) -> None:
    if block_bytes is not None:
        monkeypatch.setattr(kernels, "_BLOCK_BYTES", block_bytes)
    rows = 6 if num_classes < 1000 else 2  # 262144 bfloat16 columns: 32 steps of 8192
    logits, labels = make_inputs(1, (rows,), num_classes, dtype)
    check_against_xla_and_float64(logits, labels, label_smoothing=0.1, reduction="mean")


def test_per_example_where_runs_the_kernel(small_blocks: None) -> None:
    logits, labels = make_inputs(2, (4, 3), NUM_CLASSES, "bfloat16")
    keep = np.random.default_rng(2).random((4, 3)) < 0.6
    # A NaN in an excluded row takes no part: loss and gradient stay 0 there.
    logits = logits.at[~keep].set(jnp.nan)
    options = {"label_smoothing": 0.1, "weight": _weights(300), "reduction": "mean"}
    check_against_xla_and_float64(logits, labels, where=keep, **options)
    assert "pallas_call" in _jaxpr_text(logits, labels, where=keep)


def test_tuple_axes_run_the_kernel_after_a_transpose(small_blocks: None) -> None:
    logits, _ = make_inputs(3, (10, 4), 30, "float32")  # classes (10, 30) flattened: 300
    labels = np.random.default_rng(3).integers(0, 300, size=(4,))
    check_against_xla_and_float64(logits, labels, axis=(0, 2), label_smoothing=0.1)


def test_extreme_and_infinite_logits(small_blocks: None) -> None:
    """±1e30 stay finite and exact (shift and log-normaliser are kept apart); -inf has p = 0."""
    rng = np.random.default_rng(4)
    x = rng.choice([-1.0, 0.5, 1.0], size=(4, 300)) * 1e30
    x[1, :200] = -np.inf  # -inf in the first steps: the running shift starts at 0
    x[2, 150:] = -np.inf  # and in the last ones
    labels = np.array([0, 250, 3, 299])
    logits = jnp.asarray(x, jnp.float32)
    kernel = value_and_grad(logits, labels, None, implementation="pallas", reduction="sum")
    xla = value_and_grad(logits, labels, None, implementation="xla", reduction="sum")
    assert np.all(np.isfinite(kernel[1]))
    np.testing.assert_allclose(kernel[0], xla[0], rtol=1e-6)
    np.testing.assert_allclose(kernel[1], xla[1], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(kernel[1])[np.isneginf(x)], 0.0)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_rows_far_below_zero_and_rows_of_minus_inf(small_blocks: None, smoothing: float) -> None:
    """Rows whose logits all lie below -88.7 (exp overflows for the first rescaling) and rows of -inf.

    The online log-sum-exp starts at the shift 0; the first block of such a row
    moves the shift down to its maximum, where ``exp(0 - m')`` overflows, and
    the empty running sum must stay 0 instead of becoming ``0 * inf = NaN``.
    A row of -inf logits has a NaN loss (no probability anywhere) on every path.
    """
    rng = np.random.default_rng(11)
    x = rng.normal(size=(5, 300)) - 100.0  # every logit below -88.7
    x[1] -= 1e4
    x[2, :150] = -np.inf  # -inf first, then logits far below zero
    x[3] = -np.inf
    x[4, 200:] = -np.inf
    labels = np.array([0, 7, 250, 3, 17])
    logits = jnp.asarray(x, jnp.float32)
    for reduction in REDUCTIONS:
        cotangent = np.linspace(0.5, 1.5, 5) if reduction == "none" else None
        options = {"reduction": reduction, "label_smoothing": smoothing}
        kernel = value_and_grad(logits, labels, cotangent, implementation="pallas", **options)
        xla = value_and_grad(logits, labels, cotangent, implementation="xla", **options)
        for ours, theirs in zip(kernel, xla, strict=True):
            assert_normwise_close(ours, theirs, 2 * tolerance(jnp.float32, 300), reduction)
        if reduction == "none":
            per_example = np.asarray(kernel[0])
            assert np.isfinite(per_example[:2]).all() and np.isnan(per_example[3])
            if smoothing:  # mass on the -inf logits of rows 2 and 4: +inf there
                np.testing.assert_array_equal(per_example[[2, 4]], np.inf)
            else:
                assert np.isfinite(per_example[[2, 4]]).all()
    if smoothing:
        return
    # Rows 0, 1, 2 and 4 alone (no NaN row): finite means and gradients, equal to the XLA path's.
    keep = np.array([0, 1, 2, 4])
    kernel = value_and_grad(logits[keep], labels[keep], None, implementation="pallas",
                            reduction="mean")  # fmt: skip
    xla = value_and_grad(logits[keep], labels[keep], None, implementation="xla", reduction="mean")
    assert np.isfinite(kernel[0]) and np.isfinite(np.asarray(kernel[1])).all()
    np.testing.assert_allclose(kernel[0], xla[0], rtol=1e-6)


def test_a_zero_class_weight_on_a_minus_inf_logit(small_blocks: None) -> None:
    """Excluded by ``where``: no part, finite everywhere; taking part: NaN, as PyTorch's ``0 * inf``.

    The per-example mask runs the kernel; the class weights' gradient of the
    excluded row is 0 on both paths.
    """
    logits, labels = make_inputs(12, (4,), 300, "float32")
    logits = logits.at[:, 5].set(-jnp.inf)
    weight = _weights(300).at[5].set(0.0)
    excluded = jnp.array([True, False, True, True])[:, None]  # row 1 excluded

    def loss(x: jax.Array, w: jax.Array, where: Any, implementation: str) -> jax.Array:
        return loss_fn(x, labels, where=where, weight=w, label_smoothing=0.1,
                       reduction="sum", implementation=implementation)  # fmt: skip

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=3)
    for where in (None, jnp.ones((4, 1), bool)):
        # Class 5 takes part in every row: the smoothing term is 0 * inf.
        for implementation in ("pallas", "xla"):
            assert np.isnan(loss(logits, weight, where, implementation))
    # Row 1 excluded, the others taking part: still NaN (rows 0, 2, 3 take part).
    # With class 5 also finite in the excluded row only, nothing is infinite where it counts:
    finite = logits.at[jnp.array([0, 2, 3]), 5].set(0.0)
    kernel, xla = grad(finite, weight, excluded, "pallas"), grad(finite, weight, excluded, "xla")
    for ours, theirs in zip(jax.tree.leaves(kernel), jax.tree.leaves(xla), strict=True):
        assert np.isfinite(np.asarray(ours)).all()
        assert_normwise_close(ours, theirs, 2 * tolerance(jnp.float32, 300))


def test_invalid_labels_and_nan_logits_are_nan(small_blocks: None) -> None:
    logits, _ = make_inputs(5, (4,), 300, "float32")
    logits = logits.at[3, 17].set(jnp.nan)
    labels = np.array([0, 300, -1, 5])  # 300 and -1 are out of range

    @jax.jit
    def losses(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        return tuple(
            loss_fn(x, labels, reduction=reduction, implementation="pallas")
            for reduction in REDUCTIONS
        )

    per_example, total, mean = losses(logits)
    np.testing.assert_array_equal(np.isnan(per_example), [False, True, True, True])
    assert np.isnan(total) and np.isnan(mean)
    checked = jaxce.checked(jax.jit(lambda x: loss_fn(x, labels, implementation="pallas")))
    with pytest.raises(Exception, match=r"`labels` must be class indices in \[0, 300\)"):
        checked(logits)


def test_gradients_in_traced_options_and_class_weights(small_blocks: None) -> None:
    """The weight cotangent comes from the derivative rule; smoothing and z-loss from JAX."""
    logits, labels = make_inputs(6, (5,), 300, "float32")

    def loss(weight: jax.Array, smoothing: jax.Array, z: jax.Array, implementation: str) -> Any:
        return loss_fn(
            logits,
            labels,
            weight=weight,
            label_smoothing=smoothing,
            z_loss=z,
            reduction="mean",
            implementation=implementation,
        )

    args = (_weights(300), jnp.float32(0.1), jnp.float32(1e-3))
    kernel = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(*args, "pallas")
    xla = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(*args, "xla")
    for ours, theirs in zip(kernel, xla, strict=True):
        assert_normwise_close(ours, theirs, 2 * tolerance(jnp.float32, 300))


def test_vmap(small_blocks: None) -> None:
    logits, labels = make_inputs(7, (3, 4), 300, "bfloat16")

    def per_batch(implementation: str) -> Any:
        def loss(x: jax.Array, y: jax.Array) -> jax.Array:
            return loss_fn(x, y, reduction="mean", implementation=implementation)

        return jax.jit(jax.vmap(jax.value_and_grad(loss)))(logits, labels)

    kernel, xla = per_batch("pallas"), per_batch("xla")
    assert_normwise_close(kernel[0], xla[0], 2 * tolerance(jnp.float32, 300))
    assert_normwise_close(kernel[1], xla[1], 2 * tolerance(jnp.bfloat16, 300))


def test_backward_keeps_two_floats_per_row_and_the_logits() -> None:
    """No float32 copy of half-precision logits: the rule saves them as given, plus ``m`` and ``L``."""
    logits, labels = make_inputs(8, (4, 6), 300, "bfloat16")
    residuals = saved_residuals(
        lambda x: loss_fn(
            x, labels, label_smoothing=0.1, z_loss=1e-3, reduction="mean", implementation="pallas"
        ),
        logits,
    )
    wide = [r for r, _ in residuals if r.size > 24]
    assert [(r.shape, r.dtype) for r in wide] == [((24, 300), jnp.bfloat16)], residuals
    # The kernel's rows are the flattened batch (24); the loss's own per-example terms are [4, 6].
    per_kernel_row = [r.dtype for r, _ in residuals if r.shape == (24,)]
    assert sorted(map(str, per_kernel_row)) == ["float32", "float32", "int32"], residuals


def test_fallbacks_and_bad_implementation() -> None:
    logits, labels = make_inputs(9, (4,), 6, "float32")
    per_class = np.ones((4, 6), bool)
    per_class[0, 2] = False
    assert "pallas_call" not in _jaxpr_text(logits, labels, where=per_class)
    with jax.enable_x64(True):
        x64 = jnp.asarray(np.asarray(logits), jnp.float64)
        assert "pallas_call" not in _jaxpr_text(x64, labels)
    assert "pallas_call" not in _jaxpr_text(logits, labels, implementation=None)
    with pytest.raises(ValueError, match="`implementation` must be one of"):
        loss_fn(logits, labels, implementation="triton")


def test_forward_mode_is_refused() -> None:
    """Documented: the kernel's rule is reverse-mode only (``"xla"`` serves ``jvp`` and ``hessian``)."""
    logits, labels = make_inputs(10, (2,), 6, "float32")
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda x: loss_fn(x, labels, implementation="pallas"), (logits,), (logits,))


def _jaxpr_text(logits: jax.Array, labels: Any, **options: Any) -> str:
    options.setdefault("implementation", "pallas")
    return str(jax.make_jaxpr(lambda x: loss_fn(x, labels, **options))(logits))


def _lower_for_cuda(function: Callable[..., Any], *shapes: jax.ShapeDtypeStruct) -> str:
    return jax.jit(function).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("num_classes", [128256, 256000], ids=["llama3-128256", "gemma-256000"])
def test_value_and_grad_lowers_to_triton_kernels_for_cuda(dtype: str, num_classes: int) -> None:
    num_rows = 8192

    def step(logits: jax.Array, labels: jax.Array, weight: jax.Array) -> Any:
        return jax.value_and_grad(
            lambda x: loss_fn(
                x,
                labels,
                weight=weight,
                ignore_index=-100,
                label_smoothing=0.1,
                z_loss=1e-4,
                reduction="mean",
                implementation="pallas",
            )
        )(logits)

    module = _lower_for_cuda(
        step,
        jax.ShapeDtypeStruct((num_rows, num_classes), dtype),
        jax.ShapeDtypeStruct((num_rows,), jnp.int32),
        jax.ShapeDtypeStruct((num_classes,), jnp.float32),
    )
    assert module.count(f"custom_call @{TRITON_CALL}") == 2
    assert re.findall(r'name = "(jaxce_softmax_ce_\w+)"', module) == list(KERNEL_NAMES)
    if dtype == "bfloat16":
        # The kernels upcast block by block: no float32 copy of the logits anywhere.
        assert f"tensor<{num_rows}x{num_classes}xf32>" not in module


FALLBACK_SPECS = [
    (None, "float32"),
    ("uniform", "bfloat16"),
    ("weighted", "float32"),
    ("weighted", "float16"),
]


@pytest.mark.parametrize(("smoothing", "dtype"), FALLBACK_SPECS)
def test_platforms_without_a_kernel_compute_what_the_kernel_writes(
    small_blocks: None, smoothing: Any, dtype: str
) -> None:
    """TPU and ROCm run ``forward_xla`` / ``backward_xla``: equal to the interpreted kernels.

    Same float32 operations in a different order (the kernel's online
    log-sum-exp rescales per block): one float32 result per row, bounded by
    the sums over C classes; the gradient by one rounding to ``dtype`` besides.
    """
    num_rows, num_classes = 6, 300
    logits, labels = make_inputs(3, (num_rows,), num_classes, dtype)
    logits = logits.at[1, :7].set(-jnp.inf)  # -inf logits, and a zero weight on them below
    labels = jnp.asarray(labels, jnp.int32)
    weight = _weights(num_classes).at[:3].set(0.0) if smoothing == "weighted" else None
    spec = kernels.RowSpec(num_classes, kernels.kernel_config(logits.dtype, num_classes), smoothing)
    interpreted = kernels.forward(logits, labels, weight, spec)
    plain = kernels.forward_xla(logits, labels, weight, spec=spec)
    assert len(interpreted) == len(plain) == (3 if smoothing is None else 4)
    bound = tolerance(jnp.float32, num_classes)
    for got, want, name in zip(plain, interpreted, ("shift", "lse", "nll", "smooth"), strict=False):
        assert_normwise_close(got, want, bound, name)
    rng = np.random.default_rng(4)
    coefficients = kernels.RowCoefficients(
        jnp.asarray(rng.uniform(0.5, 1.5, num_rows), jnp.float32).at[2].set(0.0),
        jnp.asarray(rng.uniform(0.5, 1.5, num_rows), jnp.float32).at[2].set(0.0),
        None if smoothing is None else jnp.asarray(rng.uniform(0, 0.1, num_rows), jnp.float32),
    )
    args = (logits, labels, interpreted[0], interpreted[1], coefficients, weight, spec)
    plain_grad = kernels.backward_xla(*args)
    interpreted_grad = kernels.backward(*args)
    assert plain_grad.dtype == interpreted_grad.dtype == logits.dtype
    assert_normwise_close(plain_grad, interpreted_grad, 2 * tolerance(dtype, num_classes), "dx")
    if smoothing is None:
        assert not np.asarray(plain_grad[2], np.float32).any()  # a row that takes no part: exact 0


def test_value_and_grad_lowers_for_tpu_without_a_kernel() -> None:
    """On TPU ``"pallas"`` is plain XLA: no custom call, no interpreter loop over the rows."""
    num_rows, num_classes = 1024, 32000

    def step(logits: jax.Array, labels: jax.Array) -> Any:
        return jax.value_and_grad(
            lambda x: loss_fn(
                x, labels, label_smoothing=0.1, reduction="mean", implementation="pallas"
            )
        )(logits)

    module = (
        jax.jit(step)
        .trace(
            jax.ShapeDtypeStruct((num_rows, num_classes), jnp.bfloat16),
            jax.ShapeDtypeStruct((num_rows,), jnp.int32),
        )
        .lower(lowering_platforms=("tpu",))
        .as_text()
    )
    assert "custom_call" not in module
    assert "stablehlo.while" not in module
