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

The pieces: :mod:`~saddlescope.report.sections` computes the numbers beyond the verdict,
:mod:`~saddlescope.report.figures` draws the interactive figures from them,
:mod:`~saddlescope.report.page` writes the HTML around those, and :mod:`~saddlescope.report.plots` the PNGs.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saddlescope.atomic import atomic_write_text
from saddlescope.critical import CriticalPoint, sharpen_escape
from saddlescope.curvature.blocks import BlockReport
from saddlescope.curvature.density import SpectralDensity
from saddlescope.distributed import is_main_process
from saddlescope.errors import InvalidInputError, ThetaError
from saddlescope.objective import Objective
from saddlescope.report.figures import interactive_figures
from saddlescope.report.io import write_json
from saddlescope.report.page import default_title, page, write_plotly_js
from saddlescope.report.plots import write_report_pngs
from saddlescope.report.sections import (
    escape_slice,
    escape_summary,
    exact_histograms,
    objective_summary,
    plane_slice,
    slice_dict,
    slq_density,
)

__all__ = ["REPORT_FORMAT", "ReportFiles", "write_report"]

REPORT_FORMAT = "saddlescope.report/1"


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
        "title": title or default_title(cp),
        "command": command,
        "seed": seed,
        "critical_point": cp.to_dict(),
        "objective": objective_summary(objective),
        "settings": {"resolution": resolution, "escape_resolution": escape_resolution,
                     "density_probes": density_probes, "density_steps": steps,
                     "histogram_bins": histogram_bins},
    }
    payload["spectrum"] = exact_histograms(cp, histogram_bins) if exact else None
    spectral: SpectralDensity | None = None
    if want_density:
        assert objective is not None
        spectral = slq_density(objective, cp.theta, density_probes, steps, seed, tracker.stage("density"))
    payload["density"] = None if spectral is None else spectral.to_dict()

    plane = line = None
    if want_landscape:
        assert objective is not None
        plane = plane_slice(cp, objective, centre, resolution, span, seed, tracker.stage("plane"))
        if has_escape:
            line = escape_slice(cp, objective, centre, escape_resolution, escape_span, plane, tracker.stage("escape"))
    payload["landscape"] = {"plane": slice_dict(plane), "escape": line}
    payload["escape"] = escape_summary(cp, objective) if has_escape else None
    payload["blocks"] = None if blocks is None else blocks.to_dict()
    if not has_escape:
        notes.append("no escape direction: the verdict found no direction of negative curvature or decrease")

    figures = interactive_figures(payload, cp, plane)
    payload["figures"] = [fig_id for fig_id, _ in figures]
    payload["notes"] = notes

    html_path, json_path = folder / "report.html", folder / "report.json"
    if objective is not None and objective.sharded and not is_main_process():
        # torch.distributed: every rank took part in the sums above; rank 0 alone writes the files.
        return ReportFiles(html=html_path, json=json_path, pngs={}, figures=list(payload["figures"]),
                           notes=list(notes), seconds=time.perf_counter() - start)
    folder.mkdir(parents=True, exist_ok=True)
    pngs = write_report_pngs(folder, cp, payload, spectral, plane, line, blocks)
    tracker.advance("files", 3)
    payload["files"] = {"html": html_path.name, "json": json_path.name,
                        "pngs": {name: path.name for name, path in pngs.items()},
                        "plotly_js": None if single_file else write_plotly_js(folder)}
    payload["seconds"] = time.perf_counter() - start
    write_json(json_path, payload)
    atomic_write_text(html_path, page(payload, figures))
    tracker.advance("files", 1)
    return ReportFiles(html=html_path, json=json_path, pngs=pngs, figures=list(payload["figures"]),
                       notes=list(notes), seconds=time.perf_counter() - start)


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
