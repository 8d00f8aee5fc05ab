r"""Spectral density by stochastic Lanczos quadrature (SLQ).

Ubaru, Chen & Saad (2017), "Fast estimation of tr(f(A)) via stochastic Lanczos quadrature";
Ghorbani, Krishnan & Xiao (2019) for Hessians of networks. For a unit probe :math:`v`,
:math:`v^\top f(A) v \approx \sum_i w_i f(\theta_i)` with :math:`\theta_i` the eigenvalues of the
:math:`m\times m` Lanczos matrix :math:`T` started at :math:`v` and :math:`w_i = s_{1i}^2` the squared
first components of its eigenvectors (Gauss quadrature: exact for polynomials of degree
:math:`< 2m`). Averaging over Rademacher probes estimates :math:`\tfrac1n \operatorname{tr} f(A)`;
with :math:`f` a Gaussian bump this is the smoothed eigenvalue density.

Each probe runs the package's one Lanczos step with full reorthogonalisation (memory: ``n * steps``
numbers; probes run one after another).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saddlescope.curvature.lanczos import lanczos_step
from saddlescope.errors import InvalidInputError


@dataclass
class Quadrature:
    """Ritz nodes and Gauss weights, one row per probe (each row's weights sum to 1)."""

    nodes: Tensor
    weights: Tensor
    hvp_count: int
    seed: int

    @property
    def n_probes(self) -> int:
        return self.nodes.shape[0]

    def per_probe(self, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """The quadrature of ``fn`` for each probe: ``sum_i w_i fn(theta_i)``."""
        return (self.weights * fn(self.nodes)).sum(1)

    def to_dict(self) -> dict[str, Any]:
        return {"nodes": self.nodes.tolist(), "weights": self.weights.tolist(),
                "hvp_count": self.hvp_count, "seed": self.seed}


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
) -> Quadrature:
    """Run ``steps`` Lanczos steps from each of ``n_probes`` Rademacher probes; return nodes and weights."""
    n = int(op.shape[0])
    if not (isinstance(n_probes, int) and n_probes >= 1):
        raise InvalidInputError(f"n_probes must be a positive integer, got {n_probes}")
    if not (isinstance(steps, int) and steps >= 1):
        raise InvalidInputError(f"steps must be a positive integer, got {steps}")
    steps = min(steps, n)
    probes = rademacher(n, n_probes, seed, dtype)
    products = 0

    def apply(block: Tensor) -> Tensor:
        nonlocal products
        products += block.shape[1]
        return op.matmat(block.to(op.dtype)).to(dtype)

    nodes = torch.zeros(n_probes, steps, dtype=dtype)
    weights = torch.zeros(n_probes, steps, dtype=dtype)
    for p in range(n_probes):
        basis = torch.zeros(steps + 1, n, dtype=dtype, device=op.device)
        proj = torch.zeros(steps, steps, dtype=dtype, device=op.device)
        basis[0] = probes[:, p].to(op.device) / math.sqrt(n)
        m, scale = steps, 0.0
        for j in range(steps):
            beta = lanczos_step(apply, basis, proj, j)
            scale = max(scale, float(proj[: j + 1, j].abs().max()))
            if beta <= 1e-12 * max(scale, 1e-300):
                m = j + 1  # invariant subspace: the quadrature is exact with m nodes
                break
        t = proj[:m, :m]
        theta, s = torch.linalg.eigh(0.5 * (t + t.T))
        nodes[p, :m] = theta.cpu()
        weights[p, :m] = (s[0, :] ** 2).cpu()
        if m < steps:  # pad with zero-weight copies so rows stack
            nodes[p, m:] = theta[-1].cpu()
        if progress is not None:
            progress(p + 1, n_probes)
    return Quadrature(nodes=nodes, weights=weights, hvp_count=products, seed=seed)


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
