r"""Negative-curvature descent: a gradient step, or a step along the most negative curvature when
the gradient is small.

Where :math:`\|g\|` is large a gradient step makes progress; where it is small (near a critical
point) the second-order term decides, and a unit eigenvector :math:`u` of :math:`\lambda < 0`
descends: :math:`L(\theta + \alpha d) \approx L(\theta) + \alpha g^\top d + \tfrac12 \lambda\alpha^2`.
The rule (the curvature step of Nesterov & Polyak 2006, "Cubic regularization of Newton method and
its global performance", as used in second-order escape methods, e.g. Carmon et al. 2018 and
Royer & Wright 2018):

.. math::

    \Delta\theta =
    \begin{cases}
        \alpha\, s\, u, \quad \alpha = c\,|\lambda|, \quad s = -\mathrm{sign}(g^\top u)
            & \text{if } \|g\| \le g_{thres} \text{ and } \lambda < -\epsilon, \\
        -\eta\, g & \text{otherwise,}
    \end{cases}

with :math:`s = +1` when :math:`g^\top u = 0`, so :math:`g^\top \Delta\theta \le 0`. With
:math:`c = 2/\rho` (:math:`\rho` a Lipschitz constant of the Hessian) :math:`\alpha` minimises the
cubic model :math:`\tfrac12\lambda\alpha^2 + \tfrac{\rho}{6}\alpha^3` along :math:`u`, which
guarantees a decrease of at least :math:`2|\lambda|^3 / (3\rho^2)`; ``curvature_lr`` is :math:`c`, and
``curvature_step`` replaces :math:`\alpha` by a fixed length.

:math:`(\lambda, u)` is the lowest Ritz pair of a few Lanczos steps (finite-difference HVPs, from a
seeded random start since :math:`g` is small), and :math:`\lambda` is then recomputed as the Rayleigh
quotient :math:`u^\top H u` with one more product: a Ritz value is only as good as the basis's
orthogonality, and the step length and the test :math:`\lambda < -\epsilon` use it. A curvature step
costs :math:`1 + 2(k + 1)` closure calls, a gradient step one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from saddlescope.escape.closure_curvature import (
    Closure,
    ClosureCurvature,
    ClosureOptimizer,
    check_count,
    check_number,
    curvature_noise_floor,
    krylov_projection,
    random_unit_vector,
    require_closure,
    resolve_seed,
    seeded_generator,
)


def descent_sign(grad: Tensor, direction: Tensor) -> float:
    """The sign :math:`s` with :math:`g^\\top (s\\,d) \\le 0` (``+1`` when :math:`g^\\top d = 0`)."""
    return -1.0 if float(grad @ direction) > 0 else 1.0


class NegativeCurvatureDescent(ClosureOptimizer):
    """Gradient descent that steps along the most negative curvature near critical points.

    Args:
        params: parameters or param groups; groups may set their own ``lr`` (the gradient step's).
        lr: gradient step size :math:`\\eta`.
        g_thres: look for negative curvature only when :math:`\\|g\\|` is at most this.
        eps: take the curvature step only when :math:`\\lambda < -\\epsilon`.
        krylov_dim: Lanczos steps for :math:`(\\lambda, u)` (capped at the number of parameters).
        curvature_lr: :math:`c` in :math:`\\alpha = c|\\lambda|` (``2/rho`` is the cubic model's step).
        curvature_step: a fixed step length :math:`\\alpha` instead of :math:`c|\\lambda|`.
        fd_step: finite-difference displacement length; default
            :math:`\\varepsilon^{1/3}\\max(1, \\|\\theta\\|)`.
        seed: Lanczos starts are drawn from a generator seeded by ``(seed, k)`` for the k-th draw;
            default a seed drawn from torch's global generator.

    ``step(closure)`` returns the closure's loss at the start of the step. ``state`` (of the first
    parameter) holds ``step``, ``closure_calls``, ``random_draws``, ``curvature_steps`` and
    ``lambda_min`` (the last confirmed :math:`\\lambda`, or ``None``).
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-2,
        g_thres: float = 1e-3,
        eps: float = 1e-4,
        krylov_dim: int = 10,
        curvature_lr: float = 0.5,
        curvature_step: float | None = None,
        fd_step: float | None = None,
        seed: int | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            g_thres=g_thres,
            eps=eps,
            krylov_dim=krylov_dim,
            curvature_lr=curvature_lr,
            curvature_step=curvature_step,
            fd_step=fd_step,
            seed=resolve_seed(seed),
        )
        super().__init__(params, defaults)

    def _check_hyper(self, group: dict[str, Any]) -> None:
        check_number("lr", group["lr"])
        check_number("g_thres", group["g_thres"], strict=False)
        check_number("eps", group["eps"], strict=False)
        check_count("krylov_dim", group["krylov_dim"], low=1)
        check_number("curvature_lr", group["curvature_lr"])
        for name in ("curvature_step", "fd_step"):
            if group[name] is not None:
                check_number(name, group[name])
        resolve_seed(group["seed"])

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Any:
        """A curvature step near a strict saddle, else a gradient step; returns the loss before it."""
        closure = require_closure(closure, type(self).__name__)
        hyper = self.param_groups[0]
        state = self._global_state(
            {"step": 0, "closure_calls": 0, "random_draws": 0, "curvature_steps": 0, "lambda_min": None}
        )
        curvature = ClosureCurvature(closure, self._params, hyper["fd_step"])
        loss, grad = curvature.loss_and_grad()
        move = None
        if float(grad.norm()) <= hyper["g_thres"]:
            move = self._curvature_move(curvature, grad, hyper, state)
        if move is not None:
            self._add_flat(move, scale_by_lr=False)
            state["curvature_steps"] += 1
        else:
            self._add_flat(-grad, scale_by_lr=True)
        state["step"] += 1
        state["closure_calls"] += curvature.calls
        return loss

    def _curvature_move(
        self, curvature: ClosureCurvature, grad: Tensor, hyper: dict[str, Any], state: dict[str, Any]
    ) -> Tensor | None:
        """:math:`\\alpha s u` if the confirmed lowest curvature is below ``-eps``, else ``None``."""
        generator = seeded_generator(hyper["seed"], state["random_draws"])
        state["random_draws"] += 1
        start = random_unit_vector(grad.numel(), generator, grad.device)
        floor = curvature_noise_floor(self._params)
        projection = krylov_projection(curvature.hvp, start, hyper["krylov_dim"], floor)
        _, vectors = projection.ritz_pairs()
        direction = vectors[:, 0]
        lambda_min = float(direction @ curvature.hvp(direction))
        state["lambda_min"] = lambda_min
        if not lambda_min < -hyper["eps"]:
            return None
        alpha = hyper["curvature_step"]
        if alpha is None:
            alpha = hyper["curvature_lr"] * abs(lambda_min)
        return alpha * descent_sign(grad, direction) * direction
