"""jaxce losses in Flax NNX models (``python -m examples.flax_nnx``; a section of ``make demo``).

1. An MLP classifier of ``nnx.Linear`` layers trained on scikit-learn's bundled ``digits`` with
   ``jaxce.softmax_cross_entropy_with_integer_labels``, under ``nnx.jit``, with an optax
   optimizer held by ``nnx.Optimizer``.
2. A tiny language model trained through ``jaxce.linear_cross_entropy``, which never forms the
   logits. Its output layer is either the input embedding (tied: the ``[V, D]`` table of an
   ``nnx.Embed`` is the weight ``linear_cross_entropy`` takes) or an ``nnx.Linear(D, V)``
   head, whose ``[D, V]`` kernel is passed transposed. At the first step the fused loss equals
   the loss of the materialised logits (``hidden @ weight.T`` and optax).

Flax 0.11 or later: ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and
``optimizer.update(model, grads)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.typing import ArrayLike

import jaxce
from examples import training

# The relative difference allowed between the fused and the materialised loss (float32).
FUSED_RTOL = 1e-5
# Held-out accuracy the classifier must reach on digits.
ACCURACY_TARGET = 0.95
# The language model's loss must fall below this fraction of log V (where it starts).
LOSS_DROP_FRACTION = 0.5


class Classifier(nnx.Module):
    """A ReLU MLP: ``features -> hidden -> classes`` logits."""

    def __init__(self, features: int, hidden: int, classes: int, *, rngs: nnx.Rngs) -> None:
        self.hidden = nnx.Linear(features, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(nnx.relu(self.hidden(x)))


@nnx.jit
def classifier_step(
    model: Classifier, optimizer: nnx.Optimizer, x: ArrayLike, labels: ArrayLike
) -> jax.Array:
    """One Adam step on the mean loss of a batch; updates ``model`` in place."""

    def loss_fn(model: Classifier) -> jax.Array:
        return jaxce.softmax_cross_entropy_with_integer_labels(
            model(jnp.asarray(x)), labels, label_smoothing=0.1, reduction="mean"
        )

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


@dataclasses.dataclass(frozen=True)
class ClassifierRun:
    """The mean training loss of each epoch and the held-out accuracy after the last."""

    epoch_losses: tuple[float, ...]
    test_accuracy: float


def train_classifier(
    data: training.Dataset,
    *,
    hidden: int = 64,
    epochs: int = 8,
    batch_size: int = 128,
    learning_rate: float = 1e-2,
    seed: int = 0,
) -> ClassifierRun:
    """Trains a :class:`Classifier` on ``data`` (integer labels), dropping each epoch's last
    partial batch."""
    model = Classifier(data.x_train.shape[1], hidden, data.num_classes, rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)
    rng = np.random.default_rng(seed)
    epoch_losses = []
    for _ in range(epochs):
        steps = len(data.y_train) // batch_size
        batches = rng.permutation(len(data.y_train))[: steps * batch_size].reshape(steps, -1)
        losses = [
            classifier_step(model, optimizer, data.x_train[batch], data.y_train[batch])
            for batch in batches
        ]
        epoch_losses.append(float(np.mean(jax.device_get(losses))))
    predicted = np.asarray(jnp.argmax(model(jnp.asarray(data.x_test)), axis=-1))
    return ClassifierRun(tuple(epoch_losses), float(np.mean(predicted == data.y_test)))


class TinyLanguageModel(nnx.Module):
    """Token embedding, one residual MLP layer, and an output layer over the vocabulary.

    ``tied=True`` reads the output with the input embedding (``nnx.Embed``), ``tied=False``
    with an ``nnx.Linear(dim, vocab)`` head without bias.
    """

    def __init__(self, vocab: int, dim: int, *, tied: bool, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.mix = nnx.Linear(dim, dim, rngs=rngs)
        self.head = None if tied else nnx.Linear(dim, vocab, use_bias=False, rngs=rngs)

    def hidden(self, tokens: jax.Array) -> jax.Array:
        """``[..., T]`` tokens -> ``[..., T, D]`` hidden states."""
        x = self.embed(tokens)
        return x + nnx.gelu(self.mix(x))

    def output_weight(self) -> jax.Array:
        """The ``[V, D]`` weight of ``linear_cross_entropy``: logits are ``hidden @ weight.T``."""
        if self.head is None:
            return self.embed.embedding[...]
        return self.head.kernel[...].T  # nnx.Linear's kernel is [D, V]


def fused_loss(model: TinyLanguageModel, tokens: jax.Array) -> jax.Array:
    """Mean next-token loss through ``jaxce.linear_cross_entropy(shift=1)``: no logits held."""
    return jaxce.linear_cross_entropy(model.hidden(tokens), model.output_weight(), tokens, shift=1)


def materialised_loss(model: TinyLanguageModel, tokens: jax.Array) -> jax.Array:
    """The same loss from the ``[..., T - 1, V]`` logits, with optax."""
    logits = model.hidden(tokens)[..., :-1, :] @ model.output_weight().T
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[..., 1:]).mean()


@nnx.jit
def language_model_step(
    model: TinyLanguageModel, optimizer: nnx.Optimizer, tokens: jax.Array
) -> jax.Array:
    """One Adam step on the fused loss; updates ``model`` in place."""
    loss, grads = nnx.value_and_grad(fused_loss)(model, tokens)
    optimizer.update(model, grads)
    return loss


def markov_tokens(
    vocab: int, sequences: int, length: int, *, successors: int = 2, seed: int = 0
) -> np.ndarray:
    """``[sequences, length]`` int32 tokens: each token is followed by one of its own
    ``successors`` tokens (drawn once per token), uniformly, so the best next-token loss is
    about ``log(successors)`` where a model that has learnt nothing pays ``log(vocab)``."""
    rng = np.random.default_rng(seed)
    table = rng.integers(0, vocab, (vocab, successors))
    tokens = np.empty((sequences, length), np.int32)
    tokens[:, 0] = rng.integers(0, vocab, sequences)
    for t in range(1, length):
        tokens[:, t] = table[tokens[:, t - 1], rng.integers(0, successors, sequences)]
    return tokens


@dataclasses.dataclass(frozen=True)
class LanguageModelRun:
    """The fused loss before each step (``losses[0]``: the untrained model's), and the
    materialised loss of the untrained model."""

    tied: bool
    vocab: int
    losses: tuple[float, ...]
    first_materialised: float


def train_language_model(
    *,
    tied: bool,
    vocab: int = 64,
    dim: int = 32,
    sequences: int = 32,
    length: int = 33,
    steps: int = 40,
    learning_rate: float = 3e-2,
    seed: int = 0,
) -> LanguageModelRun:
    """Trains a :class:`TinyLanguageModel` on :func:`markov_tokens`, the whole batch each step."""
    model = TinyLanguageModel(vocab, dim, tied=tied, rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)
    tokens = jnp.asarray(markov_tokens(vocab, sequences, length, seed=seed))
    first_materialised = float(materialised_loss(model, tokens))
    losses = [language_model_step(model, optimizer, tokens) for _ in range(steps)]
    return LanguageModelRun(
        tied, vocab, tuple(float(loss) for loss in jax.device_get(losses)), first_materialised
    )


@dataclasses.dataclass(frozen=True)
class Report:
    classifier: ClassifierRun
    language_models: tuple[LanguageModelRun, ...]


def run() -> Report:
    """The classifier on digits, then the language model with a tied and an untied head."""
    classifier = train_classifier(training.load("digits"))
    language_models = tuple(train_language_model(tied=tied) for tied in (True, False))
    return Report(classifier, language_models)


def _head(run: LanguageModelRun) -> str:
    return "tied nnx.Embed" if run.tied else "nnx.Linear head"


def describe(report: Report) -> list[str]:
    """The runs, as lines to print."""
    losses = report.classifier.epoch_losses
    lines = [
        f"MLP of nnx.Linear layers on digits (nnx.Optimizer(optax.adam), nnx.jit): "
        f"epoch loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} epochs, "
        f"held-out accuracy {report.classifier.test_accuracy:.4f}"
    ]
    for run in report.language_models:
        lines.append(
            f"language model, {_head(run)}, through linear_cross_entropy(shift=1): "
            f"loss {run.losses[0]:.3f} -> {run.losses[-1]:.3f} in {len(run.losses)} steps "
            f"(log V = {np.log(run.vocab):.3f})"
        )
    return lines


def claims(report: Report) -> list[tuple[bool, str]]:
    """What the runs must show, as (holds, claim) pairs."""
    classifier = report.classifier
    result = [
        (
            classifier.epoch_losses[-1] < classifier.epoch_losses[0],
            f"MLP: the epoch loss falls ({classifier.epoch_losses[0]:.3f} -> "
            f"{classifier.epoch_losses[-1]:.3f})",
        ),
        (
            classifier.test_accuracy >= ACCURACY_TARGET,
            f"MLP: held-out accuracy {classifier.test_accuracy:.4f} >= {ACCURACY_TARGET}",
        ),
    ]
    for run in report.language_models:
        first = run.losses[0]
        difference = abs(first - run.first_materialised) / abs(run.first_materialised)
        target = LOSS_DROP_FRACTION * float(np.log(run.vocab))
        result += [
            (
                difference <= FUSED_RTOL,
                f"{_head(run)}: fused loss {first:.6f} equals the materialised "
                f"{run.first_materialised:.6f} at the start (relative {difference:.1e} "
                f"<= {FUSED_RTOL:g})",
            ),
            (
                run.losses[-1] < target,
                f"{_head(run)}: loss falls from {run.losses[0]:.3f} to {run.losses[-1]:.3f} "
                f"< {LOSS_DROP_FRACTION} log V = {target:.3f}",
            ),
        ]
    return result


def main(argv: Sequence[str]) -> int:
    argparse.ArgumentParser(
        prog="python -m examples.flax_nnx",
        description="Trains Flax NNX models with jaxce losses; exits 1 if a claim fails.",
    ).parse_args(list(argv))
    report = run()
    for line in describe(report):
        print(line)
    results = claims(report)
    for holds, claim in results:
        print(f"{'ok  ' if holds else 'FAIL'} {claim}")
    return 0 if all(holds for holds, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
