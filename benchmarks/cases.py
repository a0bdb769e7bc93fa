"""The benchmark cases: inputs, and each competitor as a function of those inputs.

A case builds its competitors lazily (inputs are allocated only when the case
runs). Every JAX competitor of a `value_and_grad` case returns the mean loss
and its gradient with respect to the logits; every forward case returns the
mean loss. The floor of a softmax case is what any cross-entropy value and
gradient must at least do: one exp-and-reduce pass over the logits (the
log-sum-exp) and one exp-and-write pass (the gradient). The floor of an
elementwise (binary) case is one read-exp-write pass.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import Prepared, prepare_jax

Competitors = dict[str, Callable[[], Prepared]]

# Classifiers (10 to 1,000 classes: most cross-entropy in the world), then vocabularies.
SOFTMAX_SHAPES = ((8192, 10), (4096, 100), (1024, 1000), (256, 32000), (1024, 32000), (256, 128000))
BINARY_SHAPE = (4096, 4096)  # 16M elements
OPTIONS_SHAPE = (1024, 32000)
IGNORE_INDEX = -100


@dataclasses.dataclass
class Case:
    """One benchmark: a name, what it measures, and its competitors."""

    name: str
    description: str
    competitors: Callable[[], Competitors]
    baseline: str | None = "optax"
    floor: str | None = "floor"
    quick: bool = False


# ---------------------------------------------------------------- inputs


def softmax_inputs(
    shape: tuple[int, int], dtype: Any = np.float32, seed: int = 0
) -> tuple[Any, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = (3 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
    labels = rng.integers(0, shape[1], size=shape[0], dtype=np.int32)
    return jnp.asarray(logits), labels


def soft_labels(shape: tuple[int, int], seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal(shape, dtype=np.float32)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (scores / scores.sum(axis=-1, keepdims=True)).astype(np.float32)


def binary_inputs(shape: tuple[int, int], seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = 3 * rng.standard_normal(shape, dtype=np.float32)
    labels = (rng.random(shape, dtype=np.float32) < 0.3).astype(np.float32)
    return logits, labels


def option_inputs(num_classes: int, labels: np.ndarray, seed: int = 3) -> tuple[Any, np.ndarray]:
    """Class weights in [0.5, 1.5] and labels with 5% set to `IGNORE_INDEX`."""
    rng = np.random.default_rng(seed)
    weight = rng.uniform(0.5, 1.5, size=num_classes).astype(np.float32)
    labels = np.where(rng.random(labels.shape) < 0.05, IGNORE_INDEX, labels).astype(np.int32)
    return weight, labels


# ---------------------------------------------------------------- reference formulations


def softmax_floor(x: jax.Array) -> jax.Array:
    """One exp-and-reduce pass (log-sum-exp) and one exp-and-write pass (softmax)."""
    x = x.astype(jnp.float32)
    log_normalizer = jnp.log(jnp.sum(jnp.exp(x), axis=-1, keepdims=True))
    return jnp.exp(x - log_normalizer)


def softmax_floor_forward(x: jax.Array) -> jax.Array:
    """The exp-and-reduce pass alone: what any forward cross-entropy must do."""
    return jnp.log(jnp.sum(jnp.exp(x.astype(jnp.float32)), axis=-1))


def elementwise_floor(x: jax.Array, y: jax.Array) -> jax.Array:
    """One read-exp-write pass over the logits and labels."""
    return jnp.exp(x) - y


def naive_integer_ce(x: jax.Array, y: jax.Array) -> jax.Array:
    log_probs = x - jax.nn.logsumexp(x, axis=-1, keepdims=True)
    return -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=-1))


def naive_integer_ce_options(
    x: jax.Array, y: jax.Array, weight: jax.Array, smoothing: float
) -> jax.Array:
    """PyTorch's weighted, smoothed, ignore-index mean in plain jnp."""
    log_probs = x - jax.nn.logsumexp(x, axis=-1, keepdims=True)
    counted = y != IGNORE_INDEX
    safe = jnp.where(counted, y, 0)
    label_weight = jnp.where(counted, weight[safe], 0)
    nll = -jnp.take_along_axis(log_probs, safe[:, None], axis=-1)[:, 0]
    smooth = -jnp.sum(weight[None, :] * log_probs, axis=-1) / x.shape[-1]
    per_example = (1 - smoothing) * label_weight * nll + smoothing * jnp.where(counted, smooth, 0)
    return jnp.sum(per_example) / jnp.sum(label_weight)


def naive_soft_ce(x: jax.Array, t: jax.Array) -> jax.Array:
    log_probs = x - jax.nn.logsumexp(x, axis=-1, keepdims=True)
    return -jnp.mean(jnp.sum(t * log_probs, axis=-1))


