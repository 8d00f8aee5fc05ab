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

This module is the door: :func:`analyze` checks its arguments, chooses the path and hands over to the
pieces in :mod:`saddlescope.verdict`: the record (:mod:`~saddlescope.verdict.point`), the exact path
(:mod:`~saddlescope.verdict.exact`), the iterative path (:mod:`~saddlescope.verdict.iterative`), what the
ends of a Lanczos spectrum prove (:mod:`~saddlescope.verdict.ends`) and the escape's sharpening
(:mod:`~saddlescope.verdict.sharpen`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from saddlescope.errors import InvalidInputError
from saddlescope.objective import DEFAULT_EXACT_BUDGET_BYTES, Objective
from saddlescope.path_plan import (
    EXACT_AFFORDABLE_S,
    EXACT_MAX_PARAMS,
    ITERATIVE_BASE_PRODUCTS,
    PathPlan,
    plan_path,
)
from saddlescope.probe import ProbeResult, probe_null_space
from saddlescope.tolerances import DEFAULT_TOLERANCES, default_tolerances
from saddlescope.verdict.exact import analyze_exact
from saddlescope.verdict.iterative import DEFAULT_EIG_TOL, END_PATIENCE, analyze_iterative, index_budget
from saddlescope.verdict.point import DEFAULT_PROBE_RADII, KINDS, CriticalPoint, Tolerances, classify_spectrum
from saddlescope.verdict.sharpen import sharpen_escape

__all__ = [
    "DEFAULT_EIG_TOL", "DEFAULT_PROBE_RADII", "DEFAULT_TOLERANCES", "END_PATIENCE", "KINDS", "CriticalPoint",
    "PathPlan", "ProbeResult", "Tolerances", "analyze", "classify_spectrum", "default_tolerances",
    "plan_path", "probe_null_space", "sharpen_escape",
]


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
            extreme one took (:data:`~saddlescope.verdict.iterative.END_PATIENCE`), so that pairs inside a
            dense bulk do not cost hundreds of products: ``cp.converged`` says which converged.
        exact: force the exact (True) or iterative (False) path; None chooses by predicted cost
            (:func:`~saddlescope.path_plan.plan_path`: measured products, recorded in ``cp.path_plan`` and a
            note).
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
            (:data:`~saddlescope.verdict.iterative.DEFAULT_EIG_TOL`).
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
        A :class:`~saddlescope.verdict.point.CriticalPoint`.
    """
    theta = objective.theta0 if theta is None else objective.check_theta(theta)
    grad_tol, rtol, atol = _tolerances(objective.dtype, grad_tol, rtol, atol)
    radii = tuple(sorted(float(r) for r in probe_radii))
    _check(radii=radii, probe_radii=probe_radii, k=k, exact=exact, index_probes=index_probes,
           index_rtol=index_rtol, index_hvps=index_hvps)
    plan = None
    if exact is None:
        index_products = index_budget(index_probes, index_steps, index_hvps, objective.n_params)
        plan = plan_path(objective, theta, exact_max_params=exact_max_params, max_bytes=max_bytes,
                         iterative_products=ITERATIVE_BASE_PRODUCTS + index_products,
                         affordable_s=exact_affordable_s, seed=seed)
        exact = plan.exact
    if exact:
        point = analyze_exact(
            objective, theta, grad_tol=grad_tol, rtol=rtol, atol=atol, radii=radii, probe=probe,
            n_random_probes=n_random_probes, max_probe_directions=max_probe_directions, seed=seed,
            max_bytes=max_bytes, progress=progress, chunk_size=None if plan is None else plan.chunk_size,
        )
    else:
        point = analyze_iterative(
            objective, theta, k=k, grad_tol=grad_tol, rtol=rtol, atol=atol, radii=radii, seed=seed,
            eig_tol=eig_tol, max_hvps=max_hvps, index_probes=index_probes, index_steps=index_steps,
            stop_at_certificate=stop_at_certificate, progress=progress, index_hvps=index_hvps,
            memory_budget=memory_budget, graph=None if plan is None else plan.graph, index_rtol=index_rtol,
        )
    if plan is not None:
        plan.graph = None  # the analysis is done with it: free its memory
    return _annotated(point, objective, plan)


def _tolerances(dtype: torch.dtype, grad_tol: float | None, rtol: float | None,
                atol: float | None) -> tuple[float, float, float]:
    """``grad_tol``, ``rtol``, ``atol``, each the dtype's default where None, checked."""
    d_grad, d_rtol, d_atol = default_tolerances(dtype)
    chosen = {"grad_tol": d_grad if grad_tol is None else float(grad_tol),
              "rtol": d_rtol if rtol is None else float(rtol),
              "atol": d_atol if atol is None else float(atol)}
    for name, value in chosen.items():
        if not (value >= 0 and math.isfinite(value)):
            raise InvalidInputError(f"{name} must be a finite number >= 0, got {value}")
    return chosen["grad_tol"], chosen["rtol"], chosen["atol"]


def _check(*, radii: tuple[float, ...], probe_radii: Any, k: Any, exact: Any, index_probes: Any,
           index_rtol: Any, index_hvps: Any) -> None:
    """:func:`analyze`'s other arguments checked: a clear error before any work."""
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


def _annotated(point: CriticalPoint, objective: Objective, plan: PathPlan | None) -> CriticalPoint:
    """``point`` with what the computation worked around: the objective's notes, the gradient graphs it
    kept, the path plan, and a warning where half precision limits the verdict."""
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
