r"""The interactive report: one self-contained HTML page, its JSON and static PNGs.

:func:`write_report` turns a verdict (:class:`~saddlescope.critical.CriticalPoint`) into a folder::

    report.html              the page (small): it loads plotly.min.js beside it, so it works offline
    plotly.min.js            the plotting library, one copy shared by the reports in the folder
                             (write_report(..., single_file=True) embeds it in the page instead)
    report.json              every number the page shows (cp.to_dict() plus density, slices, blocks)
    spectrum.png             histogram of the eigenvalues (exact path) and/or the SLQ density
    landscape_plane.png      the loss on the plane of the extreme eigenvectors
    landscape_escape.png     the loss along the escape direction
    blocks.png               per-block curvature (when a BlockReport is given)

What the page shows and why:

- The verdict with the evidence behind it: :math:`\|g\|` against ``grad_tol``, the extreme
  eigenvalues, the counts under the zero threshold, the minimum ratio and index (on the iterative
  path the index is an estimate at a resolution :math:`\delta`, shown with its error bar).
- The spectrum. Trained networks put most of their eigenvalues in a spike at zero, so counts are on
  a log axis, and a second panel bins :math:`\lambda` geometrically in :math:`|\lambda|` on each side
  of the zero band :math:`[-\tau, \tau]` (``tau`` the verdict's zero threshold): its middle bar is
  exactly ``n_zero``, and the negative tail a linear histogram hides in one bin stays visible.
- The landscape on the plane of the most negative and the largest eigenvector, where the second-order
  model is :math:`L + \tfrac12(\lambda_{min}\alpha^2 + \lambda_{max}\beta^2)` (plus the gradient term):
  at a saddle the picture is a saddle. Along the escape direction :math:`u` the loss change is drawn
  against the Taylor prediction :math:`\alpha\, g^\top u + \tfrac12 \alpha^2 u^\top H u`.

Missing inputs: without an objective the landscape and the density cannot be computed. By default
(``landscape=None``, ``density=None``) such a section is left out with a note in the page and the
JSON; asking for it explicitly (``True``) without an objective raises
:class:`~saddlescope.errors.InvalidInputError`.

All files are written at the end, each atomically (temporary file + rename), the page last: an
interrupted report leaves no half-written file and no page pointing at missing PNGs.
"""

from __future__ import annotations

import html
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saddlescope.atomic import atomic_write_text
from saddlescope.critical import CriticalPoint, sharpen_escape
from saddlescope.curvature.blocks import BlockReport
from saddlescope.distributed import is_main_process
from saddlescope.curvature.density import SpectralDensity, spectral_density
from saddlescope.curvature.operator import HessianOperator
from saddlescope.errors import InvalidInputError, ThetaError
from saddlescope.landscape import LandscapeSlice
from saddlescope.landscape import landscape as landscape_slice
from saddlescope.objective import Objective
from saddlescope.report.io import to_jsonable, write_json
from saddlescope.report.plots import _pyplot, _save, plot_blocks, plot_landscape
from saddlescope.report.reading import plain_reading

__all__ = ["REPORT_FORMAT", "ReportFiles", "write_report"]

REPORT_FORMAT = "saddlescope.report/1"

# Vectors (theta, directions) go into the JSON up to this many parameters, as in CriticalPoint.to_dict.
MAX_VECTOR_PARAMS = 10_000

KIND_COLOURS = {
    "minimum": "#1a7f37",
    "maximum": "#8250df",
    "saddle": "#cf222e",
    "degenerate": "#9a6700",
    "inconclusive": "#57606a",
    "not_critical": "#0969da",
}

PLOTLY_CONFIG = {"displaylogo": False, "responsive": True, "toImageButtonOptions": {"format": "png"}}


@dataclass
class ReportFiles:
    """What :func:`write_report` wrote.

    Attributes:
        html, json: the page and its numbers.
        pngs: static figures by name (``"spectrum"``, ``"landscape_plane"``, ``"landscape_escape"``,
            ``"blocks"``), only those drawn.
        figures: ids of the interactive plots on the page, in order.
        notes: sections left out and why.
        seconds: wall time of the whole report.
    """

    html: Path
    json: Path
    pngs: dict[str, Path] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"html": str(self.html), "json": str(self.json),
                "pngs": {k: str(v) for k, v in self.pngs.items()},
                "figures": list(self.figures), "notes": list(self.notes), "seconds": self.seconds}


