"""The report's numbers beyond the verdict: the exact spectrum's two histograms, the SLQ density, the
loss on the plane of the extreme eigenvectors and along the escape direction (with its second-order
model), and where the escape direction lives (its share per block, its largest components, by name)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saddlescope.critical import CriticalPoint
from saddlescope.curvature.density import SpectralDensity, spectral_density
from saddlescope.curvature.operator import HessianOperator
from saddlescope.landscape import LandscapeSlice
from saddlescope.landscape import landscape as landscape_slice
from saddlescope.objective import Objective
from saddlescope.report.io import to_jsonable

__all__ = [
    "MAX_VECTOR_PARAMS", "escape_slice", "escape_summary", "exact_histograms", "objective_summary",
    "parameter_names", "plane_slice", "slice_dict", "slq_density",
]


# Vectors (theta, directions) go into the JSON up to this many parameters, as in CriticalPoint.to_dict.
MAX_VECTOR_PARAMS = 10_000


def exact_histograms(cp: CriticalPoint, bins: int | None) -> dict[str, Any]:
    """Two histograms of the whole spectrum: linear bins, and bins geometric in ``|lambda|``
    either side of the zero band ``[-tau, tau]`` (its count is ``n_zero``)."""
    values = cp.eigenvalues.double().cpu().numpy()
    n = values.size
    bins = bins or int(min(120, max(10, round(math.sqrt(n)))))
    lo, hi = float(values.min()), float(values.max())
    if hi - lo <= 0:  # one distinct value: a bin of width 1e-6 of its size (or 1) around it
        pad = 0.5e-6 * max(abs(lo), 1.0)
        lo, hi = lo - pad, hi + pad
    linear_counts, linear_edges = np.histogram(values, bins=bins, range=(lo, hi))

    tau = float(cp.tolerances.zero_threshold)
    top = float(np.abs(values).max())
    if not tau > 0:  # no zero band (atol = 0 at a zero spectrum): a token width for the middle bar
        tau = max(top, 1.0) * 1e-300 if top == 0 else top * 1e-12
    per_side = 0 if top <= tau else int(min(40, max(1, math.ceil(4 * math.log10(top / tau)))))
    outer = np.geomspace(tau, top, per_side + 1)[1:] if per_side else np.array([])
    if per_side:
        outer[-1] = np.nextafter(top, np.inf)  # the largest |lambda| falls inside the last bin
    # |lambda| <= tau is zero (classify_spectrum): nudge the band's right edge so tau itself is inside.
    edges = np.concatenate([-outer[::-1], [-tau, np.nextafter(tau, np.inf)], outer])
    symlog_counts, _ = np.histogram(values, bins=edges)
    return {
        "n": int(n),
        "zero_threshold": float(cp.tolerances.zero_threshold),
        "linear": {"edges": linear_edges.tolist(), "counts": linear_counts.astype(int).tolist()},
        "symlog": {"edges": edges.tolist(), "counts": symlog_counts.astype(int).tolist(),
                   "zero_bin": per_side, "tau": tau},
    }


def slq_density(objective: Objective, theta: Tensor, probes: int, steps: int, seed: int,
             progress: Callable[[int, int], None] | None) -> SpectralDensity:
    return spectral_density(HessianOperator(objective, theta), probes, steps, seed=seed, progress=progress)


def _loss_scale(loss: float) -> float:
    """The size of change a slice should show: the loss itself, or 1 where it is exactly 0."""
    return abs(loss) if loss != 0 and math.isfinite(loss) else 1.0


def plane_slice(
    cp: CriticalPoint, objective: Objective, centre: Tensor, resolution: int, span: float | None, seed: int,
    progress: Callable[[int, int], None] | None,
) -> LandscapeSlice:
    """The loss on the plane (most negative eigenvector, largest eigenvector) through ``centre``."""
    sharpest = float(cp.eigenvalues.abs().max())
    if span is None:
        span = 1.5 * math.sqrt(2 * _loss_scale(cp.loss) / sharpest) if sharpest > 0 else 1.0
    own = (torch.equal(centre, cp.theta) and cp.escape_direction is not None
           and cp.escape_curvature is not None and cp.top_direction is not None)
    if own:
        # The verdict's own eigenvectors (exact on the exact path): no second eigensolve.
        assert cp.escape_direction is not None and cp.top_direction is not None
        view = landscape_slice(objective, centre, directions=[cp.escape_direction, cp.top_direction], span=span,
                               resolution=resolution, progress=progress)
        view.labels = [f"u_min (lambda = {cp.escape_curvature:.4g})", f"u_max (lambda = {cp.lambda_max:.4g})"]
        view.kind = "hessian"
    else:
        view = landscape_slice(objective, centre, directions="hessian", span=span, resolution=resolution,
                               seed=seed, progress=progress)
    return view


def escape_slice(
    cp: CriticalPoint, objective: Objective, centre: Tensor, resolution: int, span: float | None,
    plane: LandscapeSlice, progress: Callable[[int, int], None] | None,
) -> dict[str, Any]:
    """The loss along the escape direction ``u`` against its second-order prediction."""
    assert cp.escape_direction is not None
    u = cp.escape_direction.to(objective.device, objective.dtype)
    curvature = cp.escape_curvature
    plane_span = float(plane.settings["span"][1])
    if span is None:
        span = plane_span
        if curvature is not None and curvature < 0:
            span = min(1.5 * math.sqrt(2 * _loss_scale(cp.loss) / abs(curvature)), 10 * plane_span)
    view = landscape_slice(objective, centre, directions=u, span=span, resolution=resolution, progress=progress)
    view.labels = ["alpha along the escape direction u"]
    view.kind = "escape"
    slope = float(objective.grad(centre) @ u)
    alphas = view.alphas.double()
    delta = (view.losses.double() - view.center_loss).tolist()
    out = slice_dict(view)
    out.update({
        "slope": slope,
        "curvature": curvature,
        "delta_losses": [None if math.isnan(v) else v for v in delta],
        # Second-order Taylor model of the change; the probe's direction has no curvature to predict with.
        "quadratic_model": None if curvature is None else (slope * alphas + 0.5 * curvature * alphas**2).tolist(),
    })
    return out


def slice_dict(view: LandscapeSlice | None) -> dict[str, Any] | None:
    if view is None:
        return None
    out = view.to_dict()
    norms = view.directions.double().norm(dim=1).tolist()
    out["direction_norms"] = norms
    if view.directions.shape[1] <= MAX_VECTOR_PARAMS:
        out["directions"] = view.directions.double().cpu().tolist()
    return out


def objective_summary(objective: Objective | None) -> dict[str, Any] | None:
    if objective is None:
        return None
    return {"description": to_jsonable(objective.description), "n_params": objective.n_params,
            "dtype": str(objective.dtype), "mode": objective.mode,
            "param_names": objective.param_names, "notes": list(objective.notes)}


def parameter_names(objective: Objective | None, indices: list[int]) -> list[str]:
    """Readable names of flat indices: ``"0.weight[3, 17]"`` for a model, ``"theta[5]"`` otherwise."""
    if objective is None or not objective.param_names or not objective.param_shapes:
        return [f"theta[{i}]" for i in indices]
    sizes = [int(torch.Size(s).numel()) for s in objective.param_shapes]
    starts = np.cumsum([0, *sizes])
    names = []
    for i in indices:
        which = int(np.searchsorted(starts, i, side="right") - 1)
        shape = tuple(objective.param_shapes[which])
        local = i - int(starts[which])
        where = ", ".join(str(int(k)) for k in np.unravel_index(local, shape)) if shape else ""
        names.append(f"{objective.param_names[which]}[{where}]" if shape else objective.param_names[which])
    return names


def escape_summary(cp: CriticalPoint, objective: Objective | None, top: int = 10) -> dict[str, Any]:
    """Where the escape direction lives: its share of ``|u|^2`` per block and its largest components."""
    assert cp.escape_direction is not None
    u = cp.escape_direction.double().cpu()
    energy = u**2 / float((u**2).sum())
    shares = []
    if objective is not None:
        for name, index in objective.blocks("module").items():
            shares.append({"name": name, "n_params": int(index.numel()), "share": float(energy[index].sum())})
    order = u.abs().argsort(descending=True)[: min(top, u.numel())].tolist()
    names = parameter_names(objective, order)
    return {
        "curvature": cp.escape_curvature,
        "source": "eigenvector" if cp.escape_curvature is not None else "probe",
        "block_shares": shares,
        "top_components": [{"index": int(i), "name": name, "value": float(u[i])} for i, name in zip(order, names)],
    }
