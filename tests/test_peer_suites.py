"""The peers' own test material, run against jaxce.

1. PyTorch's OpInfo samples (``torch.testing._internal.common_methods_invocations.op_db``)
   for ``nn.functional.cross_entropy`` and
   ``nn.functional.binary_cross_entropy_with_logits``: every sample PyTorch's own
   test suite feeds those ops, evaluated by jaxce and by PyTorch in float64; loss
   values and the gradient with respect to the input must agree to 1e-10. The
   samples include class weights of mixed sign (``make_tensor`` draws them from
   [-9, 9]) and probability targets that do not sum to 1; PyTorch's values,
   NaN and infinities included, are the reference there too. The one documented
   difference (a ``"mean"`` over zero counted examples is 0 with zero gradients
   in jaxce, NaN in PyTorch) is asserted as jaxce documents it. PyTorch's draws
   never reach that case nor class weights that sum to 0 over the counted
   examples, so variants of its weighted and ``ignore_index`` samples do.
   The samples of ``nn.functional.linear_cross_entropy`` that lie within
   ``jaxce.linear_cross_entropy``'s signature (a ``[V, D]`` weight, integer
   targets, no class weights) are checked the same way, with the gradients with
   respect to the hidden states, the weight and the bias.
2. optax's own test classes for ``softmax_cross_entropy`` (and its ``-inf``-safe
   variant), ``softmax_cross_entropy_with_integer_labels``,
   ``sigmoid_binary_cross_entropy``, ``sigmoid_focal_loss``,
   ``poly_loss_cross_entropy``, ``kl_divergence`` and
   ``kl_divergence_with_log_targets`` (plus the
   Fenchel-Young test that checks against the integer-label loss), run unchanged
   with jaxce's functions substituted for optax's in ``optax.losses._classification``.
   The documented differences from optax that those classes do not reach are
   asserted by the ``test_optax_difference_*`` tests, on the classes' own fixtures.
3. ``jax_cce`` (a fused linear cross-entropy; it ships no tests): parity of
   ``jaxce.linear_cross_entropy`` with ``jax_cce.linear_cross_entropy`` over what
   the latter accepts (mean reduction, ``shift`` including 2, ``chunk_size``,
   ``vocab_sort_indices``, ``filter_eps=inf``), in float32, values and gradients.
"""

from __future__ import annotations

import functools
import inspect
import os
import pickle
import subprocess
import sys
import tempfile
import unittest
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import jax_cce
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from helpers import REDUCTIONS
from optax.losses import _classification as optax_classification
from optax.losses import _classification_test as optax_classification_test
from optax.losses import _fenchel_young_test as optax_fenchel_young_test

import jaxce

# --------------------------------------------------------------------------------------------
# 1. PyTorch OpInfo samples
# --------------------------------------------------------------------------------------------

TORCH_TOLERANCE = {"rtol": 1e-10, "atol": 1e-12}
CROSS_ENTROPY = "nn.functional.cross_entropy"
BCE_WITH_LOGITS = "nn.functional.binary_cross_entropy_with_logits"
LINEAR_CROSS_ENTROPY = "nn.functional.linear_cross_entropy"
OPINFO_NAMES = (CROSS_ENTROPY, BCE_WITH_LOGITS, LINEAR_CROSS_ENTROPY)