def naive_binary_ce(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.maximum(x, 0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x))))


def value_and_grad_of(loss: Callable[..., jax.Array]) -> Callable[..., Any]:
    return jax.value_and_grad(loss)


# ---------------------------------------------------------------- torch


def torch_runner(build: Callable[[Any], Callable[[], Any]]) -> Callable[[], Prepared]:
    """A PyTorch competitor, using every CPU; `build(torch)` returns the call to time."""

    def prepare() -> Prepared:
        # PyTorch's OpenMP threads spin for a while after each call by default,
        # and the competitor timed next (in the same round) pays for it: the
        # forward pass of two identical XLA programs at 256 x 32000 measured
        # 3.5-12.6 ms beside spinning threads, 3.4-5.6 ms with them asleep.
        # Read when OpenMP starts, so set before torch is first imported.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        return Prepared(build(torch))

    return prepare


def torch_value_and_grad(
    loss: Callable[..., Any], x: Any, *others: Any, dtype: str = "float32"
) -> Callable[[], Prepared]:
    """Forward + backward of `loss(logits, *others)`; the gradient is reset each call."""

    def build(torch: Any) -> Callable[[], Any]:
        logits = torch.tensor(np.asarray(x, np.float32), dtype=getattr(torch, dtype))
        logits.requires_grad_(True)
        tensors = [torch.from_numpy(np.array(o)) for o in others]

        def run() -> Any:
            logits.grad = None
            value = loss(torch, logits, *tensors)
            value.backward()
            return value.item(), logits.grad

        return run

    return torch_runner(build)


def torch_forward(loss: Callable[..., Any], x: Any, *others: Any) -> Callable[[], Prepared]:
    def build(torch: Any) -> Callable[[], Any]:
        logits = torch.from_numpy(np.array(x, np.float32))
        tensors = [torch.from_numpy(np.array(o)) for o in others]

        def run() -> Any:
            with torch.no_grad():
                return loss(torch, logits, *tensors).item()

        return run

    return torch_runner(build)


def torch_ce(torch: Any, x: Any, y: Any, **kwargs: Any) -> Any:
    return torch.nn.functional.cross_entropy(x, y.long(), **kwargs)


# ---------------------------------------------------------------- cases


def jax_competitor(fn: Callable[..., Any], *args: Any) -> Callable[[], Prepared]:
    return lambda: prepare_jax(fn, args)


