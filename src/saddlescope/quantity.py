"""What a number is: exact, a bound (and on which side), or an estimate with its error.

A verdict's numbers come from very different computations. On the exact path ``lambda_min`` is an
eigenvalue of the dense Hessian, exact up to the products' rounding. On the iterative path the same
name may hold a converged Ritz value (an interval: a Rayleigh quotient bounds ``lambda_min`` from above,
the residual from below), or the first negative Rayleigh quotient that proved a saddle (only an upper
bound: ``lambda_min`` may lie far below it). The index from stochastic Lanczos quadrature is an
estimate with an error bar, and the counts it implies are fractions with an interval, not integers.
Every summary, JSON file and HTML page says which, from one :class:`Quantity` per number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

STATUSES = ("exact", "upper_bound", "lower_bound", "interval", "estimate")


@dataclass(frozen=True)
class Quantity:
    """A number together with what it is.

    Attributes:
        value: the number itself (for a bound, the bound; for an interval, the best point in it).
        status: ``"exact"`` (up to ``error``, the rounding), ``"upper_bound"`` / ``"lower_bound"`` (the
            true value is at most / at least ``value``), ``"interval"`` (in ``[low, high]``) or
            ``"estimate"`` (``value +- error``, with ``[low, high]`` the interval it implies).
        low, high: the interval, where there is one.
        error: the rounding of an exact number, or the error bar of an estimate.
        basis: how the number was obtained, in a few words.
    """

    value: float
    status: str
    low: float | None = None
    high: float | None = None
    error: float | None = None
    basis: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

    @classmethod
    def exact(cls, value: float, error: float | None = None, basis: str = "") -> Quantity:
        return cls(float(value), "exact", error=error, basis=basis)

    @classmethod
    def upper_bound(cls, value: float, basis: str = "") -> Quantity:
        return cls(float(value), "upper_bound", high=float(value), basis=basis)

    @classmethod
    def lower_bound(cls, value: float, basis: str = "") -> Quantity:
        return cls(float(value), "lower_bound", low=float(value), basis=basis)

    @classmethod
    def interval(cls, value: float, low: float, high: float, basis: str = "") -> Quantity:
        return cls(float(value), "interval", low=float(low), high=float(high), basis=basis)

    @classmethod
    def estimate(cls, value: float, error: float, basis: str = "", clip: tuple[float, float] | None = None) -> Quantity:
        """``value +- error``; ``clip`` bounds the implied interval (e.g. ``(0, 1)`` for a fraction)."""
        low, high = float(value) - float(error), float(value) + float(error)
        if clip is not None:
            low, high = max(low, clip[0]), min(high, clip[1])
        return cls(float(value), "estimate", low=low, high=high, error=float(error), basis=basis)

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "is": self.status, "low": self.low, "high": self.high,
                "error": self.error, "basis": self.basis}

    def text(self, spec: str = ".4g") -> str:
        """The number as a reader should take it, e.g. ``"<= -5.12 (upper bound)"``."""
        v = _fmt(self.value, spec)
        if self.status == "exact":
            return v if self.error is None else f"{v} (exact to +-{_fmt(self.error, '.2g')})"
        if self.status == "upper_bound":
            return f"<= {v} (upper bound)"
        if self.status == "lower_bound":
            return f">= {v} (lower bound)"
        if self.status == "interval":
            return f"in [{_fmt(self.low, spec)}, {_fmt(self.high, spec)}]"
        return f"{v} +- {_fmt(self.error, '.2g')} (estimate; [{_fmt(self.low, spec)}, {_fmt(self.high, spec)}])"


def _fmt(value: float | None, spec: str) -> str:
    if value is None:
        return "n/a"
    if not math.isfinite(value):
        return str(value)
    return format(value, spec)