def _dump_opinfo_samples(path: str, names: tuple[str, ...]) -> None:
    """Writes the float64 OpInfo samples of the ops `names` to `path` (a pickle).

    Runs in a fresh interpreter (its source is passed to ``python -c``), so it is
    self-contained: importing ``torch.testing._internal`` loads a hypothesis
    profile of its own (overriding this suite's), disables
    ``torch.backends``' global flags and patches TorchScript's ``__call__``;
    none of that may leak into this test session. Each op's samples are drawn
    from a generator seeded with 0, so the samples (and the test ids) are the
    same in every run and every pytest-xdist worker.
    """
    import pickle
    import random

    import torch

    try:
        from torch.testing._internal.common_methods_invocations import op_db
    except ModuleNotFoundError as error:  # expecttest, a test dependency of PyTorch's suite
        raise SystemExit(
            f"torch.testing._internal cannot be imported ({error}); `pip install expecttest`"
        ) from error

    def plain(value):
        if isinstance(value, torch.Tensor):
            return value.detach().numpy().copy()
        return value

    samples = []
    for name in names:
        (op,) = [op for op in op_db if op.name == name and op.variant_test_name == ""]
        torch.manual_seed(0)
        random.seed(0)
        for sample in op.sample_inputs("cpu", torch.float64, requires_grad=True):
            samples.append(
                {
                    "op": name,
                    "input": plain(sample.input),
                    "args": [plain(arg) for arg in sample.args],
                    "kwargs": {key: plain(value) for key, value in sample.kwargs.items()},
                }
            )
    with open(path, "wb") as file:
        pickle.dump(samples, file)


@functools.cache
def _opinfo_samples() -> tuple[dict[str, Any], ...]:
    source = inspect.getsource(_dump_opinfo_samples)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "samples.pkl")
        script = f"{source}\n_dump_opinfo_samples({path!r}, {OPINFO_NAMES!r})\n"
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
        )
        if result.returncode != 0:
            raise RuntimeError(f"generating PyTorch's OpInfo samples failed:\n{result.stderr}")
        with open(path, "rb") as file:
            return tuple(pickle.load(file))


def _shape(array: np.ndarray) -> str:
    return "x".join(map(str, array.shape)) or "scalar"


def _weight_tag(name: str, weight: np.ndarray) -> str:
    sign = "negative" if np.all(weight < 0) else "mixed-sign" if np.any(weight < 0) else "positive"
    return f"{name}{_shape(weight)}-{sign}"


def _case_id(index: int, sample: dict[str, Any]) -> str:
    """Says what a sample covers: target kind, shapes, options, the sign of weights."""
    kwargs = sample["kwargs"]
    op = sample["op"].rsplit(".", 1)[-1]
    parts = [op, f"{index:02d}"]
    if sample["op"] == LINEAR_CROSS_ENTROPY:
        parts.append(f"hidden{_shape(sample['input'])}-weight{_shape(sample['args'][0])}")
    else:
        parts.append(f"input{_shape(sample['input'])}")
    target = sample["args"][-1]
    if sample["op"] != BCE_WITH_LOGITS:
        parts.append("index-target" if target.dtype.kind in "iu" else "prob-target")
    if "linear_bias" in kwargs:
        parts.append(f"bias{_shape(kwargs['linear_bias'])}")
    if "weight" in kwargs:
        parts.append(_weight_tag("weight", kwargs["weight"]))
    if "pos_weight" in kwargs:
        parts.append(_weight_tag("pos_weight", kwargs["pos_weight"]))
    for key in ("ignore_index", "label_smoothing"):
        if key in kwargs:
            parts.append(f"{key}={kwargs[key]}")
    parts.append(kwargs.get("reduction", "mean(default)"))
    return "-".join(parts)


def _in_jaxce_linear_signature(sample: dict[str, Any]) -> bool:
    """jaxce.linear_cross_entropy takes a [V, D] weight, integer labels and no class weight.

    PyTorch's other samples (an N-d ``linear_weight``, probability targets,
    class ``weight``) have no counterpart in jaxce's signature.
    """
    weight, target = sample["args"]
    return weight.ndim == 2 and target.dtype.kind in "iu" and "weight" not in sample["kwargs"]


def _opinfo_cases(names: tuple[str, ...]) -> list[Any]:
    cases = []
    for name in names:
        for index, sample in enumerate(s for s in _opinfo_samples() if s["op"] == name):
            if name == LINEAR_CROSS_ENTROPY and not _in_jaxce_linear_signature(sample):
                continue
            cases.append(pytest.param(sample, id=_case_id(index, sample)))
    return cases


