"""linear_distillation_loss against a float64 materialised formulation, and its memory bound."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REDUCTIONS, assert_normwise_close, compile_as_users_do

import jaxce
from jaxce import _references

reference = _references.linear_distillation_loss


def make_inputs(seed, batch_shape, dim, teacher_dim, vocab, *, ignore_fraction=0.2):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(*batch_shape, dim))
    weight = rng.normal(size=(vocab, dim)) / np.sqrt(dim) * 2
    teacher_hidden = rng.normal(size=(*batch_shape, teacher_dim))
    teacher_weight = rng.normal(size=(vocab, teacher_dim)) / np.sqrt(teacher_dim) * 3
    labels = rng.integers(0, vocab, size=batch_shape)
    labels = np.where(rng.random(batch_shape) < ignore_fraction, -100, labels)
    return hidden, weight, teacher_hidden, teacher_weight, labels


def _value_and_grads(loss, hidden, weight):
    """The loss and the gradients of its sum w.r.t. hidden and weight, jitted together."""

    def both(hidden, weight):
        return loss(hidden, weight), jax.grad(lambda h, w: jnp.sum(loss(h, w)), (0, 1))(
            hidden, weight
        )

    value, grads = jax.jit(both)(hidden, weight)
    return value, *grads


OPTIONS = [
    {},
    {"temperature": 2.0},
    {"hard_label_weight": 0.3, "ignore_index": -100},
    {"temperature": 0.7, "hard_label_weight": 0.5, "ignore_index": -100},
]


def _grid():
    """Every beta, option set and reduction; make test runs every option at once."""
    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
        for options in OPTIONS:
            for reduction in REDUCTIONS:
                quick = options is OPTIONS[-1] and beta in (0.0, 0.5, 1.0)
                yield pytest.param(
                    beta,
                    options,
                    reduction,
                    id=f"{beta}-{','.join(options) or 'defaults'}-{reduction}",
                    marks=() if quick else pytest.mark.slow,
                )


@pytest.mark.parametrize(("beta", "options", "reduction"), list(_grid()))
def test_matches_float64_at_every_beta(beta, options, reduction):
    """Values and gradients w.r.t. hidden and weight, chunks overlapping at the end (37 = 4 x 8 + 5)."""
    hidden, weight, teacher_hidden, teacher_weight, labels = make_inputs(
        int(beta * 10), (37,), 8, 12, 29
    )
    with jax.enable_x64(True):
        arrays = [jnp.asarray(a) for a in (hidden, weight, teacher_hidden, teacher_weight)]
        kwargs = dict(options, beta=beta, reduction=reduction)
        labels_or_none = jnp.asarray(labels) if "ignore_index" in options else None

        def ours(h, w):
            return jaxce.linear_distillation_loss(
                h, w, *arrays[2:], labels_or_none, chunk_size=8, **kwargs
            )

        def theirs(h, w):
            return reference(h, w, *arrays[2:], labels_or_none, **kwargs)

        actual = _value_and_grads(ours, *arrays[:2])
        expected = _value_and_grads(theirs, *arrays[:2])
    for name, a, e in zip(("loss", "d hidden", "d weight"), actual, expected, strict=True):
        assert a.dtype == np.float64, name
        assert_normwise_close(a, e, 1e-12, name)


@pytest.mark.parametrize(
    "beta",
    [pytest.param(0.0, marks=pytest.mark.slow), 0.5, pytest.param(1.0, marks=pytest.mark.slow)],
)
def test_float32_and_bfloat16_batch_shapes(beta):
    """``[B, T, D]`` inputs, float32 and bfloat16, against float64; "mean" and "none"."""
    hidden, weight, teacher_hidden, teacher_weight, labels = make_inputs(3, (2, 9), 16, 24, 40)
    kwargs = {"beta": beta, "temperature": 1.5, "hard_label_weight": 0.25, "ignore_index": -100}
    with jax.enable_x64(True):
        expected = {
            reduction: _value_and_grads(
                lambda h, w, r=reduction: reference(
                    h, w, teacher_hidden, teacher_weight, labels, reduction=r, **kwargs
                ),
                jnp.asarray(hidden),
                jnp.asarray(weight),
            )
            for reduction in ("mean", "none")
        }
    for dtype, tolerance in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
        for reduction in ("mean", "none"):
            arrays = [
                jnp.asarray(a, dtype) for a in (hidden, weight, teacher_hidden, teacher_weight)
            ]

            def ours(h, w, arrays=arrays, reduction=reduction):
                return jaxce.linear_distillation_loss(
                    h, w, *arrays[2:], labels, chunk_size=7, reduction=reduction, **kwargs
                )

            actual = _value_and_grads(ours, *arrays[:2])
            assert actual[0].dtype == jnp.float32
            assert actual[1].dtype == dtype and actual[2].dtype == dtype
            # bfloat16 inputs are rounded before the products: compare with the
            # reference on the rounded inputs' scale, norm-wise.
            for a, e in zip(actual, expected[reduction], strict=True):
                assert_normwise_close(np.asarray(a, np.float64), e, tolerance)


def test_equals_the_fused_cross_entropy_where_the_teacher_is_one_hot():
    """A teacher certain of the label (logits 1e4 apart) makes forward KL the cross-entropy."""
    hidden, weight, _, _, labels = make_inputs(5, (33,), 8, 8, 17, ignore_fraction=0.0)
    vocab = weight.shape[0]
    teacher_hidden = np.eye(vocab)[labels] * 1e4
    teacher_weight = np.eye(vocab)
    for reduction in REDUCTIONS:
        distilled = _value_and_grads(
            lambda h, w, r=reduction: jaxce.linear_distillation_loss(
                h, w, teacher_hidden, teacher_weight, reduction=r
            ),
            jnp.asarray(hidden, jnp.float32),
            jnp.asarray(weight, jnp.float32),
        )
        fused = _value_and_grads(
            lambda h, w, r=reduction: jaxce.linear_cross_entropy(h, w, labels, reduction=r),
            jnp.asarray(hidden, jnp.float32),
            jnp.asarray(weight, jnp.float32),
        )
        for a, e in zip(distilled, fused, strict=True):
            assert_normwise_close(a, e, 1e-5, reduction)


def test_closed_form_is_the_gradient():
    hidden, weight, teacher_hidden, teacher_weight, labels = make_inputs(7, (21,), 8, 5, 13)
    kwargs = {"beta": 0.4, "temperature": 2.0, "hard_label_weight": 0.2, "ignore_index": -100}
    with jax.enable_x64(True):
        args = [jnp.asarray(a) for a in (hidden, weight, teacher_hidden, teacher_weight)]
        for reduction in REDUCTIONS:
            closed = jaxce.derivatives.linear_distillation_loss(
                *args, labels, reduction=reduction, **kwargs
            )
            expected = _value_and_grads(
                lambda h, w, r=reduction: reference(h, w, *args[2:], labels, reduction=r, **kwargs),
                *args[:2],
            )[1:]
            for a, e in zip(closed, expected, strict=True):
                assert_normwise_close(a, e, 1e-12, reduction)


def test_the_teacher_gets_no_gradient_and_jvp_agrees():
    hidden, weight, teacher_hidden, teacher_weight, _ = make_inputs(8, (10,), 4, 6, 9)
    args = [jnp.asarray(a, jnp.float32) for a in (hidden, weight, teacher_hidden, teacher_weight)]

    def loss(*a):
        return jaxce.linear_distillation_loss(*a, beta=0.5, temperature=3.0)

    grads = jax.grad(loss, (0, 1, 2, 3))(*args)
    assert not np.any(grads[2]) and not np.any(grads[3])
    tangents = [jnp.asarray(np.random.default_rng(1).normal(size=a.shape), a.dtype) for a in args]
    _, directional = jax.jvp(loss, args, tangents)
    expected = sum(jnp.vdot(g, t) for g, t in zip(grads[:2], tangents[:2], strict=True))
    np.testing.assert_allclose(directional, expected, rtol=1e-5)


def test_vmap_over_a_leading_axis():
    hidden, weight, teacher_hidden, teacher_weight, _ = make_inputs(9, (3, 11), 4, 6, 9)

    def one(h, th):
        return jaxce.linear_distillation_loss(h, weight, th, teacher_weight, beta=0.5)

    mapped = jax.vmap(one)(jnp.asarray(hidden), jnp.asarray(teacher_hidden))
    looped = jnp.stack([one(h, th) for h, th in zip(hidden, teacher_hidden, strict=True)])
    np.testing.assert_allclose(mapped, looped, rtol=1e-6)


def test_ignored_tokens_and_empty_batches():
    hidden, weight, teacher_hidden, teacher_weight, labels = make_inputs(10, (12,), 4, 6, 9)
    labels = np.full_like(labels, -100)
    loss, d_hidden, d_weight = _value_and_grads(
        lambda h, w: jaxce.linear_distillation_loss(
            h, w, teacher_hidden, teacher_weight, labels, ignore_index=-100
        ),
        jnp.asarray(hidden),
        jnp.asarray(weight),
    )
    assert float(loss) == 0 and not np.any(d_hidden) and not np.any(d_weight)
    for reduction in REDUCTIONS:
        empty = jaxce.linear_distillation_loss(
            np.zeros((0, 4)), weight, np.zeros((0, 6)), teacher_weight, reduction=reduction
        )
        assert empty.shape == ((0,) if reduction == "none" else ())
        assert not np.any(empty)


def test_out_of_range_label_is_nan_and_checked_names_it():
    hidden, weight, teacher_hidden, teacher_weight, labels = make_inputs(11, (6,), 4, 6, 9)
    labels = np.array([0, 1, 2, 9, -100, 3])
    per_token = jaxce.linear_distillation_loss(
        hidden, weight, teacher_hidden, teacher_weight, labels,
        hard_label_weight=0.5, ignore_index=-100, reduction="none",
    )  # fmt: skip
    assert np.isnan(per_token[3]) and per_token[4] == 0
    assert np.all(np.isfinite(np.delete(np.asarray(per_token), 3)))
    with pytest.raises(Exception, match="labels"):
        jaxce.checked(jaxce.linear_distillation_loss)(
            hidden, weight, teacher_hidden, teacher_weight, labels,
            hard_label_weight=0.5, ignore_index=-100,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"beta": 1.5}, "`beta` must be a float in \\[0, 1\\]"),
        ({"hard_label_weight": 1.5}, "`hard_label_weight` must be in \\[0, 1\\]"),
        ({"temperature": 0.0}, "`temperature` must be a positive"),
        ({"hard_label_weight": 0.5, "labels": None}, "`labels` are needed"),
        ({"teacher_weight": np.zeros((8, 6))}, "`teacher_weight` must have the vocabulary"),
        ({"teacher_hidden": np.zeros((5, 6))}, "`teacher_hidden` must have shape"),
        ({"weight": np.zeros((4, 9))}, "`weight` must have shape \\[V, D\\]"),
        ({"chunk_size": 0}, "`chunk_size` must be a positive int"),
        ({"reduction": "batchmean"}, "`reduction` must be one of"),
    ],
)
def test_bad_arguments_are_named(change, message):
    hidden, weight, teacher_hidden, teacher_weight, labels = make_inputs(12, (6,), 4, 6, 9)
    arguments = {
        "hidden": hidden,
        "weight": weight,
        "teacher_hidden": teacher_hidden,
        "teacher_weight": teacher_weight,
        "labels": labels,
    }
    arguments.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        jaxce.linear_distillation_loss(**arguments)


def test_traced_beta_is_refused_and_traced_options_are_checked():
    hidden, weight, teacher_hidden, teacher_weight, _ = make_inputs(13, (6,), 4, 6, 9)
    with pytest.raises(TypeError, match="`beta` must be a concrete"):
        jax.jit(
            lambda b: jaxce.linear_distillation_loss(
                hidden, weight, teacher_hidden, teacher_weight, beta=b
            )
        )(0.5)

    def loss(temperature):
        return jaxce.linear_distillation_loss(
            hidden, weight, teacher_hidden, teacher_weight, temperature=temperature
        )

    assert np.isfinite(jax.jit(loss)(2.0))
    assert np.isnan(jax.jit(loss)(-1.0))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_temporaries_are_a_small_fraction_of_the_materialised_form(beta):
    """N=2048, D=256, V=16384, float32 ``value_and_grad``: at most a quarter of the materialised
    form's temporaries (both logits, their log-softmax, the mixture), by XLA's own count."""
    num_tokens, dim, teacher_dim, vocab = 2048, 256, 384, 16384
    shapes = [
        jax.ShapeDtypeStruct(s, jnp.float32)
        for s in ((num_tokens, dim), (vocab, dim), (num_tokens, teacher_dim), (vocab, teacher_dim))
    ]

    def temporaries(loss):
        compiled = compile_as_users_do(jax.jit(jax.value_and_grad(loss, (0, 1))).lower(*shapes))
        return compiled.memory_analysis().temp_size_in_bytes

    fused = temporaries(lambda *a: jaxce.linear_distillation_loss(*a, beta=beta))
    materialised = temporaries(lambda *a: reference(*a, beta=beta))
    assert fused <= materialised / 4, (fused / 2**20, materialised / 2**20)
    # One chunk's buffers (a few [chunk, V] float32) and the two gradients, no [N, V].
    assert fused < num_tokens * vocab * 4 / 2
