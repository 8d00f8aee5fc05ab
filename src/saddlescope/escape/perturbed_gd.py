r"""Perturbed gradient descent: Jin, Ge, Netrapalli, Kakade & Jordan (2017),
"How to Escape Saddle Points Efficiently" (ICML), Algorithm 2.

Gradient descent stays forever at a saddle where :math:`g = 0`. Perturbed GD adds noise drawn
uniformly from a ball whenever the gradient is small and no perturbation happened recently; the
noise has a component along any negative-curvature direction, which gradient descent then
amplifies. At step :math:`t`, with :math:`t_{noise}` the step of the last perturbation:

.. math::

    \text{if } \|\nabla f(x_t)\| \le g_{thres} \text{ and } t - t_{noise} > t_{thres}:\quad
    x_t \leftarrow x_t + \xi_t,\ \ \xi_t \sim \mathrm{Uniform}(\mathbb{B}_0(r)),\ \ t_{noise} \leftarrow t

.. math::

    x_{t+1} = x_t - \eta \nabla f(x_t)

As in the paper, the gradient step of a perturbed iteration is taken from the perturbed point (a
second closure call). The paper's stopping test (return when a perturbation did not lower the loss
by ``f_thres`` within ``t_thres`` steps) is an algorithm's termination rule, not an optimizer's;
``state`` records when perturbations happened instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from saddlescope.escape.closure_curvature import (
    WORK_DTYPE,
    Closure,
    ClosureCurvature,
    ClosureOptimizer,
    check_count,
    check_number,
    random_unit_vector,
    require_closure,
    resolve_seed,
    seeded_generator,
)


def uniform_ball_sample(n: int, radius: float, generator: torch.Generator) -> Tensor:
    """A point uniform in the ball of ``radius`` in :math:`\\mathbb{R}^n` (``float64``, CPU).

    Uniform *in* the ball, not on its sphere: a normal direction normalised, at distance
    :math:`r U^{1/n}` with :math:`U \\sim \\mathrm{Uniform}(0, 1)`, since the volume within
    distance :math:`s` grows as :math:`s^n`.
    """
    direction = random_unit_vector(n, generator, torch.device("cpu"))
    distance = radius * float(torch.rand((), generator=generator, dtype=WORK_DTYPE)) ** (1.0 / n)
    return distance * direction


class PerturbedGD(ClosureOptimizer):
    """Gradient descent with a random kick from a ball when the gradient is small (Jin et al. 2017).

    Args:
        params: parameters or param groups; groups may set their own ``lr``.
        lr: step size :math:`\\eta`.
        g_thres: perturb only when :math:`\\|\\nabla f\\|` (over all parameters) is at most this.
        radius: radius :math:`r` of the ball the perturbation is drawn from.
        t_thres: after a perturbation at step :math:`t_{noise}`, the next one may come only at a step
            :math:`t > t_{noise} + t_{thres}` (an escape period of ``t_thres`` steps).
        seed: the k-th perturbation is drawn from a generator seeded by ``(seed, k)``, so runs are
            reproducible and a ``state_dict`` round trip continues the same sequence; default a seed
            drawn from torch's global generator.

    ``step(closure)`` returns the closure's loss at the start of the step. ``state`` (of the first
    parameter) holds ``step``, ``closure_calls``, ``perturbations`` and ``last_perturbation`` (the
    step index of the latest one, or ``None``).
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-2,
        g_thres: float = 1e-3,
        radius: float = 1e-2,
        t_thres: int = 10,
        seed: int | None = None,
    ) -> None:
        defaults = dict(lr=lr, g_thres=g_thres, radius=radius, t_thres=t_thres, seed=resolve_seed(seed))
        super().__init__(params, defaults)

    def _check_hyper(self, group: dict[str, Any]) -> None:
        check_number("lr", group["lr"])
        check_number("g_thres", group["g_thres"], strict=False)
        check_number("radius", group["radius"])
        check_count("t_thres", group["t_thres"], low=0)
        resolve_seed(group["seed"])

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Any:
        """One perturbed-gradient-descent step; returns the loss before it."""
        closure = require_closure(closure, type(self).__name__)
        hyper = self.param_groups[0]
        state = self._global_state(
            {"step": 0, "closure_calls": 0, "perturbations": 0, "last_perturbation": None}
        )
        params = self._params
        curvature = ClosureCurvature(closure, params)
        loss, grad = curvature.loss_and_grad()
        t, last = state["step"], state["last_perturbation"]
        if float(grad.norm()) <= hyper["g_thres"] and (last is None or t - last > hyper["t_thres"]):
            generator = seeded_generator(hyper["seed"], state["perturbations"])
            noise = uniform_ball_sample(grad.numel(), hyper["radius"], generator)
            self._add_flat(noise.to(grad.device), scale_by_lr=False)
            state["perturbations"] += 1
            state["last_perturbation"] = t
            _, grad = curvature.loss_and_grad()  # the paper steps from the perturbed point
        self._add_flat(-grad, scale_by_lr=True)
        state["step"] = t + 1
        state["closure_calls"] += curvature.calls
        return loss
