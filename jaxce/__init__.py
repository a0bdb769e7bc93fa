"""jaxce: numerically stable, jit-compiled cross-entropy losses for JAX."""

from importlib import metadata as _metadata

from jaxce import bench as bench
from jaxce import derivatives as derivatives
from jaxce import sharded as sharded
from jaxce import verify as verify
from jaxce._binary import sigmoid_binary_cross_entropy as sigmoid_binary_cross_entropy
from jaxce._binary import sigmoid_focal_loss as sigmoid_focal_loss
from jaxce._checked import checked as checked
from jaxce._linear import LinearCrossEntropyAux as LinearCrossEntropyAux
from jaxce._linear import LinearCrossEntropyPlan as LinearCrossEntropyPlan
from jaxce._linear import linear_cross_entropy as linear_cross_entropy
from jaxce._linear import plan_linear_cross_entropy as plan_linear_cross_entropy
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
    "linear_cross_entropy",
    "log1m_sigmoid",
    "log_sigmoid",
    "log_softmax",
    "logsumexp",
    "plan_linear_cross_entropy",
    "sharded",
    "sigmoid_binary_cross_entropy",
    "sigmoid_focal_loss",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "verify",
]

# The one place the version is written is pyproject.toml.
__version__ = _metadata.version("jaxce")
