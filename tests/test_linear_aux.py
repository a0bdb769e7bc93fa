"""linear_cross_entropy for language-model and RL training: aux, temperature, token weights, padding.

Every value and gradient is compared with a float64 materialised formula
written here: the ``[N, V]`` logits ``cap(h W^T + b) / T`` of the real classes
(padding rows dropped), then ``jaxce._references``' integer-label loss per
token, weighted and reduced by hand.

Tolerances: jaxce runs in float32. Each logit is a ``D``-term dot product
(relative error about ``sqrt(D) 2^-24``, 2.4e-7 at D = 16), and a loss or a
gradient entry adds ``V`` softmax terms of such logits (at V = 40 a further
``log2(V) 2^-24``); with logits of size up to about 10, the absolute error of
a loss is below ``10 * (2.4e-7 + 3.2e-7)``, about 6e-6. ``RTOL = 2e-5`` and
``ATOL = 2e-5`` leave a margin of 3 or more over that bound and still fail on
any wrong term (the smallest term these cases exercise is above 1e-3).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import compile_as_users_do

import jaxce
from jaxce import _references

RTOL = ATOL = 2e-5
BATCH, STEPS, DIM, VOCAB, PADDED = 2, 6, 16, 40, 48


def _data(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, VOCAB, (BATCH, STEPS))
    labels[0, 4] = -100
    return {
        "hidden": rng.normal(size=(BATCH, STEPS, DIM)),
        "weight": rng.normal(0, 0.6, (PADDED, DIM)),
        "bias": rng.normal(0, 0.5, PADDED),
        "labels": labels,
        "token_weights": rng.uniform(-0.5, 2.0, (BATCH, STEPS)),
    }


def _reference(
    hidden: jax.Array,
    weight: jax.Array,
    bias: jax.Array,
    labels: Any,
    token_weights: jax.Array | None,
    temperature: jax.Array | float | None,
    *,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    shift: int = 0,
    vocab_size: int | None = None,
    reduction: str = "mean",
) -> jax.Array:
    """The float64 formula: materialised logits of the real classes, then the reference loss."""
    real = weight.shape[0] if vocab_size is None else vocab_size
    labels = jnp.asarray(labels)
    if shift:
        length = labels.shape[-1] - shift
        hidden, labels = hidden[..., :length, :], labels[..., shift:]
        if token_weights is not None:
            token_weights = token_weights[..., shift:]
    logits = _references.materialised_logits(
        hidden, weight[:real], bias=bias[:real], softcap=softcap
    )
    if temperature is not None:
        logits = logits / temperature
    per_token = _references.softmax_cross_entropy_with_integer_labels(
        logits,
        labels,
        ignore_index=-100,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        reduction="none",
    )
    counted = labels != -100
    weights = counted.astype(per_token.dtype)
    if token_weights is not None:
        weights = weights * token_weights
    weighted = jnp.where(counted, per_token * weights, 0)
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return jnp.sum(weighted)
    return jnp.sum(weighted) / jnp.sum(weights)


def _close(actual: Any, expected: Any, what: str) -> None:
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), np.asarray(expected), rtol=RTOL, atol=ATOL, err_msg=what
    )


CASES = {
    "temperature-softcap-smoothing-z": dict(
        temperature=0.7, softcap=3.0, label_smoothing=0.1, z_loss=1e-2
    ),
    "token-weights-mean-shift": dict(token_weights=True, shift=1),
    "token-weights-sum-temperature": dict(token_weights=True, temperature=1.8, reduction="sum"),
    "none-everything": dict(
        token_weights=True,
        temperature=1.3,
        softcap=2.5,
        label_smoothing=0.2,
        vocab_size=VOCAB,
        reduction="none",
    ),
    "padding-softcap-smoothing": dict(vocab_size=VOCAB, softcap=2.0, label_smoothing=0.1),
    "padding-bias-only-z": dict(vocab_size=VOCAB - 3, z_loss=1e-2, reduction="sum"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_values_and_gradients_match_float64(case: str) -> None:
    """Values and gradients by hidden, weight, bias, temperature and token weights."""
    options = dict(CASES[case])
    data = _data()
    use_weights = options.pop("token_weights", False)
    temperature = options.pop("temperature", None)
    vocab_size = options.get("vocab_size")
    if vocab_size is not None and vocab_size < VOCAB:
        data["labels"] = np.minimum(data["labels"], vocab_size - 1)
    reduction = options.get("reduction", "mean")
    steps = STEPS - options.get("shift", 0)
    cotangent = np.random.default_rng(1).normal(size=(BATCH, steps))

    def scalar(value: jax.Array) -> jax.Array:
        return jnp.sum(value * cotangent) if reduction == "none" else value

    def ours(h, w, b, t, tw):
        return scalar(
            jaxce.linear_cross_entropy(
                h,
                w,
                data["labels"],
                bias=b,
                temperature=t,
                token_weights=tw,
                chunk_size=5,
                ignore_index=-100,
                **options,
            )
        )

    def reference(h, w, b, t, tw):
        return scalar(_reference(h, w, b, data["labels"], tw, t, **options))

    arguments = [data["hidden"], data["weight"], data["bias"], temperature, None]
    if use_weights:
        arguments[4] = data["token_weights"]
    argnums = tuple(i for i, a in enumerate(arguments) if a is not None)
    value, grads = jax.value_and_grad(ours, argnums)(
        *(None if a is None else jnp.asarray(a, jnp.float32) for a in arguments)
    )
    with jax.enable_x64(True):
        expected, expected_grads = jax.value_and_grad(reference, argnums)(
            *(None if a is None else jnp.asarray(a, jnp.float64) for a in arguments)
        )
        expected, expected_grads = np.asarray(expected), [np.asarray(g) for g in expected_grads]
    _close(value, expected, "loss")
    names = ("hidden", "weight", "bias", "temperature", "token_weights")
    for i, grad, expected_grad in zip(argnums, grads, expected_grads, strict=True):
        if names[i] in ("weight", "bias") and vocab_size is not None:
            # Padding rows: exactly zero.
            assert not np.asarray(grad)[vocab_size:].any(), f"padding rows of d{names[i]}"
            real = np.zeros_like(expected_grad)
            real[:vocab_size] = expected_grad[:vocab_size]
            expected_grad = real
        _close(grad, expected_grad, f"d{names[i]}")


def test_padding_gives_probability_zero_and_labels_past_it_are_invalid() -> None:
    data = _data()
    weight = np.array(data["weight"])
    weight[VOCAB:] = 50.0  # padding rows whose logits would dominate
    hidden, labels = jnp.asarray(data["hidden"], jnp.float32), jnp.asarray(data["labels"])
    w = jnp.asarray(weight, jnp.float32)
    loss, aux = jaxce.linear_cross_entropy(
        hidden, w, labels, vocab_size=VOCAB, softcap=5.0, ignore_index=-100, return_aux=True
    )
    unpadded = jaxce.linear_cross_entropy(hidden, w[:VOCAB], labels, softcap=5.0, ignore_index=-100)
    _close(loss, unpadded, "padded loss equals the loss without the padding rows")
    assert np.all(np.asarray(aux.argmax) < VOCAB)
    bad = labels.at[1, 1].set(VOCAB)  # a padding row, not a class
    options = dict(vocab_size=VOCAB, ignore_index=-100)
    assert np.isnan(float(jaxce.linear_cross_entropy(hidden, w, bad, **options)))
    per_token = jaxce.linear_cross_entropy(hidden, w, bad, reduction="none", **options)
    assert np.isnan(per_token[1, 1]) and np.isfinite(np.delete(np.ravel(per_token), 7)).all()
    with pytest.raises(Exception, match="labels"):
        jaxce.checked(lambda y: jaxce.linear_cross_entropy(hidden, w, y, **options))(bad)


def _float64_aux(hidden: np.ndarray, weight: np.ndarray, temperature: float, softcap: float):
    logits = hidden @ weight.T
    logits = softcap * np.tanh(logits / softcap) / temperature
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    p = np.exp(logits - lse[..., None])
    return lse, -(p * np.log(p)).sum(-1), logits.argmax(-1)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_aux_values_and_that_they_change_nothing(reduction: str) -> None:
    data = _data()
    hidden = jnp.asarray(data["hidden"], jnp.float32)
    weight = jnp.asarray(data["weight"], jnp.float32)
    labels = jnp.asarray(data["labels"])
    options: dict[str, Any] = dict(
        ignore_index=-100, temperature=0.9, softcap=4.0, chunk_size=5, shift=1, reduction=reduction
    )

    def loss(h, w, return_aux):
        out = jaxce.linear_cross_entropy(h, w, labels, return_aux=return_aux, **options)
        value, aux = out if return_aux else (out, None)
        return jnp.sum(value * jnp.arange(value.size).reshape(value.shape)), aux

    (plain, _), plain_grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(hidden, weight, False)
    (value, aux), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(hidden, weight, True)
    np.testing.assert_array_equal(value, plain)
    for g, p in zip(grads, plain_grads, strict=True):
        np.testing.assert_array_equal(g, p)

    lse, entropy, argmax = _float64_aux(data["hidden"], data["weight"], 0.9, 4.0)
    assert aux.logsumexp.shape == aux.entropy.shape == aux.argmax.shape == (BATCH, STEPS - 1)
    assert aux.argmax.dtype == jnp.int32
    _close(aux.logsumexp, lse[:, :-1], "logsumexp")
    _close(aux.entropy, entropy[:, :-1], "entropy")
    np.testing.assert_array_equal(aux.argmax, argmax[:, :-1])

    # Diagnostics only: no gradient flows through them.
    def through_aux(h):
        _, aux = jaxce.linear_cross_entropy(h, weight, labels, return_aux=True, **options)
        return jnp.sum(aux.entropy) + jnp.sum(aux.logsumexp)

    assert not np.asarray(jax.grad(through_aux)(hidden)).any()


def _products(compiled_text: str) -> int:
    return len(re.findall(r"\bdot\(", compiled_text))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_options_add_no_matrix_product(reduction: str) -> None:
    """Aux, temperature, token weights and padding keep 3 ("mean") / 4 ("none") products."""
    tokens, dim, vocab = 256, 32, 1024
    shapes = (
        jax.ShapeDtypeStruct((tokens, dim), jnp.float32),
        jax.ShapeDtypeStruct((vocab, dim), jnp.float32),
        jax.ShapeDtypeStruct((tokens,), jnp.int32),
        jax.ShapeDtypeStruct((), jnp.float32),
        jax.ShapeDtypeStruct((tokens,), jnp.float32),
    )

    def program(**options: Any) -> str:
        def loss(h, w, y, t, tw):
            out = jaxce.linear_cross_entropy(
                h,
                w,
                y,
                reduction=reduction,
                chunk_size=64,
                **{k: v for k, v in dict(temperature=t, token_weights=tw).items() if k in options},
                **{k: v for k, v in options.items() if k not in ("temperature", "token_weights")},
            )
            value = out[0] if isinstance(out, tuple) else out
            return jnp.sum(value)

        grad = jax.value_and_grad(loss, (0, 1, 3, 4))
        return compile_as_users_do(jax.jit(grad).lower(*shapes)).as_text()

    plain = _products(program())
    assert plain == (3 if reduction == "mean" else 4)
    everything = program(temperature=True, token_weights=True, vocab_size=1000, return_aux=True)
    assert _products(everything) == plain


def test_traced_temperature_and_its_checks() -> None:
    data = _data()
    hidden = jnp.asarray(data["hidden"], jnp.float32)
    weight = jnp.asarray(data["weight"], jnp.float32)
    labels = jnp.asarray(np.where(data["labels"] < 0, 0, data["labels"]))

    @jax.jit
    def loss(t):
        return jaxce.linear_cross_entropy(hidden, weight, labels, temperature=t)

    # jvp (forward mode) agrees with reverse mode
    _, tangent = jax.jvp(loss, (jnp.float32(1.5),), (jnp.float32(1.0),))
    _close(tangent, jax.grad(loss)(jnp.float32(1.5)), "jvp of the temperature")
    assert np.isnan(float(loss(jnp.float32(0.0))))
    assert np.isnan(float(loss(jnp.float32(-1.0))))
    with pytest.raises(Exception, match="temperature"):
        jaxce.checked(loss)(jnp.float32(0.0))
    for bad in (0.0, -2.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            jaxce.linear_cross_entropy(hidden, weight, labels, temperature=bad)
    for bad_size in (0, PADDED + 1, 3.5, True):
        with pytest.raises(ValueError, match="vocab_size"):
            jaxce.linear_cross_entropy(hidden, weight, labels, vocab_size=bad_size)
    with pytest.raises(ValueError, match="token_weights"):
        jaxce.linear_cross_entropy(hidden, weight, labels, token_weights=jnp.ones(3))


def test_closed_form_gradients_take_the_same_options() -> None:
    """``jaxce.derivatives.linear_cross_entropy`` with every new option, against float64."""
    data = _data()
    labels = np.minimum(data["labels"], VOCAB - 1)
    options = dict(softcap=3.0, label_smoothing=0.1, shift=1, vocab_size=VOCAB)
    d_hidden, d_weight, d_bias = jaxce.derivatives.linear_cross_entropy(
        jnp.asarray(data["hidden"], jnp.float32),
        jnp.asarray(data["weight"], jnp.float32),
        labels,
        bias=jnp.asarray(data["bias"], jnp.float32),
        temperature=0.8,
        token_weights=jnp.asarray(data["token_weights"], jnp.float32),
        ignore_index=-100,
        chunk_size=5,
        **options,
    )
    with jax.enable_x64(True):
        expected = jax.grad(
            lambda h, w, b: _reference(
                h, w, b, labels, jnp.asarray(data["token_weights"]), 0.8, **options
            ),
            argnums=(0, 1, 2),
        )(*(jnp.asarray(data[k]) for k in ("hidden", "weight", "bias")))
        expected = [np.asarray(e) for e in expected]
    for name, got, want in zip(
        ("hidden", "weight", "bias"), (d_hidden, d_weight, d_bias), expected, strict=True
    ):
        _close(got, want, f"d{name}")
    assert not np.asarray(d_weight)[VOCAB:].any() and not np.asarray(d_bias)[VOCAB:].any()