def _jit_value_and_grad(fn, *args: jax.Array) -> tuple[np.ndarray, ...]:
    """``fn(*args)`` and the gradient of its sum with respect to every argument, under ``jit``."""

    def value_and_grads(*args):
        grads = jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=tuple(range(len(args))))(*args)
        return (fn(*args), *grads)

    return tuple(np.asarray(out) for out in jax.jit(value_and_grads)(*args))


def _class_axis(ndim: int) -> int:
    """PyTorch's class dimension: 1 for inputs of rank >= 2, else 0."""
    return 1 if ndim >= 2 else 0


def _counted_examples(sample: dict[str, Any]) -> int:
    """The denominator count of a ``"mean"``: examples not ignored (elements, for BCE)."""
    x, target = sample["input"], sample["args"][-1]
    if sample["op"] == BCE_WITH_LOGITS:
        return x.size
    if target.dtype.kind in "iu":
        return int(np.sum(target != sample["kwargs"].get("ignore_index", -100)))
    return x.size // x.shape[_class_axis(x.ndim)] if x.ndim else 0


def _jaxce_loss(sample: dict[str, Any]):
    """jaxce's equivalent of the sample's PyTorch call, as a function of the input."""
    kwargs = dict(sample["kwargs"])
    target = jnp.asarray(sample["args"][-1])
    options: dict[str, Any] = {"reduction": kwargs.pop("reduction", "mean")}
    for key in ("weight", "pos_weight", "label_smoothing", "ignore_index"):
        if key in kwargs:
            value = kwargs.pop(key)
            options[key] = jnp.asarray(value) if isinstance(value, np.ndarray) else value
    assert not kwargs, f"unmapped PyTorch options {sorted(kwargs)}"
    if sample["op"] == BCE_WITH_LOGITS:
        return lambda x: jaxce.sigmoid_binary_cross_entropy(x, target, **options)
    axis = _class_axis(sample["input"].ndim)
    if target.dtype.kind in "iu":
        return lambda x: jaxce.softmax_cross_entropy_with_integer_labels(
            x, target, axis=axis, **options
        )
    return lambda x: jaxce.softmax_cross_entropy(x, target, axis=axis, **options)


def _torch_loss(sample: dict[str, Any]):
    op = getattr(F, sample["op"].rsplit(".", 1)[-1])
    target = torch.from_numpy(sample["args"][-1])
    kwargs = {
        key: torch.from_numpy(value) if isinstance(value, np.ndarray) else value
        for key, value in sample["kwargs"].items()
    }
    return lambda x: op(x, target, **kwargs)


def _assert_torch_parity(
    ours: tuple[np.ndarray, ...], theirs: tuple[np.ndarray, ...], names: tuple[str, ...]
) -> None:
    assert len(ours) == len(theirs) == len(names)
    for mine, reference, name in zip(ours, theirs, names, strict=True):
        assert mine.shape == reference.shape, f"{name}: shape {mine.shape} != {reference.shape}"
        # NaN matches NaN, and an infinity only the same infinity.
        np.testing.assert_allclose(mine, reference, **TORCH_TOLERANCE, err_msg=name)


def _zero_weight_sum(sample: dict[str, Any]) -> dict[str, Any]:
    """The sample with class weights whose sum over the counted examples' labels is 0.

    With one counted class, that class gets weight 0 (a ``"mean"`` of 0 / 0);
    with more, two of them get weights of opposite sign that cancel (``+-inf``)
    and the rest 0. PyTorch divides by that zero; DESIGN.md: so does jaxce.
    """
    target = sample["args"][0]
    counted = target[target != sample["kwargs"].get("ignore_index", -100)]
    classes, counts = np.unique(counted, return_counts=True)
    weight = sample["kwargs"]["weight"].copy()
    weight[classes] = 0.0
    if len(classes) > 1:
        weight[classes[0]], weight[classes[1]] = counts[1], -counts[0]
    assert np.sum(weight[counted]) == 0.0
    return {**sample, "kwargs": {**sample["kwargs"], "weight": weight}}


