r"""Extreme eigenpairs of a symmetric operator: thick-restart Lanczos, its basis planned from a memory budget.

Wu & Simon (2000), "Thick-restart Lanczos method for large symmetric eigenvalue problems"; in the
Krylov–Schur form (Stewart 2001) where the projected matrix :math:`T = V^\top A V` is kept dense.

With an orthonormal basis :math:`V_j` built by Lanczos (every new vector orthogonalised twice against
all previous ones, "twice is enough"), :math:`A V_j = V_j T_j + r_j e_j^\top`. A Ritz pair
:math:`(\theta, y = V_j s)` of :math:`T_j s = \theta s` has residual
:math:`\|A y - \theta y\| = \|r_j\|\,|s_j|`. When the basis is full, some Ritz vectors (below) and the next
Lanczos vector are kept and the rest discarded: the decomposition keeps its form, so the iteration
goes on without losing what has converged.

What a restart keeps (:func:`restart_set`): the wanted pairs and as many neighbours, up to half the
basis (Wu & Simon), and every other pair that has converged: *locking* (Lehoucq & Sorensen 1996,
"Deflation techniques for an implicitly restarted Arnoldi iteration"; ARPACK likewise keeps more
vectors as more converge). A converged pair at the far end is an eigenvector to rounding. Discarded,
it is not gone: the next Lanczos vectors carry it at the rounding level, and since its eigenvalue lies
outside what remains of the spectrum the recurrence amplifies it like a Chebyshev polynomial, so the
next cycle spends its new vectors converging it again. (On the spectrum below with 300 vectors, the
eigenvector of lambda = 1, converged to a residual of 5e-21 and discarded, was 1e-16 of the basis
after the restart and 0.2 of the tenth new Lanczos vector.) Kept, full reorthogonalisation holds every
new vector orthogonal to it and the far end stays deflated: with 300 vectors, lambda_min of the
spectrum below converged in 2,400-2,700 products instead of 6,000-6,750.

How large a basis: restarting cannot do what one long run does when the wanted eigenvalue's gap is
tiny next to the spread, because then Lanczos sees it only after resolving (deflating) much of the
rest of the spectrum, and a restarted basis cannot hold what it has resolved. 999 eigenvalues
log-spaced in [1e-8, 1] under one at -1e-6 (relative gap 1e-6) take a single Lanczos run 360-450
products to show a Ritz value below -1e-9 and 560-590 to converge lambda_min (residual 1e-6 |lambda|);
a 100-vector basis needed 1,900-3,200 and about 18,000 (ARPACK's ``eigsh``, 100 vectors: 16,000; its
default 20: 226,000). So the basis is as large as the memory budget allows, up to :data:`KRYLOV_MAX`.

Memory is a budget: the basis's size, precision and place are planned from it
(:mod:`~saddlescope.curvature.basis_plan`, reported as :class:`BasisPlan` in ``EigenResult.plan``), down to
no basis at all (:mod:`~saddlescope.curvature.two_pass`).

On the CPU the basis is one ``torch.empty`` of the planned size: pages never written are never
committed, so a run that converges in ten steps holds ten vectors whatever the plan. On a GPU it grows
by doubling up to the plan (the plan counts the copy a growth makes).

When to stop, and the misconvergence guard that lets a run stop before ARPACK's ``ncv`` vectors, are in
:mod:`~saddlescope.curvature.stopping` (:class:`StoppingRule`).

The recurrence, the basis and the small eigenproblem run in ``dtype`` (float64 by default), whatever
precision the operator computes in, unless the plan stores the basis in float32 (above).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saddlescope.curvature.basis_plan import (
    BASIS_MEMORY_SHARE,
    CHUNK_BYTES,
    KRYLOV_MAX,
    KRYLOV_MEMORY_BYTES,
    TWO_PASS,
    BasisPlan,
    budget_plan,
    default_budget,
    minimum_basis,
    plan_basis,
    planned_bytes,
    preferred_basis,
)
from saddlescope.curvature.ritz import Ritz
from saddlescope.curvature.stopping import (
    DEFAULT_MISS_PROBABILITY,
    StoppingRule,
    random_start_bound,
    random_start_miss,
    wanted,
)
from saddlescope.curvature.two_pass import TwoPassState, widened_dot
from saddlescope.errors import InvalidInputError
from saddlescope.memory import available_memory, return_freed_memory

WHICH = ("largest", "smallest", "both")
# Default product budget: max(20 * basis size, 500), at most DEFAULT_MAX_HVPS (what a 100-vector basis
# got before the basis grew with memory: a larger basis needs fewer products, not a larger budget).
DEFAULT_MAX_HVPS = 2000
# Residual floor of relative_to="value", in units of eps(operator dtype) * ||A||: products in float32
# reached 3 eps ||A|| on a trained MLP, so 16 leaves a margin without giving up accuracy.
VALUE_FLOOR_EPS = 16
# The same floor for a float32 basis with float64 coefficients, in units of eps(float32) * ||A||: a
# Ritz vector stored in float32 carries about sqrt(j) roundings (true residuals of 20-30 eps ||A|| on
# the planted spectra of the tests at 50-100 vectors), so 64 leaves the same margin.
COARSE_FLOOR_EPS = 64


@dataclass
class EigenResult:
    """Eigenpairs from :func:`eigs`, eigenvalues ascending.

    Attributes:
        eigenvalues: shape ``(m,)`` (m = k, or 2k for ``which="both"``), ascending.
        eigenvectors: shape ``(n, m)``, unit columns.
        residuals: true residual norms ``||A v - lambda v||`` (one extra product per pair).
        converged: per pair, ``residual <= max(tol * scale, atol)`` with ``scale`` the spectral norm
            (``relative_to="norm"``) or the pair's ``|eigenvalue|`` (``relative_to="value"``).
        spectral_norm: the estimate ``max |Ritz value|`` the tolerance is relative to.
        hvp_count: operator products spent, including the confirmation.
        restarts: thick restarts made.
        which, tol, relative_to, atol: what was asked.
        stopped_early: the run stopped at ``stop_below`` before converging.
        dtype: precision of the basis (that of the recurrence, unless the plan stores the basis in
            float32); operator_dtype: precision of the products (the model's).
        plan: the memory plan (:class:`BasisPlan`): basis vectors, dtype, bytes, budget, why.
        guard: the misconvergence guard (:mod:`~saddlescope.curvature.stopping`): ``rule`` (``"random start"`` or
            ``"minimum Krylov dimension"``), ``miss_probability``, and where the random-start bound holds
            at the end, ``lambda_max_at_most`` and ``lambda_min_at_least`` (both ends, whichever was
            asked): each bound holds with probability at least ``1 - miss_probability`` over the start.
        reorthogonalisations: full passes over the basis made by partial reorthogonalisation (0 with
            full reorthogonalisation, where every step makes one).
        opposite, opposite_ritz_value: for ``which="largest"`` or ``"smallest"``, the Ritz vector at the
            *other* end of the final basis (unit, unconfirmed: no product was spent on it) and its Ritz
            value. A Krylov space grown for one end resolves the other end too (Lanczos's Ritz values
            converge at both ends first), so this vector's Rayleigh quotient is often already a
            certificate of curvature of the opposite sign (``analyze`` confirms it with one product
            before running a second solver).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    converged: Tensor
    spectral_norm: float
    hvp_count: int
    restarts: int
    which: str
    tol: float
    stopped_early: bool = False
    relative_to: str = "norm"
    atol: float = 0.0
    dtype: str = "torch.float64"
    operator_dtype: str = "torch.float64"
    plan: BasisPlan | None = None
    guard: dict[str, Any] | None = None
    reorthogonalisations: int = 0
    opposite: Tensor | None = None
    opposite_ritz_value: float | None = None

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())

    def to_dict(self, vectors: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "eigenvalues": self.eigenvalues.tolist(),
            "residuals": self.residuals.tolist(),
            "converged": self.converged.tolist(),
            "spectral_norm": self.spectral_norm,
            "hvp_count": self.hvp_count,
            "restarts": self.restarts,
            "which": self.which,
            "tol": self.tol,
            "relative_to": self.relative_to,
            "atol": self.atol,
            "stopped_early": self.stopped_early,
            "dtype": self.dtype,
            "operator_dtype": self.operator_dtype,
            "plan": None if self.plan is None else self.plan.to_dict(),
            "guard": self.guard,
            "reorthogonalisations": self.reorthogonalisations,
            "opposite_ritz_value": self.opposite_ritz_value,
        }
        if vectors:
            out["eigenvectors"] = self.eigenvectors.T.tolist()
        return out


