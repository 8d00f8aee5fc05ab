r"""Curvature matrices as linear operators: they only know how to multiply.

Every algorithm in :mod:`saddlescope.curvature` (Lanczos, and what builds on it) takes any object with
``shape``, ``dtype``, ``device`` and ``matmat``/``matvec``, so the Hessian of a 10-million-parameter
model and a dense test matrix with a planted spectrum go through the same code. ``matmat`` returns a
tensor the caller owns: the algorithms overwrite products in place (a product is the largest
temporary they hold), so an operator must not hand back a buffer it keeps.

.. math::

    H(\theta)\,v = \nabla_\theta\big(\nabla_\theta L(\theta)^\top v\big)

is computed by :class:`saddlescope.objective.GradientGraph` (the package's one HVP engine): the
gradient graph is built once at :math:`\theta` and each product is one backward pass through it.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from saddlescope.errors import InvalidInputError, NonFiniteLossError, ThetaError
from saddlescope.objective import GradientGraph, GraphPlan, Objective, all_finite
from saddlescope.objective.graph import BATCHED_PRODUCT_BYTES


class _Operator:
    """Shared behaviour: ``@``, argument checks, the SciPy adapter. Subclasses define ``_matmat``."""

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device
    hvp_count: int

    def matvec(self, v: Tensor) -> Tensor:
        """``A v`` for a vector of length n."""
        if v.dim() != 1 or v.numel() != self.shape[1]:
            raise ThetaError(f"v must be a vector of length {self.shape[1]}, got shape {tuple(v.shape)}")
        return self.matmat(v.unsqueeze(1))[:, 0]

    def matmat(self, vs: Tensor) -> Tensor:
        """``A V`` for the columns of ``vs`` (shape ``(n, k)``), returned in ``vs``'s dtype."""
        if vs.dim() != 2 or vs.shape[0] != self.shape[1]:
            raise ThetaError(f"V must have shape ({self.shape[1]}, k), got {tuple(vs.shape)}")
        out = self._matmat(vs.to(self.device, self.dtype))
        if not all_finite(out):
            raise NonFiniteLossError("a matrix-vector product is not finite (NaN or inf); check the model and data")
        return out.to(vs.dtype)

    def _matmat(self, vs: Tensor) -> Tensor:
        raise NotImplementedError

    def __matmul__(self, other: Tensor) -> Tensor:
        return self.matvec(other) if other.dim() == 1 else self.matmat(other)

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 NumPy in and out) over this operator."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        def mv(x):
            t = torch.as_tensor(np.asarray(x, dtype=np.float64)).reshape(self.shape[1], -1)
            out = self.matmat(t.to(torch.float64))
            return out.cpu().numpy().reshape(np.shape(x))

        return LinearOperator(self.shape, matvec=mv, matmat=mv, rmatvec=mv, dtype=np.float64)