# ---------------------------------------------------------------------------------------------- API
def write_report(
    cp: CriticalPoint,
    objective: Objective | None = None,
    *,
    out: str | os.PathLike[str],
    theta: Tensor | None = None,
    blocks: BlockReport | None = None,
    landscape: bool | None = None,
    density: bool | None = None,
    resolution: int = 31,
    escape_resolution: int = 41,
    span: float | None = None,
    escape_span: float | None = None,
    density_probes: int = 4,
    density_steps: int = 60,
    histogram_bins: int | None = None,
    seed: int | None = None,
    title: str | None = None,
    command: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    single_file: bool = False,
) -> ReportFiles:
    r"""Write ``report.html``, ``report.json`` and the PNGs for a verdict into the folder ``out``.

    Args:
        cp: the verdict (:func:`saddlescope.analyze`).
        objective: the objective ``cp`` was computed on; needed for the landscape, the density and
            readable parameter names.
        out: the folder (created if missing; must not be a file).
        theta: centre of the landscape slices; default ``cp.theta``. At ``cp.theta`` the plane uses
            the verdict's own eigenvectors; elsewhere :func:`saddlescope.landscape` computes them.
        blocks: a :class:`~saddlescope.curvature.blocks.BlockReport` to chart per block.
        landscape, density: ``None`` (default): draw when an objective is given, else leave out with
            a note; ``True``: required (raises without an objective); ``False``: leave out.
        resolution: points per direction of the 2-D slice (``resolution**2`` loss evaluations).
        escape_resolution: points of the 1-D slice along the escape direction.
        span: half-width of the plane; default ``1.5 * sqrt(2 s / max|lambda|)`` with ``s = |L|`` (1
            when the loss is 0), where the quadratic model along the sharpest direction has changed by
            about the loss itself.
        escape_span: half-width of the escape slice; default ``1.5 * sqrt(2 s / |u^T H u|)`` (where the
            second-order model predicts the whole loss gone), at most 10 times the plane's.
        density_probes, density_steps: SLQ probes and Lanczos steps (``probes * steps`` HVPs).
        histogram_bins: linear bins of the exact spectrum; default ``clip(sqrt(n), 10, 120)``.
        seed: for the density probes (and random fallbacks); default ``cp.seed``.
        title, command: shown in the page and recorded in the JSON.
        progress: ``progress(done, total)`` over the report's work units (density HVPs, loss
            evaluations, figures); ``done`` only grows and ends at ``total``.
        single_file: embed plotly.js (about 4.6 MB) in the page, which then works on its own; by
            default the page loads ``plotly.min.js`` written beside it once (a page is then tens of
            kilobytes, and reports in one folder share the copy).

    Returns:
        The paths written (:class:`ReportFiles`).

    Raises:
        InvalidInputError: ``cp``/``objective``/``blocks`` of the wrong type or size, ``out`` an existing
            file, a section required without an objective, or a bad setting.
        ThetaError: ``theta`` of the wrong length, dtype or device.
    """
    start = time.perf_counter()
    folder = _check_out(out)  # created only when the files are written
    _check_inputs(cp, objective, blocks)
    _check_settings(resolution=resolution, escape_resolution=escape_resolution, span=span,
                    escape_span=escape_span, density_probes=density_probes, density_steps=density_steps,
                    histogram_bins=histogram_bins)
    centre = _check_theta(cp, objective, theta)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InvalidInputError(f"seed must be an integer or None, got {seed!r}")
    seed = cp.seed if seed is None else seed
    notes: list[str] = []
    want_landscape = _wanted("landscape", landscape, objective, notes)
    want_density = _wanted("density", density, objective, notes)
    if want_landscape and objective is not None and torch.equal(centre, cp.theta):
        # The escape slice follows the direction a user would step along, not a bare certificate.
        cp = sharpen_escape(objective, cp)
        if cp.escape_sharpening is not None:
            sharp = cp.escape_sharpening
            notes.append(
                f"escape direction sharpened from the certificate (curvature {sharp['certificate_curvature']:.3g}) "
                f"to curvature {sharp['curvature']:.3g} in {sharp['hvps']} products"
                + (f", within {sharp['fraction_of_lambda_min']:.2f} of the lower bound on lambda_min"
                   if sharp["reached"] else "; the asked fraction of lambda_min was not reached in the budget"))
    exact = cp.eigenvalues.numel() == cp.n_params
    has_escape = cp.escape_direction is not None

    steps = min(density_steps, cp.n_params)
    tracker = _Progress(progress, {
        "density": density_probes * steps if want_density else 0,
        "plane": resolution**2 if want_landscape else 0,
        "escape": escape_resolution if want_landscape and has_escape else 0,
        "files": 4,
    })

    payload: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "title": title or _default_title(cp),
        "command": command,
        "seed": seed,
        "critical_point": cp.to_dict(),
        "objective": _describe_objective(objective),
        "settings": {"resolution": resolution, "escape_resolution": escape_resolution,
                     "density_probes": density_probes, "density_steps": steps,
                     "histogram_bins": histogram_bins},
    }
    payload["spectrum"] = _exact_histograms(cp, histogram_bins) if exact else None
    spectral: SpectralDensity | None = None
    if want_density:
        assert objective is not None
        spectral = _density(objective, cp.theta, density_probes, steps, seed, tracker.stage("density"))
    payload["density"] = None if spectral is None else spectral.to_dict()

    plane = line = None
    if want_landscape:
        assert objective is not None
        plane = _plane(cp, objective, centre, resolution, span, seed, tracker.stage("plane"))
        if has_escape:
            line = _escape_line(cp, objective, centre, escape_resolution, escape_span, plane, tracker.stage("escape"))
    payload["landscape"] = {"plane": _slice_dict(plane), "escape": line}
    payload["escape"] = _escape_summary(cp, objective) if has_escape else None
    payload["blocks"] = None if blocks is None else blocks.to_dict()
    if not has_escape:
        notes.append("no escape direction: the verdict found no direction of negative curvature or decrease")

    figures = _figures(payload, cp, plane)
    payload["figures"] = [fig_id for fig_id, _ in figures]
    payload["notes"] = notes

    html_path, json_path = folder / "report.html", folder / "report.json"
    if objective is not None and objective.sharded and not is_main_process():
        # torch.distributed: every rank took part in the sums above; rank 0 alone writes the files.
        return ReportFiles(html=html_path, json=json_path, pngs={}, figures=list(payload["figures"]),
                           notes=list(notes), seconds=time.perf_counter() - start)
    folder.mkdir(parents=True, exist_ok=True)
    pngs = _write_pngs(folder, cp, payload, spectral, plane, line, blocks)
    tracker.advance("files", 3)
    payload["files"] = {"html": html_path.name, "json": json_path.name,
                        "pngs": {name: path.name for name, path in pngs.items()},
                        "plotly_js": None if single_file else _write_plotly_js(folder)}
    payload["seconds"] = time.perf_counter() - start
    write_json(json_path, payload)
    atomic_write_text(html_path, _page(payload, figures))
    tracker.advance("files", 1)
    return ReportFiles(html=html_path, json=json_path, pngs=pngs, figures=list(payload["figures"]),
                       notes=list(notes), seconds=time.perf_counter() - start)


# ------------------------------------------------------------------------------------------ checks
def _check_out(out: Any) -> Path:
    if out is None:
        raise InvalidInputError("out must be a folder to write the report into, got None")
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise InvalidInputError(f"out must be a folder, but {folder} is a file; pass a folder path")
    return folder


def _check_inputs(cp: Any, objective: Any, blocks: Any) -> None:
    if not isinstance(cp, CriticalPoint):
        raise InvalidInputError(f"cp must be a CriticalPoint (from saddlescope.analyze), got {type(cp).__name__}")
    if objective is not None:
        if not isinstance(objective, Objective):
            raise InvalidInputError(f"objective must be a saddlescope.Objective, got {type(objective).__name__}")
        if objective.n_params != cp.n_params:
            raise InvalidInputError(
                f"the objective has {objective.n_params} parameters but the verdict {cp.n_params}; "
                "pass the objective the verdict was computed on")
    if blocks is not None and not isinstance(blocks, BlockReport):
        raise InvalidInputError(f"blocks must be a BlockReport (from saddlescope.per_block), got {type(blocks).__name__}")


