"""Every number the objective hands up is finite, or a clear error says where it was not."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from saddlescope.errors import NonFiniteLossError

__all__ = ["all_finite", "finite"]


def all_finite(t: Tensor) -> bool:
    """Is every entry of ``t`` finite? A NaN or inf anywhere makes the sum NaN or inf, so a finite sum
    settles it in one reduction; only a sum that is not finite (a non-finite entry, or finite entries
    whose sum overflows) is checked entry by entry. ``torch.isfinite(t).all()`` writes a boolean tensor
    as long as ``t``: about 1 s at 124M entries on one CPU thread, against 2.3 s for a product."""
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


def finite(value: Tensor, what: str, theta: Tensor) -> Tensor:
    """``value`` (the loss, gradient, a product or the Hessian at ``theta``) if it is finite, else a
    :class:`~saddlescope.errors.NonFiniteLossError` naming ``what``."""
    if not all_finite(value):
        raise NonFiniteLossError(
            f"the {what} is not finite (NaN or inf) at theta with norm {float(theta.norm()):.3g}; "
            "check the data, the learning rate that led here, or use dtype=torch.float64"
        )
    return value
