"""Small optax training loops on scikit-learn's bundled data sets, for ``make demo``.

scikit-learn does what it already does well: the stratified split, standardisation
(``StandardScaler``), balanced class weights (``compute_class_weight``) and the confusion
matrix. jaxce provides the losses. ``notebooks/03_training_with_optax.ipynb`` writes the same
loop out for the reader.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn import datasets, metrics, model_selection, preprocessing, utils

import jaxce

LossFn = Callable[[jax.Array, jax.Array], jax.Array]
Params = list[tuple[jax.Array, jax.Array]]
EpochCallback = Callable[[int, "History"], None]
ArrayLikeNp = np.ndarray | jax.Array

DATASETS = ("digits", "breast_cancer")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A standardised train / held-out split.

    ``num_classes == 2`` means a binary task with one output logit and float 0/1
    labels; otherwise integer labels in ``[0, num_classes)``.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    class_names: tuple[str, ...]

    @property
    def binary(self) -> bool:
        return self.num_classes == 2


def load(name: str, *, test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """Loads ``"digits"`` or ``"breast_cancer"`` and splits it with a fixed seed.

    The split is stratified; features are standardised with the training
    statistics only. For breast cancer the positive class (label 1) is
    *malignant*, the minority class (212 of 569).
    """
    if name == "digits":
        bunch = datasets.load_digits()
        x, y = bunch.data, bunch.target.astype(np.int32)
        class_names = tuple(str(c) for c in range(10))
    elif name == "breast_cancer":
        bunch = datasets.load_breast_cancer()
        # scikit-learn labels benign 1; the clinically positive class is malignant.
        x, y = bunch.data, (1 - bunch.target).astype(np.float32)
        class_names = ("benign", "malignant")
    else:
        raise ValueError(f"`name` must be one of {DATASETS}, got {name!r}.")
    x_train, x_test, y_train, y_test = model_selection.train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    # Fitted on the training split only; constant features (digits' border pixels) stay 0.
    scaler = preprocessing.StandardScaler().fit(x_train)
    return Dataset(
        name=name,
        x_train=scaler.transform(x_train).astype(np.float32),
        y_train=y_train,
        x_test=scaler.transform(x_test).astype(np.float32),
        y_test=y_test,
        num_classes=len(class_names),
        class_names=class_names,
    )


def init_mlp(key: jax.Array, sizes: Sequence[int]) -> Params:
    """He-initialised dense layers ``sizes[0] -> ... -> sizes[-1]``, zero biases."""
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        (
            jax.random.normal(k, (fan_in, fan_out), jnp.float32) * np.sqrt(2.0 / fan_in),
            jnp.zeros((fan_out,), jnp.float32),
        )
        for k, fan_in, fan_out in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def mlp(params: Params, x: jax.Array) -> jax.Array:
    """ReLU MLP; with one layer it is a linear (logistic regression) model."""
    for w, b in params[:-1]:
        x = jax.nn.relu(x @ w + b[None, :])
    w, b = params[-1]
    return x @ w + b[None, :]


def logits_of(params: Params, x: jax.Array, binary: bool) -> jax.Array:
    """``[n, C]`` logits, or ``[n]`` for a binary task."""
    out = mlp(params, x)
    return out[:, 0] if binary else out


def predict(params: Params, x: ArrayLikeNp, binary: bool) -> np.ndarray:
    """Predicted class indices (0/1 for a binary task)."""
    logits = logits_of(params, jnp.asarray(x), binary)
    return np.asarray(logits > 0 if binary else jnp.argmax(logits, axis=-1)).astype(np.int32)


@dataclasses.dataclass
class History:
    """Per-epoch mean training loss and accuracies; ``params`` after the last epoch."""

    train_loss: list[float] = dataclasses.field(default_factory=list)
    train_accuracy: list[float] = dataclasses.field(default_factory=list)
    test_accuracy: list[float] = dataclasses.field(default_factory=list)
    params: Params | None = None

    @property
    def final_test_accuracy(self) -> float:
        return self.test_accuracy[-1]


def train(
    data: Dataset,
    loss_fn: LossFn,
    *,
    hidden: Sequence[int] = (64,),
    epochs: int = 20,
    batch_size: int = 64,
    learning_rate: float = 1e-2,
    seed: int = 0,
    on_epoch: EpochCallback | None = None,
) -> History:
    """Trains an MLP with ``optax.adam`` on mini-batches of ``data``.

    ``loss_fn(logits, labels)`` returns the scalar batch loss; logits are
    ``[batch, num_classes]`` (``[batch]`` for a binary task). An epoch is one
    jitted ``lax.scan`` over a fresh permutation (the last partial batch is
    dropped), so the whole loop compiles once. The same ``seed`` gives the same
    initialisation and batch order, whatever the loss: two losses that agree
    give the same run.
    """
    binary = data.binary
    sizes = (data.x_train.shape[1], *hidden, 1 if binary else data.num_classes)
    init_key, shuffle_key = jax.random.split(jax.random.key(seed))
    params = init_mlp(init_key, sizes)
    optimizer = optax.adam(learning_rate)
    opt_state = optimizer.init(params)
    x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    num_steps = x_train.shape[0] // batch_size

    def step(
        carry: tuple[Params, optax.OptState], batch: tuple[jax.Array, jax.Array]
    ) -> tuple[tuple[Params, optax.OptState], jax.Array]:
        params, opt_state = carry
        x, y = batch
        loss, grads = jax.value_and_grad(lambda p: loss_fn(logits_of(p, x, binary), y))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    @jax.jit
    def run_epoch(
        params: Params, opt_state: optax.OptState, key: jax.Array
    ) -> tuple[Params, optax.OptState, jax.Array]:
        order = jax.random.permutation(key, x_train.shape[0])[: num_steps * batch_size]
        order = order.reshape(num_steps, batch_size)
        (params, opt_state), losses = jax.lax.scan(
            step, (params, opt_state), (x_train[order], y_train[order])
        )
        return params, opt_state, jnp.mean(losses)

    @jax.jit
    def accuracy(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
        logits = logits_of(params, x, binary)
        predicted = logits > 0 if binary else jnp.argmax(logits, axis=-1)
        return jnp.mean(predicted == y.astype(predicted.dtype))

    history = History()
    for epoch, key in enumerate(jax.random.split(shuffle_key, epochs)):
        params, opt_state, loss = run_epoch(params, opt_state, key)
        history.train_loss.append(float(loss))
        history.train_accuracy.append(float(accuracy(params, x_train, y_train)))
        history.test_accuracy.append(float(accuracy(params, x_test, y_test)))
        history.params = params
        if on_epoch is not None:
            on_epoch(epoch, history)
    return history


def digits_loss(label_smoothing: float = 0.1, weight: ArrayLikeNp | None = None) -> LossFn:
    """jaxce's integer-label softmax cross-entropy, mean over the batch."""

    def loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
        return jaxce.softmax_cross_entropy_with_integer_labels(
            logits, labels, weight=weight, label_smoothing=label_smoothing, reduction="mean"
        )

    return loss