def _all_ignored(sample: dict[str, Any]) -> dict[str, Any]:
    """The sample with every target set to its ``ignore_index``: nothing is counted."""
    target = np.full_like(sample["args"][0], sample["kwargs"]["ignore_index"])
    return {**sample, "args": [target]}


def _variant_cases() -> list[Any]:
    """PyTorch's integer-target cross_entropy samples, changed where PyTorch's draws never go."""
    cases = []
    for index, sample in enumerate(s for s in _opinfo_samples() if s["op"] == CROSS_ENTROPY):
        integer_target = sample["args"][0].dtype.kind in "iu"
        if integer_target and "weight" in sample["kwargs"]:
            variant = _zero_weight_sum(sample)
            cases.append(pytest.param(variant, id=f"{_case_id(index, sample)}-zero-weight-sum"))
            # Distinct labels: weights of opposite sign that cancel.
            target = sample["args"][0]
            distinct = {**sample, "args": [np.arange(target.size).reshape(target.shape) % 3]}
            cases.append(
                pytest.param(
                    _zero_weight_sum(distinct),
                    id=f"{_case_id(index, sample)}-opposite-weights-sum-to-zero",
                )
            )
        if integer_target and "ignore_index" in sample["kwargs"]:
            for reduction in REDUCTIONS:
                variant = _all_ignored(sample)
                variant["kwargs"] = {**variant["kwargs"], "reduction": reduction}
                cases.append(pytest.param(variant, id=f"{_case_id(index, variant)}-all-ignored"))
    return cases


def _check_torch_sample(sample: dict[str, Any]) -> None:
    with jax.enable_x64(True):
        ours = _jit_value_and_grad(_jaxce_loss(sample), jnp.asarray(sample["input"]))
    assert all(out.dtype == np.float64 for out in ours)

    x_t = torch.tensor(sample["input"], requires_grad=True)
    value_t = _torch_loss(sample)(x_t)
    value_t.sum().backward()
    assert x_t.grad is not None
    theirs = (value_t.detach().numpy(), x_t.grad.numpy())

    reduction = sample["kwargs"].get("reduction", "mean")
    if reduction == "mean" and _counted_examples(sample) == 0:
        # The one documented difference: PyTorch's mean over nothing is NaN, jaxce's 0.
        assert np.isnan(theirs[0])
        np.testing.assert_array_equal(ours[0], 0.0)
        np.testing.assert_array_equal(ours[1], np.zeros_like(sample["input"]))
        return
    if not np.all(np.isfinite(theirs[0])):
        # A division by zero (counted weights summing to 0): the loss is PyTorch's
        # (NaN or the same infinity); where PyTorch's gradient is not finite, ours
        # is not either, but it may be the limit (+-inf) where PyTorch's is NaN
        # (its log_softmax backward forms -inf - p * -inf).
        _assert_torch_parity(ours[:1], theirs[:1], ("loss",))
        finite = np.isfinite(theirs[1])
        assert not np.isfinite(ours[1][~finite]).any()
        np.testing.assert_allclose(ours[1][finite], theirs[1][finite], **TORCH_TOLERANCE)
        return
    _assert_torch_parity(ours, theirs, ("loss", "gradient w.r.t. input"))


@pytest.mark.parametrize("sample", _opinfo_cases((CROSS_ENTROPY, BCE_WITH_LOGITS)))
def test_torch_opinfo_sample(sample):
    _check_torch_sample(sample)


@pytest.mark.parametrize("sample", _variant_cases())
def test_torch_opinfo_sample_variant(sample):
    _check_torch_sample(sample)


