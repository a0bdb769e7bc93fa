"""Hyperparameters may be traced values: changing one must not retrace the jitted loss.

`chex.assert_max_traces(n=1)` fails on a second trace, so each test calls the
jitted function with several values of the hyperparameter and proves one trace
(and that the value actually reached the result).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxce

RNG = np.random.default_rng(0)
LOGITS = jnp.asarray(RNG.standard_normal((6, 5), dtype=np.float32))
INT_LABELS = jnp.asarray(RNG.integers(0, 5, size=6), jnp.int32)
BINARY_LABELS = jnp.asarray((RNG.random((6, 5)) < 0.4).astype(np.float32))


def _integer_ce(x, y, value, name):
    return jaxce.softmax_cross_entropy_with_integer_labels(x, y, reduction="mean", **{name: value})


def _soft_ce(x, y, value, name):
    labels = jax.nn.one_hot(y, x.shape[-1])
    return jaxce.softmax_cross_entropy(x, labels, reduction="mean", **{name: value})


def _binary(x, y, value, name):
    return jaxce.sigmoid_binary_cross_entropy(x, y, reduction="mean", **{name: value})


def _focal(x, y, value, name):
    return jaxce.sigmoid_focal_loss(x, y, reduction="mean", **{name: value})


def _softmax_focal(x, y, value, name):
    labels = jax.nn.one_hot(y, x.shape[-1])
    return jaxce.softmax_focal_loss(x, labels, reduction="mean", **{name: value})


def _poly(x, y, value, name):
    labels = jax.nn.one_hot(y, x.shape[-1])
    return jaxce.poly_loss_cross_entropy(x, labels, reduction="mean", **{name: value})


def _categorical(x, y, value, name):
    labels = jax.nn.one_hot(y, x.shape[-1])
    probs = jax.nn.softmax(x)
    return jaxce.categorical_cross_entropy(probs, labels, reduction="mean", **{name: value})


CASES = [
    pytest.param(
        _integer_ce, INT_LABELS, "label_smoothing", (0.0, 0.1, 0.3), id="int-ce-label_smoothing"
    ),
    pytest.param(_integer_ce, INT_LABELS, "z_loss", (0.0, 1e-4, 0.5), id="int-ce-z_loss"),
    pytest.param(
        _soft_ce, INT_LABELS, "label_smoothing", (0.0, 0.2, 0.4), id="soft-ce-label_smoothing"
    ),
    pytest.param(
        _binary, BINARY_LABELS, "label_smoothing", (0.0, 0.1, 0.2), id="bce-label_smoothing"
    ),
    pytest.param(_binary, BINARY_LABELS, "pos_weight", (1.0, 2.0, 0.5), id="bce-pos_weight"),
    pytest.param(_focal, BINARY_LABELS, "alpha", (0.25, 0.5, 0.9), id="focal-alpha"),
    pytest.param(_focal, BINARY_LABELS, "gamma", (0.0, 1.0, 2.0), id="focal-gamma"),
    pytest.param(_softmax_focal, INT_LABELS, "alpha", (0.25, 1.0, 2.0), id="softmax-focal-alpha"),
    pytest.param(_softmax_focal, INT_LABELS, "gamma", (0.0, 0.5, 2.0), id="softmax-focal-gamma"),
    pytest.param(_poly, INT_LABELS, "epsilon", (-1.0, 0.0, 2.0), id="poly-epsilon"),
    pytest.param(
        _categorical,
        INT_LABELS,
        "label_smoothing",
        (0.0, 0.1, 0.3),
        id="categorical-label_smoothing",
    ),
]


@pytest.mark.parametrize("loss, labels, name, values", CASES)
@pytest.mark.parametrize("differentiate", [False, True], ids=["value", "value_and_grad"])
def test_hyperparameter_value_change_does_not_retrace(loss, labels, name, values, differentiate):
    # chex counts traces per function definition: start each parametrization at 0.
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(x, y, value):
        f = lambda x: loss(x, y, value, name)  # noqa: E731
        return jax.value_and_grad(f)(x) if differentiate else f(x)

    results = [run(LOGITS, labels, jnp.float32(v)) for v in values]
    values_seen = [float(jax.tree.leaves(r)[0]) for r in results]
    # The traced value reached the computation: different values, different losses.
    assert len(set(values_seen)) == len(values), values_seen
    # And it is the same loss as with a Python constant.
    expected = float(loss(LOGITS, labels, values[-1], name))
    np.testing.assert_allclose(values_seen[-1], expected, rtol=1e-6)


def _count_compilations(call, times: int) -> list[int]:
    """XLA compilations during each of ``times`` eager calls of ``call``."""
    counts: list[int] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        del duration, kwargs
        if event == "/jax/core/compile/backend_compile_duration":
            counts[-1] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for _ in range(times):
            counts.append(0)
            jax.block_until_ready(call())
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return counts


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("what", ["loss", "jax.grad", "derivatives"])
def test_linear_cross_entropy_outside_jit_compiles_once(what, reduction):
    """Eager calls reuse the compiled chunk loops (they once recompiled on every call)."""
    # Shapes of this case alone, so that its first call must compile.
    tokens = {"loss": 11, "jax.grad": 13, "derivatives": 17}[what] + (reduction == "none")
    hidden = jnp.asarray(RNG.standard_normal((tokens, 8), dtype=np.float32))
    weight = jnp.asarray(RNG.standard_normal((30, 8), dtype=np.float32))
    labels = jnp.asarray(RNG.integers(0, 30, size=tokens), jnp.int32)
    options = {"chunk_size": 5, "label_smoothing": 0.1, "reduction": reduction}
    if what == "loss":
        call = lambda: jaxce.linear_cross_entropy(hidden, weight, labels, **options)  # noqa: E731
    elif what == "jax.grad":
        call = lambda: jax.grad(  # noqa: E731
            lambda h: jnp.sum(jaxce.linear_cross_entropy(h, weight, labels, **options))
        )(hidden)
    else:
        call = lambda: jaxce.derivatives.linear_cross_entropy(  # noqa: E731
            hidden, weight, labels, **options
        )
    counts = _count_compilations(call, 3)
    assert counts[0] > 0  # the listener sees compilations at all
    assert counts[1:] == [0, 0], counts


@pytest.mark.parametrize("what", ["loss", "jax.grad"])
def test_pallas_outside_jit_compiles_once(what):
    """Eager `implementation="pallas"` calls reuse the compiled kernels (they once recompiled,
    about 330 ms, on every call: the kernels were traced afresh each time)."""
    tokens = {"loss": 7, "jax.grad": 9}[what]  # shapes of this case alone: the first call compiles
    logits = jnp.asarray(RNG.standard_normal((tokens, 12), dtype=np.float32))
    labels = jnp.asarray(RNG.integers(0, 12, size=tokens), jnp.int32)

    def loss(x):
        return jaxce.softmax_cross_entropy_with_integer_labels(
            x, labels, label_smoothing=0.1, reduction="mean", implementation="pallas"
        )

    call = (lambda: loss(logits)) if what == "loss" else (lambda: jax.grad(loss)(logits))
    counts = _count_compilations(call, 3)
    assert counts[0] > 0
    assert counts[1:] == [0, 0], counts


def _checked_integer_labels(x, y):
    return jaxce.softmax_cross_entropy_with_integer_labels(x, y, reduction="mean")


@pytest.mark.parametrize("wrap", ["once", "every_call"])
@pytest.mark.parametrize("what", ["integer_labels", "linear_cross_entropy", "jax.grad"])
def test_checked_outside_jit_compiles_once(what, wrap):
    """`jaxce.checked(fn)` of an un-jitted `fn` compiles once per shape (it once traced,
    checkified and compiled `fn` on every call), whether the wrapper is kept or made anew."""
    tokens = 19 + 2 * ["integer_labels", "linear_cross_entropy", "jax.grad"].index(what)
    tokens += wrap == "every_call"  # shapes of this case alone: the first call compiles
    labels = jnp.asarray(RNG.integers(0, 30, size=tokens), jnp.int32)
    if what == "linear_cross_entropy":
        fn = jaxce.linear_cross_entropy
        args = (
            jnp.asarray(RNG.standard_normal((tokens, 8), dtype=np.float32)),
            jnp.asarray(RNG.standard_normal((30, 8), dtype=np.float32)),
            labels,
        )
        kwargs = {"chunk_size": 5, "label_smoothing": 0.1}
    else:
        fn = (
            _checked_integer_labels
            if what == "integer_labels"
            else jax.grad(_checked_integer_labels)
        )
        args = (jnp.asarray(RNG.standard_normal((tokens, 30), dtype=np.float32)), labels)
        kwargs = {}
    kept = jaxce.checked(fn)
    wrapper = (lambda: kept) if wrap == "once" else (lambda: jaxce.checked(fn))
    counts = _count_compilations(lambda: wrapper()(*args, **kwargs), 3)
    assert counts[0] > 0
    assert counts[1:] == [0, 0], counts
    # The cached function still checks: a label out of range raises.
    with pytest.raises(Exception, match="`labels`"):
        wrapper()(*args[:-1], labels.at[3].set(99), **kwargs)
