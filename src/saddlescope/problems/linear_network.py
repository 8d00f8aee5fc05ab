r"""The two-layer linear network, whose critical points are all known (Baldi & Hornik 1989).

.. math::

    L(W_1, W_2) = \tfrac12 \| M - W_2 W_1 \|_F^2, \qquad W_1 \in \mathbb{R}^{p\times n},\;
    W_2 \in \mathbb{R}^{m\times p},\; M = U \Sigma V^\top.

With distinct singular values, every critical point has :math:`W_2 W_1 = U_J \Sigma_J V_J^\top` for a
subset :math:`J` of at most :math:`p` singular components (up to the invertible gauge
:math:`W_2 C, C^{-1} W_1`). Only :math:`J` = the top :math:`p` components is a minimum; every other
subset is a saddle. :meth:`TwoLayerLinear.critical_points` enumerates one balanced representative
(:math:`W_1 = \Sigma_J^{1/2} V_J^\top`, :math:`W_2 = U_J \Sigma_J^{1/2}`) per subset.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from saddlescope.errors import InvalidInputError
from saddlescope.objective import Objective


@dataclass(frozen=True)
class LinearCriticalPoint:
    """One enumerated critical point: the chosen singular components, theta and its loss."""

    subset: tuple[int, ...]
    theta: Tensor
    loss: float


class TwoLayerLinear:
    """:math:`\\tfrac12\\|M - W_2 W_1\\|^2` with a known target ``M`` (m x n) and hidden width ``p``.

    Args:
        m, n, p: output, input and hidden sizes (``p <= min(m, n)``).
        singular_values: distinct positive singular values of ``M`` (``min(m, n)`` of them), default
            ``min(m, n), ..., 2, 1``.
        seed: for the random orthogonal ``U`` and ``V``; ``rotate=False`` uses identities.
    """

    def __init__(
        self,
        m: int = 4,
        n: int = 4,
        p: int = 2,
        singular_values: Sequence[float] | None = None,
        *,
        seed: int = 0,
        rotate: bool = True,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        r = min(m, n)
        if not (1 <= p <= r):
            raise InvalidInputError(f"need 1 <= p <= min(m, n) = {r}, got p = {p}")
        sigma = torch.as_tensor(
            singular_values if singular_values is not None else [float(r - i) for i in range(r)],
            dtype=dtype,
        )
        if sigma.numel() != r or bool((sigma <= 0).any()) or len(set(sigma.tolist())) != r:
            raise InvalidInputError(f"need {r} distinct positive singular values, got {sigma.tolist()}")
        sigma, _ = torch.sort(sigma, descending=True)
        gen = torch.Generator().manual_seed(seed)
        if rotate:
            u, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=dtype))
            v, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=dtype))
        else:
            u, v = torch.eye(m, dtype=dtype), torch.eye(n, dtype=dtype)
        self.m, self.n, self.p, self.dtype = m, n, p, dtype
        self.sigma, self.u, self.v = sigma, u, v
        self.target = u[:, :r] @ torch.diag(sigma) @ v[:, :r].T
        self.n_params = p * n + m * p

    def unpack(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """``(W1, W2)`` from theta = [vec(W1), vec(W2)] (row-major)."""
        w1 = theta[: self.p * self.n].view(self.p, self.n)
        w2 = theta[self.p * self.n :].view(self.m, self.p)
        return w1, w2

    def pack(self, w1: Tensor, w2: Tensor) -> Tensor:
        return torch.cat([w1.reshape(-1), w2.reshape(-1)]).to(self.dtype)

    def loss(self, theta: Tensor) -> Tensor:
        w1, w2 = self.unpack(theta)
        return 0.5 * ((self.target - w2 @ w1) ** 2).sum()

    def objective(self, theta0: Tensor | None = None, seed: int = 0) -> Objective:
        """The objective, starting at ``theta0`` (default: small random weights)."""
        if theta0 is None:
            gen = torch.Generator().manual_seed(seed)
            theta0 = 0.1 * torch.randn(self.n_params, generator=gen, dtype=self.dtype)

        def two_layer_linear_loss(theta: Tensor) -> Tensor:
            return self.loss(theta)

        return Objective.from_function(two_layer_linear_loss, theta0, dtype=self.dtype)

    def critical_points(self) -> list[LinearCriticalPoint]:
        """One balanced critical point per subset ``J`` of at most ``p`` singular components."""
        r = self.sigma.numel()
        points = []
        for q in range(self.p + 1):
            for subset in itertools.combinations(range(r), q):
                w1 = torch.zeros(self.p, self.n, dtype=self.dtype)
                w2 = torch.zeros(self.m, self.p, dtype=self.dtype)
                for k, j in enumerate(subset):
                    root = self.sigma[j].sqrt()
                    w1[k] = root * self.v[:, j]
                    w2[:, k] = root * self.u[:, j]
                rest = [i for i in range(r) if i not in subset]
                loss = 0.5 * float((self.sigma[rest] ** 2).sum())
                points.append(LinearCriticalPoint(subset, self.pack(w1, w2), loss))
        return points

    def is_minimum(self, subset: Sequence[int]) -> bool:
        """Baldi & Hornik: the minimum picks exactly the top ``p`` components."""
        return tuple(sorted(subset)) == tuple(range(self.p))