@pytest.mark.parametrize("sample", _opinfo_cases((LINEAR_CROSS_ENTROPY,)))
def test_torch_opinfo_linear_cross_entropy_sample(sample):
    kwargs = dict(sample["kwargs"])
    hidden, weight = sample["input"], sample["args"][0]
    labels = sample["args"][1]
    bias = kwargs.pop("linear_bias", None)
    reduction = kwargs.pop("reduction", "mean")
    ignore_index = kwargs.pop("ignore_index", None)
    assert not kwargs, f"unmapped PyTorch options {sorted(kwargs)}"
    arrays = (hidden, weight) if bias is None else (hidden, weight, bias)

    with jax.enable_x64(True):

        def loss(hidden, weight, bias=None):
            return jaxce.linear_cross_entropy(
                hidden,
                weight,
                jnp.asarray(labels),
                bias=bias,
                ignore_index=ignore_index,
                reduction=reduction,
            )

        ours = _jit_value_and_grad(loss, *(jnp.asarray(a) for a in arrays))
    assert all(out.dtype == np.float64 for out in ours)

    tensors = [torch.tensor(a, requires_grad=True) for a in arrays]
    value_t = F.linear_cross_entropy(
        tensors[0],
        tensors[1],
        torch.from_numpy(labels),
        linear_bias=tensors[2] if bias is not None else None,
        ignore_index=-100 if ignore_index is None else ignore_index,
        reduction=reduction,
    )
    value_t.sum().backward()
    theirs = (value_t.detach().numpy(), *(t.grad.numpy() for t in tensors))
    names = ("loss", "gradient w.r.t. hidden", "gradient w.r.t. weight", "gradient w.r.t. bias")
    _assert_torch_parity(ours, theirs, names[: len(ours)])


# --------------------------------------------------------------------------------------------
# 2. optax's own test suite, with jaxce substituted
# --------------------------------------------------------------------------------------------

OPTAX_SUBSTITUTES = {
    "softmax_cross_entropy": jaxce.softmax_cross_entropy,
    "softmax_cross_entropy_with_integer_labels": jaxce.softmax_cross_entropy_with_integer_labels,
    "sigmoid_binary_cross_entropy": jaxce.sigmoid_binary_cross_entropy,
    "sigmoid_focal_loss": jaxce.sigmoid_focal_loss,
    # optax's -inf-safe variant (0 log 0 = 0) is what jaxce's softmax_cross_entropy
    # documents for every input; its test class holds jaxce to that.
    "safe_softmax_cross_entropy": jaxce.softmax_cross_entropy,
    "poly_loss_cross_entropy": jaxce.poly_loss_cross_entropy,
    "kl_divergence": jaxce.kl_divergence,
    "kl_divergence_with_log_targets": jaxce.kl_divergence_with_log_targets,
}
OPTAX_TEST_CLASSES = (
    optax_classification_test.SoftmaxCrossEntropyTest,
    optax_classification_test.SafeSoftmaxCrossEntropyTest,
    optax_classification_test.SoftmaxCrossEntropyWithIntegerLabelsTest,
    optax_classification_test.SigmoidCrossEntropyTest,
    optax_classification_test.SigmoidFocalLossTest,
    optax_classification_test.PolyLossTest,
    optax_classification_test.KLDivergenceTest,
    optax_classification_test.KLDivergenceWithLogTargetsTest,
    # Checks the Fenchel-Young loss of logsumexp against the (vmapped) integer-label loss.
    optax_fenchel_young_test.FenchelYoungTest,
)
# jaxce deliberately differs from optax (DESIGN.md) in three ways: a label outside [0, C)
# gives NaN instead of wrapping to the last class; a -inf logit with label 0 (a -inf log
# prediction with target 0, for the divergences) contributes 0, not NaN; half-precision
# inputs are computed in, and return, float32. No method of optax 0.2.8's classes above
# asserts optax's side of any of them, so every method runs as is; the differences are
# asserted on those classes' own fixtures by the test_optax_difference_* tests below.


