"""The exact path of the verdict: the whole spectrum of the dense Hessian, counted under the zero
threshold; inside the zero band, an eigenvalue beyond rounding whose sign a product confirms, then the
null-space probe (:mod:`saddlescope.probe`). Every count is exact; every eigenvalue exact to the
products' rounding."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

from saddlescope.curvature.exact import eigh_dtype, exact_spectrum
from saddlescope.curvature.two_pass import widened_norm
from saddlescope.objective import Objective
from saddlescope.probe import (
    band_curvature,
    band_note,
    band_reason,
    probe_null_space,
    probe_verdict,
)
from saddlescope.quantity import Quantity
from saddlescope.tolerances import precision_bound
from saddlescope.verdict.point import CriticalPoint, Tolerances, classify_spectrum, descent_sign, not_critical

__all__ = ["analyze_exact"]


def analyze_exact(
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
        escape_dir = descent_sign(vecs[:, 0].clone(), grad)
        escape_curv = float(vals[0])
    hvps = 0
    if grad_norm > grad_tol:
        kind, resolved_by, reason = not_critical(grad_norm, grad_tol, float(vals[0]) if n_neg else None)
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
            escape_dir, escape_curv = descent_sign(below.direction.clone(), grad), below.curvature
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