def _check_settings(**settings: Any) -> None:
    for name in ("resolution", "escape_resolution"):
        value = settings[name]
        if not (isinstance(value, int) and value >= 3):
            raise InvalidInputError(f"{name} must be an integer >= 3, got {value!r}")
    for name in ("density_probes", "density_steps"):
        value = settings[name]
        if not (isinstance(value, int) and value >= 1):
            raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
    bins = settings["histogram_bins"]
    if bins is not None and not (isinstance(bins, int) and bins >= 1):
        raise InvalidInputError(f"histogram_bins must be a positive integer or None, got {bins!r}")
    for name in ("span", "escape_span"):
        value = settings[name]
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise InvalidInputError(f"{name} must be a positive number or None, got {value!r}")


def _check_theta(cp: CriticalPoint, objective: Objective | None, theta: Any) -> Tensor:
    if theta is None:
        return cp.theta
    if objective is not None:
        return objective.check_theta(theta)
    if not isinstance(theta, Tensor) or theta.dim() != 1 or theta.numel() != cp.n_params:
        shape = tuple(theta.shape) if isinstance(theta, Tensor) else type(theta).__name__
        raise ThetaError(f"theta must be a 1-D tensor of length {cp.n_params}, got {shape}")
    return theta


def _wanted(section: str, flag: bool | None, objective: Objective | None, notes: list[str]) -> bool:
    """Resolve a ``None``/``True``/``False`` section flag against the presence of an objective."""
    if flag is not None and not isinstance(flag, bool):
        raise InvalidInputError(f"{section} must be True, False or None, got {flag!r}")
    if flag is False:
        notes.append(f"{section} left out: not requested ({section}=False)")
        return False
    if objective is not None:
        return True
    if flag:
        raise InvalidInputError(f"the {section} needs the objective: pass it as write_report(cp, objective, ...)")
    if flag is None:
        notes.append(f"{section} left out: no objective was given")
    return False


class _Progress:
    """Maps each stage's own ``(done, total)`` onto one monotone count over the whole report."""

    def __init__(self, callback: Callable[[int, int], None] | None, sizes: dict[str, int]) -> None:
        self.callback = callback
        self.offsets: dict[str, int] = {}
        self.sizes = sizes
        total = 0
        for name, size in sizes.items():
            self.offsets[name] = total
            total += size
        self.total = total
        self.done = 0

    def stage(self, name: str) -> Callable[[int, int], None] | None:
        if self.callback is None:
            return None

        def report(done: int, total: int) -> None:
            units = round(self.sizes[name] * done / max(total, 1))
            self._emit(self.offsets[name] + units)

        return report

    def advance(self, name: str, units: int) -> None:
        self._emit(min(self.done + units, self.offsets[name] + self.sizes[name]))

    def _emit(self, done: int) -> None:
        if self.callback is not None and done > self.done:
            self.done = done
            self.callback(done, self.total)


# -------------------------------------------------------------------------------------- computing
def _exact_histograms(cp: CriticalPoint, bins: int | None) -> dict[str, Any]:
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


def _density(objective: Objective, theta: Tensor, probes: int, steps: int, seed: int,
             progress: Callable[[int, int], None] | None) -> SpectralDensity:
    return spectral_density(HessianOperator(objective, theta), probes, steps, seed=seed, progress=progress)


def _loss_scale(loss: float) -> float:
    """The size of change a slice should show: the loss itself, or 1 where it is exactly 0."""
    return abs(loss) if loss != 0 and math.isfinite(loss) else 1.0


