"""A small causal transformer trained through ``jaxce.linear_cross_entropy``, for ``make demo``.

The text is the Python standard library's own source (:data:`STDLIB_FILES`, read from
``sysconfig.get_paths()["stdlib"]``): on every machine, no download. Without its comments and
docstrings, it is cut into words, operators, punctuation and "newline plus indentation" tokens;
the :data:`KNOWN_TOKENS` most frequent ones and an unknown token form the vocabulary, and the
embedding table is padded to a multiple of 128 rows, the padding reaching the loss through
``vocab_size=``. The model (equinox) ties its input
embedding and its output layer; it is trained with ``optax.adam`` twice from the same
initialisation on the same batches: through the fused loss, and through the materialised
formulation (``hidden @ W.T`` and ``optax.softmax_cross_entropy_with_integer_labels``).

    python -m examples.transformer [--steps N]         # prints what `make demo` checks

``notebooks/06_training_a_transformer.ipynb`` writes the same program out for the reader.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import pathlib
import re
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxce

# Modules of the standard library that have been single files for many Python versions (sorted;
# any missing on an unusual Python is skipped): the training text, and the held-out text.
STDLIB_FILES = (
    "argparse.py",
    "ast.py",
    "calendar.py",
    "configparser.py",
    "contextlib.py",
    "dataclasses.py",
    "difflib.py",
    "enum.py",
    "fractions.py",
    "functools.py",
    "gettext.py",
    "inspect.py",
    "pprint.py",
    "random.py",
    "shutil.py",
    "statistics.py",
    "string.py",
    "subprocess.py",
    "tarfile.py",
    "tokenize.py",
    "typing.py",
)
HELD_OUT_FILES = ("textwrap.py", "heapq.py")
# A line break with the next line's indentation, a word, a two-character operator, or one
# punctuation character.
TOKEN_PATTERN = re.compile(r"\n *|\w+|[=!<>+\-*/%&|^]=|->|\*\*|//|[^\w\s]")
# Scanned left to right, so a quote or a "#" inside a string literal is part of that literal.
STRING_OR_COMMENT = re.compile(
    r'"""[\s\S]*?"""|\'\'\'[\s\S]*?\'\'\'|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'|#.*'
)
BLANK_LINE = re.compile(r"\n[ ]*(?=\n)")
UNKNOWN = "<unk>"
# 1000 tokens and UNKNOWN: a table of 1024 rows, 23 of them padding.
KNOWN_TOKENS = 1000
TABLE_MULTIPLE = 128


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Token ids of the training and held-out text, and the vocabulary they index."""

    vocabulary: tuple[str, ...]
    train: np.ndarray
    held_out: np.ndarray

    @property
    def vocab_size(self) -> int:
        """Real classes: the known tokens and :data:`UNKNOWN` (its id is the last)."""
        return len(self.vocabulary)

    @property
    def unknown_id(self) -> int:
        return self.vocab_size - 1

    @property
    def table_rows(self) -> int:
        """The embedding table's rows: ``vocab_size`` padded to a multiple of 128."""
        return -(-self.vocab_size // TABLE_MULTIPLE) * TABLE_MULTIPLE

    def encode(self, text: str) -> np.ndarray:
        index = {token: i for i, token in enumerate(self.vocabulary)}
        tokens = TOKEN_PATTERN.findall(text)
        return np.array([index.get(t, self.unknown_id) for t in tokens], np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Tokens joined by spaces, except at line breaks (which carry the indentation) and
        around ``.``, and before ``,:)]`` and an opening bracket that follows a name."""
        text, previous = "", "\n"
        for i in ids:
            token = self.vocabulary[int(i)]
            tight = (
                token.startswith("\n")
                or previous.startswith("\n")
                or previous in ".(["
                or token in ".,:)]"
                or (token in "([" and (previous.isidentifier() or previous in ")]"))
            )
            text += token if tight else " " + token
            previous = token
        return text


def stdlib_text(names: Sequence[str]) -> str:
    """The code of the named standard library files, without comments, docstrings (any
    triple-quoted string) and blank lines: prose would be mostly unknown tokens."""
    directory = pathlib.Path(sysconfig.get_paths()["stdlib"])
    paths = [directory / name for name in names if (directory / name).is_file()]
    if not paths:
        raise FileNotFoundError(f"none of {list(names)} is in {directory}")
    text = "\n".join(path.read_text(encoding="utf-8") for path in paths)
    text = STRING_OR_COMMENT.sub(_without_comments_and_docstrings, text)
    return BLANK_LINE.sub("", text)


def _without_comments_and_docstrings(match: re.Match[str]) -> str:
    literal = match.group()
    return "" if literal.startswith(("#", '"""', "'''")) else literal


