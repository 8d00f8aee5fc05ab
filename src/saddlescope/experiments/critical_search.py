r"""Finding critical points: drive :math:`\|g\|` to zero, and say honestly where the search ended.

Dauphin et al. (2014) located the critical points of small networks by Newton-type methods on the
squared gradient norm; Frye, Simon, Wadia, Ligeralde, DeWeese & Bouchard (2020), "Critical
point-finding methods reveal gradient-flat regions of deep network losses", showed that such methods
also stop where they should not: at *gradient-flat* points, where the gradient is not zero but lies
in the (near-)kernel of the Hessian, so that no Newton-type step can reduce it. This search has two
kinds of step, chosen by the index of the current point, and three labels.

**Gradient mode: Newton-MR on** :math:`\varphi = \tfrac12\|g\|^2` (Roosta, Liu, Xu & Mahoney 2018;
the method of Frye et al. 2020). With :math:`\nabla\varphi = Hg`, the Gauss--Newton matrix
:math:`H^2` and the exact eigendecomposition :math:`H = \sum_i \lambda_i u_i u_i^\top`, the step is the
Levenberg--Marquardt-damped minimum-residual solution of :math:`Hp = -g`,

.. math::

    p(\mu) = -(H^2 + \mu\|H\|^2 I)^{+} H g
           = -\sum_{|\lambda_i| > c\|H\|} \frac{\lambda_i}{\lambda_i^2 + \mu\|H\|^2}\,(u_i^\top g)\, u_i ,

whose :math:`\mu = 0` limit is the minimum-norm least-squares (Newton-MR) step; eigenvalues below the
pseudo-inverse cutoff :math:`c\|H\|` (``pinv_rtol``) are left out. A step is taken when
:math:`\varphi` falls by at least ``accept`` times what the model :math:`\tfrac12\|g + Hp\|^2`
predicts; then :math:`\mu` shrinks tenfold, else it grows tenfold and the step is retried (up to
``max_tries`` times per Hessian). Such steps converge to any nearby critical point, saddles included:
that is why they are used here.

**Loss mode: a trust-region Newton step on** :math:`L` **itself**, once the index is tiny (at most
``loss_mode_index`` of the eigenvalues below :math:`-\text{rtol}\,\|H\|`, the verdict's zero band of
:func:`saddlescope.analyze`). Near a minimum :math:`\|g\|` is a poor merit function (along a curved
valley the third derivative changes :math:`g` by more than the Newton step removes), and one tiny
negative eigenvalue disables any "positive definite" branch; the trust-region step handles both
(Moré & Sorensen 1983; Conn, Gould & Toint 2000, ch. 7). It minimises the quadratic model
:math:`m(p) = g^\top p + \tfrac12 p^\top H p` over :math:`\|p\| \le \Delta`, exactly in the
eigenbasis (:func:`trust_region_subproblem`, the hard case included), takes it when
:math:`L` falls by at least ``accept`` times :math:`-m(p)`, and grows or shrinks :math:`\Delta` by the
ratio. Once in loss mode the search stays there. ``quasi_newton_iter`` L-BFGS iterations on :math:`L`
(cheap: gradients only) may precede the first trust-region step.

Two more reasons to switch, both off by default (:func:`~saddlescope.experiments.min_ratio` uses them):
gradient mode has spent ``gradient_budget`` steps, or it stopped improving with the gradient *not* in the
near-kernel (``descend_after_stall``; a gradient-flat stop still ends the search with that label). Where
gradient mode ended is kept (:attr:`SearchResult.gradient_end`): those points are what a looser tolerance
would have called critical. Every switch and stop is decided by :func:`next_mode`; the steps are
:func:`gradient_step` and :func:`loss_step`, their acceptance :func:`accept_gradient_step` and
:func:`accept_loss_step`, the stall rule :func:`stopped_improving` and the label :func:`label_search`.

**Labels** (thresholds are the arguments of :func:`find_critical_point`, recorded in every
:class:`SearchResult`):

* ``"critical"``: :math:`\|g\| \le` ``grad_tol``.
* ``"gradient_flat"``: the search *stopped improving* (no step could be accepted in ``max_tries``
  trials, or the best :math:`\|g\|` fell by less than a factor ``stall_factor`` over the last
  ``stall_window`` steps, and in loss mode the loss stopped falling too, unless it falls only along the
  near-kernel: :func:`stopped_improving`) **and**
  :math:`\rho = \|Hg\| / (\|H\|_2\,\|g\|) \le` ``kernel_rtol``: the gradient lies where :math:`H`
  is as small as its near-kernel, :math:`|\lambda| \le` ``kernel_rtol`` :math:`\cdot\|H\|_2`
  (Frye et al. 2020). Keep that cut well below any penalty: an L2 penalty :math:`\tfrac w2\|\theta\|^2`
  lifts every eigenvalue by :math:`w`, and a cut above :math:`w` would call the penalty's curvature
  "flat".
* ``"not_converged"``: anything else: the budget of ``max_iter`` Hessians ran out while the search was
  still improving, or it stopped improving with the gradient *not* in the near-kernel.

The share :math:`f` of :math:`\|g\|^2` on the near-kernel eigenvectors is recorded beside :math:`\rho`.
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

__all__ = ["LABELS", "MODES", "SearchResult", "accept_gradient_step", "accept_loss_step", "find_critical_point",
           "gradient_step", "label_search", "loss_step", "next_mode", "stopped_improving", "trust_region_subproblem"]

LABELS = ("critical", "gradient_flat", "not_converged")
MODES = ("gradient", "loss")

DEFAULT_KERNEL_RTOL = 1e-8
DEFAULT_PINV_RTOL = 1e-12


@dataclass
class SearchResult:
    r"""Where the search for a critical point ended, and why.

    Attributes:
        label: ``"critical"``, ``"gradient_flat"`` or ``"not_converged"`` (see the module docstring).
        reason: one human-readable sentence.
        theta: the last point.
        loss, grad_norm: at ``theta``; ``start_loss``, ``start_grad_norm`` where the search began.
        kernel_fraction: the share :math:`f` of :math:`\\|g\\|^2` on eigenvectors with
            :math:`|\\lambda| \\le` ``kernel_rtol`` :math:`\\|H\\|_2` at ``theta``; ``hg_ratio``:
            :math:`\\rho = \\|Hg\\| / (\\|H\\|_2 \\|g\\|)` there. Both NaN when the search ended critical.
        stalled: the search stopped because it had stopped improving.
        iterations: Hessians computed (each one eigendecomposition).
        mode: the mode the search ended in (``"gradient"`` or ``"loss"``); ``loss_mode_at``: the
            iteration it switched to loss mode (None if it never did).
        mode_steps: steps taken in each mode.
        quasi_newton_iterations: L-BFGS iterations on the loss before the first trust-region step.
        gradient_evals: gradients computed (trial steps and L-BFGS included).
        grad_norms: :math:`\\|g\\|` after each iteration, starting with the initial one.
        thresholds: every threshold the label used.
        seconds: wall time.
        gradient_end: where gradient mode ended when the search went on in loss mode (iterations, why,
            loss, :math:`\|g\|`, index, :math:`\rho`); None if it never switched.
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
    mode: str
    loss_mode_at: int | None
    mode_steps: dict[str, int]
    quasi_newton_iterations: int
    gradient_evals: int
    grad_norms: list[float]
    thresholds: dict[str, float]
    seconds: float
    gradient_end: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def converged(self) -> bool:
        return self.label == "critical"

    def to_dict(self, vectors: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name) for name in (
            "label", "reason", "loss", "grad_norm", "start_loss", "start_grad_norm", "kernel_fraction", "hg_ratio",
            "stalled", "iterations", "mode", "loss_mode_at", "quasi_newton_iterations", "gradient_evals", "seconds")}
        out.update(mode_steps=dict(self.mode_steps), grad_norms=list(self.grad_norms), gradient_end=self.gradient_end,
                   thresholds=dict(self.thresholds), notes=list(self.notes))
        if vectors:
            out["theta"] = self.theta.tolist()
        return out