def _plane(
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


def _escape_line(
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
    out = _slice_dict(view)
    out.update({
        "slope": slope,
        "curvature": curvature,
        "delta_losses": [None if math.isnan(v) else v for v in delta],
        # Second-order Taylor model of the change; the probe's direction has no curvature to predict with.
        "quadratic_model": None if curvature is None else (slope * alphas + 0.5 * curvature * alphas**2).tolist(),
    })
    return out


def _slice_dict(view: LandscapeSlice | None) -> dict[str, Any] | None:
    if view is None:
        return None
    out = view.to_dict()
    norms = view.directions.double().norm(dim=1).tolist()
    out["direction_norms"] = norms
    if view.directions.shape[1] <= MAX_VECTOR_PARAMS:
        out["directions"] = view.directions.double().cpu().tolist()
    return out


def _describe_objective(objective: Objective | None) -> dict[str, Any] | None:
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


def _escape_summary(cp: CriticalPoint, objective: Objective | None, top: int = 10) -> dict[str, Any]:
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


# ---------------------------------------------------------------------------------------- figures
def _figures(payload: dict[str, Any], cp: CriticalPoint, plane: LandscapeSlice | None) -> list[tuple[str, Any]]:
    """The interactive plots, as ``(div id, plotly figure)`` in page order."""
    figures: list[tuple[str, Any]] = []
    if payload["spectrum"] is not None:
        figures.append(("spectrum", _spectrum_figure(payload["spectrum"], cp)))
    if payload["density"] is not None:
        figures.append(("density", _density_figure(payload["density"], cp)))
    if plane is not None:
        figures.append(("surface", _surface_figure(plane)))
        figures.append(("contour", _contour_figure(plane, cp)))
    if payload["landscape"]["escape"] is not None:
        figures.append(("escape-slice", _escape_figure(payload["landscape"]["escape"])))
    escape = payload["escape"]
    if escape is not None and len(escape["block_shares"]) > 1:
        figures.append(("escape-blocks", _escape_blocks_figure(escape["block_shares"])))
    if payload["blocks"] is not None:
        figures.append(("blocks", _blocks_figure(payload["blocks"])))
    return figures


def _go():
    import plotly.graph_objects as go

    return go


def _spectrum_figure(spectrum: dict[str, Any], cp: CriticalPoint):
    from plotly.subplots import make_subplots

    go = _go()
    tau = spectrum["zero_threshold"]
    fig = make_subplots(rows=2, cols=1, vertical_spacing=0.16, subplot_titles=(
        "all eigenvalues, linear bins (counts on a log axis)",
        f"bins geometric in |lambda| either side of the zero band |lambda| <= {tau:.3g}"))
    lin = spectrum["linear"]
    edges = np.array(lin["edges"])
    fig.add_trace(go.Bar(
        x=((edges[:-1] + edges[1:]) / 2).tolist(), y=lin["counts"], width=(edges[1:] - edges[:-1]).tolist(),
        customdata=np.stack([edges[:-1], edges[1:]], 1).tolist(), marker_color="#4c78a8", name="count",
        hovertemplate="[%{customdata[0]:.4g}, %{customdata[1]:.4g}): %{y}<extra></extra>"), row=1, col=1)
    fig.add_vrect(x0=-tau, x1=tau, fillcolor="grey", opacity=0.3, line_width=0, row=1, col=1)
    for value, name, colour, side in ((cp.lambda_min, "lambda_min", "#cf222e", "left"),
                                      (cp.lambda_max, "lambda_max", "#1a7f37", "right")):
        fig.add_vline(x=value, line_dash="dot", line_color=colour, row=1, col=1)
        _line_label(fig, value, f"{name} = {value:.4g}", side, colour, xref="x", yref="y domain")
    sym = spectrum["symlog"]
    sym_edges = sym["edges"]
    counts = sym["counts"]
    zero_bin = sym["zero_bin"]
    colours = ["#cf222e" if i < zero_bin else "grey" if i == zero_bin else "#1a7f37" for i in range(len(counts))]
    fig.add_trace(go.Bar(
        x=list(range(len(counts))), y=counts, marker_color=colours, name="count (geometric bins)",
        customdata=[[sym_edges[i], sym_edges[i + 1]] for i in range(len(counts))],
        hovertemplate="[%{customdata[0]:.3g}, %{customdata[1]:.3g}): %{y}<extra></extra>"), row=2, col=1)
    ticks = sorted({0, zero_bin, len(counts) - 1, *range(0, len(counts), max(1, len(counts) // 8))})
    fig.update_xaxes(tickvals=ticks, ticktext=[f"{sym_edges[i]:.2g}" for i in ticks],
                     title_text="lower edge of the bin (red: negative, grey: zero band, green: positive)", row=2, col=1)
    fig.update_xaxes(title_text="eigenvalue", row=1, col=1)
    fig.update_yaxes(type="log", dtick=1, title_text="count", row=1, col=1)
    fig.update_yaxes(type="log", dtick=1, title_text="count", row=2, col=1)
    fig.update_layout(height=720, showlegend=False, bargap=0.05,
                      title=f"Hessian spectrum: {spectrum['n']} eigenvalues ({cp.n_negative} negative, "
                            f"{cp.n_zero} zero, {cp.n_positive} positive)")
    return fig


def _line_label(fig: Any, x: float, text: str, side: str, colour: str, *, xref: str, yref: str) -> None:
    """A vertical line's label inside the plot, at its top, on the side away from the middle (labels
    above the plot collide with the title and with each other on narrow pages)."""
    fig.add_annotation(x=x, y=1, xref=xref, yref=yref, yanchor="top", xanchor="left" if side == "left" else "right",
                       xshift=4 if side == "left" else -4, text=text, showarrow=False, font={"size": 11, "color": colour},
                       bgcolor="rgba(255,255,255,0.7)")


def _density_figure(density: dict[str, Any], cp: CriticalPoint):
    go = _go()
    values = np.array(density["density"])
    peak = float(values.max()) if values.size else 1.0
    fig = go.Figure(go.Scatter(x=density["grid"], y=density["density"], mode="lines", name="SLQ density",
                               line_color="#4c78a8", hovertemplate="lambda %{x:.4g}: %{y:.3g}<extra></extra>"))
    est = cp.index_estimate
    if est is not None:
        fig.add_vrect(x0=-est.delta, x1=est.delta, fillcolor="grey", opacity=0.25, line_width=0)
        fig.add_annotation(x=0, y=0, xref="x", yref="y domain", yanchor="bottom", showarrow=False,
                           text=f"unresolved |lambda| <= delta = {est.delta:.3g}", font={"size": 11},
                           bgcolor="rgba(255,255,255,0.7)")
    for value, name, colour, side in ((cp.lambda_min, "lambda_min", "#cf222e", "left"),
                                      (cp.lambda_max, "lambda_max", "#1a7f37", "right")):
        fig.add_vline(x=value, line_dash="dot", line_color=colour)
        _line_label(fig, value, f"{name} = {value:.4g} ({cp.method})", side, colour, xref="x", yref="y domain")
    floor = max(peak * 1e-7, 1e-300)
    if cp.eigenvalues.numel() < cp.n_params:  # the iterative path's Ritz values, as a rug
        ritz = cp.eigenvalues.tolist()
        fig.add_trace(go.Scatter(x=ritz, y=[floor * 3] * len(ritz), mode="markers", name="Ritz values",
                                 marker={"symbol": "line-ns-open", "size": 14, "color": "#cf222e"},
                                 hovertemplate="Ritz value %{x:.6g}<extra></extra>"))
    fig.update_yaxes(type="log", dtick=1, range=[math.log10(floor), math.log10(max(peak, floor)) + 0.3],
                     title_text="density")
    fig.update_xaxes(title_text="eigenvalue")
    fig.update_layout(height=440, title=f"spectral density by stochastic Lanczos quadrature<br><sup>{density['hvp_count']} "
                                        f"HVPs, sigma = {density['sigma']:.3g}; extreme Ritz nodes "
                                        f"{density['lambda_min']:.4g}, {density['lambda_max']:.4g}</sup>")
    return fig


def _surface_figure(plane: LandscapeSlice):
    go = _go()
    z = _nan_to_none(plane.losses)
    assert plane.betas is not None
    fig = go.Figure(go.Surface(x=plane.alphas.tolist(), y=plane.betas.tolist(), z=z, colorscale="Viridis",
                               colorbar={"title": {"text": "loss"}}, name="loss"))
    fig.add_trace(go.Scatter3d(x=[0.0], y=[0.0], z=[plane.center_loss], mode="markers", name="theta",
                               marker={"size": 5, "color": "red"}))
    fig.update_layout(height=620, title="loss surface on the plane of the extreme eigenvectors",
                      margin={"l": 10, "r": 10, "b": 10, "t": 60},
                      scene={"xaxis_title": plane.labels[0], "yaxis_title": plane.labels[1], "zaxis_title": "loss",
                             "camera": {"eye": {"x": 1.9, "y": 1.9, "z": 1.2}},
                             "domain": {"x": [0.0, 0.9], "y": [0.05, 1.0]}})
    return fig


def _contour_figure(plane: LandscapeSlice, cp: CriticalPoint):
    go = _go()
    assert plane.betas is not None
    fig = go.Figure(go.Contour(x=plane.alphas.tolist(), y=plane.betas.tolist(), z=_nan_to_none(plane.losses),
                               colorscale="Viridis", ncontours=30, colorbar={"title": {"text": "loss"}}, name="loss"))
    fig.add_trace(go.Scatter(x=[0.0], y=[0.0], mode="markers", name=f"theta ({cp.kind})",
                             marker={"symbol": "x", "size": 12, "color": "red"}))
    fig.update_layout(height=520, title="loss contours (same plane)",
                      xaxis_title=plane.labels[0], yaxis_title=plane.labels[1])
    return fig


def _escape_figure(line: dict[str, Any]):
    go = _go()
    fig = go.Figure(go.Scatter(x=line["alphas"], y=line["delta_losses"], mode="lines+markers", name="L(theta + alpha u) - L(theta)",
                               hovertemplate="alpha %{x:.4g}: change %{y:.4g}<extra></extra>"))
    if line["quadratic_model"] is not None:
        fig.add_trace(go.Scatter(x=line["alphas"], y=line["quadratic_model"], mode="lines", line_dash="dash",
                                 name=f"second order: alpha g.u + alpha^2 (u^T H u) / 2, u^T H u = {line['curvature']:.4g}"))
    fig.add_hline(y=0.0, line_color="grey", line_width=1)
    fig.update_layout(height=420, title=f"loss change along the escape direction (L(theta) = {line['center_loss']:.6g})",
                      xaxis_title="alpha (distance along the unit vector u)", yaxis_title="loss change",
                      legend={"orientation": "h", "y": -0.25})
    return fig


def _escape_blocks_figure(shares: list[dict[str, Any]]):
    go = _go()
    fig = go.Figure(go.Bar(x=[s["share"] for s in shares], y=[f"{s['name']} ({s['n_params']:,})" for s in shares],
                           orientation="h", marker_color="#cf222e",
                           hovertemplate="%{y}: %{x:.4f} of |u|^2<extra></extra>"))
    fig.update_layout(height=160 + 28 * len(shares), title="share of the escape direction's |u|^2 in each block",
                      xaxis_title="share of |u|^2", xaxis_range=[0, 1])
    fig.update_yaxes(autorange="reversed")
    return fig


def _blocks_figure(blocks: dict[str, Any]):
    from plotly.subplots import make_subplots

    go = _go()
    rows = list(blocks["rows"])
    if blocks["whole"]["n_params"]:
        rows.append(blocks["whole"])
    names = [f"{r['name']} ({r['n_params']:,})" for r in rows]
    # As plot_blocks: magnitudes on a log axis down to 1e-6 of the largest; the sign is in the colour.
    peak = max([max(abs(r["lambda_max"]), abs(r["lambda_min"])) for r in rows] or [1.0]) or 1.0
    floor = 1e-6 * peak
    negative = [r["lambda_min"] < -max(r["delta"], floor) for r in rows]
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=("extreme eigenvalues of each diagonal block", "trace (with its interval)"))
    fig.add_trace(go.Bar(y=names, x=[max(r["lambda_max"], floor) for r in rows], orientation="h", name="lambda_max",
                         marker_color="#4c78a8", customdata=[r["lambda_max"] for r in rows],
                         hovertemplate="%{y}: lambda_max %{customdata:.4g}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Bar(y=names, x=[max(abs(r["lambda_min"]), floor) for r in rows], orientation="h",
                         name="|lambda_min| (red: negative)", marker_pattern_shape="/",
                         marker_color=["#cf222e" if neg else "#8c959f" for neg in negative],
                         customdata=[r["lambda_min"] for r in rows],
                         hovertemplate="%{y}: lambda_min %{customdata:.4g}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Bar(y=names, x=[r["trace"] for r in rows], orientation="h", name="trace", marker_color="#54a24b",
                         error_x={"type": "data", "symmetric": False,
                                  "array": [max(r["trace_high"] - r["trace"], 0.0) for r in rows],
                                  "arrayminus": [max(r["trace"] - r["trace_low"], 0.0) for r in rows]},
                         hovertemplate="%{y}: trace %{x:.4g}<extra></extra>"), row=1, col=2)
    fig.update_xaxes(type="log", dtick=1, title_text="magnitude", row=1, col=1)
    fig.update_xaxes(title_text="trace", row=1, col=2)
    fig.update_yaxes(autorange="reversed", row=1, col=1)
    fig.update_layout(height=200 + 45 * len(rows), barmode="group", title=f"Hessian blocks by {blocks['by']}",
                      legend={"orientation": "h", "y": -0.2})
    return fig


def _nan_to_none(values: Tensor) -> list[Any]:
    return [[None if math.isnan(v) else v for v in row] for row in values.double().tolist()]


# ------------------------------------------------------------------------------------------- PNGs
def _write_pngs(
    folder: Path, cp: CriticalPoint, payload: dict[str, Any], spectral: SpectralDensity | None,
    plane: LandscapeSlice | None, line: dict[str, Any] | None, blocks: BlockReport | None,
) -> dict[str, Path]:
    """Static matplotlib versions of the figures (for papers and for readers without JavaScript)."""
    pngs: dict[str, Path] = {}
    if payload["spectrum"] is not None or spectral is not None:
        pngs["spectrum"] = _plot_spectrum(payload["spectrum"], spectral, cp, folder / "spectrum.png")
    if plane is not None:
        pngs["landscape_plane"] = plot_landscape(
            plane, folder / "landscape_plane.png", title="loss on the plane of the extreme eigenvectors")
    if line is not None:
        pngs["landscape_escape"] = _plot_escape_line(line, folder / "landscape_escape.png")
    if blocks is not None and (blocks.rows or blocks.whole.n_params):
        pngs["blocks"] = plot_blocks(blocks, folder / "blocks.png")
    return pngs


def _plot_spectrum(spectrum: dict[str, Any] | None, spectral: SpectralDensity | None, cp: CriticalPoint,
                   path: Path) -> Path:
    plt = _pyplot()
    panels = (spectrum is not None) + (spectral is not None)
    fig, axes = plt.subplots(panels, 1, figsize=(7, 3.4 * panels), squeeze=False)
    ax_iter = iter(axes[:, 0])
    if spectrum is not None:
        ax = next(ax_iter)
        edges = np.array(spectrum["linear"]["edges"])
        ax.bar(edges[:-1], spectrum["linear"]["counts"], width=np.diff(edges), align="edge", color="tab:blue")
        tau = spectrum["zero_threshold"]
        ax.axvspan(-tau, tau, color="grey", alpha=0.3, label=f"zero band |lambda| <= {tau:.2g}")
        ax.set_yscale("log")
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("count")
        ax.set_title(f"{spectrum['n']} eigenvalues: {cp.n_negative} negative, {cp.n_zero} zero, {cp.n_positive} positive")
    if spectral is not None:
        ax = next(ax_iter)
        density = spectral.density.numpy()
        peak = float(density.max())
        ax.semilogy(spectral.grid.numpy(), np.maximum(density, peak * 1e-7), color="tab:blue")
        ax.set_ylim(peak * 1e-7, peak * 2)
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        ax.set_title(f"SLQ spectral density ({spectral.hvp_count} HVPs)")
    for ax in axes[:, 0]:
        ax.axvline(cp.lambda_min, color="tab:red", ls=":", label=f"lambda_min = {cp.lambda_min:.4g}")
        ax.axvline(cp.lambda_max, color="tab:green", ls=":", label=f"lambda_max = {cp.lambda_max:.4g}")
        ax.legend(fontsize=7, loc="upper right")
    return _save(fig, path)


def _plot_escape_line(line: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    alphas = line["alphas"]
    delta = [math.nan if v is None else v for v in line["delta_losses"]]
    ax.plot(alphas, delta, color="tab:blue", marker=".", label="L(theta + alpha u) - L(theta)")
    if line["quadratic_model"] is not None:
        ax.plot(alphas, line["quadratic_model"], color="tab:red", ls="--", label="second-order model")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("alpha along the escape direction u")
    ax.set_ylabel("loss change")
    ax.set_title(f"escape direction (u^T H u = {_fmt(line['curvature'])})")
    ax.legend(fontsize=8)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------- page
# Installed before anything else runs, so that an error anywhere after it (plotly.js included, or a
# resource that fails to load) is recorded in the DOM, where a headless browser's dump can read it.
_ERROR_CAPTURE = """(function () {
  var errors = [];
  window.__saddlescopeErrors = errors;
  function show() {
    document.documentElement.setAttribute("data-js-errors", String(errors.length));
    var box = document.getElementById("js-errors");
    if (box) { box.textContent = errors.join("\\n"); box.hidden = errors.length === 0; }
  }
  function record(message) { errors.push(String(message)); show(); }
  window.onerror = function (message, source, line) {
    record("error: " + message + " (" + (source || "inline") + ":" + (line || 0) + ")");
  };
  window.addEventListener("error", function (event) {
    if (event.target && event.target !== window) {
      record("failed to load: " + (event.target.src || event.target.href || event.target.tagName));
    }
  }, true);
  window.addEventListener("unhandledrejection", function (event) {
    var reason = event.reason;
    record("unhandled rejection: " + (reason && (reason.stack || reason.message) || reason));
  });
  document.addEventListener("DOMContentLoaded", show);
  show();
})();"""

# Draws every figure from the JSON island and marks the body once all are drawn.
_RENDER = """(function () {
  var figures = JSON.parse(document.getElementById("figure-data").textContent);
  var config = JSON.parse(document.getElementById("plotly-config").textContent);
  var jobs = figures.map(function (f) {
    return Plotly.newPlot(f.id, f.figure.data, f.figure.layout, config);
  });
  Promise.all(jobs).then(function () {
    document.body.setAttribute("data-layout-problems", JSON.stringify(layoutProblems()));
    document.body.setAttribute("data-plots-rendered", String(jobs.length));
  });

  // What a reader would see as broken, measured on the rendered SVG (the 3-D scene is WebGL and not
  // covered): tick labels of one axis overlapping each other, an axis title over tick labels, and
  // text outside its figure (clipped).
  function overlap(a, b) {
    return a.left < b.right - 1 && b.left < a.right - 1 && a.top < b.bottom - 1 && b.top < a.bottom - 1;
  }
  function boxes(nodes) {
    return Array.prototype.map.call(nodes, function (t) { return {text: t.textContent, r: t.getBoundingClientRect()}; })
      .filter(function (b) { return b.r.width > 0 && b.r.height > 0; });
  }
  function layoutProblems() {
    var problems = [];
    document.querySelectorAll(".plot").forEach(function (plot) {
      var frame = plot.getBoundingClientRect();
      var ticks = [];
      plot.querySelectorAll("g.xaxislayer-above, g.yaxislayer-above").forEach(function (layer) {
        var labels = boxes(layer.querySelectorAll("text"));
        for (var i = 0; i < labels.length; i++) for (var j = i + 1; j < labels.length; j++)
          if (overlap(labels[i].r, labels[j].r))
            problems.push(plot.id + ": tick labels overlap: " + labels[i].text + " / " + labels[j].text);
        ticks = ticks.concat(labels);
      });
      boxes(plot.querySelectorAll("g.g-xtitle text, g.g-ytitle text, g[class^='g-x'][class$='title'] text, " +
                                  "g[class^='g-y'][class$='title'] text")).forEach(function (title) {
        ticks.forEach(function (tick) {
          if (overlap(title.r, tick.r)) problems.push(plot.id + ": axis title over tick labels: " + title.text);
        });
      });
      var labels = boxes(plot.querySelectorAll("g.annotation text, g.g-gtitle text"));
      for (var a = 0; a < labels.length; a++) for (var b = a + 1; b < labels.length; b++)
        if (overlap(labels[a].r, labels[b].r))
          problems.push(plot.id + ": labels overlap: " + labels[a].text + " / " + labels[b].text);
      boxes(plot.querySelectorAll("svg text")).forEach(function (b) {
        if (b.r.left < frame.left - 1 || b.r.right > frame.right + 1 || b.r.top < frame.top - 1 ||
            b.r.bottom > frame.bottom + 1) problems.push(plot.id + ": text outside the figure: " + b.text);
      });
    });
    return problems.filter(function (p, i, all) { return all.indexOf(p) === i; });
  }
})();"""

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1100px;
       padding: 1rem 1.5rem 3rem; color: #1f2328; }
h1 { font-size: 1.5rem; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .3rem; margin-top: 2rem; }
.badge { display: inline-block; color: white; border-radius: 1rem; padding: .2rem .9rem; font-weight: 600;
         font-size: 1.2rem; }
.reason { margin: .6rem 0 1rem; }
#reading p { font-size: 1.08rem; margin: .5rem 0; max-width: 60rem; }
table { border-collapse: collapse; margin: .5rem 0; } td, th { padding: .2rem .8rem .2rem 0; text-align: left;
        vertical-align: top; } th { color: #57606a; font-weight: 500; }
td.num { font-variant-numeric: tabular-nums; }
.ok { color: #1a7f37; } .bad { color: #cf222e; } .note { color: #57606a; }
pre#js-errors { color: #cf222e; background: #ffebe9; padding: .5rem; }
.plot { min-height: 200px; }
code { background: #f6f8fa; padding: 0 .2rem; }
"""


def _fmt(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


def _default_title(cp: CriticalPoint) -> str:
    return f"saddlescope report: {cp.kind.replace('_', ' ')} ({cp.n_params:,} parameters)"


def _rows(items: list[tuple[str, str]]) -> str:
    return "\n".join(f"<tr><th>{html.escape(k)}</th><td class=num>{v}</td></tr>" for k, v in items)


def _quantity_cell(c: dict[str, Any], name: str, spec: str = ".6g", span_id: str | None = None) -> str:
    """A number with what it is (``CriticalPoint.quantities``): exact, a bound and its side, an
    interval, or an estimate with its error; the bare value for an older report without them."""
    value = f"<span id={span_id}>{_fmt(c[name], spec)}</span>" if span_id else _fmt(c[name], spec)
    q = (c.get("quantities") or {}).get(name)
    if q is None:
        return value
    basis = f" <span class=note>({html.escape(q['basis'])})</span>" if q["basis"] else ""
    status = q["is"]
    if status == "exact":
        err = "" if q["error"] is None else f" &plusmn; {_fmt(q['error'], '.2g')}"
        return f"{value}{err}{basis}"
    if status == "upper_bound":
        return f"&le; {value} <b>(an upper bound)</b>{basis}"
    if status == "lower_bound":
        return f"&ge; {value} <b>(a lower bound)</b>{basis}"
    if status == "interval":
        return f"{value}, in [{_fmt(q['low'], spec)}, {_fmt(q['high'], spec)}]{basis}"
    return (f"{value} &plusmn; {_fmt(q['error'], '.3f')} <b>(an estimate)</b>, in "
            f"[{_fmt(q['low'], '.4f')}, {_fmt(q['high'], '.4f')}]{basis}")


def _counts_cell(c: dict[str, Any], tol: dict[str, Any]) -> str:
    """Integer counts where they were counted; fractions with their interval where estimated."""
    if c["n_negative"] is not None:
        return (f"{c['n_negative']} negative, {c['n_zero']} zero, {c['n_positive']} positive of "
                f"{c['n_params']:,} (counted; zero: |lambda| &le; {_fmt(tol['zero_threshold'], '.3g')})")
    q = c.get("quantities") or {}
    if "negative" not in q:
        return f"not estimated ({c['n_params']:,} parameters)"
    parts = [f"{name} {_fmt(q[name]['value'], '.3f')} [{_fmt(q[name]['low'], '.3f')}, {_fmt(q[name]['high'], '.3f')}]"
             for name in ("negative", "zero", "positive")]
    return f"fractions of {c['n_params']:,}: " + ", ".join(parts) + " (estimates, not counts)"


def _header(payload: dict[str, Any]) -> str:
    """The verdict and every number it rests on."""
    c = payload["critical_point"]
    tol = c["tolerances"]
    colour = KIND_COLOURS.get(c["kind"], "#57606a")
    critical = c["grad_norm"] <= tol["grad_tol"]
    grad = (f"{_fmt(c['grad_norm'], '.3g')} <span class={'ok' if critical else 'bad'}>"
            f"{'&le;' if critical else '&gt;'} grad_tol {_fmt(tol['grad_tol'], '.3g')}</span>")
    items = [
        ("loss", _fmt(c["loss"], ".6g")),
        ("gradient norm", grad),
        ("lambda_min", _quantity_cell(c, "lambda_min", span_id="lambda-min")),
        ("lambda_max", _quantity_cell(c, "lambda_max", span_id="lambda-max")),
    ]
    est = c["index_estimate"]
    if est is None:
        items += [("min ratio", _fmt(c["min_ratio"], ".4f")), ("index", _fmt(c["index"], ".4f"))]
    elif not est.get("resolved", True) and "zero" in (c.get("quantities") or {}):
        # One probe that proved the spectrum unresolved: intervals, no standard error to quote.
        q = c["quantities"]
        items += [
            ("min ratio", f"in [0, {_fmt(q['min_ratio']['high'], '.4f')}] (fraction above +delta; not resolved)"),
            ("index", f"in [0, {_fmt(q['index']['high'], '.4f')}] (fraction below -delta; not resolved)"),
            ("unresolved", (f"in [{_fmt(q['zero']['low'], '.4f')}, 1] within &plusmn;delta, delta = "
                            f"{_fmt(est['delta'], '.3g')} <span class=note>({html.escape(q['zero']['basis'])})</span>")),
        ]
    else:
        items += [
            ("min ratio", (f"{_fmt(est['min_ratio'], '.4f')} &plusmn; {_fmt(est['min_ratio_error'], '.3f')} "
                           "(fraction above +delta)")),
            ("index", f"{_fmt(est['value'], '.4f')} &plusmn; {_fmt(est['error'], '.3f')} (fraction below -delta)"),
            ("unresolved", (f"{_fmt(est['within'], '.4f')} (stderr {_fmt(est['within_stderr'], '.2g')}) "
                            f"within &plusmn;delta, delta = {_fmt(est['delta'], '.3g')} "
                            f"({est['n_probes']} probes x {est['steps']} steps)")),
        ]
    precision = c["precision"]
    items += [
        ("eigenvalues", _counts_cell(c, tol)),
        ("method", f"{html.escape(c['method'])}, resolved by {html.escape(c['resolved_by'])}, {c['hvp_count']} HVPs"),
        ("tolerances", (f"grad_tol {_fmt(tol['grad_tol'], '.3g')}, rtol {_fmt(tol['rtol'], '.3g')}, "
                        f"atol {_fmt(tol['atol'], '.3g')}, zero threshold {_fmt(tol['zero_threshold'], '.3g')}")),
        ("precision", (f"model {html.escape(precision['model'])}, eigensolver "
                       f"{html.escape(precision['eigensolver'])}, eigenvalue rounding "
                       f"{_fmt(precision['eigenvalue_rounding'], '.3g')}")),
        ("mode, seed", f"{html.escape(c['mode'])}, seed {c['seed']} (report seed {payload['seed']})"),
    ]
    if c["probe"] is not None:
        p = c["probe"]
        items.append(("null-space probe", html.escape(
            f"null dimension {p['null_dim']}, {p['directions']} directions, largest decrease "
            f"{_fmt(p['largest_decrease'], '.3g')}, largest increase {_fmt(p['largest_increase'], '.3g')}, "
            f"{p['evaluations']} evaluations")))
    obj = payload["objective"]
    if obj is not None:
        described = ", ".join(f"{k}: {v}" for k, v in obj["description"].items())
        items.append(("objective", html.escape(f"{described}; {obj['n_params']:,} parameters, {obj['dtype']}")))
    if payload["command"]:
        items.append(("command", f"<code>{html.escape(payload['command'])}</code>"))
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in [*c["notes"], *payload["notes"]])
    return (
        f"<h1>{html.escape(payload['title'])}</h1>\n"
        f"<div id=verdict><span class=badge style='background:{colour}'>{html.escape(c['kind'])}</span> "
        f"<span class=note>(second-order test: {html.escape(c['curvature_kind'])})</span></div>\n"
        f"<div id=reading>{''.join(f'<p>{html.escape(line)}</p>' for line in plain_reading(c))}</div>\n"
        f"<p class=reason id=reason><span class=note>Why:</span> {html.escape(c['reason'])}</p>\n"
        f"<table id=summary>{_rows(items)}</table>\n"
        + (f"<h3>Notes</h3><ul id=notes>{notes}</ul>\n" if notes else "")
    )


def _escape_section(payload: dict[str, Any]) -> str:
    escape = payload["escape"]
    if escape is None:
        return "<p class=note>No escape direction: no negative curvature (or decrease) was found.</p>"
    curvature = escape["curvature"]
    what = (f"unit eigenvector of negative curvature, u<sup>T</sup>Hu = {_fmt(curvature, '.6g')}: "
            f"L(&theta; + &epsilon;u) &asymp; L(&theta;) + &epsilon; g&middot;u + &frac12; "
            f"({_fmt(curvature, '.4g')}) &epsilon;<sup>2</sup>"
            if curvature is not None else "direction of the largest loss decrease found by the null-space probe "
                                          "(higher than second order: no curvature to quote)")
    line = payload["landscape"]["escape"]
    slope = "" if line is None else f" Slope along it: g&middot;u = {_fmt(line['slope'], '.3g')}."
    parts = [f"<p id=escape-curvature>{what}.{slope}</p>"]
    if escape["block_shares"]:
        parts.append("<table id=escape-shares><tr><th>block</th><th>parameters</th><th>share of |u|&sup2;</th></tr>"
                     + "".join(f"<tr><td>{html.escape(s['name'])}</td><td class=num>{s['n_params']:,}</td>"
                               f"<td class=num>{s['share']:.4f}</td></tr>" for s in escape["block_shares"])
                     + "</table>")
    parts.append("<table id=escape-components><tr><th>parameter</th><th>flat index</th><th>component of u</th></tr>"
                 + "".join(f"<tr><td>{html.escape(t['name'])}</td><td class=num>{t['index']}</td>"
                           f"<td class=num>{t['value']:+.4f}</td></tr>" for t in escape["top_components"])
                 + "</table>")
    return "\n".join(parts)


def _div(fig_id: str, ids: set[str]) -> str:
    return f"<div id='{fig_id}' class=plot></div>" if fig_id in ids else ""


PLOTLY_JS = "plotly.min.js"


def _write_plotly_js(folder: Path) -> str:
    """plotly.js beside the page (kept when an identical copy is already there); returns its name."""
    from plotly.offline import get_plotlyjs

    path, code = folder / PLOTLY_JS, get_plotlyjs()
    if not (path.is_file() and path.stat().st_size == len(code.encode()) and path.read_text() == code):
        atomic_write_text(path, code)
    return PLOTLY_JS


def _plotly_script(payload: dict[str, Any]) -> str:
    """plotly.js: a script element loading the shared copy beside the page, or the library inline."""
    shared = payload["files"].get("plotly_js")
    if shared:
        return f"<script src='{html.escape(shared)}'></script>"
    from plotly.offline import get_plotlyjs

    return f"<script>{get_plotlyjs()}</script>"


def _page(payload: dict[str, Any], figures: list[tuple[str, Any]]) -> str:
    """The HTML: error capture first, plotly.js (shared or inline), then sections; figures drawn from a
    JSON island."""
    import plotly.io as pio

    ids = {fig_id for fig_id, _ in figures}
    data = [{"id": fig_id, "figure": json.loads(pio.to_json(fig, validate=False))} for fig_id, fig in figures]
    notes = payload["notes"]
    spectrum_note = ("" if "spectrum" in ids or "density" in ids
                     else "<p class=note>No spectrum to show: the iterative path without the objective.</p>")
    why = "; ".join(n for n in notes if n.startswith("landscape")) or "landscape left out"
    landscape_note = "" if "surface" in ids else f"<p class=note>{html.escape(why)}.</p>"
    files = payload["files"]
    links = " &middot; ".join(f"<a href='{html.escape(name)}'>{html.escape(name)}</a>"
                              for name in [files["json"], *files["pngs"].values()])
    body = f"""
<pre id=js-errors hidden></pre>
<header>{_header(payload)}</header>
<section id=spectrum-section><h2>Spectrum</h2>{spectrum_note}{_div('spectrum', ids)}{_div('density', ids)}</section>
<section id=landscape-section><h2>Landscape</h2>{landscape_note}{_div('surface', ids)}{_div('contour', ids)}</section>
<section id=escape-section><h2>Escape direction</h2>{_div('escape-slice', ids)}{_escape_section(payload)}{_div('escape-blocks', ids)}</section>
{"<section id=blocks-section><h2>Per-block curvature</h2>" + _div('blocks', ids) + "</section>" if 'blocks' in ids else ""}
<footer><h2>Files</h2><p>{links} (every number on this page is in {html.escape(files['json'])})</p></footer>
"""
    # "</" inside a script element would end it early; "<\\/" is the same JSON string.
    island = json.dumps(data).replace("</", "<\\/")
    return (
        "<!DOCTYPE html>\n<html lang=en data-js-errors=0>\n<head>\n<meta charset='utf-8'>\n"
        f"<script>{_ERROR_CAPTURE}</script>\n"
        f"<title>{html.escape(payload['title'])}</title>\n"
        "<meta name=viewport content='width=device-width, initial-scale=1'>\n"
        f"<style>{_CSS}</style>\n"
        f"{_plotly_script(payload)}\n"
        f"</head>\n<body data-plots-expected={len(figures)}>\n{body}\n"
        f"<script type='application/json' id=figure-data>{island}</script>\n"
        f"<script type='application/json' id=plotly-config>{json.dumps(PLOTLY_CONFIG)}</script>\n"
        f"<script>{_RENDER}</script>\n</body>\n</html>\n"
    )
