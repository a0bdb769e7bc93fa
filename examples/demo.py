"""``make demo`` (``python -m examples.demo``): the library's main job, end to end.

1. three worked NumPy examples of a question-and-answer walk-through of cross-entropy (binary,
   categorical, three samples), whose printed results were wrong: jaxce's values next to the
   examples' own formulas evaluated in float64 NumPy, and the values the walk-through printed;
2. the gradient verification summary (:mod:`jaxce.verify`);
3. optax training on two data sets bundled with scikit-learn, each run twice (jaxce's
   loss, then the same loss written with optax) to show the numbers agree;
4. Flax NNX models trained with jaxce losses under ``nnx.jit`` (:mod:`examples.flax_nnx`): an
   MLP on digits, and a tiny language model trained through ``jaxce.linear_cross_entropy``
   with its output weight taken from an ``nnx.Embed`` (tied) or an ``nnx.Linear`` head;
5. a small causal transformer trained on the standard library's code through
   ``jaxce.linear_cross_entropy(shift=1, vocab_size=..., return_aux=True)``, next to the same
   run through the materialised optax formulation (:mod:`examples.transformer`);
6. a short benchmark table against optax (:func:`jaxce.bench.compare`).

Every claim is checked: the command exits with status 1 and says which one broke. It needs
the ``demo`` extra (scikit-learn, optax, equinox, flax); without it, it says so in one line and
exits 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

import jaxce
from jaxce import bench

if TYPE_CHECKING:
    from examples import training

# Held-out accuracy each training run must reach.
ACCURACY_TARGET = 0.95
# Per-epoch training loss of the jaxce run against the optax run.
LOSS_RTOL = 1e-4
# Dtypes of the demo's verification run: one dtype keeps it to seconds;
# `jaxce verify` checks float32, float64 and bfloat16.
VERIFY_DTYPES = ("float64",)
BENCHMARK_SHAPES = ((4096, 10), (1024, 1000), (256, 32000))
SECTIONS = ("examples", "verify", "train", "flax", "transformer", "bench")

# The worked examples' values: their own NumPy formulas in float64 give these (the walk-through
# printed 0.3285... and 1.1819... for the first two, nothing for the third).
CORRECT_BINARY = 0.164252033486018
CORRECT_CATEGORICAL = 0.4243218919376292
CORRECT_THREE_SAMPLES = 0.18913199175146167


def reference_examples() -> list[tuple[str, float, float, float]]:
    """The walk-through's worked examples: (name, jaxce, float64 NumPy, value it printed)."""
    binary_labels = np.array([1.0, 0.0, 1.0, 0.0])
    binary_probs = np.array([0.9, 0.1, 0.8, 0.2])
    onehot = np.eye(3)
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5]])
    three_labels = np.array([1.0, 0.0, 1.0])
    three_probs = np.array([0.9, 0.1, 0.7])

    def numpy_binary(y: np.ndarray, p: np.ndarray) -> float:
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))

    return [
        (
            "binary, y=[1,0,1,0], p=[.9,.1,.8,.2]",
            float(jaxce.binary_cross_entropy(binary_probs, binary_labels, reduction="mean")),
            numpy_binary(binary_labels, binary_probs),
            0.3285061001454424,
        ),
        (
            "categorical, 3x3 one-hot",
            float(jaxce.categorical_cross_entropy(probs, onehot, reduction="mean")),
            float(-np.mean(np.sum(onehot * np.log(probs), axis=1))),
            1.181944395487012,
        ),
        (
            "binary, y=[1,0,1], p=[.9,.1,.7]",
            float(jaxce.binary_cross_entropy(three_probs, three_labels, reduction="mean")),
            numpy_binary(three_labels, three_probs),
            float("nan"),
        ),
    ]


class Progress:
    """Numbered section headers with elapsed time, and a list of failed checks."""

    def __init__(self, sections: Sequence[str]) -> None:
        self.total = len(sections)
        self.done = 0
        self.start = time.perf_counter()
        self.failures: list[str] = []

    def section(self, title: str) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        print(f"\n[{self.done}/{self.total}] {title}  (t = {elapsed:.1f} s)", flush=True)

    def check(self, ok: bool, claim: str) -> None:
        """Prints the claim with its verdict; remembers it if it failed."""
        print(f"  {'ok  ' if ok else 'FAIL'} {claim}", flush=True)
        if not ok:
            self.failures.append(claim)


