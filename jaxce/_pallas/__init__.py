"""Pallas kernels: ``implementation="pallas"`` of the integer-label softmax cross-entropy.

`kernels` holds the two row kernels and their launch (Triton on CUDA, Pallas
interpret mode elsewhere); `terms` the derivative rule and the loss built on
`jaxce._integer_labels`' shared rules.
"""

from jaxce._pallas.terms import integer_label_loss as integer_label_loss
from jaxce._pallas.terms import runs_kernel as runs_kernel