def _optax_cases() -> list[Any]:
    loader = unittest.TestLoader()
    return [
        pytest.param(suite, method, id=f"{suite.__name__}.{method}")
        for suite in OPTAX_TEST_CLASSES
        for method in loader.getTestCaseNames(suite)
    ]


@pytest.fixture
def jaxce_in_optax(monkeypatch):
    """optax's test modules call ``_classification.<name>``: those names become jaxce's."""
    for name, function in OPTAX_SUBSTITUTES.items():
        monkeypatch.setattr(optax_classification, name, function)


@pytest.fixture
def seeded_numpy_global_rng(request):
    """optax's tests draw from ``np.random``'s global state: seed it per test, then restore."""
    state = np.random.get_state()  # noqa: NPY002
    np.random.seed(zlib.crc32(request.node.nodeid.encode()))  # noqa: NPY002
    yield
    np.random.set_state(state)  # noqa: NPY002


@pytest.mark.usefixtures("jaxce_in_optax", "seeded_numpy_global_rng")
@pytest.mark.parametrize(("suite", "method"), _optax_cases())
def test_optax_suite(suite, method):
    assert optax_classification.softmax_cross_entropy is jaxce.softmax_cross_entropy
    # `debug()` runs setUp, the method and tearDown, and raises what they raise.
    suite(method).debug()


def test_optax_suite_covers_the_substituted_names():
    """Every substituted name is called by a test class that runs."""
    sources = "".join(inspect.getsource(suite) for suite in OPTAX_TEST_CLASSES)
    for name in OPTAX_SUBSTITUTES:
        assert f"_classification.{name}(" in sources or f"_classification.{name})" in sources
    assert len(_optax_cases()) >= 45


def test_optax_difference_out_of_range_label_is_nan():
    """optax wraps a label in [-C, -1] to class label + C; jaxce makes that example's loss NaN.

    (Past C both give NaN.)
    """
    fixture = optax_classification_test.SoftmaxCrossEntropyWithIntegerLabelsTest()
    fixture.setUp()
    ys = fixture.ys
    expected_first = optax.losses.softmax_cross_entropy_with_integer_labels(ys[0], 1)
    expected_first_grad = jax.grad(optax.losses.softmax_cross_entropy_with_integer_labels)(ys[0], 1)

    def value_and_grad(ys, labels):
        loss = jaxce.softmax_cross_entropy_with_integer_labels
        return loss(ys, labels), jax.grad(lambda x: jnp.sum(loss(x, labels)))(ys)

    for bad in (-1, -3, 3):
        labels = np.array([1, bad], np.int32)
        for fn in (value_and_grad, jax.jit(value_and_grad)) if bad == -1 else (value_and_grad,):
            loss, grad = fn(ys, labels)
            assert np.isnan(loss[1]), (bad, loss)
            np.testing.assert_allclose(loss[0], expected_first, rtol=1e-6)
            np.testing.assert_allclose(grad[0], expected_first_grad, rtol=1e-6, atol=1e-7)


def test_optax_difference_minus_inf_logit_with_zero_label():
    """On optax's safe-variant fixture the plain optax loss is NaN; jaxce gives optax's safe value."""
    fixture = optax_classification_test.SafeSoftmaxCrossEntropyTest()
    fixture.setUp()
    ours = np.asarray(jaxce.softmax_cross_entropy(fixture.ys, fixture.ts))
    np.testing.assert_allclose(ours, fixture.exp, atol=1e-4)
    assert np.all(
        np.isnan(np.asarray(optax.losses.softmax_cross_entropy(fixture.ys, fixture.ts))[[2, 4]])
    )
    # Rows with finite loss have finite gradients, exactly 0 on the -inf logits.
    finite_rows = np.array([0, 1, 2, 4])
    grad = jax.grad(lambda x: jnp.sum(jaxce.softmax_cross_entropy(x, fixture.ts[finite_rows])))(
        fixture.ys[finite_rows]
    )
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(np.asarray(grad)[np.isinf(fixture.ys[finite_rows])], 0.0)


