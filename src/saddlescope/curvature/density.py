r"""Spectral density by stochastic Lanczos quadrature (SLQ).

Ubaru, Chen & Saad (2017), "Fast estimation of tr(f(A)) via stochastic Lanczos quadrature";
Ghorbani, Krishnan & Xiao (2019) for Hessians of networks. For a unit probe :math:`v`,
:math:`v^\top f(A) v \approx \sum_i w_i f(\theta_i)` with :math:`\theta_i` the eigenvalues of the
:math:`m\times m` Lanczos matrix :math:`T` started at :math:`v` and :math:`w_i = s_{1i}^2` the squared
first components of its eigenvectors (Gauss quadrature: exact for polynomials of degree
:math:`< 2m`). Averaging over Rademacher probes estimates :math:`\tfrac1n \operatorname{tr} f(A)`;
with :math:`f` a Gaussian bump this is the smoothed eigenvalue density.

Memory. Probes run one after another, and each probe's basis is freed before the next is made, so SLQ
never holds two bases. A probe runs the package's one Lanczos step with full reorthogonalisation when
its basis (``(steps + 1) * n`` numbers) fits the memory budget (default: half of what is free where the
operator lives, :func:`~saddlescope.curvature.basis_plan.default_budget`); otherwise the plain three-term
recurrence (:class:`~saddlescope.curvature.two_pass.TwoPassState`'s first pass), which holds four vectors
whatever ``steps`` (a 124M-parameter model at 60 steps, float64: 3.7 GiB instead of 57 GiB). The quadrature survives the lost orthogonality: the finite-precision recurrence is
exact Lanczos on a larger matrix whose eigenvalues lie in tiny intervals around those of :math:`A`
(Greenbaum 1989, "Behavior of slightly perturbed Lanczos and conjugate-gradient recurrences", Linear
Algebra Appl. 113), so the nodes and weights are a Gauss rule for a measure that differs from the true
one only by those intervals; converged outliers come back as repeated ("ghost") nodes that share their
weight (Knizhnerman 1996 bounds the quadrature error of the simple recurrence). Each probe records
which it ran (``ProbeQuadrature.reorthogonalised``); :class:`~saddlescope.errors.MemoryBudgetError`
when not even those fit, before any product.

Deflation. When eigenpairs :math:`(\lambda_i, u_i)` are already known (the extreme pairs a verdict
computed), the quadrature runs on :math:`PAP` restricted to the complement, :math:`P = I - UU^\top`:
probes :math:`Pz`, products :math:`P A P v`. Then :math:`z^\top P f(PAP) P z` estimates the sum of
:math:`f` over the remaining eigenvalues, and the spectrum the nodes must resolve shrinks from
:math:`[\lambda_{min}, \lambda_{max}]` to what is left (the top outliers of a network's Hessian are
most of its span), so the same number of nodes places an eigenvalue more finely. Each probe's
quadrature then stands for :math:`\|Pz\|^2 / n` of the trace (``Quadrature.scale``).

Stopping a probe early. ``quadrature_probe(..., stop=rule)`` hands ``rule`` the Gauss rule of the
:math:`j \times j` tridiagonal after step :math:`j` (a ``ProbeQuadrature`` with ``j`` nodes) and ends
the probe there when it returns True; the rule of :math:`T_j` is as much a Gauss rule for the probe as the
last one (fewer nodes), so whatever the caller proves from it stands. Both recurrences are driven the same
way. The rule is handed over after every step up to :data:`CHECK_EVERY_STEP` and then at steps about
:math:`j/32` apart (:func:`check_due`): the dense eigendecomposition of :math:`T_j` costs :math:`O(j^3)`
(36 ms at :math:`j = 500`, one thread), which a long probe on a small model would otherwise pay at every
step; at most about 3% more steps are run than the rule needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saddlescope.curvature.basis_plan import default_budget
from saddlescope.curvature.lanczos import lanczos_step
from saddlescope.curvature.two_pass import TwoPassState
from saddlescope.errors import InvalidInputError, MemoryBudgetError
from saddlescope.memory import describe_bytes, return_freed_memory


@dataclass
class Quadrature:
    """Ritz nodes and Gauss weights, one row per probe (each row's weights sum to 1)."""

    nodes: Tensor
    weights: Tensor
    hvp_count: int
    seed: int
    scale: Tensor | None = None  # per probe: the share of (1/n) tr it stands for (deflation: |Pz|^2/n)
    deflated: int = 0  # eigenpairs projected out
    reorthogonalised: bool = True  # every probe ran with full reorthogonalisation (else the three-term recurrence)

    @property
    def n_probes(self) -> int:
        return self.nodes.shape[0]

    def per_probe(self, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """The quadrature of ``fn`` for each probe: ``scale * sum_i w_i fn(theta_i)`` (an estimate of
        ``(1/n) sum f(lambda)`` over the eigenvalues not deflated)."""
        values = (self.weights * fn(self.nodes)).sum(1)
        return values if self.scale is None else self.scale * values

    def to_dict(self) -> dict[str, Any]:
        return {"nodes": self.nodes.tolist(), "weights": self.weights.tolist(),
                "hvp_count": self.hvp_count, "seed": self.seed, "deflated": self.deflated,
                "scale": None if self.scale is None else self.scale.tolist(),
                "reorthogonalised": self.reorthogonalised}


def rademacher(n: int, count: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """``count`` random sign vectors of length ``n`` as columns (reproducible from ``seed``)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randint(0, 2, (n, count), generator=gen) * 2 - 1).to(dtype)


def lanczos_quadrature(
    op: Any,
    n_probes: int = 8,
    steps: int = 80,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    progress: Callable[[int, int], None] | None = None,
    deflate: Tensor | None = None,
    memory_budget: int | None = None,
) -> Quadrature:
    """Run ``steps`` Lanczos steps from each of ``n_probes`` Rademacher probes; return nodes and weights.

    Args:
        deflate: orthonormal columns ``U`` (shape ``(n, k)``) of known eigenvectors to project out
            (see the module docstring); the quadrature then covers the other ``n - k`` eigenvalues.
        memory_budget: bytes each probe's vectors may hold (module docstring, "Memory").
    """
    if not (isinstance(n_probes, int) and n_probes >= 1):
        raise InvalidInputError(f"n_probes must be a positive integer, got {n_probes}")
    if not (isinstance(steps, int) and steps >= 1):
        raise InvalidInputError(f"steps must be a positive integer, got {steps}")
    rows = [quadrature_probe(op, p, steps, seed=seed, dtype=dtype, deflate=deflate, memory_budget=memory_budget)
            for p in _counted(n_probes, progress)]
    return stack_probes(rows, seed, 0 if deflate is None else int(deflate.shape[1]))


def _counted(n: int, progress: Callable[[int, int], None] | None):
    for p in range(n):
        yield p
        if progress is not None:
            progress(p + 1, n)


@dataclass
class ProbeQuadrature:
    """One probe's Gauss quadrature: ``nodes``, ``weights`` (summing to 1), the share of the trace it
    stands for (``scale``), the products it cost, whether its basis was reorthogonalised (False: the
    three-term recurrence, when the basis did not fit the memory budget), and the steps it was planned for."""

    nodes: Tensor
    weights: Tensor
    scale: float
    hvp_count: int
    reorthogonalised: bool = True
    planned: int = 0  # steps asked for (capped at the dimension); more than the nodes when it stopped early


# Vectors a probe holds besides its basis: the probe, a product and the recurrence's temporaries.
PROBE_WORK_VECTORS = 4


def quadrature_probe(
    op: Any, index: int, steps: int, *, seed: int = 0, dtype: torch.dtype = torch.float64,
    deflate: Tensor | None = None, memory_budget: int | None = None,
    stop: Callable[[ProbeQuadrature], bool] | None = None,
) -> ProbeQuadrature:
    """The quadrature of probe number ``index`` of the Rademacher sequence drawn from ``seed``: the
    same probe whatever the number of probes, so an adaptive run and a fixed one agree.

    ``memory_budget``: bytes the probe's own vectors may hold (default: :func:`default_budget`); a full
    basis that does not fit runs the three-term recurrence instead (module docstring).
    ``stop``: given the quadrature after each step, True ends the probe there (module docstring)."""
    n = int(op.shape[0])
    steps = min(steps, n if deflate is None else n - int(deflate.shape[1]))
    reorthogonalise = _basis_fits(op, n, steps, dtype, memory_budget)
    z = _probe_vector(n, index, seed, dtype).to(op.device)
    products = 0
    project: Callable[[Tensor], Tensor]
    if deflate is None:
        project = lambda x: x  # noqa: E731
    else:
        basis_u = deflate.to(device=op.device, dtype=dtype)
        project = lambda x: x - basis_u @ (basis_u.T @ x)  # noqa: E731

    def apply(block: Tensor) -> Tensor:
        nonlocal products
        products += block.shape[1]
        out = project(op.matmat(project(block).to(op.dtype)).to(dtype))
        if not reorthogonalise and torch.device(op.device).type == "cpu":
            return_freed_memory()  # memory is short: the product's freed temporaries go back (memory.py)
        return out

    start = project(z.unsqueeze(1))[:, 0]
    norm2 = float(start @ start)
    if steps < 1 or norm2 <= 0:
        return ProbeQuadrature(torch.zeros(1, dtype=dtype), torch.zeros(1, dtype=dtype), 0.0, 0, planned=steps)
    start = start / math.sqrt(norm2)

    def rule(t: Tensor) -> ProbeQuadrature:
        nodes, weights = _gauss_rule(t)
        return ProbeQuadrature(nodes, weights, norm2 / n, products, reorthogonalise, steps)

    done = None if stop is None else (lambda t: check_due(t.shape[0]) and stop(rule(t)))
    run = _reorthogonalised if reorthogonalise else _three_term
    return rule(run(apply, start, steps, done))


def _gauss_rule(t: Tensor) -> tuple[Tensor, Tensor]:
    """Nodes (eigenvalues of ``T``, ascending) and weights (squared first components of its eigenvectors)."""
    theta, s = torch.linalg.eigh(0.5 * (t + t.T))
    return theta.cpu(), (s[0, :] ** 2).cpu()


def _basis_fits(op: Any, n: int, steps: int, dtype: torch.dtype, memory_budget: int | None) -> bool:
    """Does a full basis fit the budget? If not even the three-term recurrence fits, raise."""
    if memory_budget is None:
        budget, source = default_budget(op, torch.device(op.device))
    else:
        budget, source = int(memory_budget), "memory_budget"
    if budget is None:
        return True  # nothing known about free memory: the full basis, as always
    itemsize = torch.finfo(dtype).bits // 8
    if (steps + 1 + PROBE_WORK_VECTORS) * n * itemsize <= budget:
        return True
    least = (4 + PROBE_WORK_VECTORS) * n * itemsize  # the recurrence's four vectors and the work vectors
    if least > budget:
        raise MemoryBudgetError(
            f"stochastic Lanczos quadrature needs at least {describe_bytes(least)} ({4 + PROBE_WORK_VECTORS} "
            f"vectors of {n:,} {dtype} numbers) but the budget is {describe_bytes(budget)} ({source}); "
            "free memory, or pass index_probes=0 to skip the index estimate"
        )
    return False


# Given the tridiagonal so far, True ends the recurrence there.
Done = Callable[[Tensor], bool] | None

CHECK_EVERY_STEP = 64


def check_due(j: int) -> bool:
    """Is a stopping rule consulted after step ``j``? Every step up to :data:`CHECK_EVERY_STEP`, then every
    ``j // 32`` steps (module docstring, "Stopping a probe early")."""
    return j <= CHECK_EVERY_STEP or j % (j // 32) == 0


def _reorthogonalised(apply: Callable[[Tensor], Tensor], start: Tensor, steps: int, done: Done = None) -> Tensor:
    """``T`` of ``steps`` Lanczos steps from the unit vector ``start``, full reorthogonalisation (fewer
    when ``done(T_j)`` says so)."""
    # Empty, not zeros: on the CPU the pages of rows never written (a probe that stops early) are never
    # committed; every row is written before it is read.
    basis = torch.empty(steps + 1, start.numel(), dtype=start.dtype, device=start.device)
    proj = torch.zeros(steps, steps, dtype=start.dtype, device=start.device)
    basis[0] = start
    m, scale = steps, 0.0
    for j in range(steps):
        beta = lanczos_step(apply, basis, proj, j)
        scale = max(scale, float(proj[: j + 1, j].abs().max()))
        if beta <= 1e-12 * max(scale, 1e-300):
            m = j + 1  # invariant subspace: the quadrature is exact with m nodes
            break
        if done is not None and j + 1 < steps and done(proj[: j + 1, : j + 1]):
            m = j + 1
            break
    return proj[:m, :m]


def _three_term(apply: Callable[[Tensor], Tensor], start: Tensor, steps: int, done: Done = None) -> Tensor:
    """``T`` of ``steps`` steps of the plain three-term recurrence: the first pass of
    :class:`~saddlescope.curvature.two_pass.TwoPassState` (no basis; the quadrature needs no second);
    fewer when ``done(T_j)`` says so."""
    state = TwoPassState(start, vector_dtype=start.dtype)
    while state.j < steps and not state.full:
        state.step(lambda block, out_dtype: apply(block).to(out_dtype))
        if done is not None and state.j < steps and not state.full and done(state.tridiagonal()):
            break
    return state.tridiagonal()


def _probe_vector(n: int, index: int, seed: int, dtype: torch.dtype) -> Tensor:
    """Rademacher probe ``index`` of the sequence from ``seed``: its own generator, so the first probes
    are the same however many are drawn, and drawing one costs ``n`` bytes whatever its index."""
    gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + index)
    return (torch.randint(0, 2, (n,), generator=gen, dtype=torch.int8) * 2 - 1).to(dtype)


def stack_probes(rows: list[ProbeQuadrature], seed: int, deflated: int = 0) -> Quadrature:
    """Probes of possibly different lengths as one :class:`Quadrature` (short rows padded with
    zero-weight copies of their last node)."""
    width = max(r.nodes.numel() for r in rows)
    nodes = torch.zeros(len(rows), width, dtype=torch.float64)
    weights = torch.zeros(len(rows), width, dtype=torch.float64)
    for p, row in enumerate(rows):
        m = row.nodes.numel()
        nodes[p, :m], weights[p, :m] = row.nodes.double(), row.weights.double()
        nodes[p, m:] = row.nodes[-1]
    scale = None if deflated == 0 else torch.tensor([r.scale for r in rows], dtype=torch.float64)
    return Quadrature(nodes=nodes, weights=weights, hvp_count=sum(r.hvp_count for r in rows), seed=seed,
                      scale=scale, deflated=deflated, reorthogonalised=all(r.reorthogonalised for r in rows))


@dataclass
class SpectralDensity:
    """A smoothed eigenvalue density estimate.

    Attributes:
        grid, density: the density (integrates to ~1) on a grid of eigenvalues.
        sigma: width of the Gaussian smoothing.
        quadrature: the Ritz nodes and weights it was built from.
        lambda_min, lambda_max: the extreme Ritz nodes (inner bounds of the spectrum).
    """

    grid: Tensor
    density: Tensor
    sigma: float
    quadrature: Quadrature

    @property
    def lambda_min(self) -> float:
        return float(self.quadrature.nodes.min())

    @property
    def lambda_max(self) -> float:
        return float(self.quadrature.nodes.max())

    @property
    def hvp_count(self) -> int:
        return self.quadrature.hvp_count

    def to_dict(self) -> dict[str, Any]:
        return {"grid": self.grid.tolist(), "density": self.density.tolist(), "sigma": self.sigma,
                "lambda_min": self.lambda_min, "lambda_max": self.lambda_max,
                "hvp_count": self.hvp_count, "quadrature": self.quadrature.to_dict()}


def spectral_density(
    op: Any,
    n_probes: int = 8,
    steps: int = 80,
    *,
    grid_size: int = 1000,
    sigma: float | None = None,
    seed: int = 0,
    quadrature: Quadrature | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SpectralDensity:
    """Smoothed eigenvalue density of a symmetric operator by SLQ.

    Args:
        n_probes, steps: Rademacher probes and Lanczos steps per probe (``n_probes * steps`` HVPs).
        grid_size: points of the returned grid.
        sigma: Gaussian smoothing width; default 1/200 of the spectral range (of ``max|node|``, or
            1, when all the nodes coincide).
        quadrature: reuse nodes and weights already computed (no new HVPs).
    """
    quad = quadrature or lanczos_quadrature(op, n_probes, steps, seed=seed, progress=progress)
    lo, hi = float(quad.nodes.min()), float(quad.nodes.max())
    scale = max(abs(lo), abs(hi))
    # One distinct node (a scalar or zero operator): 1/200 of a vanishing range would be a subnormal
    # width and an overflowing density, so the range falls back to the nodes' size (1 for zero).
    span = hi - lo if hi - lo > 1e-9 * scale else (scale if scale > 0 else 1.0)
    sigma = float(sigma) if sigma is not None else span / 200
    if not sigma > 0:
        raise InvalidInputError(f"sigma must be positive, got {sigma}")
    grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, grid_size, dtype=torch.float64)
    diff = grid[None, None, :] - quad.nodes[:, :, None]
    bumps = torch.exp(-0.5 * (diff / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    density = (quad.weights[:, :, None] * bumps).sum(1).mean(0)
    return SpectralDensity(grid=grid, density=density, sigma=sigma, quadrature=quad)