def load_corpus(known_tokens: int = KNOWN_TOKENS) -> Corpus:
    """The standard library's text as token ids (deterministic for a given Python)."""
    train_tokens = TOKEN_PATTERN.findall(stdlib_text(STDLIB_FILES))
    counts = collections.Counter(train_tokens)
    # Most frequent first; ties in alphabetical order, so the vocabulary does not depend on
    # the order the files were read in.
    ranked = sorted(counts, key=lambda token: (-counts[token], token))
    vocabulary = (*ranked[:known_tokens], UNKNOWN)
    index = {token: i for i, token in enumerate(vocabulary)}
    unknown = len(vocabulary) - 1
    corpus = Corpus(vocabulary, np.zeros(0, np.int32), np.zeros(0, np.int32))
    return dataclasses.replace(
        corpus,
        train=np.array([index.get(t, unknown) for t in train_tokens], np.int32),
        held_out=corpus.encode(stdlib_text(HELD_OUT_FILES)),
    )


def windows(tokens: np.ndarray, shape: tuple[int, ...], context: int, seed: int) -> np.ndarray:
    """``shape + (context,)`` windows of ``tokens`` starting at random (seeded) offsets."""
    starts = np.random.default_rng(seed).integers(0, len(tokens) - context, size=shape)
    return tokens[starts[..., None] + np.arange(context)]


