"""`jaxce._formulas`: each row formula written once, and every path moves with it.

Every implementation path of the integer-label softmax cross-entropy (plain XLA,
the Pallas kernel in interpret mode, the vocabulary-parallel loss, the fused
linear loss, soft labels) calls the same functions for the log-sum-exp, the
label smoothing mix and the z-loss. Patching one of them must change every
path's loss alike: a path that re-derived the formula would keep the old value.
The formulas themselves are checked against float64 NumPy.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxce
from jaxce import _formulas

C = 6
LABELS = np.array([0, 3, 5, 2])
LOGITS = np.array(
    [
        [1.5, -0.5, 0.25, 2.0, -1.0, 0.0],
        [-100.0, -101.0, -102.5, -100.5, -103.0, -104.0],  # every logit below -88.7
        [3.0, 3.0, -2.0, 0.5, 3.0, 1.0],  # ties at the maximum
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
    ],
    np.float32,
)


def _paths(options: dict[str, Any]) -> dict[str, Any]:
    """Each path's per-example loss on `LOGITS` with `options` (integer labels)."""
    logits, labels = jnp.asarray(LOGITS), jnp.asarray(LABELS)
    integer = functools.partial(jaxce.softmax_cross_entropy_with_integer_labels, **options)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("vocab",))
    sharded = jax.shard_map(
        lambda x, y: jaxce.sharded.softmax_cross_entropy_with_integer_labels(
            x, y, axis_name="vocab", **options
        ),
        mesh=mesh,
        in_specs=(P(None, "vocab"), P()),
        out_specs=P(),
    )
    paths = {
        "xla": lambda: integer(logits, labels, implementation="xla"),
        "pallas": lambda: integer(logits, labels, implementation="pallas"),
        "sharded": lambda: sharded(logits, labels),
        # hidden @ I = the logits, exactly.
        "fused": lambda: jaxce.linear_cross_entropy(
            logits, jnp.eye(C), labels, reduction="none", chunk_size=3, **options
        ),
    }
    if "z_loss" not in options:
        smoothing = options.get("label_smoothing", 0.0)
        paths["soft"] = lambda: jaxce.softmax_cross_entropy(
            logits, jax.nn.one_hot(labels, C), label_smoothing=smoothing
        )
    return {name: np.asarray(jax.jit(path)()) for name, path in paths.items()}


def _doubled_smoothing(smoothing: Any, num_classes: int) -> tuple[Any, Any]:
    return 1 - smoothing, 2 * smoothing / num_classes


def _z_loss_tripled(z: Any, log_partition: Any) -> Any:
    return 3 * (z * log_partition) * log_partition


def _log_of_total_plus_one(total: Any) -> Any:
    return _ORIGINAL_LOG_OF_TOTAL(total) + 1


_ORIGINAL_LOG_OF_TOTAL = _formulas.log_of_total


@pytest.mark.parametrize(
    ("name", "patch", "options"),
    [
        ("smoothing_coefficients", _doubled_smoothing, {"label_smoothing": 0.2}),
        ("z_loss_term", _z_loss_tripled, {"z_loss": 0.05}),
        ("log_of_total", _log_of_total_plus_one, {}),
    ],
    ids=["smoothing-mix", "z-loss", "log-sum-exp"],
)
def test_patching_a_shared_formula_changes_every_path(monkeypatch, name, patch, options):
    jax.clear_caches()
    before = _paths(options)
    monkeypatch.setattr(_formulas, name, patch)
    jax.clear_caches()
    try:
        after = _paths(options)
    finally:
        monkeypatch.undo()
        jax.clear_caches()
    reference = after["xla"]
    assert not np.allclose(reference, before["xla"], rtol=1e-3), "the patch changes nothing"
    for path, values in after.items():
        np.testing.assert_allclose(values, reference, rtol=1e-5, atol=1e-5, err_msg=path)
        assert not np.allclose(values, before[path], rtol=1e-3), path


