"""Default tolerances by dtype, shared by every layer that decides "zero"."""

from __future__ import annotations

import torch

# Eigenvalues computed from Hessian-vector products in a model dtype agree with float64 ones to about
# PRODUCT_ROUNDING_EPS * eps(dtype) * ||H||: the products' rounding, not the float64 recurrence, sets
# the error. On digits MLPs (1,210-2,410 parameters, exact and Lanczos alike) we measured up to 44
# (float32), 11 (bfloat16) and 32 (float16); bench/precision.py repeats it.
PRODUCT_ROUNDING_EPS = 64

# (grad_tol, rtol, atol) by dtype. rtol sits above the rounding error of the Hessian's eigenvalues
# (PRODUCT_ROUNDING_EPS * eps * max|lambda|), so a "negative" eigenvalue is never rounding noise:
# 1e-4 is 13x that bound in float32; in half precision the bound itself is the threshold, which
# resolves only eigenvalues above 50% (bfloat16) or 6% (float16) of the largest. atol = 0 keeps the
# test invariant to the loss's scale.
DEFAULT_TOLERANCES: dict[torch.dtype, tuple[float, float, float]] = {
    torch.float64: (1e-6, 1e-9, 0.0),
    torch.float32: (1e-4, 1e-4, 0.0),
    torch.float16: (1e-2, PRODUCT_ROUNDING_EPS * torch.finfo(torch.float16).eps, 0.0),
    torch.bfloat16: (1e-2, PRODUCT_ROUNDING_EPS * torch.finfo(torch.bfloat16).eps, 0.0),
}


def default_tolerances(dtype: torch.dtype) -> tuple[float, float, float]:
    """``(grad_tol, rtol, atol)`` used when the caller gives none."""
    return DEFAULT_TOLERANCES.get(dtype, DEFAULT_TOLERANCES[torch.float32])


def precision_bound(dtype: torch.dtype, spectral_norm: float) -> float:
    """How far eigenvalues from products in ``dtype`` may be from exact ones (see above)."""
    return PRODUCT_ROUNDING_EPS * torch.finfo(dtype).eps * spectral_norm