def _optax_fixture_inputs() -> dict[str, tuple[Any, Any, dict[str, Any]]]:
    softmax = optax_classification_test.SoftmaxCrossEntropyTest()
    softmax.setUp()
    integer = optax_classification_test.SoftmaxCrossEntropyWithIntegerLabelsTest()
    integer.setUp()
    focal = optax_classification_test.SigmoidFocalLossTest()
    focal.setUp()
    poly = optax_classification_test.PolyLossTest()
    poly.setUp()
    divergence = optax_classification_test.KLDivergenceTest()
    divergence.setUp()
    return {
        "softmax_cross_entropy": (softmax.ys, softmax.ts, {}),
        "softmax_cross_entropy_with_integer_labels": (integer.ys, integer.ts, {}),
        "sigmoid_binary_cross_entropy": (focal.ys, focal.ts, {}),
        "sigmoid_focal_loss": (focal.ys, focal.ts, {"alpha": 0.25, "gamma": 2.0}),
        "poly_loss_cross_entropy": (poly.batched_logits, poly.batched_labels, {"epsilon": 2.0}),
        # Its second row has a zero target: 0 log 0 = 0 on both sides (finite log predictions).
        "kl_divergence": (divergence.log_ps, divergence.qs, {}),
    }


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize(
    "name",
    [
        "softmax_cross_entropy",
        "softmax_cross_entropy_with_integer_labels",
        "sigmoid_binary_cross_entropy",
        "sigmoid_focal_loss",
        "poly_loss_cross_entropy",
        "kl_divergence",
    ],
)
def test_optax_difference_half_precision_is_computed_in_float32(name, dtype):
    """optax computes (and returns) half precision; jaxce computes and returns float32.

    The value is optax's on the same (exactly representable) logits upcast to
    float32; the gradient comes back in the input's dtype.
    """
    logits, labels, options = _optax_fixture_inputs()[name]
    half = jnp.asarray(logits, dtype)
    ours = getattr(jaxce, name)(half, labels, **options)
    assert ours.dtype == jnp.float32
    reference = getattr(optax.losses, name)(half.astype(jnp.float32), labels, **options)
    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-7)
    grad = jax.grad(lambda x: jnp.sum(getattr(jaxce, name)(x, labels, **options)))(half)
    assert grad.dtype == dtype
    reference_grad = jax.grad(lambda x: jnp.sum(getattr(optax.losses, name)(x, labels, **options)))(
        half.astype(jnp.float32)
    )
    np.testing.assert_allclose(
        np.asarray(grad, np.float32), reference_grad.astype(dtype).astype(jnp.float32), rtol=1e-2
    )


# --------------------------------------------------------------------------------------------
# 3. jax_cce (ships no tests): parity of jaxce.linear_cross_entropy with its public function
# --------------------------------------------------------------------------------------------

VOCAB, DIM = 11, 8
CCE_TOLERANCE = {"rtol": 2e-5, "atol": 2e-6}
# (id, labels' shape, shift, jax_cce options, jaxce options). jax_cce takes [N, D] without a
# shift and [..., T, D] with one; it has no ignore index, soft cap, bias or reduction other
# than the mean.
JAX_CCE_CASES = [
    ("tokens6-shift0-cce_chunk4-jaxce_chunk2", (6,), 0, {"chunk_size": 4}, {"chunk_size": 2}),
    ("batch2x5-shift0-cce_flattened", (2, 5), 0, {"chunk_size": 16}, {}),
    ("batch2x5-shift1", (2, 5), 1, {"chunk_size": 4}, {}),
    ("seq7-shift2", (7,), 2, {"chunk_size": 4}, {}),
    ("batch2x5-shift2", (2, 5), 2, {"chunk_size": 4}, {}),
    ("batch2x5-shift2-jaxce_chunk3", (2, 5), 2, {"chunk_size": 5}, {"chunk_size": 3}),
    ("batch3x4-shift3", (3, 4), 3, {"chunk_size": 4}, {}),
    ("batch2x5-shift2-cce_vocab_sorted", (2, 5), 2, {"chunk_size": 4, "sort": True}, {}),
    ("batch2x5-shift1-cce_filter_eps_inf", (2, 5), 1, {"filter_eps": float("inf")}, {}),
]


