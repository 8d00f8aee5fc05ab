"""How ``analyze(exact=None)`` chooses between the exact and the iterative path: by predicted cost.

The exact path costs ``n`` columns of Hessian-vector products plus a dense ``eigh``; the iterative
verdict about a fixed number of single products. Both are predicted from products timed on the
model at the point (after an untimed warm-up that pays the process's one-time costs), so a
1,480-parameter CNN whose product takes a second is not sent down a 40-minute exact build because
it is "small".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from saddlescope.objective import DEFAULT_EXACT_BUDGET_BYTES, GradientGraph, Objective
from saddlescope.objective.objective import hessian_chunk  # the exact build's chunk, timed here

__all__ = ["EXACT_AFFORDABLE_S", "EXACT_MAX_PARAMS", "ITERATIVE_BASE_PRODUCTS", "PathPlan", "plan_path"]

# The automatic choice of analyze(exact=None) (plan_path): the full Hessian only up to this many
# parameters, and only when its predicted cost beats the iterative verdict's or is below
# EXACT_AFFORDABLE_S seconds.
EXACT_MAX_PARAMS = 4096
EXACT_AFFORDABLE_S = 2.0
# The best a batched backward did per column against a single product (bench/everyday.py: x8 on the
# digits MLP 2.0 ms against 2.8 ms, 1.4x; x4-x32 slower on a CNN and a transformer): when even this cannot
# make the exact path win, the batched form is not timed at all (timing 32 columns of the 1,480-parameter
# CNN cost 6 s of a 34 s verdict).
BEST_BATCHED_SPEEDUP = 1.5
# Products are timed up to three times, the least taken (the first after a warm-up ran 1.5-2.5x the steady
# cost on the CNN), while the timing has cost less than this.
TIMING_BUDGET_S = 0.5
# Products of the iterative verdict besides the index estimate: both ends of the spectrum and their
# confirmation (measured 60-110 on MLPs; a round figure on the high side).
ITERATIVE_BASE_PRODUCTS = 100
# LAPACK's syevd with vectors, one thread on this class of CPU: seconds per n^3 (1.7e-10 at n = 2,000,
# 3.8e-10 at 500, both measured with other work running; the cubic term matters only for large n).
EIGH_SECONDS_PER_N3 = 2e-10


@dataclass
class PathPlan:
    """How ``analyze(exact=None)`` chose its path.

    The exact path costs ``n`` columns of batched products plus ``eigh``; the iterative verdict about
    ``iterative_products`` single products. Both are predicted from products timed on this model at
    this point (after one untimed warm-up product, which pays the one-time costs of the process).

    Attributes:
        exact: the path taken.
        measured: products were timed (False when the choice needed no timing: too many parameters,
            too little memory, or fewer parameters than the iterative verdict's products).
        product_s, column_s: one product; one column of the batched exact build (a chunk / its size).
        predicted_exact_s, predicted_iterative_s: the predictions compared.
        chunk_size: columns per product in the exact build (1 when single products measured faster).
        iterative_products: the iterative verdict's predicted product count.
        graph_plan: which data batches' gradient graphs the timed products reused
            (:meth:`GraphPlan.to_dict <saddlescope.objective.GraphPlan.to_dict>`): the analysis builds its
            graphs under the same policy, so the timing is the one it will see.
        reason: one sentence.
        graph: the gradient graph the products were timed on, handed to the iterative analysis so it is
            not built twice (not in :meth:`to_dict`; ``analyze`` drops it when done).
    """

    exact: bool
    measured: bool
    reason: str
    n_params: int
    iterative_products: int
    product_s: float | None = None
    column_s: float | None = None
    predicted_exact_s: float | None = None
    predicted_iterative_s: float | None = None
    chunk_size: int | None = None
    graph_plan: dict[str, Any] | None = None
    graph: GradientGraph | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key != "graph"}


def plan_path(
    objective: Objective,
    theta: Tensor,
    *,
    exact_max_params: int = EXACT_MAX_PARAMS,
    max_bytes: int = DEFAULT_EXACT_BUDGET_BYTES,
    iterative_products: int = ITERATIVE_BASE_PRODUCTS,
    affordable_s: float = EXACT_AFFORDABLE_S,
    seed: int = 0,
) -> PathPlan:
    """Choose the exact or the iterative path by predicted cost (see :class:`PathPlan`)."""
    n = objective.n_params
    itemsize = torch.finfo(objective.dtype).bits // 8
    if n > exact_max_params or 3 * n * n * itemsize > max_bytes:
        return PathPlan(False, False, f"iterative: {n:,} parameters exceed the exact path's limit "
                        f"({exact_max_params:,} parameters, {max_bytes / 2**30:.1f} GiB)", n, iterative_products)
    if n <= iterative_products:
        return PathPlan(True, False, f"exact: {n} parameters need fewer products than the iterative "
                        f"verdict's ~{iterative_products}", n, iterative_products)
    # The default graph policy, as the analysis's own graphs will have: with several data batches the
    # products reuse the kept graphs, or rebuild those that do not fit (GraphPlan), and are timed so.
    graph = objective.gradient_graph(theta)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    chunk = min(n, hessian_chunk(n))
    vectors = torch.randn(chunk, n, generator=gen, dtype=torch.float64).to(objective.device, objective.dtype)
    graph.hvp(vectors[0])  # warm-up: lazy imports and first-call costs belong to no path
    times = [_timed(lambda: graph.hvp(vectors[0]), objective.device)]
    while len(times) < 3 and sum(times) < TIMING_BUDGET_S:  # the least disturbed of up to three
        times.append(_timed(lambda: graph.hvp(vectors[0]), objective.device))
    product_s = min(times)
    iterative_s = iterative_products * product_s
    eigh_s = EIGH_SECONDS_PER_N3 * n**3
    if n * product_s / BEST_BATCHED_SPEEDUP + eigh_s > max(iterative_s, affordable_s):
        column_s, chunk_size = None, None  # batching cannot rescue the exact path: not timed
        exact_s = n * product_s + eigh_s
    else:
        graph.hvp_batch(vectors[:2])  # vmap's first-call cost
        column_s = _timed(lambda: graph.hvp_batch(vectors), objective.device) / chunk
        # The exact build takes whichever form measured faster: a batched backward (is_grads_batched),
        # or one product at a time (faster on the digits MLP: vmap's overhead outweighs the batching).
        chunk_size = chunk if column_s < product_s else 1
        exact_s = n * min(column_s, product_s) + eigh_s
    exact = exact_s <= max(iterative_s, affordable_s)
    verdict = "exact" if exact else "iterative"
    form = "one product each" if chunk_size in (None, 1) else f"batches of {chunk}"
    per_column = product_s if column_s is None else min(column_s, product_s)
    reason = (f"path {verdict}: the exact Hessian is predicted to take {exact_s:.3g} s ({n:,} columns, {form}, at "
              f"{per_column * 1e3:.3g} ms + eigh) and the iterative verdict {iterative_s:.3g} s "
              f"(~{iterative_products} products at {product_s * 1e3:.3g} ms)")
    if graph.plan.recomputed:
        reason += f"; products timed with {graph.plan.kept} of {graph.plan.batches} batch graphs kept"
    if exact and exact_s > iterative_s:
        reason += f"; exact since it costs at most {affordable_s:g} s and gives the whole spectrum"
    return PathPlan(exact, True, reason, n, iterative_products, product_s, column_s, exact_s, iterative_s, chunk_size,
                    graph.plan.to_dict(), graph=None if exact else graph)


def _timed(work: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