class Block(eqx.Module):
    """Pre-norm transformer block: causal self-attention, then a GELU MLP."""

    attention_norm: eqx.nn.LayerNorm
    attention: eqx.nn.MultiheadAttention
    mlp_norm: eqx.nn.LayerNorm
    mlp_in: eqx.nn.Linear
    mlp_out: eqx.nn.Linear

    def __init__(self, width: int, heads: int, *, key: jax.Array) -> None:
        attention_key, in_key, out_key = jax.random.split(key, 3)
        self.attention_norm = eqx.nn.LayerNorm(width)
        self.attention = eqx.nn.MultiheadAttention(heads, width, key=attention_key)
        self.mlp_norm = eqx.nn.LayerNorm(width)
        self.mlp_in = eqx.nn.Linear(width, 4 * width, key=in_key)
        self.mlp_out = eqx.nn.Linear(4 * width, width, key=out_key)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[T, D] -> [T, D]``."""
        causal = jnp.tril(jnp.ones((x.shape[0], x.shape[0]), bool))
        normed = jax.vmap(self.attention_norm)(x)
        x = x + self.attention(normed, normed, normed, mask=causal)
        hidden = jax.nn.gelu(jax.vmap(self.mlp_in)(jax.vmap(self.mlp_norm)(x)))
        return x + jax.vmap(self.mlp_out)(hidden)


class Transformer(eqx.Module):
    """A decoder-only language model whose output layer is its (padded) embedding table."""

    embedding: jax.Array
    positions: jax.Array
    blocks: tuple[Block, ...]
    final_norm: eqx.nn.LayerNorm

    def __init__(
        self, table_rows: int, *, width: int, depth: int, heads: int, context: int, key: jax.Array
    ) -> None:
        embedding_key, position_key, *block_keys = jax.random.split(key, 2 + depth)
        # GPT-2's scale: tied logits h @ W.T start small, so the first loss is about log V.
        self.embedding = 0.02 * jax.random.normal(embedding_key, (table_rows, width))
        self.positions = 0.02 * jax.random.normal(position_key, (context, width))
        self.blocks = tuple(Block(width, heads, key=k) for k in block_keys)
        self.final_norm = eqx.nn.LayerNorm(width)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """``[T]`` token ids -> ``[T, D]`` hidden states (position t sees tokens 0..t)."""
        x = self.embedding[tokens] + self.positions[: tokens.shape[0]]
        for block in self.blocks:
            x = block(x)
        return jax.vmap(self.final_norm)(x)

    def hidden(self, tokens: jax.Array) -> jax.Array:
        """``[..., T]`` -> ``[..., T, D]``."""
        flat = tokens.reshape(-1, tokens.shape[-1])
        return jax.vmap(self)(flat).reshape(*tokens.shape, -1)


class Metrics(NamedTuple):
    """Per-step training metrics (NaN where a formulation does not compute them)."""

    loss: jax.Array
    accuracy: jax.Array
    entropy: jax.Array


def fused_loss(
    model: Transformer, tokens: jax.Array, vocab_size: int, unknown_id: int
) -> tuple[jax.Array, Metrics]:
    """Mean next-token loss through ``jaxce.linear_cross_entropy``, and metrics from its aux.

    Accuracy counts the predictions of known tokens (an unknown label says nothing about
    the model); the entropy is the mean over every prediction.
    """
    hidden, table = model.hidden(tokens), model.embedding
    loss, aux = jaxce.linear_cross_entropy(
        hidden, table, tokens, shift=1, vocab_size=vocab_size, return_aux=True
    )
    labels = tokens[..., 1:]
    known = labels != unknown_id
    correct = jnp.sum((aux.argmax == labels) & known) / jnp.sum(known)
    return loss, Metrics(loss, correct, jnp.mean(aux.entropy))


def materialised_loss(
    model: Transformer, tokens: jax.Array, vocab_size: int, unknown_id: int
) -> tuple[jax.Array, Metrics]:
    """The same loss through the ``[B, T - 1, V]`` logits (padding rows sliced off) and optax."""
    del unknown_id
    logits = model.hidden(tokens)[..., :-1, :] @ model.embedding[:vocab_size].T
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[..., 1:])
    loss = jnp.mean(losses)
    nan = jnp.full((), jnp.nan)
    return loss, Metrics(loss, nan, nan)


LossFn = Callable[[Transformer, jax.Array, int, int], tuple[jax.Array, Metrics]]
Step = Callable[[Any, Any, jax.Array], tuple[Any, Any, Metrics]]


def make_step(
    loss_fn: LossFn,
    static: Any,
    optimizer: optax.GradientTransformation,
    vocab_size: int,
    unknown_id: int,
) -> Step:
    """``step(params, opt_state, tokens) -> (params, opt_state, metrics)``, to be jitted.

    ``params`` are the model's arrays (:func:`eqx.partition`); ``static`` the rest.
    """

    def loss_of_params(params: Any, tokens: jax.Array) -> tuple[jax.Array, Metrics]:
        model = eqx.combine(params, static)
        return loss_fn(model, tokens, vocab_size, unknown_id)

    def step(params: Any, opt_state: Any, tokens: jax.Array) -> tuple[Any, Any, Metrics]:
        grads, metrics = jax.grad(loss_of_params, has_aux=True)(params, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    return step


@dataclasses.dataclass(frozen=True)
class Settings:
    """The model and the training run."""

    width: int = 128
    depth: int = 2
    heads: int = 4
    context: int = 64
    batch_size: int = 8
    steps: int = 150
    learning_rate: float = 1e-3
    seed: int = 0


@dataclasses.dataclass
class Run:
    """One training run: per-step metrics, the final parameters, the step's scratch memory."""

    loss: np.ndarray
    accuracy: np.ndarray
    entropy: np.ndarray
    params: Any
    temp_bytes: int
    seconds: float


def new_model(table_rows: int, settings: Settings, *, context: int | None = None) -> Transformer:
    """A freshly initialised model (the same for the same seed)."""
    return Transformer(
        table_rows,
        width=settings.width,
        depth=settings.depth,
        heads=settings.heads,
        context=context or settings.context,
        key=jax.random.key(settings.seed),
    )


