r"""The :class:`Objective` (:math:`\theta` -> loss, gradient, Hessian-vector products, Hessian and
blocks, over an analytic function or a model, a loss and data, summed over ``torch.distributed`` ranks
when sharded) and the package's one HVP engine, :class:`GradientGraph`: the gradient at :math:`\theta`
kept differentiable so that each product is one backward pass through it, each data batch's graph kept
between products while :class:`GraphPlan`'s memory budget allows. The math is in
:mod:`saddlescope.objective`."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from saddlescope import distributed as dist_helpers
from saddlescope.errors import (
    DistributedError,
    EmptyDataError,
    InvalidInputError,
    NonScalarLossError,
    ThetaError,
    TooLargeError,
    UnsupportedModelError,
)
from saddlescope.memory import SavedTensorBytes, available_memory, describe_bytes
from saddlescope.objective.checks import finite
from saddlescope.objective.data import Batch, Cast, FixedBatches, data_passes, input_elements
from saddlescope.objective.model_call import ModelCall, ParameterLayout, resolve_reduction

__all__ = [
    "DEFAULT_EXACT_BUDGET_BYTES", "KEPT_GRAPHS_MEMORY_SHARE", "UNKNOWN_MEMORY_BUDGET_BYTES", "GradientGraph",
    "GraphPlan", "Objective", "hessian_chunk", "one_time_costs",
]


# Bytes an exact Hessian may take by default: the matrix, the copy eigh works on and the
# eigenvectors (3 n^2 numbers); 2 GiB admits ~9,400 float64 parameters.
DEFAULT_EXACT_BUDGET_BYTES = 2 * 1024**3


class Objective:
    """A scalar function of a flat parameter vector with its derivatives.

    Build one with :meth:`from_function` (an analytic function of ``theta``) or
    :meth:`from_model` (an ``nn.Module``, a loss and data). All methods take ``theta`` as a
    1-D tensor of length :attr:`n_params` and dtype :attr:`dtype`; none of them mutates it.

    Attributes:
        theta0: the starting point (a model's current parameters, or the given ``theta0``).
        n_params: the length of ``theta``.
        dtype, device: what ``theta`` must have.
        mode: ``"eval"`` or ``"train"`` for models (dropout and BatchNorm behaviour), ``"function"``
            for analytic objectives.
        n_samples: the samples the loss averages over (all ranks' when sharded).
        local_samples: this process's samples (``n_samples`` unless sharded).
        sharded: the data are this rank's shard and every sum is all-reduced over
            ``torch.distributed`` (see :meth:`from_model`'s ``distributed``).
    """

    def __init__(
        self,
        batch_loss: Callable[[Tensor, Batch], Tensor],
        batches: Callable[[], Iterable[Batch]],
        theta0: Tensor,
        *,
        mode: str,
        describe: dict[str, Any] | None = None,
        param_names: list[str] | None = None,
        param_shapes: list[torch.Size] | None = None,
    ) -> None:
        self._batch_loss = batch_loss
        self._batches = batches
        self.theta0 = theta0.detach().clone()
        self.n_params = theta0.numel()
        self.dtype = theta0.dtype
        self.device = theta0.device
        self.mode = mode
        self.param_names = param_names
        self.param_shapes = param_shapes
        self.description = describe or {}
        # Set once a fused kernel's missing double backward was met: every later gradient graph
        # is then built with PyTorch's math attention kernel (see GradientGraph).
        self.math_attention = False
        self.notes: list[str] = []
        # How GradientGraph keeps the data batches' gradient graphs when its caller does not say
        # (keep_graphs: True, False or None = as many as fit; graph_memory_budget: bytes for them under
        # None); graph_plan: the plan of the graph built last (GraphPlan), for the analysis to report.
        self.keep_graphs: bool | None = None
        self.graph_memory_budget: int | None = None
        self.graph_plan: GraphPlan | None = None
        # Tensors that live as long as the objective (a model's fixed parameters and buffers): a graph
        # that saves them holds no extra memory for them.
        self._held: list[Tensor] = []

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_function(
        cls,
        f: Callable[[Tensor], Tensor],
        theta0: Any,
        *,
        dtype: torch.dtype | None = None,
    ) -> Objective:
        """An objective from an analytic function ``f(theta) -> scalar tensor``.

        Args:
            f: a function of a 1-D tensor built from differentiable torch operations.
            theta0: the starting point (anything ``torch.as_tensor`` accepts).
            dtype: the dtype of ``theta``; defaults to the dtype of a floating tensor ``theta0``,
                else float64 (Python floats are double precision).
        """
        if not callable(f):
            raise InvalidInputError(f"f must be callable, got {type(f).__name__}")
        theta0 = _as_flat_tensor(theta0, dtype)

        def batch_loss(theta: Tensor, batch: Batch) -> Tensor:
            return f(theta)

        single = [Batch(inputs=None, targets=None, size=1)]
        obj = cls(
            batch_loss,
            lambda: single,
            theta0,
            mode="function",
            describe={"kind": "function", "function": getattr(f, "__name__", repr(f))},
        )
        obj.loss(obj.theta0)  # fail now, not in the middle of an analysis
        return obj

    @classmethod
    def from_model(
        cls,
        model: nn.Module | Callable[..., Any],
        loss_fn: Callable[[Any, Any], Tensor],
        data: Any,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        train_mode: bool = False,
        params: Iterable[str] | Mapping[str, Tensor] | None = None,
        reduction: str | None = None,
        max_batches: int | None = None,
        distributed: bool | None = None,
    ) -> Objective:
        r"""An objective over a model's parameters: ``loss_fn(model(inputs), targets)`` on ``data``.

        With :math:`\ell_b` the value of ``loss_fn`` on batch :math:`b` of :math:`n_b` samples and
        :math:`N = \sum_b n_b`, the objective is :math:`L = \frac{1}{N}\sum_b n_b \ell_b` for a loss that
        averages over its batch (``reduction="mean"``) and :math:`L = \sum_b \ell_b` for one that sums
        (``"sum"``): in both cases the loss of the whole data set, so the Hessian is the full-data one.

        Args:
            model: an ``nn.Module`` (not modified: parameters are passed functionally), or a function
                ``f(params, inputs)`` in ``torch.func`` style, where ``params`` is a dict of named
                tensors; a function needs its starting point as ``params={name: tensor}``.
            loss_fn: ``loss_fn(outputs, targets) -> scalar``; gets whatever the model returns.
            data: an ``(inputs, targets)`` pair or an iterable of such batches (a DataLoader).
                ``inputs`` may be a tensor or a dict of tensors. A dict is passed as keyword arguments
                when every key names a parameter of the model's ``forward`` (or of ``f`` after
                ``params``) or it takes ``**kwargs``; as the one argument when ``forward`` has exactly
                one required positional parameter and it is not among the keys (``forward(self, batch)``).
                A list, a pair or a one-shot iterator is read once and kept. A re-iterable loader is
                read again on every pass, and every pass must yield the batches of the first (in any
                order): a loader that reshuffles (``shuffle=True``) or draws random transforms raises
                :class:`~saddlescope.errors.DataChangedError`, since each pass would be another data set.
            dtype: compute dtype (e.g. ``torch.float64`` for exact work); floating parameters,
                buffers, inputs and targets are cast to it. Defaults to the parameters' dtype.
            device: where to compute; defaults to the parameters' device.
            train_mode: evaluate in training mode (dropout on, batch statistics); default eval.
                A module only.
            params: for a module, names of the parameters to differentiate (default: all with
                ``requires_grad``; the others, and all buffers, are held fixed). For a function, the
                dict ``{name: tensor}`` of its parameters at the starting point: every entry is
                differentiated, and ``theta`` is their concatenation in the dict's order.
            reduction: how ``loss_fn`` reduces a batch, ``"mean"`` or ``"sum"`` (see above). Default:
                the loss's own ``reduction`` attribute where it has one (``nn.CrossEntropyLoss``,
                ``nn.MSELoss``, ..., ``"batchmean"`` counting as ``"mean"``; also a
                ``functools.partial(F.mse_loss, reduction=...)``), else ``"mean"``. A loss whose
                reduction is ``"none"``, or that disagrees with this argument, is refused.
            max_batches: use only the first ``max_batches`` batches, read once and kept, so every
                product sees the same fixed subset even from a shuffling loader. What was used is
                recorded in ``description["subset"]`` (batches, samples and a fingerprint of the
                data); :func:`saddlescope.stability` measures how much the verdict depends on it.
            distributed: treat ``data`` as this rank's shard of the full data and all-reduce
                losses, gradients and products over the ``torch.distributed`` default group, weighted
                by each rank's sample count, so every rank gets the full-data values. ``None``
                (default): whenever a process group is initialised; ``False``: never (this rank's
                data alone); ``True``: require a group. Every rank must then make the same calls in
                the same order (the curvature routines do, given the same arguments and seed), hold
                the same parameters (checked: :class:`~saddlescope.errors.DistributedError`) and at
                least one sample (else every rank raises ``EmptyDataError``). ``description["distributed"]``
                records the world size and the sample counts; :attr:`n_samples` is the global count.
        """
        if not callable(loss_fn):
            raise InvalidInputError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if max_batches is not None and not (isinstance(max_batches, int) and max_batches >= 1):
            raise InvalidInputError(f"max_batches must be a positive integer, got {max_batches!r}")
        reduction = resolve_reduction(loss_fn, reduction)
        sharded = _use_distributed(distributed)
        layout = ParameterLayout.of(model, params)
        dtype, device = layout.compute_dtype(dtype), layout.compute_device(device)
        cast = Cast(device, dtype)
        layout = layout.cast(cast)
        call = ModelCall(model, train_mode)
        try:
            passes = data_passes(data, cast, max_batches)
        except EmptyDataError:
            if not sharded:
                raise
            # An empty shard still takes part in the count exchange, so every rank fails with the
            # same message instead of its peers timing out.
            passes = FixedBatches([])

        def batch_loss(theta: Tensor, batch: Batch) -> Tensor:
            outputs = call(layout.state(theta, fresh_fixed=train_mode), batch.inputs)
            loss = loss_fn(outputs, batch.targets)
            return loss if reduction == "sum" else loss * batch.size

        obj = cls(
            batch_loss,
            passes,
            layout.theta0.to(device=device, dtype=dtype),
            mode="train" if train_mode else "eval",
            describe={"kind": "model", "model": call.name, "reduction": reduction,
                      "n_fixed_tensors": len(layout.fixed)},
            param_names=layout.names,
            param_shapes=layout.shapes,
        )
        obj._held = list(layout.fixed.values())
        if max_batches is not None:
            assert isinstance(passes, FixedBatches)  # a limit is always read once and kept
            obj.description["subset"] = passes.describe_subset(max_batches)
        obj._count_samples(reduction, sharded)
        obj.loss(obj.theta0)  # fail now, with the model's own message, not mid-analysis
        return obj

    def _count_samples(self, reduction: str, sharded: bool) -> None:
        """Count the samples (over every rank when sharded) and set the normaliser of the mean.

        With shards, each rank divides by the global count: its sums are then its share of the
        full-data mean and the all-reduce only has to add them."""
        self._reduction = reduction
        total, n_batches = 0, 0
        for batch in self._batches():
            total += batch.size
            n_batches += 1
        self.local_samples = total
        if sharded:
            total = self._join_shards(total, n_batches)
        if total == 0:
            raise EmptyDataError("the data yielded no samples; pass at least one non-empty batch")
        self._normaliser = float(total) if reduction == "mean" else 1.0
        self.n_samples = total

    # Analytic objectives: one "batch" of size 1 and no normalisation.
    _normaliser: float = 1.0
    n_samples: int = 1
    local_samples: int = 1
    # True when the data are this rank's shard and every sum is all-reduced (from_model only).
    sharded: bool = False

    def _join_shards(self, local: int, n_batches: int) -> int:
        """Exchange sample counts (and subset fingerprints, and a hash of ``theta0``) with the
        other ranks; record them; return the global sample count."""
        subset = self.description.get("subset")
        fingerprint = _fingerprint_int(subset["fingerprint"]) if subset else 0
        rows = dist_helpers.all_gather_ints(
            [local, n_batches, fingerprint, dist_helpers.checksum(self.theta0)], what="exchanging sample counts"
        )
        world = len(rows)
        empty = [r for r, row in enumerate(rows) if row[0] == 0]
        if empty:
            raise EmptyDataError(
                f"rank(s) {empty} of {world} have no samples; every rank needs at least one: split the data "
                "so each rank gets a shard (DistributedSampler, or indices[rank::world_size]) or launch fewer "
                "processes"
            )
        differ = [r for r, row in enumerate(rows) if row[3] != rows[0][3]]
        if differ:
            raise DistributedError(
                f"rank {dist_helpers.rank()} of {world}: the model's parameters differ across ranks (rank(s) "
                f"{differ} differ from rank 0); every rank must hold the same parameters: seed the "
                "initialisation identically or load the same checkpoint on every rank"
            )
        counts = [row[0] for row in rows]
        self.sharded = True
        self.description["distributed"] = {
            "world_size": world,
            "backend": dist_helpers.backend(),
            "samples": sum(counts),
            "samples_per_rank": counts,
        }
        if subset:
            # The subset is the union of the ranks' subsets: count it whole, and fingerprint it
            # by the ranks' fingerprints in rank order (so it depends on how the data were sharded).
            joined = ",".join(format(row[2] & (2**64 - 1), "016x") for row in rows)
            subset.update(
                batches=sum(row[1] for row in rows),
                samples=sum(counts),
                fingerprint=hashlib.sha1(joined.encode()).hexdigest()[:16],
            )
        return sum(counts)

    def _all_sum(self, tensor: Tensor, what: str) -> Tensor:
        """The sum of every rank's ``tensor`` when sharded; ``tensor`` itself otherwise."""
        if not self.sharded:
            return tensor
        return dist_helpers.all_reduce_sum(tensor, what=what)

    def _all_sum_pair(self, loss: Tensor, grad: Tensor, what: str) -> tuple[Tensor, Tensor]:
        """Loss and gradient summed over ranks in one collective."""
        if not self.sharded:
            return loss, grad
        packed = self._all_sum(torch.cat([loss.reshape(1), grad]), what)
        return packed[0], packed[1:]

    def _check_same_theta(self, theta: Tensor) -> None:
        """Every rank must build its products at the same point. Checked on every rank every time
        (a hash and one tiny all-gather): skipping it where ``theta`` is ``theta0`` would leave a rank
        at another point waiting in a collective its peers never enter."""
        if self.sharded:
            dist_helpers.check_same(theta, what="theta")

    # ------------------------------------------------------------------ evaluation
    def check_theta(self, theta: Any, name: str = "theta") -> Tensor:
        """Return ``theta`` if it is a valid parameter vector for this objective, else raise."""
        if not isinstance(theta, Tensor):
            raise ThetaError(f"{name} must be a torch.Tensor, got {type(theta).__name__}")
        if theta.dim() != 1 or theta.numel() != self.n_params:
            raise ThetaError(
                f"{name} must be a 1-D tensor of length {self.n_params}, got shape {tuple(theta.shape)}"
            )
        if theta.dtype != self.dtype:
            raise ThetaError(
                f"{name} has dtype {theta.dtype} but the objective computes in {self.dtype}; "
                f"convert it with {name}.to({self.dtype})"
            )
        if theta.device != self.device:
            raise ThetaError(f"{name} is on {theta.device} but the objective is on {self.device}")
        return theta

    def _scalar(self, value: Any) -> Tensor:
        if not isinstance(value, Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise NonScalarLossError(
                f"the loss must be a scalar tensor, got {shape}; reduce it (e.g. reduction='mean')"
            )
        return value.reshape(())

    def _total(self, theta: Tensor) -> Tensor:
        """The loss as a differentiable function of ``theta`` (all batches in one graph)."""
        total = None
        for batch in self._batches():
            part = self._scalar(self._batch_loss(theta, batch))
            total = part if total is None else total + part
        if total is None:
            raise EmptyDataError("the data yielded no batch")
        return total / self._normaliser

    def loss(self, theta: Tensor) -> Tensor:
        """:math:`L(\\theta)` as a 0-d tensor (no graph)."""
        theta = self.check_theta(theta)
        with torch.no_grad():
            value = self._all_sum(self._total(theta), "the loss")
        return finite(value, "loss", theta)

    def grad(self, theta: Tensor) -> Tensor:
        """:math:`\\nabla L(\\theta)`."""
        return self.loss_and_grad(theta)[1]

    def loss_and_grad(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """Loss and gradient in one pass, batch by batch (one batch graph alive at a time)."""
        theta = self.check_theta(theta)
        leaf = theta.detach().requires_grad_(True)
        loss = torch.zeros((), dtype=self.dtype, device=self.device)
        grad = torch.zeros_like(theta)
        seen = False
        for batch in self._batches():
            seen = True
            part = self._scalar(self._batch_loss(leaf, batch)) / self._normaliser
            (g,) = torch.autograd.grad(part, leaf, allow_unused=True)
            loss += part.detach()
            if g is not None:
                grad += g
        if not seen:
            raise EmptyDataError("the data yielded no batch")
        loss, grad = self._all_sum_pair(loss, grad, "the loss and gradient")
        finite(loss, "loss", theta)
        finite(grad, "gradient", theta)
        return loss, grad

    def gradient_graph(
        self, theta: Tensor, keep_graphs: bool | None = None, memory_budget: int | None = None
    ) -> GradientGraph:
        """The package's HVP engine at ``theta``: see :class:`GradientGraph` (and its arguments)."""
        return GradientGraph(self, self.check_theta(theta), keep_graphs=keep_graphs, memory_budget=memory_budget)

    def hvp(self, theta: Tensor, v: Tensor) -> Tensor:
        """One Hessian-vector product :math:`H(\\theta) v`.

        For many products at one ``theta`` use :meth:`gradient_graph`, which reuses the gradient.
        """
        return self.gradient_graph(theta).hvp(v)

    def hessian(
        self,
        theta: Tensor,
        *,
        chunk_size: int | None = None,
        max_bytes: int = DEFAULT_EXACT_BUDGET_BYTES,
        progress: Callable[[int, int], None] | None = None,
    ) -> Tensor:
        """The full symmetric Hessian, an ``(n, n)`` tensor.

        Built as :math:`H = H I` in chunks of basis vectors, each chunk one batched backward pass
        through the reused gradient graph (``bench/exact_hessian.py`` compares this with
        ``torch.func.hessian`` and ``vmap(jvp(grad))``). The result is symmetrised.

        Args:
            chunk_size: basis vectors per batched product; default picks by problem size.
            max_bytes: refuse (``TooLargeError``) if the matrix, eigh's copy and eigenvectors
                would exceed this many bytes.
            progress: called as ``progress(done, total)`` after each chunk.
        """
        theta = self.check_theta(theta)
        n = self.n_params
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        need = 3 * n * n * itemsize
        if need > max_bytes:
            raise TooLargeError(
                f"the exact Hessian of {n:,} parameters needs about {need / 2**30:.1f} GiB "
                f"(budget {max_bytes / 2**30:.1f} GiB); raise max_bytes, analyse a block, or use "
                "the iterative path (ss.analyze(obj, exact=False), ss.HessianOperator + ss.eigs)"
            )
        graph = self.gradient_graph(theta)
        if chunk_size is None:
            chunk_size = hessian_chunk(n)
        hess = torch.empty((n, n), dtype=self.dtype, device=self.device)
        eye_rows = torch.eye(chunk_size, dtype=self.dtype, device=self.device)
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            basis = torch.zeros((stop - start, n), dtype=self.dtype, device=self.device)
            basis[:, start:stop] = eye_rows[: stop - start, : stop - start]
            hess[start:stop] = graph.hvp_batch(basis)
            if progress is not None:
                progress(stop, n)
        hess = 0.5 * (hess + hess.T)
        finite(hess, "Hessian", theta)
        return hess

    def blocks(self, by: str | Callable[[str], str] = "module") -> dict[str, Tensor]:
        """Split ``theta`` into named blocks: an ordered mapping name -> indices into ``theta``.

        Args:
            by: ``"module"`` (the parameters of each module, named as in ``named_modules()``;
                a parameter of the model itself goes in ``"(root)"``), ``"parameter"`` (one block per
                parameter), or a callable mapping a parameter name to its block's name (e.g. one
                block per transformer layer). An analytic objective is one block, ``"theta"``.
        """
        names = self.param_names or ["theta"]
        shapes = self.param_shapes or [torch.Size([self.n_params])]
        if by == "parameter":
            key: Callable[[str], str] = lambda name: name  # noqa: E731
        elif by == "module":
            key = lambda name: name.rpartition(".")[0] or ("(root)" if self.param_names else name)  # noqa: E731
        elif callable(by):
            key = by
        else:
            raise InvalidInputError(f"by must be 'module', 'parameter' or a callable, got {by!r}")
        groups: dict[str, list[Tensor]] = {}
        offset = 0
        for name, shape in zip(names, shapes):
            size = int(torch.Size(shape).numel())
            group = key(name)
            if not isinstance(group, str):
                raise InvalidInputError(f"the block function must return a str, got {group!r} for {name!r}")
            groups.setdefault(group, []).append(torch.arange(offset, offset + size))
            offset += size
        return {group: torch.cat(parts) for group, parts in groups.items()}

    def __repr__(self) -> str:
        return (
            f"Objective({self.description.get('kind', '?')}, n_params={self.n_params}, "
            f"dtype={self.dtype}, device={self.device}, mode={self.mode})"
        )


def _as_flat_tensor(theta0: Any, dtype: torch.dtype | None) -> Tensor:
    try:
        t = torch.as_tensor(theta0) if isinstance(theta0, Tensor) else torch.as_tensor(theta0, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ThetaError(f"theta0 must be convertible to a tensor: {exc}") from exc
    if dtype is None:
        dtype = t.dtype if t.is_floating_point() else torch.float64
    if not dtype.is_floating_point:
        raise ThetaError(f"theta0 dtype must be floating, got {dtype}")
    t = t.to(dtype).detach().clone()
    if t.dim() != 1 or t.numel() == 0:
        raise ThetaError(f"theta0 must be a non-empty 1-D vector, got shape {tuple(t.shape)}")
    return t


def hessian_chunk(n: int) -> int:
    """Basis vectors per batched product when the exact Hessian is built (:meth:`Objective.hessian`): large
    enough that each batched backward is matrix-shaped, small enough to bound memory."""
    return max(1, min(n, 32))


def _use_distributed(distributed: bool | None) -> bool:
    """Resolve ``from_model``'s ``distributed`` argument against the process's state."""
    if distributed is not None and not isinstance(distributed, bool):
        raise InvalidInputError(f"distributed must be True, False or None, got {distributed!r}")
    if distributed is False:
        return False
    active = dist_helpers.is_distributed()
    if distributed and not active:
        raise DistributedError(
            "distributed=True but no torch.distributed process group is initialised; launch with torchrun "
            "and call saddlescope.distributed.init_from_env() (or torch.distributed.init_process_group) first"
        )
    return active


def _fingerprint_int(fingerprint: str) -> int:
    """A 16-hex-digit fingerprint as a signed 64-bit int (to travel in an int64 tensor)."""
    value = int(fingerprint, 16)
    return value - 2**64 if value >= 2**63 else value


# Kept gradient graphs (GradientGraph, keep_graphs=None) may take this share of the memory free when
# they are built (host memory on a CPU, the GPU's own on a GPU): the other half is left to the Krylov
# basis, the products' temporaries and the rest of the process.
KEPT_GRAPHS_MEMORY_SHARE = 0.5


# Their budget where the free memory cannot be read (a device other than CPU or CUDA, no /proc/meminfo
# and no psutil).
UNKNOWN_MEMORY_BUDGET_BYTES = 1024**3


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
    ``V`` (rows) one vmapped pass per batch (``is_grads_batched``). Each data batch's graph is kept
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
        objective: Objective,
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
            part = obj._scalar(obj._batch_loss(leaf, batch)) / obj._normaliser
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
            part = obj._scalar(obj._batch_loss(leaf, batch)) / obj._normaliser
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
        out: Tensor | None = None
        batched = vs.shape[0] > 1
        for leaf, g, kept in self._graphs_iter():
            if not g.requires_grad:  # loss linear in theta on this batch: zero curvature
                continue
            (hv,) = torch.autograd.grad(
                g,
                leaf,
                grad_outputs=vs if batched else vs[0],
                retain_graph=kept,
                is_grads_batched=batched,
                allow_unused=True,
            )
            if hv is not None:
                hv = hv if batched else hv.unsqueeze(0)
                out = hv if out is None else out + hv
        if out is None:
            out = torch.zeros_like(vs)
        return out


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