# ---------------------------------------------------------------------- state
@dataclass
class _Point:
    """A point of the search with its loss and gradient."""

    theta: Tensor
    loss: float
    grad: Tensor

    @property
    def grad_norm(self) -> float:
        return float(self.grad.norm())

    @classmethod
    def at(cls, objective: Objective, theta: Tensor) -> _Point:
        loss, grad = objective.loss_and_grad(theta)
        return cls(theta, float(loss), grad)


@dataclass
class _Curvature:
    """The eigendecomposition of H at one point and the gradient in its basis."""

    values: Tensor
    vectors: Tensor
    coeffs: Tensor  # u_i^T g
    scale: float  # ||H||_2

    @classmethod
    def at(cls, objective: Objective, point: _Point, max_bytes: int) -> _Curvature:
        values, vectors = symmetric_eigh(objective.hessian(point.theta, max_bytes=max_bytes))
        assert vectors is not None
        dtype = point.theta.dtype
        values, vectors = values.to(dtype), vectors.to(dtype)
        return cls(values, vectors, vectors.T @ point.grad, float(values.abs().max()))

    def negative_fraction(self, rtol: float) -> float:
        """The share of eigenvalues below :math:`-\\text{rtol}\\,\\|H\\|_2`."""
        return float((self.values < -rtol * self.scale).sum()) / self.values.numel()

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