def test_online_total_equals_the_direct_sum_whatever_the_blocks():
    """Walking a row in blocks with `online_total` gives the one-pass `shifted_exponentials` sum."""
    rng = np.random.default_rng(0)
    rows = [
        rng.normal(size=40) * 3,
        rng.normal(size=40) - 100.0,  # below -88.7: the first rescaling overflows exp
        np.concatenate([np.full(20, -np.inf), rng.normal(size=20) - 200.0]),
        np.full(40, -np.inf),
        np.concatenate([rng.normal(size=39), [1e30]]),
    ]
    for row in rows:
        x = jnp.asarray(row, jnp.float32)
        shift, _, total = _formulas.shifted_exponentials(x[None, :])
        running_max, running = jnp.float32(-jnp.inf), jnp.float32(0)
        for block in jnp.split(x, 5):
            new_max = jnp.maximum(running_max, jnp.max(block))
            old, new = _formulas.finite_shift(running_max), _formulas.finite_shift(new_max)
            running = _formulas.online_total(running, old, new) + jnp.sum(jnp.exp(block - new))
            running_max = new_max
        assert float(_formulas.finite_shift(running_max)) == float(shift[0, 0])
        np.testing.assert_allclose(running, total[0], rtol=1e-6)
        assert np.isfinite(float(running))


def test_formulas_against_float64():
    eps, classes = 0.1, 7
    y = np.array([0.0, 1.0, 0.25])
    np.testing.assert_allclose(_formulas.smoothed_targets(y, eps, classes), 0.9 * y + 0.1 / 7)
    np.testing.assert_allclose(_formulas.smoothing_mix(2.0, 3.0, eps, classes), 1.8 + 0.3 / 7)
    assert float(_formulas.z_loss_term(jnp.float32(0), jnp.float32(1e30))) == 0.0
    assert float(_formulas.z_loss_slope(jnp.float32(0.5), jnp.float32(3.0))) == 3.0
    x = np.linspace(-3, 3, 7)
    np.testing.assert_allclose(_formulas.soften(x, 2.0, 4.0), 2 * np.tanh(x / 2) / 4, rtol=1e-6)
    slope = _formulas.soften_slope(_formulas.soften(x, 2.0, 4.0), 2.0, 4.0)
    np.testing.assert_allclose(slope, (1 - np.tanh(x / 2) ** 2) / 4, rtol=1e-5)
    assert _formulas.soften_slope(x, None, None) is None
    np.testing.assert_array_equal(_formulas.log_of_total(jnp.array([0.0, 1.0])), [-np.inf, 0.0])
    np.testing.assert_array_equal(
        _formulas.probabilities(jnp.array([-np.inf, 0.0]), jnp.array(-np.inf)), [0.0, 0.0]
    )


def test_zero_weight_rule():
    """Excluded: 0 whatever the term; taking part: PyTorch's product (0 * inf = NaN)."""
    weights = jnp.array([0.0, 0.0, 2.0, 0.0])
    terms = jnp.array([-np.inf, -np.inf, -np.inf, 1.0])
    included = jnp.array([False, True, True, True])
    got = np.asarray(_formulas.weighted_terms(weights, terms, included))
    assert got[0] == 0 and np.isnan(got[1]) and got[2] == -np.inf and got[3] == 0
    assert np.isnan(np.asarray(_formulas.weighted_terms(weights, terms, None))[0])


def test_an_overflowing_loss_is_inf_on_every_path():
    """-log p_y beyond float32's range is +inf with soft labels too, not a clamp at finfo.max."""
    logits = jnp.asarray([[3e38, -3e38, 0.0], [1.0, 2.0, 3.0]], jnp.float32)
    labels = jnp.asarray([1, 0])
    integer = jaxce.softmax_cross_entropy_with_integer_labels(logits, labels)
    soft = jaxce.softmax_cross_entropy(logits, jax.nn.one_hot(labels, 3))
    assert float(integer[0]) == np.inf
    np.testing.assert_array_equal(soft, integer)
    weights = jnp.asarray([1.0, 2.0, 1.0])
    weighted = jaxce.softmax_cross_entropy(logits, jax.nn.one_hot(labels, 3), weight=weights)
    np.testing.assert_array_equal(
        weighted, jaxce.softmax_cross_entropy_with_integer_labels(logits, labels, weight=weights)
    )
