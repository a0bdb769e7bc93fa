"""linear_cross_entropy against the materialised formulation, and its memory bound."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    REDUCTIONS,
    assert_normwise_close,
    compile_as_users_do,
    half_precision_output_bound,
    rounding_bound,
)

import jaxce
from jaxce import _linear, _references
from jaxce._linear import chunks, prepare
from jaxce._linear import plan as linear_plan


def operations(num_tokens, dim, vocab):
    """Roundings on the way from the inputs to a loss or a gradient entry.

    A logit is a D-term dot product (D), its log-sum-exp a V-term sum (V), a
    loss the sum over N tokens (N); a hidden gradient entry sums V products,
    a weight gradient entry N; the soft cap, smoothing, z-loss, exponentials
    and divisions add fewer than 16.
    """
    return num_tokens + dim + vocab + 16


def value_tolerance(dtype, num_tokens, dim, vocab):
    """Relative error of the loss: computed in float32 (float64 for float64), whatever the input."""
    compute = jnp.float64 if dtype == "float64" else jnp.float32
    return rounding_bound(compute, operations(num_tokens, dim, vocab))


def grad_tolerance(dtype, num_tokens, dim, vocab):
    """Norm-wise error of a gradient: the float32 (float64) arithmetic, then one rounding
    to the input's dtype (2^-8 for bfloat16, 2^-11 for float16). bfloat16's hidden
    gradient takes the logit gradient as two bfloat16 parts (16 significant bits):
    2^-17 of each term, so 2^-17 of the magnitudes summed, once."""
    bound = half_precision_output_bound(dtype, operations(num_tokens, dim, vocab))
    if dtype == "bfloat16":
        bound += 2.0**-17
    return bound


# The materialised formulation, written independently of the library's losses.
materialised = _references.linear_cross_entropy


def make_inputs(seed, batch_shape, dim, vocab, *, ignore_fraction=0.2):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(*batch_shape, dim))
    weight = rng.normal(size=(vocab, dim)) / np.sqrt(dim) * 3
    bias = rng.normal(size=(vocab,))
    labels = rng.integers(0, vocab, size=batch_shape)
    labels = np.where(rng.random(batch_shape) < ignore_fraction, -100, labels)
    return hidden, weight, bias, labels


def compare(fused, reference, args, dtype):
    """Values and vector-Jacobian products (all arguments) agree with the reference."""
    hidden, weight = np.shape(args[0]), np.shape(args[1])
    sizes = (int(np.prod(hidden[:-1])), hidden[-1], weight[0])
    cast = [jnp.asarray(a, dtype) for a in args]
    with jax.enable_x64(True):
        exact = [jnp.asarray(np.asarray(a, np.float64)) for a in cast]
        expected_value, pullback = jax.vjp(reference, *exact)
        cotangent = np.random.default_rng(99).uniform(0.5, 1.5, np.shape(expected_value))
        expected_grads = pullback(jnp.asarray(cotangent))

    @jax.jit
    def value_and_grads(*a):
        value, pullback = jax.vjp(fused, *a)
        return value, pullback(jnp.asarray(cotangent, value.dtype))

    value, grads = value_and_grads(*cast)
    assert_normwise_close(value, expected_value, value_tolerance(dtype, *sizes), "loss")
    for grad, expected, arg in zip(grads, expected_grads, cast, strict=True):
        assert grad.dtype == arg.dtype
        tolerance = grad_tolerance(dtype, *sizes)
        assert_normwise_close(grad, expected, tolerance, "gradient", floor=0.0)


def run_case(dtype, batch_shape, dim, vocab, chunk_size, reduction, options, *, seed=0):
    hidden, weight, bias, labels = make_inputs(seed, batch_shape, dim, vocab)
    options = {"ignore_index": -100, **options}

    def fused(h, w, b):
        return jaxce.linear_cross_entropy(
            h, w, labels, bias=b, chunk_size=chunk_size, reduction=reduction, **options
        )

    def reference(h, w, b):
        return materialised(h, w, labels, bias=b, reduction=reduction, **options)

    with jax.enable_x64(dtype == "float64"):
        compare(fused, reference, (hidden, weight, bias), dtype)


ALL_OPTIONS = {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 4.0}

SHAPES = [  # batch shape, D, V, chunk, reduction: N and V not multiples of the chunk, N = 1,
    # V < chunk; each shape under one of the two loops ("mean": the weighted sum's rule,
    # "none": the per-token one), every option on, against float64
    pytest.param((37,), 12, 23, 8, "mean", id="N37-V23-chunk8-mean"),
    pytest.param((1,), 6, 5, None, "none", id="N1-none"),
    pytest.param((3, 11), 8, 7, 64, "none", id="batch3x11-V7-chunk64-none"),
    pytest.param((40,), 5, 300, 16, "mean", id="N40-V300-vocab-blocks-mean"),
    pytest.param((40,), 5, 300, 16, "none", id="N40-V300-vocab-blocks-none"),
]


@pytest.fixture(autouse=True)
def small_weight_blocks(monkeypatch):
    """Blocks of 64 vocabulary rows, so that V = 300 exercises the last, overlapping block."""
    monkeypatch.setattr(linear_plan, "_WEIGHT_BLOCK_BYTES", 1)
    monkeypatch.setattr(linear_plan, "_MIN_WEIGHT_BLOCK_ROWS", 64)


@pytest.mark.parametrize(("batch_shape", "dim", "vocab", "chunk", "reduction"), SHAPES)
def test_all_options_match_materialised_float64(batch_shape, dim, vocab, chunk, reduction):
    run_case("float64", batch_shape, dim, vocab, chunk, reduction, ALL_OPTIONS)


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="plain"),
        pytest.param({"label_smoothing": 0.2}, id="smoothing"),
        pytest.param({"z_loss": 1e-3}, id="z_loss"),
        pytest.param({"softcap": 2.0}, id="softcap"),
    ],
)
def test_each_option_float32(options, reduction):
    run_case("float32", (37,), 12, 300, 8, reduction, options)


@pytest.mark.parametrize(
    ("dtype", "reduction"),
    [("float32", "mean"), ("float32", "none"), ("bfloat16", "mean"), ("bfloat16", "none"),
     ("float16", "mean"), ("float16", "none")],
)  # fmt: skip
def test_all_options_half_and_single_precision(dtype, reduction):
    run_case(dtype, (37,), 16, 300, 16, reduction, ALL_OPTIONS)


def test_bfloat16_loss_is_float32():
    hidden, weight, _, labels = make_inputs(1, (9,), 8, 11)
    loss = jaxce.linear_cross_entropy(
        jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(weight, jnp.bfloat16), labels
    )
    assert loss.dtype == jnp.float32


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_bfloat16_gradients_as_precise_as_float32_products(bias):
    """bfloat16 inputs: the logit gradient enters the hidden gradient's product
    as two bfloat16 parts (about 16 significant bits), the weight gradient's in
    float32, so both agree with the float32 computation to ~1e-5 before their
    rounding to bfloat16 outputs."""
    hidden, weight, b, labels = make_inputs(3, (45,), 24, 700)
    cast = [jnp.asarray(a, jnp.bfloat16) for a in (hidden, weight, b)]
    b_arg = cast[2] if bias else None
    options = {"ignore_index": -100, "reduction": "mean", **ALL_OPTIONS}

    def fused(h, w, b):
        return jaxce.linear_cross_entropy(h, w, labels, bias=b, chunk_size=16, **options)

    grads = jax.jit(jax.grad(fused, argnums=(0, 1, 2) if bias else (0, 1)))(*cast[:2], b_arg)
    with jax.enable_x64(True):
        exact = [jnp.asarray(np.asarray(a, np.float64)) for a in cast]
        expected = jax.grad(
            lambda h, w, b: materialised(h, w, labels, bias=b if bias else None, **options),
            argnums=(0, 1, 2) if bias else (0, 1),
        )(*exact)
    # `gradients` (the closed form) takes the same path.
    closed = jaxce.derivatives.linear_cross_entropy(
        *cast[:2], labels, bias=b_arg, chunk_size=16, **options
    )
    sizes = (45, 24, 700)
    for grad, want, again in zip(grads, map(np.asarray, expected), closed, strict=False):
        assert grad.dtype == jnp.bfloat16
        # The bfloat16 outputs round to 2^-8 relative; the float32 values before
        # that rounding are what the split makes precise.
        tolerance = grad_tolerance("bfloat16", *sizes)
        assert_normwise_close(grad, want, tolerance, "gradient", floor=0.0)
        np.testing.assert_array_equal(np.asarray(again), np.asarray(grad))
    d_hidden32, d_weight32, _ = jax.jit(
        lambda h, w: jaxce.derivatives.linear_cross_entropy(
            h.astype(jnp.float32), w.astype(jnp.float32), labels, chunk_size=16, **options
        )
    )(*cast[:2])
    # Against the same computation in float32 products: the split costs ~2^-17.
    d_hidden = jax.jit(
        lambda h, w: chunks.weighted_loss_and_grads(
            *_bfloat16_case_arguments(h, w, labels, options),
            chunks.Wants(hidden=True, weight=True, bias=False),
        )
    )(*cast[:2])
    # Both in float32 before any rounding to bfloat16: the split's 2^-17 and the
    # float32 arithmetic of both sides.
    tolerance = 2.0**-17 + 2 * rounding_bound(jnp.float32, operations(*sizes))
    for name, reference in (("hidden", d_hidden32), ("weight", d_weight32)):
        got = np.asarray(getattr(d_hidden, name), np.float64).reshape(reference.shape)
        assert_normwise_close(got, reference, tolerance, name, floor=0.0)


def _bfloat16_case_arguments(h, w, labels, options):
    settings = {name: options[name] for name in ("ignore_index", "label_smoothing", "z_loss")}
    call_options = _linear.Options(softcap=options["softcap"], chunk_size=16, **settings)
    prepared = prepare.prepare_call(h, w, labels, None, call_options)
    return prepared.config, prepared.inputs


def test_bfloat16_hessian_matches_float32_products():
    """Second order through the bfloat16 path (bit-sliced rows, split products)."""
    hidden, weight, _, labels = make_inputs(8, (7,), 3, 5)
    options = {"ignore_index": -100, "reduction": "mean", **ALL_OPTIONS}
    h16, w16 = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(weight, jnp.bfloat16)

    def fused(h, w):
        return jaxce.linear_cross_entropy(h, w, labels, chunk_size=3, **options)

    def reference(h, w):
        return materialised(h, w, labels, **options)

    hessian = jax.jit(jax.hessian(fused))(h16, w16)
    with jax.enable_x64(True):
        exact = [jnp.asarray(np.asarray(a, np.float64)) for a in (h16, w16)]
        expected = jax.hessian(reference)(*exact)
    # Each second derivative is float32 arithmetic of the same size as a gradient's,
    # rounded once to bfloat16.
    tolerance = grad_tolerance("bfloat16", 7, 3, 5)
    for got_row, want_row in zip(jax.tree.leaves(hessian), jax.tree.leaves(expected), strict=True):
        got = np.asarray(got_row, np.float64)
        assert np.any(got != 0)
        assert_normwise_close(got, want_row, tolerance, "hessian", floor=0.0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_shift_is_next_token_prediction(reduction):
    hidden, weight, bias, labels = make_inputs(2, (3, 10), 8, 13)

    def fused(h, w, b):
        return jaxce.linear_cross_entropy(
            h, w, labels, bias=b, shift=1, ignore_index=-100, chunk_size=4, reduction=reduction
        )

    def reference(h, w, b):
        return materialised(h, w, labels, bias=b, shift=1, ignore_index=-100, reduction=reduction)

    compare(fused, reference, (hidden, weight, bias), "float32")
    assert fused(hidden, weight, bias).shape == ((3, 9) if reduction == "none" else ())


def _plain_shifted_loss(hidden, weight, bias, labels, shift, reduction):
    """float64 by hand: position t predicts label t + shift; -100 is ignored."""
    length = labels.shape[-1] - shift
    logits = hidden[..., :length, :] @ weight.T + bias[None, None, :]
    targets = labels[..., shift:]
    counted = targets != -100
    log_p = logits - jax.scipy.special.logsumexp(logits, axis=-1, keepdims=True)
    picked = jnp.take_along_axis(log_p, jnp.where(counted, targets, 0)[..., None], -1)[..., 0]
    nll = jnp.where(counted, -picked, 0.0)
    if reduction == "none":
        return nll
    return nll.sum() if reduction == "sum" else nll.sum() / counted.sum(dtype=nll.dtype)


@pytest.mark.parametrize(
    ("shift", "reduction"),
    [(2, "mean"), (3, "none"), (9, "sum")],  # 0 and 1 are the tests above; 9 leaves T - k = 1
    ids=["shift2-mean", "shift3-none", "shift9-sum"],
)
def test_shift_k_is_multi_token_prediction(shift, reduction):
    """shift=k: hidden[..., t, :] predicts labels[..., t + k]; the last k positions nothing."""
    hidden, weight, bias, labels = make_inputs(3, (2, 10), 8, 13)

    def fused(h, w, b):
        return jaxce.linear_cross_entropy(
            h, w, labels, bias=b, shift=shift, ignore_index=-100, chunk_size=3,
            reduction=reduction,
        )  # fmt: skip

    def reference(h, w, b):
        return _plain_shifted_loss(h, w, b, jnp.asarray(labels), shift, reduction)

    compare(fused, reference, (hidden, weight, bias), "float32")
    if reduction == "none":
        assert fused(hidden, weight, bias).shape == (2, 10 - shift)
    d_hidden, _, _ = jaxce.derivatives.linear_cross_entropy(
        hidden, weight, labels, bias=bias, shift=shift, ignore_index=-100, reduction=reduction
    )
    if shift:
        # The last k positions predict nothing: their hidden states get no gradient.
        assert np.all(np.asarray(d_hidden)[:, -shift:] == 0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_ignored_is_zero_with_zero_gradients(reduction):
    hidden, weight, _, _ = make_inputs(3, (6,), 4, 5)
    labels = jnp.full((6,), -100)

    def loss(h, w):
        return jaxce.linear_cross_entropy(h, w, labels, ignore_index=-100, reduction=reduction)

    value, grads = jax.value_and_grad(loss, argnums=(0, 1))(hidden, weight)
    assert value == 0
    assert all(np.all(np.asarray(g) == 0) for g in grads)


@pytest.mark.parametrize("bad_label", [-1, 5], ids=["negative", "too-large"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_out_of_range_label_is_nan_with_reference_gradients(bad_label, reduction):
    hidden, weight, _, labels = make_inputs(4, (6,), 4, 5, ignore_fraction=0)
    labels = labels.copy()
    labels[2] = bad_label
    loss = jaxce.linear_cross_entropy(hidden, weight, labels, reduction=reduction)
    assert np.isnan(np.asarray(loss)).any()
    if reduction == "none":
        assert np.isnan(loss[2]) and not np.isnan(np.delete(np.asarray(loss), 2)).any()
        valid = np.arange(6) != 2
        expected = materialised(hidden, weight, labels, reduction="none")
        tolerance = value_tolerance("float32", 6, 4, 5)
        assert_normwise_close(np.asarray(loss)[valid], np.asarray(expected)[valid], tolerance)

    def fused(h, w):
        return jnp.sum(jaxce.linear_cross_entropy(h, w, labels, reduction=reduction))

    def reference(h, w):
        # Without ignore_index every token counts: "mean" divides by all of them (the bad
        # one makes it NaN whatever it divides by); the bad token's reference term is 0.
        return jnp.sum(materialised(h, w, labels, reduction="none")) / (
            labels.size if reduction == "mean" else 1
        )

    # Finite gradients, as documented: the bad token contributes none to `hidden`
    # (its label selects no class), the others their reference gradients.
    grads = jax.grad(fused, (0, 1))(hidden, weight)
    with jax.enable_x64(True):
        expected = jax.grad(reference, (0, 1))(*map(np.float64, (hidden, weight)))
    tolerance = grad_tolerance("float32", 6, 4, 5)
    for grad, want in zip(grads, expected, strict=True):
        assert np.all(np.isfinite(grad))
        assert_normwise_close(grad, want, tolerance, floor=0.0)
    assert np.all(np.asarray(grads[0])[2] == 0)


def test_traced_hyperparameters_and_their_gradients():
    hidden, weight, _, labels = make_inputs(5, (12,), 6, 9)

    def fused(eps, z):
        return jaxce.linear_cross_entropy(hidden, weight, labels, label_smoothing=eps, z_loss=z)

    def reference(eps, z):
        return materialised(hidden, weight, labels, label_smoothing=eps, z_loss=z, reduction="mean")

    args = (jnp.float32(0.15), jnp.float32(0.01))
    value, grads = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(*args)
    with jax.enable_x64(True):
        exact = (np.float64(0.15), np.float64(0.01))
        expected, expected_grads = jax.value_and_grad(reference, argnums=(0, 1))(*exact)
    # d/d eps and d/dz are sums over the 12 tokens and 9 classes of O(1) terms.
    assert_normwise_close(value, expected, value_tolerance("float32", 12, 6, 9))
    assert_normwise_close(np.stack(grads), np.stack(expected_grads),
                          grad_tolerance("float32", 12, 6, 9))  # fmt: skip


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "options", [{}, {"label_smoothing": 0.1}, {"softcap": 30.0}], ids=["plain", "smooth", "cap"]
)
def test_logits_of_1e30_with_traced_zero_z_loss(options, reduction):
    """Finite and equal to the core loss: a traced z_loss = 0 must not make 0 * lse^2 = 0 * inf."""
    hidden = jnp.array([[1e15, 0.0], [-1e15, 3.0], [0.0, 1.0]], jnp.float32)
    weight = jnp.array([[1e15, 0.0], [-1e15, 0.0], [0.0, 1.0]], jnp.float32)
    labels = jnp.array([0, 1, 2])

    def fused(h, w, z):
        loss = jaxce.linear_cross_entropy(h, w, labels, z_loss=z, reduction=reduction, **options)
        return jnp.sum(loss)

    def reference(h, w, z):
        return jnp.sum(materialised(h, w, labels, z_loss=z, reduction=reduction, **options))

    zero = jnp.float32(0.0)
    value, grads = jax.jit(jax.value_and_grad(fused, (0, 1)))(hidden, weight, zero)
    with jax.enable_x64(True):
        exact = [jnp.asarray(np.asarray(a, np.float64)) for a in (hidden, weight, zero)]
        expected, expected_grads = jax.value_and_grad(reference, (0, 1))(*exact)
    assert np.isfinite(value) and all(np.isfinite(g).all() for g in grads)
    # The losses are O(1) (the huge logits cancel in lse - x_y), so float32 rounding
    # of the inputs and of the O(1) terms: a few units of 2^-24 of the largest.
    np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-6)
    # d hidden = g @ W and d weight = g.T @ h with |g| <= 1 and |W| = |h| = 1e15:
    # the float32 rounding of g (2^-24 relative, 3 terms per entry) scaled by 1e15.
    atol = 3 * 2.0**-24 * 1e15
    for grad, want in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(grad, np.asarray(want), rtol=2**-22, atol=atol)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_vmap_over_batches(reduction):
    hidden, weight, _, labels = make_inputs(6, (3, 10), 8, 13)

    def fused(h, y):
        return jaxce.linear_cross_entropy(
            h, weight, y, ignore_index=-100, chunk_size=4, reduction=reduction
        )

    def reference(h, y):
        return materialised(h, weight, y, ignore_index=-100, reduction=reduction)

    values = jax.vmap(fused)(np.float32(hidden), labels)
    grads = jax.vmap(jax.grad(lambda h, y: jnp.sum(fused(h, y))))(np.float32(hidden), labels)
    with jax.enable_x64(True):
        exact = np.float64(np.float32(hidden))
        expected = jax.vmap(reference)(exact, labels)
        expected_grads = jax.vmap(jax.grad(lambda h, y: jnp.sum(reference(h, y))))(exact, labels)
    assert_normwise_close(values, expected, value_tolerance("float32", 10, 8, 13))
    assert_normwise_close(grads, expected_grads, grad_tolerance("float32", 10, 8, 13), floor=0.0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_checkpoint(reduction):
    hidden, weight, bias, labels = make_inputs(7, (20,), 8, 13)

    def fused(h, w, b):
        return jaxce.linear_cross_entropy(
            h, w, labels, bias=b, ignore_index=-100, chunk_size=8, reduction=reduction
        )

    def reference(h, w, b):
        return materialised(h, w, labels, bias=b, ignore_index=-100, reduction=reduction)

    compare(jax.checkpoint(fused), reference, (hidden, weight, bias), "float32")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_forward_mode_and_hessian(reduction):
    with jax.enable_x64(True):
        hidden, weight, bias, labels = make_inputs(8, (7,), 3, 5)
        options = {"ignore_index": -100, "reduction": reduction, **ALL_OPTIONS}

        def fused(h, w):
            return jnp.sum(
                jaxce.linear_cross_entropy(h, w, labels, bias=bias, chunk_size=3, **options)
            )

        def reference(h, w):
            return jnp.sum(materialised(h, w, labels, bias=bias, **options))

        tangents = (jnp.ones_like(hidden), jnp.ones_like(weight) * 0.5)
        _, jvp = jax.jvp(fused, (hidden, weight), tangents)
        _, expected = jax.jvp(reference, (hidden, weight), tangents)
        np.testing.assert_allclose(jvp, expected, rtol=1e-10)
        if reduction == "mean":  # forward over reverse through the fused rule
            hessian = jax.hessian(fused)(hidden, weight)
            expected_hessian = jax.hessian(reference)(hidden, weight)
            np.testing.assert_allclose(hessian, expected_hessian, rtol=1e-8, atol=1e-12)


def _matrix_products(fn, *args):
    """The number of dot_general operations in ``fn``'s lowered program (loop bodies once)."""
    return jax.jit(fn).lower(*args).as_text().count("stablehlo.dot_general")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_frozen_weight_skips_its_gradient(reduction):
    """A gradient for `hidden` alone leaves out the weight gradient's matrix product."""
    hidden, weight, _, labels = make_inputs(9, (16,), 8, 13)

    def loss(h, w):
        return jnp.sum(
            jaxce.linear_cross_entropy(h, w, labels, ignore_index=-100, reduction=reduction)
        )

    hidden_only = _matrix_products(jax.grad(loss), hidden, weight)
    both = _matrix_products(jax.grad(loss, (0, 1)), hidden, weight)
    # "mean": logits and the hidden gradient (2) against 3 with the weight's;
    # "none": one more for the rematerialised logits in the reverse pass.
    assert hidden_only == both - 1 == (2 if reduction == "mean" else 3)
    with jax.enable_x64(True):
        expected = jax.grad(
            lambda h: jnp.sum(
                materialised(h, np.float64(weight), labels, ignore_index=-100, reduction=reduction)
            )
        )(np.float64(np.float32(hidden)))
    got = jax.grad(loss)(np.float32(hidden), np.float32(weight))
    assert_normwise_close(got, expected, grad_tolerance("float32", 16, 8, 13), floor=0.0)