def temp_bytes(compiled: Any) -> int:
    """XLA's scratch memory for one call of a compiled function, inputs and outputs excluded."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        raise RuntimeError("this backend reports no memory analysis")
    return int(analysis.temp_size_in_bytes)


def train(loss_fn: LossFn, corpus: Corpus, settings: Settings, batches: np.ndarray) -> Run:
    """Trains a fresh model on ``batches`` (``[steps, B, T]``) with ``optax.adam``.

    The step is compiled once, ahead of time, so its memory analysis comes for free.
    """
    params, static = eqx.partition(new_model(corpus.table_rows, settings), eqx.is_array)
    optimizer = optax.adam(settings.learning_rate)
    opt_state = optimizer.init(params)
    step = make_step(loss_fn, static, optimizer, corpus.vocab_size, corpus.unknown_id)
    start = time.perf_counter()
    compiled = jax.jit(step).lower(params, opt_state, jnp.asarray(batches[0])).compile()
    history = []
    for tokens in batches:
        params, opt_state, metrics = compiled(params, opt_state, jnp.asarray(tokens))
        history.append(metrics)
    stacked = jax.tree.map(lambda *values: np.array(values), *history)
    seconds = time.perf_counter() - start
    return Run(
        stacked.loss, stacked.accuracy, stacked.entropy, params, temp_bytes(compiled), seconds
    )


def step_temp_bytes(
    loss_fn: LossFn, settings: Settings, *, vocab_size: int, batch_size: int, context: int
) -> int:
    """Scratch memory of one training step of ``settings``' model with a ``vocab_size`` table
    (padded to a multiple of 128 rows) on ``[batch_size, context]`` tokens: compiled, not run.
    """
    table_rows = -(-vocab_size // TABLE_MULTIPLE) * TABLE_MULTIPLE
    model = eqx.filter_eval_shape(new_model, table_rows, settings, context=context)
    params, static = eqx.partition(model, lambda leaf: isinstance(leaf, jax.ShapeDtypeStruct))
    optimizer = optax.adam(settings.learning_rate)
    step = make_step(loss_fn, static, optimizer, vocab_size, vocab_size - 1)
    opt_state = jax.eval_shape(optimizer.init, params)
    tokens = jax.ShapeDtypeStruct((batch_size, context), jnp.int32)
    return temp_bytes(jax.jit(step).lower(params, opt_state, tokens).compile())


def evaluate(model: Transformer, corpus: Corpus, tokens: np.ndarray) -> Metrics:
    """Loss, accuracy and entropy on ``tokens`` (``[B, T]``), from the fused loss's aux."""

    def metrics(model: Transformer, tokens: jax.Array) -> Metrics:
        return fused_loss(model, tokens, corpus.vocab_size, corpus.unknown_id)[1]

    return eqx.filter_jit(metrics)(model, jnp.asarray(tokens))


def sample(
    model: Transformer,
    corpus: Corpus,
    prompts: Sequence[str],
    *,
    temperature: float,
    seed: int,
) -> list[str]:
    """Each prompt continued to the model's context length, at ``temperature`` (seeded).

    The unknown token is never sampled. Each new token runs the whole (causal) window
    again: slow for long texts, simple for a demo.
    """
    context = model.positions.shape[0]

    @eqx.filter_jit
    def generate(model: Transformer, window: jax.Array, length: jax.Array, key: jax.Array) -> Any:
        def next_token(position: jax.Array, window: jax.Array) -> jax.Array:
            hidden = model(window)[position - 1]
            logits = model.embedding[: corpus.vocab_size] @ hidden / temperature
            logits = logits.at[corpus.unknown_id].set(-jnp.inf)
            token = jax.random.categorical(jax.random.fold_in(key, position), logits)
            return window.at[position].set(token.astype(window.dtype))

        return jax.lax.fori_loop(length, context, next_token, window)

    texts = []
    for index, prompt in enumerate(prompts):
        ids = corpus.encode(prompt)
        window = np.zeros(context, np.int32)
        window[: len(ids)] = ids
        key = jax.random.fold_in(jax.random.key(seed), index)
        out = generate(model, jnp.asarray(window), jnp.asarray(len(ids)), key)
        texts.append(prompt + corpus.decode(np.asarray(out)[len(ids) :]))
    return texts


@dataclasses.dataclass
class Report:
    """What :func:`run` measured."""

    corpus: Corpus
    settings: Settings
    fused: Run
    materialised: Run
    held_out: Metrics
    # Held-out accuracy of always predicting the most frequent training token.
    baseline_accuracy: float
    padding_rows_unchanged: bool
    # Scratch memory of a training step at LARGE_SHAPE: (materialised, fused) bytes.
    large_temp_bytes: tuple[int, int]
    samples: list[str]


# Where the materialised formulation's temporaries grow out of hand: GPT-2's vocabulary
# (50257, padded to 50304 rows), 8 sequences of 512 tokens. Compiled only.
LARGE_SHAPE = {"vocab_size": 50257, "batch_size": 8, "context": 512}
PROMPTS = ("def ", "class ", "    if ")
SAMPLING_TEMPERATURE = 0.7
HELD_OUT_WINDOWS = 32


