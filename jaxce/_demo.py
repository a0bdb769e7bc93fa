"""``python -m jaxce demo``: the library's main job, end to end."""

from __future__ import annotations

import numpy as np

import jaxce


def reference_examples() -> list[tuple[str, float, float, float]]:
    """The worked examples of the reference documents: (name, jaxce, NumPy, printed)."""
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


def main(argv: list[str]) -> int:
    del argv
    print("Worked examples of the reference documents (their printed values were wrong):")
    print(f"{'example':40s} {'jaxce':>12s} {'NumPy':>12s} {'document':>12s}")
    for name, ours, numpy_value, printed in reference_examples():
        print(f"{name:40s} {ours:12.9f} {numpy_value:12.9f} {printed:12.6g}")
    return 0
