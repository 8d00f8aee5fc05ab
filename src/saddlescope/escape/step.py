r"""One escape step along negative curvature, with a backtracking line search.

At a saddle :math:`\theta'` with :math:`g \approx 0` and a unit eigenvector :math:`u` of eigenvalue
:math:`\lambda < 0`,

.. math::

    L(\theta' + \alpha u) \approx L(\theta') + \alpha\, g^\top u + \tfrac12 \lambda \alpha^2 < L(\theta').

The step tries both signs of :math:`u` when :math:`g^\top u \approx 0` (otherwise the descending one),
starts at ``initial_step`` and halves :math:`\alpha` until the sufficient-decrease condition
:math:`L(\theta'+\alpha u) \le L(\theta') + c\,(\alpha\, g^\top u + \tfrac12 \lambda \alpha^2)` holds
(for a probe direction without a curvature value: until the loss decreases), then doubles it while
the loss keeps falling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from saddlescope.critical import CriticalPoint, sharpen_escape
from saddlescope.errors import InvalidInputError, NotADescentPointError
from saddlescope.objective import Objective


@dataclass
class EscapeStep:
    """The result of :func:`escape`.

    Attributes:
        theta: the new point.
        loss_before, loss_after: the loss at the old and new point.
        step_size: the length of the step (``direction`` has unit norm).
        direction: the unit direction taken (sign included).
        evaluations: loss evaluations spent by the line search.
        curvature: ``u^T H u`` of the direction taken (None for a probe direction).
        sharpening: what :func:`~saddlescope.critical.sharpen_escape` did to a certificate's
            direction before the step (None when the point had none to sharpen).
    """

    theta: Tensor
    loss_before: float
    loss_after: float
    step_size: float
    direction: Tensor
    evaluations: int
    curvature: float | None = None
    sharpening: dict[str, Any] | None = field(default=None)

    def to_dict(self, vectors: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "loss_before": self.loss_before,
            "loss_after": self.loss_after,
            "step_size": self.step_size,
            "evaluations": self.evaluations,
            "curvature": self.curvature,
            "sharpening": self.sharpening,
        }
        if vectors:
            out["theta"] = self.theta.tolist()
            out["direction"] = self.direction.tolist()
        return out


def escape(
    objective: Objective,
    point: CriticalPoint,
    *,
    initial_step: float = 1.0,
    sufficient_decrease: float = 0.5,
    min_step: float = 1e-10,
    max_expansions: int = 8,
    sharpen: float | None = 0.5,
    sharpen_hvps: int = 300,
) -> EscapeStep:
    """Step away from ``point`` along its negative-curvature direction.

    Args:
        objective: the objective ``point`` was computed on.
        point: a verdict from :func:`saddlescope.analyze` that has an ``escape_direction``.
        initial_step: first step length tried.
        sufficient_decrease: the constant ``c`` in the sufficient-decrease condition.
        min_step: give up below this step length.
        max_expansions: how many times a successful step may be doubled.
        sharpen: when ``point`` was proved a saddle by a certificate (the first negative Rayleigh
            quotient, possibly far above lambda_min), first spend up to ``sharpen_hvps`` products to get
            a direction whose curvature is within this fraction of lambda_min
            (:func:`~saddlescope.critical.sharpen_escape`); None steps along the certificate as it is.

    Raises:
        NotADescentPointError: ``point`` has no escape direction (a minimum, or a degenerate point
            whose probe found no decrease), or no decrease was found along it.
    """
    if point.escape_direction is None:
        raise NotADescentPointError(
            f"no negative-curvature direction at this point (kind {point.kind!r}, lambda_min "
            f"{point.lambda_min:.3g}): there is nothing to escape along; at a minimum, stop or "
            "perturb the data/model instead"
        )
    if not (initial_step > 0 and min_step > 0 and 0 < sufficient_decrease < 1):
        raise InvalidInputError("need initial_step > 0, min_step > 0 and 0 < sufficient_decrease < 1")
    theta = objective.check_theta(point.theta.to(objective.dtype), "point.theta")
    if sharpen is not None:
        point = sharpen_escape(objective, point, fraction=sharpen, max_hvps=sharpen_hvps)
    assert point.escape_direction is not None
    u = point.escape_direction.to(theta)
    loss0, grad = objective.loss_and_grad(theta)
    loss0 = float(loss0)
    slope = float(grad @ u)
    curvature = point.escape_curvature
    evals = 0

    def model_decrease(alpha: float, sign: float) -> float:
        if curvature is None:
            return 0.0  # a probe direction: any decrease will do
        return sufficient_decrease * (alpha * sign * slope + 0.5 * curvature * alpha * alpha)

    # Both signs descend when the slope is negligible next to the curvature term.
    signs = [1.0, -1.0] if abs(slope) <= 1e-8 * max(1.0, abs(curvature or 0.0)) else [-1.0 if slope > 0 else 1.0]
    best: tuple[float, float, float] | None = None  # (loss, alpha, sign)
    for sign in signs:
        alpha = initial_step
        while alpha >= min_step:
            value = float(objective.loss(theta + alpha * sign * u))
            evals += 1
            if value < loss0 + model_decrease(alpha, sign) and value < loss0:
                break
            alpha *= 0.5
        else:
            continue
        for _ in range(max_expansions):  # the first accepted step may be far too short
            trial = float(objective.loss(theta + 2 * alpha * sign * u))
            evals += 1
            if not (trial < value and trial < loss0 + model_decrease(2 * alpha, sign)):
                break
            alpha, value = 2 * alpha, trial
        if best is None or value < best[0]:
            best = (value, alpha, sign)
    if best is None:
        raise NotADescentPointError(
            f"no decrease found along the escape direction down to step {min_step:g}; its curvature "
            f"({curvature}) may be rounding noise: analyse with a larger rtol"
        )
    value, alpha, sign = best
    direction = sign * u
    return EscapeStep(
        theta=(theta + alpha * direction).detach(),
        loss_before=loss0,
        loss_after=value,
        step_size=alpha,
        direction=direction,
        evaluations=evals,
        curvature=curvature,
        sharpening=point.escape_sharpening,
    )
