"""``make demo`` (``python -m examples.demo``) end to end, and the pieces of it that make claims."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples import demo, training, transformer

REPO = pathlib.Path(__file__).resolve().parents[2]

# The values the examples' own formulas give in float64 (the walk-through printed 0.3285... and
# 1.1819...; the third example printed nothing).
CORRECTED = {
    "binary, y=[1,0,1,0], p=[.9,.1,.8,.2]": 0.164252033486018,
    "categorical, 3x3 one-hot": 0.4243218919376292,
    "binary, y=[1,0,1], p=[.9,.1,.7]": 0.18913199175146167,
}


def test_reference_examples_give_the_corrected_values() -> None:
    rows = demo.reference_examples()
    assert [name for name, *_ in rows] == list(CORRECTED)
    for name, ours, numpy_value, printed in rows:
        np.testing.assert_allclose(ours, CORRECTED[name], rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(numpy_value, CORRECTED[name], rtol=1e-12, err_msg=name)
        assert np.isnan(printed) or abs(printed - CORRECTED[name]) > 0.1, name


def _run_demo(*args: str) -> str:
    """``python -m examples.demo ARGS`` on CPU: its output, once it has exited with 0."""
    result = subprocess.run(
        [sys.executable, "-m", "examples.demo", *args],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def test_demo_command_runs_all_but_the_transformer_section_and_passes() -> None:
    # The transformer section trains the model notebook 06 trains (its own pieces are
    # tested below); skipped here to keep `make test` short.
    output = _run_demo("--skip", "transformer")
    for header in (
        "[1/5] Worked examples",
        "[2/5] Gradient verification",
        "[3/5] Training",
        "[4/5] Flax NNX models",
        "[5/5] Benchmark",
    ):
        assert header in output, header
    assert "A small transformer" not in output
    assert "above 1, jaxce is faster" in output
    assert "FAIL" not in output
    assert "digits: held-out accuracy" in output
    assert "breast_cancer: per-epoch loss matches optax's" in output
    assert "tied nnx.Embed: fused loss" in output and "nnx.Linear head: loss falls" in output
    assert "demo: every check passed" in output
    # A progress line per epoch of each run.
    assert output.count("/15 ") >= 15 and output.count("/30 ") >= 30


@pytest.mark.slow
def test_demo_transformer_section_passes() -> None:
    output = _run_demo("--only", "transformer")
    assert "[1/1] A small transformer" in output
    assert "fused and materialised curves agree" in output
    assert "padding rows of the table get exactly zero gradient" in output
    assert "demo: every check passed" in output


def test_demo_exits_1_and_names_the_claim_that_broke(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo, "CORRECT_BINARY", 0.3285061001454424)
    status = demo.main(["--only", "examples"])
    output = capsys.readouterr().out
    assert status == 1
    assert "1 check(s) FAILED" in output
    assert "binary, y=[1,0,1,0]" in output.split("FAILED")[-1]


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1], ids=["no-smoothing", "smoothing-0.1"])
def test_digits_loss_equals_its_optax_formulation(label_smoothing: float) -> None:
    rng = np.random.default_rng(0)
    logits = jnp.asarray(3 * rng.standard_normal((37, 10)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, size=37), jnp.int32)
    ours = jax.jit(jax.value_and_grad(training.digits_loss(label_smoothing)))(logits, labels)
    optax_form = training.digits_loss_optax(label_smoothing)
    theirs = jax.jit(jax.value_and_grad(optax_form))(logits, labels)
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-6)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("pos_weight", [1.0, 1.68], ids=["pos_weight-1", "pos_weight-1.68"])
def test_breast_cancer_loss_equals_its_optax_formulation(pos_weight: float) -> None:
    rng = np.random.default_rng(1)
    logits = jnp.asarray(4 * rng.standard_normal(41), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 2, size=41), jnp.float32)
    loss = training.breast_cancer_loss(pos_weight)
    ours = jax.jit(jax.value_and_grad(loss))(logits, labels)
    optax_form = training.breast_cancer_loss_optax(pos_weight)
    theirs = jax.jit(jax.value_and_grad(optax_form))(logits, labels)
    # Float64 NumPy reference of PyTorch's definition.
    x, y = np.asarray(logits, np.float64), np.asarray(labels, np.float64)
    log_p, log_1mp = -np.logaddexp(0, -x), -np.logaddexp(0, x)
    reference = -np.mean(pos_weight * y * log_p + (1 - y) * log_1mp)
    np.testing.assert_allclose(ours[0], reference, rtol=1e-6)
    np.testing.assert_allclose(theirs[0], reference, rtol=1e-6)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-5, atol=1e-8)


def test_split_is_fixed_stratified_and_standardised_on_training_data_only() -> None:
    first, second = training.load("breast_cancer"), training.load("breast_cancer")
    np.testing.assert_array_equal(first.x_test, second.x_test)
    assert first.binary and first.class_names == ("benign", "malignant")
    # 212 of 569 tumours are malignant (label 1 here); stratification keeps the ratio.
    assert int(first.y_train.sum() + first.y_test.sum()) == 212
    assert abs(first.y_test.mean() - 212 / 569) < 0.01
    np.testing.assert_allclose(first.x_train.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(first.x_train.std(axis=0), 1, rtol=1e-4)
    assert np.abs(first.x_test.mean(axis=0)).max() > 1e-3
    assert training.balanced_pos_weight(first) == pytest.approx(
        (len(first.y_train) - first.y_train.sum()) / first.y_train.sum()
    )
    # Digits' always-blank border pixels stay 0 instead of dividing by a zero deviation.
    digits = training.load("digits")
    assert np.all(np.isfinite(digits.x_train)) and np.any(np.all(digits.x_train == 0, axis=0))
    with pytest.raises(ValueError, match="`name` must be one of"):
        training.load("iris")


def test_balanced_class_weight_is_n_over_classes_times_count() -> None:
    digits = training.load("digits")
    counts = np.bincount(digits.y_train, minlength=10)
    np.testing.assert_allclose(
        training.balanced_class_weight(digits), len(digits.y_train) / (10 * counts)
    )


def test_confusion_matrix_counts_true_rows_and_predicted_columns() -> None:
    cancer = training.load("breast_cancer")
    # One linear layer whose logit is the first feature: predicts malignant where it is > 0.
    weight = np.zeros((cancer.x_train.shape[1], 1), np.float32)
    weight[0, 0] = 1.0
    params = [(jnp.asarray(weight), jnp.zeros((1,), jnp.float32))]
    counts = training.confusion_matrix(cancer, params)
    predicted = (cancer.x_test[:, 0] > 0).astype(int)
    true = cancer.y_test.astype(int)
    expected = [[np.sum((true == t) & (predicted == q)) for q in (0, 1)] for t in (0, 1)]
    np.testing.assert_array_equal(counts, expected)


def test_demo_without_scikit_learn_says_which_extra_to_install() -> None:
    # `import sklearn` fails as it does where the `demo` extra is not installed.
    code = "import sys; sys.modules['sklearn'] = None; from examples import demo; sys.exit(demo.main([]))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "the demo needs sklearn, which is not installed: pip install -e '.[demo]'" in (
        result.stderr
    )


def test_corpus_is_the_standard_library_code_with_a_padded_table() -> None:
    first, second = transformer.load_corpus(), transformer.load_corpus()
    np.testing.assert_array_equal(first.train, second.train)
    assert first.vocabulary == second.vocabulary
    assert first.vocab_size == transformer.KNOWN_TOKENS + 1
    assert first.vocabulary[first.unknown_id] == transformer.UNKNOWN
    assert first.table_rows % 128 == 0 and first.table_rows > first.vocab_size
    assert len(first.train) > 50_000 and first.train.max() == first.unknown_id
    code = "def f(self, x):\n    return self.items[0](x) + g(1, 2)"
    assert first.decode(first.encode(code)) == code
    # Comments and docstrings are gone; other strings stay.
    text = transformer.stdlib_text(["argparse.py"])
    assert "#" not in text and '"""' not in text and "'%(prog)s'" in text


def test_fused_and_materialised_losses_agree_with_padding_rows_untouched() -> None:
    model = transformer.Transformer(
        128, width=16, depth=1, heads=2, context=12, key=jax.random.key(0)
    )
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 100, (3, 12)), jnp.int32)

    def loss(loss_fn: transformer.LossFn) -> tuple[jax.Array, jax.Array]:
        def of_table(table: jax.Array) -> jax.Array:
            changed = eqx.tree_at(lambda m: m.embedding, model, table)
            return loss_fn(changed, tokens, 100, 99)[0]

        return jax.jit(jax.value_and_grad(of_table))(model.embedding)

    (ours, our_grad), (theirs, their_grad) = map(
        loss, (transformer.fused_loss, transformer.materialised_loss)
    )
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    np.testing.assert_allclose(our_grad, their_grad, rtol=1e-5, atol=1e-7)
    assert not np.any(np.asarray(our_grad[100:]))
