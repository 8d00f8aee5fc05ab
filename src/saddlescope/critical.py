r"""The verdict: what kind of point is :math:`\theta`?

Second-order Taylor expansion at :math:`\theta'`:

.. math::

    L(\theta) \approx L(\theta') + (\theta-\theta')^\top g + \tfrac12 (\theta-\theta')^\top H (\theta-\theta').

1. Gradient test: :math:`\|g\| \le` ``grad_tol`` makes :math:`\theta'` a critical point; otherwise
   the kind is ``"not_critical"`` (the spectrum is still computed and reported).
2. Eigenvalue test: an eigenvalue counts as zero when :math:`|\lambda| \le` ``rtol``
   :math:`\cdot\max|\lambda| +` ``atol``. All positive: ``"minimum"``; all negative: ``"maximum"``;
   both signs: ``"saddle"``; zeros and at most one sign: ``"degenerate"`` (inconclusive).
3. Inside the zero band (:mod:`saddlescope.probe`): an eigenvalue beyond the products' rounding whose
   sign one more product confirms rules out the extremum of the other sign (so a saddle is never
   called "minimum" because of the zero threshold, even when its fall is too small for any probe to
   see); otherwise the null space is probed along the reduced function, and a change beyond first
   order and above rounding noise decides.
4. The path (:mod:`saddlescope.path_plan`): the exact spectrum when its predicted cost beats the
   iterative verdict's, else Hessian-vector products only, where a confirmed negative Rayleigh
   quotient proves a saddle and only a converged bottom pair can prove a minimum.
5. Every headline number says what it is (:mod:`saddlescope.quantity`): exact, a bound and its side,
   an interval, or an estimate with its error.

Tolerance defaults depend on the dtype (see :data:`DEFAULT_TOLERANCES`) and are reported.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from saddlescope.curvature.exact import eigh_dtype, exact_spectrum
from saddlescope.curvature.index import UNRESOLVED_SKIP, IndexEstimate, index_estimate
from saddlescope.curvature.lanczos import EigenResult, eigs
from saddlescope.curvature.operator import HessianOperator
from saddlescope.curvature.two_pass import widened_norm
from saddlescope.display import critical_point_html
from saddlescope.errors import InvalidInputError
from saddlescope.objective import DEFAULT_EXACT_BUDGET_BYTES, GradientGraph, Objective
from saddlescope.path_plan import (
    EXACT_AFFORDABLE_S,
    EXACT_MAX_PARAMS,
    ITERATIVE_BASE_PRODUCTS,
    PathPlan,
    plan_path,
)
from saddlescope.probe import (
    ProbeResult,
    band_curvature,
    band_note,
    band_reason,
    probe_null_space,
    probe_verdict,
)
from saddlescope.quantity import Quantity
from saddlescope.tolerances import DEFAULT_TOLERANCES, default_tolerances, precision_bound

__all__ = [
    "DEFAULT_TOLERANCES", "CriticalPoint", "PathPlan", "ProbeResult", "Tolerances", "analyze", "default_tolerances",
    "plan_path", "probe_null_space", "sharpen_escape",
]

KINDS = ("minimum", "maximum", "saddle", "degenerate", "inconclusive", "not_critical")

DEFAULT_PROBE_RADII = (1e-3, 1e-2, 1e-1)

# Eigensolver tolerance on the iterative path, by dtype: residuals relative to the spectral norm
# (top) or to the eigenvalue itself (bottom), above the floor where products in that precision
# stop improving.
DEFAULT_EIG_TOL: dict[torch.dtype, float] = {
    torch.float64: 1e-6,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}


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
        escape_sharpening: what :func:`sharpen_escape` did to a certificate's direction (None if
            it was not asked): the certificate's and the new direction's curvature, the bound on
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


def analyze(
    objective: Objective,
    theta: Tensor | None = None,
    *,
    k: int = 10,
    exact: bool | None = None,
    grad_tol: float | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    probe: bool = True,
    probe_radii: tuple[float, ...] = DEFAULT_PROBE_RADII,
    n_random_probes: int = 16,
    max_probe_directions: int = 64,
    seed: int = 0,
    max_bytes: int = DEFAULT_EXACT_BUDGET_BYTES,
    exact_max_params: int = EXACT_MAX_PARAMS,
    eig_tol: float | None = None,
    max_hvps: int | None = None,
    index_probes: int = 5,
    index_steps: int = 60,
    stop_at_certificate: bool = True,
    progress: Callable[[int, int], None] | None = None,
    exact_affordable_s: float = EXACT_AFFORDABLE_S,
    index_hvps: int | None = None,
    memory_budget: int | None = None,
    index_rtol: float | None = None,
) -> CriticalPoint:
    """Classify ``theta`` (default ``objective.theta0``) from its gradient and Hessian spectrum.

    Two paths, recorded in ``cp.method``. ``"exact"``: the full Hessian and its whole spectrum
    (degenerate points are probed). ``"lanczos"``: Hessian-vector products only; the extreme
    eigenpairs at both ends by :func:`~saddlescope.curvature.lanczos.eigs`, a saddle proved by a
    confirmed negative Rayleigh quotient, "minimum" only from a converged bottom pair whose residual
    bound clears the zero threshold, otherwise ``"inconclusive"``; the index and minimum ratio come
    from :func:`~saddlescope.curvature.index.index_estimate`.

    Args:
        k: eigenpairs computed at each end of the spectrum on the iterative path. The extreme pair at each
            end converges (the verdict rests on it); the other ``k - 1`` get twice the products the
            extreme one took (:data:`END_PATIENCE`), so that pairs inside a dense bulk do not cost hundreds
            of products: ``cp.converged`` says which converged.
        exact: force the exact (True) or iterative (False) path; None chooses by predicted cost
            (:func:`plan_path`: measured products, recorded in ``cp.path_plan`` and a note).
        grad_tol, rtol, atol: tolerances; ``None`` takes the dtype's default
            (:data:`DEFAULT_TOLERANCES`).
        probe: resolve degenerate points by probing the null space (exact path).
        probe_radii: distances probed along each null direction (ascending).
        n_random_probes: random unit combinations of null directions probed besides the eigenvectors.
        max_probe_directions: probe at most this many null eigenvectors; with a larger null space
            only random combinations are probed and a "minimum" is never claimed from them.
        seed: for the random probe directions and the Krylov starting vectors.
        max_bytes: memory budget for the exact Hessian.
        exact_max_params: the size limit of the automatic choice.
        exact_affordable_s: the automatic choice takes the exact path when it is predicted to take
            at most this long, even if the iterative verdict would be cheaper (it gives the whole spectrum).
        eig_tol: iterative path: the top pairs converge to residual ``eig_tol * max|lambda|``, the
            bottom pairs to ``eig_tol * |lambda|`` (relative accuracy, what a small lambda_min
            needs) or a quarter of the zero threshold, whichever is larger. Default by dtype
            (:data:`DEFAULT_EIG_TOL`).
        max_hvps: product budget of each eigensolver run (default: the solver's).
        index_probes, index_steps: stochastic Lanczos quadrature for the index estimate: at most
            ``index_probes`` probes of ``index_steps`` steps, added while they shrink the error bar
            (:func:`~saddlescope.curvature.index.index_estimate`; the converged extreme pairs are
            deflated and counted exactly). 0 probes skips it: ``index``/``min_ratio`` are then NaN
            unless the verdict fixes them.
        index_hvps: product budget of the index estimate (default: ``index_probes * index_steps``).
        index_rtol: iterative path (the exact path counts every eigenvalue): the index's resolution stated
            in advance, relative to the largest ``|lambda|`` seen:
            eigenvalues within ``+-index_rtol * max|lambda|`` are the unresolved band (default None: the
            quadrature's own resolution, ``span / index_steps``). Its probes are then fitted to it within
            ``index_hvps``: each runs up to ``index_hvps / index_probes`` steps, the first stops once its
            quadrature resolves the band as well as the budget can sample it, and probes are added up to
            the budget (``fit_steps`` of :func:`~saddlescope.curvature.index.index_estimate`).
        stop_at_certificate: iterative path: stop the bottom run at the first confirmed Rayleigh
            quotient below the zero threshold (the saddle is proved; ``eigenvalues[0]`` is then that
            quotient, an upper bound on lambda_min). False goes on to converge lambda_min from there.
        progress: ``progress(done, total)`` while the Hessian is built or the solver runs.
        memory_budget: iterative path: bytes each eigensolver run and each index probe may hold (default: half
            of what is free where the model lives, less a rebuilt gradient graph); it sizes the Krylov
            basis and its precision (``cp.lanczos["top"]["plan"]``), and when not even the smallest
            useful basis fits, :class:`~saddlescope.errors.MemoryBudgetError` is raised before any product.

    Returns:
        A :class:`CriticalPoint`.
    """
    theta = objective.theta0 if theta is None else objective.check_theta(theta)
    d_grad, d_rtol, d_atol = default_tolerances(objective.dtype)
    grad_tol = d_grad if grad_tol is None else float(grad_tol)
    rtol = d_rtol if rtol is None else float(rtol)
    atol = d_atol if atol is None else float(atol)
    for name, value in (("grad_tol", grad_tol), ("rtol", rtol), ("atol", atol)):
        if not (value >= 0 and math.isfinite(value)):
            raise InvalidInputError(f"{name} must be a finite number >= 0, got {value}")
    radii = tuple(sorted(float(r) for r in probe_radii))
    if not radii or radii[0] <= 0:
        raise InvalidInputError(f"probe_radii must be positive, got {probe_radii}")
    if not (isinstance(k, int) and k >= 1):
        raise InvalidInputError(f"k must be a positive integer, got {k!r}")
    if exact not in (None, True, False):
        raise InvalidInputError(f"exact must be True, False or None, got {exact!r}")
    if not (isinstance(index_probes, int) and index_probes >= 0):
        raise InvalidInputError(f"index_probes must be an integer >= 0 (0 skips the index estimate), got {index_probes!r}")
    if index_rtol is not None and not (0 < index_rtol < 1):
        raise InvalidInputError(f"index_rtol must be a fraction of max|lambda| in (0, 1), got {index_rtol!r}")
    if index_hvps is not None and not (isinstance(index_hvps, int) and index_hvps >= 1):
        raise InvalidInputError(f"index_hvps must be a positive integer, got {index_hvps!r}")
    n = objective.n_params
    plan = None
    if exact is None:
        plan = plan_path(objective, theta, exact_max_params=exact_max_params, max_bytes=max_bytes,
                         iterative_products=ITERATIVE_BASE_PRODUCTS + _index_budget(index_probes, index_steps,
                                                                                    index_hvps, n),
                         affordable_s=exact_affordable_s, seed=seed)
        exact = plan.exact
    if exact:
        point = _analyze_exact(
            objective, theta, grad_tol=grad_tol, rtol=rtol, atol=atol, radii=radii, probe=probe,
            n_random_probes=n_random_probes, max_probe_directions=max_probe_directions, seed=seed,
            max_bytes=max_bytes, progress=progress, chunk_size=None if plan is None else plan.chunk_size,
        )
    else:
        point = _analyze_iterative(
            objective, theta, k=k, grad_tol=grad_tol, rtol=rtol, atol=atol, radii=radii, seed=seed,
            eig_tol=eig_tol, max_hvps=max_hvps, index_probes=index_probes, index_steps=index_steps,
            stop_at_certificate=stop_at_certificate, progress=progress, index_hvps=index_hvps,
            memory_budget=memory_budget, graph=None if plan is None else plan.graph, index_rtol=index_rtol,
        )
    if plan is not None:
        plan.graph = None  # the analysis is done with it: free its memory
    point.notes = list(objective.notes)
    plan_of_graphs = getattr(objective, "graph_plan", None)
    point.graph_plan = None if plan_of_graphs is None else plan_of_graphs.to_dict()
    if plan is not None:
        point.path_plan = plan
        if plan.measured:
            point.notes.append(plan.reason)
    if torch.finfo(objective.dtype).bits < 32:
        point.notes.append(
            f"products in {objective.dtype} resolve eigenvalues only to about "
            f"+-{point.precision()['eigenvalue_rounding']:.2g}; for a sharper verdict analyse in float32 "
            "(Objective.from_model(..., dtype=torch.float32))"
        )
    return point


def _analyze_exact(
    objective: Objective,
    theta: Tensor,
    *,
    grad_tol: float,
    rtol: float,
    atol: float,
    radii: tuple[float, ...],
    probe: bool,
    n_random_probes: int,
    max_probe_directions: int,
    seed: int,
    max_bytes: int,
    progress: Callable[[int, int], None] | None,
    chunk_size: int | None = None,
) -> CriticalPoint:
    """The exact path: the whole spectrum, then probing if degenerate."""
    start = time.perf_counter()
    loss, grad = objective.loss_and_grad(theta)
    grad_norm = widened_norm(grad, torch.float64)  # torch sums a float32 norm in float32: 1.3% low at 124M
    spectrum = exact_spectrum(objective, theta, max_bytes=max_bytes, progress=progress, chunk_size=chunk_size)
    vals, vecs = spectrum.eigenvalues, spectrum.eigenvectors
    assert vecs is not None
    scale = float(vals.abs().max())
    threshold = rtol * scale + atol
    curvature_kind, n_neg, n_zero, n_pos = classify_spectrum(vals, threshold)
    tolerances = Tolerances(grad_tol, rtol, atol, threshold, radii)
    n = vals.numel()

    rounding = precision_bound(objective.dtype, scale)
    probe_result = None
    escape_dir, escape_curv = None, None
    if n_neg:
        escape_dir = _descent_sign(vecs[:, 0].clone(), grad)
        escape_curv = float(vals[0])
    hvps = 0
    if grad_norm > grad_tol:
        kind, resolved_by, reason = _not_critical(grad_norm, grad_tol, float(vals[0]) if n_neg else None)
    elif curvature_kind != "degenerate":
        kind, resolved_by = curvature_kind, "eigenvalues"
        reason = {
            "saddle": f"{n_neg} negative and {n_pos} positive eigenvalues",
            "minimum": f"all {n} eigenvalues > {threshold:.3g}",
            "maximum": f"all {n} eigenvalues < -{threshold:.3g}",
        }[curvature_kind]
    else:
        # Inside the zero band: an eigenvalue beyond rounding, whose sign a product confirms, still
        # rules out the extremum of the opposite sign (item 1 of the module docstring).
        below = band_curvature(objective, theta, grad, vals, vecs, threshold, rounding, -1.0) if not n_neg else None
        above = band_curvature(objective, theta, grad, vals, vecs, threshold, rounding, +1.0) if not n_pos else None
        hvps = sum(c.hvps for c in (below, above) if c is not None)
        not_min = bool(n_neg) or (below is not None and below.confirmed)
        not_max = bool(n_pos) or (above is not None and above.confirmed)
        if below is not None and below.confirmed:
            escape_dir, escape_curv = _descent_sign(below.direction.clone(), grad), below.curvature
        if not_min and not_max:
            kind, resolved_by = "saddle", "certificate"
            reason = band_reason(below, above, n_neg, n_pos, threshold, rounding)
        elif not probe:
            kind, resolved_by = "degenerate", "unresolved"
            reason = f"{n_zero} zero eigenvalues and probing is off: the second-order test is inconclusive"
            reason += band_note(below, above, rounding)
        else:
            probe_result = probe_null_space(
                objective, theta, float(loss), vals, vecs, threshold, radii, grad=grad,
                n_random=n_random_probes, max_directions=max_probe_directions, seed=seed,
                skip_decrease=not_min, skip_increase=not_max,
            )
            kind, reason = probe_verdict(probe_result, not_min, not_max)
            if (kind == "saddle" and not (probe_result.found_decrease and probe_result.found_increase)
                    and (below is not None and below.confirmed or above is not None and above.confirmed)):
                reason += "; " + band_reason(below, above, n_neg, n_pos, threshold, rounding)
            else:
                reason += band_note(below, above, rounding)
            resolved_by = "unresolved" if kind == "degenerate" else "probe"
            if kind == "saddle" and escape_dir is None:
                escape_dir = probe_result.direction

    top = vecs[:, -1].clone()
    return CriticalPoint(
        kind=kind,
        curvature_kind=curvature_kind,
        resolved_by=resolved_by,
        reason=reason,
        loss=float(loss),
        grad_norm=grad_norm,
        eigenvalues=vals,
        n_params=n,
        n_negative=n_neg,
        n_zero=n_zero,
        n_positive=n_pos,
        min_ratio=n_pos / n,
        index=n_neg / n,
        escape_direction=escape_dir,
        escape_curvature=escape_curv,
        top_direction=top,
        theta=theta.detach().clone(),
        tolerances=tolerances,
        probe=probe_result,
        method="exact",
        mode=objective.mode,
        dtype=str(objective.dtype),
        seed=seed,
        hvp_count=spectrum.hvp_count + hvps,
        seconds={**spectrum.seconds, "total": time.perf_counter() - start},
        eigensolver_dtype=str(eigh_dtype(objective.dtype)),
        quantities=_exact_quantities(vals, n_neg, n_zero, n_pos, rounding, threshold),
    )


def _not_critical(grad_norm: float, grad_tol: float, negative: float | None) -> tuple[str, str, str]:
    reason = f"|grad| = {grad_norm:.3g} > grad_tol = {grad_tol:.3g}"
    if negative is not None:
        reason += f"; negative curvature {negative:.3g} is present"
    return "not_critical", "gradient", reason


# The verdict's ends: once the extreme pair has converged after P products, the other k - 1 pairs get
# until 3P (eigs' ``patience``). Measured (k=10, products before -> after): the planted 3,000 spectrum's
# top run 355 -> 37 (its five outliers converged, the five pairs inside the dense bulk not), its bottom run
# 575 -> 575; the digits MLP after 100 and 1,500 Adam steps unchanged (47, 192, 41, 265: all ten converge
# within 3P). Patience 1 stopped those MLP runs with 9 of 10; patience 0.5 with 2-9.
END_PATIENCE = 2.0


def _both_ends(op: HessianOperator, k: int, *, rtol: float, atol: float, eig_tol: float, max_hvps: int | None,
               seed: int, stop_at_certificate: bool, progress: Callable[[int, int], None] | None,
               memory_budget: int | None, seconds: dict[str, float]) -> tuple[EigenResult, EigenResult]:
    """The top ``k`` pairs, then the bottom end: from the top run's far Ritz vector when that settles it
    (:func:`_bottom_from_top`), else a bottom run that stops at the first certificate of negative
    curvature, continued to convergence unless ``stop_at_certificate``. Each stage's seconds go into
    ``seconds``."""
    t0 = time.perf_counter()
    top = eigs(op, k, "largest", tol=eig_tol, max_hvps=max_hvps, seed=seed, progress=progress,
               memory_budget=memory_budget, patience=END_PATIENCE)
    seconds["top"] = time.perf_counter() - t0
    threshold = rtol * top.spectral_norm + atol
    t0 = time.perf_counter()
    options: dict[str, Any] = {
        "tol": eig_tol, "relative_to": "value", "atol": 0.25 * threshold, "max_hvps": max_hvps,
        "progress": progress, "memory_budget": memory_budget, "patience": END_PATIENCE,
    }
    bottom = _bottom_from_top(op, top, threshold, **options)
    if bottom is None:
        # A "minimum" rests on this run's bottom pair being the smallest: it stops under the random-start
        # bound (while that holds), never on the basis size alone.
        bottom = eigs(op, k, "smallest", seed=seed + 1, stop_below=-threshold, require_bound=True, **options)
    if bottom.stopped_early and not stop_at_certificate:
        spent = bottom.hvp_count
        bottom = eigs(op, k, "smallest", v0=bottom.eigenvectors[:, 0], **options)
        bottom.hvp_count += spent
    seconds["bottom"] = time.perf_counter() - t0
    return top, bottom


# How a critical point's curvature kind was settled on the iterative path (a saddle from a stopped-early
# bottom run: "certificate").
_RESOLVED_BY = {"saddle": "eigenvalues", "minimum": "eigenvalues", "maximum": "eigenvalues",
                "degenerate": "unresolved", "inconclusive": "unresolved"}


def _index_budget(probes: int, steps: int, hvps: int | None, n: int) -> int:
    """Products the index estimate may spend: ``index_hvps``, else ``index_probes`` probes of ``index_steps``."""
    return probes * min(steps, n) if hvps is None else hvps


def _index(op: HessianOperator, top: EigenResult, bottom: EigenResult, *, scale: float, probes: int, steps: int,
           hvps: int | None, rtol: float | None, seed: int, memory_budget: int | None) -> IndexEstimate:
    """The index estimate with the converged extreme pairs deflated: at the quadrature's own resolution, or
    at the stated ``rtol * scale`` with its probes fitted to that band within the budget."""
    n = op.shape[0]
    fit = rtol is not None
    budget = _index_budget(probes, steps, hvps, n)
    return index_estimate(op, delta=rtol * scale if fit else None, n_probes=probes,
                          steps=min(max(steps, budget // probes) if fit else steps, n), seed=seed,
                          deflate=_converged_pairs(top, bottom), max_hvps=budget if fit else hvps, adaptive=True,
                          memory_budget=memory_budget, fit_steps=fit)


def _analyze_iterative(
    objective: Objective,
    theta: Tensor,
    *,
    k: int,
    grad_tol: float,
    rtol: float,
    atol: float,
    radii: tuple[float, ...],
    seed: int,
    eig_tol: float | None,
    max_hvps: int | None,
    index_probes: int,
    index_steps: int,
    stop_at_certificate: bool,
    progress: Callable[[int, int], None] | None,
    index_hvps: int | None = None,
    memory_budget: int | None = None,
    graph: GradientGraph | None = None,
    index_rtol: float | None = None,
) -> CriticalPoint:
    r"""The iterative path (on ``graph``, the gradient graph :func:`plan_path` timed, when given).

    With Ritz pairs :math:`(\theta_b, r_b)` at the bottom and :math:`(\theta_t, r_t)` at the top
    (true residuals, one confirming product each): a Rayleigh quotient bounds the extreme
    eigenvalues from inside, :math:`\lambda_{min} \le \theta_b` and :math:`\lambda_{max} \ge \theta_t`,
    with no convergence needed — these are the certificates of negative and positive curvature.
    A converged pair adds a bound from outside (:class:`_End`): the residual bound
    :math:`\lambda_{min} \ge \theta_b - r_b` (the eigenvalue nearest a Ritz value is within :math:`r_b` of it;
    that it is the *smallest* eigenvalue is Lanczos's premise), widened to the run's random-start bound
    where that is lower, so that it holds with probability at least ``1 - miss_probability`` over the start
    whether or not the premise does. The bottom run stops on convergence only under that bound while it holds
    (``require_bound``). Only the outside bounds can prove "minimum", so an unconverged run never does.
    """
    if eig_tol is None:
        eig_tol = DEFAULT_EIG_TOL.get(objective.dtype, DEFAULT_EIG_TOL[torch.float32])
    if not (eig_tol > 0):
        raise InvalidInputError(f"eig_tol must be positive, got {eig_tol}")
    if index_probes < 0 or index_steps < 1:
        raise InvalidInputError(f"need index_probes >= 0 and index_steps >= 1, got {index_probes}, {index_steps}")
    start = time.perf_counter()
    seconds: dict[str, float] = {}
    op = HessianOperator(objective, theta, graph=graph)
    timed = op.hvp_count  # products plan_path timed on the graph: the plan's, not the verdict's
    loss, grad = op.loss, op.grad
    grad_norm = widened_norm(grad, torch.float64)  # torch sums a float32 norm in float32: 1.3% low at 124M
    n = op.shape[0]
    k_end = max(1, min(k, n // 2))

    top, bottom = _both_ends(op, k_end, rtol=rtol, atol=atol, eig_tol=eig_tol, max_hvps=max_hvps, seed=seed,
                             stop_at_certificate=stop_at_certificate, progress=progress,
                             memory_budget=memory_budget, seconds=seconds)
    # The zero threshold on the scale of everything seen (a large negative end raises it; a
    # negative Rayleigh quotient below -threshold stays below it, since rtol < 1).
    scale = max(top.spectral_norm, bottom.spectral_norm)
    threshold = rtol * scale + atol
    tolerances = Tolerances(grad_tol, rtol, atol, threshold, radii)

    low, high = _extreme_ends(bottom, top)
    curvature_kind, reason = _iterative_kind(low, high, threshold, bottom.stopped_early, bottom.hvp_count,
                                             precision_bound(objective.dtype, scale))
    estimate, index, min_ratio = None, math.nan, math.nan
    if curvature_kind in ("minimum", "maximum"):
        index, min_ratio = (0.0, 1.0) if curvature_kind == "minimum" else (1.0, 0.0)  # every eigenvalue proved
    elif index_probes > 0:
        t0 = time.perf_counter()
        estimate = _index(op, top, bottom, scale=scale, probes=index_probes, steps=index_steps, hvps=index_hvps,
                          rtol=index_rtol, seed=seed + 2, memory_budget=memory_budget)
        seconds["index"] = time.perf_counter() - t0
        index, min_ratio = estimate.value, estimate.min_ratio
    # Counts only where the verdict proves them; an estimate stays a fraction with its interval.
    n_neg: int | None = {"minimum": 0, "maximum": n}.get(curvature_kind)

    has_neg = low.value < -threshold
    escape_dir = _descent_sign(bottom.eigenvectors[:, 0].to(objective.dtype).clone(), grad) if has_neg else None
    if grad_norm > grad_tol:
        kind, resolved_by, reason = _not_critical(grad_norm, grad_tol, low.value if has_neg else None)
    else:
        kind, resolved_by = curvature_kind, _RESOLVED_BY[curvature_kind]
        if kind == "saddle" and bottom.stopped_early:
            resolved_by = "certificate"
    vals, residuals, converged = _pairs_seen(bottom, top if n > 1 else None)
    seconds["total"] = time.perf_counter() - start
    return CriticalPoint(
        kind=kind,
        curvature_kind=curvature_kind,
        resolved_by=resolved_by,
        reason=reason,
        loss=float(loss),
        grad_norm=grad_norm,
        eigenvalues=vals,
        n_params=n,
        n_negative=n_neg,
        n_zero=None if n_neg is None else 0,
        n_positive=None if n_neg is None else n - n_neg,
        min_ratio=min_ratio,
        index=index,
        escape_direction=escape_dir,
        escape_curvature=low.value if has_neg else None,
        top_direction=top.eigenvectors[:, -1].to(objective.dtype).clone(),
        theta=theta.detach().clone(),
        tolerances=tolerances,
        method="lanczos",
        mode=objective.mode,
        dtype=str(objective.dtype),
        seed=seed,
        hvp_count=op.hvp_count - timed,
        seconds=seconds,
        lanczos={"top": top.to_dict(), "bottom": bottom.to_dict()},
        index_estimate=estimate,
        eigensolver_dtype=bottom.dtype,
        quantities=_iterative_quantities(low, high, curvature_kind, estimate, n, bottom.stopped_early),
        residuals=residuals,
        converged=converged,
    )


STOP_REASONS = {
    "probes": "all probes run",
    "target_error": "the error met its target",
    "quadrature_bound": "sampling error below the quadrature bracket (more probes would not help)",
    "max_hvps": "product budget spent",
    "unresolved": "nearly all of the spectrum is unresolved at this delta",
}


def _bottom_from_top(
    op: HessianOperator, top: EigenResult, threshold: float, *, tol: float, relative_to: str, atol: float,
    **_: Any,
) -> EigenResult | None:
    r"""The bottom end from the top run's Krylov space, for one product, when that space settles it.

    Lanczos's Ritz values converge at both ends of the spectrum at once, so the top run's smallest Ritz
    vector :math:`u` (``top.opposite``) is re-measured: :math:`\theta = u^\top H u`,
    :math:`r = \|Hu - \theta u\|`.

    * :math:`\theta < -\text{threshold}`: a certificate (:math:`\lambda_{min} \le \theta`, a Rayleigh
      quotient, no convergence needed): a stopped-early bottom run of one pair.
    * :math:`r` within the bottom end's tolerance and the top run's random-start bound
      (``top.guard["lambda_min_at_least"]``, the misconvergence guard of :func:`eigs` read at the far
      end) placing no eigenvalue below :math:`\theta` minus that tolerance: the converged bottom pair,
      as a bottom run would have accepted it.
    * otherwise None: the bottom end gets a run of its own.
    """
    if top.opposite is None:
        return None
    u = top.opposite.to(torch.float64)
    u = (u / u.norm()).unsqueeze(1)
    hu = op.matmat(u)
    value = float((u * hu).sum())
    residual = float((hu - value * u).norm())
    norm = max(top.spectral_norm, abs(value))
    bound = max(tol * (abs(value) if relative_to == "value" else norm), atol)
    floor = (top.guard or {}).get("lambda_min_at_least")
    if value < -threshold:
        rule = "a certificate: the top run's smallest Ritz vector, re-measured"
    elif residual <= bound and floor is not None and floor >= value - bound:
        rule = "the top run's smallest Ritz pair, re-measured; its random-start bound at the far end"
    else:
        return None
    guard = {"stopped": "certificate" if value < -threshold else "converged", "rule": rule, "steps": 0,
             "miss_probability": top.guard.get("miss_probability") if top.guard else None,
             "lambda_min_at_least": floor}
    return EigenResult(
        eigenvalues=torch.tensor([value], dtype=torch.float64, device=u.device), eigenvectors=u,
        residuals=torch.tensor([residual], dtype=torch.float64, device=u.device),
        converged=torch.tensor([residual <= bound]), spectral_norm=norm, hvp_count=1, restarts=0,
        which="smallest", tol=tol, stopped_early=value < -threshold, relative_to=relative_to, atol=atol,
        dtype=top.dtype, operator_dtype=top.operator_dtype, plan=top.plan, guard=guard,  # the top run's basis
    )


@dataclass(frozen=True)
class _End:
    r"""One end of the spectrum as the iterative verdict reads it.

    ``value`` is the extreme Ritz value, a Rayleigh quotient: :math:`\lambda_{min} \le \theta_b` and
    :math:`\lambda_{max} \ge \theta_t` with no convergence needed. A converged pair adds an outside bound,
    ``outer``: the residual bound :math:`\theta_b - r_b` holds when the pair is the smallest one (Lanczos's
    premise); the run's random-start bound :math:`\lambda_{min} \ge L` (``EigenResult.guard``) holds with
    probability at least ``1 - miss_probability`` over the start, premise or not. Where the bound exists
    ``outer`` is the lesser of the two, true if either is, and ``backing`` says so; without it (a start the
    run did not draw at random) ``outer`` rests on the premise and ``backing`` says that. Mirrored at the top
    (the greater of :math:`\theta_t + r_t` and the bound :math:`\lambda_{max} \le U`).
    """

    name: str  # "lambda_min" or "lambda_max"
    value: float
    residual: float
    converged: bool
    outer: float
    backing: str

    @property
    def interval(self) -> tuple[float, float]:
        return (self.outer, self.value) if self.name == "lambda_min" else (self.value, self.outer)


def _end(run: EigenResult, name: str) -> _End:
    """The bottom (``name="lambda_min"``) or top end of ``run`` as an :class:`_End`."""
    at, sign, key = (0, -1.0, "lambda_min_at_least") if name == "lambda_min" else (-1, 1.0, "lambda_max_at_most")
    value, residual = float(run.eigenvalues[at]), float(run.residuals[at])
    by_residual = value + sign * residual
    guard = run.guard or {}
    bound = guard.get(key)
    said = f"converged pair {value:.4g}, residual {residual:.2g}"
    if bound is None:
        outer, backing = by_residual, f"{said}; Lanczos's premise that it is the extreme pair (a given start: no random-start bound)"
    else:
        outer = min(by_residual, bound) if sign < 0 else max(by_residual, bound)
        backing = (f"{said}; random-start bound {bound:.4g} at probability >= {1 - guard['miss_probability']:g}: "
                   f"the outer of the two")
    return _End(name, value, residual, bool(run.converged[at]), outer, backing)


def _extreme_ends(bottom: EigenResult, top: EigenResult) -> tuple[_End, _End]:
    return _end(bottom, "lambda_min"), _end(top, "lambda_max")


def _pairs_seen(bottom: EigenResult, top: EigenResult | None) -> tuple[Tensor, Tensor, Tensor]:
    """The Ritz values of both runs, ascending, with their true residuals and convergence flags (float64,
    on the host): ``cp.eigenvalues``, ``cp.residuals``, ``cp.converged``."""
    runs = (bottom,) if top is None else (bottom, top)
    vals, order = torch.sort(torch.cat([r.eigenvalues.to(torch.float64).cpu() for r in runs]))
    residuals = torch.cat([r.residuals.to(torch.float64).cpu() for r in runs])[order]
    converged = torch.cat([r.converged.cpu() for r in runs])[order]
    return vals, residuals, converged


def _converged_pairs(*runs: Any) -> tuple[Tensor, Tensor] | None:
    """The converged eigenpairs of Lanczos runs, vectors orthonormalised together (pairs from two runs
    are orthogonal only to the accuracy of their residuals), for deflation; None when there are none."""
    values, vectors = [], []
    for run in runs:
        keep = run.converged.cpu()
        values.append(run.eigenvalues.cpu()[keep].double())
        vectors.append(run.eigenvectors[:, keep.to(run.eigenvectors.device)].double())
    vals, vecs = torch.cat(values), torch.cat(vectors, 1)
    if vals.numel() == 0:
        return None
    # Drop near-duplicates (the same eigenvector found from both ends of a small spectrum).
    q, r = torch.linalg.qr(vecs)
    independent = r.diagonal().abs() > 1e-6
    return vals[independent], q[:, independent]


def _exact_quantities(
    vals: Tensor, n_neg: int, n_zero: int, n_pos: int, rounding: float, threshold: float,
) -> dict[str, Quantity]:
    """The exact path's numbers: eigenvalues exact up to the products' rounding, counts exact."""
    n = vals.numel()
    eig = "an eigenvalue of the dense Hessian (to the products' rounding)"
    counted = f"counted over the whole spectrum; zero means |lambda| <= {threshold:.3g}"
    return {
        "lambda_min": Quantity.exact(float(vals[0]), rounding, eig),
        "lambda_max": Quantity.exact(float(vals[-1]), rounding, eig),
        "index": Quantity.exact(n_neg / n, basis=counted),
        "min_ratio": Quantity.exact(n_pos / n, basis=counted),
        "negative": Quantity.exact(n_neg / n, basis=counted),
        "zero": Quantity.exact(n_zero / n, basis=counted),
        "positive": Quantity.exact(n_pos / n, basis=counted),
    }


def _iterative_quantities(
    low: _End, high: _End, curvature_kind: str, estimate: IndexEstimate | None, n: int, certificate: bool,
) -> dict[str, Quantity]:
    r"""The iterative path's numbers, each as what it is.

    A Ritz value is a Rayleigh quotient, so :math:`\lambda_{min} \le \theta_b` and
    :math:`\lambda_{max} \ge \theta_t` always (bounds); a converged pair of a run that stopped on
    convergence adds its outside bound (:class:`_End`), and the number becomes an interval. The fractions
    are the quadrature's estimates with their error bars, unless the verdict proves them (a minimum has no
    eigenvalue at or below the zero threshold); intervals when the estimate stopped unresolved after one
    probe (:func:`_unresolved_quantities`).
    """
    out: dict[str, Quantity] = {}
    # A stopped-early run never judged whether its pair is the extreme one (the misconvergence guard runs
    # only towards convergence), so a certificate stays a bound even when its residual happens to be small.
    if low.converged and not certificate:
        out["lambda_min"] = Quantity.interval(low.value, *low.interval, low.backing)
    else:
        why = ("the first confirmed negative Rayleigh quotient (a certificate); lambda_min may lie far below"
               if certificate else f"an unconverged Ritz value (residual {low.residual:.2g}), a Rayleigh quotient")
        out["lambda_min"] = Quantity.upper_bound(low.value, why)
    if high.converged:
        out["lambda_max"] = Quantity.interval(high.value, *high.interval, high.backing)
    else:
        out["lambda_max"] = Quantity.lower_bound(
            high.value, f"an unconverged Ritz value (residual {high.residual:.2g}), a Rayleigh quotient")
    proved = {"minimum": (0.0, 0.0, 1.0), "maximum": (1.0, 0.0, 0.0)}.get(curvature_kind)
    if proved is not None:
        why = f"proved by the verdict ({curvature_kind}: no eigenvalue within the zero threshold)"
        neg, zero, pos = (Quantity.exact(x, basis=why) for x in proved)
    elif estimate is not None:
        how = (f"stochastic Lanczos quadrature, {estimate.n_probes} probes x {estimate.steps} steps"
               + (f", {estimate.deflated} known eigenpairs deflated" if estimate.deflated else "")
               + ("" if estimate.reorthogonalised else ", three-term recurrence (the basis did not fit the memory budget)"))
        if not estimate.resolved:
            neg, zero, pos = _unresolved_quantities(estimate, how, n)
            out.update(index=neg, min_ratio=pos, negative=neg, zero=zero, positive=pos)
            return out
        how += f", stopped: {STOP_REASONS.get(estimate.stopped, estimate.stopped)}; error = 2 stderr + quadrature bracket"
        neg = Quantity.estimate(estimate.value, estimate.error, f"fraction below -delta; {how}", (0.0, 1.0))
        pos = Quantity.estimate(estimate.min_ratio, estimate.min_ratio_error, f"fraction above +delta; {how}",
                                (0.0, 1.0))
        within_error = 2 * estimate.within_stderr + estimate.quadrature_bound + estimate.min_ratio_quadrature_bound
        zero = Quantity.estimate(estimate.within, within_error, f"fraction within +-delta (sign unresolved); {how}",
                                 (0.0, 1.0))
    else:
        return out
    out.update(index=neg, min_ratio=pos, negative=neg, zero=zero, positive=pos)
    return out


def _unresolved_quantities(estimate: IndexEstimate, how: str, n: int) -> tuple[Quantity, Quantity, Quantity]:
    """The fractions of an estimate that stopped unresolved after one probe. The probe's quadrature
    proves that at least ``b`` of *its* spectral measure lies within ``+-delta``
    (:mod:`~saddlescope.curvature.index`); the probe's fraction estimates the spectrum's within a standard
    deviation ``sd <= sqrt(2/n)``. So each fraction is an estimate whose range is the proved one widened by
    ``2 sd``: within ``+-delta`` in ``[b - 2 sd, 1]``, below and above in ``[0, 1 - b + 2 sd]``; the
    quadrature's figure is the point. One probe has no standard error (so no ``+- inf``)."""
    bound = max(0.0, estimate.within_bound or 0.0)
    sd = math.sqrt(2 / n)
    planned = estimate.planned_steps or estimate.steps
    steps = (f"after {estimate.steps} of {planned} steps" if estimate.steps < planned
             else f"after all {planned} steps")
    band = f"+-delta = {estimate.delta:.3g}"
    if bound >= UNRESOLVED_SKIP:
        said = (f"NOT RESOLVED: at least {bound:.1%} of the spectrum lies within {band} (proved for one probe's "
                f"spectral measure by the Chebyshev-Markov-Stieltjes bracket of its quadrature {steps}")
    else:
        said = (f"NOT RESOLVED: one probe's quadrature puts {estimate.within:.1%} of the spectrum within {band} "
                f"{steps} (its Chebyshev-Markov-Stieltjes bracket proves at least {bound:.1%}")
    said += (f"; one probe estimates the spectrum's fraction within sd sqrt(2/n) = {sd:.2g}; error: the "
             f"proved range widened by 2 sd); {how}")

    def within_range(value: float, low: float, high: float, what: str) -> Quantity:
        value = min(max(value, low), high)
        return Quantity.estimate(value, max(value - low, high - value), f"{what}; {said}", (0.0, 1.0))

    top = min(1.0, 1.0 - bound + 2 * sd)
    neg = within_range(estimate.value, 0.0, top, "fraction below -delta")
    pos = within_range(estimate.min_ratio, 0.0, top, "fraction above +delta")
    zero = within_range(max(estimate.within, bound), max(0.0, bound - 2 * sd), 1.0,
                        "fraction within +-delta (sign unresolved)")
    return neg, zero, pos


def sharpen_escape(
    objective: Objective,
    point: CriticalPoint,
    *,
    fraction: float = 0.5,
    max_hvps: int = 300,
) -> CriticalPoint:
    r"""Turn a certificate's escape direction into one within ``fraction`` of :math:`\lambda_{min}`.

    A saddle is proved by the first Rayleigh quotient below the zero threshold, but that direction can
    be a poor escape (on an unconverged MLP: curvature -5.12 where lambda_min is -1849). Lanczos
    restarted from it (the certificate vector is a good start: it already leans towards the bottom)
    runs until the bottom Ritz pair :math:`(\theta, r)` satisfies :math:`\theta \le f(\theta - r)`,
    i.e. :math:`r \le (1-f)|\theta|/f`: the direction's curvature :math:`\theta` is then at least
    ``fraction`` of the lower bound :math:`\theta - r` on :math:`\lambda_{min}` (the bound holds when the
    pair is the bottom one, Lanczos's premise from a start that is not orthogonal to it).

    Points without a certificate (exact path, converged bottom pair, no negative curvature) are
    returned unchanged. Otherwise a copy with the new ``escape_direction``, ``escape_curvature``,
    ``lambda_min`` quantity and ``escape_sharpening`` record is returned; if the budget runs out the
    best direction found is kept (never a worse one than the certificate's) and the record says the
    fraction was not reached.

    Args:
        fraction: in (0, 1]: how close to lambda_min the direction's curvature must be.
        max_hvps: product budget.
    """
    if not (0 < fraction <= 1):
        raise InvalidInputError(f"fraction must be in (0, 1], got {fraction}")
    if point.method != "lanczos" or point.escape_direction is None or point.escape_curvature is None:
        return point
    if point.converged is not None and bool(point.converged[0]):
        return point  # already a converged bottom pair
    op = HessianOperator(objective, point.theta.to(objective.dtype))
    tol = (1 - fraction) / fraction if fraction < 1 else 0.0
    bottom = eigs(op, 1, "smallest", tol=max(tol, 1e-12), relative_to="value", max_hvps=max_hvps,
                  v0=point.escape_direction.to(objective.dtype), seed=point.seed + 3)
    theta_b, resid = float(bottom.eigenvalues[0]), float(bottom.residuals[0])
    reached = bool(bottom.converged[0]) and theta_b < 0
    old = point.escape_curvature
    record: dict[str, Any] = {
        "certificate_curvature": old, "curvature": theta_b, "residual": resid,
        "lambda_min_lower_bound": theta_b - resid if reached else None,
        "fraction_of_lambda_min": theta_b / (theta_b - resid) if reached else None,
        "fraction_asked": fraction, "reached": reached, "hvps": op.hvp_count,
    }
    if not theta_b < old:  # nothing better found: keep the certificate
        record["curvature"] = old
        return dataclasses.replace(point, escape_sharpening=record, hvp_count=point.hvp_count + op.hvp_count)
    eigenvalues, residuals, converged = point.eigenvalues.clone(), point.residuals, point.converged
    eigenvalues[0] = theta_b
    if residuals is not None and converged is not None:
        residuals, converged = residuals.clone(), converged.clone()
        residuals[0], converged[0] = resid, reached
    quantities = dict(point.quantities)
    quantities["lambda_min"] = (
        Quantity.interval(theta_b, theta_b - resid, theta_b,
                          f"bottom Ritz pair sharpened for the escape (residual {resid:.2g}); Lanczos's premise "
                          f"that it is the bottom pair (started from the certificate: no random-start bound)")
        if reached else Quantity.upper_bound(theta_b, f"a Rayleigh quotient sharpened for the escape (residual {resid:.2g})")
    )
    grad = objective.grad(point.theta.to(objective.dtype))
    return dataclasses.replace(
        point,
        eigenvalues=eigenvalues, residuals=residuals, converged=converged, quantities=quantities,
        escape_direction=_descent_sign(bottom.eigenvectors[:, 0].to(objective.dtype).clone(), grad),
        escape_curvature=theta_b, escape_sharpening=record, hvp_count=point.hvp_count + op.hvp_count,
    )


def _iterative_kind(low: _End, high: _End, thr: float, certificate: bool, bottom_hvps: int,
                    rounding: float) -> tuple[str, str]:
    """The curvature verdict from the extreme ends (see :func:`_analyze_iterative`), zero threshold ``thr``."""
    tb, tt = low.value, high.value
    has_neg, has_pos = tb < -thr, tt > thr
    if has_neg and has_pos:
        how = "a confirmed Rayleigh quotient (certificate)" if certificate else "a converged eigenpair"
        return "saddle", f"negative curvature {tb:.3g} < -{thr:.3g} from {how}; positive curvature {tt:.3g}"
    if low.converged and low.outer > thr:
        return "minimum", f"lambda_min >= {low.outer:.4g} > {thr:.3g} ({low.backing})"
    if high.converged and high.outer < -thr:
        return "maximum", f"lambda_max <= {high.outer:.4g} < -{thr:.3g} ({high.backing})"
    end = high if has_neg else low  # negative curvature and none positive above the threshold: the top decides
    if not end.converged:
        return "inconclusive", (
            f"{end.name} did not converge in the HVP budget (Ritz value {end.value:.3g}, residual {end.residual:.2g}) "
            f"and no certificate decides the verdict; raise max_hvps"
            + (f" (the bottom run spent {bottom_hvps})" if end is low else "")
        )
    lo, hi = end.interval
    if -thr <= lo and hi <= thr:
        sign = ""
        if end is low and hi < -rounding:
            sign = f"; it is below -{rounding:.2g} (rounding): negative curvature, so not a minimum"
        elif end is high and lo > rounding:
            sign = f"; it is above {rounding:.2g} (rounding): positive curvature, so not a maximum"
        return "degenerate", (
            f"{end.name} is in [{lo:.3g}, {hi:.3g}], within the zero threshold {thr:.3g}: the second-order "
            f"test is inconclusive (probing the null space needs the exact path){sign}"
        )
    return "inconclusive", f"{end.name} is in [{lo:.3g}, {hi:.3g}], which straddles the zero threshold {thr:.3g}"


def _descent_sign(u: Tensor, grad: Tensor) -> Tensor:
    """Sign ``u`` so that it does not ascend (``g.u <= 0``); at ``g.u == 0`` make its largest entry positive."""
    u = u / u.norm()
    slope = float(grad @ u)
    if slope > 0 or (slope == 0 and float(u[u.abs().argmax()]) < 0):
        u = -u
    return u


