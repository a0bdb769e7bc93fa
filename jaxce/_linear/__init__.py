"""Linear + cross-entropy for large vocabularies, without the ``[tokens, vocab]`` logits.

The tokens are processed in chunks inside a loop; a chunk's ``[chunk, V]``
logits are the largest thing alive at any time. By role:

- ``api``: :func:`linear_cross_entropy`, its derivative rules, and
  :func:`gradients` (what ``jaxce.derivatives`` returns);
- ``plan``: the chunk and vocabulary block per platform
  (:func:`plan_linear_cross_entropy`);
- ``prepare``: the arguments checked and bundled once (``Prepared``);
- ``chunks``: the chunk loops, float32 and bfloat16 paths apart;
- ``xla_cpu``: what the loops do differently because of XLA:CPU.

The materialised reference the tests, the benchmarks and ``jaxce.verify``
compare with is ``jaxce._references.linear_cross_entropy``.
"""

from jaxce._linear.api import gradients as gradients
from jaxce._linear.api import linear_cross_entropy as linear_cross_entropy
from jaxce._linear.api import reduce as reduce
from jaxce._linear.chunks import LinearCrossEntropyAux as LinearCrossEntropyAux
from jaxce._linear.plan import LinearCrossEntropyPlan as LinearCrossEntropyPlan
from jaxce._linear.plan import default_chunk_size as default_chunk_size
from jaxce._linear.plan import plan_linear_cross_entropy as plan_linear_cross_entropy
from jaxce._linear.prepare import check_shift as check_shift
from jaxce._linear.prepare import check_softcap as check_softcap