def run_examples(progress: Progress) -> None:
    progress.section(
        "Worked examples of a cross-entropy walk-through, checked against float64 NumPy"
    )
    print("  NumPy: the examples' own formulas in float64; printed: what the walk-through showed")
    print(f"  {'example':38s} {'jaxce':>12s} {'NumPy':>12s} {'printed':>12s}")
    rows = reference_examples()
    for name, ours, numpy_value, printed in rows:
        shown = "(no value)" if np.isnan(printed) else f"{printed:.9f}"
        print(f"  {name:38s} {ours:12.9f} {numpy_value:12.9f} {shown:>12s}")
    correct = (CORRECT_BINARY, CORRECT_CATEGORICAL, CORRECT_THREE_SAMPLES)
    for (name, ours, numpy_value, _), expected in zip(rows, correct, strict=True):
        progress.check(
            abs(ours - expected) < 1e-6 and abs(numpy_value - expected) < 1e-12,
            f"{name}: jaxce and NumPy give {expected:.9f}",
        )


def run_verify(progress: Progress) -> None:
    progress.section(f"Gradient verification, every loss ({', '.join(VERIFY_DTYPES)})")
    try:
        from jaxce import verify
    except ImportError as error:
        progress.check(False, f"jaxce.verify is importable ({error})")
        return
    arguments = [part for dtype in VERIFY_DTYPES for part in ("--dtype", dtype)]
    status = verify.main(arguments)
    progress.check(
        status == 0,
        "jax.grad, closed form, reference and finite differences agree for every loss",
    )


def _train_twice(
    progress: Progress,
    data: Any,
    jaxce_loss: Callable[[jax.Array, jax.Array], jax.Array],
    optax_loss: Callable[[jax.Array, jax.Array], jax.Array],
    description: str,
    optax_description: str,
    **settings: Any,
) -> None:
    from examples import training

    num_outputs = 1 if data.binary else data.num_classes
    layers = "-".join(str(n) for n in (data.x_train.shape[1], *settings["hidden"], num_outputs))
    print(
        f"\n  {data.name}: {len(data.y_train)} train / {len(data.y_test)} held-out examples, "
        f"MLP {layers}, optax.adam({settings['learning_rate']:g}), "
        f"batch {settings['batch_size']}, {settings['epochs']} epochs"
    )
    print(f"  loss: {description}")
    print(f"  {'epoch':>7s} {'loss':>9s} {'train acc':>10s} {'held-out acc':>13s}")

    def report(epoch: int, history: training.History) -> None:
        print(
            f"  {epoch + 1:3d}/{settings['epochs']:<3d} {history.train_loss[-1]:9.5f} "
            f"{history.train_accuracy[-1]:10.4f} {history.test_accuracy[-1]:13.4f}",
            flush=True,
        )

    ours = training.train(data, jaxce_loss, on_epoch=report, **settings)
    progress.check(
        ours.final_test_accuracy >= ACCURACY_TARGET,
        f"{data.name}: held-out accuracy {ours.final_test_accuracy:.4f} >= {ACCURACY_TARGET}",
    )
    print(f"  same run, loss written with optax: {optax_description}", flush=True)
    theirs = training.train(data, optax_loss, **settings)
    ours_loss, theirs_loss = np.array(ours.train_loss), np.array(theirs.train_loss)
    worst = float(np.max(np.abs(ours_loss - theirs_loss) / np.abs(theirs_loss)))
    progress.check(
        worst <= LOSS_RTOL,
        f"{data.name}: per-epoch loss matches optax's (max relative difference "
        f"{worst:.1e} <= {LOSS_RTOL:g})",
    )
    # One example may flip on a decision boundary when the losses differ in the last bit.
    one_example = 1.0 / len(data.y_test) + 1e-9
    progress.check(
        abs(ours.final_test_accuracy - theirs.final_test_accuracy) <= one_example,
        f"{data.name}: held-out accuracy {ours.final_test_accuracy:.4f} (jaxce) vs "
        f"{theirs.final_test_accuracy:.4f} (optax)",
    )


def run_training(progress: Progress) -> None:
    from examples import training

    progress.section("Training with optax on scikit-learn's bundled data sets (no download)")
    digits = training.load("digits")
    smoothing = 0.1
    _train_twice(
        progress,
        digits,
        training.digits_loss(smoothing),
        training.digits_loss_optax(smoothing),
        f"jaxce.softmax_cross_entropy_with_integer_labels(label_smoothing={smoothing}, "
        'reduction="mean")',
        f"optax.losses.softmax_cross_entropy(logits, optax.smooth_labels(one_hot, {smoothing}))",
        hidden=(64,),
        epochs=15,
        batch_size=64,
        learning_rate=1e-2,
    )
    cancer = training.load("breast_cancer")
    pos_weight = training.balanced_pos_weight(cancer)
    _train_twice(
        progress,
        cancer,
        training.breast_cancer_loss(pos_weight),
        training.breast_cancer_loss_optax(pos_weight),
        f"jaxce.sigmoid_binary_cross_entropy(pos_weight={pos_weight:.3f}, "
        'reduction="mean") (positive = malignant)',
        "p_w * y * optax.losses.sigmoid_binary_cross_entropy(logits, 1) "
        "+ (1 - y) * optax.losses.sigmoid_binary_cross_entropy(logits, 0)",
        hidden=(32,),
        epochs=30,
        batch_size=32,
        learning_rate=3e-3,
    )


