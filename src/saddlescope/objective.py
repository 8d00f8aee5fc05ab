r"""The objective: one pure function of one flat parameter vector.

Everything above this layer sees a 1-D tensor :math:`\theta` and four methods:

.. math::

    L(\theta) = \frac{\sum_b n_b \, \ell_b(\theta)}{\sum_b n_b}, \qquad
    g(\theta) = \nabla L(\theta), \qquad
    H(\theta)\,v = \nabla\big(g(\theta)^\top v\big), \qquad
    H(\theta) = \nabla^2 L(\theta),

where :math:`\ell_b` is the (mean) loss of batch :math:`b` of :math:`n_b` samples, so the
Hessian over several batches is exactly the full-data Hessian.

Under ``torch.distributed`` the batches of every rank enter the same sums: each rank divides its
local sum by the global count and one all-reduce per loss, gradient or batch of products adds the
ranks' parts (:mod:`saddlescope.distributed`).

One HVP engine serves the whole package: :class:`GradientGraph`. It computes the gradient at
:math:`\theta` once with ``create_graph=True`` and answers every product :math:`Hv` with one
backward pass through that graph (double backward). ``bench/hvp_engines.py`` measures why:
forward-over-reverse ``jvp(grad(f))`` rebuilds the gradient for every product and costs several
gradients; the reused graph costs about one and a half.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from saddlescope import distributed as dist_helpers
from saddlescope.errors import (
    BatchShapeError,
    DistributedError,
    EmptyDataError,
    InvalidInputError,
    NonFiniteLossError,
    NonScalarLossError,
    NoTrainableParametersError,
    ThetaError,
    TooLargeError,
    UnsupportedModelError,
)

# Bytes an exact Hessian may take by default: the matrix, the copy eigh works on and the
# eigenvectors (3 n^2 numbers); 2 GiB admits ~9,400 float64 parameters.
DEFAULT_EXACT_BUDGET_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class Batch:
    """One batch of data with its weight in the full-data mean."""

    inputs: Any
    targets: Any
    size: int


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
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Tensor],
        data: Any,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        train_mode: bool = False,
        params: Iterable[str] | None = None,
        reduction: str = "mean",
        max_batches: int | None = None,
        distributed: bool | None = None,
    ) -> Objective:
        """An objective over a model's parameters: ``loss_fn(model(inputs), targets)`` on ``data``.

        Args:
            model: any ``nn.Module``; it is not modified (parameters are passed functionally).
            loss_fn: ``loss_fn(outputs, targets) -> scalar``; gets whatever the model returns.
            data: an ``(inputs, targets)`` pair or an iterable of such batches (a DataLoader).
                ``inputs`` may be a tensor or a dict of tensors (passed as keyword arguments).
                A one-shot iterator is read once and kept.
            dtype: compute dtype (e.g. ``torch.float64`` for exact work); floating parameters,
                buffers, inputs and targets are cast to it. Defaults to the parameters' dtype.
            device: where to compute; defaults to the parameters' device.
            train_mode: evaluate in training mode (dropout on, batch statistics); default eval.
            params: names of the parameters to differentiate; default all with ``requires_grad``.
                The others, and all buffers, are held fixed.
            reduction: ``"mean"`` if ``loss_fn`` averages over the batch (batches are then
                weighted by size), ``"sum"`` if it sums (batch losses are added).
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
        if not isinstance(model, nn.Module):
            raise InvalidInputError(f"model must be an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise InvalidInputError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if reduction not in ("mean", "sum"):
            raise InvalidInputError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if max_batches is not None and not (isinstance(max_batches, int) and max_batches >= 1):
            raise InvalidInputError(f"max_batches must be a positive integer, got {max_batches!r}")
        sharded = _use_distributed(distributed)

        named = dict(model.named_parameters())
        if params is None:
            trainable = [n for n, p in named.items() if p.requires_grad]
        else:
            trainable = list(params)
            unknown = [n for n in trainable if n not in named]
            if unknown:
                raise InvalidInputError(
                    f"params names {unknown} are not parameters of the model; "
                    f"known: {list(named)[:8]}{'...' if len(named) > 8 else ''}"
                )
        if not trainable:
            raise NoTrainableParametersError(
                "the model has no parameter with requires_grad=True to differentiate; "
                "unfreeze some (p.requires_grad_(True)) or name them with params=[...]"
            )
        first = named[trainable[0]]
        dtype = dtype or first.dtype
        if not dtype.is_floating_point:
            raise InvalidInputError(f"dtype must be a floating dtype, got {dtype}")
        device = torch.device(device) if device is not None else first.device

        def cast(t: Any) -> Any:
            if isinstance(t, Tensor):
                t = t.to(device)
                return t.to(dtype) if t.is_floating_point() else t
            if isinstance(t, Mapping):
                return {k: cast(v) for k, v in t.items()}
            return t

        shapes = [named[n].shape for n in trainable]
        sizes = [named[n].numel() for n in trainable]
        fixed = {n: cast(p.detach()) for n, p in named.items() if n not in set(trainable)}
        fixed.update({n: cast(b.detach()) for n, b in model.named_buffers()})
        theta0 = torch.cat([named[n].detach().reshape(-1) for n in trainable]).to(device, dtype)

        try:
            batch_list = _materialise(data, cast, max_batches)
        except EmptyDataError:
            if not sharded:
                raise
            # An empty shard still takes part in the count exchange below, so every rank fails
            # with the same message instead of its peers timing out.
            batch_list = []

        def batches() -> Iterable[Batch]:
            if batch_list is not None:
                return batch_list
            return (_make_batch(b, cast) for b in data)

        def batch_loss(theta: Tensor, batch: Batch) -> Tensor:
            tensors = dict(zip(trainable, (t.view(s) for t, s in zip(torch.split(theta, sizes), shapes))))
            state = dict(fixed)
            if train_mode:  # BatchNorm updates its buffers in training mode: keep ours pristine
                state = {k: v.clone() for k, v in state.items()}
            state.update(tensors)
            was_training = model.training
            model.train(train_mode)
            try:
                if isinstance(batch.inputs, Mapping):
                    outputs = functional_call(model, state, args=(), kwargs=dict(batch.inputs))
                else:
                    outputs = functional_call(model, state, (batch.inputs,))
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                raise BatchShapeError(
                    f"the model failed on a batch with inputs {_describe(batch.inputs)}: "
                    f"{str(exc).splitlines()[0]}; check that the data match the model"
                ) from exc
            finally:
                model.train(was_training)
            loss = loss_fn(outputs, batch.targets)
            if reduction == "sum":
                return loss
            return loss * batch.size

        obj = cls(
            batch_loss,
            batches,
            theta0,
            mode="train" if train_mode else "eval",
            describe={
                "kind": "model",
                "model": type(model).__name__,
                "reduction": reduction,
                "n_fixed_tensors": len(fixed),
            },
            param_names=trainable,
            param_shapes=shapes,
        )
        if max_batches is not None:
            assert batch_list is not None
            obj.description["subset"] = {
                "max_batches": max_batches,
                "batches": len(batch_list),
                "samples": sum(b.size for b in batch_list),
                "fingerprint": _fingerprint(batch_list),
            }
        obj._reduction = reduction
        total, n_batches = 0, 0
        for batch in obj._batches():
            total += batch.size
            n_batches += 1
        obj.local_samples = total
        if sharded:
            total = obj._join_shards(total, n_batches)
        if total == 0:
            raise EmptyDataError("the data yielded no samples; pass at least one non-empty batch")
        # With shards, each rank divides by the global count: its sums are then its share of the
        # full-data mean and the all-reduce only has to add them.
        obj._normaliser = float(total) if reduction == "mean" else 1.0
        obj.n_samples = total
        obj.loss(obj.theta0)  # fail now, with the model's own message, not mid-analysis
        return obj

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
        return _finite(value, "loss", theta)

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
        _finite(loss, "loss", theta)
        _finite(grad, "gradient", theta)
        return loss, grad

    def gradient_graph(self, theta: Tensor, keep_graphs: bool | None = None) -> GradientGraph:
        """The package's HVP engine at ``theta``: see :class:`GradientGraph`."""
        return GradientGraph(self, self.check_theta(theta), keep_graphs=keep_graphs)

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
            chunk_size = _default_chunk(n)
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
        _finite(hess, "Hessian", theta)
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


class GradientGraph:
    """The gradient at one ``theta``, kept differentiable so each HVP is one backward pass.

    Building costs one gradient with ``create_graph=True``; each product :math:`Hv` is then one
    double-backward pass, and a batch of products ``V`` (rows) one vmapped pass
    (``is_grads_batched``). With several data batches the per-batch graphs are kept when
    ``keep_graphs`` (default: only when there is a single batch, where memory is that of one
    gradient); otherwise each product rebuilds them batch by batch, holding one at a time.

    Attributes:
        theta: the point (detached).
        loss, grad: :math:`L(\\theta)` and :math:`\\nabla L(\\theta)`.
        hvp_count: Hessian-vector products computed so far (a batch of k counts k).
    """

    def __init__(self, objective: Objective, theta: Tensor, keep_graphs: bool | None = None) -> None:
        self.objective = objective
        self.theta = theta.detach()
        self.hvp_count = 0
        objective._check_same_theta(self.theta)
        batches = list(objective._batches())
        if not batches:
            raise EmptyDataError("the data yielded no batch")
        self._batches = batches
        self._keep = len(batches) == 1 if keep_graphs is None else keep_graphs
        self._graphs: list[tuple[Tensor, Tensor]] = []
        self._linear_checked: set[int] = set()
        loss, grad = objective._all_sum_pair(*self._with_fallback(self._build_all), "the loss and gradient")
        self.loss, self.grad = _finite(loss, "loss", self.theta), _finite(grad, "gradient", self.theta)

    def _build_all(self) -> tuple[Tensor, Tensor]:
        """This rank's loss and gradient (not yet summed over ranks, nor checked finite: a NaN
        must reach every rank through the sum, so all of them raise the same error)."""
        obj = self.objective
        loss = torch.zeros((), dtype=obj.dtype, device=obj.device)
        grad = torch.zeros_like(self.theta)
        self._graphs = []
        for batch in self._batches:
            leaf, g, part = self._build(batch)
            loss += part.detach()
            grad += g.detach()
            if self._keep:
                self._graphs.append((leaf, g))
        return loss, grad

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
        ``objective.notes``.
        """
        try:
            return compute()
        except RuntimeError as exc:
            if not _lacks_double_backward(exc):
                raise
            if self.objective.math_attention:
                raise UnsupportedModelError(
                    f"an operation in the model has no second derivative in PyTorch "
                    f"({str(exc).splitlines()[0]}), even with the math attention kernel; replace "
                    "it (e.g. a custom autograd.Function) with differentiable operations"
                ) from exc
        self.objective.math_attention = True
        self.objective.notes.append(
            "a fused kernel has no double backward (scaled_dot_product_attention); curvature was "
            "computed with PyTorch's math attention kernel, which computes the same function"
        )
        if rebuild and self._keep:
            self._build_all()
        return compute()

    def _graphs_iter(self) -> Iterable[tuple[Tensor, Tensor]]:
        if self._keep:
            yield from self._graphs
        else:
            for batch in self._batches:
                leaf, g, _ = self._build(batch)
                yield leaf, g

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
        for leaf, g in self._graphs_iter():
            if not g.requires_grad:  # loss linear in theta on this batch: zero curvature
                continue
            (hv,) = torch.autograd.grad(
                g,
                leaf,
                grad_outputs=vs if batched else vs[0],
                retain_graph=self._keep,
                is_grads_batched=batched,
                allow_unused=True,
            )
            if hv is not None:
                hv = hv if batched else hv.unsqueeze(0)
                out = hv if out is None else out + hv
        if out is None:
            out = torch.zeros_like(vs)
        return out


# ---------------------------------------------------------------------- helpers
def _fingerprint(batches: list[Batch]) -> str:
    """A short hash of the data, so a report can say which subset it was computed on."""
    digest = hashlib.sha1()

    def feed(x: Any) -> None:
        if isinstance(x, Tensor):
            digest.update(x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, Mapping):
            for key in sorted(x):
                digest.update(str(key).encode())
                feed(x[key])

    for batch in batches:
        feed(batch.inputs)
        feed(batch.targets)
    return digest.hexdigest()[:16]


def _fingerprint_int(fingerprint: str) -> int:
    """A 16-hex-digit fingerprint as a signed 64-bit int (to travel in an int64 tensor)."""
    value = int(fingerprint, 16)
    return value - 2**64 if value >= 2**63 else value


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


def _default_chunk(n: int) -> int:
    # Large enough that each batched backward is matrix-shaped, small enough to bound memory.
    return max(1, min(n, 32))


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


def _finite(value: Tensor, what: str, theta: Tensor) -> Tensor:
    if not bool(torch.isfinite(value).all()):
        raise NonFiniteLossError(
            f"the {what} is not finite (NaN or inf) at theta with norm {float(theta.norm()):.3g}; "
            "check the data, the learning rate that led here, or use dtype=torch.float64"
        )
    return value


def _first_dim(x: Any) -> int | None:
    if isinstance(x, Tensor):
        return x.shape[0] if x.dim() > 0 else None
    if isinstance(x, Mapping):
        for v in x.values():
            if isinstance(v, Tensor) and v.dim() > 0:
                return v.shape[0]
    return None


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"shape {tuple(x.shape)} {x.dtype}"
    if isinstance(x, Mapping):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in x.items()) + "}"
    return type(x).__name__


def _is_pair(data: Any) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], (Tensor, Mapping))
        and not isinstance(data[0], (tuple, list))
    )


def _make_batch(raw: Any, cast: Callable[[Any], Any]) -> Batch:
    if not (isinstance(raw, (tuple, list)) and len(raw) == 2):
        raise BatchShapeError(
            f"each batch must be an (inputs, targets) pair, got {type(raw).__name__}"
            + (f" of length {len(raw)}" if isinstance(raw, (tuple, list)) else "")
        )
    inputs, targets = cast(raw[0]), cast(raw[1])
    n_in, n_out = _first_dim(inputs), _first_dim(targets)
    if n_in is None:
        raise BatchShapeError(f"batch inputs must be a tensor or dict of tensors, got {_describe(inputs)}")
    if n_out is not None and n_out != n_in:
        raise BatchShapeError(
            f"batch has {n_in} inputs but {n_out} targets ({_describe(inputs)} vs "
            f"{_describe(targets)}); inputs and targets must share their first dimension"
        )
    return Batch(inputs=inputs, targets=targets, size=n_in)


def _materialise(data: Any, cast: Callable[[Any], Any], max_batches: int | None = None) -> list[Batch] | None:
    """Batches as a list when the data are a pair, a list, a one-shot iterator, or limited to
    ``max_batches``; else None (a re-iterable loader, read lazily on every pass)."""
    if data is None:
        raise EmptyDataError("data is None; pass an (inputs, targets) pair or an iterable of them")
    if _is_pair(data):
        batches = [_make_batch(data, cast)]
    elif isinstance(data, (tuple, list)):
        batches = [_make_batch(b, cast) for b in data[:max_batches]]
    elif isinstance(data, Iterable):
        if iter(data) is not data and max_batches is None:
            return None
        batches = [_make_batch(b, cast) for b in itertools.islice(data, max_batches)]
    else:
        raise InvalidInputError(
            f"data must be an (inputs, targets) pair or an iterable of them, got {type(data).__name__}"
        )
    batches = [b for b in batches if b.size > 0]
    if not batches:
        raise EmptyDataError("the data yielded no non-empty batch; pass at least one sample")
    return batches