@dataclass
class _Budget:
    """Gradients spent, counted across the steps."""

    gradient_evals: int = 0

    def evaluate(self, objective: Objective, theta: Tensor) -> _Point | None:
        """The point at ``theta``, or None where the loss is not finite."""
        self.gradient_evals += 1
        try:
            return _Point.at(objective, theta)
        except NonFiniteLossError:
            return None


# ---------------------------------------------------------------------- the two steps
def gradient_step(objective: Objective, point: _Point, curvature: _Curvature, damping: float, budget: _Budget, *,
                  pinv_rtol: float, accept: float, max_tries: int) -> tuple[_Point | None, float]:
    """One damped Newton-MR step on :math:`\\tfrac12\\|g\\|^2` (module docstring). Returns the new point
    (None if no trial was accepted) and the damping :math:`\\mu` (relative to :math:`\\|H\\|^2`) to
    start the next step with."""
    values, coeffs, scale = curvature.values, curvature.coeffs, curvature.scale
    kept = values.abs() > pinv_rtol * scale
    phi = 0.5 * point.grad_norm**2
    for _ in range(max_tries):
        gain = torch.where(kept, values / (values**2 + damping * scale**2), torch.zeros_like(values))
        step = -(curvature.vectors @ (gain * coeffs))
        # The Gauss-Newton model's residual g + Hp, in the eigenbasis.
        predicted = phi - 0.5 * float(((coeffs * (1 - values * gain)) ** 2).sum())
        if predicted > 0 and bool(torch.isfinite(step).all()):
            trial = budget.evaluate(objective, point.theta + step)
            if trial is not None and accept_gradient_step(phi, 0.5 * trial.grad_norm**2, predicted, accept):
                return trial, (damping / 10 if damping > 1e-12 else 0.0)
        damping = 1e-10 if damping == 0.0 else 10.0 * damping
    return None, damping


def accept_gradient_step(phi: float, trial_phi: float, predicted: float, accept: float) -> bool:
    """Take a gradient-mode step when :math:`\\varphi` fell by ``accept`` times the model's prediction."""
    return phi - trial_phi >= accept * predicted


