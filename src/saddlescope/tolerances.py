"""Default tolerances by dtype, shared by every layer that decides "zero"."""

from __future__ import annotations

import torch

# (grad_tol, rtol, atol) by dtype. rtol sits orders of magnitude above the rounding error of an
# autodiff Hessian and its eigendecomposition (about n * eps * max|lambda|), so a "negative"
# eigenvalue is never rounding noise; atol = 0 keeps the test invariant to the loss's scale.
DEFAULT_TOLERANCES: dict[torch.dtype, tuple[float, float, float]] = {
    torch.float64: (1e-6, 1e-9, 0.0),
    torch.float32: (1e-4, 1e-4, 0.0),
    torch.float16: (1e-2, 1e-2, 0.0),
    torch.bfloat16: (1e-2, 1e-2, 0.0),
}


def default_tolerances(dtype: torch.dtype) -> tuple[float, float, float]:
    """``(grad_tol, rtol, atol)`` used when the caller gives none."""
    return DEFAULT_TOLERANCES.get(dtype, DEFAULT_TOLERANCES[torch.float32])
