"""jaxce: numerically stable, jit-compiled cross-entropy losses for JAX."""

import importlib as _importlib
import pathlib as _pathlib
import types as _types
import typing as _typing
from importlib import metadata as _metadata

from jaxce import derivatives as derivatives
from jaxce import sharded as sharded
from jaxce._binary import sigmoid_binary_cross_entropy as sigmoid_binary_cross_entropy
from jaxce._binary import sigmoid_focal_loss as sigmoid_focal_loss
from jaxce._checked import checked as checked
from jaxce._divergence import kl_divergence as kl_divergence
from jaxce._divergence import kl_divergence_with_log_targets as kl_divergence_with_log_targets
from jaxce._linear import LinearCrossEntropyAux as LinearCrossEntropyAux
from jaxce._linear import LinearCrossEntropyPlan as LinearCrossEntropyPlan
from jaxce._linear import linear_cross_entropy as linear_cross_entropy
from jaxce._linear import linear_distillation_loss as linear_distillation_loss
from jaxce._linear import plan_linear_cross_entropy as plan_linear_cross_entropy
from jaxce._polynomial import poly_loss_cross_entropy as poly_loss_cross_entropy
from jaxce._polynomial import softmax_focal_loss as softmax_focal_loss
from jaxce._primitives import log1m_sigmoid as log1m_sigmoid
from jaxce._primitives import log_sigmoid as log_sigmoid
from jaxce._primitives import log_softmax as log_softmax
from jaxce._primitives import logsumexp as logsumexp
from jaxce._probabilities import binary_cross_entropy as binary_cross_entropy
from jaxce._probabilities import categorical_cross_entropy as categorical_cross_entropy
from jaxce._softmax import softmax_cross_entropy as softmax_cross_entropy
from jaxce._softmax import (
    softmax_cross_entropy_with_integer_labels as softmax_cross_entropy_with_integer_labels,
)

__all__ = [
    "LinearCrossEntropyAux",
    "LinearCrossEntropyPlan",
    "bench",
    "binary_cross_entropy",
    "categorical_cross_entropy",
    "checked",
    "derivatives",
    "kl_divergence",
    "kl_divergence_with_log_targets",
    "linear_cross_entropy",
    "linear_distillation_loss",
    "log1m_sigmoid",
    "log_sigmoid",
    "log_softmax",
    "logsumexp",
    "plan_linear_cross_entropy",
    "poly_loss_cross_entropy",
    "sharded",
    "sigmoid_binary_cross_entropy",
    "sigmoid_focal_loss",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "softmax_focal_loss",
    "verify",
]

if _typing.TYPE_CHECKING:
    from jaxce import bench as bench
    from jaxce import verify as verify

# The tooling (timing, gradient verification) loads on first use, so that `import jaxce` does
# not import argparse, tqdm or the command's modules (PEP 562).
_ON_DEMAND = ("bench", "verify")


def __getattr__(name: str) -> _types.ModuleType:
    if name in _ON_DEMAND:
        return _importlib.import_module(f"jaxce.{name}")
    raise AttributeError(f"module 'jaxce' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_ON_DEMAND})


def _version() -> str:
    """The installed distribution's version; from a source checkout, pyproject.toml's."""
    try:
        return _metadata.version("jaxce")
    except _metadata.PackageNotFoundError:
        pass
    # Not installed (the checkout on PYTHONPATH): the one place the version is written.
    import tomllib

    pyproject = _pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
    except (OSError, tomllib.TOMLDecodeError):
        return "0+unknown"
    if project.get("name") != "jaxce" or "version" not in project:
        return "0+unknown"
    return str(project["version"])


__version__ = _version()
