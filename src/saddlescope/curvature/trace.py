r"""Trace estimates with a confidence interval: Hutchinson and Hutch++.

Hutchinson (1989): :math:`\operatorname{tr}A = \mathbb{E}[z^\top A z]` for Rademacher :math:`z`.
Hutch++ (Meyer, Musco, Musco & Woodruff 2021): with a third of the products, capture the top of the
spectrum exactly, :math:`Q = \operatorname{orth}(A S)`, :math:`\operatorname{tr}(Q^\top A Q)`, and
estimate only the remainder :math:`\operatorname{tr}((I-QQ^\top)A(I-QQ^\top))` by Hutchinson; the
variance then falls as :math:`1/m^2` instead of :math:`1/m` for matrices with decaying spectra.
The interval is a normal interval on the sample mean of the stochastic part; with large outlying
eigenvalues the samples are skewed and plain Hutchinson's coverage falls somewhat below nominal
(15 of 20 at 95% in the tests), Hutch++ removes the outliers first and keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import torch

from saddlescope.curvature.density import rademacher
from saddlescope.errors import InvalidInputError


@dataclass
class TraceEstimate:
    """``value`` with its standard error and a ``confidence`` interval ``[low, high]``."""

    value: float
    stderr: float
    low: float
    high: float
    confidence: float
    method: str
    hvp_count: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def trace(
    op: Any,
    n_matvecs: int = 60,
    *,
    method: str = "hutch++",
    confidence: float = 0.95,
    seed: int = 0,
) -> TraceEstimate:
    """Estimate ``tr(A)`` with about ``n_matvecs`` products.

    Args:
        method: ``"hutch++"`` (default) or ``"hutchinson"``.
        confidence: coverage of the reported interval.
    """
    n = int(op.shape[0])
    if method not in ("hutch++", "hutchinson"):
        raise InvalidInputError(f"method must be 'hutch++' or 'hutchinson', got {method!r}")
    if not (0 < confidence < 1):
        raise InvalidInputError(f"confidence must be in (0, 1), got {confidence}")
    minimum = 6 if method == "hutch++" else 2
    if n_matvecs < minimum:
        raise InvalidInputError(f"{method} needs at least {minimum} products, got {n_matvecs}")

    def apply(block: torch.Tensor) -> torch.Tensor:
        return op.matmat(block.to(op.device, op.dtype)).to(torch.float64).cpu()

    exact_part, products = 0.0, 0
    if method == "hutch++":
        third = min(n_matvecs // 3, n)
        sketch = apply(rademacher(n, third, seed))
        q, _ = torch.linalg.qr(sketch)
        exact_part = float((q * apply(q)).sum())
        products = 2 * third
        m = max(n_matvecs - products, 2)
        z = rademacher(n, m, seed + 1)
        z = z - q @ (q.T @ z)
    else:
        m = n_matvecs
        z = rademacher(n, m, seed)
    samples = (z * apply(z)).sum(0)
    products += m
    mean = float(samples.mean())
    stderr = float(samples.std(unbiased=True)) / m**0.5 if m > 1 else float("inf")
    value = exact_part + mean
    half = NormalDist().inv_cdf(0.5 + confidence / 2) * stderr
    return TraceEstimate(value, stderr, value - half, value + half, confidence, method, products, seed)
