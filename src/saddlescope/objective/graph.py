r"""The package's one HVP engine, :class:`GradientGraph`: the gradient at :math:`\theta` kept
differentiable so that each product :math:`Hv = \nabla(g^\top v)` is one backward pass through it (double
backward; Pearlmutter 1994, "Fast exact multiplication by the Hessian", Neural Computation 6), each data
batch's graph kept between products while :class:`GraphPlan`'s memory budget allows. Why this engine and
not forward-over-reverse is in :mod:`saddlescope.objective`; ``bench/hvp_engines.py`` measures it.

A graph reads its objective through :class:`GraphObjective`, the few members it needs:
:class:`~saddlescope.objective.objective.Objective` has them, and builds its graphs with
:meth:`~saddlescope.objective.objective.Objective.gradient_graph`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from saddlescope.errors import EmptyDataError, InvalidInputError, ThetaError, UnsupportedModelError
from saddlescope.memory import SavedTensorBytes, available_memory, describe_bytes
from saddlescope.objective.checks import finite
from saddlescope.objective.data import Batch, input_elements

__all__ = [
    "BATCHED_PRODUCT_BYTES", "BATCHED_PRODUCT_MEMORY_SHARE", "KEPT_GRAPHS_MEMORY_SHARE", "PRODUCT_ROW_VECTORS", "UNKNOWN_MEMORY_BUDGET_BYTES", "GradientGraph", "GraphObjective", "GraphPlan",
    "one_time_costs",
]


class GraphObjective(Protocol):
    """What a :class:`GradientGraph` reads from its objective, and the three attributes it writes.

    Attributes:
        n_params, dtype, device: what ``theta`` and every vector must have.
        keep_graphs, graph_memory_budget: the graph policy when the caller gives none (see
            :class:`GradientGraph`).
        graph_plan: written: the :class:`GraphPlan` of the graph built last.
        math_attention: read, and set once a fused attention kernel lacks a double backward.
        notes: appended to: what a reader of the result should know.
        _held: tensors that live as long as the objective (a graph saving them costs nothing extra).
    """

    n_params: int
    dtype: torch.dtype
    device: torch.device
    keep_graphs: bool | None
    graph_memory_budget: int | None
    graph_plan: GraphPlan | None
    math_attention: bool
    notes: list[str]
    _held: list[Tensor]

    def _batches(self) -> Iterator[Batch]:
        """This rank's data batches, one pass."""
        ...

    def batch_share(self, theta: Tensor, batch: Batch) -> Tensor:
        r"""Batch ``batch``'s share of :math:`L(\theta)`, differentiable in ``theta``."""
        ...

    def check_theta(self, theta: Any, name: str = "theta") -> Tensor:
        """``theta`` if it is a valid parameter vector, else a :class:`~saddlescope.errors.ThetaError`."""
        ...

    def _check_same_theta(self, theta: Tensor) -> None:
        """Every rank must be at the same ``theta`` (under ``torch.distributed``)."""
        ...

    def _all_sum(self, tensor: Tensor, what: str) -> Tensor:
        """``tensor`` summed over the ranks."""
        ...

    def _all_sum_pair(self, loss: Tensor, grad: Tensor, what: str) -> tuple[Tensor, Tensor]:
        """Loss and gradient summed over the ranks in one collective."""
        ...


# Kept gradient graphs (GradientGraph, keep_graphs=None) may take this share of the memory free when
# they are built (host memory on a CPU, the GPU's own on a GPU): the other half is left to the Krylov
# basis, the products' temporaries and the rest of the process.
KEPT_GRAPHS_MEMORY_SHARE = 0.5


# Their budget where the free memory cannot be read (a device other than CPU or CUDA, no /proc/meminfo
# and no psutil).
UNKNOWN_MEMORY_BUDGET_BYTES = 1024**3


