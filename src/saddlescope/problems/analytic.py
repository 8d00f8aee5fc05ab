"""Small analytic objectives with critical points known in closed form."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from saddlescope.objective import Objective


def seed_toy(theta0: Any = (0.0, 0.0), dtype: torch.dtype = torch.float64) -> Objective:
    r"""The seed toy: :math:`\hat y = w_1 w_2 x` on one sample :math:`(x, y) = (1, 1)`.

    :math:`L(w_1, w_2) = (1 - w_1 w_2)^2`. The origin is a saddle with
    :math:`H = [[0, -2], [-2, 0]]` (eigenvalues :math:`\pm 2`, escape direction
    :math:`\pm(1, 1)/\sqrt2`); the hyperbola :math:`w_1 w_2 = 1` is a valley of minima where
    :math:`H` is positive semi-definite with one zero eigenvalue (along the valley).
    """

    def seed_toy_loss(theta: Tensor) -> Tensor:
        return (1.0 - theta[0] * theta[1]) ** 2

    return Objective.from_function(seed_toy_loss, theta0, dtype=dtype)


class SeedToyModel(nn.Module):
    """The seed toy as a model: ``y = w1 * w2 * x`` with two scalar weights."""

    def __init__(self, w1: float = 0.0, w2: float = 0.0) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.tensor(float(w1)))
        self.w2 = nn.Parameter(torch.tensor(float(w2)))

    def forward(self, x: Tensor) -> Tensor:
        return self.w1 * self.w2 * x


def seed_toy_model(w1: float = 0.0, w2: float = 0.0) -> tuple[nn.Module, Any, tuple[Tensor, Tensor]]:
    """``(model, loss_fn, data)`` for :meth:`Objective.from_model`: the seed toy with MSE."""
    data = (torch.ones(1, 1), torch.ones(1, 1))
    return SeedToyModel(w1, w2), nn.functional.mse_loss, data


def saddle_quadratic(theta0: Any = (0.0, 0.0), dtype: torch.dtype = torch.float64) -> Objective:
    r""":math:`5x^2 - y^2`: a non-degenerate saddle at 0 with :math:`H = \mathrm{diag}(10, -2)`."""

    def saddle_quadratic_loss(theta: Tensor) -> Tensor:
        return 5.0 * theta[0] ** 2 - theta[1] ** 2

    return Objective.from_function(saddle_quadratic_loss, theta0, dtype=dtype)


def monkey_saddle(theta0: Any = (0.0, 0.0), dtype: torch.dtype = torch.float64) -> Objective:
    r"""The monkey saddle :math:`x^3 - 3xy^2`: :math:`H = 0` at the origin, which is a saddle
    only a higher-order probe can tell (the loss falls along :math:`-x`)."""

    def monkey_saddle_loss(theta: Tensor) -> Tensor:
        return theta[0] ** 3 - 3.0 * theta[0] * theta[1] ** 2

    return Objective.from_function(monkey_saddle_loss, theta0, dtype=dtype)


def rosenbrock(
    theta0: Any = (-1.2, 1.0), a: float = 1.0, b: float = 100.0, dtype: torch.dtype = torch.float64
) -> Objective:
    r"""Rosenbrock's function :math:`(a - x)^2 + b (y - x^2)^2`; its only minimum is :math:`(a, a^2)`,
    where :math:`H = [[2 + 8ba^2, -4ba], [-4ba, 2b]]`."""

    def rosenbrock_loss(theta: Tensor) -> Tensor:
        return (a - theta[0]) ** 2 + b * (theta[1] - theta[0] ** 2) ** 2

    return Objective.from_function(rosenbrock_loss, theta0, dtype=dtype)


def peano_surface(theta0: Any = (0.0, 0.0), dtype: torch.dtype = torch.float64) -> Objective:
    r"""Peano's surface :math:`(y - x^2)(y - 2x^2)`: at 0, :math:`H = \mathrm{diag}(0, 2)` and the loss
    rises along every straight line, yet the origin is a saddle (it falls along :math:`y = 1.5x^2`)."""

    def peano_loss(theta: Tensor) -> Tensor:
        return (theta[1] - theta[0] ** 2) * (theta[1] - 2.0 * theta[0] ** 2)

    return Objective.from_function(peano_loss, theta0, dtype=dtype)