def trust_region_subproblem(values: Tensor, coeffs: Tensor, radius: float) -> Tensor:
    """Minimise :math:`m(q) = c^\\top q + \\tfrac12 \\sum_i \\lambda_i q_i^2` over :math:`\\|q\\| \\le \\Delta`
    in the eigenbasis of :math:`H` (``values`` ascending, ``coeffs`` :math:`= U^\\top g`).

    The solution is :math:`q(\\mu) = -c / (\\lambda + \\mu)` with :math:`\\mu \\ge \\max(0, -\\lambda_{\\min})`
    and :math:`\\|q(\\mu)\\| = \\Delta` unless the Newton step is interior (Moré & Sorensen 1983). In the
    *hard case* (no gradient on the bottom eigenspace, and :math:`\\|q\\| < \\Delta` as
    :math:`\\mu \\downarrow -\\lambda_{\\min}`) the step is completed along the bottom eigenvector to the
    boundary. :math:`\\mu` is found by bisection (in logarithms over wide ranges): robust, and cheap
    beside the eigendecomposition it follows.

    Returns:
        The step :math:`q` in the eigenbasis.
    """
    if not radius > 0:
        raise InvalidInputError(f"radius must be positive, got {radius!r}")
    lowest = float(values[0])
    if lowest > 0:
        newton = -coeffs / values
        if float(newton.norm()) <= radius:
            return newton
    floor = max(0.0, -lowest)
    # Just above the pole: the smallest mu the step is defined for.
    floor_up = floor + max(abs(floor), float(values.abs().max()), 1e-300) * 1e-13 if floor > 0 else 0.0
    bottom = values - lowest <= 1e-12 * max(abs(lowest), 1e-300)

    def step(mu: float) -> Tensor:
        return -coeffs / (values + mu)

    if floor > 0 and float(step(floor_up).norm()) < radius:
        # The hard case (or as near it as rounding tells): the rest of the step at the pole, then
        # along the bottom eigenvector to the boundary, downhill.
        rest = torch.where(bottom, torch.zeros_like(coeffs), step(floor_up))
        first = int(torch.nonzero(bottom)[0])
        rest[first] = -math.copysign(math.sqrt(max(radius**2 - float((rest**2).sum()), 0.0)), float(coeffs[first]))
        return rest
    low = floor_up if floor > 0 else 0.0
    high = floor + float(coeffs.norm()) / radius + 1e-300
    if float(step(high).norm()) > radius:  # guard against rounding at the edges
        high *= 2.0
    for _ in range(200):
        middle = math.sqrt(low * high) if low > 0 and high / low > 4 else 0.5 * (low + high)
        if float(step(middle).norm()) > radius:
            low = middle
        else:
            high = middle
        if high - low <= 1e-14 * high:
            break
    return step(high)


def loss_step(objective: Objective, point: _Point, curvature: _Curvature, radius: float, budget: _Budget, *,
              accept: float, max_tries: int) -> tuple[_Point | None, float]:
    """One trust-region Newton step on the loss (module docstring). Returns the new point (None if no
    trial was accepted) and the next radius."""
    for _ in range(max_tries):
        q = trust_region_subproblem(curvature.values, curvature.coeffs, radius)
        predicted = -(float(curvature.coeffs @ q) + 0.5 * float((curvature.values * q * q).sum()))
        length = float(q.norm())
        trial = budget.evaluate(objective, point.theta + curvature.vectors @ q)
        if trial is None:
            radius = 0.25 * min(radius, length)
            continue
        ratio = accept_loss_step(point, trial, predicted)
        if ratio >= accept:
            return trial, next_radius(radius, length, ratio)
        radius = 0.25 * min(radius, length)
    return None, radius


def accept_loss_step(point: _Point, trial: _Point, predicted: float) -> float:
    """The trust-region ratio: actual over predicted fall of the loss. Where the predicted fall is
    below the loss's rounding (the last steps of a converging search), the ratio cannot be measured:
    the step counts as good (ratio 1) when it lowers :math:`\\|g\\|`, else as bad (ratio -1)."""
    noise = 64 * torch.finfo(point.grad.dtype).eps * max(1.0, abs(point.loss))
    if predicted <= noise:
        return 1.0 if trial.grad_norm < point.grad_norm else -1.0
    return (point.loss - trial.loss) / predicted


