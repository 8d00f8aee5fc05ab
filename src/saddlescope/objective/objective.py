r"""The :class:`Objective`: :math:`\theta` -> loss, gradient, Hessian-vector products, Hessian and
blocks, over an analytic function or a model, a loss and data, summed over ``torch.distributed`` ranks
when sharded. Its products come from the package's one HVP engine,
:class:`~saddlescope.objective.graph.GradientGraph` (:meth:`Objective.gradient_graph`). The math is in
:mod:`saddlescope.objective`."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
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
)
from saddlescope.objective.checks import finite
from saddlescope.objective.data import Batch, Cast, FixedBatches, data_passes
from saddlescope.objective.graph import GradientGraph, GraphPlan
from saddlescope.objective.model_call import ModelCall, ParameterLayout, resolve_reduction

__all__ = ["DEFAULT_EXACT_BUDGET_BYTES", "Objective", "hessian_chunk"]


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

    def batch_share(self, theta: Tensor, batch: Batch) -> Tensor:
        """Batch ``batch``'s share of :math:`L(\\theta)`, differentiable in ``theta``:
        :math:`n_b \\ell_b / \\sum_b n_b` (:math:`\\ell_b` for a loss that sums; module docstring)."""
        return self._scalar(self._batch_loss(theta, batch)) / self._normaliser

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
            part = self.batch_share(leaf, batch)
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