def optional_module(name: str) -> Any:
    """The module, or None when it is not importable (a competitor still being written)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def integer_ce_case(shape: tuple[int, int], *, forward: bool, quick: bool) -> Case:
    import optax

    import jaxce

    mode = "fwd" if forward else "vg"

    def competitors() -> Competitors:
        x, y = softmax_inputs(shape)

        def jaxce_loss(x: jax.Array, y: jax.Array) -> jax.Array:
            return jaxce.softmax_cross_entropy_with_integer_labels(x, y, reduction="mean")

        def optax_loss(x: jax.Array, y: jax.Array) -> jax.Array:
            return optax.losses.softmax_cross_entropy_with_integer_labels(x, y).mean()

        if forward:
            return {
                "jaxce": jax_competitor(jaxce_loss, x, y),
                "optax": jax_competitor(optax_loss, x, y),
                "naive jnp": jax_competitor(naive_integer_ce, x, y),
                "torch": torch_forward(torch_ce, x, y),
                "floor": jax_competitor(softmax_floor_forward, x),
            }
        return {
            "jaxce": jax_competitor(value_and_grad_of(jaxce_loss), x, y),
            "optax": jax_competitor(value_and_grad_of(optax_loss), x, y),
            "naive jnp": jax_competitor(value_and_grad_of(naive_integer_ce), x, y),
            "torch": torch_value_and_grad(torch_ce, x, y),
            "floor": jax_competitor(softmax_floor, x),
        }

    what = "forward (mean loss)" if forward else "value_and_grad (mean loss)"
    return Case(
        f"ce_int/{mode}/{shape[0]}x{shape[1]}",
        f"integer-label softmax CE, {what}, N={shape[0]}, V={shape[1]}, float32",
        competitors,
        quick=quick,
    )


def integer_ce_options_case(shape: tuple[int, int]) -> Case:
    import jaxce

    smoothing = 0.1

    def competitors() -> Competitors:
        x, y = softmax_inputs(shape)
        weight, y_ignored = option_inputs(shape[1], y)

        def plain(x: jax.Array, y: jax.Array) -> jax.Array:
            return jaxce.softmax_cross_entropy_with_integer_labels(x, y, reduction="mean")

        def options(x: jax.Array, y: jax.Array, w: jax.Array) -> jax.Array:
            return jaxce.softmax_cross_entropy_with_integer_labels(
                x,
                y,
                weight=w,
                ignore_index=IGNORE_INDEX,
                label_smoothing=smoothing,
                reduction="mean",
            )

        def naive(x: jax.Array, y: jax.Array, w: jax.Array) -> jax.Array:
            return naive_integer_ce_options(x, y, w, smoothing)

        def torch_options(torch: Any, x: Any, y: Any, w: Any) -> Any:
            return torch_ce(
                torch, x, y, weight=w, ignore_index=IGNORE_INDEX, label_smoothing=smoothing
            )

        return {
            "jaxce plain": jax_competitor(value_and_grad_of(plain), x, y),
            "jaxce options": jax_competitor(value_and_grad_of(options), x, y_ignored, weight),
            "naive jnp options": jax_competitor(value_and_grad_of(naive), x, y_ignored, weight),
            "torch options": torch_value_and_grad(torch_options, x, y_ignored, weight),
            "floor": jax_competitor(softmax_floor, x),
        }

    return Case(
        f"ce_int_options/vg/{shape[0]}x{shape[1]}",
        "integer-label CE value_and_grad with class weights, ignore_index (5% ignored) and "
        f"label_smoothing={smoothing}, against jaxce without options",
        competitors,
        baseline="jaxce plain",
        quick=True,
    )


def integer_ce_bfloat16_case(shape: tuple[int, int]) -> Case:
    import optax

    import jaxce

    def competitors() -> Competitors:
        x, y = softmax_inputs(shape, dtype=jnp.bfloat16)

        def jaxce_loss(x: jax.Array, y: jax.Array) -> jax.Array:
            return jaxce.softmax_cross_entropy_with_integer_labels(x, y, reduction="mean")

        def optax_loss(x: jax.Array, y: jax.Array) -> jax.Array:
            return optax.losses.softmax_cross_entropy_with_integer_labels(x, y).mean()

        def optax_float32(x: jax.Array, y: jax.Array) -> jax.Array:
            return optax_loss(x.astype(jnp.float32), y)

        def torch_bf16(torch: Any, x: Any, y: Any) -> Any:
            return torch_ce(torch, x, y)

        return {
            "jaxce": jax_competitor(value_and_grad_of(jaxce_loss), x, y),
            "optax": jax_competitor(value_and_grad_of(optax_loss), x, y),
            "optax on float32": jax_competitor(value_and_grad_of(optax_float32), x, y),
            "torch": torch_value_and_grad(torch_bf16, x, y, dtype="bfloat16"),
            "floor": jax_competitor(softmax_floor, x),
        }

    return Case(
        f"ce_int_bf16/vg/{shape[0]}x{shape[1]}",
        "integer-label CE value_and_grad on bfloat16 logits (optax computes in bfloat16; "
        "jaxce in float32)",
        competitors,
    )


def soft_ce_case(shape: tuple[int, int]) -> Case:
    import optax

    import jaxce

    def competitors() -> Competitors:
        x, _ = softmax_inputs(shape)
        t = soft_labels(shape)

        def jaxce_loss(x: jax.Array, t: jax.Array) -> jax.Array:
            return jaxce.softmax_cross_entropy(x, t, reduction="mean")

        def optax_loss(x: jax.Array, t: jax.Array) -> jax.Array:
            return optax.losses.softmax_cross_entropy(x, t).mean()

        def torch_soft(torch: Any, x: Any, t: Any) -> Any:
            return torch.nn.functional.cross_entropy(x, t)

        return {
            "jaxce": jax_competitor(value_and_grad_of(jaxce_loss), x, t),
            "optax": jax_competitor(value_and_grad_of(optax_loss), x, t),
            "naive jnp": jax_competitor(value_and_grad_of(naive_soft_ce), x, t),
            "torch": torch_value_and_grad(torch_soft, x, t),
            "floor": jax_competitor(softmax_floor, x),
        }

    return Case(
        f"ce_soft/vg/{shape[0]}x{shape[1]}",
        "soft-label (probability targets) softmax CE value_and_grad, float32",
        competitors,
    )


def binary_case(shape: tuple[int, int], *, options: bool) -> Case:
    import optax

    import jaxce

    smoothing = 0.1

    def competitors() -> Competitors:
        x, y = binary_inputs(shape)

        def jaxce_loss(x: jax.Array, y: jax.Array) -> jax.Array:
            return jaxce.sigmoid_binary_cross_entropy(x, y, reduction="mean")

        def optax_loss(x: jax.Array, y: jax.Array) -> jax.Array:
            return optax.losses.sigmoid_binary_cross_entropy(x, y).mean()

        def torch_bce(torch: Any, x: Any, y: Any, *weights: Any) -> Any:
            if not weights:
                return torch.nn.functional.binary_cross_entropy_with_logits(x, y)
            weight, pos_weight = weights
            y = y * (1 - smoothing) + 0.5 * smoothing
            return torch.nn.functional.binary_cross_entropy_with_logits(
                x, y, weight=weight, pos_weight=pos_weight
            )

        if not options:
            return {
                "jaxce": jax_competitor(value_and_grad_of(jaxce_loss), x, y),
                "optax": jax_competitor(value_and_grad_of(optax_loss), x, y),
                "naive jnp": jax_competitor(value_and_grad_of(naive_binary_ce), x, y),
                "torch": torch_value_and_grad(torch_bce, x, y),
                "floor": jax_competitor(elementwise_floor, x, y),
            }
        rng = np.random.default_rng(4)
        weight = rng.uniform(0.5, 1.5, size=shape[-1]).astype(np.float32)
        pos_weight = rng.uniform(1.0, 3.0, size=shape[-1]).astype(np.float32)

        def options_loss(x: jax.Array, y: jax.Array, w: jax.Array, p: jax.Array) -> jax.Array:
            return jaxce.sigmoid_binary_cross_entropy(
                x, y, weight=w, pos_weight=p, label_smoothing=smoothing, reduction="mean"
            )

        return {
            "jaxce plain": jax_competitor(value_and_grad_of(jaxce_loss), x, y),
            "jaxce options": jax_competitor(
                value_and_grad_of(options_loss), x, y, weight, pos_weight
            ),
            "optax": jax_competitor(value_and_grad_of(optax_loss), x, y),
            "torch options": torch_value_and_grad(torch_bce, x, y, weight, pos_weight),
            "floor": jax_competitor(elementwise_floor, x, y),
        }

    size = shape[0] * shape[1]
    if options:
        return Case(
            f"bce_options/vg/{size // 2**20}M",
            "sigmoid binary CE value_and_grad with per-class weight, pos_weight and "
            f"label_smoothing={smoothing}, against jaxce without options",
            competitors,
            baseline="jaxce plain",
        )
    return Case(
        f"bce/vg/{size // 2**20}M",
        f"sigmoid binary CE value_and_grad over {size // 2**20}M float32 elements",
        competitors,
        quick=True,
    )


def derivatives_case(shape: tuple[int, int]) -> Case | None:
    """The closed-form gradients of `jaxce.derivatives`, when that module exists."""
    import optax

    import jaxce

    derivatives = optional_module("jaxce.derivatives")
    closed_form = getattr(derivatives, "softmax_cross_entropy_with_integer_labels", None)
    if closed_form is None:
        return None

    def competitors() -> Competitors:
        x, y = softmax_inputs(shape)

        def jaxce_grad(x: jax.Array, y: jax.Array) -> jax.Array:
            loss = jaxce.softmax_cross_entropy_with_integer_labels
            return jax.grad(lambda x: loss(x, y, reduction="mean"))(x)

        def optax_grad(x: jax.Array, y: jax.Array) -> jax.Array:
            loss = optax.losses.softmax_cross_entropy_with_integer_labels
            return jax.grad(lambda x: loss(x, y).mean())(x)

        def derivative(x: jax.Array, y: jax.Array) -> jax.Array:
            return closed_form(x, y, reduction="mean")

        return {
            "jaxce.derivatives": jax_competitor(derivative, x, y),
            "jax.grad(jaxce)": jax_competitor(jaxce_grad, x, y),
            "optax": jax_competitor(optax_grad, x, y),
            "floor": jax_competitor(softmax_floor, x),
        }

    return Case(
        f"derivatives/ce_int/{shape[0]}x{shape[1]}",
        "closed-form gradient `jaxce.derivatives.softmax_cross_entropy_with_integer_labels` "
        "against jax.grad",
        competitors,
    )


def all_cases() -> list[Case]:
    """Every case, in report order; `Case.quick` marks the `--quick` subset."""
    cases = [integer_ce_case(s, forward=False, quick=True) for s in SOFTMAX_SHAPES]
    cases += [integer_ce_case(s, forward=True, quick=s == OPTIONS_SHAPE) for s in SOFTMAX_SHAPES]
    cases += [
        integer_ce_options_case(OPTIONS_SHAPE),
        integer_ce_bfloat16_case(OPTIONS_SHAPE),
        soft_ce_case(OPTIONS_SHAPE),
        binary_case(BINARY_SHAPE, options=False),
        binary_case(BINARY_SHAPE, options=True),
    ]
    derivatives = derivatives_case(OPTIONS_SHAPE)
    if derivatives is not None:
        cases.append(derivatives)
    return cases
