r"""Finding critical points: drive :math:`\|g\|` to zero, and tell a critical point from a gradient-flat one.

Dauphin et al. (2014) located the critical points of small networks by minimising the squared
gradient norm with a Newton-type method; Frye, Simon, Wadia, Ligeralde, DeWeese & Bouchard (2020),
"Critical point-finding methods reveal gradient-flat regions of deep network losses", showed that
such methods also stop where they should not: at *gradient-flat* points, where the gradient is not
zero but lies in the (near-)kernel of the Hessian, so no Newton-type step can reduce it.

The merit function and its derivatives are

.. math::

    \varphi(\theta) = \tfrac12 \|g(\theta)\|^2, \qquad \nabla\varphi = H g, \qquad
    \text{Gauss--Newton matrix } J^\top J = H^2 \ (J = \partial g / \partial\theta = H).

With the exact eigendecomposition :math:`H = \sum_i \lambda_i u_i u_i^\top`, each step is the
Levenberg--Marquardt step on the residual :math:`g(\theta)`,

.. math::

    p(\mu) = -(H^2 + \mu I)^{+} H g = -\sum_{|\lambda_i| > c\,\|H\|}
        \frac{\lambda_i}{\lambda_i^2 + \mu}\,(u_i^\top g)\, u_i ,

whose :math:`\mu = 0` limit is the minimum-norm least-squares solution of :math:`Hp = -g` (the
Newton-MR direction of Roosta et al.; Newton's step where :math:`H` is invertible). Eigenvalues
below the pseudo-inverse cutoff :math:`c\,\|H\|` (``pinv_rtol``) are left out. A step is taken
when :math:`\varphi` falls by at least ``accept`` times what the Gauss--Newton model
:math:`\tfrac12\|g + Hp\|^2` predicts; then :math:`\mu` shrinks tenfold, else it grows tenfold and
the step is retried (up to ``max_tries`` times per Hessian). Newton-type steps converge to any
nearby critical point, saddles included: that is why they are used here, to find critical points
rather than minima.

Where :math:`H` is positive definite the only nearby critical point is a minimum, and
:math:`\|g\|` is a poor merit function there: along a curved valley the third derivative changes
:math:`g` by more than the Newton step removes, so :math:`\|g\|` can rise for every step length while
:math:`L` falls. There the step is Newton's, :math:`p = -H^{-1}g`, halved until :math:`L` satisfies
Armijo's condition :math:`L(\theta + tp) \le L(\theta) + \text{accept}\; t\, g^\top p` (Newton's
method for minimisation, globally convergent while the region stays convex); if no halving does, the
Levenberg--Marquardt trials follow.

Where :math:`g` lies in the kernel of :math:`H`, :math:`\nabla\varphi = Hg = 0` and every step
vanishes: :math:`\theta` is a stationary point of :math:`\varphi` that is not a critical point of
:math:`L`. Near such a point the step along the near-kernel part of :math:`g` is huge
(:math:`(u_i^\top g)/\lambda_i` with tiny :math:`\lambda_i`), the quadratic model fails there, and
:math:`\|g\|` stops falling. Where the search ends, two numbers say how much of the gradient lies in
the near-kernel:

.. math::

    f = \frac{\sum_{|\lambda_i| \le \kappa \|H\|_2} (u_i^\top g)^2}{\|g\|^2}, \qquad
    \rho = \frac{\|H g\|}{\|H\|_2\,\|g\|} \in [0, 1].

The label uses the *kernel fraction* :math:`f` (near-kernel: :math:`|\lambda| \le` ``kernel_rtol``
:math:`\cdot\|H\|_2`). :math:`\rho` is recorded too, but it is not a robust test: a residual
component of :math:`g` of relative size :math:`10^{-3}` on the top eigenvector alone makes
:math:`\rho \ge 10^{-3}` even when the rest of the gradient is exactly in the kernel, and each
nonlinear step re-creates such components. Labels (thresholds are the arguments of
:func:`find_critical_point`, recorded in every :class:`SearchResult`):

* ``"critical"``: :math:`\|g\| \le` ``grad_tol`` (default: the dtype's gradient tolerance of
  :func:`saddlescope.analyze`, 1e-6 in float64, so :func:`~saddlescope.analyze` agrees that the
  point is critical).
* ``"gradient_flat"``: the search *stalled* above ``grad_tol`` (no step lowered :math:`\|g\|`, or
  :math:`\|g\|` fell by less than 10% (``stall_factor`` = 0.9) over the last ``stall_window`` = 10
  iterations) **and** :math:`f \ge` ``flat_fraction`` (default 0.9, with ``kernel_rtol`` = 1e-3):
  the gradient has stopped falling because it lies in the near-kernel (Frye et al. 2020).
* ``"not_converged"``: anything else (the iteration budget ran out while :math:`\|g\|` was still
  falling, or the search stalled with the gradient *not* in the near-kernel).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from saddlescope.curvature.exact import symmetric_eigh
from saddlescope.errors import InvalidInputError, NonFiniteLossError
from saddlescope.objective import DEFAULT_EXACT_BUDGET_BYTES, Objective
from saddlescope.tolerances import default_tolerances

__all__ = ["LABELS", "SearchResult", "find_critical_point"]

LABELS = ("critical", "gradient_flat", "not_converged")

DEFAULT_KERNEL_RTOL = 1e-3
DEFAULT_FLAT_FRACTION = 0.9
DEFAULT_PINV_RTOL = 1e-12


@dataclass
class SearchResult:
    """Where the search for a critical point ended, and why.

    Attributes:
        label: ``"critical"``, ``"gradient_flat"`` or ``"not_converged"`` (see the module docstring).
        reason: one human-readable sentence.
        theta: the last point.
        loss, grad_norm: at ``theta``; ``start_loss``, ``start_grad_norm`` where the search began.
        kernel_fraction: the share :math:`f` of :math:`\\|g\\|^2` in the Hessian's near-kernel at
            ``theta``; ``hg_ratio``: :math:`\\|Hg\\| / (\\|H\\|_2 \\|g\\|)` there. Both NaN when the search
            ended critical (no Hessian is needed there).
        stalled: the search stopped because it could not lower :math:`\\|g\\|` any more.
        iterations: Hessians computed for steps (each one eigendecomposition).
        convex_steps: of those, steps taken by Newton's method on :math:`L` (positive definite :math:`H`).
        gradient_evals: gradients computed (trial steps included).
        grad_norms: :math:`\\|g\\|` after each iteration, starting with the initial one.
        thresholds: every threshold the label used.
        seconds: wall time.
    """

    label: str
    reason: str
    theta: Tensor
    loss: float
    grad_norm: float
    start_loss: float
    start_grad_norm: float
    kernel_fraction: float
    hg_ratio: float
    stalled: bool
    iterations: int
    convex_steps: int
    gradient_evals: int
    grad_norms: list[float]
    thresholds: dict[str, float]
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def converged(self) -> bool:
        return self.label == "critical"

    def to_dict(self, vectors: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "label": self.label,
            "reason": self.reason,
            "loss": self.loss,
            "grad_norm": self.grad_norm,
            "start_loss": self.start_loss,
            "start_grad_norm": self.start_grad_norm,
            "kernel_fraction": self.kernel_fraction,
            "hg_ratio": self.hg_ratio,
            "stalled": self.stalled,
            "iterations": self.iterations,
            "convex_steps": self.convex_steps,
            "gradient_evals": self.gradient_evals,
            "grad_norms": list(self.grad_norms),
            "thresholds": dict(self.thresholds),
            "seconds": self.seconds,
            "notes": list(self.notes),
        }
        if vectors:
            out["theta"] = self.theta.tolist()
        return out


@dataclass
class _Curvature:
    """The eigendecomposition of H at one point and the gradient in its basis."""

    values: Tensor
    vectors: Tensor
    coeffs: Tensor  # u_i^T g
    scale: float  # ||H||_2

    @classmethod
    def at(cls, objective: Objective, theta: Tensor, grad: Tensor, max_bytes: int) -> _Curvature:
        values, vectors = symmetric_eigh(objective.hessian(theta, max_bytes=max_bytes))
        assert vectors is not None
        values, vectors = values.to(theta.dtype), vectors.to(theta.dtype)
        return cls(values, vectors, vectors.T @ grad, float(values.abs().max()))

    def kernel_fraction(self, kernel_rtol: float) -> float:
        total = float((self.coeffs**2).sum())
        if total == 0.0:
            return math.nan
        near = self.values.abs() <= kernel_rtol * self.scale
        return float((self.coeffs[near] ** 2).sum()) / total

    def hg_ratio(self) -> float:
        grad_norm = float(self.coeffs.norm())
        if grad_norm == 0.0:
            return math.nan
        if self.scale == 0.0:
            return 0.0
        return float((self.values * self.coeffs).norm()) / (self.scale * grad_norm)


def find_critical_point(
    objective: Objective,
    theta: Tensor | None = None,
    *,
    grad_tol: float | None = None,
    kernel_rtol: float = DEFAULT_KERNEL_RTOL,
    flat_fraction: float = DEFAULT_FLAT_FRACTION,
    max_iter: int = 100,
    stall_window: int = 10,
    stall_factor: float = 0.9,
    pinv_rtol: float = DEFAULT_PINV_RTOL,
    max_tries: int = 12,
    accept: float = 1e-4,
    max_bytes: int = DEFAULT_EXACT_BUDGET_BYTES,
) -> SearchResult:
    """Minimise :math:`\\tfrac12\\|\\nabla L\\|^2` from ``theta`` by Levenberg--Marquardt steps on the
    exact Hessian until :math:`\\|g\\| \\le` ``grad_tol``, and label where it ended.

    Args:
        objective: any objective small enough for its exact Hessian (each iteration forms it).
        theta: the start (default ``objective.theta0``).
        grad_tol: "critical" when :math:`\\|g\\|` is at most this (default by dtype, as
            :func:`saddlescope.analyze`: 1e-6 in float64).
        kernel_rtol: the near-kernel is spanned by eigenvectors with :math:`|\\lambda| \\le`
            ``kernel_rtol`` :math:`\\cdot\\|H\\|_2`.
        flat_fraction: "gradient_flat" needs at least this share of :math:`\\|g\\|^2` in the near-kernel.
        max_iter: Hessians (iterations) at most.
        stall_window, stall_factor: stalled when :math:`\\|g\\|` is above ``stall_factor`` times its
            value ``stall_window`` iterations earlier (or when no step lowers it at all).
        pinv_rtol: eigenvalues with :math:`|\\lambda| \\le` ``pinv_rtol`` :math:`\\cdot\\|H\\|_2` are left
            out of the step (the pseudo-inverse cutoff).
        max_tries: step trials (growing the damping) per Hessian before declaring a stall.
        accept: a step is taken when the actual fall of :math:`\\varphi` is at least this fraction
            of the Gauss--Newton prediction.
        max_bytes: memory budget of the exact Hessian (see :meth:`Objective.hessian`).

    Returns:
        A :class:`SearchResult`.

    Raises:
        saddlescope.errors.InvalidInputError: a threshold out of range.
    """
    start = time.perf_counter()
    theta = objective.theta0 if theta is None else objective.check_theta(theta)
    theta = theta.detach().clone()
    if grad_tol is None:
        grad_tol = default_tolerances(objective.dtype)[0]
    for name, value in (("grad_tol", grad_tol), ("kernel_rtol", kernel_rtol), ("flat_fraction", flat_fraction),
                        ("stall_factor", stall_factor), ("pinv_rtol", pinv_rtol), ("accept", accept)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise InvalidInputError(f"{name} must be a finite number >= 0, got {value!r}")
    for name, value in (("kernel_rtol", kernel_rtol), ("flat_fraction", flat_fraction),
                        ("stall_factor", stall_factor), ("accept", accept)):
        if not 0 < value < 1:
            raise InvalidInputError(f"{name} must lie strictly between 0 and 1, got {value!r}")
    for name, count in (("max_iter", max_iter), ("stall_window", stall_window), ("max_tries", max_tries)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise InvalidInputError(f"{name} must be a positive integer, got {count!r}")
    thresholds = {"grad_tol": float(grad_tol), "kernel_rtol": float(kernel_rtol),
                  "flat_fraction": float(flat_fraction), "stall_window": stall_window,
                  "stall_factor": float(stall_factor), "pinv_rtol": float(pinv_rtol), "max_iter": max_iter,
                  "accept": float(accept)}

    loss, grad = objective.loss_and_grad(theta)
    gradient_evals = 1
    grad_norm = float(grad.norm())
    start_loss, start_grad_norm = float(loss), grad_norm
    grad_norms = [grad_norm]
    damping = 0.0  # mu, relative to ||H||^2
    stalled, stall_reason = False, ""
    iterations = 0
    curvature: _Curvature | None = None  # at theta, when it is current
    newton_steps = 0  # steps taken by the convex branch (Armijo on L)

    while grad_norm > grad_tol and iterations < max_iter:
        curvature = _Curvature.at(objective, theta, grad, max_bytes)
        iterations += 1
        if curvature.scale == 0.0:
            stalled, stall_reason = True, "the Hessian is zero: no Newton-type step exists"
            break
        values, coeffs, scale = curvature.values, curvature.coeffs, curvature.scale
        kept = values.abs() > pinv_rtol * scale
        stepped = False
        if bool((values > pinv_rtol * scale).all()):
            # Locally convex: the only nearby critical point is a minimum, and Newton's step with
            # Armijo backtracking on L reaches it also along curved valleys, where |g| is a poor merit.
            step = -(curvature.vectors @ (coeffs / values))
            slope = float(grad @ step)
            for halvings in range(max_tries):
                t = 0.5**halvings
                gradient_evals += 1
                try:
                    trial_loss, trial_grad = objective.loss_and_grad(theta + t * step)
                except NonFiniteLossError:
                    continue
                if float(trial_loss) <= float(loss) + accept * t * slope:
                    theta, loss, grad = theta + t * step, trial_loss, trial_grad
                    grad_norm, stepped, curvature = float(grad.norm()), True, None
                    newton_steps += 1
                    break
        phi = 0.5 * grad_norm**2
        for _ in range(0 if stepped else max_tries):
            gain = torch.where(kept, values / (values**2 + damping * scale**2), torch.zeros_like(values))
            step = -(curvature.vectors @ (gain * coeffs))
            # The Gauss-Newton model's residual g + Hp, in the eigenbasis.
            predicted = phi - 0.5 * float(((coeffs * (1 - values * gain)) ** 2).sum())
            if not (predicted > 0) or not bool(torch.isfinite(step).all()):
                damping = _grow(damping)
                continue
            gradient_evals += 1
            try:
                trial_loss, trial_grad = objective.loss_and_grad(theta + step)
            except NonFiniteLossError:
                damping = _grow(damping)
                continue
            trial_norm = float(trial_grad.norm())
            if phi - 0.5 * trial_norm**2 >= accept * predicted:
                theta, loss, grad, grad_norm = theta + step, trial_loss, trial_grad, trial_norm
                damping = damping / 10 if damping > 1e-12 else 0.0
                stepped, curvature = True, None
                break
            damping = _grow(damping)
        grad_norms.append(grad_norm)
        if not stepped:
            stalled = True
            stall_reason = f"no step was accepted in {max_tries} tries (damping up to {damping:.1e} |H|^2)"
            break
        if len(grad_norms) > stall_window and grad_norm > stall_factor * grad_norms[-1 - stall_window]:
            stalled = True
            stall_reason = (f"|grad| fell only from {grad_norms[-1 - stall_window]:.3g} to {grad_norm:.3g} "
                            f"in the last {stall_window} iterations")
            break

    fraction = ratio = math.nan
    if grad_norm > grad_tol:
        if curvature is None:  # the last step moved theta: measure where the search ended
            curvature = _Curvature.at(objective, theta, grad, max_bytes)
        fraction, ratio = curvature.kernel_fraction(kernel_rtol), curvature.hg_ratio()
    where = (f"{fraction:.3f} of |g|^2 in the near-kernel (|lambda| <= {kernel_rtol:.0e} |H|), "
             f"|Hg|/(|H||g|) = {ratio:.2g}")
    if grad_norm <= grad_tol:
        label = "critical"
        reason = f"|grad| = {grad_norm:.3g} <= grad_tol = {grad_tol:.3g} after {iterations} iterations"
    elif stalled and fraction >= flat_fraction:
        label = "gradient_flat"
        reason = (f"stalled at |grad| = {grad_norm:.3g} > grad_tol = {grad_tol:.3g} with the gradient in the "
                  f"Hessian's near-kernel: {where} ({stall_reason})")
    elif stalled:
        label = "not_converged"
        reason = (f"stalled at |grad| = {grad_norm:.3g} ({stall_reason}) with the gradient not in the "
                  f"near-kernel: {where} < flat_fraction = {flat_fraction}")
    else:
        label = "not_converged"
        reason = (f"|grad| = {grad_norm:.3g} > grad_tol = {grad_tol:.3g} after the budget of {max_iter} "
                  f"iterations, still falling; {where}")
    return SearchResult(
        label=label,
        reason=reason,
        theta=theta,
        loss=float(loss),
        grad_norm=grad_norm,
        start_loss=start_loss,
        start_grad_norm=start_grad_norm,
        kernel_fraction=fraction,
        hg_ratio=ratio,
        stalled=stalled,
        iterations=iterations,
        convex_steps=newton_steps,
        gradient_evals=gradient_evals,
        grad_norms=grad_norms,
        thresholds=thresholds,
        seconds=time.perf_counter() - start,
    )


def _grow(damping: float) -> float:
    """The next larger relative damping: 1e-10 |H|^2 from zero, then tenfold."""
    return 1e-10 if damping == 0.0 else 10.0 * damping