def lanczos_step(apply: Any, basis: Tensor, proj: Tensor, j: int) -> float:
    """Extend a Lanczos basis by one vector (the package's one Lanczos step, full reorthogonalisation).

    The basis vectors are the *rows* of ``basis`` (so every slice ``basis[:j+1]`` is contiguous and
    the projections are dense matrix-vector products). ``basis[:j+1]`` is orthonormal; computes
    ``w = A basis[j]``, orthogonalises it twice against all of ``basis[:j+1]`` ("twice is enough",
    full reorthogonalisation), stores the projections in column/row ``j`` of ``proj`` (so
    ``proj[:j+1, :j+1] = V^T A V``) and the normalised remainder in ``basis[j+1]`` when there is
    room. Returns the remainder's norm (beta).
    """
    w = apply(basis[j : j + 1].T)[:, 0]
    if w.untyped_storage().data_ptr() == basis.untyped_storage().data_ptr():
        w = w.clone()  # an operator that hands back its input (the identity): w is changed in place below
    done = basis[: j + 1]
    coeffs = done @ w
    w.addmv_(done.T, coeffs, alpha=-1)  # in place: no n-vector temporaries beside w
    again = done @ w
    w.addmv_(done.T, again, alpha=-1)
    coeffs = coeffs + again
    proj[: j + 1, j] = coeffs
    proj[j, : j + 1] = coeffs
    beta = float(w.norm())
    if j + 1 < basis.shape[0] and beta > 0:
        torch.div(w, beta, out=basis[j + 1])
    return beta


