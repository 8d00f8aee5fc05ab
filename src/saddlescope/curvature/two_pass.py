r"""Lanczos without a stored basis: the three-term recurrence, and a second pass for the Ritz vectors.

When not even the smallest Krylov basis fits the memory budget (:func:`~saddlescope.curvature.lanczos.plan_basis`),
:func:`~saddlescope.curvature.lanczos.eigs` runs the plain recurrence

.. math::

    \beta_{j+1} v_{j+1} = A v_j - \alpha_j v_j - \beta_j v_{j-1}, \qquad \alpha_j = v_j^\top A v_j,

which holds four vectors (the start, two iterates, the product) whatever the number of steps, and keeps only the coefficients
:math:`\alpha, \beta` (the tridiagonal :math:`T_j`). Its Ritz values and residual estimates
:math:`\beta_{j+1}|s_{j,i}|` come from :math:`T_j` as with a stored basis. Without reorthogonalisation the
vectors lose orthogonality as Ritz pairs converge; Paige (1976, "Error analysis of the Lanczos algorithm
for tridiagonalizing a symmetric matrix", IMA J. Appl. Math. 18) showed that this happens only along
converged Ritz vectors, whose eigenvalues then reappear as copies ("ghosts"): the extreme Ritz values
still converge to the extreme eigenvalues, which is all :func:`eigs` asks of them. The random-start
relation :math:`p_j(A) v_1 = \beta_1\cdots\beta_j v_{j+1}` behind the misconvergence guard holds to
rounding (Paige), so the guard applies as with a stored basis.

The Ritz vectors :math:`y_i = \sum_l s_{l,i} v_l` need the :math:`v_l` again: a second pass regenerates
them from the start vector and the stored coefficients, :math:`j - 1` more products (Cullum &
Willoughby, "Lanczos algorithms for large symmetric eigenvalue computations", 1985, ch. 4). The second
pass repeats the first's arithmetic operation for operation (each :math:`\alpha` is stored as the two
parts it was computed in): once orthogonality is lost the recurrence amplifies any difference, and a
regeneration that merely agrees in exact arithmetic returned Ritz vectors with residuals of 0.07 where
the first pass's estimate was 1e-4. So the products must repeat to the bit: they do on the CPU; on a GPU
some kernels (an embedding's backward, for one) accumulate in a varying order unless
``torch.use_deterministic_algorithms(True)``. A regeneration that drifts shows as unconverged true
residuals in the result, never as a wrong claim. Ghost copies are kept out of the wanted pairs (:attr:`Ritz.distinct`).
So a run costs 1.7-3x the products of one with a stored basis (slower convergence without
reorthogonalisation, and the second pass; measured on the tests' planted spectrum: 18 against 10 at a
separated top, 306 against 102 at a clustered bottom) and holds ``5 + pairs`` vectors instead of
``steps + 1``. Every vector it returns is confirmed by a true product in :func:`eigs`, as always.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from saddlescope.curvature.ritz import Ritz

__all__ = ["TWO_PASS_VECTORS", "TwoPassState", "two_pass_bytes", "widened_dot", "widened_norm"]

# Vectors of length n the recurrence holds (start, previous, current, the product) besides the Ritz
# vectors it accumulates in the second pass.
TWO_PASS_VECTORS = 4


def two_pass_bytes(n: int, want: int, *, vector_dtype: torch.dtype, recurrence_dtype: torch.dtype) -> int:
    """The peak bytes of a two-pass run's own tensors for ``want`` Ritz vectors (plus the far end's one).
    In the vectors' precision: during the second pass the recurrence's vectors and the Ritz vectors; then,
    the recurrence gone, the Ritz vectors and the confirming product of the wanted ones (their residuals
    are formed in place). In the recurrence's precision: at most one product as it arrives, before it is
    narrowed, and the chunks of a widened dot product."""
    item = torch.finfo(vector_dtype).bits // 8
    rec = torch.finfo(recurrence_dtype).bits // 8
    vectors = max(TWO_PASS_VECTORS + want + 1, (want + 1) + want)
    return n * item * vectors + n * rec + 2 * min(n, DOT_CHUNK) * rec


class TwoPassState:
    """The three-term recurrence as :class:`~saddlescope.curvature.lanczos.LanczosState`'s interface:
    :meth:`step`, :meth:`ritz`, :meth:`vectors` (the second pass), :meth:`log_krylov_norm`; never
    ``full`` (there is no basis to restart), unless the recurrence broke down (an invariant subspace:
    its Ritz values are exact and the run stops there)."""

    restarts = 0
    reorthogonalisations = 0

    def __init__(self, start: Tensor, *, vector_dtype: torch.dtype) -> None:
        self.n = start.numel()
        self.dtype = start.dtype  # the coefficients and T
        self.vector_dtype = vector_dtype
        self.ghost_rtol = max(GHOST_RTOL, GHOST_EPS * torch.finfo(vector_dtype).eps)
        self.start = (start / start.norm()).to(vector_dtype)
        self.previous: Tensor | None = None
        self.current: Tensor | None = self.start
        self.alphas: list[float] = []
        self.parts: list[tuple[float, float]] = []  # each alpha as computed: projection, then local correction
        self.betas: list[float] = []  # beta_{l+1} after step l
        self.j = 0
        self.beta = 0.0
        self.norm_est = 0.0
        self.ritz_at = 0
        self.krylov = True
        self.saw_invariant = False
        self._apply: Callable[..., Tensor] | None = None

    @property
    def full(self) -> bool:
        return self.saw_invariant

    @property
    def coupling(self) -> float:
        return 0.0 if (self.saw_invariant or self.j >= self.n) else self.beta

    def _next(self, apply: Callable[..., Tensor], v: Tensor, previous: Tensor | None, beta: float,
              alphas: tuple[float, float] | None = None) -> tuple[Tensor, tuple[float, float]]:
        """``A v - beta previous - alpha v``, ``alpha`` in two parts (the projection, then a local
        reorthogonalisation against ``v`` that keeps it accurate). Given ``alphas`` (the second pass), the
        same operations in the same order with the stored parts, so the regenerated vectors are the first
        pass's to the bit: after orthogonality is lost, the recurrence amplifies any difference."""
        w = apply(v.unsqueeze(1), self.vector_dtype)[:, 0]  # the product straight into the vectors' precision
        if previous is not None:
            w.add_(previous, alpha=-beta)
        first = widened_dot(v, w, self.dtype) if alphas is None else alphas[0]
        w.add_(v, alpha=-first)
        again = widened_dot(v, w, self.dtype) if alphas is None else alphas[1]
        w.add_(v, alpha=-again)
        return w, (first, again)

    def step(self, apply: Callable[..., Tensor]) -> None:
        assert self.current is not None, "step() after vectors()"
        self._apply = apply
        w, parts = self._next(apply, self.current, self.previous, self.beta)
        self.parts.append(parts)
        alpha = parts[0] + parts[1]
        self.alphas.append(alpha)
        self.beta = widened_norm(w, self.dtype)
        self.betas.append(self.beta)
        self.j += 1
        self.norm_est = max(self.norm_est, abs(alpha), self.beta)
        if self.beta <= 1e-12 * max(self.norm_est, 1e-300):
            self.saw_invariant = True  # the Krylov space of the start is invariant: its Ritz values are exact
            return
        self.previous, self.current = self.current, w.div_(self.beta)

    def tridiagonal(self) -> Tensor:
        diag = torch.tensor(self.alphas, dtype=torch.float64)
        off = torch.tensor(self.betas[: self.j - 1], dtype=torch.float64)
        return torch.diag(diag) + torch.diag(off, 1) + torch.diag(off, -1)

    def ritz(self) -> Ritz:
        values, coeffs = torch.linalg.eigh(self.tridiagonal())
        self.norm_est = max(self.norm_est, float(values.abs().max()))
        self.ritz_at = self.j
        estimates = (self.coupling * coeffs[self.j - 1, :]).abs()
        return Ritz(values.to(self.dtype), coeffs.to(self.dtype), estimates.to(self.dtype),
                    distinct=_without_copies(values, estimates, self.ghost_rtol * self.norm_est))

    def log_krylov_norm(self) -> float:
        if self.coupling == 0.0 or any(b <= 0 for b in self.betas):
            return -math.inf
        return float(sum(math.log(b) for b in self.betas))

    def vectors(self, ritz: Ritz, idx: Tensor) -> Tensor:
        """The Ritz vectors for ``idx``: the second pass regenerates ``v_1 ... v_j`` from the start and the
        stored coefficients (``j - 1`` products) and sums them with the weights ``s_{l,i}``."""
        assert self._apply is not None, "vectors() before any step"
        coeffs = ritz.coeffs[:, idx].to(self.dtype)
        self.previous = self.current = None  # the first pass is done with them: free their memory
        # Summed in the vectors' precision: float32 vectors give Ritz vectors good to about j * eps(float32),
        # below the coarse residual floor such a plan has (COARSE_FLOOR_EPS), in half the memory. One row per
        # Ritz vector, so that each update is an axpy on contiguous memory (a rank-1 ``addr_`` into an (n, k)
        # tensor took 0.55 s a step at 124M entries, a product's quarter); returned as the (n, k) view.
        out = torch.zeros(coeffs.shape[1], self.n, dtype=self.vector_dtype, device=self.start.device)
        previous, v = None, self.start
        weights = coeffs.to(self.vector_dtype).tolist()
        for l in range(self.j):
            for row, weight in zip(out, weights[l], strict=True):
                row.add_(v, alpha=weight)
            if l + 1 < self.j:
                w, _ = self._next(self._apply, v, previous, self.betas[l - 1] if l else 0.0, self.parts[l])
                previous, v = v, w.div_(self.betas[l])
        for row in out:
            row.div_(widened_norm(row, self.dtype))
        return out.T


