r"""The objective: one pure function of one flat parameter vector.

Everything above this layer sees a 1-D tensor :math:`\theta` and four methods:

.. math::

    L(\theta) = \frac{\sum_b n_b \, \ell_b(\theta)}{\sum_b n_b}, \qquad
    g(\theta) = \nabla L(\theta), \qquad
    H(\theta)\,v = \nabla\big(g(\theta)^\top v\big), \qquad
    H(\theta) = \nabla^2 L(\theta),

where :math:`\ell_b` is the (mean) loss of batch :math:`b` of :math:`n_b` samples, so the
Hessian over several batches is exactly the full-data Hessian (a loss that sums over its batch is
added instead: :math:`L = \sum_b \ell_b`). The data are one fixed set: batches are read once and
kept, or a loader is re-read on every pass and each pass checked to hold the first pass's batches.

Under ``torch.distributed`` the batches of every rank enter the same sums: each rank divides its
local sum by the global count and one all-reduce per loss, gradient or batch of products adds the
ranks' parts (:mod:`saddlescope.distributed`).

One HVP engine serves the whole package: :class:`GradientGraph`. It computes the gradient at
:math:`\theta` once with ``create_graph=True`` and answers every product :math:`Hv` with one
backward pass through that graph (double backward). ``bench/hvp_engines.py`` measures why:
forward-over-reverse ``jvp(grad(f))`` rebuilds the gradient for every product and costs several
gradients; the reused graph costs about one and a half. With several data batches, each batch's
graph is kept while they fit a memory budget and rebuilt for every product beyond it
(:class:`GraphPlan`; ``bench/everyday.py`` measures the difference).
"""

from saddlescope.objective.checks import all_finite
from saddlescope.objective.data import Batch
from saddlescope.objective.graph import (
    KEPT_GRAPHS_MEMORY_SHARE,
    UNKNOWN_MEMORY_BUDGET_BYTES,
    GradientGraph,
    GraphPlan,
    one_time_costs,
)
from saddlescope.objective.model_call import REDUCTIONS
from saddlescope.objective.objective import DEFAULT_EXACT_BUDGET_BYTES, Objective

__all__ = [
    "DEFAULT_EXACT_BUDGET_BYTES", "KEPT_GRAPHS_MEMORY_SHARE", "REDUCTIONS", "UNKNOWN_MEMORY_BUDGET_BYTES",
    "Batch", "GradientGraph", "GraphPlan", "Objective", "all_finite", "one_time_costs",
]