def run(settings: Settings | None = None) -> Report:
    """Trains the model both ways, then evaluates, measures memory and samples."""
    settings = settings or Settings()
    corpus = load_corpus()
    shape = (settings.steps, settings.batch_size)
    batches = windows(corpus.train, shape, settings.context, settings.seed)
    fused = train(fused_loss, corpus, settings, batches)
    materialised = train(materialised_loss, corpus, settings, batches)
    initial = new_model(corpus.table_rows, settings)
    padding = slice(corpus.vocab_size, None)
    padding_rows_unchanged = all(
        bool(jnp.array_equal(r.params.embedding[padding], initial.embedding[padding]))
        for r in (fused, materialised)
    )
    model = eqx.combine(fused.params, eqx.partition(initial, eqx.is_array)[1])
    held_out_tokens = windows(
        corpus.held_out, (HELD_OUT_WINDOWS,), settings.context, settings.seed + 1
    )
    labels = held_out_tokens[:, 1:]
    known = labels != corpus.unknown_id
    most_frequent = 0  # the vocabulary is ranked by frequency in the training text
    large = tuple(
        step_temp_bytes(loss_fn, settings, **LARGE_SHAPE)
        for loss_fn in (materialised_loss, fused_loss)
    )
    return Report(
        corpus=corpus,
        settings=settings,
        fused=fused,
        materialised=materialised,
        held_out=evaluate(model, corpus, held_out_tokens),
        baseline_accuracy=float(np.sum((labels == most_frequent) & known) / np.sum(known)),
        padding_rows_unchanged=padding_rows_unchanged,
        large_temp_bytes=(large[0], large[1]),
        samples=sample(
            model, corpus, PROMPTS, temperature=SAMPLING_TEMPERATURE, seed=settings.seed
        ),
    )


# How closely the fused run must follow the materialised one. Both are float32 and equal in
# exact arithmetic; they differ only in summation order (the chunked products and
# log-sum-exps), a few units in the last place of the loss. At step 0 the parameters are the
# same: the losses agree to 1e-5 relative (~170 ulps, room for another XLA's blocking). Adam
# then feeds the differences back, and training amplifies them step by step, so the first
# steps still agree closely and later ones only as curves: their 10-step means.
FIRST_STEP_RTOL = 1e-5
EARLY_STEPS, EARLY_RTOL = 10, 1e-4
CURVE_WINDOW, CURVE_RTOL = 10, 0.03
# A clear margin: from log(V) = 6.9 nats to below 0.7 log(V) = 4.8.
LOSS_DROP_FRACTION = 0.7
# Held-out accuracy over known labels against always predicting the most frequent token.
BASELINE_FACTOR = 1.5


def moving_average(values: np.ndarray, window: int = CURVE_WINDOW) -> np.ndarray:
    return np.convolve(values, np.ones(window) / window, mode="valid")


def curve_differences(report: Report) -> tuple[float, float, float]:
    """Relative differences fused vs materialised: step 0, the first steps, the smoothed curve."""
    fused, materialised = report.fused.loss, report.materialised.loss
    relative = np.abs(fused - materialised) / materialised
    smooth_fused, smooth_materialised = moving_average(fused), moving_average(materialised)
    smoothed = np.abs(smooth_fused - smooth_materialised) / smooth_materialised
    return float(relative[0]), float(relative[:EARLY_STEPS].max()), float(smoothed.max())


def logits_bytes(vocab_size: int, batch_size: int, context: int) -> int:
    """One float32 ``[B, T - 1, V]`` logits array (with ``shift=1``)."""
    return 4 * batch_size * (context - 1) * vocab_size