@pytest.mark.parametrize(
    ("num_tokens", "vocab", "per_token", "expected"),
    [
        (2048, 32768, False, 256),  # 256 rows: 32 MiB
        (2048, 65536, False, 205),  # 224 rows fit in 56 MiB; 10 chunks of 205
        (2048, 65536, True, 108),  # 112 rows fit in 28 MiB; 19 chunks of 108
        (2048, 8192, False, 1024),  # 32 MiB hold 1024 rows
        (16384, 262144, False, 56),
        (16384, 262144, True, 28),
        (100, 1000, False, 100),
        (8, 10**7, False, 8),
        (4096, 10**7, False, 16),
    ],
    ids=[
        "V32k",
        "V64k",
        "V64k-none",
        "V8k",
        "V256k",
        "V256k-none",
        "few-tokens",
        "huge-vocab",
        "min",
    ],
)
def test_default_chunk_size_rule(num_tokens, vocab, per_token, expected):
    assert _linear.default_chunk_size(num_tokens, vocab, per_token=per_token) == expected
    # bfloat16 "mean" / "sum" hold the logits' bytes twice, like "none".
    halved = _linear.default_chunk_size(num_tokens, vocab, per_token=True)
    assert _linear.default_chunk_size(num_tokens, vocab, bfloat16=True) == halved


