"""Exact curvature for small problems: the full Hessian and its complete eigendecomposition.

The Hessian comes from :meth:`Objective.hessian` (batched Hessian-vector products through one
reused gradient graph); the eigendecomposition is LAPACK's divide-and-conquer ``syevd``
(SciPy on the CPU, measured 1.5x faster than ``torch.linalg.eigh`` there; torch elsewhere).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from saddlescope.objective import DEFAULT_EXACT_BUDGET_BYTES, Objective


@dataclass
class Spectrum:
    """All eigenpairs of a symmetric matrix, eigenvalues ascending.

    Attributes:
        eigenvalues: shape ``(n,)``, ascending.
        eigenvectors: shape ``(n, n)``, column ``i`` belongs to ``eigenvalues[i]``; None if not asked.
        seconds: wall time of each stage (``"hessian"``, ``"eigh"``).
        hvp_count: Hessian-vector products spent building the matrix.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor | None
    seconds: dict[str, float] = field(default_factory=dict)
    hvp_count: int = 0

    def to_dict(self) -> dict:
        return {
            "eigenvalues": self.eigenvalues.tolist(),
            "seconds": dict(self.seconds),
            "hvp_count": self.hvp_count,
        }


def eigh_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision :func:`symmetric_eigh` solves in: float32/float64 as given, half types in float64
    (no eigensolver takes them)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float64


def symmetric_eigh(matrix: Tensor, vectors: bool = True) -> tuple[Tensor, Tensor | None]:
    """Eigenvalues (ascending) and, if asked, eigenvectors of a symmetric matrix."""
    matrix = matrix.to(eigh_dtype(matrix.dtype))
    if matrix.device.type == "cpu" and matrix.dtype in (torch.float32, torch.float64):
        import scipy.linalg

        arr = matrix.detach().numpy()
        if vectors:
            vals, vecs = scipy.linalg.eigh(arr, driver="evd", check_finite=False)
            return torch.from_numpy(np.ascontiguousarray(vals)), torch.from_numpy(vecs)
        vals = scipy.linalg.eigh(arr, eigvals_only=True, driver="evd", check_finite=False)
        return torch.from_numpy(np.ascontiguousarray(vals)), None
    if vectors:
        vals, vecs = torch.linalg.eigh(matrix)
        return vals, vecs
    return torch.linalg.eigvalsh(matrix), None


def exact_spectrum(
    objective: Objective,
    theta: Tensor,
    *,
    vectors: bool = True,
    max_bytes: int = DEFAULT_EXACT_BUDGET_BYTES,
    progress: Callable[[int, int], None] | None = None,
    chunk_size: int | None = None,
) -> Spectrum:
    """The full Hessian spectrum of ``objective`` at ``theta`` (``chunk_size``: columns per batched
    product in the build, see :meth:`Objective.hessian`).

    Raises:
        saddlescope.errors.TooLargeError: the matrix would not fit in ``max_bytes``.
    """
    start = time.perf_counter()
    hessian = objective.hessian(theta, max_bytes=max_bytes, progress=progress, chunk_size=chunk_size)
    built = time.perf_counter()
    values, vecs = symmetric_eigh(hessian, vectors=vectors)
    done = time.perf_counter()
    return Spectrum(
        # Half-precision models keep the solver's eigenvalues: rounding them to bf16 would add an
        # error as large as the Hessian's own.
        eigenvalues=values.to(eigh_dtype(objective.dtype)),
        eigenvectors=None if vecs is None else vecs.to(objective.dtype),
        seconds={"hessian": built - start, "eigh": done - built},
        hvp_count=objective.n_params,
    )
