"""The fused loss on many devices: the vocabulary-parallel chunk loop, and data parallelism.

Like ``tests/test_sharded.py``, the cases need 8 devices: the parent run holds
one test that runs this file again in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``.

The single-device :func:`jaxce.linear_cross_entropy` is the reference here
(``tests/test_linear.py`` compares it with the float64 materialised formula
over every option); the sharded loss runs a different program (per-chunk
``pmax``/``psum`` over the shards, each shard's slice of the classes), so
what can go wrong is the exchange, the class offsets and the reductions over
the shards, which these cases check. Tolerances: both sides accumulate the
same float32 sums in a different order (over shards, then chunks), so values
and gradients agree to a few float32 ulps of the largest term (``rtol=1e-5``,
``atol=1e-6``); bfloat16 inputs give both sides the same bfloat16 products,
with float32 accumulation, so the same tolerances hold.
"""

from __future__ import annotations

import os

import pytest
from helpers import EIGHT_DEVICES_FLAG, run_on_eight_host_devices

if os.environ.get(EIGHT_DEVICES_FLAG) != "1":

    def test_sharded_linear_cases_on_eight_host_devices() -> None:
        run_on_eight_host_devices(__file__)

else:
    import dataclasses
    import re
    from typing import Any

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    import jaxce
    import jaxce.sharded

    if jax.device_count() != 8:
        raise RuntimeError(f"these cases need 8 devices, found {jax.device_count()}")

    RTOL, ATOL = 1e-5, 1e-6
    VOCAB, DIM = 48, 16

    def make_mesh(shape: tuple[int, int]) -> Mesh:
        return Mesh(np.array(jax.devices()).reshape(shape), ("data", "model"))

    def inputs(dtype: Any, batch: int = 4, steps: int = 7) -> dict[str, Any]:
        rng = np.random.default_rng(3)
        labels = rng.integers(0, VOCAB, (batch, steps)).astype(np.int32)
        labels[1, 2] = -100
        return {
            "hidden": jnp.asarray(rng.normal(size=(batch, steps, DIM)), dtype),
            "weight": jnp.asarray(rng.normal(0, 0.5, (VOCAB, DIM)), dtype),
            "bias": jnp.asarray(rng.normal(size=VOCAB), dtype),
            "labels": jnp.asarray(labels),
        }

    def assert_close(actual: Any, expected: Any, what: str) -> None:
        np.testing.assert_allclose(
            np.asarray(actual, np.float64),
            np.asarray(expected, np.float64),
            rtol=RTOL,
            atol=ATOL,
            err_msg=what,
        )

    CASES = {
        # name: (mesh shape, dtype, options)
        "none-all-options-chunked": (
            (2, 4),
            jnp.float32,
            dict(
                reduction="none",
                ignore_index=-100,
                label_smoothing=0.1,
                z_loss=1e-3,
                softcap=4.0,
                shift=1,
                chunk_size=3,
            ),
        ),
        "mean-bfloat16-chunked": ((1, 8), jnp.bfloat16, dict(ignore_index=-100, chunk_size=5)),
        "lm-rl-options-padding-on-the-last-shard": (
            (2, 4),
            jnp.float32,
            dict(
                ignore_index=-100,
                temperature=0.8,
                softcap=3.0,
                token_weights=True,
                vocab_size=VOCAB - 5,
                chunk_size=4,
            ),
        ),
        # Each shard's 12 rows in overlapping blocks of 5 (the per-token
        # backward pass's tiles), padding in the last shard.
        "none-tiles-padding-temperature": (
            (2, 4),
            jnp.float32,
            dict(
                reduction="none",
                ignore_index=-100,
                temperature=0.8,
                softcap=3.0,
                label_smoothing=0.1,
                vocab_size=VOCAB - 5,
                plan=dataclasses.replace(
                    jaxce.plan_linear_cross_entropy(28, DIM, VOCAB // 4, "float32"),
                    chunk_size=3,
                    vocab_block=5,
                ),
            ),
        ),
        "sum-smoothing-z-batch": (
            (4, 2),
            jnp.float32,
            dict(reduction="sum", ignore_index=-100, label_smoothing=0.2, z_loss=1e-2, shift=2),
        ),
    }

    @pytest.mark.parametrize("case", list(CASES))
    def test_values_and_gradients_match_the_single_device_loss(case: str) -> None:
        mesh_shape, dtype, options = CASES[case]
        data = inputs(dtype)
        options = dict(options)
        token_weights = None
        if options.pop("token_weights", False):
            weights = np.random.default_rng(5).uniform(0, 2, data["labels"].shape)
            token_weights = jnp.asarray(weights, jnp.float32)
        if "vocab_size" in options:
            data["labels"] = jnp.minimum(data["labels"], options["vocab_size"] - 1)
        mesh = make_mesh(mesh_shape)
        batch_axis = "data" if mesh_shape[0] > 1 else None
        per_token = options.get("reduction") == "none"
        out_spec = P(batch_axis) if per_token else P()
        rng = np.random.default_rng(0)
        steps = data["labels"].shape[1] - options.get("shift", 0)
        cotangent = jnp.asarray(rng.normal(size=(4, steps)), jnp.float32) if per_token else 1.0

        def sharded(hidden, weight, bias):
            loss = jax.shard_map(
                lambda h, w, b, y, tw: jaxce.sharded.linear_cross_entropy(
                    h,
                    w,
                    y,
                    axis_name="model",
                    bias_shard=b,
                    batch_axis_name=None if per_token else batch_axis,
                    token_weights=tw,
                    **options,
                ),
                mesh=mesh,
                in_specs=(P(batch_axis), P("model"), P("model"), P(batch_axis), P(batch_axis)),
                out_specs=out_spec,
            )(hidden, weight, bias, data["labels"], token_weights)
            return jnp.sum(loss * cotangent), loss

        def single(hidden, weight, bias):
            loss = jaxce.linear_cross_entropy(
                hidden, weight, data["labels"], bias=bias, token_weights=token_weights, **options
            )
            return jnp.sum(loss * cotangent), loss

        arguments = (data["hidden"], data["weight"], data["bias"])
        grad = jax.value_and_grad
        (_, expected), expected_grads = jax.jit(grad(single, (0, 1, 2), has_aux=True))(*arguments)
        (_, actual), actual_grads = jax.jit(grad(sharded, (0, 1, 2), has_aux=True))(*arguments)
        assert_close(actual, expected, "loss")
        assert np.isfinite(np.asarray(expected)).all()
        for name, a, e in zip(
            ("hidden", "weight", "bias"), actual_grads, expected_grads, strict=True
        ):
            assert a.dtype == e.dtype == dtype, name
            assert_close(a, e, f"grad of {name}")
            assert np.abs(np.asarray(e, np.float32)).max() > 0, name

    def test_every_shard_gets_the_same_hidden_gradient_inside_the_body() -> None:
        data = inputs(jnp.float32)
        mesh = make_mesh((1, 8))
        # Padding on the last shard (VOCAB - 5 real classes), a temperature, token weights.
        options = dict(
            label_smoothing=0.1,
            softcap=3.0,
            chunk_size=4,
            vocab_size=VOCAB - 5,
            temperature=0.9,
            token_weights=jnp.linspace(0.2, 1.8, 28).reshape(4, 7),
            ignore_index=-100,
        )
        data["labels"] = jnp.minimum(data["labels"], VOCAB - 6)

        def body(h, w, y):
            def loss(h):
                return jaxce.sharded.linear_cross_entropy(h, w, y, axis_name="model", **options)

            return jax.grad(loss)(h)[None]

        per_shard = jax.jit(
            jax.shard_map(body, mesh=mesh, in_specs=(P(), P("model"), P()), out_specs=P("model"))
        )(data["hidden"], data["weight"], data["labels"])
        expected = jax.grad(
            lambda h: jaxce.linear_cross_entropy(h, data["weight"], data["labels"], **options)
        )(data["hidden"])
        assert per_shard.shape == (8, *data["hidden"].shape)
        for shard in per_shard:
            np.testing.assert_array_equal(np.asarray(shard), np.asarray(per_shard[0]))
        assert_close(per_shard[0], expected, "hidden gradient")

    def test_invalid_label_makes_the_loss_nan_on_every_shard() -> None:
        data = inputs(jnp.float32)
        labels = data["labels"].at[0, 0].set(VOCAB)  # one past the last class
        mesh = make_mesh((2, 4))
        loss = jax.jit(
            jax.shard_map(
                lambda h, w, y: jaxce.sharded.linear_cross_entropy(
                    h, w, y, axis_name="model", batch_axis_name="data", ignore_index=-100
                ),
                mesh=mesh,
                in_specs=(P("data"), P("model"), P("data")),
                out_specs=P(),
            )
        )(data["hidden"], data["weight"], labels)
        assert np.isnan(float(loss))

    def tensor_shapes(module: str) -> list[tuple[int, ...]]:
        """The shapes of the tensors in StableHLO text."""
        return [
            tuple(int(d) for d in dims.rstrip("x").split("x"))
            for dims in re.findall(r"tensor<((?:\d+x)+)[a-z]", module)
        ]

    def test_no_shard_holds_its_slice_of_the_logits() -> None:
        # N = 2048 tokens, V / n = 4096 classes per shard, chunks of 128: the
        # largest tensor is one chunk's logits (or the weight's gradient), a
        # sixteenth of the [N, V / n] slice the materialising version held.
        tokens, shard_vocab, dim, chunk = 2048, 4096, 64, 128
        mesh = make_mesh((1, 8))

        def loss(h, w, y):
            return jax.shard_map(
                lambda h, w, y: jaxce.sharded.linear_cross_entropy(
                    h, w, y, axis_name="model", chunk_size=chunk
                ),
                mesh=mesh,
                in_specs=(P(), P("model"), P()),
                out_specs=P(),
            )(h, w, y)

        shapes = (
            jax.ShapeDtypeStruct((tokens, dim), jnp.float32),
            jax.ShapeDtypeStruct((8 * shard_vocab, dim), jnp.float32),
            jax.ShapeDtypeStruct((tokens,), jnp.int32),
        )
        module = jax.jit(jax.value_and_grad(loss, (0, 1))).trace(*shapes).lower().as_text()
        shapes_seen = tensor_shapes(module)
        # Besides [*, D] arrays (hidden, weight and their gradients):
        others = [int(np.prod(shape)) for shape in shapes_seen if shape[-1] != dim]
        assert (chunk, shard_vocab) in shapes_seen  # the chunk's logits
        assert max(others) == chunk * shard_vocab < tokens * shard_vocab // 8

    def test_the_single_device_loss_runs_data_parallel_inside_shard_map() -> None:
        # Tokens split over "data": the loop's carries vary per device.
        data = inputs(jnp.float32, batch=8)
        mesh = make_mesh((8, 1))

        def sharded(h, w):
            return jax.shard_map(
                lambda h, w, y: jax.lax.psum(
                    jaxce.linear_cross_entropy(h, w, y, reduction="sum", ignore_index=-100),
                    "data",
                ),
                mesh=mesh,
                in_specs=(P("data"), P(), P("data")),
                out_specs=P(),
            )(h, w, data["labels"])

        def single(h, w):
            return jaxce.linear_cross_entropy(
                h, w, data["labels"], reduction="sum", ignore_index=-100
            )

        arguments = (data["hidden"], data["weight"])
        expected = jax.value_and_grad(single, (0, 1))(*arguments)
        actual = jax.jit(jax.value_and_grad(sharded, (0, 1)))(*arguments)
        assert_close(actual[0], expected[0], "loss")
        for a, e in zip(actual[1], expected[1], strict=True):
            assert_close(a, e, "gradient")

    @pytest.mark.parametrize("reduction", ["mean", "none"])
    @pytest.mark.parametrize("vocabulary_parallel", [False, True], ids=["plain", "sharded"])
    def test_return_aux_under_grad_inside_a_batch_sharded_shard_map(
        reduction: str, vocabulary_parallel: bool
    ) -> None:
        """`jax.grad` of a loss called with `return_aux=True` in the body of a `shard_map` that
        splits the tokens: the aux's zero tangents vary over the batch axis as the aux does."""
        data = inputs(jnp.float32, batch=8)
        mesh = make_mesh((2, 4) if vocabulary_parallel else (8, 1))

        def body(h, w, y):
            def loss(h, w):
                if vocabulary_parallel:
                    value, aux = jaxce.sharded.linear_cross_entropy(
                        h, w, y, axis_name="model", batch_axis_name="data",
                        reduction=reduction, ignore_index=-100, return_aux=True,
                    )  # fmt: skip
                else:
                    value, aux = jaxce.linear_cross_entropy(
                        h, w, y, reduction=reduction, ignore_index=-100, return_aux=True
                    )
                return jnp.sum(value), aux

            grads, aux = jax.grad(loss, (0, 1), has_aux=True)(h, w)
            return grads[0], aux.argmax

        weight_spec = P("model", None) if vocabulary_parallel else P()
        d_hidden, argmax = jax.jit(
            jax.shard_map(
                body,
                mesh=mesh,
                in_specs=(P("data"), weight_spec, P("data")),
                out_specs=(P("data"), P("data")),
                check_vma=True,
            )
        )(data["hidden"], data["weight"], data["labels"])
        logits = jnp.einsum("btd,vd->btv", data["hidden"], data["weight"])
        np.testing.assert_array_equal(argmax, jnp.argmax(logits, axis=-1))
        assert np.all(np.isfinite(np.asarray(d_hidden)))

    def test_aux_is_that_of_one_device_on_every_shard() -> None:
        data = inputs(jnp.float32)
        mesh = make_mesh((1, 8))
        options = dict(temperature=1.5, softcap=3.0, vocab_size=VOCAB - 5, chunk_size=4, shift=1)
        labels = jnp.minimum(data["labels"], VOCAB - 6)

        def body(h, w, y):
            _, aux = jaxce.sharded.linear_cross_entropy(
                h, w, y, axis_name="model", return_aux=True, **options
            )
            return jax.tree_util.tree_map(lambda a: a[None], aux)

        per_shard = jax.jit(
            jax.shard_map(body, mesh=mesh, in_specs=(P(), P("model"), P()), out_specs=P("model"))
        )(data["hidden"], data["weight"], labels)
        _, expected = jaxce.linear_cross_entropy(
            data["hidden"], data["weight"], labels, return_aux=True, **options
        )
        for name, values, want in zip(expected._fields, per_shard, expected, strict=True):
            for shard in values:
                np.testing.assert_array_equal(np.asarray(shard), np.asarray(values[0]))
            if name == "argmax":
                np.testing.assert_array_equal(values[0], want)
                assert np.all(np.asarray(want) < VOCAB - 5)
            else:
                assert_close(values[0], want, name)

    @pytest.mark.parametrize("chunk_size", [3, 7], ids=["chunk3", "chunk7"])
    def test_aux_argmax_tied_across_shards_is_the_lowest_index(chunk_size: int) -> None:
        """The largest logit tied between two shards' classes: every shard reports the
        single-device argmax, the lowest index (as ``jnp.argmax``), not its own."""
        rng = np.random.default_rng(11)
        tokens = 6
        hidden = jnp.asarray(np.abs(rng.normal(size=(tokens, DIM))) + 0.1, jnp.float32)
        weight = rng.normal(0, 0.1, (VOCAB, DIM)).astype(np.float32)
        # 6 classes per shard: 7 (shard 1), 31 (shard 5) and 44 (shard 7) share the largest
        # logit; 13 and 14 (shard 2) tie below them.
        weight[[7, 31, 44]] = 1.0
        weight[[13, 14]] = 0.9
        weight = jnp.asarray(weight)
        labels = jnp.asarray(rng.integers(0, VOCAB, tokens))
        mesh = make_mesh((1, 8))

        def body(h, w, y):
            _, aux = jaxce.sharded.linear_cross_entropy(
                h, w, y, axis_name="model", return_aux=True, chunk_size=chunk_size
            )
            return aux.argmax[None]

        per_shard = jax.jit(
            jax.shard_map(body, mesh=mesh, in_specs=(P(), P("model"), P()), out_specs=P("model"))
        )(hidden, weight, labels)
        _, single = jaxce.linear_cross_entropy(
            hidden, weight, labels, return_aux=True, chunk_size=chunk_size
        )
        materialised = np.argmax(np.asarray(hidden) @ np.asarray(weight).T, axis=-1)
        np.testing.assert_array_equal(materialised, np.full(tokens, 7))
        np.testing.assert_array_equal(np.asarray(single.argmax), materialised)
        for shard in np.asarray(per_shard):
            np.testing.assert_array_equal(shard, materialised)