def test_bad_arguments_raise_before_running():
    hidden, weight = jnp.ones((4, 3)), jnp.ones((5, 3))
    labels = jnp.zeros((4,), jnp.int32)
    with pytest.raises(ValueError, match="`weight` must have shape"):
        jaxce.linear_cross_entropy(hidden, weight.T, labels)
    with pytest.raises(ValueError, match="`labels` must have shape"):
        jaxce.linear_cross_entropy(hidden, weight, labels[:3])
    with pytest.raises(ValueError, match="`bias` must have shape"):
        jaxce.linear_cross_entropy(hidden, weight, labels, bias=jnp.ones(4))
    with pytest.raises(ValueError, match=r"`shift=4` needs .* T > 4"):
        jaxce.linear_cross_entropy(hidden, weight, labels, shift=4)
    with pytest.raises(ValueError, match="`shift` must be a non-negative int"):
        jaxce.linear_cross_entropy(hidden, weight, labels, shift=-1)
    with pytest.raises(ValueError, match="V and the hidden size D must both be at least 1"):
        jaxce.linear_cross_entropy(hidden, weight[:0], labels)
    with pytest.raises(ValueError, match="V and the hidden size D must both be at least 1"):
        jaxce.linear_cross_entropy(hidden[:, :0], weight[:, :0], labels)
    with pytest.raises(ValueError, match="`chunk_size`"):
        jaxce.linear_cross_entropy(hidden, weight, labels, chunk_size=0)
    with pytest.raises(ValueError, match="`softcap`"):
        jaxce.linear_cross_entropy(hidden, weight, labels, softcap=-1.0)
    with pytest.raises(TypeError, match="`labels` must have an integer dtype"):
        jaxce.linear_cross_entropy(hidden, weight, labels.astype(jnp.float32))