def digits_loss_optax(label_smoothing: float = 0.1) -> LossFn:
    """The same loss written with optax: cross-entropy against smoothed one-hot labels."""

    def loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
        return jnp.mean(optax.losses.softmax_cross_entropy(logits, targets))

    return loss


def breast_cancer_loss(pos_weight: float) -> LossFn:
    """jaxce's sigmoid binary cross-entropy with ``pos_weight``, mean over the batch."""

    def loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
        return jaxce.sigmoid_binary_cross_entropy(
            logits, labels, pos_weight=pos_weight, reduction="mean"
        )

    return loss


def breast_cancer_loss_optax(pos_weight: float) -> LossFn:
    """The same loss with optax, which has no ``pos_weight``: the positive term is reweighted.

    ``-[p_w y log s + (1 - y) log(1 - s)] = p_w y BCE(x, 1) + (1 - y) BCE(x, 0)`` for 0/1 labels.
    """

    def loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
        positive = optax.losses.sigmoid_binary_cross_entropy(logits, jnp.ones_like(logits))
        negative = optax.losses.sigmoid_binary_cross_entropy(logits, jnp.zeros_like(logits))
        return jnp.mean(pos_weight * labels * positive + (1 - labels) * negative)

    return loss


def balanced_class_weight(data: Dataset) -> np.ndarray:
    """scikit-learn's "balanced" weights ``n / (C n_c)`` of the training split (PyTorch's ``weight``)."""
    classes = np.arange(data.num_classes)
    return utils.class_weight.compute_class_weight(
        "balanced", classes=classes, y=np.asarray(data.y_train, np.int64)
    )


def balanced_pos_weight(data: Dataset) -> float:
    """``negatives / positives`` in the training split (PyTorch's usual ``pos_weight``).

    The ratio of the balanced class weights of the positive and the negative class.
    """
    negative, positive = balanced_class_weight(data)
    return float(positive / negative)


def confusion_matrix(data: Dataset, params: Params) -> np.ndarray:
    """Held-out counts, ``[num_classes, num_classes]``: rows the true class, columns predicted."""
    predicted = predict(params, data.x_test, data.binary)
    return metrics.confusion_matrix(
        np.asarray(data.y_test, np.int64), predicted, labels=np.arange(data.num_classes)
    )