def next_radius(radius: float, length: float, ratio: float) -> float:
    """Shrink the trust region after a poor model, grow it after a good step that hit the boundary."""
    if ratio < 0.25:
        return 0.25 * length
    if ratio > 0.75 and length >= 0.99 * radius:
        return 2.0 * radius
    return radius


def quasi_newton_descent(objective: Objective, point: _Point, budget: _Budget, *, max_iter: int,
                         grad_tol: float) -> tuple[_Point, int]:
    """L-BFGS on the loss (strong Wolfe line search) for at most ``max_iter`` iterations: gradients
    only, so it crosses long valleys far more cheaply than Hessian steps. Returns the end point (the
    start if the loss went non-finite) and the iterations run."""
    if max_iter <= 0:
        return point, 0
    theta = point.theta.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=grad_tol,
                                  tolerance_change=0.0, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        budget.gradient_evals += 1
        loss, grad = objective.loss_and_grad(theta.detach())
        theta.grad = grad
        return loss

    try:
        optimizer.step(closure)
    except NonFiniteLossError:
        return point, 0
    iterations = int(optimizer.state[optimizer.param_groups[0]["params"][0]].get("n_iter", 0))
    end = budget.evaluate(objective, theta.detach().clone())
    if end is None or end.loss > point.loss:
        return point, iterations
    return end, iterations


# ---------------------------------------------------------------------- stopping and labels
@dataclass
class _Progress:
    """:math:`\\|g\\|` and :math:`L` after each step of the current mode (the stall rule's memory)."""

    grad_norms: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def add(self, point: _Point) -> None:
        self.grad_norms.append(point.grad_norm)
        self.losses.append(point.loss)


def stopped_improving(progress: _Progress, mode: str, window: int, factor: float, gradient_in_kernel: bool) -> bool:
    r"""The mode's merit stopped improving: the best :math:`\|g\|` of the last ``window`` steps is above
    ``factor`` times the best before them, and, in loss mode, the loss also fell by less than
    :math:`10^{-9}\max(1, |L|)` over them (a trust region crossing a long valley lowers the loss long
    before it lowers :math:`\|g\|`) or the gradient lies in the Hessian's near-kernel
    (``gradient_in_kernel``: then the loss falls along a direction the Hessian does not see, with no
    critical point ahead that the quadratic model could find)."""
    norms, losses = progress.grad_norms, progress.losses
    if len(norms) <= window or min(norms[-window:]) <= factor * min(norms[:-window]):
        return False
    if mode == "loss" and not gradient_in_kernel:
        return losses[-1 - window] - losses[-1] < 1e-9 * max(1.0, abs(losses[-1]))
    return True


def label_search(grad_norm: float, grad_tol: float, stalled: bool, hg_ratio: float, kernel_fraction: float,
                 kernel_rtol: float, why: str, max_iter: int) -> tuple[str, str]:
    """The label and its reason (module docstring)."""
    where = (f"|Hg|/(|H||g|) = {hg_ratio:.2g}, {kernel_fraction:.3f} of |g|^2 on |lambda| <= "
             f"{kernel_rtol:.0e} |H|")
    if grad_norm <= grad_tol:
        return "critical", f"|grad| = {grad_norm:.3g} <= grad_tol = {grad_tol:.3g}"
    if stalled and hg_ratio <= kernel_rtol:
        return "gradient_flat", (f"stopped improving at |grad| = {grad_norm:.3g} ({why}) with the gradient in the "
                                 f"Hessian's near-kernel: {where}")
    if stalled:
        return "not_converged", (f"stopped improving at |grad| = {grad_norm:.3g} ({why}); the gradient is not in "
                                 f"the near-kernel: {where} > {kernel_rtol:.0e}")
    return "not_converged", (f"|grad| = {grad_norm:.3g} > grad_tol = {grad_tol:.3g} after the budget of {max_iter} "
                             f"Hessians, still improving; {where}")