@pytest.mark.parametrize(
    ("dtype", "reduction"),
    [("float32", "mean"), ("bfloat16", "mean"), ("float32", "none"), ("bfloat16", "none")],
)
def test_temporaries_bounded_by_chunk_not_tokens_times_vocab(dtype, reduction, monkeypatch):
    """N = 16384, D = 4096, V = 262144 (the logits alone: 16 GiB), lowered, never run."""
    monkeypatch.setattr(linear_plan, "_WEIGHT_BLOCK_BYTES", 2 * 2**20)
    monkeypatch.setattr(linear_plan, "_MIN_WEIGHT_BLOCK_ROWS", 256)
    num_tokens, dim, vocab = 16384, 4096, 262144
    chunk = _linear.default_chunk_size(
        num_tokens, vocab, per_token=reduction == "none", bfloat16=dtype == "bfloat16"
    )
    block = 256
    args = (
        jax.ShapeDtypeStruct((num_tokens, dim), dtype),
        jax.ShapeDtypeStruct((vocab, dim), dtype),
        jax.ShapeDtypeStruct((num_tokens,), jnp.int32),
    )

    def loss(h, w, y):
        return jnp.sum(jaxce.linear_cross_entropy(h, w, y, reduction=reduction))

    compiled = compile_as_users_do(jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args))
    temp = compiled.memory_analysis().temp_size_in_bytes
    # Per chunk: the [chunk, V] float32 logits, the [chunk, block] gradient
    # block, the weight-gradient block and its update, small [chunk, D] pieces.
    # bfloat16: the logits and the logit gradient's two bfloat16 parts ("none":
    # and the recomputed tile's).
    logit_buffers = (3 if reduction == "none" else 2) if dtype == "bfloat16" else 1
    bound = (
        logit_buffers * chunk * vocab * 4
        + 2 * chunk * block * 4
        + 2 * block * dim * 4
        + 8 * chunk * dim * 4
        + 8 * num_tokens * 4  # per-token vectors: losses, log-normalisers, tangents
        + vocab * 4  # the column indices the label's mask compares with
        + 2**20
    )
    if dtype == "bfloat16":
        # The float32 accumulators of the gradients (the outputs are bfloat16)
        # and the uint16 view of `hidden` that chunks are sliced from; no
        # float32 copy of `weight` (that alone would be 4 GiB more).
        bound += vocab * dim * 4 + num_tokens * dim * (4 + 2)
    # "none" too: its backward pass updates the weight's cotangent a block at a
    # time, in place, with no second weight-sized buffer.
    assert temp <= bound, (temp, bound)
    # Nothing of size tokens x vocabulary (bfloat16: the float32 weight-gradient
    # accumulator alone is 4 GiB here).
    assert temp < num_tokens * vocab * 4 / 3