class HessianOperator(_Operator):
    """The Hessian of ``objective`` at ``theta`` as a linear operator.

    Args:
        objective: the function whose Hessian this is.
        theta: the point (default ``objective.theta0``).
        block: only the diagonal block ``H[b, b]``: a block name from ``objective.blocks(by)``
            (module names, then parameter names, are looked up), or indices into ``theta``. Every
            algorithm that takes an operator then works on the block unchanged.
        keep_graphs: keep every data batch's gradient graph between products (True), rebuild them all
            for every product (False), or keep as many as fit ``memory_budget`` (None, the default;
            see :class:`~saddlescope.objective.GraphPlan`).
        memory_budget: bytes the kept graphs may take under ``keep_graphs=None`` (default: half the
            free memory).
        graph: a gradient graph already built at ``theta`` (``objective.gradient_graph(theta)``) to
            reuse instead of building one; ``keep_graphs`` and ``memory_budget`` are then ignored.

    Attributes:
        shape: ``(n, n)`` (``n`` the block's size).
        hvp_count: Hessian-vector products made so far (a block of k counts k), shared by every
            block operator made with :meth:`block` from this one.
        loss, grad: at ``theta`` (computed while building the graph; ``grad`` is the full gradient).
        graph_plan: which batches' graphs are kept (:class:`~saddlescope.objective.GraphPlan`).
        index: the indices of the block in ``theta`` (None for the whole Hessian).
    """

    def __init__(
        self,
        objective: Objective,
        theta: Tensor | None = None,
        *,
        block: str | Tensor | slice | None = None,
        keep_graphs: bool | None = None,
        memory_budget: int | None = None,
        graph: GradientGraph | None = None,
    ) -> None:
        if not isinstance(objective, Objective):
            raise InvalidInputError(f"objective must be a saddlescope Objective, got {type(objective).__name__}")
        theta = objective.theta0 if theta is None else objective.check_theta(theta)
        self.objective = objective
        self.theta = theta
        if graph is None:
            graph = objective.gradient_graph(theta, keep_graphs=keep_graphs, memory_budget=memory_budget)
        elif not (graph.objective is objective and torch.equal(graph.theta, theta)):
            raise InvalidInputError("graph was built for another objective or point")
        self._graph: GradientGraph = graph
        self.dtype = objective.dtype
        self.device = objective.device
        self._set_block(block)

    def block(self, block: str | Tensor | slice) -> HessianOperator:
        """The diagonal block ``H[b, b]`` sharing this operator's gradient graph (no new gradient)."""
        if self.index is not None:
            raise InvalidInputError("take blocks of the whole Hessian, not of a block")
        other = copy.copy(self)
        other._set_block(block)
        return other

    def _set_block(self, block: str | Tensor | slice | None) -> None:
        n = self.objective.n_params
        self.name = None
        if block is None:
            self.index = None
            self.shape = (n, n)
            return
        if isinstance(block, str):
            found = None
            for by in ("module", "parameter"):
                table = self.objective.blocks(by)
                if block in table:
                    found = table[block]
                    break
            if found is None:
                known = list(self.objective.blocks("module"))
                raise InvalidInputError(f"no block named {block!r}; modules: {known[:8]}{'...' if len(known) > 8 else ''}")
            self.name, index = block, found
        elif isinstance(block, slice):
            index = torch.arange(n)[block]
        elif isinstance(block, Tensor) and block.dim() == 1 and not block.is_floating_point():
            index = block.to(torch.long).cpu()
        else:
            raise InvalidInputError(f"block must be a name, a slice or a 1-D integer tensor, got {type(block).__name__}")
        if index.numel() == 0 or int(index.min()) < 0 or int(index.max()) >= n or index.unique().numel() != index.numel():
            raise InvalidInputError(f"block indices must be distinct, non-empty and within [0, {n})")
        self.index = index.to(self.device)
        self.shape = (index.numel(), index.numel())

    @property
    def hvp_count(self) -> int:
        return self._graph.hvp_count

    @property
    def loss(self) -> Tensor:
        return self._graph.loss

    @property
    def grad(self) -> Tensor:
        return self._graph.grad

    @property
    def graph_plan(self) -> GraphPlan:
        return self._graph.plan

    def _matmat(self, vs: Tensor) -> Tensor:
        if self.index is None:
            return self._graph.hvp_batch(vs.T.contiguous()).T
        # A block's columns travel as whole-model vectors (zero outside the block), so a few at a time:
        # as many as keep those vectors and their products under BATCHED_PRODUCT_BYTES (a count every
        # rank of a sharded objective computes alike: each call is one all-reduce).
        n, k = self.objective.n_params, vs.shape[1]
        whole = 2 * n * torch.finfo(vs.dtype).bits // 8
        rows = max(1, min(k, BATCHED_PRODUCT_BYTES // whole))
        out = torch.empty(self.shape[0], k, dtype=vs.dtype, device=vs.device)
        for start in range(0, k, rows):
            part = vs[:, start:start + rows]
            full = torch.zeros(part.shape[1], n, dtype=vs.dtype, device=vs.device)
            full[:, self.index] = part.T
            out[:, start:start + rows] = self._graph.hvp_batch(full)[:, self.index].T
        return out

    def __repr__(self) -> str:
        what = "" if self.index is None else f", block={self.name or 'indices'}"
        return (f"HessianOperator(n={self.shape[0]}{what}, dtype={self.dtype}, device={self.device}, "
                f"hvp_count={self.hvp_count})")


class DenseOperator(_Operator):
    """A symmetric matrix held in memory, as an operator (tests, planted spectra, small blocks)."""

    def __init__(self, matrix: Tensor, *, check_symmetric: bool = True) -> None:
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise InvalidInputError(f"need a square matrix, got shape {tuple(matrix.shape)}")
        if check_symmetric:
            scale = float(matrix.abs().max()) or 1.0
            if float((matrix - matrix.T).abs().max()) > 1e3 * torch.finfo(matrix.dtype).eps * scale:
                raise InvalidInputError("the matrix is not symmetric; Hessian algorithms need a symmetric operator")
        self.matrix = matrix
        self.shape = (matrix.shape[0], matrix.shape[1])
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.hvp_count = 0

    def _matmat(self, vs: Tensor) -> Tensor:
        self.hvp_count += vs.shape[1]
        return self.matrix @ vs