def _check_arguments(numbers: dict[str, float], fractions: dict[str, float], counts: dict[str, int]) -> None:
    for name, value in numbers.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise InvalidInputError(f"{name} must be a finite number >= 0, got {value!r}")
    for name, value in fractions.items():
        if not 0 < value < 1:
            raise InvalidInputError(f"{name} must lie strictly between 0 and 1, got {value!r}")
    for name, count in counts.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise InvalidInputError(f"{name} must be a positive integer, got {count!r}")


@dataclass(frozen=True)
class _Rules:
    """When the search changes mode or stops (the arguments of :func:`find_critical_point`)."""

    kernel_rtol: float
    loss_mode_index: float
    negative_rtol: float
    gradient_budget: int | None
    descend_after_stall: bool


def next_mode(mode: str, stopped: str, curvature: _Curvature, gradient_steps: int, rules: _Rules) -> tuple[str, str]:
    """What the search does at a point: ``("go", "")`` on in its mode, ``("switch", why)`` to loss mode, or
    ``("stop", "")``. ``stopped`` says why the mode stopped improving ("" if it did not)."""
    if mode == "loss":
        return ("stop", "") if stopped else ("go", "")
    if stopped:
        if rules.descend_after_stall and curvature.hg_ratio() > rules.kernel_rtol:
            return "switch", f"gradient mode stopped improving ({stopped}), the gradient not in the near-kernel"
        return "stop", ""
    if curvature.negative_fraction(rules.negative_rtol) <= rules.loss_mode_index:
        return "switch", f"the index fell to at most loss_mode_index = {rules.loss_mode_index:g}"
    if rules.gradient_budget is not None and gradient_steps >= rules.gradient_budget:
        return "switch", f"gradient mode used its budget of {rules.gradient_budget} steps"
    return "go", ""


def _gradient_phase_end(point: _Point, curvature: _Curvature, iterations: int, why: str,
                        negative_rtol: float) -> dict[str, Any]:
    """Where gradient mode ended before the search went on in loss mode (recorded: such points are what
    a looser tolerance would have called critical)."""
    return {"iterations": iterations, "why": why, "loss": point.loss, "grad_norm": point.grad_norm,
            "index": curvature.negative_fraction(negative_rtol), "hg_ratio": curvature.hg_ratio(),
            "theta_norm": float(point.theta.norm())}


@dataclass
class _State:
    """The search's moving parts."""

    point: _Point
    mode: str = "gradient"
    damping: float = 0.0
    radius: float = 1.0
    stopped: str = ""  # why the current mode stopped improving
    iterations: int = 0
    loss_mode_at: int | None = None
    gradient_end: dict[str, Any] | None = None
    quasi_newton_iterations: int = 0
    mode_steps: dict[str, int] = field(default_factory=lambda: {m: 0 for m in MODES})
    grad_norms: list[float] = field(default_factory=list)
    progress: _Progress = field(default_factory=_Progress)

    def moved(self, point: _Point) -> None:
        self.point = point
        self.grad_norms.append(point.grad_norm)
        self.progress.add(point)