@pytest.mark.parametrize(
    ("options", "reduction"),
    [
        # Each reduction once, without options and with all of them; every option
        # alone is compared with the float64 reference in test_each_option_float32.
        pytest.param({}, "sum", id="plain-sum"),
        pytest.param({"softcap": 3.0}, "mean", id="softcap-mean"),
        pytest.param({**ALL_OPTIONS, "shift": 1}, "mean", id="all-shift-mean"),
        pytest.param({**ALL_OPTIONS, "shift": 1}, "none", id="all-shift-none"),
    ],
)
def test_gradients_equal_autodiff_and_float64_reference(options, reduction):
    """`_linear.gradients` (what `jaxce.derivatives` delegates to) = jax.grad = reference."""
    with jax.enable_x64(True):
        hidden, weight, bias, labels = make_inputs(10, (2, 19), 7, 300)
        kwargs = {"ignore_index": -100, "reduction": reduction, **options}

        def fused(h, w, b):
            return jnp.sum(jaxce.linear_cross_entropy(h, w, labels, bias=b, chunk_size=8, **kwargs))

        def reference(h, w, b):
            return jnp.sum(materialised(h, w, labels, bias=b, **kwargs))

        got = _linear.gradients(
            hidden, weight, labels, bias, _linear.Options(chunk_size=8, **kwargs)
        )
        autodiff = jax.grad(fused, argnums=(0, 1, 2))(hidden, weight, bias)
        expected = jax.grad(reference, argnums=(0, 1, 2))(hidden, weight, bias)
        for mine, auto, exact in zip(got, autodiff, expected, strict=True):
            assert mine.shape == exact.shape and mine.dtype == exact.dtype
            np.testing.assert_allclose(mine, auto, rtol=1e-10, atol=1e-13)
            np.testing.assert_allclose(mine, exact, rtol=1e-10, atol=1e-13)