def claims(report: Report) -> list[tuple[bool, str]]:
    """What the run must show, as (holds, claim) pairs."""
    first, early, curve = curve_differences(report)
    final = float(np.mean(report.fused.loss[-CURVE_WINDOW:]))
    target = LOSS_DROP_FRACTION * float(np.log(report.corpus.vocab_size))
    materialised_large, fused_large = report.large_temp_bytes
    saved = materialised_large - fused_large
    accuracy = float(report.held_out.accuracy)
    return [
        (
            final < target,
            f"loss falls from {report.fused.loss[0]:.2f} to {final:.2f} "
            f"(mean of the last {CURVE_WINDOW} steps) < {LOSS_DROP_FRACTION} log V = {target:.2f}",
        ),
        (
            first <= FIRST_STEP_RTOL and early <= EARLY_RTOL and curve <= CURVE_RTOL,
            f"fused and materialised curves agree: step 0 {first:.1e} <= {FIRST_STEP_RTOL:g}, "
            f"first {EARLY_STEPS} steps {early:.1e} <= {EARLY_RTOL:g}, "
            f"{CURVE_WINDOW}-step means {curve:.1e} <= {CURVE_RTOL:g} (relative)",
        ),
        (
            saved >= logits_bytes(**LARGE_SHAPE),
            "V={vocab_size}, B={batch_size}, T={context}: ".format(**LARGE_SHAPE)
            + f"the fused step saves {saved / 2**20:.0f} MiB of temporaries, at least one "
            f"logits array ({logits_bytes(**LARGE_SHAPE) / 2**20:.0f} MiB)",
        ),
        (
            accuracy > BASELINE_FACTOR * report.baseline_accuracy,
            f"held-out accuracy (aux.argmax) {accuracy:.3f} > {BASELINE_FACTOR} x always "
            f"predicting the most frequent token ({report.baseline_accuracy:.3f})",
        ),
        (
            report.padding_rows_unchanged,
            f"the {report.corpus.table_rows - report.corpus.vocab_size} padding rows of the "
            "table get exactly zero gradient (unchanged by Adam), both ways",
        ),
    ]


def describe(report: Report) -> list[str]:
    """The run in a few lines: model, data, curves, memory, accuracy, samples."""
    corpus, settings = report.corpus, report.settings
    lines = [
        f"{len(corpus.train)} training / {len(corpus.held_out)} held-out tokens of the standard "
        f"library's code, V = {corpus.vocab_size} ({KNOWN_TOKENS} + {UNKNOWN}), table padded to "
        f"{corpus.table_rows} rows",
        f"D={settings.width}, {settings.depth} layers, {settings.heads} heads, context "
        f"{settings.context}, batch {settings.batch_size}, optax.adam({settings.learning_rate:g}), "
        f"{settings.steps} steps",
        f"{'step':>6s} {'fused loss':>11s} {'optax loss':>11s} {'accuracy':>9s} {'entropy':>8s}",
    ]
    shown = sorted({0, 1, 2, *range(CURVE_WINDOW - 1, settings.steps, 30), settings.steps - 1})
    for i in shown:
        lines.append(
            f"{i:6d} {report.fused.loss[i]:11.6f} {report.materialised.loss[i]:11.6f} "
            f"{report.fused.accuracy[i]:9.3f} {report.fused.entropy[i]:8.3f}"
        )
    held_out = report.held_out
    lines.append(
        f"held out: loss {float(held_out.loss):.3f}, accuracy {float(held_out.accuracy):.3f}, "
        f"entropy {float(held_out.entropy):.3f}"
    )
    materialised_large, fused_large = report.large_temp_bytes
    mib = 2**20
    training_shape = (
        f"training: V={corpus.vocab_size}, B={settings.batch_size}, T={settings.context}"
    )
    large_shape = "V={vocab_size}, B={batch_size}, T={context} (compiled only)".format(
        **LARGE_SHAPE
    )
    lines += [
        f"{'temporaries of a training step (MiB)':46s} {'materialised':>12s} {'fused':>8s}",
        f"  {training_shape:44s} {report.materialised.temp_bytes / mib:12.1f} "
        f"{report.fused.temp_bytes / mib:8.1f}",
        f"  {large_shape:44s} {materialised_large / mib:12.1f} {fused_large / mib:8.1f}",
        f"samples (temperature {SAMPLING_TEMPERATURE}, seed {settings.seed}):",
    ]
    for text in report.samples:
        lines += [f"  | {line}" for line in text.splitlines()[:4]]
    return lines


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.transformer",
        description="Trains a small transformer on the standard library's code through "
        "jaxce.linear_cross_entropy and through optax; exits 1 if a claim fails.",
    )
    parser.add_argument("--steps", type=int, default=Settings.steps, help="training steps")
    options = parser.parse_args(list(argv))
    if options.steps < CURVE_WINDOW:
        parser.error(
            f"--steps must be at least {CURVE_WINDOW} (the curves are compared as "
            f"{CURVE_WINDOW}-step means), got {options.steps}"
        )
    report = run(Settings(steps=options.steps))
    for line in describe(report):
        print(line)
    failed = [claim for holds, claim in claims(report) if not holds]
    for holds, claim in claims(report):
        print(f"{'ok  ' if holds else 'FAIL'} {claim}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
