r"""The index (fraction of negative eigenvalues) and minimum ratio without the full spectrum.

From stochastic Lanczos quadrature (:mod:`saddlescope.curvature.density`): for each probe the mass
of the Ritz nodes below :math:`-\delta`, within :math:`\pm\delta` and above :math:`+\delta`; the
estimates are the means over probes and the error bars their standard errors.

Two errors are reported. Sampling: the standard error over probes. Quadrature: by the
Chebyshev–Markov–Stieltjes inequalities, a Gauss quadrature's cumulative weight below :math:`c` is
within the weight of the two nodes adjacent to :math:`c` of the probe's true spectral distribution
at :math:`c` — a rigorous per-probe bracket, whose mean half-width is ``quadrature_bound``. Without it
the sampling error alone is badly overconfident near zero (on a digits MLP at :math:`\delta = 0`:
0.172 +- 0.002 against an exact 0.294).

Why a band :math:`\pm\delta`: Gauss quadrature with :math:`m` nodes cannot place an eigenvalue more
finely than about :math:`(\lambda_{max}-\lambda_{min})/m`, and trained networks have much of their
spectrum there, so the sign of that mass is not resolved and is reported as such, never guessed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from saddlescope.curvature.density import Quadrature, lanczos_quadrature
from saddlescope.errors import InvalidInputError


@dataclass
class IndexEstimate:
    """Fractions of eigenvalues below ``-delta``, within ``+-delta`` and above ``+delta``.

    Attributes:
        value, stderr: the index at resolution ``delta`` (fraction below ``-delta``) and its sampling error.
        min_ratio, min_ratio_stderr: the fraction above ``+delta``.
        within, within_stderr: the unresolved fraction in ``[-delta, delta]``.
        quadrature_bound, min_ratio_quadrature_bound: the Gauss-quadrature (CMS) bracket half-widths.
        error, min_ratio_error: ``2 * stderr + quadrature_bound``, the error bar to quote.
        delta: the resolution (default: the quadrature's, span / steps).
    """

    value: float
    stderr: float
    min_ratio: float
    min_ratio_stderr: float
    within: float
    within_stderr: float
    quadrature_bound: float
    min_ratio_quadrature_bound: float
    delta: float
    n_probes: int
    steps: int
    hvp_count: int
    seed: int

    @property
    def error(self) -> float:
        return 2 * self.stderr + self.quadrature_bound

    @property
    def min_ratio_error(self) -> float:
        return 2 * self.min_ratio_stderr + self.min_ratio_quadrature_bound

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "error": self.error, "min_ratio_error": self.min_ratio_error}


def _cms_half_width(quad: Quadrature, c: float) -> float:
    """Mean over probes of the CMS bracket half-width of the cumulative weight below ``c``:
    the larger of the weights of the last node below ``c`` and the first node at or above it."""
    below = quad.nodes < c
    w_below = torch.where(below, quad.weights, torch.zeros_like(quad.weights))
    w_above = torch.where(~below, quad.weights, torch.zeros_like(quad.weights))
    nodes_below = torch.where(below, quad.nodes, torch.full_like(quad.nodes, -float("inf")))
    nodes_above = torch.where(~below, quad.nodes, torch.full_like(quad.nodes, float("inf")))
    last = nodes_below.argmax(1, keepdim=True)
    first = nodes_above.argmin(1, keepdim=True)
    adjacent = torch.maximum(w_below.gather(1, last), w_above.gather(1, first))[:, 0]
    return float(adjacent.mean())


def index_estimate(
    op: Any,
    *,
    delta: float | None = None,
    n_probes: int = 10,
    steps: int = 80,
    seed: int = 0,
    quadrature: Quadrature | None = None,
) -> IndexEstimate:
    """Estimate the fraction of negative eigenvalues (and the minimum ratio) of ``op``.

    Args:
        delta: eigenvalues within ``+-delta`` are counted as unresolved; default the quadrature's
            resolution ``(max node - min node) / steps``.
        quadrature: reuse a :func:`lanczos_quadrature` (no new HVPs).
    """
    quad = quadrature or lanczos_quadrature(op, n_probes, steps, seed=seed)
    m = quad.nodes.shape[1]
    span = float(quad.nodes.max() - quad.nodes.min())
    delta = span / m if delta is None else float(delta)
    if delta < 0:
        raise InvalidInputError(f"delta must be >= 0, got {delta}")
    below = quad.per_probe(lambda x: (x < -delta).to(x.dtype))
    above = quad.per_probe(lambda x: (x > delta).to(x.dtype))
    within = 1.0 - below - above
    p = quad.n_probes

    def mean_err(values) -> tuple[float, float]:
        mean = float(values.mean())
        err = float(values.std(unbiased=True)) / p**0.5 if p > 1 else float("inf")
        return mean, err

    (b, be), (a, ae), (w, we) = mean_err(below), mean_err(above), mean_err(within)
    # "above delta" is 1 - (weight at or below delta): bracket at the same place, nudged past delta.
    qb_below = _cms_half_width(quad, -delta)
    qb_above = _cms_half_width(quad, math.nextafter(delta, math.inf))
    return IndexEstimate(b, be, a, ae, w, we, qb_below, qb_above, delta, p, m, quad.hvp_count, quad.seed)