# ---------------------------------------------------------------------- the search
def find_critical_point(
    objective: Objective,
    theta: Tensor | None = None,
    *,
    grad_tol: float | None = None,
    kernel_rtol: float = DEFAULT_KERNEL_RTOL,
    loss_mode_index: float = 0.0,
    negative_rtol: float | None = None,
    gradient_budget: int | None = None,
    descend_after_stall: bool = False,
    quasi_newton_iter: int = 0,
    max_iter: int = 100,
    stall_window: int = 10,
    stall_factor: float = 0.9,
    pinv_rtol: float = DEFAULT_PINV_RTOL,
    max_tries: int = 12,
    accept: float = 1e-4,
    initial_radius: float | None = None,
    max_bytes: int = DEFAULT_EXACT_BUDGET_BYTES,
) -> SearchResult:
    """Search from ``theta`` for a point with :math:`\\|g\\| \\le` ``grad_tol`` with exact Hessians, and
    label where it ended (module docstring).

    Args:
        objective: any objective small enough for its exact Hessian (each iteration forms it).
        theta: the start (default ``objective.theta0``).
        grad_tol: "critical" when :math:`\\|g\\|` is at most this (default by dtype, as
            :func:`saddlescope.analyze`: 1e-6 in float64).
        kernel_rtol: the near-kernel cut: "gradient_flat" needs :math:`\\|Hg\\| / (\\|H\\|_2\\|g\\|) \\le`
            this. Keep it well below any penalty's :math:`w / \\|H\\|_2`.
        loss_mode_index: switch to trust-region steps on the loss once at most this share of the
            eigenvalues is below :math:`-` ``negative_rtol`` :math:`\\|H\\|_2` (0: only where no eigenvalue
            is resolvably negative).
        negative_rtol: see ``loss_mode_index`` (default: the dtype's zero band of :func:`saddlescope.analyze`).
        gradient_budget: Hessians in gradient mode, after which the search goes on in loss mode (None:
            no limit but ``max_iter``).
        descend_after_stall: when gradient mode stops improving with the gradient *not* in the
            near-kernel (so not gradient-flat), go on in loss mode instead of ending the search. Where
            gradient mode ended is kept in :attr:`SearchResult.gradient_end`.
        quasi_newton_iter: L-BFGS iterations on the loss when the search enters loss mode (0: none).
        max_iter: Hessians (iterations) at most, both modes together.
        stall_window, stall_factor: see :func:`stopped_improving`.
        pinv_rtol: eigenvalues with :math:`|\\lambda| \\le` ``pinv_rtol`` :math:`\\|H\\|_2` are left out of
            gradient-mode steps (the pseudo-inverse cutoff).
        max_tries: trial steps per Hessian before the mode has stopped improving.
        accept: the share of the model's predicted fall a step must achieve.
        initial_radius: the first trust region (default :math:`0.1\\,(1 + \\|\\theta\\|)`).
        max_bytes: memory budget of the exact Hessian (see :meth:`Objective.hessian`).

    Returns:
        A :class:`SearchResult`.

    Raises:
        saddlescope.errors.InvalidInputError: a threshold out of range.
    """
    start = time.perf_counter()
    theta = objective.theta0 if theta is None else objective.check_theta(theta)
    d_grad, d_rtol, _ = default_tolerances(objective.dtype)
    grad_tol = d_grad if grad_tol is None else grad_tol
    negative_rtol = d_rtol if negative_rtol is None else negative_rtol
    _check_arguments(
        {"grad_tol": grad_tol, "kernel_rtol": kernel_rtol, "loss_mode_index": loss_mode_index,
         "negative_rtol": negative_rtol, "stall_factor": stall_factor, "pinv_rtol": pinv_rtol, "accept": accept},
        {"kernel_rtol": kernel_rtol, "stall_factor": stall_factor, "accept": accept},
        {"max_iter": max_iter, "stall_window": stall_window, "max_tries": max_tries,
         **({} if gradient_budget is None else {"gradient_budget": gradient_budget})},
    )
    if loss_mode_index > 1:
        raise InvalidInputError(f"loss_mode_index must lie in [0, 1], got {loss_mode_index!r}")
    if isinstance(quasi_newton_iter, bool) or not isinstance(quasi_newton_iter, int) or quasi_newton_iter < 0:
        raise InvalidInputError(f"quasi_newton_iter must be an integer >= 0, got {quasi_newton_iter!r}")
    thresholds = {"grad_tol": float(grad_tol), "kernel_rtol": float(kernel_rtol),
                  "loss_mode_index": float(loss_mode_index), "negative_rtol": float(negative_rtol),
                  "gradient_budget": gradient_budget, "descend_after_stall": bool(descend_after_stall),
                  "quasi_newton_iter": quasi_newton_iter, "stall_window": stall_window,
                  "stall_factor": float(stall_factor), "pinv_rtol": float(pinv_rtol), "max_iter": max_iter,
                  "max_tries": max_tries, "accept": float(accept)}

    rules = _Rules(float(kernel_rtol), float(loss_mode_index), float(negative_rtol), gradient_budget,
                   bool(descend_after_stall))
    budget = _Budget(gradient_evals=1)
    state = _State(_Point.at(objective, theta.detach().clone()),
                   radius=initial_radius if initial_radius is not None else 0.1 * (1.0 + float(theta.norm())))
    start_point = state.point
    state.moved(start_point)
    curvature: _Curvature | None = None  # at state.point, when current
    stalled = False
    while state.point.grad_norm > grad_tol and state.iterations < max_iter:
        if curvature is None:
            curvature = _Curvature.at(objective, state.point, max_bytes)
            state.iterations += 1
        if curvature.scale == 0.0:
            state.stopped = "the Hessian is zero: no Newton-type step exists"
            break
        if not state.stopped and stopped_improving(state.progress, state.mode, stall_window, stall_factor,
                                                   curvature.hg_ratio() <= kernel_rtol):
            state.stopped = (f"in {state.mode} mode the best |grad| fell by less than a factor {stall_factor} over "
                             f"the last {stall_window} steps")
        action, why = next_mode(state.mode, state.stopped, curvature, state.mode_steps["gradient"], rules)
        if action == "stop":
            break
        if action == "switch":
            state.gradient_end = _gradient_phase_end(state.point, curvature, state.iterations, why, negative_rtol)
            state.mode, state.loss_mode_at, state.stopped, state.progress = "loss", state.iterations, "", _Progress()
            state.progress.add(state.point)
            if quasi_newton_iter:
                moved, state.quasi_newton_iterations = quasi_newton_descent(
                    objective, state.point, budget, max_iter=quasi_newton_iter, grad_tol=grad_tol)
                if state.quasi_newton_iterations:
                    state.moved(moved)
                    curvature = None
                    continue  # a new point: measure it afresh
        if state.mode == "loss":
            trial, state.radius = loss_step(objective, state.point, curvature, state.radius, budget, accept=accept,
                                            max_tries=max_tries)
        else:
            trial, state.damping = gradient_step(objective, state.point, curvature, state.damping, budget,
                                                 pinv_rtol=pinv_rtol, accept=accept, max_tries=max_tries)
        if trial is None:
            state.stopped = f"no {state.mode}-mode step was accepted in {max_tries} tries"
            continue  # the curvature is still current: decide at the top
        state.moved(trial)
        state.mode_steps[state.mode] += 1
        curvature = None

    point = state.point
    fraction = ratio = math.nan
    if point.grad_norm > grad_tol:
        if curvature is None:  # the last step moved: measure where the search ended
            curvature = _Curvature.at(objective, point, max_bytes)
        fraction, ratio = curvature.kernel_fraction(kernel_rtol), curvature.hg_ratio()
        stalled = bool(state.stopped)
    label, reason = label_search(point.grad_norm, grad_tol, stalled, ratio, fraction, kernel_rtol, state.stopped,
                                 max_iter)
    reason += f" after {state.iterations} Hessians, ending in {state.mode} mode"
    return SearchResult(
        label=label, reason=reason, theta=point.theta, loss=point.loss, grad_norm=point.grad_norm,
        start_loss=start_point.loss, start_grad_norm=start_point.grad_norm, kernel_fraction=fraction,
        hg_ratio=ratio, stalled=stalled, iterations=state.iterations, mode=state.mode,
        loss_mode_at=state.loss_mode_at, mode_steps=state.mode_steps,
        quasi_newton_iterations=state.quasi_newton_iterations, gradient_evals=budget.gradient_evals,
        grad_norms=state.grad_norms, thresholds=thresholds, seconds=time.perf_counter() - start,
        gradient_end=state.gradient_end,
    )
