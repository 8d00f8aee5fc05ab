r"""Saddle-free Newton in a Krylov subspace: Dauphin, Pascanu, Gulcehre, Cho, Ganguli & Bengio
(2014), "Identifying and attacking the saddle point problem in high-dimensional non-convex
optimization" (NeurIPS), Algorithm 2.

Newton's step :math:`-H^{-1} g` is attracted by saddles: along an eigenvector of negative curvature it
moves *towards* the critical point. Replacing :math:`H` by :math:`|H|` (same eigenvectors, absolute
eigenvalues) keeps Newton's scaling and turns those directions into descent. In the Krylov subspace
of dimension :math:`k` built by Lanczos from :math:`g`,

.. math::

    V = [v_1, \dots, v_k],\quad T = V^\top H V = S \Lambda S^\top,\quad |T| = S |\Lambda| S^\top,

.. math::

    \Delta\theta = -\eta\, V \,(|T| + \delta I)^{-1} V^\top g .

Lanczos starts from :math:`v_1 = g / \|g\|`, so :math:`g = \|g\| v_1` lies in :math:`\mathrm{span}(V)`
and :math:`V^\top g = \|g\| e_1`: no part of the gradient is lost by the projection. What is
approximate is the curvature: :math:`|T|` is :math:`|H|` seen through the subspace. When the
subspace is invariant under :math:`H` (``k >= n``, or Lanczos breaks down because the remainder
vanishes, which ends the run early) the step is exactly :math:`-\eta(|H| + \delta I)^{-1} g`.
The damping :math:`\delta > 0` bounds the step along directions of near-zero curvature by
:math:`\eta \|g\| / \delta`.

At a critical point (:math:`\|g\| \le` ``g_thres``) every Newton-type step vanishes, and at
:math:`g = 0` the Krylov space from :math:`g` is empty. There Lanczos starts from a seeded random
unit vector instead; if the lowest Ritz pair :math:`(\lambda, u)` has :math:`\lambda` below the
noise floor of the finite-difference products (:math:`-\sqrt{\varepsilon}\max|\Lambda|`), the step is

.. math::

    \Delta\theta = r\, s\, u, \qquad s = -\mathrm{sign}(g^\top u) \ (+1 \text{ when } g^\top u = 0),

a move of length ``radius`` along negative curvature, from where the saddle-free steps amplify it
geometrically (by about :math:`1 + \eta|\lambda|/(|\lambda| + \delta)` per step). Otherwise the
usual step is taken in that random Krylov space (only the part of :math:`g` in it is used; at most
``g_thres`` is dropped).

Curvature comes from the closure alone: each Lanczos step is one finite-difference
Hessian-vector product (two closure calls, see :mod:`~saddlescope.escape.closure_curvature`), so a
step costs at most :math:`1 + 2k` closure calls.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from saddlescope.escape.closure_curvature import (
    Closure,
    ClosureCurvature,
    ClosureOptimizer,
    KrylovProjection,
    check_count,
    check_number,
    curvature_noise_floor,
    krylov_projection,
    random_unit_vector,
    require_closure,
    resolve_seed,
    seeded_generator,
)
from saddlescope.escape.negative_curvature import descent_sign


def saddle_free_direction(projection: KrylovProjection, grad: Tensor, damping: float) -> Tensor:
    """:math:`-V (|T| + \\delta I)^{-1} V^\\top g`, the saddle-free Newton direction before ``lr``.

    Args:
        projection: the Krylov basis (rows of ``projection.basis``) and :math:`T`.
        grad: the flat gradient.
        damping: :math:`\\delta > 0`, added to the absolute eigenvalues of :math:`T`.
    """
    values, coords = torch.linalg.eigh(projection.projected)
    reduced = projection.basis @ grad
    solved = coords @ ((coords.T @ reduced) / (values.abs() + damping))
    return -(projection.basis.T @ solved)


class SaddleFreeNewton(ClosureOptimizer):
    """Saddle-free Newton steps from a Lanczos subspace of finite-difference HVPs (Dauphin et al. 2014).

    Args:
        params: parameters or param groups; groups may set their own ``lr``, which scales their
            slice of the step.
        lr: step size :math:`\\eta` (1 is the full saddle-free Newton step).
        damping: :math:`\\delta > 0` added to :math:`|T|`.
        krylov_dim: Lanczos steps per optimizer step (capped at the number of parameters).
        g_thres: at or below this gradient norm the point is treated as critical (see the module).
        radius: length of the move along negative curvature at a critical point.
        fd_step: finite-difference displacement length; default
            :math:`\\varepsilon^{1/3}\\max(1, \\|\\theta\\|)`.
        seed: random Lanczos starts at critical points are drawn from a generator seeded by
            ``(seed, k)`` for the k-th draw; default a seed drawn from torch's global generator.

    ``step(closure)`` returns the closure's loss at the start of the step. ``state`` (of the first
    parameter) holds ``step``, ``closure_calls``, ``random_draws``, ``escapes`` (moves along negative
    curvature at critical points), ``basis_size`` (the Krylov dimension of the last step) and
    ``invariant`` (whether that basis spans an invariant subspace of :math:`H`: Lanczos broke down,
    or the basis spans every direction; the step is then exact).
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1.0,
        damping: float = 1e-1,
        krylov_dim: int = 10,
        g_thres: float = 1e-6,
        radius: float = 1e-2,
        fd_step: float | None = None,
        seed: int | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            damping=damping,
            krylov_dim=krylov_dim,
            g_thres=g_thres,
            radius=radius,
            fd_step=fd_step,
            seed=resolve_seed(seed),
        )
        super().__init__(params, defaults)

    def _check_hyper(self, group: dict[str, Any]) -> None:
        check_number("lr", group["lr"])
        check_number("damping", group["damping"])
        check_count("krylov_dim", group["krylov_dim"], low=1)
        check_number("g_thres", group["g_thres"], strict=False)
        check_number("radius", group["radius"])
        if group["fd_step"] is not None:
            check_number("fd_step", group["fd_step"])
        resolve_seed(group["seed"])

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Any:
        """One saddle-free Newton step; returns the loss before it."""
        closure = require_closure(closure, type(self).__name__)
        hyper = self.param_groups[0]
        state = self._global_state(
            {
                "step": 0,
                "closure_calls": 0,
                "random_draws": 0,
                "escapes": 0,
                "basis_size": 0,
                "invariant": False,
            }
        )
        params = self._params
        curvature = ClosureCurvature(closure, params, hyper["fd_step"])
        loss, grad = curvature.loss_and_grad()
        floor = curvature_noise_floor(params)
        critical = float(grad.norm()) <= hyper["g_thres"]
        if critical:
            generator = seeded_generator(hyper["seed"], state["random_draws"])
            state["random_draws"] += 1
            start = random_unit_vector(grad.numel(), generator, grad.device)
        else:
            start = grad
        projection = krylov_projection(curvature.hvp, start, hyper["krylov_dim"], floor)
        state["basis_size"] = projection.basis.shape[0]
        state["invariant"] = projection.invariant
        escape = self._negative_curvature_move(projection, grad, floor) if critical else None
        if escape is not None:
            self._add_flat(hyper["radius"] * escape, scale_by_lr=False)
            state["escapes"] += 1
        else:
            self._add_flat(saddle_free_direction(projection, grad, hyper["damping"]), scale_by_lr=True)
        state["step"] += 1
        state["closure_calls"] += curvature.calls
        return loss

    @staticmethod
    def _negative_curvature_move(projection: KrylovProjection, grad: Tensor, floor: float) -> Tensor | None:
        """The unit lowest Ritz vector, signed not to climb, if its Ritz value is clearly negative."""
        values, vectors = projection.ritz_pairs()
        if not float(values[0]) < -floor * float(values.abs().max()):
            return None
        direction = vectors[:, 0]
        return descent_sign(grad, direction) * direction
