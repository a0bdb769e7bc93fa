"""jaxce on many devices: vocabulary-parallel losses and batch-sharded inputs.

The cases need 8 devices, and JAX fixes its device count when the backend
starts, so the parent pytest run (1 CPU device) holds one test that runs this
same file again in a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
Only that subprocess defines the cases (``JAXCE_EIGHT_DEVICES=1``); a failure
prints the subprocess' report.
"""

from __future__ import annotations

import os

import pytest
from helpers import (
    EIGHT_DEVICES_FLAG,
    EIGHT_DEVICES_XLA_FLAG,
    REDUCTIONS,
    compile_as_users_do,
    rounding_bound,
    run_on_eight_host_devices,
)

if os.environ.get(EIGHT_DEVICES_FLAG) != "1":

    def test_sharded_cases_on_eight_host_devices() -> None:
        run_on_eight_host_devices(__file__)

else:
    import re
    from collections.abc import Callable
    from typing import Any

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxce
    import jaxce.sharded

    if jax.device_count() != 8:
        raise RuntimeError(
            f"these cases need 8 devices, found {jax.device_count()}: set XLA_FLAGS={EIGHT_DEVICES_XLA_FLAG} "
            "before JAX starts."
        )

    BATCH, CLASSES = 16, 40
    MESHES = {"8": (1, 8), "2x4": (2, 4), "4x2": (4, 2)}

    def make_mesh(name: str) -> Mesh:
        """A ("data", "model") mesh; "8" puts all devices on "model"."""
        return Mesh(np.array(jax.devices()).reshape(MESHES[name]), ("data", "model"))

    def integer_inputs(seed: int, case: str) -> dict[str, Any]:
        rng = np.random.default_rng(seed)
        logits = rng.normal(0, 3, (BATCH, CLASSES)).astype(np.float32)
        labels = rng.integers(0, CLASSES, BATCH).astype(np.int32)
        options: dict[str, Any] = {}
        if case in ("weight", "all_options"):
            options["weight"] = rng.uniform(0.1, 2.0, CLASSES).astype(np.float32)
        if case in ("ignore_index", "all_options"):
            labels[[1, 6]] = -100
            options["ignore_index"] = -100
        if case in ("smoothing", "all_options"):
            options["label_smoothing"] = 0.2
        if case in ("z_loss", "all_options"):
            options["z_loss"] = 1e-2
        if case == "where_classes":
            mask = rng.random((BATCH, CLASSES)) < 0.7
            mask[np.arange(BATCH), labels] = True
            mask[3] = False
            options["where"] = mask
            options["label_smoothing"] = 0.1
        if case == "where_examples":
            options["where"] = rng.random(BATCH) < 0.6
        if case == "huge_excluded":
            # A logit of 1e30 in a class `where` excludes, on a shard other than the
            # label's: the shift (pmax over the shards) must not see it, or every
            # exp(x - m) underflows to 0 and the row's loss is inf or NaN.
            mask = np.ones((BATCH, CLASSES), bool)
            huge = (labels + CLASSES // 2) % CLASSES
            logits[np.arange(BATCH), huge] = 1e30
            mask[np.arange(BATCH), huge] = False
            options["where"] = mask
            options["label_smoothing"] = 0.1
            options["z_loss"] = 1e-3
        if case == "extreme_logits":
            logits[0, :] = -1e30
            logits[0, 5] = 1e30
            logits[2, 17] = -np.inf
        if case == "out_of_range":
            labels[[2, 9]] = [CLASSES, -1]
        if case == "all_ignored":
            labels[:] = -100
            options["ignore_index"] = -100
            options["weight"] = rng.uniform(0.1, 2.0, CLASSES).astype(np.float32)
        return {"logits": logits, "labels": labels, "options": options}

    def sharded_integer_loss(
        mesh: Mesh, options: dict[str, Any], vocab_axis: Any, batch_axis: Any
    ) -> Callable[..., tuple[jax.Array, jax.Array, jax.Array]]:
        """(none, sum, mean) of the vocabulary-parallel loss over `mesh`."""
        where = options.get("where")
        per_class_where = where is not None and np.ndim(where) == 2
        weight = options.get("weight")
        rest = {k: v for k, v in options.items() if k not in ("where", "weight")}

        def body(logits, labels, weight, where):
            def loss(reduction: str) -> jax.Array:
                return jaxce.sharded.softmax_cross_entropy_with_integer_labels(
                    logits,
                    labels,
                    axis_name=vocab_axis,
                    weight=weight,
                    where=where,
                    reduction=reduction,
                    batch_axis_name=batch_axis,
                    **rest,
                )

            return loss("none"), loss("sum"), loss("mean")

        where_spec = P(batch_axis, vocab_axis) if per_class_where else P(batch_axis)
        mapped = jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(P(batch_axis, vocab_axis), P(batch_axis), P(), where_spec),
            out_specs=(P(batch_axis), P(), P()),
        )
        return lambda logits, labels: mapped(logits, labels, weight, where)

    def single_device_integer_loss(options: dict[str, Any]) -> Callable[..., Any]:
        def losses(logits, labels):
            return tuple(
                jaxce.softmax_cross_entropy_with_integer_labels(
                    logits, labels, reduction=reduction, **options
                )
                for reduction in REDUCTIONS
            )

        return losses

    def values_and_gradients(losses: Callable[..., Any], logits, labels, cotangent):
        """(none, sum, mean), grad of the mean, grad of <none, cotangent>."""

        def mean(x):
            return losses(x, labels)[2]

        def weighted_none(x):
            return jnp.sum(jnp.where(jnp.isfinite(cotangent), cotangent, 0) * losses(x, labels)[0])

        return jax.jit(
            lambda x: (losses(x, labels), jax.grad(mean)(x), jax.grad(weighted_none)(x))
        )(logits)

    # The sharded and single-device losses add the same float32 terms in other
    # orders: the sum over the classes (split over the shards) and the sum over
    # the batch, each within gamma_n of the exact sum (Higham), relative to the
    # sum of the magnitudes. The values and gradients here are of order 1, so
    # the same bound serves as an absolute floor where entries cancel (p - 1).
    TOLERANCE = rounding_bound(jnp.float32, CLASSES + BATCH)

    def assert_close(actual, expected, what: str) -> None:
        np.testing.assert_allclose(
            np.asarray(actual),
            np.asarray(expected),
            rtol=TOLERANCE,
            atol=TOLERANCE,
            err_msg=what,
        )

    INTEGER_CASES = [
        ("plain", "8"),
        ("weight", "4x2"),
        ("all_options", "2x4"),
        ("where_classes", "2x4"),
        ("where_examples", "4x2"),
        ("huge_excluded", "8"),
        ("huge_excluded", "2x4"),
        ("extreme_logits", "8"),
        ("out_of_range", "2x4"),
        ("all_ignored", "4x2"),
    ]

    @pytest.mark.parametrize(
        ("case", "mesh_name"), INTEGER_CASES, ids=[f"{c}-mesh{m}" for c, m in INTEGER_CASES]
    )
    def test_vocab_parallel_matches_single_device(case: str, mesh_name: str) -> None:
        inputs = integer_inputs(seed=len(case), case=case)
        mesh = make_mesh(mesh_name)
        batch_axis = None if mesh_name == "8" else "data"
        sharded = sharded_integer_loss(mesh, inputs["options"], "model", batch_axis)
        single = single_device_integer_loss(inputs["options"])
        cotangent = np.random.default_rng(1).normal(size=BATCH).astype(np.float32)
        logits, labels = jnp.asarray(inputs["logits"]), jnp.asarray(inputs["labels"])
        expected = values_and_gradients(single, logits, labels, cotangent)
        actual = values_and_gradients(sharded, logits, labels, cotangent)
        for name, a, e in zip(REDUCTIONS, actual[0], expected[0], strict=True):
            assert_close(a, e, f"{case}: reduction={name}")
        assert_close(actual[1], expected[1], f"{case}: grad of the mean")
        assert_close(actual[2], expected[2], f"{case}: grad of the per-example loss")
        if case in ("extreme_logits", "huge_excluded"):
            assert np.all(np.isfinite(actual[0][0])) and np.all(np.isfinite(actual[1]))
        if case == "out_of_range":
            assert np.isnan(np.asarray(actual[0][0])[[2, 9]]).all() and np.isnan(actual[0][2])
        if case == "all_ignored":
            assert float(actual[0][2]) == 0.0 and not np.any(actual[1])

    def test_vocab_over_two_mesh_axes_and_bfloat16() -> None:
        mesh = make_mesh("4x2")
        inputs = integer_inputs(seed=3, case="all_options")
        options = inputs["options"]
        logits = jnp.asarray(inputs["logits"], jnp.bfloat16)
        labels = jnp.asarray(inputs["labels"])
        sharded = sharded_integer_loss(mesh, options, ("data", "model"), None)
        actual = jax.jit(sharded)(logits, labels)
        expected = jax.jit(single_device_integer_loss(options))(logits, labels)
        assert actual[0].dtype == jnp.float32
        for a, e in zip(actual, expected, strict=True):
            assert_close(a, e, "vocab split over ('data', 'model')")

    def test_gradient_taken_inside_shard_map() -> None:
        inputs = integer_inputs(seed=5, case="all_options")
        mesh = make_mesh("2x4")

        def local_gradient(logits, labels, weight):
            def loss(x):
                return jaxce.sharded.softmax_cross_entropy_with_integer_labels(
                    x,
                    labels,
                    axis_name="model",
                    weight=weight,
                    ignore_index=-100,
                    label_smoothing=0.2,
                    z_loss=1e-2,
                    reduction="mean",
                    batch_axis_name="data",
                )

            return jax.grad(loss)(logits)

        gradient = jax.jit(
            jax.shard_map(
                local_gradient,
                mesh=mesh,
                in_specs=(P("data", "model"), P("data"), P()),
                out_specs=P("data", "model"),
            )
        )(inputs["logits"], inputs["labels"], inputs["options"]["weight"])
        expected = jax.jit(
            jax.grad(
                lambda x: jaxce.softmax_cross_entropy_with_integer_labels(
                    x, inputs["labels"], reduction="mean", **inputs["options"]
                )
            )
        )(jnp.asarray(inputs["logits"]))
        assert_close(gradient, expected, "grad inside shard_map")

    LINEAR_CASES = [
        ("plain", "8"),
        ("all_options", "2x4"),
        ("all_options", "4x2"),
        ("shift3", "2x4"),
    ]

    @pytest.mark.parametrize(
        ("case", "mesh_name"), LINEAR_CASES, ids=[f"{c}-mesh{m}" for c, m in LINEAR_CASES]
    )
    def test_linear_vocab_parallel_matches_single_device(case: str, mesh_name: str) -> None:
        rng = np.random.default_rng(7)
        batch, steps, dim = 4, 5, 16
        hidden = rng.normal(size=(batch, steps, dim)).astype(np.float32)
        weight = rng.normal(0, 0.5, (CLASSES, dim)).astype(np.float32)
        bias = rng.normal(size=CLASSES).astype(np.float32)
        labels = rng.integers(0, CLASSES, (batch, steps)).astype(np.int32)
        options: dict[str, Any] = {"reduction": "mean"}
        if case == "all_options":
            labels[0, 3] = -100
            options.update(
                ignore_index=-100, label_smoothing=0.1, z_loss=1e-3, softcap=5.0, shift=1
            )
        if case == "shift3":  # multi-token prediction: position t predicts label t + 3
            options.update(shift=3, reduction="sum")
        mesh = make_mesh(mesh_name)
        batch_axis = None if mesh_name == "8" else "data"

        def sharded(hidden, weight, bias):
            return jax.shard_map(
                lambda h, w, b, y: jaxce.sharded.linear_cross_entropy(
                    h, w, y, axis_name="model", bias_shard=b, batch_axis_name=batch_axis, **options
                ),
                mesh=mesh,
                in_specs=(P(batch_axis), P("model"), P("model"), P(batch_axis)),
                out_specs=P(),
            )(hidden, weight, bias, labels)

        def single(hidden, weight, bias):
            # The reference broadcasts a [V] bias implicitly (a bug under "raise", reported).
            with jax.numpy_rank_promotion("allow"):
                return jaxce.linear_cross_entropy(hidden, weight, labels, bias=bias, **options)

        arguments = (jnp.asarray(hidden), jnp.asarray(weight), jnp.asarray(bias))
        expected = jax.jit(jax.value_and_grad(single, argnums=(0, 1, 2)))(*arguments)
        actual = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2)))(*arguments)
        assert_close(actual[0], expected[0], "loss")
        for name, a, e in zip(("hidden", "weight", "bias"), actual[1], expected[1], strict=True):
            assert_close(a, e, f"grad of {name}")

    def collectives(hlo: str) -> list[tuple[str, int]]:
        """(op, elements of its largest array) for each collective in compiled HLO text."""
        found = []
        for line in hlo.splitlines():
            match = re.search(
                r"= (.*?) (all-gather|all-reduce|all-to-all|collective-permute)", line
            )
            if match:
                sizes = [
                    int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                    for dims in re.findall(r"\[([\d,]*)\]", match.group(1))
                ]
                found.append((match.group(2), max(sizes, default=1)))
        return found

    def test_communication_is_per_row_not_per_class() -> None:
        """The compiled forward and backward pass exchange O(rows) words, no logits."""
        mesh = make_mesh("2x4")
        inputs = integer_inputs(seed=2, case="all_options")
        sharded = sharded_integer_loss(mesh, inputs["options"], "model", "data")
        logits, labels = jnp.asarray(inputs["logits"]), jnp.asarray(inputs["labels"])

        def train_signal(x):
            return jax.value_and_grad(lambda x: sharded(x, labels)[2])(x)

        hlo = compile_as_users_do(jax.jit(train_signal).lower(logits)).as_text()
        found = collectives(hlo)
        assert found, "expected a pmax and a psum in the compiled HLO"
        rows_per_device = BATCH // 2
        assert all(op == "all-reduce" for op, _ in found), found
        # Five per-row sums at most: never a [rows, classes] array, never the weights.
        assert max(size for _, size in found) <= 5 * rows_per_device, found

        # The detector sees a gather: the naive loss on gathered logits fails the check.
        def naive(x):
            return jax.shard_map(
                lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(
                    jax.lax.all_gather(x, "model", axis=1, tiled=True), y
                ),
                mesh=mesh,
                in_specs=(P("data", "model"), P("data")),
                out_specs=P("data"),
                check_vma=False,
            )(x, labels)

        naive_hlo = compile_as_users_do(jax.jit(naive).lower(logits)).as_text()
        assert any(op == "all-gather" for op, _ in collectives(naive_hlo))

    def test_uneven_vocabulary_split_is_a_clear_error() -> None:
        mesh = make_mesh("2x4")
        labels = np.zeros(BATCH, np.int32)
        loss = jax.shard_map(
            lambda x, y: jaxce.sharded.softmax_cross_entropy_with_integer_labels(
                x, y, axis_name="model"
            ),
            mesh=mesh,
            in_specs=(P("data", "model"), P("data")),
            out_specs=P("data"),
        )
        with pytest.raises(ValueError, match=r"'model' \(of size 4\).*4 does not evenly divide 42"):
            loss(np.zeros((BATCH, 42), np.float32), labels)

    def test_weight_of_wrong_length_names_axis_and_sizes() -> None:
        mesh = make_mesh("2x4")
        weighted = jax.shard_map(
            lambda x, y, w: jaxce.sharded.softmax_cross_entropy_with_integer_labels(
                x, y, axis_name="model", weight=w
            ),
            mesh=mesh,
            in_specs=(P("data", "model"), P("data"), P()),
            out_specs=P("data"),
        )
        logits = np.zeros((BATCH, CLASSES), np.float32)
        expected = (
            r"shape \(40,\).*10 classes on each of the 4 devices of mesh axis 'model'.*\(42,\)"
        )
        with pytest.raises(ValueError, match=expected):
            weighted(logits, np.zeros(BATCH, np.int32), np.ones(42, np.float32))

    @pytest.mark.parametrize("softcap", [0.0, -1.0, float("inf")], ids=str)
    def test_linear_softcap_must_be_positive_as_on_one_device(softcap: float) -> None:
        mesh = make_mesh("8")
        loss = jax.shard_map(
            lambda h, w, y: jaxce.sharded.linear_cross_entropy(
                h, w, y, axis_name="model", softcap=softcap
            ),
            mesh=mesh,
            in_specs=(P(), P("model"), P()),
            out_specs=P(),
        )
        hidden, weight = np.zeros((4, 3), np.float32), np.zeros((CLASSES, 3), np.float32)
        with pytest.raises(ValueError, match="`softcap` must be a positive, finite"):
            loss(hidden, weight, np.zeros(4, np.int32))
        with pytest.raises(ValueError, match="`softcap` must be a positive, finite"):
            jaxce.linear_cross_entropy(hidden, weight, np.zeros(4, np.int32), softcap=softcap)

    def test_unbound_axis_name_is_a_clear_error() -> None:
        with pytest.raises(NameError, match=r"inside `jax\.shard_map`"):
            jaxce.sharded.softmax_cross_entropy_with_integer_labels(
                jnp.zeros((2, 3)), jnp.array([0, 1]), axis_name="model"
            )

    def test_uneven_batch_sharding_is_a_clear_error() -> None:
        sharding = NamedSharding(make_mesh("2x4"), P("data", "model"))
        with pytest.raises(ValueError, match=r"(?s)'model'.*4 times.*size is 10"):
            jax.device_put(np.zeros((BATCH, 10), np.float32), sharding)

    # Every public loss (and primitive), its inputs and how each input is sharded:
    # "b" batch rows, "bc" batch x classes, "c" classes, "r" replicated.
    def public_loss_cases() -> list[tuple[str, Callable[..., Any], dict[str, Any], dict[str, str]]]:
        rng = np.random.default_rng(11)
        logits = rng.normal(0, 2, (BATCH, CLASSES)).astype(np.float32)
        probs = rng.uniform(0.01, 0.99, (BATCH, CLASSES)).astype(np.float32)
        binary = (rng.random((BATCH, CLASSES)) < 0.3).astype(np.float32)
        distribution = rng.dirichlet(np.ones(CLASSES), BATCH).astype(np.float32)
        labels = rng.integers(0, CLASSES, BATCH).astype(np.int32)
        labels[[0, 5]] = -100
        class_weight = rng.uniform(0.1, 3.0, CLASSES).astype(np.float32)
        mask = rng.random((BATCH, CLASSES)) < 0.8
        hidden = rng.normal(size=(BATCH, 16)).astype(np.float32)
        embedding = rng.normal(0, 0.3, (CLASSES, 16)).astype(np.float32)
        return [
            ("log_sigmoid", jaxce.log_sigmoid, {"x": logits}, {"x": "bc"}),
            ("log1m_sigmoid", jaxce.log1m_sigmoid, {"x": logits}, {"x": "bc"}),
            (
                "logsumexp",
                jaxce.logsumexp,
                {"x": logits, "where": mask},
                {"x": "bc", "where": "bc"},
            ),
            ("log_softmax", jaxce.log_softmax, {"x": logits}, {"x": "bc"}),
            (
                "sigmoid_binary_cross_entropy",
                jaxce.sigmoid_binary_cross_entropy,
                {"logits": logits, "labels": binary, "pos_weight": class_weight, "where": mask},
                {"logits": "bc", "labels": "bc", "pos_weight": "c", "where": "bc"},
            ),
            (
                "sigmoid_focal_loss",
                jaxce.sigmoid_focal_loss,
                {"logits": logits, "labels": binary, "alpha": 0.25, "where": mask},
                {"logits": "bc", "labels": "bc", "where": "bc"},
            ),
            (
                "softmax_cross_entropy",
                jaxce.softmax_cross_entropy,
                {"logits": logits, "labels": distribution, "weight": class_weight},
                {"logits": "bc", "labels": "bc", "weight": "c"},
            ),
            (
                "softmax_cross_entropy_with_integer_labels",
                jaxce.softmax_cross_entropy_with_integer_labels,
                {
                    "logits": logits,
                    "labels": labels,
                    "weight": class_weight,
                    "ignore_index": -100,
                    "label_smoothing": 0.1,
                    "z_loss": 1e-3,
                    "where": mask | (np.arange(CLASSES) == labels[:, None]),
                },
                {"logits": "bc", "labels": "b", "weight": "c", "where": "bc"},
            ),
            (
                "softmax_focal_loss",
                jaxce.softmax_focal_loss,
                {"logits": logits, "labels": distribution, "alpha": class_weight, "gamma": 1.5},
                {"logits": "bc", "labels": "bc", "alpha": "c"},
            ),
            (
                "poly_loss_cross_entropy",
                jaxce.poly_loss_cross_entropy,
                {"logits": logits, "labels": distribution, "epsilon": -1.0, "where": mask},
                {"logits": "bc", "labels": "bc", "where": "bc"},
            ),
            (
                "kl_divergence",
                jaxce.kl_divergence,
                {"log_predictions": np.log(probs), "targets": distribution, "where": mask},
                {"log_predictions": "bc", "targets": "bc", "where": "bc"},
            ),
            (
                "kl_divergence_with_log_targets",
                jaxce.kl_divergence_with_log_targets,
                {"log_predictions": np.log(probs), "log_targets": np.log(distribution)},
                {"log_predictions": "bc", "log_targets": "bc"},
            ),
            (
                "binary_cross_entropy",
                jaxce.binary_cross_entropy,
                {"probs": probs, "labels": binary, "weight": probs},
                {"probs": "bc", "labels": "bc", "weight": "bc"},
            ),
            (
                "categorical_cross_entropy",
                jaxce.categorical_cross_entropy,
                {
                    "probs": distribution,
                    "labels": distribution[::-1].copy(),
                    "weight": class_weight,
                },
                {"probs": "bc", "labels": "bc", "weight": "c"},
            ),
            (
                "linear_cross_entropy",
                jaxce.linear_cross_entropy,
                {
                    "hidden": hidden,
                    "weight": embedding,
                    "labels": labels,
                    "ignore_index": -100,
                    "label_smoothing": 0.1,
                },
                {"hidden": "b", "weight": "c", "labels": "b"},
            ),
        ]

    PUBLIC_CASES = public_loss_cases()
    ARRAY_LAYOUTS = {"b": ("data",), "bc": ("data", "model"), "c": ("model",), "r": ()}
    REDUCED = {name for name, *_ in PUBLIC_CASES} - {
        "log_sigmoid",
        "log1m_sigmoid",
        "logsumexp",
        "log_softmax",
    }

    @pytest.mark.parametrize("mesh_name", ["8", "2x4", "4x2"], ids=lambda m: f"mesh{m}")
    def test_public_losses_under_jit_with_sharded_inputs(mesh_name: str) -> None:
        """Every public loss, batch-sharded (mesh 8) and batch x class-sharded (2x4, 4x2).

        One `jit` per mesh holds every loss (compiling is the slow part); each
        comparison names its loss. Reductions "none" and "mean" (the mean's
        denominator, weighted or counted, must be global, not per shard).
        """
        if mesh_name == "8":
            mesh = Mesh(np.array(jax.devices()).reshape(8, 1), ("data", "model"))
        else:
            mesh = make_mesh(mesh_name)
        placed = {}
        for name, _, arguments, layouts in PUBLIC_CASES:
            placed[name] = {
                k: jax.device_put(v, NamedSharding(mesh, P(*ARRAY_LAYOUTS[layouts.get(k, "r")])))
                for k, v in arguments.items()
                if isinstance(v, np.ndarray)
            }
            assert any(not x.sharding.is_fully_replicated for x in placed[name].values())

        def evaluate(arrays: dict[str, dict[str, Any]]) -> dict[str, list[jax.Array]]:
            outputs = {}
            for name, fn, arguments, _ in PUBLIC_CASES:
                static = {k: v for k, v in arguments.items() if k not in arrays[name]}
                reductions = ("none", "mean") if name in REDUCED else ("none",)
                outputs[name] = [
                    fn(**arrays[name], **static, **({"reduction": r} if name in REDUCED else {}))
                    for r in reductions
                ]
            return outputs

        with jax.numpy_rank_promotion("allow"):  # the linear reference's bias (reported)
            expected = jax.jit(evaluate)(
                jax.tree.map(lambda x: jax.device_put(x, jax.devices()[0]), placed)
            )
            actual = jax.jit(evaluate)(placed)
        for name in expected:
            for a, e in zip(actual[name], expected[name], strict=True):
                assert_close(a, e, f"{name} on mesh {mesh_name}")
