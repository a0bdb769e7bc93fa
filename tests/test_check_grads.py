"""`jax.test_util.check_grads` up to order 2, forward and reverse, in float64, for every loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxce


def _cases():
    rng = np.random.default_rng(0)
    shape, batch = (3, 4), (3,)
    logits = 2 * rng.standard_normal(shape)
    soft = rng.uniform(0.1, 1.0, shape)
    soft /= soft.sum(-1, keepdims=True)
    binary = (rng.uniform(size=shape) > 0.5) * 1.0
    where = rng.uniform(size=shape) > 0.25
    labels = rng.integers(0, 4, batch)
    np.put_along_axis(where, labels[:, None], True, axis=-1)
    weight = rng.uniform(0.5, 2.0, 4)
    return [
        ("sigmoid_binary_cross_entropy", logits, (soft,),
         {"weight": weight, "pos_weight": weight[::-1], "label_smoothing": 0.1, "reduction": "mean"}),
        ("sigmoid_focal_loss", logits, (binary,),
         {"alpha": 0.25, "gamma": 2.0, "where": where, "reduction": "sum"}),
        ("sigmoid_focal_loss", logits, (soft,), {"gamma": 1.5, "reduction": "none"}),
        ("binary_cross_entropy", rng.uniform(0.1, 0.9, shape), (soft,),
         {"weight": weight, "reduction": "mean"}),
        ("softmax_cross_entropy", logits, (soft,),
         {"weight": weight, "label_smoothing": 0.1, "where": where, "reduction": "mean"}),
        ("softmax_cross_entropy_with_integer_labels", logits, (labels,),
         {"weight": weight, "label_smoothing": 0.1, "z_loss": 1e-2, "where": where,
          "reduction": "mean"}),
        ("softmax_cross_entropy_with_integer_labels", logits.T, (labels,),
         {"axis": 0, "ignore_index": 2, "reduction": "sum"}),
        ("categorical_cross_entropy", rng.uniform(0.1, 1.0, shape), (soft,),
         {"weight": weight, "reduction": "mean"}),
        ("categorical_cross_entropy", rng.uniform(0.1, 1.0, shape), (soft,),
         {"label_smoothing": 0.1, "where": where, "reduction": "sum"}),
        ("softmax_focal_loss", logits, (soft,),
         {"alpha": weight, "gamma": 0.5, "label_smoothing": 0.1, "where": where,
          "reduction": "mean"}),
        ("softmax_focal_loss", logits, (binary,), {"gamma": 2.0, "reduction": "none"}),
        ("poly_loss_cross_entropy", logits, (soft,), {"epsilon": -1.0, "where": where,
                                                       "reduction": "mean"}),
        ("kl_divergence", np.log(soft), (soft[::-1],), {"where": where, "reduction": "batchmean"}),
        ("kl_divergence_with_log_targets", np.log(soft), (np.log(soft[::-1]),),
         {"reduction": "sum"}),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "name, first, rest, kwargs",
    _cases(),
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_check_grads_order_2(name, first, rest, kwargs):
    loss = getattr(jaxce, name)
    with jax.enable_x64(True):
        first = jnp.asarray(first)
        rest = tuple(jnp.asarray(r) for r in rest)
        f = jax.jit(lambda x: jnp.sum(loss(x, *rest, **kwargs)))
        check_grads(f, (first,), order=2, modes=("fwd", "rev"))


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"softcap": 3.0, "label_smoothing": 0.1, "z_loss": 1e-3, "ignore_index": -100, "shift": 1},
    ],
    ids=["defaults", "softcap_smoothing_z_loss_shift"],
)
def test_check_grads_order_2_linear_cross_entropy(kwargs):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 7, (2, 5))
    labels[0, 3] = -100 if "ignore_index" in kwargs else labels[0, 3]
    with jax.enable_x64(True):
        hidden = jnp.asarray(rng.standard_normal((2, 5, 4)))
        weight = jnp.asarray(0.5 * rng.standard_normal((7, 4)))
        bias = jnp.asarray(rng.standard_normal(7))

        def f(h, w, b):
            return jnp.sum(jaxce.linear_cross_entropy(h, w, labels, bias=b, **kwargs))

        # Forward mode to order 2 (jvp of jvp, which is what `jax.hessian`'s
        # forward-over-reverse needs) and reverse mode to order 1. The fused
        # rule loops with `lax.while_loop` (a `scan` would hoist a copy of the
        # weight), which JAX cannot transpose: reverse-over-reverse raises, and
        # the docstring of `linear_cross_entropy` says to use `jax.hessian`.
        check_grads(jax.jit(f), (hidden, weight, bias), order=2, modes=("fwd",))
        check_grads(jax.jit(f), (hidden, weight, bias), order=1, modes=("rev",))
        hessian = jax.jit(jax.hessian(lambda h: f(h, weight, bias)))(hidden)
        assert np.all(np.isfinite(hessian))