def run_flax(progress: Progress) -> None:
    from examples import flax_nnx

    progress.section("Flax NNX models trained with jaxce losses (python -m examples.flax_nnx)")
    report = flax_nnx.run()
    for line in flax_nnx.describe(report):
        print(f"  {line}", flush=True)
    for holds, claim in flax_nnx.claims(report):
        progress.check(holds, claim)


def run_transformer(progress: Progress) -> None:
    from examples import transformer

    progress.section(
        "A small transformer trained through linear_cross_entropy, and through optax "
        "(python -m examples.transformer)"
    )
    report = transformer.run()
    for line in transformer.describe(report):
        print(f"  {line}", flush=True)
    for holds, claim in transformer.claims(report):
        progress.check(holds, claim)


def run_benchmark(progress: Progress, runs: int = 10) -> None:
    progress.section("Benchmark: value_and_grad of mean integer-label cross-entropy, jit")
    print(
        f"  {jax.devices()[0].device_kind}, jax {jax.__version__}; `jaxce bench` times your shapes"
    )
    print(f"  interleaved rounds, medians of at least {runs}; compile timed apart")
    print(
        f"  {'logits (N, C)':>14s} {'jaxce ms':>9s} {'optax ms':>9s} {'jaxce speedup':>14s} "
        f"{'compile ms (jaxce, optax)':>26s}"
    )
    agreement = {}
    for shape in BENCHMARK_SHAPES:
        report = bench.compare(shape=shape, runs=runs, min_seconds=0.5)
        ours, optax = report.timing("jaxce"), report.timing("optax")
        print(
            f"  {shape!s:>14s} {ours.median_ms:9.2f} {optax.median_ms:9.2f} "
            f"{optax.speedup:13.2f}x {ours.compile_ms:12.0f}, {optax.compile_ms:.0f}",
            flush=True,
        )
        agreement[shape] = optax.max_loss_difference <= 1e-5 and (
            optax.max_gradient_difference is not None and optax.max_gradient_difference <= 1e-7
        )
    print(
        "  (speedup: the median over rounds of optax's time over jaxce's, not the ratio of the"
        " medians; above 1, jaxce is faster)"
    )
    for shape, agrees in agreement.items():
        progress.check(agrees, f"{shape}: jaxce's loss and gradient equal optax's")


def main(argv: Sequence[str]) -> int:
    try:
        # scikit-learn, optax, equinox, flax
        from examples import flax_nnx, training, transformer  # noqa: F401
    except ModuleNotFoundError as error:
        print(
            f"the demo needs {error.name}, which is not installed: pip install -e '.[demo]' "
            "(or run `make demo`, which does)",
            file=sys.stderr,
        )
        return 2
    parser = argparse.ArgumentParser(
        prog="python -m examples.demo",
        description="Worked examples, gradient verification, optax training on real data, "
        "a small transformer trained through the fused loss and a benchmark against optax; "
        "exits 1 if any claim fails.",
    )
    parser.add_argument(
        "--skip", action="append", choices=SECTIONS, default=[], help="skip a section (repeatable)"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=SECTIONS,
        default=[],
        help="run only this section (repeatable); --skip still applies",
    )
    options = parser.parse_args(list(argv))
    steps = {
        "examples": run_examples,
        "verify": run_verify,
        "train": run_training,
        "flax": run_flax,
        "transformer": run_transformer,
        "bench": run_benchmark,
    }
    chosen = [
        name
        for name in SECTIONS
        if name not in options.skip and (not options.only or name in options.only)
    ]
    progress = Progress(chosen)
    for name in chosen:
        steps[name](progress)
    elapsed = time.perf_counter() - progress.start
    if progress.failures:
        print(f"\ndemo: {len(progress.failures)} check(s) FAILED in {elapsed:.0f} s:")
        for claim in progress.failures:
            print(f"  - {claim}")
        return 1
    print(f"\ndemo: every check passed in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