# A batch of products (GradientGraph.hvp_batch) runs its rows in passes whose estimated temporaries,
# rows x (one batch's graph + PRODUCT_ROW_VECTORS parameter-sized vectors), stay under this many bytes
# and under BATCHED_PRODUCT_MEMORY_SHARE of the free memory. A vmapped double backward holds about one
# copy of the graph's saved activations per row, and on a CPU it is no faster per row
# (bench/batched_products.py, one thread, float32: one pass of k rows took 1.1-1.85x the time of k single
# products, and a 5-row pass on a 1M-parameter GPT-2 added 414 MB where single products added 35). So
# only passes of small rows are batched (the digits MLP's exact Hessian: 32 rows a pass).
BATCHED_PRODUCT_BYTES = 64 * 2**20
BATCHED_PRODUCT_MEMORY_SHARE = 0.25
PRODUCT_ROW_VECTORS = 4


# One-time costs paid in this process (seconds, by name): see _pay_one_time_costs.
_ONE_TIME_COSTS: dict[str, float] = {}


def one_time_costs() -> dict[str, float]:
    """The one-time costs this process has paid so far, in seconds (for benchmarks: report them apart).

    ``"double_backward_warmup"``: the first double backward in a process imports PyTorch's symbolic-shape
    machinery (sympy, ~480 modules; 0.4-2.4 s on a 2-core machine). :class:`GradientGraph` pays it on a
    2-element tensor when the first one is built, so no timed product (``plan_path``'s included) does.
    """
    return dict(_ONE_TIME_COSTS)


def _pay_one_time_costs() -> None:
    if "double_backward_warmup" in _ONE_TIME_COSTS:
        return
    start = time.perf_counter()
    with torch.enable_grad():
        x = torch.ones(2, dtype=torch.float64, device="cpu", requires_grad=True)
        (g,) = torch.autograd.grad((x**3).sum(), x, create_graph=True)
        torch.autograd.grad(g, x, torch.ones_like(x), retain_graph=True)
        torch.autograd.grad(g, x, torch.ones(2, 2, dtype=torch.float64, device="cpu"), is_grads_batched=True)
    _ONE_TIME_COSTS["double_backward_warmup"] = time.perf_counter() - start


@dataclass(frozen=True)
class GraphPlan:
    """Which data batches keep their gradient graph between products, and why.

    Keeping batch b's graph saves one forward and one gradient of that batch per product (a third of
    the product on a BatchNorm CNN and on a small transformer) and costs its memory for as long as the
    graph lives. The graphs of the first :attr:`kept` batches of a pass are kept; the others are
    rebuilt for every product, one at a time.

    Attributes:
        policy: ``"auto"`` (kept as far as :attr:`budget_bytes` allows), ``"keep"`` (``keep_graphs=True``:
            all kept, memory not checked) or ``"recompute"`` (``keep_graphs=False``).
        batches: the data batches (this rank's, under ``torch.distributed``).
        kept: batches whose graphs are kept (the first ``kept`` of a pass).
        recomputed: batches rebuilt for every product (``batches - kept``).
        bytes_per_graph: the memory one batch's graph holds, measured on the first batch (the distinct
            storages its nodes save for backward, plus the gradient; on a GPU at least the allocator's
            growth); batches with more input elements than the first are scaled up. None when not
            measured (a forced policy, or a single batch).
        budget_bytes: the bytes kept graphs may take: ``memory_budget``, else
            :data:`KEPT_GRAPHS_MEMORY_SHARE` of the free memory. None when not asked.
        budget_source: where the budget came from (``"memory_budget"``, ``"MemAvailable"``, ``"cgroup
            memory limit"``, ``"psutil"``, ``"torch.cuda.mem_get_info"``, or ``"unknown"``).
        reason: one sentence.
    """

    policy: str
    batches: int
    kept: int
    reason: str
    bytes_per_graph: int | None = None
    budget_bytes: int | None = None
    budget_source: str | None = None

    @property
    def recomputed(self) -> int:
        return self.batches - self.kept

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "batches": self.batches, "kept": self.kept, "recomputed": self.recomputed,
                "bytes_per_graph": self.bytes_per_graph, "budget_bytes": self.budget_bytes,
                "budget_source": self.budget_source, "reason": self.reason}