# Ritz values closer than this (relative to ||A||) are copies of one eigenvalue: a ghost and its original
# agree to the accuracy the first converged to, near the vectors' rounding (float32 vectors: 1.2e-4).
GHOST_RTOL = 1e-8
GHOST_EPS = 1000


def _without_copies(values: Tensor, estimates: Tensor, tol: float) -> Tensor:
    """Indices of ascending ``values``, one per run of values within ``tol`` of each other (the copy with
    the smallest residual estimate)."""
    keep: list[int] = []
    for i, value in enumerate(values.tolist()):
        if keep and value - float(values[keep[-1]]) <= tol:
            if float(estimates[i]) < float(estimates[keep[-1]]):
                keep[-1] = i
            continue
        keep.append(i)
    return torch.tensor(keep, dtype=torch.long)


# Elements per chunk of a dot product widened to the recurrence's precision (8 MiB of float64 each).
DOT_CHUNK = 2**20


def widened_norm(a: Tensor, dtype: torch.dtype) -> float:
    """``||a||`` with its sum of squares accumulated in ``dtype`` (:func:`widened_dot`). Not ``a.norm()``:
    torch sums a float32 norm (and ``dot``) in float32, which at 124M entries came out 1.3% low for a random
    unit vector and 6.2% low for a Ritz vector, scaling a Rayleigh quotient by 13.6% (1,399 for an
    eigenvalue of 1,231: a "lower bound" on lambda_max above it)."""
    return math.sqrt(max(widened_dot(a, a, dtype), 0.0))


def widened_dot(a: Tensor, b: Tensor, dtype: torch.dtype) -> float:
    """``a . b`` accumulated in ``dtype``, a chunk at a time (no full-length widened copies)."""
    if a.dtype == dtype:
        return float(torch.dot(a, b.to(dtype)))
    return float(sum(torch.dot(a[i : i + DOT_CHUNK].to(dtype), b[i : i + DOT_CHUNK].to(dtype))
                     for i in range(0, a.numel(), DOT_CHUNK)))