def _fresh_direction(basis: Tensor, gen: torch.Generator) -> Tensor:
    """A random unit vector orthogonal to the rows of ``basis``."""
    fresh = torch.randn(basis.shape[1], generator=gen, dtype=basis.dtype).to(basis.device)
    for _ in range(2):
        fresh = fresh - basis.T @ (basis @ fresh)
    return fresh / fresh.norm()


class LanczosState:
    r"""A Lanczos decomposition :math:`A V_j = V_j T_j + \beta v_{j+1} e_j^\top`, grown by :meth:`step`
    and cut back by :meth:`restart`; :meth:`ritz` solves the projected problem.

    The basis vectors are the rows of ``basis`` (up to ``size + 1`` of them: the last holds
    :math:`v_{j+1}` when the basis is full). On the CPU it is allocated whole but uncommitted (pages
    never written cost nothing); elsewhere it grows by doubling as the run needs it. ``proj`` holds
    :math:`T_j` dense (after a thick restart it is diagonal plus one coupling row, then tridiagonal).
    With a basis stored in a coarser precision than ``start`` (the recurrence's), steps use partial
    reorthogonalisation until the first thick restart and full reorthogonalisation after it, in the
    recurrence's precision (:mod:`~saddlescope.curvature.basis_plan`); ``omega`` holds Simon's estimates of the basis's inner
    products meanwhile.
    """

    def __init__(self, start: Tensor, size: int, seed: int, *, basis_dtype: torch.dtype | None = None):
        self.n = start.numel()
        self.size = size
        self.dtype = start.dtype  # recurrence: coefficients, T, working vectors
        basis_dtype = basis_dtype or start.dtype
        self.coarse = torch.finfo(basis_dtype).bits < torch.finfo(start.dtype).bits
        self.partial = self.coarse  # partial reorthogonalisation until a thick restart, then full
        self.eps = torch.finfo(basis_dtype).eps
        # Elsewhere than the CPU, rows as the run needs them, doubling, with the last growth from half the
        # plan (so a growth holds at most 1.5 bases, as planned_bytes counts).
        self._sizes = [size + 1]
        while start.device.type != "cpu" and self._sizes[0] > 64:
            self._sizes.insert(0, math.ceil(self._sizes[0] / 2))
        self.basis = torch.empty(self._sizes[0], self.n, dtype=basis_dtype, device=start.device)
        self.proj = torch.zeros(size, size, dtype=start.dtype, device=start.device)
        self.basis[0] = start / start.norm()
        self.j = 0
        self.beta = 0.0
        self.decoupled = False  # beta ~ 0: V_j spans an invariant subspace
        self.norm_est = 0.0  # max |entry of T| and |Ritz value| so far: a lower bound on ||A||
        self.restarts = 0
        self.ritz_at = 0  # basis size at the last Rayleigh-Ritz
        # The basis is the Krylov space of the start, with p_j(A) v_1 = beta_1...beta_j v_{j+1}
        # (until a restart or a fresh direction after an invariant subspace breaks it).
        self.krylov = True
        self.saw_invariant = False  # a Krylov space of the start became invariant: every eigenvalue seen
        self.reorthogonalisations = 0
        self._force = False  # partial: orthogonalise this step's vector fully (Simon: the pair after a loss)
        if self.partial:
            self.omega = torch.zeros(size + 1, size + 1, dtype=torch.float64, device=start.device)
            self.omega[0, 0] = 1.0
        self._gen = torch.Generator(device="cpu").manual_seed(seed + 1)

    @property
    def full(self) -> bool:
        return self.j >= self.size

    @property
    def coupling(self) -> float:
        """``beta`` of the decomposition, 0 when ``V_j`` spans an invariant subspace (or all of R^n)."""
        return 0.0 if (self.decoupled or self.j >= self.n) else self.beta

    def _room_for(self, rows: int) -> None:
        if self.basis.shape[0] < rows:
            bigger = next(size for size in self._sizes if size > self.basis.shape[0])
            grown = torch.empty(bigger, self.n, dtype=self.basis.dtype, device=self.basis.device)
            grown[: self.basis.shape[0]] = self.basis
            self.basis = grown

    def step(self, apply: Callable[[Tensor], Tensor]) -> None:
        """One Lanczos step: extend the basis by ``A v_j``, orthogonalised (fully or partially, see above)."""
        self._room_for(self.j + 2)
        if self.partial:
            self.beta = self._partial_step(apply)
        elif self.coarse:
            self.beta = self._full_coarse_step(apply)
        else:
            self.beta = lanczos_step(apply, self.basis, self.proj, self.j)
        self.j += 1
        self.norm_est = max(self.norm_est, float(self.proj[: self.j, self.j - 1].abs().max()))
        self.decoupled = self.beta <= 1e-12 * max(self.norm_est, 1e-300)
        if self.decoupled and self.j < self.n:
            # Invariant subspace: its Ritz values are exact. Go on from a fresh random direction
            # orthogonal to the basis, decoupled from it (T stays block diagonal).
            if self.krylov:
                self.saw_invariant = True
            self.krylov = False
            if self.coarse:
                fresh = torch.randn(self.n, generator=self._gen, dtype=self.dtype).to(self.basis.device)
                self._orthogonalise(fresh, 0, self.j)
                self._orthogonalise(fresh, 0, self.j)
                self.basis[self.j] = fresh / fresh.norm()
                if self.partial:
                    self._set_omega(self.j, torch.full((self.j,), self.eps, dtype=torch.float64))
            else:
                self.basis[self.j] = _fresh_direction(self.basis[: self.j], self._gen)

    # -- partial reorthogonalisation (float32 basis, float64 arithmetic) ---------------------------
    def _block_columns(self, rows: int) -> int:
        """Columns per block when ``rows`` basis rows are combined (at most CHUNK_BYTES, an eighth of n)."""
        return max(1, min(math.ceil(self.n / 8), CHUNK_BYTES // (max(rows, 1) * 8)))

    def _rows(self, lo: int, hi: int):
        """Blocks ``(r0, rows in the recurrence dtype)`` of ``basis[lo:hi]``, at most CHUNK_BYTES each
        and an eighth of the basis."""
        per = max(1, min(CHUNK_BYTES // (self.n * 8), math.ceil((self.size + 1) / 8)))
        for r0 in range(lo, hi, per):
            yield r0, self.basis[r0 : min(hi, r0 + per)].to(self.dtype)

    def _orthogonalise(self, w: Tensor, lo: int, hi: int) -> Tensor:
        """Subtract from ``w`` (in place) its components along ``basis[lo:hi]``, block by block; return them."""
        coeffs = torch.zeros(hi - lo, dtype=self.dtype, device=w.device)
        for r0, block in self._rows(lo, hi):
            c = block @ w
            w -= block.T @ c
            coeffs[r0 - lo : r0 - lo + c.numel()] += c
        return coeffs

    def _set_omega(self, row: int, values: Tensor) -> None:
        self.omega[row, :row] = values.to(self.omega.device)
        self.omega[:row, row] = values.to(self.omega.device)
        self.omega[row, row] = 1.0

    def _full_coarse_step(self, apply: Callable[[Tensor], Tensor]) -> float:
        """:func:`lanczos_step` on a coarse basis: float64 arithmetic, the basis read a block at a time."""
        j = self.j
        w = apply(self.basis[j : j + 1].T)[:, 0]  # the stored row as it is: apply widens only the product
        coeffs = self._orthogonalise(w, 0, j + 1)
        coeffs += self._orthogonalise(w, 0, j + 1)
        self.proj[: j + 1, j] = coeffs
        self.proj[j, : j + 1] = coeffs
        beta = float(w.norm())
        if j + 1 < self.basis.shape[0] and beta > 0:
            self.basis[j + 1] = w.div_(beta)  # in place: w is done with
        return beta

    def _partial_step(self, apply: Callable[[Tensor], Tensor]) -> float:
        j = self.j
        w = apply(self.basis[j : j + 1].T)[:, 0]
        lo = max(j - 1, 0)  # the three-term recurrence (partial reorthogonalisation ends at a restart)
        coeffs = self._orthogonalise(w, lo, j + 1)
        coeffs += self._orthogonalise(w, lo, j + 1)  # twice is enough
        self.proj[lo : j + 1, j] = coeffs
        self.proj[j, lo : j + 1] = coeffs
        beta = float(w.norm())
        if beta <= 0:
            return beta
        # Simon's recurrence: beta omega_{j+1} = T omega_j - sum_{l in L} T_lj omega_l, plus rounding.
        t = self.proj[: j + 1, : j + 1].to(torch.float64)
        om = self.omega
        new = (t @ om[: j + 1, j] - om[: j + 1, lo : j + 1] @ t[lo : j + 1, j]) / beta
        new += torch.sign(new) * self.eps * max(self.norm_est, float(coeffs.abs().max())) / beta
        new[lo : j + 1] = self.eps
        forced, lost = self._force, bool(new.abs().max() > math.sqrt(self.eps))
        if forced or lost:
            self._orthogonalise(w, 0, j + 1)  # coefficients discarded: T stays tridiagonal (and arrow)
            self._orthogonalise(w, 0, j + 1)
            beta = float(w.norm())
            new.fill_(self.eps)
            self.reorthogonalisations += 1
        self._force = lost and not forced
        self._set_omega(j + 1, new)
        if j + 1 < self.basis.shape[0] and beta > 0:
            self.basis[j + 1] = w.div_(beta)  # in place: w is done with
        return beta

    # -------------------------------------------------------------------------------------------------
    def ritz(self) -> Ritz:
        """Rayleigh–Ritz on the current basis (cheap next to a product while the basis is small)."""
        t = self.proj[: self.j, : self.j]
        values, coeffs = torch.linalg.eigh(0.5 * (t + t.T))
        self.norm_est = max(self.norm_est, float(values.abs().max()))
        self.ritz_at = self.j
        return Ritz(values, coeffs, (self.coupling * coeffs[self.j - 1, :]).abs())

    def log_krylov_norm(self) -> float:
        r""":math:`\log \|p_j(A) v_1\| = \log(\beta_1\cdots\beta_j)`, from the subdiagonal of ``T_j`` and
        ``beta`` (meaningful while :attr:`krylov`)."""
        if self.coupling == 0.0:
            return -math.inf
        sub = torch.diagonal(self.proj[: self.j, : self.j], -1).abs().to(torch.float64)
        if bool((sub <= 0).any()):
            return -math.inf
        return float(torch.log(sub).sum()) + math.log(self.beta)

    def restart(self, ritz: Ritz, keep: Tensor) -> None:
        r"""Thick restart: the basis becomes the kept Ritz vectors ``Y`` and ``v_{j+1}``.

        The decomposition keeps its form, :math:`A Y = Y \Theta + v_{j+1} c^\top` with
        :math:`c = \beta s_{j,keep}`: ``T`` becomes ``diag(theta_keep)`` bordered by ``c`` in its next
        row and column, and the next step recomputes that row in full from ``A v_{j+1}``. ``Y`` is
        formed in place, a block of columns at a time (no second copy of the kept vectors).
        """
        kept = keep.numel()
        s = ritz.coeffs[:, keep]
        coupling = self.coupling * ritz.coeffs[self.j - 1, keep]
        per = self._block_columns(self.j)
        for c0 in range(0, self.n, per):
            block = self.basis[: self.j, c0 : c0 + per].to(self.dtype)
            self.basis[:kept, c0 : c0 + per] = (s.T @ block).to(self.basis.dtype)
        self.basis[kept] = self.basis[self.j]
        self.proj.zero_()
        self.proj[:kept, :kept] = torch.diag(ritz.values[keep])
        self.proj[kept, :kept] = coupling
        self.proj[:kept, kept] = coupling
        if self.partial:
            # Simon's recurrence is for the three-term Lanczos recurrence; a thick restart ends it, and
            # from here every step orthogonalises against the whole basis (kept vectors included).
            self.partial = False
            del self.omega
        self.j = kept
        self.ritz_at = kept
        self.restarts += 1
        self.krylov = False

    def vectors(self, ritz: Ritz, idx: Tensor) -> Tensor:
        """The Ritz vectors ``V_j s_i`` for ``i`` in ``idx``, unit columns (shape ``(n, len(idx))``)."""
        coeffs = ritz.coeffs[:, idx]
        if self.basis.dtype == self.dtype:
            vectors = self.basis[: self.j].T @ coeffs
        else:
            vectors = torch.empty(self.n, coeffs.shape[1], dtype=self.dtype, device=self.basis.device)
            per = self._block_columns(self.j)
            for c0 in range(0, self.n, per):
                vectors[c0 : c0 + per] = self.basis[: self.j, c0 : c0 + per].to(self.dtype).T @ coeffs
        return vectors.div_(vectors.norm(dim=0, keepdim=True))  # in place: no second n-by-k copy


def restart_set(ritz: Ritz, k: int, which: str, size: int, converged: Tensor) -> Tensor:
    """The Ritz pairs a thick restart keeps: indices into ``ritz.values``, ascending.

    Near the wanted end, the wanted pairs and as many neighbours, up to half the basis (Wu & Simon).
    Besides them, every converged pair (locking: see the module docstring), most accurate first,
    while a third of the basis stays free for new vectors; locked pairs take their room from the
    neighbours, down to as many neighbours as wanted pairs.
    """
    j = ritz.values.numel()
    n_wanted = wanted(ritz.values, k, which).numel()
    room = size - max(size // 3, 2)  # kept at most
    n_near = min(j - 1, size - 2, n_wanted + max(n_wanted, (size - n_wanted) // 2))

    def nearest(count: int) -> Tensor:
        """The ``count`` pairs nearest the wanted end (``count / 2`` at each end for ``"both"``)."""
        return wanted(ritz.values, count // 2 if which == "both" else count, which)

    elsewhere = torch.ones(j, dtype=torch.bool)
    elsewhere[nearest(n_near)] = False
    lockable = torch.nonzero(elsewhere & converged.cpu()).flatten()
    lockable = lockable[torch.argsort(ritz.estimates.cpu()[lockable])]  # most accurate first
    n_near = max(min(n_near, room - lockable.numel()), min(n_near, 2 * n_wanted))
    near = nearest(n_near)
    locked = lockable[: max(0, room - near.numel())]
    return torch.sort(torch.cat([near, locked])).values


def eigs(
    op: Any,
    k: int = 1,
    which: str = "largest",
    *,
    tol: float = 1e-6,
    krylov_dim: int | None = None,
    max_hvps: int | None = None,
    seed: int = 0,
    v0: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    stop_below: float | None = None,
    relative_to: str = "norm",
    atol: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    memory_budget: int | None = None,
    basis_dtype: torch.dtype | None = None,
    miss_probability: float = DEFAULT_MISS_PROBABILITY,
    require_bound: bool = False,
    patience: float | None = None,
) -> EigenResult:
    """The ``k`` extreme eigenpairs of a symmetric operator.

    Args:
        op: anything with ``shape``, ``dtype``, ``device`` and ``matmat`` (e.g.
            :class:`~saddlescope.curvature.operator.HessianOperator`).
        k: pairs wanted at each requested end.
        which: ``"largest"``, ``"smallest"`` (the most negative: what decides a saddle) or ``"both"``.
        tol: converged when ``||A v - lambda v|| <= max(tol * scale, atol)``, where ``scale`` is the
            spectral-norm estimate ``max|lambda|`` (``relative_to="norm"``) or ``|lambda|`` of the
            pair itself (``relative_to="value"``: then ``tol`` bounds each eigenvalue's relative error).
        krylov_dim: basis size before a thick restart (default: planned from ``memory_budget``, see
            :func:`plan_basis`: as many vectors as fit, at most :data:`KRYLOV_MAX`; at most n).
        max_hvps: product budget (default ``min(2000, max(20 * krylov_dim, 500))``); the result says
            which pairs converged within it.
        seed: for the starting vector.
        v0: starting vector instead of a random one (then no random-start guard: convergence is not
            judged before ``max(2m + 1, 20)`` basis vectors, m pairs wanted).
        dtype: precision of the recurrence, basis and projected eigenproblem.
        stop_below: stop as soon as the smallest Ritz value is below this (a Ritz value is a Rayleigh
            quotient, so a negative one certifies negative curvature without convergence); the
            result's ``stopped_early`` says so and its Rayleigh quotients are recomputed exactly.
        relative_to: ``"norm"`` or ``"value"`` (see ``tol``).
        atol: absolute residual floor. Default 0 for ``"norm"``; for ``"value"``
            ``16 * eps(op.dtype) * max|lambda|``, near where products in the operator's precision stop
            improving, so an eigenvalue at zero does not spend the whole budget. With a float32 basis
            under float64 coefficients the floor is at least ``64 * eps(float32) * max|lambda|``
            (:data:`COARSE_FLOOR_EPS`), for either ``relative_to``: residuals stop improving there.
        progress: ``progress(products, max_hvps)`` after every Lanczos step.
        memory_budget: bytes the eigensolver's own tensors may hold (default: half of what is free
            where the operator lives, less the gradient graph a product rebuilds; see
            :func:`default_budget`). The result's ``plan`` says what was chosen and why.
        basis_dtype: store the basis in this precision instead of letting the plan choose (float32
            with float64 ``dtype``: partial reorthogonalisation).
        miss_probability: the misconvergence guard's level (:mod:`~saddlescope.curvature.stopping`).
        require_bound: stop on converged residuals only under the random-start bound while it holds (a
            random start, no thick restart), however large the basis; by default a basis of
            ``max(2m + 1, 20)`` vectors also accepts them (ARPACK's ``ncv``, Lanczos's premise that the
            converged pairs are the extreme ones). What a "minimum" needs (:func:`~saddlescope.analyze`).
        patience: once the extreme pair at each wanted end has converged after ``P`` products, the other
            wanted pairs get until ``(1 + patience) P`` products; pairs not converged by then are returned as
            they are (``converged`` says which; ``guard["stopped"] == "patience"``). What keeps pairs deep in
            a dense bulk from costing hundreds of products nobody needs. None (default): the whole budget.

    Raises:
        MemoryBudgetError: not even the smallest useful basis fits the budget (before any product).
    """
    n = int(op.shape[0])
    want = _checked(n, k, which, tol, relative_to, atol, miss_probability, krylov_dim, patience)
    plan = budget_plan(op, n, want, memory_budget=memory_budget, krylov_dim=krylov_dim, basis_dtype=basis_dtype,
                        dtype=dtype)
    two_pass = plan.reorthogonalisation == TWO_PASS
    m_max = KRYLOV_MAX if two_pass else plan.vectors  # a two-pass run is never full: its steps are the budget's
    budget = max_hvps if max_hvps is not None else min(DEFAULT_MAX_HVPS, max(20 * m_max, 500))
    if budget < 1:
        raise InvalidInputError(f"max_hvps must be at least 1, got {budget}")
    stored = getattr(torch, plan.dtype.removeprefix("torch."))
    # A two-pass plan at the default budget hands freed memory back only while memory is short (see
    # CountedProduct); an explicit budget, or a float32 basis, always.
    trim_below = plan.budget if two_pass and memory_budget is None and plan.budget is not None else None
    apply = CountedProduct(op, torch.device(plan.device), dtype, lean=plan.reorthogonalisation != "full",
                           trim_below=trim_below)
    random_start = v0 is None
    if v0 is None:
        v0 = torch.randn(n, generator=torch.Generator(device="cpu").manual_seed(seed), dtype=dtype)
    v = v0.to(apply.where, dtype)
    if float(v.norm()) == 0:
        raise InvalidInputError("v0 must be non-zero")
    coarse = torch.finfo(stored).bits < torch.finfo(dtype).bits
    rule = StoppingRule(
        k=k, which=which, tol=tol, relative_to=relative_to, atol=atol,
        value_floor=_value_floor(op.dtype, stored, coarse), stop_below=stop_below, budget=budget,
        min_dim=min(n, m_max, max(2 * want + 1, 20)), n=n,
        miss_probability=miss_probability if random_start else None, coarse_basis=coarse,
        require_bound=require_bound, patience=patience,
    )
    state: LanczosState | TwoPassState
    state = TwoPassState(v, vector_dtype=stored) if two_pass else LanczosState(v, m_max, seed, basis_dtype=stored)
    del v, v0  # the state holds its own (normalised) copy: a float64 vector less for the whole run
    ritz, stop, before_restart = _iterate(state, rule, apply, k, which, m_max, progress)
    guard = rule.report(state, ritz, stop, before_restart)
    # The wanted Ritz vectors, and the far end's (one call: a two-pass state spends a pass on it).
    picked = wanted(ritz.values, k, which, ritz.distinct)
    far = None
    if which != "both" and ritz.values.numel() > k:
        far = 0 if which == "largest" else ritz.values.numel() - 1
    everything = state.vectors(ritz, picked if far is None else torch.cat([picked, torch.tensor([far])]))
    vectors = everything[:, : picked.numel()]
    opposite, opposite_value = None, None
    if far is not None:
        opposite, opposite_value = everything[:, -1].to(op.device), float(ritz.values[far])
    # The basis is done with: let it go before the confirming product, so the two never coexist.
    restarts, reorthogonalisations, norm_est = state.restarts, state.reorthogonalisations, state.norm_est
    del state
    rayleigh, residuals = _confirmed(apply, vectors)
    order = torch.argsort(rayleigh)
    norm_est = max(norm_est, float(rayleigh.abs().max()))
    return EigenResult(
        eigenvalues=rayleigh[order].to(op.device),
        eigenvectors=vectors[:, order].to(op.device),
        residuals=residuals[order].to(op.device),
        converged=(residuals[order] <= rule.bound(rayleigh[order], norm_est)).cpu(),
        spectral_norm=norm_est,
        hvp_count=apply.products,
        restarts=restarts,
        which=which,
        tol=tol,
        stopped_early=stop == "certificate",
        relative_to=relative_to,
        atol=rule.floor(norm_est),
        dtype=str(stored),
        operator_dtype=str(op.dtype),
        plan=plan,
        guard=guard,
        reorthogonalisations=reorthogonalisations,
        opposite=opposite,
        opposite_ritz_value=opposite_value,
    )


def _checked(n: int, k: int, which: str, tol: float, relative_to: str, atol: float | None,
             miss_probability: float, krylov_dim: int | None, patience: float | None = None) -> int:
    """:func:`eigs`'s arguments checked (clear errors before any product); the pairs wanted in all."""
    if which not in WHICH:
        raise InvalidInputError(f"which must be one of {WHICH}, got {which!r}")
    want = 2 * k if which == "both" else k
    if not (isinstance(k, int) and 1 <= k and want <= n):
        raise InvalidInputError(f"k = {k} pairs ({which}) do not fit an operator of dimension {n}")
    if not (tol > 0):
        raise InvalidInputError(f"tol must be positive, got {tol}")
    if relative_to not in ("norm", "value"):
        raise InvalidInputError(f"relative_to must be 'norm' or 'value', got {relative_to!r}")
    if atol is not None and not (atol >= 0):
        raise InvalidInputError(f"atol must be >= 0, got {atol}")
    if not (0 < miss_probability < 1):
        raise InvalidInputError(f"miss_probability must lie in (0, 1), got {miss_probability}")
    if patience is not None and not (patience >= 0 and math.isfinite(patience)):
        raise InvalidInputError(f"patience must be a finite number >= 0 or None, got {patience}")
    if krylov_dim is not None and min(n, krylov_dim) < min(n, want + 2):
        raise InvalidInputError(f"krylov_dim = {min(n, krylov_dim)} is too small for {want} pairs; use at least {want + 2}")
    return want


def _value_floor(op_dtype: torch.dtype, stored: torch.dtype, coarse: bool) -> float:
    """The relative residual floor (times ``max|lambda|``): where products in the operator's precision,
    or a coarse basis, stop improving residuals."""
    floor = VALUE_FLOOR_EPS * torch.finfo(op_dtype).eps
    return max(floor, COARSE_FLOOR_EPS * torch.finfo(stored).eps) if coarse else floor


class CountedProduct:
    """``A V`` as the eigensolver takes it: onto the operator's device and precision and back to where the
    basis lives (``where``) in the recurrence's, counting products.

    ``lean``: a plan that had to economise, which on the host hands what the allocator holds free back
    after every product (:func:`saddlescope.memory.return_freed_memory`: otherwise the products' freed
    temporaries stay resident). The next product faults those pages in again: about 5% of a product at 5M
    parameters, but at 124M (GPT-2, one CPU thread) a product right after the hand-back took 3.2-6.1 s
    against 2.1-2.8 s. So with ``trim_below`` (bytes) it hands memory back only while the host's free
    memory is below that: what :func:`eigs` sets for a two-pass plan at the default budget (its budget, half
    of what was free), where memory is plentiful until it is not. None: after every product."""

    def __init__(self, op: Any, where: torch.device, dtype: torch.dtype, *, lean: bool,
                 trim_below: int | None = None) -> None:
        self.op, self.where, self.dtype = op, where, dtype
        self.lean = lean and where.type == "cpu"
        self.trim_below = trim_below
        self.products = 0

    def __call__(self, block: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
        self.products += block.shape[1]
        out = self.op.matmat(block.to(self.op.device, self.op.dtype)).to(self.where, out_dtype or self.dtype)
        if self.lean and self._short_of_memory():
            return_freed_memory()
        return out

    def _short_of_memory(self) -> bool:
        if self.trim_below is None:
            return True
        free, _ = available_memory("cpu")
        return free is None or free < self.trim_below


def _iterate(state: LanczosState | TwoPassState, rule: StoppingRule, apply: CountedProduct, k: int, which: str,
             m_max: int, progress: Callable[[int, int], None] | None) -> tuple[Ritz, str, dict[str, float] | None]:
    """Step, and restart when the basis is full, until the stopping rule (or a broken-down two-pass
    recurrence) ends the run; the last Rayleigh–Ritz pairs, why it stopped, and the random-start bounds
    of the space just before the first thick restart (None without one: :meth:`StoppingRule.report`)."""
    before_restart, lead_at = None, None
    while True:
        if not state.full and apply.products < rule.budget:
            state.step(apply)
            if progress is not None:
                progress(apply.products, rule.budget)
        if not rule.due(state, apply.products):
            continue
        ritz = state.ritz()
        if rule.patience is not None and lead_at is None and rule.lead_converged(state, ritz):
            lead_at = apply.products
        stop = rule.reason(state, ritz, apply.products, lead_at)
        if stop is not None:
            return ritz, stop, before_restart
        if state.full and isinstance(state, TwoPassState):
            return ritz, "exhausted", None  # the recurrence broke down: its Krylov space is invariant, its Ritz pairs exact
        if state.full:
            if not state.restarts:
                before_restart = rule.bounds(state, ritz)
            converged = ritz.estimates <= rule.bound(ritz.values, state.norm_est)
            state.restart(ritz, restart_set(ritz, k, which, m_max, converged))


def _confirmed(apply: CountedProduct, vectors: Tensor) -> tuple[Tensor, Tensor]:
    """Rayleigh quotients and true residual norms of unit ``vectors`` (Lanczos's estimates can be
    optimistic in floating point): one product, held in the vectors' precision (float32 Ritz vectors of a
    two-pass run: a float32 operator's product loses nothing there), then column by column in place (no
    n-by-k temporaries beside it: what a run without a basis holds matters), the sums accumulated in the
    recurrence's precision (``apply.dtype``)."""
    confirm = apply(vectors, vectors.dtype)
    rayleigh, residuals = [], []
    for i in range(vectors.shape[1]):
        rayleigh.append(widened_dot(vectors[:, i], confirm[:, i], apply.dtype))
        confirm[:, i].add_(vectors[:, i], alpha=-rayleigh[-1])
        residuals.append(math.sqrt(max(widened_dot(confirm[:, i], confirm[:, i], apply.dtype), 0.0)))
    device = vectors.device
    return (torch.tensor(rayleigh, dtype=apply.dtype, device=device),
            torch.tensor(residuals, dtype=apply.dtype, device=device))


__all__ = [
    "BASIS_MEMORY_SHARE", "DEFAULT_MISS_PROBABILITY", "KRYLOV_MAX", "KRYLOV_MEMORY_BYTES", "TWO_PASS", "WHICH",
    "BasisPlan", "EigenResult", "LanczosState", "StoppingRule", "default_budget", "eigs", "lanczos_step",
    "minimum_basis", "plan_basis", "planned_bytes", "preferred_basis", "random_start_bound", "random_start_miss",
    "restart_set",
]