class GradientGraph:
    r"""The gradient at one ``theta``, kept differentiable so each HVP is one backward pass.

    Building costs one gradient with ``create_graph=True``; each product :math:`Hv` is then one
    double-backward pass per batch, :math:`Hv = \sum_b \nabla(g_b^\top v)`, and a batch of products
    ``V`` (rows) vmapped passes per batch (``is_grads_batched``), as many rows a pass as keep the
    estimated temporaries under :data:`BATCHED_PRODUCT_BYTES` (:meth:`rows_per_pass`). Each data batch's graph is kept
    between products while the graphs fit a memory budget, and rebuilt for every product otherwise
    (:class:`GraphPlan`, in :attr:`plan`, says which and why; a partial plan is also a note in
    ``objective.notes``). Kept and rebuilt graphs give the same products.

    Args:
        objective, theta: the function and the point.
        keep_graphs: True keeps every batch's graph, False rebuilds them all for every product, None
            keeps as many as fit the budget.
        memory_budget: bytes the kept graphs may take under ``keep_graphs=None`` (default:
            :data:`KEPT_GRAPHS_MEMORY_SHARE` of the free memory). With neither argument given, the
            objective's ``keep_graphs`` and ``graph_memory_budget`` attributes decide (both None unless
            set), so ``ss.analyze`` follows them too.

    Attributes:
        theta: the point (detached).
        loss, grad: :math:`L(\theta)` and :math:`\nabla L(\theta)`.
        hvp_count: Hessian-vector products computed so far (a batch of k counts k).
        plan: the :class:`GraphPlan`.
    """

    def __init__(
        self,
        objective: GraphObjective,
        theta: Tensor,
        keep_graphs: bool | None = None,
        memory_budget: int | None = None,
    ) -> None:
        _pay_one_time_costs()
        if keep_graphs is not None and memory_budget is not None:
            raise InvalidInputError(
                f"memory_budget applies when the graphs are kept as far as it allows (keep_graphs=None), "
                f"not with keep_graphs={keep_graphs!r}; pass one or the other"
            )
        if keep_graphs is None and memory_budget is None:  # the objective's defaults
            keep_graphs = objective.keep_graphs
            memory_budget = objective.graph_memory_budget if keep_graphs is None else None
        if keep_graphs not in (None, True, False):
            raise InvalidInputError(f"keep_graphs must be True, False or None, got {keep_graphs!r}")
        if memory_budget is not None and (
            isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 0
        ):
            raise InvalidInputError(f"memory_budget must be a number of bytes >= 0, got {memory_budget!r}")
        self.objective = objective
        self.theta = theta.detach()
        self.hvp_count = 0
        self._policy = "auto" if keep_graphs is None else "keep" if keep_graphs else "recompute"
        self._memory_budget = memory_budget
        objective._check_same_theta(self.theta)
        batches = list(objective._batches())
        if not batches:
            raise EmptyDataError("the data yielded no batch")
        self._batches = batches
        self._kept: list[tuple[Tensor, Tensor]] = []  # (leaf, gradient) of the first plan.kept batches
        self._row_bytes: int | None = None  # estimated temporaries of one row of a batched product
        self._linear_checked: set[int] = set()
        loss, grad = objective._all_sum_pair(*self._with_fallback(self._build_all), "the loss and gradient")
        self.loss, self.grad = finite(loss, "loss", self.theta), finite(grad, "gradient", self.theta)

    def _build_all(self) -> tuple[Tensor, Tensor]:
        """This rank's loss and gradient (not yet summed over ranks, nor checked finite: a NaN
        must reach every rank through the sum, so all of them raise the same error); keeps the
        graphs the plan allows."""
        obj = self.objective
        loss = torch.zeros((), dtype=obj.dtype, device=obj.device)
        grad = torch.zeros_like(self.theta)
        self._kept = []
        self._kept_math = obj.math_attention  # the attention kernel the kept graphs are built with
        n_batches = len(self._batches)
        budget: tuple[int, str] | None = None
        if self._policy == "keep":
            plan = GraphPlan("keep", n_batches, n_batches, "keep_graphs=True: every batch's graph is kept "
                             "(memory not checked)")
        elif self._policy == "recompute":
            plan = GraphPlan("recompute", n_batches, 0, "keep_graphs=False: every product rebuilds every "
                             "batch's graph")
        elif n_batches == 1:
            plan = GraphPlan("auto", 1, 1, "one batch: its graph is kept (a product needs it anyway)")
        else:
            plan, budget = None, self._budget()  # read before the first graph takes its share
        for index, batch in enumerate(self._batches):
            if plan is None:
                assert budget is not None
                leaf, g, part, size = self._build_measured(batch)
                plan = self._auto_plan(size, *budget)
            else:
                leaf, g, part = self._build(batch)
            loss += part.detach()
            grad += g.detach()
            if index < plan.kept:
                self._kept.append((leaf, g))
        assert plan is not None
        self.plan = plan
        obj.graph_plan = plan
        if plan.policy == "auto" and plan.recomputed:
            note = (f"gradient graphs kept for {plan.kept} of {plan.batches} batches within the memory budget; "
                    f"the other {plan.recomputed} are rebuilt for every product (see graph_plan)")
            if note not in obj.notes:
                obj.notes.append(note)
        return loss, grad

    def _budget(self) -> tuple[int, str]:
        """Bytes the kept graphs may take, and where the figure came from."""
        if self._memory_budget is not None:
            return self._memory_budget, "memory_budget"
        free, source = available_memory(self.objective.device)
        if free is None:
            return UNKNOWN_MEMORY_BUDGET_BYTES, source
        return int(KEPT_GRAPHS_MEMORY_SHARE * free), source

    def _auto_plan(self, bytes_per_graph: int, budget: int, source: str) -> GraphPlan:
        """Keep the first batches whose graphs fit ``budget`` together. A batch with more input
        elements than the first is expected to hold proportionally more."""
        first = max(input_elements(self._batches[0].inputs), 1)
        total, kept = 0.0, 0
        for batch in self._batches:
            need = bytes_per_graph * max(1.0, input_elements(batch.inputs) / first)
            if total + need > budget:
                break
            total, kept = total + need, kept + 1
        n_batches = len(self._batches)
        share = "memory_budget" if source == "memory_budget" else (
            f"{KEPT_GRAPHS_MEMORY_SHARE:.0%} of the free memory, {source}" if source != "unknown"
            else "free memory unknown: the default")
        head = (f"all {n_batches} graphs kept" if kept == n_batches else f"{kept} of {n_batches} graphs kept, "
                f"the other {n_batches - kept} rebuilt for every product")
        reason = (f"{head}: {describe_bytes(bytes_per_graph)} per graph (measured on the first batch), "
                  f"budget {describe_bytes(budget)} ({share})")
        return GraphPlan("auto", n_batches, kept, reason, bytes_per_graph, budget, source)

    def _build_measured(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor, int]:
        """:meth:`_build`, measuring the memory the graph holds (see :mod:`saddlescope.memory`)."""
        obj = self.objective
        cuda = obj.device.type == "cuda"
        before = torch.cuda.memory_allocated(obj.device) if cuda else 0
        with SavedTensorBytes(exclude=[batch.inputs, batch.targets, self.theta, *obj._held]) as saved:
            leaf, g, part = self._build(batch)
        size = saved.total(extra=[leaf, g])
        if cuda:  # the allocator's growth also counts what no node saves and the blocks' rounding
            size = max(size, torch.cuda.memory_allocated(obj.device) - before)
        return leaf, g, part, size

    def _build(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        obj = self.objective
        leaf = self.theta.clone().requires_grad_(True)
        with _attention_kernels(obj.math_attention):
            part = obj.batch_share(leaf, batch)
            (g,) = torch.autograd.grad(part, leaf, create_graph=True, allow_unused=True)
        if g is None:
            g = torch.zeros_like(leaf)
        elif not g.requires_grad and id(batch) not in self._linear_checked:
            self._check_linear(batch, g.detach())
            self._linear_checked.add(id(batch))
        return leaf, g, part

    def _check_linear(self, batch: Batch, grad: Tensor) -> None:
        """A gradient that carries no graph means zero curvature only if the loss is linear in
        ``theta``. An operation that drops the graph instead (a custom ``autograd.Function`` whose
        backward is ``once_differentiable``, a ``.detach()``) would make every product silently zero,
        so the gradient is compared with the one at a point a step away."""
        obj = self.objective
        gen = torch.Generator().manual_seed(0)
        direction = torch.randn(obj.n_params, generator=gen, dtype=torch.float64).to(obj.device, obj.dtype)
        step = 1e-2 * max(1.0, float(self.theta.norm())) / float(direction.norm())
        leaf = (self.theta + step * direction).requires_grad_(True)
        with _attention_kernels(obj.math_attention):
            part = obj.batch_share(leaf, batch)
            (moved,) = torch.autograd.grad(part, leaf, allow_unused=True)
        if moved is None:
            return
        eps = torch.finfo(obj.dtype).eps
        change = float((moved - grad).norm())
        if change > 1e3 * eps * float(grad.norm() + moved.norm()) + torch.finfo(obj.dtype).tiny:
            raise UnsupportedModelError(
                "the gradient changes with theta but carries no graph, so the model has no second "
                "derivative in PyTorch: an operation drops it (a custom autograd.Function with a "
                "once_differentiable backward, or a .detach()); replace it with differentiable operations"
            )

    def _with_fallback(self, compute: Callable[[], Any], rebuild: bool = False) -> Any:
        """Run ``compute``; if a fused kernel lacks a double backward, rebuild with the math kernel.

        PyTorch's fused attention kernels (``scaled_dot_product_attention`` on flash, memory-efficient
        or the CPU flash path, which Hugging Face models use by default) implement a backward but no
        backward of that backward, so the first HVP fails. The math kernel computes the same function
        with ordinary differentiable operations; the objective remembers the switch and says so in
        ``objective.notes``. Graphs this object kept before the switch (made by another graph's
        products) are rebuilt too.
        """
        try:
            return compute()
        except RuntimeError as exc:
            if not _lacks_double_backward(exc):
                raise
            stale = rebuild and bool(self._kept) and not self._kept_math
            if self.objective.math_attention and not stale:
                raise UnsupportedModelError(
                    f"an operation in the model has no second derivative in PyTorch "
                    f"({str(exc).splitlines()[0]}), even with the math attention kernel; replace "
                    "it (e.g. a custom autograd.Function) with differentiable operations"
                ) from exc
        if not self.objective.math_attention:
            self.objective.math_attention = True
            self.objective.notes.append(
                "a fused kernel has no double backward (scaled_dot_product_attention); curvature was "
                "computed with PyTorch's math attention kernel, which computes the same function"
            )
        if rebuild and self._kept:
            self._build_all()
        return self._with_fallback(compute, rebuild)

    def rows_per_pass(self, rows: int) -> int:
        """How many of ``rows`` products one vmapped backward pass takes: as many as keep
        rows x (the largest batch's graph + :data:`PRODUCT_ROW_VECTORS` parameter-sized vectors) under
        :data:`BATCHED_PRODUCT_BYTES` and :data:`BATCHED_PRODUCT_MEMORY_SHARE` of the free memory; at
        least one. The graph's size is measured once (:class:`~saddlescope.memory.SavedTensorBytes`, on
        a rebuilt first batch unless the plan measured it)."""
        if rows <= 1:
            return 1
        if self._row_bytes is None:
            self._row_bytes = self._estimate_row_bytes()
        free, _ = available_memory(self.objective.device)
        cap = BATCHED_PRODUCT_BYTES if free is None else min(BATCHED_PRODUCT_BYTES, int(BATCHED_PRODUCT_MEMORY_SHARE * free))
        return max(1, min(rows, cap // max(self._row_bytes, 1)))

    def _estimate_row_bytes(self) -> int:
        graph = self.plan.bytes_per_graph
        if graph is None:
            leaf, g, _, graph = self._build_measured(self._batches[0])
            del leaf, g
        first = max(input_elements(self._batches[0].inputs), 1)
        largest = max(input_elements(batch.inputs) for batch in self._batches) / first
        obj = self.objective
        vector = obj.n_params * torch.finfo(obj.dtype).bits // 8
        return int(graph * max(1.0, largest)) + PRODUCT_ROW_VECTORS * vector

    def _graphs_iter(self) -> Iterator[tuple[Tensor, Tensor, bool]]:
        """Each batch's (leaf, gradient, kept): the kept graphs, then the others rebuilt one at a time."""
        yield from ((leaf, g, True) for leaf, g in self._kept)
        for batch in self._batches[len(self._kept):]:
            leaf, g, _ = self._build(batch)
            yield leaf, g, False

    def hvp(self, v: Tensor) -> Tensor:
        """:math:`H v` for one vector ``v`` of length n."""
        v = self.objective.check_theta(v, "v")
        return self.hvp_batch(v.unsqueeze(0))[0]

    def hvp_batch(self, vs: Tensor) -> Tensor:
        """:math:`(H V^\\top)^\\top` for the rows of ``vs`` (shape ``(k, n)``): k products at once."""
        obj = self.objective
        if vs.dim() != 2 or vs.shape[1] != obj.n_params:
            raise ThetaError(f"vs must have shape (k, {obj.n_params}), got {tuple(vs.shape)}")
        if vs.dtype != obj.dtype or vs.device != obj.device:
            raise ThetaError(f"vs must be {obj.dtype} on {obj.device}, got {vs.dtype} on {vs.device}")
        out = self._with_fallback(lambda: self._products(vs), rebuild=True)
        out = obj._all_sum(out, "a Hessian-vector product")
        self.hvp_count += vs.shape[0]
        return out

    def _products(self, vs: Tensor) -> Tensor:
        """Each batch's graph (kept, or rebuilt once), then its products a pass of rows at a time."""
        k = vs.shape[0]
        rows = self.rows_per_pass(k)
        # One pass a batch (a single product): the first batch's products are the sum so far, as they come.
        out = None if rows >= k else torch.zeros_like(vs)
        for leaf, g, kept in self._graphs_iter():
            if not g.requires_grad:  # loss linear in theta on this batch: zero curvature
                continue
            for start in range(0, k, rows):
                hv = _backward(g, leaf, vs[start:start + rows], retain=kept or start + rows < k)
                if hv is None:
                    continue
                if out is None:
                    out = hv
                else:
                    out[start:start + rows] += hv
        return torch.zeros_like(vs) if out is None else out


def _backward(g: Tensor, leaf: Tensor, block: Tensor, *, retain: bool) -> Tensor | None:
    r""":math:`\nabla(g^\top v)` for each row ``v`` of ``block``: one double-backward pass, vmapped over
    the rows when there are several; None when ``g`` does not reach ``leaf``."""
    batched = block.shape[0] > 1
    (hv,) = torch.autograd.grad(g, leaf, grad_outputs=block if batched else block[0], retain_graph=retain,
                                is_grads_batched=batched, allow_unused=True)
    if hv is None or batched:
        return hv
    return hv.unsqueeze(0)


def _lacks_double_backward(exc: BaseException) -> bool:
    message = str(exc)
    return ("derivative for" in message and "not implemented" in message) or "once_differentiable" in message


@contextlib.contextmanager
def _attention_kernels(math_only: bool) -> Iterator[None]:
    """PyTorch's math attention kernel while ``math_only``, the default choice otherwise."""
    if not math_only:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield
