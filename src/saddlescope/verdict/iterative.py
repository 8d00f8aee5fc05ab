"""The iterative path of the verdict: Hessian-vector products only.

The top pairs (:func:`~saddlescope.curvature.lanczos.eigs`), the bottom end from the same Krylov space
when one product settles it, else a run of its own that stops at the first certificate of negative
curvature; the curvature verdict from the two ends (:mod:`saddlescope.verdict.ends`); and, unless the
verdict proves them, the index and minimum ratio estimated by stochastic Lanczos quadrature with the
converged pairs deflated (:func:`~saddlescope.curvature.index.index_estimate`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from saddlescope.curvature.index import IndexEstimate, index_estimate
from saddlescope.curvature.lanczos import EigenResult, eigs
from saddlescope.curvature.operator import HessianOperator
from saddlescope.curvature.two_pass import widened_norm
from saddlescope.errors import InvalidInputError
from saddlescope.objective import GradientGraph, Objective
from saddlescope.tolerances import precision_bound
from saddlescope.verdict.ends import extreme_ends, iterative_kind, iterative_quantities
from saddlescope.verdict.point import CriticalPoint, Tolerances, descent_sign, not_critical

__all__ = ["DEFAULT_EIG_TOL", "END_PATIENCE", "analyze_iterative", "index_budget"]


# Eigensolver tolerance on the iterative path, by dtype: residuals relative to the spectral norm
# (top) or to the eigenvalue itself (bottom), above the floor where products in that precision
# stop improving.
DEFAULT_EIG_TOL: dict[torch.dtype, float] = {
    torch.float64: 1e-6,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}


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


# How a critical point's curvature kind was settled on the iterative path (a saddle from a stopped-early
# bottom run: "certificate").
_RESOLVED_BY = {"saddle": "eigenvalues", "minimum": "eigenvalues", "maximum": "eigenvalues",
                "degenerate": "unresolved", "inconclusive": "unresolved"}


def index_budget(probes: int, steps: int, hvps: int | None, n: int) -> int:
    """Products the index estimate may spend: ``index_hvps``, else ``index_probes`` probes of ``index_steps``."""
    return probes * min(steps, n) if hvps is None else hvps


def _index(op: HessianOperator, top: EigenResult, bottom: EigenResult, *, scale: float, probes: int, steps: int,
           hvps: int | None, rtol: float | None, seed: int, memory_budget: int | None) -> IndexEstimate:
    """The index estimate with the converged extreme pairs deflated: at the quadrature's own resolution, or
    at the stated ``rtol * scale`` with its probes fitted to that band within the budget."""
    n = op.shape[0]
    fit = rtol is not None
    budget = index_budget(probes, steps, hvps, n)
    return index_estimate(op, delta=rtol * scale if fit else None, n_probes=probes,
                          steps=min(max(steps, budget // probes) if fit else steps, n), seed=seed,
                          deflate=_converged_pairs(top, bottom), max_hvps=budget if fit else hvps, adaptive=True,
                          memory_budget=memory_budget, fit_steps=fit)


def analyze_iterative(
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
    r"""The iterative path (on ``graph``, the gradient graph :func:`~saddlescope.path_plan.plan_path` timed,
    when given).

    With Ritz pairs :math:`(\theta_b, r_b)` at the bottom and :math:`(\theta_t, r_t)` at the top
    (true residuals, one confirming product each): a Rayleigh quotient bounds the extreme
    eigenvalues from inside, :math:`\lambda_{min} \le \theta_b` and :math:`\lambda_{max} \ge \theta_t`,
    with no convergence needed — these are the certificates of negative and positive curvature.
    A converged pair adds a bound from outside (:class:`~saddlescope.verdict.ends.End`): the residual bound
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

    low, high = extreme_ends(bottom, top)
    curvature_kind, reason = iterative_kind(low, high, threshold, bottom.stopped_early, bottom.hvp_count,
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
    escape_dir = None
    if has_neg:
        escape_dir = descent_sign(bottom.eigenvectors[:, 0].to(objective.dtype).clone(), grad)
    if grad_norm > grad_tol:
        kind, resolved_by, reason = not_critical(grad_norm, grad_tol, low.value if has_neg else None)
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
        quantities=iterative_quantities(low, high, curvature_kind, estimate, n, bottom.stopped_early),
        residuals=residuals,
        converged=converged,
    )


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