def _cce_inputs(case: str, labels_shape: tuple[int, ...]):
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    hidden = rng.normal(size=(*labels_shape, DIM)).astype(np.float32)
    weight = (rng.normal(size=(VOCAB, DIM)) * 0.7).astype(np.float32)
    labels = rng.integers(0, VOCAB, size=labels_shape).astype(np.int32)
    return jnp.asarray(hidden), jnp.asarray(weight), jnp.asarray(labels), rng


def _jax_cce_loss(hidden, weight, labels, shift, options, rng):
    options = dict(options)
    if options.pop("sort", False):
        options["vocab_sort_indices"] = jnp.asarray(rng.permutation(VOCAB))
    if shift == 0:
        hidden, labels = hidden.reshape(-1, DIM), labels.reshape(-1)
    return jax_cce.linear_cross_entropy(hidden, weight, labels, shift=shift, **options)


@pytest.mark.parametrize(
    ("case", "labels_shape", "shift", "cce_options", "jaxce_options"),
    JAX_CCE_CASES,
    ids=[case[0] for case in JAX_CCE_CASES],
)
def test_jax_cce_parity(case, labels_shape, shift, cce_options, jaxce_options):
    hidden, weight, labels, rng = _cce_inputs(case, labels_shape)

    def ours(hidden, weight):
        return jaxce.linear_cross_entropy(hidden, weight, labels, shift=shift, **jaxce_options)

    def theirs(hidden, weight):
        return _jax_cce_loss(hidden, weight, labels, shift, cce_options, rng)

    ours_outputs = _jit_value_and_grad(ours, hidden, weight)
    theirs_outputs = _jit_value_and_grad(theirs, hidden, weight)
    names = ("loss", "gradient w.r.t. hidden", "gradient w.r.t. weight")
    assert ours_outputs[0].shape == ()
    for name, mine, reference in zip(names, ours_outputs, theirs_outputs, strict=True):
        assert mine.dtype == np.float32, name
        np.testing.assert_allclose(mine, reference, **CCE_TOLERANCE, err_msg=name)


@pytest.mark.parametrize("shift", [1, 2])
def test_jax_cce_mean_is_jaxce_sum_and_none_over_predicted_positions(shift):
    """jax_cce's mean over the B * (T - k) predicting positions, from jaxce's other reductions."""
    batch, length = 2, 5
    hidden, weight, labels, rng = _cce_inputs(f"reductions-{shift}", (batch, length))
    theirs = _jax_cce_loss(hidden, weight, labels, shift, {"chunk_size": 4}, rng)

    @jax.jit
    def ours(hidden, weight, labels):
        total = jaxce.linear_cross_entropy(hidden, weight, labels, shift=shift, reduction="sum")
        per_token = jaxce.linear_cross_entropy(
            hidden, weight, labels, shift=shift, reduction="none"
        )
        # The same tokens, unshifted: hidden[:, :T-k] against labels[:, k:].
        unshifted = jaxce.linear_cross_entropy(
            hidden[:, : length - shift], weight, labels[:, shift:], reduction="none"
        )
        return total, per_token, unshifted

    total, per_token, unshifted = (np.asarray(out) for out in ours(hidden, weight, labels))
    np.testing.assert_allclose(total / (batch * (length - shift)), theirs, **CCE_TOLERANCE)
    # Position t predicts labels[..., t + shift]: the first T - shift positions do.
    predicting = per_token[..., : length - shift]
    np.testing.assert_allclose(predicting.mean(), theirs, **CCE_TOLERANCE)
    np.testing.assert_allclose(predicting, unshifted, **CCE_TOLERANCE)
