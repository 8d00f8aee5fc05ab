r"""The verdict's record: :class:`CriticalPoint`, the thresholds it used (:class:`Tolerances`), and the
second-order test on a spectrum (:func:`classify_spectrum`), shared by both paths of
:func:`~saddlescope.critical.analyze`.

An eigenvalue counts as zero when :math:`|\lambda| \le` ``rtol`` :math:`\cdot\max|\lambda| +` ``atol``.
All positive: ``"minimum"``; all negative: ``"maximum"``; both signs: ``"saddle"``; zeros and at most one
sign: ``"degenerate"``. A point whose gradient exceeds ``grad_tol`` is ``"not_critical"`` whatever its
curvature (:func:`not_critical`), and an escape direction is signed to descend (:func:`descent_sign`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from saddlescope.curvature.index import IndexEstimate
from saddlescope.display import critical_point_html
from saddlescope.path_plan import PathPlan
from saddlescope.probe import (
    ProbeResult,
)
from saddlescope.quantity import Quantity
from saddlescope.tolerances import precision_bound

__all__ = ["DEFAULT_PROBE_RADII", "KINDS", "CriticalPoint", "Tolerances", "classify_spectrum", "descent_sign",
           "not_critical"]


KINDS = ("minimum", "maximum", "saddle", "degenerate", "inconclusive", "not_critical")


DEFAULT_PROBE_RADII = (1e-3, 1e-2, 1e-1)


@dataclass(frozen=True)
class Tolerances:
    """The thresholds a verdict used.

    Attributes:
        grad_tol: a point is critical when ``grad_norm <= grad_tol``.
        rtol, atol: an eigenvalue is zero when ``|lambda| <= rtol * max|lambda| + atol``.
        zero_threshold: that bound evaluated on this spectrum.
        probe_radii: distances probed along null directions of a degenerate point.
    """

    grad_tol: float
    rtol: float
    atol: float
    zero_threshold: float
    probe_radii: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "grad_tol": self.grad_tol,
            "rtol": self.rtol,
            "atol": self.atol,
            "zero_threshold": self.zero_threshold,
            "probe_radii": list(self.probe_radii),
        }


@dataclass
class CriticalPoint:
    """The verdict at one point, with everything it was based on.

    Attributes:
        kind: ``"minimum"``, ``"maximum"``, ``"saddle"``, ``"degenerate"`` (second-order test
            inconclusive), ``"inconclusive"`` (iterative path: the eigensolver did not settle it) or
            ``"not_critical"``.
        curvature_kind: what the eigenvalue test alone says (before probing; also set when
            the point is not critical: ``"saddle"`` there means negative curvature is present).
        resolved_by: ``"gradient"`` (not critical), ``"eigenvalues"``, ``"certificate"`` (a Rayleigh
            quotient confirmed by a product: the iterative solver's first negative one, or, on the exact
            path, an eigenvalue inside the zero band but beyond rounding, see :mod:`saddlescope.probe`),
            ``"probe"``, or ``"unresolved"`` (degenerate and probing could not decide).
        reason: one sentence saying why.
        loss, grad_norm: at ``theta``.
        eigenvalues: ascending.
        n_negative, n_zero, n_positive: counts under the zero threshold; None on the iterative path
            unless the verdict proves them (an estimate gives fractions with an interval, in
            ``quantities``, never integer counts).
        min_ratio: ``n_positive / n``; index: ``n_negative / n`` (iterative path: the estimate; NaN
            when not estimated).
        escape_direction: unit vector of strictly negative curvature (the most negative eigenvector,
            signed to descend), or the probe's decreasing direction; None when there is none.
        escape_curvature: the Rayleigh quotient ``u^T H u`` of ``escape_direction`` (None for a probe
            direction, whose decrease is of higher order).
        top_direction: unit eigenvector of the largest eigenvalue.
        method: ``"exact"`` or ``"lanczos"``; hvp_count: Hessian-vector products spent.
        lanczos: iterative path: the top and bottom eigensolver runs (residuals, convergence).
        index_estimate: iterative path: the :class:`IndexEstimate` behind ``index``/``min_ratio``.
        dtype: the model's precision (products, gradient); eigensolver_dtype: the precision of the
            eigendecomposition (the Lanczos recurrence on the iterative path).
        notes: what the computation had to work around (e.g. the math attention kernel).
        quantities: what each headline number is (:class:`~saddlescope.quantity.Quantity`: exact, a
            bound and its side, an interval, or an estimate with its error): ``lambda_min``,
            ``lambda_max``, ``index``, ``min_ratio`` and the fractions ``negative``, ``zero``,
            ``positive``.
        residuals, converged: iterative path: each Ritz value's true residual ``||Hv - theta v||``
            (an eigenvalue lies within it) and whether it met the tolerance, aligned with ``eigenvalues``.
        path_plan: how ``analyze(exact=None)`` chose the path (:class:`~saddlescope.path_plan.PathPlan`).
        graph_plan: which data batches' gradient graphs the products reused and which they rebuilt
            (``GraphPlan.to_dict()`` of :mod:`saddlescope.objective`).
        escape_sharpening: what :func:`~saddlescope.verdict.sharpen.sharpen_escape` did to a certificate's
            direction (None if it was not asked): the certificate's and the new direction's curvature, the bound on
            lambda_min and the fraction of it the direction reaches, products spent.
    """

    kind: str
    curvature_kind: str
    resolved_by: str
    reason: str
    loss: float
    grad_norm: float
    eigenvalues: Tensor
    n_params: int
    n_negative: int | None
    n_zero: int | None
    n_positive: int | None
    min_ratio: float
    index: float
    escape_direction: Tensor | None
    escape_curvature: float | None
    top_direction: Tensor | None
    theta: Tensor
    tolerances: Tolerances
    probe: ProbeResult | None = None
    method: str = "exact"
    mode: str = "function"
    dtype: str = "torch.float64"
    seed: int = 0
    hvp_count: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    lanczos: dict[str, Any] | None = None
    index_estimate: IndexEstimate | None = None
    eigensolver_dtype: str = "torch.float64"
    notes: list[str] = field(default_factory=list)
    quantities: dict[str, Quantity] = field(default_factory=dict)
    residuals: Tensor | None = None
    converged: Tensor | None = None
    escape_sharpening: dict[str, Any] | None = None
    path_plan: PathPlan | None = None
    graph_plan: dict[str, Any] | None = None

    @property
    def lambda_min(self) -> float:
        return float(self.eigenvalues[0])

    @property
    def lambda_max(self) -> float:
        return float(self.eigenvalues[-1])

    def precision(self) -> dict[str, Any]:
        """The model's and the eigensolver's dtypes, and the rounding error the model's dtype puts
        on each eigenvalue (:func:`saddlescope.tolerances.precision_bound`)."""
        model_dtype = getattr(torch, self.dtype.removeprefix("torch."))
        scale = float(self.eigenvalues.abs().max())
        return {"model": self.dtype, "eigensolver": self.eigensolver_dtype,
                "eigenvalue_rounding": precision_bound(model_dtype, scale)}

    def to_dict(self, vectors: bool | None = None) -> dict[str, Any]:
        """Every number of the verdict as JSON-ready Python values.

        Args:
            vectors: include ``theta``, ``escape_direction`` and ``top_direction``; default when
                there are at most 10,000 parameters.
        """
        if vectors is None:
            vectors = self.n_params <= 10_000
        out: dict[str, Any] = {
            "kind": self.kind,
            "curvature_kind": self.curvature_kind,
            "resolved_by": self.resolved_by,
            "reason": self.reason,
            "loss": self.loss,
            "grad_norm": self.grad_norm,
            "n_params": self.n_params,
            "lambda_min": self.lambda_min,
            "lambda_max": self.lambda_max,
            "n_negative": self.n_negative,
            "n_zero": self.n_zero,
            "n_positive": self.n_positive,
            "min_ratio": self.min_ratio,
            "index": self.index,
            "escape_curvature": self.escape_curvature,
            "has_escape_direction": self.escape_direction is not None,
            "tolerances": self.tolerances.to_dict(),
            "probe": None if self.probe is None else self.probe.to_dict(vectors),
            "method": self.method,
            "mode": self.mode,
            "dtype": self.dtype,
            "precision": self.precision(),
            "notes": list(self.notes),
            "seed": self.seed,
            "hvp_count": self.hvp_count,
            "seconds": dict(self.seconds),
            "lanczos": self.lanczos,
            "index_estimate": None if self.index_estimate is None else self.index_estimate.to_dict(),
            "eigenvalues": self.eigenvalues.tolist(),
            "eigenvalue_residuals": None if self.residuals is None else self.residuals.tolist(),
            "eigenvalues_converged": None if self.converged is None else self.converged.tolist(),
            "quantities": {name: q.to_dict() for name, q in self.quantities.items()},
            "escape_sharpening": self.escape_sharpening,
            "path_plan": None if self.path_plan is None else self.path_plan.to_dict(),
            "graph_plan": self.graph_plan,
        }
        if vectors:
            out["theta"] = self.theta.tolist()
            out["escape_direction"] = (
                None if self.escape_direction is None else self.escape_direction.tolist()
            )
            out["top_direction"] = None if self.top_direction is None else self.top_direction.tolist()
        return out

    def _repr_html_(self) -> str:
        return critical_point_html(self)  # Jupyter: verdict first

    def summary(self) -> str:
        """A few human-readable lines."""
        lines = [
            f"verdict: {self.kind} ({self.reason})",
            (f"loss {self.loss:.6g}   |grad| {self.grad_norm:.3g}   n = {self.n_params}   "
             f"method {self.method}, {self.hvp_count} HVPs"),
        ]
        if self.method == "exact":
            lines.append(
                f"eigenvalues: min {self.lambda_min:.4g}, max {self.lambda_max:.4g}; "
                f"{self.n_negative} negative, {self.n_zero} zero, {self.n_positive} positive "
                f"(zero means |lambda| <= {self.tolerances.zero_threshold:.3g})"
            )
            lines.append(f"min ratio {self.min_ratio:.4f}   index {self.index:.4f}")
        else:
            q = self.quantities
            converged = "" if self.converged is None else f", {int(self.converged.sum())} converged"
            lines.append(f"Ritz values computed: {self.eigenvalues.numel()}{converged} "
                         f"(zero threshold {self.tolerances.zero_threshold:.3g})")
            for name in ("lambda_min", "lambda_max"):
                if name in q:
                    lines.append(f"{name} {q[name].text()}: {q[name].basis}")
            est = self.index_estimate
            if est is not None:
                top = float(self.eigenvalues.abs().max()) if self.eigenvalues.numel() else 0.0
                relative = f"{est.delta / top:.2g} max|lambda|; " if top > 0 else ""
                lines.append(f"at resolution delta = {est.delta:.3g} ({relative}{est.n_probes} probes x {est.steps} "
                             "steps):")
            for name in ("index", "min_ratio", "zero"):
                if name in q:
                    lines.append(f"{'unresolved' if name == 'zero' else name} {q[name].text('.3f')}: {q[name].basis}")
        if self.dtype != self.eigensolver_dtype:
            lines.append(f"precision: model {self.dtype}, eigensolver {self.eigensolver_dtype}")
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


def classify_spectrum(eigenvalues: Tensor, zero_threshold: float) -> tuple[str, int, int, int]:
    """Second-order test: ``(kind, n_negative, n_zero, n_positive)`` under the threshold."""
    n_neg = int((eigenvalues < -zero_threshold).sum())
    n_pos = int((eigenvalues > zero_threshold).sum())
    n_zero = eigenvalues.numel() - n_neg - n_pos
    if n_neg and n_pos:
        kind = "saddle"
    elif n_zero:
        kind = "degenerate"
    elif n_pos:
        kind = "minimum"
    else:
        kind = "maximum"
    return kind, n_neg, n_zero, n_pos


def not_critical(grad_norm: float, grad_tol: float, negative: float | None) -> tuple[str, str, str]:
    """``(kind, resolved_by, reason)`` of a point whose gradient exceeds ``grad_tol``; the reason names the
    negative curvature ``negative`` where there is some."""
    reason = f"|grad| = {grad_norm:.3g} > grad_tol = {grad_tol:.3g}"
    if negative is not None:
        reason += f"; negative curvature {negative:.3g} is present"
    return "not_critical", "gradient", reason


def descent_sign(u: Tensor, grad: Tensor) -> Tensor:
    """Sign ``u`` so that it does not ascend (``g.u <= 0``); at ``g.u == 0`` make its largest entry positive."""
    u = u / u.norm()
    slope = float(grad @ u)
    if slope > 0 or (slope == 0 and float(u[u.abs().argmax()]) < 0):
        u = -u
    return u
