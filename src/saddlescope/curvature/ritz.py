"""Ritz pairs of a Lanczos decomposition: what every Krylov state (stored basis or two passes) returns."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["Ritz"]


@dataclass
class Ritz:
    r"""Rayleigh–Ritz on a Lanczos decomposition: pairs :math:`(\theta_i, y_i = V_j s_i)`.

    Attributes:
        values: ``theta``, ascending.
        coeffs: the ``s_i`` as columns (shape ``(j, j)``).
        estimates: ``beta |s_{j,i}|``, the residual ``||A y_i - theta_i y_i||`` in exact arithmetic.
        distinct: indices (ascending) of the pairs that are not numerical copies of another: without
            reorthogonalisation a converged Ritz value reappears ("ghosts", Paige 1976), and only one copy
            may stand for its eigenvalue. None: every pair (a reorthogonalised basis has no copies).
    """

    values: Tensor
    coeffs: Tensor
    estimates: Tensor
    distinct: Tensor | None = None
