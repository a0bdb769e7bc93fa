"""Linear + cross-entropy for large vocabularies, without the ``[tokens, vocab]`` logits.

The tokens are processed in chunks inside a loop; a chunk's ``[chunk, V]``
logits are the largest thing alive at any time. By role:

- ``api``: :func:`linear_cross_entropy`, its derivative rules, and
  :func:`gradients` (what ``jaxce.derivatives`` returns);
- ``options``: the options as one frozen value, checked once (``Options``);
- ``plan``: the chunk and vocabulary block per platform
  (:func:`plan_linear_cross_entropy`);
- ``prepare``: the arrays checked against the options and bundled once
  (``PreparedCall``);
- ``chunks``: the chunk loops, float32 and bfloat16 paths apart;
- ``distill``: :func:`linear_distillation_loss`, a student's softmax toward a
  teacher's through the same plan and loop;
- ``xla_cpu``: what the loops do differently because of XLA:CPU.

The row formulas inside the loops (log-sum-exp, smoothing, z-loss, soft cap
and temperature) are `jaxce._formulas`'. The materialised reference the
tests, the benchmarks and ``jaxce.verify`` compare with is
``jaxce._references.linear_cross_entropy``.
"""

from jaxce._linear.api import gradients as gradients
from jaxce._linear.api import linear_cross_entropy as linear_cross_entropy
from jaxce._linear.api import reduced_loss as reduced_loss
from jaxce._linear.chunks import LinearCrossEntropyAux as LinearCrossEntropyAux
from jaxce._linear.distill import linear_distillation_loss as linear_distillation_loss
from jaxce._linear.options import Options as Options
from jaxce._linear.plan import LinearCrossEntropyPlan as LinearCrossEntropyPlan
from jaxce._linear.plan import default_chunk_size as default_chunk_size
from jaxce._linear.plan import plan_linear_cross_entropy as plan_linear_cross_entropy
from jaxce._linear.prepare import prepare_call as prepare_call
