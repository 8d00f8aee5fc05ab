r"""Extreme eigenpairs of a symmetric operator: thick-restart Lanczos with full reorthogonalisation.

Wu & Simon (2000), "Thick-restart Lanczos method for large symmetric eigenvalue problems"; in the
Krylov–Schur form (Stewart 2001) where the projected matrix :math:`T = V^\top A V` is kept dense.

With an orthonormal basis :math:`V_j` built by Lanczos (every new vector orthogonalised twice against
all previous ones, "twice is enough"), :math:`A V_j = V_j T_j + r_j e_j^\top`. A Ritz pair
:math:`(\theta, y = V_j s)` of :math:`T_j s = \theta s` has residual
:math:`\|A y - \theta y\| = \|r_j\|\,|s_j|`. When the basis is full, the wanted Ritz vectors (and the
next Lanczos vector) are kept and the rest discarded: the decomposition keeps its form, so the
iteration goes on without losing what has converged.

Convergence is judged by residual norms, never by the change between iterates: relative to the
spectral-norm estimate :math:`\max|\theta|` (the default), or relative to each Ritz value itself
(``relative_to="value"``). The second is what a small eigenvalue needs: a Ritz pair with residual
:math:`r` has an eigenvalue within :math:`r` of :math:`\theta` (for symmetric :math:`A`), so
:math:`r \le \text{tol}\,|\theta|` bounds the relative error of :math:`\theta` by ``tol`` even when
:math:`|\lambda_{min}| \ll \lambda_{max}`. On convergence the Ritz vectors are
multiplied once more (k extra products) to report *true* residuals: in floating point Lanczos loses
orthogonality and the cheap estimate can be optimistic.

The recurrence, the basis and the small eigenproblem run in ``dtype`` (float64 by default), whatever
precision the operator computes in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saddlescope.errors import InvalidInputError

WHICH = ("largest", "smallest", "both")

# Default basis size: a larger basis restarts less and reaches a small lambda_min in fewer products
# (trained 26k-parameter MLP, float32: 200 HVPs with 40 vectors, 90 with 100), so it is used when
# the basis fits in KRYLOV_MEMORY_BYTES; otherwise max(3m + 10, 40).
KRYLOV_PREFERRED = 100
KRYLOV_MEMORY_BYTES = 2**30
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
        krylov_dim: basis size before a thick restart (default 100 when the basis fits in 1 GiB,
            else ``max(3m + 10, 40)``, m pairs wanted; at most n).
        max_hvps: product budget (default ``max(20 * krylov_dim, 500)``); the result says which pairs
            converged within it.
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
        krylov_dim = max(3 * want + 10, 40)
        if (KRYLOV_PREFERRED + 1) * n * torch.finfo(dtype).bits // 8 <= KRYLOV_MEMORY_BYTES:
            krylov_dim = max(krylov_dim, KRYLOV_PREFERRED)
    m_max = min(n, krylov_dim)
    if m_max < min(n, want + 2):
        raise InvalidInputError(f"krylov_dim = {m_max} is too small for {want} pairs; use at least {want + 2}")
    budget = max_hvps if max_hvps is not None else max(20 * m_max, 500)
    if budget < 1:
        raise InvalidInputError(f"max_hvps must be at least 1, got {budget}")
    device = op.device
    products = 0
    min_dim = min(n, m_max, max(2 * want + 1, 20))  # ARPACK's default ncv

    def apply(block: Tensor) -> Tensor:
        nonlocal products
        products += block.shape[1]
        return op.matmat(block.to(op.dtype)).to(dtype)

    if v0 is None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        v0 = torch.randn(n, generator=gen, dtype=dtype)
    v = v0.to(device, dtype)
    if float(v.norm()) == 0:
        raise InvalidInputError("v0 must be non-zero")
    basis = torch.zeros(m_max + 1, n, dtype=dtype, device=device)  # rows are the Lanczos vectors
    proj = torch.zeros(m_max, m_max, dtype=dtype, device=device)
    basis[0] = v / v.norm()
    j, restarts = 0, 0
    beta, coupling_zero = 0.0, False
    ritz = None
    stopped_early = False
    norm_est = 0.0
    gen_restart = torch.Generator(device="cpu").manual_seed(seed + 1)

    def floor() -> float:
        if atol is not None:
            return float(atol)
        return VALUE_FLOOR_EPS * torch.finfo(op.dtype).eps * norm_est if relative_to == "value" else 0.0

    def bound(values: Tensor) -> Tensor:
        """The residual each pair must reach, from the current norm estimate."""
        scale = values.abs() if relative_to == "value" else torch.full_like(values, norm_est)
        return torch.clamp(tol * scale, min=floor())

    while True:
        # One Lanczos step: extend the basis by A v_j, orthogonalised twice against all of it.
        if j < m_max and products < budget:
            beta = lanczos_step(apply, basis, proj, j)
            j += 1
            norm_est = max(norm_est, float(proj[:j, j - 1].abs().max()))
            coupling_zero = beta <= 1e-12 * max(norm_est, 1e-300)
            if j < n and coupling_zero:
                # Invariant subspace: its Ritz values are exact. Go on from a fresh random direction
                # orthogonal to the basis, decoupled from it (T stays block diagonal).
                basis[j] = _fresh_direction(basis[:j], gen_restart)
            if progress is not None:
                progress(products, budget)
        small = j < min_dim and products < budget
        if small and stop_below is None:
            # Too small a Krylov space: a Ritz pair can have a tiny residual and still not be the
            # extreme one (misconvergence), so convergence is not even checked before min_dim.
            continue
        # Rayleigh-Ritz on the current basis (cheap next to a product: T is small).
        t = proj[:j, :j]
        ritz, s = torch.linalg.eigh(0.5 * (t + t.T))
        norm_est = max(norm_est, float(ritz.abs().max()))
        if stop_below is not None and float(ritz[0]) < stop_below:
            stopped_early = True  # a certificate needs no convergence, at any Krylov size
            break
        if small:
            continue
        # A V_j = V_j T_j + beta v_{j+1} e_j^T, so ||A y - theta y|| = beta |s_j| for y = V_j s.
        last_beta = 0.0 if (coupling_zero or j >= n) else beta
        est = (last_beta * s[j - 1, :]).abs()
        idx = _wanted(ritz, k, which)
        converged = est[idx] <= bound(ritz[idx])
        if bool(converged.all()) or products >= budget or j >= n:
            break
        if j < m_max:
            continue
        # Thick restart: keep the wanted pairs plus as many neighbours, up to half the basis.
        n_keep = min(j - 1, m_max - 2, idx.numel() + max(idx.numel(), (m_max - idx.numel()) // 2))
        keep = _wanted(ritz, n_keep // 2 if which == "both" else n_keep, which)
        kept = keep.numel()
        coupling = last_beta * s[j - 1, keep]
        new_basis = s[:, keep].T @ basis[:j]
        basis[kept] = basis[j]
        basis[:kept] = new_basis
        proj.zero_()
        proj[:kept, :kept] = torch.diag(ritz[keep])
        proj[kept, :kept] = coupling
        proj[:kept, kept] = coupling
        j = kept
        restarts += 1
        # The next step recomputes column `kept` of T in full from A v_kept.

    idx = _wanted(ritz, k, which)
    vectors = basis[:j].T @ s[:, idx]
    vectors = vectors / vectors.norm(dim=0, keepdim=True)
    confirm = apply(vectors)  # true residuals: Lanczos's estimate can be optimistic in floating point
    rayleigh = (vectors * confirm).sum(0)
    residuals = (confirm - vectors * rayleigh).norm(dim=0)
    order = torch.argsort(rayleigh)
    norm_est = max(norm_est, float(rayleigh.abs().max()))
    return EigenResult(
        eigenvalues=rayleigh[order],
        eigenvectors=vectors[:, order],
        residuals=residuals[order],
        converged=(residuals[order] <= bound(rayleigh[order])).cpu(),
        spectral_norm=norm_est,
        hvp_count=products,
        restarts=restarts,
        which=which,
        tol=tol,
        stopped_early=stopped_early,
        relative_to=relative_to,
        atol=floor(),
        dtype=str(dtype),
        operator_dtype=str(op.dtype),
    )
