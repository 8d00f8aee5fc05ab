r"""Extreme eigenpairs of a symmetric operator: thick-restart Lanczos with full reorthogonalisation.

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
default 20: 226,000). So the basis is as large as memory allows (:data:`KRYLOV_MAX`), not a fixed 100.

Convergence is judged by residual norms, never by the change between iterates (:class:`StoppingRule`):
relative to the spectral-norm estimate :math:`\max|\theta|` (the default), or relative to each Ritz
value itself (``relative_to="value"``). The second is what a small eigenvalue needs: a Ritz pair with
residual :math:`r` has an eigenvalue within :math:`r` of :math:`\theta` (for symmetric :math:`A`), so
:math:`r \le \text{tol}\,|\theta|` bounds the relative error of :math:`\theta` by ``tol`` even when
:math:`|\lambda_{min}| \ll \lambda_{max}`. On convergence the Ritz vectors are
multiplied once more (k extra products) to report *true* residuals: in floating point Lanczos loses
orthogonality and the cheap estimate can be optimistic.

The recurrence, the basis and the small eigenproblem run in ``dtype`` (float64 by default), whatever
precision the operator computes in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saddlescope.errors import InvalidInputError

WHICH = ("largest", "smallest", "both")

# Default basis size: as many vectors as fit KRYLOV_MEMORY_BYTES, at most KRYLOV_MAX, at least
# max(3m + 10, 40) (m pairs wanted). A larger basis restarts less and never needs more products
# (trained 26k-parameter MLP, float32: 200 HVPs with 40 vectors, 90 with 100; the log-spaced spectrum
# above: 560-590 with 1,000, about 18,000 with 100). The cap bounds the Rayleigh-Ritz cost, O(j^3) in
# the basis size j (0.3 s at j = 1,000 on one thread).
KRYLOV_MAX = 1000
KRYLOV_MEMORY_BYTES = 2**30
# Default product budget: max(20 * basis size, 500), at most DEFAULT_MAX_HVPS (what a 100-vector basis
# got before the basis grew with memory: a larger basis needs fewer products, not a larger budget).
DEFAULT_MAX_HVPS = 2000
# Rayleigh-Ritz after every step while the basis has at most RITZ_EVERY_STEP vectors (0.7 ms at 100),
# then every ceil(j / RITZ_INTERVAL) steps: a large basis then spends little on it and stops at most
# about 3% of its products late.
RITZ_EVERY_STEP = 128
RITZ_INTERVAL = 32
# Residual floor of relative_to="value", in units of eps(operator dtype) * ||A||: products in
# float32 reached 3 eps ||A|| on a trained MLP, so 16 leaves a margin without giving up accuracy.
VALUE_FLOOR_EPS = 16


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
        dtype: precision of the recurrence, basis and projected eigenproblem;
            operator_dtype: precision of the products (the model's).
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
        }
        if vectors:
            out["eigenvectors"] = self.eigenvectors.T.tolist()
        return out


def lanczos_step(apply: Any, basis: Tensor, proj: Tensor, j: int) -> float:
    """Extend a Lanczos basis by one vector (the package's one Lanczos step).

    The basis vectors are the *rows* of ``basis`` (so every slice ``basis[:j+1]`` is contiguous and
    the projections are dense matrix-vector products). ``basis[:j+1]`` is orthonormal; computes
    ``w = A basis[j]``, orthogonalises it twice against all of ``basis[:j+1]`` ("twice is enough",
    full reorthogonalisation), stores the projections in column/row ``j`` of ``proj`` (so
    ``proj[:j+1, :j+1] = V^T A V``) and the normalised remainder in ``basis[j+1]`` when there is
    room. Returns the remainder's norm (beta).
    """
    w = apply(basis[j : j + 1].T)[:, 0]
    done = basis[: j + 1]
    coeffs = done @ w
    w = w - done.T @ coeffs
    again = done @ w
    w = w - done.T @ again
    coeffs = coeffs + again
    proj[: j + 1, j] = coeffs
    proj[j, : j + 1] = coeffs
    beta = float(w.norm())
    if j + 1 < basis.shape[0] and beta > 0:
        basis[j + 1] = w / beta
    return beta


def _fresh_direction(basis: Tensor, gen: torch.Generator) -> Tensor:
    """A random unit vector orthogonal to the rows of ``basis``."""
    fresh = torch.randn(basis.shape[1], generator=gen, dtype=basis.dtype).to(basis.device)
    for _ in range(2):
        fresh = fresh - basis.T @ (basis @ fresh)
    return fresh / fresh.norm()


def _wanted(theta: Tensor, k: int, which: str) -> Tensor:
    """Indices (into ascending Ritz values) of the pairs asked for."""
    m = theta.numel()
    if which == "largest":
        return torch.arange(max(0, m - k), m)
    if which == "smallest":
        return torch.arange(0, min(k, m))
    low = torch.arange(0, min(k, m))
    high = torch.arange(max(0, m - k), m)
    return torch.unique(torch.cat([low, high]))


@dataclass
class Ritz:
    r"""Rayleigh–Ritz on a Lanczos decomposition: pairs :math:`(\theta_i, y_i = V_j s_i)`.

    Attributes:
        values: ``theta``, ascending.
        coeffs: the ``s_i`` as columns (shape ``(j, j)``).
        estimates: ``beta |s_{j,i}|``, the residual ``||A y_i - theta_i y_i||`` in exact arithmetic.
    """

    values: Tensor
    coeffs: Tensor
    estimates: Tensor


class LanczosState:
    r"""A Lanczos decomposition :math:`A V_j = V_j T_j + \beta v_{j+1} e_j^\top`, grown by :meth:`step`
    and cut back by :meth:`restart`; :meth:`ritz` solves the projected problem.

    The basis vectors are the rows of ``basis`` (up to ``size + 1`` of them: the last holds
    :math:`v_{j+1}` when the basis is full; allocated as the run needs them, doubling, so a run that
    converges early never holds the whole basis) and ``proj`` holds :math:`T_j` dense (after a
    thick restart it is diagonal plus one coupling row, then tridiagonal).
    """

    def __init__(self, start: Tensor, size: int, seed: int):
        self.n = start.numel()
        self.size = size
        self.basis = torch.zeros(min(size + 1, 64), self.n, dtype=start.dtype, device=start.device)
        self.proj = torch.zeros(size, size, dtype=start.dtype, device=start.device)
        self.basis[0] = start / start.norm()
        self.j = 0
        self.beta = 0.0
        self.decoupled = False  # beta ~ 0: V_j spans an invariant subspace
        self.norm_est = 0.0  # max |entry of T| and |Ritz value| so far: a lower bound on ||A||
        self.restarts = 0
        self.ritz_at = 0  # basis size at the last Rayleigh-Ritz
        self._gen = torch.Generator(device="cpu").manual_seed(seed + 1)

    @property
    def full(self) -> bool:
        return self.j >= self.size

    @property
    def coupling(self) -> float:
        """``beta`` of the decomposition, 0 when ``V_j`` spans an invariant subspace (or all of R^n)."""
        return 0.0 if (self.decoupled or self.j >= self.n) else self.beta

    def step(self, apply: Callable[[Tensor], Tensor]) -> None:
        """One Lanczos step: extend the basis by ``A v_j``, orthogonalised twice against all of it."""
        if self.basis.shape[0] < self.j + 2:
            rows = min(self.size + 1, 2 * self.basis.shape[0])
            grown = torch.zeros(rows, self.n, dtype=self.basis.dtype, device=self.basis.device)
            grown[: self.basis.shape[0]] = self.basis
            self.basis = grown
        self.beta = lanczos_step(apply, self.basis, self.proj, self.j)
        self.j += 1
        self.norm_est = max(self.norm_est, float(self.proj[: self.j, self.j - 1].abs().max()))
        self.decoupled = self.beta <= 1e-12 * max(self.norm_est, 1e-300)
        if self.decoupled and self.j < self.n:
            # Invariant subspace: its Ritz values are exact. Go on from a fresh random direction
            # orthogonal to the basis, decoupled from it (T stays block diagonal).
            self.basis[self.j] = _fresh_direction(self.basis[: self.j], self._gen)

    def ritz(self) -> Ritz:
        """Rayleigh–Ritz on the current basis (cheap next to a product while the basis is small)."""
        t = self.proj[: self.j, : self.j]
        values, coeffs = torch.linalg.eigh(0.5 * (t + t.T))
        self.norm_est = max(self.norm_est, float(values.abs().max()))
        self.ritz_at = self.j
        return Ritz(values, coeffs, (self.coupling * coeffs[self.j - 1, :]).abs())

    def restart(self, ritz: Ritz, keep: Tensor) -> None:
        r"""Thick restart: the basis becomes the kept Ritz vectors ``Y`` and ``v_{j+1}``.

        The decomposition keeps its form, :math:`A Y = Y \Theta + v_{j+1} c^\top` with
        :math:`c = \beta s_{j,keep}`: ``T`` becomes ``diag(theta_keep)`` bordered by ``c`` in its next
        row and column, and the next step recomputes that row in full from ``A v_{j+1}``.
        """
        kept = keep.numel()
        coupling = self.coupling * ritz.coeffs[self.j - 1, keep]
        new_basis = ritz.coeffs[:, keep].T @ self.basis[: self.j]
        self.basis[kept] = self.basis[self.j]
        self.basis[:kept] = new_basis
        self.proj.zero_()
        self.proj[:kept, :kept] = torch.diag(ritz.values[keep])
        self.proj[kept, :kept] = coupling
        self.proj[:kept, kept] = coupling
        self.j = kept
        self.ritz_at = kept
        self.restarts += 1

    def vectors(self, ritz: Ritz, idx: Tensor) -> Tensor:
        """The Ritz vectors ``V_j s_i`` for ``i`` in ``idx``, unit columns (shape ``(n, len(idx))``)."""
        vectors = self.basis[: self.j].T @ ritz.coeffs[:, idx]
        return vectors / vectors.norm(dim=0, keepdim=True)


@dataclass(frozen=True)
class StoppingRule:
    """When :func:`eigs` looks at its Ritz pairs and when it stops: everything about stopping in one place.

    Attributes:
        k, which: the pairs wanted (see :func:`eigs`).
        tol, relative_to, atol: the residual each wanted pair must reach (see :meth:`bound`).
        value_floor: for ``relative_to="value"`` without ``atol``, the floor per unit of ``||A||``.
        stop_below: stop at the first Ritz value below it (a certificate), at any basis size.
        budget: the product budget.
        min_dim: basis size below which convergence is not judged (ARPACK's default ``ncv``).
        n: the dimension.
    """

    k: int
    which: str
    tol: float
    relative_to: str
    atol: float | None
    value_floor: float
    stop_below: float | None
    budget: int
    min_dim: int
    n: int

    def floor(self, norm_est: float) -> float:
        if self.atol is not None:
            return float(self.atol)
        return self.value_floor * norm_est if self.relative_to == "value" else 0.0

    def bound(self, values: Tensor, norm_est: float) -> Tensor:
        """The residual each pair must reach: ``max(tol * scale, floor)``."""
        scale = values.abs() if self.relative_to == "value" else torch.full_like(values, norm_est)
        return torch.clamp(self.tol * scale, min=self.floor(norm_est))

    def due(self, state: LanczosState, products: int) -> bool:
        """Is a Rayleigh–Ritz worth its cost now?"""
        out_of_steps = state.full or products >= self.budget or state.j >= self.n
        if state.j < self.min_dim and not out_of_steps and self.stop_below is None:
            # Too small a Krylov space: a Ritz pair can have a tiny residual and still not be the
            # extreme one (misconvergence), so convergence is not even checked before min_dim.
            return False
        every = 1 if state.j <= RITZ_EVERY_STEP else math.ceil(state.j / RITZ_INTERVAL)
        return out_of_steps or state.j - state.ritz_at >= every

    def reason(self, state: LanczosState, ritz: Ritz, products: int) -> str | None:
        """Why to stop now (``"certificate"``, ``"converged"``, ``"budget"``, ``"exhausted"``), or None."""
        if self.stop_below is not None and float(ritz.values[0]) < self.stop_below:
            return "certificate"  # a Rayleigh quotient needs no convergence, at any Krylov size
        if state.j < self.min_dim and products < self.budget:
            return None
        idx = _wanted(ritz.values, self.k, self.which)
        if bool((ritz.estimates[idx] <= self.bound(ritz.values[idx], state.norm_est)).all()):
            return "converged"
        if products >= self.budget:
            return "budget"
        if state.j >= self.n:
            return "exhausted"  # V_j spans R^n: the Ritz pairs are exact
        return None


def restart_set(ritz: Ritz, k: int, which: str, size: int, converged: Tensor) -> Tensor:
    """The Ritz pairs a thick restart keeps: indices into ``ritz.values``, ascending.

    Near the wanted end, the wanted pairs and as many neighbours, up to half the basis (Wu & Simon).
    Besides them, every converged pair (locking: see the module docstring), most accurate first,
    while a third of the basis stays free for new vectors; locked pairs take their room from the
    neighbours, down to as many neighbours as wanted pairs.
    """
    j = ritz.values.numel()
    n_wanted = _wanted(ritz.values, k, which).numel()
    room = size - max(size // 3, 2)  # kept at most
    n_near = min(j - 1, size - 2, n_wanted + max(n_wanted, (size - n_wanted) // 2))

    def nearest(count: int) -> Tensor:
        """The ``count`` pairs nearest the wanted end (``count / 2`` at each end for ``"both"``)."""
        return _wanted(ritz.values, count // 2 if which == "both" else count, which)

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
        krylov_dim: basis size before a thick restart (default: as many vectors as fit in 1 GiB, at
            most :data:`KRYLOV_MAX` and at least ``max(3m + 10, 40)``, m pairs wanted; at most n).
        max_hvps: product budget (default ``min(2000, max(20 * krylov_dim, 500))``); the result says
            which pairs converged within it.
        seed: for the starting vector.
        v0: starting vector instead of a random one.
        dtype: precision of the recurrence, basis and projected eigenproblem.
        stop_below: stop as soon as the smallest Ritz value is below this (a Ritz value is a Rayleigh
            quotient, so a negative one certifies negative curvature without convergence); the
            result's ``stopped_early`` says so and its Rayleigh quotients are recomputed exactly.
        relative_to: ``"norm"`` or ``"value"`` (see ``tol``).
        atol: absolute residual floor. Default 0 for ``"norm"``; for ``"value"``
            ``16 * eps(op.dtype) * max|lambda|``, near where products in the operator's precision stop
            improving, so an eigenvalue at zero does not spend the whole budget.
        progress: ``progress(products, max_hvps)`` after every Lanczos step.
    """
    if which not in WHICH:
        raise InvalidInputError(f"which must be one of {WHICH}, got {which!r}")
    n = int(op.shape[0])
    want = 2 * k if which == "both" else k
    if not (isinstance(k, int) and 1 <= k and want <= n):
        raise InvalidInputError(f"k = {k} pairs ({which}) do not fit an operator of dimension {n}")
    if not (tol > 0):
        raise InvalidInputError(f"tol must be positive, got {tol}")
    if relative_to not in ("norm", "value"):
        raise InvalidInputError(f"relative_to must be 'norm' or 'value', got {relative_to!r}")
    if atol is not None and not (atol >= 0):
        raise InvalidInputError(f"atol must be >= 0, got {atol}")
    if krylov_dim is None:
        fits = KRYLOV_MEMORY_BYTES // (n * torch.finfo(dtype).bits // 8) - 1
        krylov_dim = max(3 * want + 10, 40, min(KRYLOV_MAX, fits))
    m_max = min(n, krylov_dim)
    if m_max < min(n, want + 2):
        raise InvalidInputError(f"krylov_dim = {m_max} is too small for {want} pairs; use at least {want + 2}")
    budget = max_hvps if max_hvps is not None else min(DEFAULT_MAX_HVPS, max(20 * m_max, 500))
    if budget < 1:
        raise InvalidInputError(f"max_hvps must be at least 1, got {budget}")
    products = 0

    def apply(block: Tensor) -> Tensor:
        nonlocal products
        products += block.shape[1]
        return op.matmat(block.to(op.dtype)).to(dtype)

    if v0 is None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        v0 = torch.randn(n, generator=gen, dtype=dtype)
    v = v0.to(op.device, dtype)
    if float(v.norm()) == 0:
        raise InvalidInputError("v0 must be non-zero")
    rule = StoppingRule(
        k=k, which=which, tol=tol, relative_to=relative_to, atol=atol,
        value_floor=VALUE_FLOOR_EPS * torch.finfo(op.dtype).eps, stop_below=stop_below, budget=budget,
        min_dim=min(n, m_max, max(2 * want + 1, 20)), n=n,
    )
    state = LanczosState(v, m_max, seed)
    while True:
        if not state.full and products < budget:
            state.step(apply)
            if progress is not None:
                progress(products, budget)
        if not rule.due(state, products):
            continue
        ritz = state.ritz()
        stop = rule.reason(state, ritz, products)
        if stop is not None:
            break
        if state.full:
            converged = ritz.estimates <= rule.bound(ritz.values, state.norm_est)
            state.restart(ritz, restart_set(ritz, k, which, m_max, converged))

    # True residuals: Lanczos's estimate can be optimistic in floating point.
    vectors = state.vectors(ritz, _wanted(ritz.values, k, which))
    confirm = apply(vectors)
    rayleigh = (vectors * confirm).sum(0)
    residuals = (confirm - vectors * rayleigh).norm(dim=0)
    order = torch.argsort(rayleigh)
    norm_est = max(state.norm_est, float(rayleigh.abs().max()))
    return EigenResult(
        eigenvalues=rayleigh[order],
        eigenvectors=vectors[:, order],
        residuals=residuals[order],
        converged=(residuals[order] <= rule.bound(rayleigh[order], norm_est)).cpu(),
        spectral_norm=norm_est,
        hvp_count=products,
        restarts=state.restarts,
        which=which,
        tol=tol,
        stopped_early=stop == "certificate",
        relative_to=relative_to,
        atol=rule.floor(norm_est),
        dtype=str(dtype),
        operator_dtype=str(op.dtype),
    )
