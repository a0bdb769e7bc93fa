"""`jaxce.checked`: it names what makes a loss NaN, and only that.

A value that takes no part in the loss (an example excluded by ``where``, an
ignored example, a class excluded by ``where``) is not checked: `checked` of a
valid call returns the unchecked loss. A NaN logit that takes part makes its
row's loss NaN, and `checked` names ``logits``, the index and the value.

(tests/test_invalid_values.py checks the NaN of every invalid value and
`checked` next to ``jax.jit``; tests/test_no_retrace.py that `checked` compiles
once.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REDUCTIONS, rounding_bound
from jax.experimental import checkify

import jaxce

RNG = np.random.default_rng(71)
BATCH, CLASSES = 4, 5
LOGITS = jnp.asarray(RNG.normal(size=(BATCH, CLASSES)), jnp.float32)
# Row 1 holds a label out of range; only the `where` of each case makes the call valid.
LABELS = jnp.array([0, 7, 2, 4])
BAD_ROW = 1
# `checked` compiles the function: XLA's fusion may reassociate the eager call's few float32
# sums and products (a handful of roundings, 16 u bounds them).
RTOL = rounding_bound(jnp.float32, 16)


def _integer(implementation: str) -> Callable[..., jax.Array]:
    def loss(x, y, **options):
        return jaxce.softmax_cross_entropy_with_integer_labels(
            x, y, implementation=implementation, **options
        )

    return loss


def _excluding_where(kind: str) -> np.ndarray:
    if kind == "batch_where":
        return np.arange(BATCH) != BAD_ROW
    mask = np.ones((BATCH, CLASSES), bool)
    mask[BAD_ROW] = False  # every class of the row excluded: the row takes no part
    return mask


EXCLUDED = [
    pytest.param(implementation, kind, id=f"{implementation}-{kind}")
    for implementation in ("xla", "pallas")
    for kind in ("batch_where", "all_classes_where")
]


@pytest.mark.parametrize(("implementation", "kind"), EXCLUDED)
def test_checked_skips_the_labels_of_examples_excluded_by_where(
    implementation: str, kind: str
) -> None:
    """An out-of-range label in an example that takes no part is no error: the loss is finite."""
    loss = _integer(implementation)
    where = jnp.asarray(_excluding_where(kind))
    for reduction in REDUCTIONS:
        plain = loss(LOGITS, LABELS, where=where, reduction=reduction)
        assert np.all(np.isfinite(np.asarray(plain))), (reduction, plain)
        checked = jaxce.checked(loss)(LOGITS, LABELS, where=where, reduction=reduction)
        np.testing.assert_allclose(np.asarray(checked), np.asarray(plain), rtol=RTOL)
        checked_jit = jaxce.checked(
            jax.jit(lambda x, y, w, r=reduction: loss(x, y, where=w, reduction=r))
        )
        np.testing.assert_allclose(
            np.asarray(checked_jit(LOGITS, LABELS, where)), np.asarray(plain), rtol=RTOL
        )


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_checked_still_names_a_bad_label_in_an_example_that_takes_part(
    implementation: str,
) -> None:
    where = jnp.asarray(np.arange(BATCH) != 3)  # another row excluded
    with pytest.raises(checkify.JaxRuntimeError, match=r"`labels`.* 7 at index \[1\]"):
        jaxce.checked(_integer(implementation))(LOGITS, LABELS, where=where)


# --------------------------------------------------------------------------- #
# NaN logits.
# --------------------------------------------------------------------------- #

NAN_AT = (2, 3)
NAN_LOGITS = LOGITS.at[NAN_AT].set(jnp.nan)
IN_RANGE = jnp.array([0, 1, 2, 4])
BINARY_LABELS = jnp.asarray(RNG.integers(0, 2, size=(BATCH, CLASSES)), jnp.float32)


def _nan_cases() -> list[Any]:
    """(loss of the logits and options, whether `where` is elementwise)."""
    cases = {
        "sigmoid_binary": (
            lambda x, **o: jaxce.sigmoid_binary_cross_entropy(x, BINARY_LABELS, **o),
            True,
            (),
        ),
        "sigmoid_focal": (
            lambda x, **o: jaxce.sigmoid_focal_loss(x, BINARY_LABELS, alpha=0.25, **o),
            True,
            (),
        ),
        "softmax": (
            lambda x, **o: jaxce.softmax_cross_entropy(x, jax.nn.one_hot(IN_RANGE, CLASSES), **o),
            False,
            (),
        ),
        "softmax_focal": (
            lambda x, **o: jaxce.softmax_focal_loss(x, jax.nn.one_hot(IN_RANGE, CLASSES), **o),
            False,
            (),
        ),
        "poly": (
            lambda x, **o: jaxce.poly_loss_cross_entropy(x, jax.nn.one_hot(IN_RANGE, CLASSES), **o),
            False,
            (),
        ),
        "integer_labels_xla": (
            lambda x, **o: _integer("xla")(x, IN_RANGE, **o),
            False,
            (),
        ),
        "integer_labels_pallas": (
            lambda x, **o: _integer("pallas")(x, IN_RANGE, **o),
            False,
            (),
        ),
    }
    return [
        pytest.param(fn, elementwise, id=name, marks=marks)
        for name, (fn, elementwise, marks) in cases.items()
    ]


NAN_CASES = _nan_cases()
# The controls (the NaN takes no part) hold today for every loss.
NAN_CONTROL_CASES = [pytest.param(*case.values, id=case.id) for case in NAN_CASES]


@pytest.mark.parametrize("mode", ["eager", "jit"])
@pytest.mark.parametrize(("loss", "elementwise"), NAN_CASES)
def test_checked_names_a_nan_logit_that_takes_part(
    loss: Callable[..., jax.Array], elementwise: bool, mode: str
) -> None:
    del elementwise
    assert np.isnan(np.asarray(loss(NAN_LOGITS, reduction="mean")))

    def mean(x: jax.Array) -> jax.Array:
        return loss(x, reduction="mean")

    with pytest.raises(checkify.JaxRuntimeError, match=r"`logits`.*got nan at index \[2 3\]"):
        jaxce.checked(mean if mode == "eager" else jax.jit(mean))(NAN_LOGITS)


def _excluding_the_nan(kind: str, elementwise: bool) -> dict[str, Any]:
    if kind == "class_where":
        return {"where": jnp.ones((BATCH, CLASSES), bool).at[NAN_AT].set(False)}
    rows = jnp.arange(BATCH) != NAN_AT[0]
    return {"where": rows[:, None] if elementwise else rows}


@pytest.mark.parametrize("kind", ["class_where", "example_where"])
@pytest.mark.parametrize(("loss", "elementwise"), NAN_CONTROL_CASES)
def test_checked_passes_a_nan_logit_excluded_by_where(
    loss: Callable[..., jax.Array], elementwise: bool, kind: str
) -> None:
    """The loss is finite, so `checked` returns it (a control for the test above)."""
    options = _excluding_the_nan(kind, elementwise)

    def mean(x: jax.Array) -> jax.Array:
        return loss(x, reduction="mean", **options)

    plain = mean(NAN_LOGITS)
    assert np.isfinite(np.asarray(plain))
    np.testing.assert_allclose(
        np.asarray(jaxce.checked(mean)(NAN_LOGITS)), np.asarray(plain), rtol=RTOL
    )


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_checked_passes_a_nan_logit_of_an_ignored_example(implementation: str) -> None:
    labels = IN_RANGE.at[NAN_AT[0]].set(-100)

    def mean(x: jax.Array) -> jax.Array:
        return _integer(implementation)(x, labels, ignore_index=-100, reduction="mean")

    plain = mean(NAN_LOGITS)
    assert np.isfinite(np.asarray(plain))
    np.testing.assert_allclose(
        np.asarray(jaxce.checked(mean)(NAN_LOGITS)), np.asarray(plain), rtol=RTOL
    )


def test_plain_traces_carry_no_check_and_checked_still_checks_a_jitted_function():
    """Outside `jaxce.checked` a trace holds no checkify effect (jit keeps its fast dispatch);
    a function jitted and called plainly first is traced again, with its checks, when checked."""
    x, y = jnp.zeros((4, 3)), jnp.array([0, 1, 2, 5])

    def loss(x, y):
        return jaxce.softmax_cross_entropy_with_integer_labels(x, y, reduction="mean")

    assert jax.make_jaxpr(loss)(x, y).effects == set()
    jitted = jax.jit(loss)
    assert np.isnan(jitted(x, y))
    with pytest.raises(Exception, match=r"`labels` must be class indices in \[0, 3\); got 5"):
        jaxce.checked(jitted)(x, y)
    assert np.isnan(jitted(x, y))  # and the plain call after it is plain again
    assert jax.make_jaxpr(jitted)(x, y).effects == set()