def test_gradients_float32_without_bias_and_jit():
    hidden, weight, _, labels = make_inputs(11, (33,), 8, 40)
    hidden, weight = jnp.asarray(hidden, jnp.float32), jnp.asarray(weight, jnp.float32)
    d_hidden, d_weight, d_bias = jax.jit(
        lambda h, w: _linear.gradients(
            h, w, labels, None, _linear.Options(ignore_index=-100, chunk_size=16)
        )
    )(hidden, weight)
    assert d_bias is None and d_hidden.dtype == d_weight.dtype == jnp.float32
    with jax.enable_x64(True):
        expected = jax.grad(
            lambda h, w: materialised(h, w, labels, ignore_index=-100, reduction="mean"), (0, 1)
        )(np.float64(hidden), np.float64(weight))
    tolerance = grad_tolerance("float32", 33, 8, 40)
    assert_normwise_close(d_hidden, expected[0], tolerance, "hidden", floor=0.0)
    assert_normwise_close(d_weight, expected[1], tolerance, "weight", floor=0.0)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_float32_label_logit_rounds_with_the_log_sum_exp(reduction):
    """Logits near 4e3 with the label the top class: no negative per-token loss.

    The label logit comes from the product that feeds the log-sum-exp, so
    ``x_y - m`` is exactly 0 for the top class and ``-log p_y >= 0``; a label
    logit from a separate dot product rounds differently (a third of these
    losses came out negative, down to -1e-3). The error against float64 is
    that of the materialised float32 loss (same product), not 100x it.
    """
    rng = np.random.default_rng(21)
    num_tokens, dim, vocab = 96, 64, 257
    hidden = rng.normal(size=(num_tokens, dim)) * 8
    weight = rng.normal(size=(vocab, dim)) * 8
    exact_logits = hidden @ weight.T
    labels = np.argmax(exact_logits, axis=-1)
    assert np.max(np.abs(exact_logits)) > 2e3
    h32, w32 = jnp.asarray(hidden, jnp.float32), jnp.asarray(weight, jnp.float32)
    fused = jaxce.linear_cross_entropy(h32, w32, labels, reduction="none", chunk_size=32)
    materialised_f32 = jaxce.softmax_cross_entropy_with_integer_labels(h32 @ w32.T, labels)
    assert np.all(np.asarray(fused) >= 0), np.min(fused)
    with jax.enable_x64(True):
        exact = np.asarray(
            jaxce.softmax_cross_entropy_with_integer_labels(
                jnp.asarray(exact_logits), jnp.asarray(labels)
            )
        )
    fused_error = np.max(np.abs(np.asarray(fused, np.float64) - exact))
    materialised_error = np.max(np.abs(np.asarray(materialised_f32, np.float64) - exact))
    # Both round the same float32 product (up to the GEMM's order): 4x leaves room for that.
    assert fused_error <= 4 * materialised_error + 1e-6, (fused_error, materialised_error)
    if reduction == "mean":
        mean = jaxce.linear_cross_entropy(h32, w32, labels, chunk_size=32)
        assert float(mean) >= 0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_token_weights_that_mask_every_token_are_an_empty_mean(reduction):
    """All-zero token weights: the loss of `ignore_index` on every token (0), zero gradients."""
    hidden, weight, _, labels = make_inputs(22, (9,), 6, 11, ignore_fraction=0.0)
    hidden, weight = jnp.asarray(hidden, jnp.float32), jnp.asarray(weight, jnp.float32)

    def loss(h, w, token_weights):
        value = jaxce.linear_cross_entropy(
            h, w, labels, token_weights=token_weights, reduction=reduction, chunk_size=4
        )
        return jnp.sum(value)

    value, grads = jax.value_and_grad(loss, (0, 1))(hidden, weight, jnp.zeros(9))
    assert float(value) == 0.0
    for grad in grads:
        np.testing.assert_array_equal(grad, 0.0)
    ignored = jaxce.linear_cross_entropy(
        hidden, weight, jnp.full(9, -100), ignore_index=-100, reduction=reduction
    )
    assert float(jnp.sum(ignored)) == float(value)
    # A partial mask is the mean over the tokens it keeps, weighted.
    mask = jnp.asarray([0, 1, 1, 0, 0, 2, 0, 0, 1], jnp.float32)
    value = loss(hidden, weight, mask)
    per_token = jaxce.linear_cross_entropy(hidden, weight, labels, reduction="none")
    expected = jnp.sum(mask * per_token)
    if reduction == "mean":
        expected = expected / jnp.sum(mask)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
