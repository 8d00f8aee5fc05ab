"""A saddle's certificate turned into an escape direction within a stated fraction of lambda_min
(:func:`sharpen_escape`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from saddlescope.curvature.lanczos import eigs
from saddlescope.curvature.operator import HessianOperator
from saddlescope.errors import InvalidInputError
from saddlescope.objective import Objective
from saddlescope.quantity import Quantity
from saddlescope.verdict.point import CriticalPoint, descent_sign

__all__ = ["sharpen_escape"]


def sharpen_escape(
    objective: Objective,
    point: CriticalPoint,
    *,
    fraction: float = 0.5,
    max_hvps: int = 300,
) -> CriticalPoint:
    r"""Turn a certificate's escape direction into one within ``fraction`` of :math:`\lambda_{min}`.

    A saddle is proved by the first Rayleigh quotient below the zero threshold, but that direction can
    be a poor escape (on an unconverged MLP: curvature -5.12 where lambda_min is -1849). Lanczos
    restarted from it (the certificate vector is a good start: it already leans towards the bottom)
    runs until the bottom Ritz pair :math:`(\theta, r)` satisfies :math:`\theta \le f(\theta - r)`,
    i.e. :math:`r \le (1-f)|\theta|/f`: the direction's curvature :math:`\theta` is then at least
    ``fraction`` of the lower bound :math:`\theta - r` on :math:`\lambda_{min}` (the bound holds when the
    pair is the bottom one, Lanczos's premise from a start that is not orthogonal to it).

    Points without a certificate (exact path, converged bottom pair, no negative curvature) are
    returned unchanged. Otherwise a copy with the new ``escape_direction``, ``escape_curvature``,
    ``lambda_min`` quantity and ``escape_sharpening`` record is returned; if the budget runs out the
    best direction found is kept (never a worse one than the certificate's) and the record says the
    fraction was not reached.

    Args:
        fraction: in (0, 1]: how close to lambda_min the direction's curvature must be.
        max_hvps: product budget.
    """
    if not (0 < fraction <= 1):
        raise InvalidInputError(f"fraction must be in (0, 1], got {fraction}")
    if point.method != "lanczos" or point.escape_direction is None or point.escape_curvature is None:
        return point
    if point.converged is not None and bool(point.converged[0]):
        return point  # already a converged bottom pair
    op = HessianOperator(objective, point.theta.to(objective.dtype))
    tol = (1 - fraction) / fraction if fraction < 1 else 0.0
    bottom = eigs(op, 1, "smallest", tol=max(tol, 1e-12), relative_to="value", max_hvps=max_hvps,
                  v0=point.escape_direction.to(objective.dtype), seed=point.seed + 3)
    theta_b, resid = float(bottom.eigenvalues[0]), float(bottom.residuals[0])
    reached = bool(bottom.converged[0]) and theta_b < 0
    old = point.escape_curvature
    record: dict[str, Any] = {
        "certificate_curvature": old, "curvature": theta_b, "residual": resid,
        "lambda_min_lower_bound": theta_b - resid if reached else None,
        "fraction_of_lambda_min": theta_b / (theta_b - resid) if reached else None,
        "fraction_asked": fraction, "reached": reached, "hvps": op.hvp_count,
    }
    if not theta_b < old:  # nothing better found: keep the certificate
        record["curvature"] = old
        return dataclasses.replace(point, escape_sharpening=record, hvp_count=point.hvp_count + op.hvp_count)
    eigenvalues, residuals, converged = point.eigenvalues.clone(), point.residuals, point.converged
    eigenvalues[0] = theta_b
    if residuals is not None and converged is not None:
        residuals, converged = residuals.clone(), converged.clone()
        residuals[0], converged[0] = resid, reached
    quantities = dict(point.quantities)
    quantities["lambda_min"] = (
        Quantity.interval(theta_b, theta_b - resid, theta_b,
                          f"bottom Ritz pair sharpened for the escape (residual {resid:.2g}); Lanczos's premise "
                          f"that it is the bottom pair (started from the certificate: no random-start bound)")
        if reached else Quantity.upper_bound(theta_b, f"a Rayleigh quotient sharpened for the escape (residual {resid:.2g})")
    )
    grad = objective.grad(point.theta.to(objective.dtype))
    return dataclasses.replace(
        point,
        eigenvalues=eigenvalues, residuals=residuals, converged=converged, quantities=quantities,
        escape_direction=descent_sign(bottom.eigenvectors[:, 0].to(objective.dtype).clone(), grad),
        escape_curvature=theta_b, escape_sharpening=record, hvp_count=point.hvp_count + op.hvp_count,
    )
