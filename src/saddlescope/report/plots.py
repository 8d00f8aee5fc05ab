"""Static plots (matplotlib, PNG/SVG)."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saddlescope.atomic import atomic_write_bytes
from saddlescope.critical import CriticalPoint
from saddlescope.curvature.blocks import BlockReport
from saddlescope.curvature.density import SpectralDensity
from saddlescope.errors import InvalidInputError
from saddlescope.landscape import LandscapeSlice, TrajectoryProjection
from saddlescope.objective import Objective


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: works with no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike[str]) -> Path:
    """Save ``fig`` in the format of ``path``'s suffix, atomically, and close it."""
    path = Path(path)
    buffer = io.BytesIO()
    try:
        fig.tight_layout()
        fig.savefig(buffer, format=path.suffix.lstrip(".").lower() or "png")
    finally:
        _pyplot().close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def plot_surface_2d(
    objective: Objective,
    path: str | os.PathLike[str],
    *,
    points: Sequence[CriticalPoint] = (),
    curves: Sequence[tuple[str, Callable[[np.ndarray], np.ndarray]]] = (),
    extent: tuple[float, float, float, float] = (-2.0, 2.0, -2.0, 2.0),
    resolution: int = 201,
    log_levels: bool = True,
    title: str | None = None,
) -> Path:
    """Contour map of a two-parameter objective, critical points marked by kind, escape arrows drawn.

    Args:
        points: verdicts to mark; each with an escape direction gets an arrow.
        curves: ``(label, y = fn(x))`` curves to overlay, e.g. a valley of minima.
        extent: ``(xmin, xmax, ymin, ymax)``.
        log_levels: contour ``log10(loss - min + 1e-3)`` so that flat valleys stay visible.
    """
    if objective.n_params != 2:
        raise InvalidInputError(f"a 2-D surface needs 2 parameters, the objective has {objective.n_params}")
    plt = _pyplot()
    xs = np.linspace(extent[0], extent[1], resolution)
    ys = np.linspace(extent[2], extent[3], resolution)
    grid_x, grid_y = np.meshgrid(xs, ys)
    pts = torch.tensor(np.stack([grid_x.ravel(), grid_y.ravel()], 1), dtype=objective.dtype)
    values = np.array([float(objective.loss(p)) for p in pts]).reshape(grid_x.shape)
    shown = np.log10(values - values.min() + 1e-3) if log_levels else values

    fig, ax = plt.subplots(figsize=(6.4, 5.6), dpi=120)
    filled = ax.contourf(grid_x, grid_y, shown, levels=40, cmap="viridis")
    ax.contour(grid_x, grid_y, shown, levels=20, colors="white", linewidths=0.3, alpha=0.6)
    fig.colorbar(filled, ax=ax, label="log10(loss - min + 1e-3)" if log_levels else "loss")
    for label, fn in curves:
        cx = np.linspace(extent[0], extent[1], 2000)
        cy = fn(cx)
        cy = np.where((cy >= extent[2]) & (cy <= extent[3]), cy, np.nan)
        ax.plot(cx, cy, color="white", lw=2.0, ls="--", label=label)
    style = {"saddle": ("X", "red"), "minimum": ("o", "white"), "maximum": ("^", "orange"),
             "degenerate": ("s", "gray"), "not_critical": (".", "black")}
    span = max(extent[1] - extent[0], extent[3] - extent[2])
    for cp in points:
        x, y = cp.theta.tolist()
        marker, color = style.get(cp.kind, ("*", "pink"))
        ax.scatter([x], [y], marker=marker, s=140, c=color, edgecolors="black", zorder=5,
                   label=f"{cp.kind} at ({x:.2g}, {y:.2g})")
        if cp.escape_direction is not None:
            dx, dy = (cp.escape_direction * 0.25 * span).tolist()
            for sgn in (1, -1) if cp.grad_norm == 0 else (1,):
                ax.annotate("", xy=(x + sgn * dx, y + sgn * dy), xytext=(x, y),
                            arrowprops={"arrowstyle": "->", "color": "red", "lw": 2.5}, zorder=6)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_xlabel("theta[0]")
    ax.set_ylabel("theta[1]")
    ax.set_title(title or "loss surface")
    ax.legend(loc="upper right", fontsize=8, framealpha=0.85)
    return _save(fig, path)


def plot_loss_curve(
    losses: Sequence[float],
    path: str | os.PathLike[str],
    *,
    markers: Sequence[tuple[int, str]] = (),
    title: str = "training loss",
    label: str | None = None,
    runs: Sequence[tuple[str, int, Sequence[float]]] = (),
) -> Path:
    """Loss against step (log scale), with labelled vertical markers (e.g. ``(step, "stall")``).

    Args:
        losses: the main run, from step 0 (``label`` names it in the legend).
        runs: more runs as ``(label, first step, losses)``, e.g. training resumed after an escape step,
            drawn on the same axes so the two can be compared step for step.
    """
    from matplotlib import ticker

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.plot(np.arange(len(losses)), losses, lw=1.5, label=label)
    for name, start, values in runs:
        ax.plot(np.arange(start, start + len(values)), values, lw=1.5, label=name)
    ax.set_yscale("log")
    # Plain numbers on the log axis: a range within one decade otherwise reads "2.3x10^0".
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.3g}"))
    top = ax.get_ylim()[1]
    for step, text in markers:
        ax.axvline(step, color="red", ls="--", lw=1)
        ax.text(step, top, f" {text}", color="red", va="top", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    if label is not None or runs:
        ax.legend(loc="lower left", fontsize=8, framealpha=0.85)
    return _save(fig, path)


def plot_blocks(report: BlockReport, path: str | os.PathLike[str]) -> Path:
    """Bars per block: lambda_max, |lambda_min| (hatched where negative) and the trace, log scale."""
    plt = _pyplot()
    rows = [*report.rows, report.whole] if report.whole.n_params else list(report.rows)
    if not rows:
        raise InvalidInputError("the report has no rows to plot")
    names = [f"{r.name} ({r.n_params:,})" for r in rows]
    y = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.8), sharey=True)
    # Log scale down to 1e-6 of the largest value; what is below (zero within a block's own
    # threshold, rounding) is drawn at that floor, in grey.
    peak = max(max(abs(r.lambda_max), abs(r.lambda_min)) for r in rows) or 1.0
    floor = 1e-6 * peak
    top = [max(r.lambda_max, floor) for r in rows]
    low = [max(abs(r.lambda_min), floor) for r in rows]
    negative = [r.lambda_min < -max(r.delta, floor) for r in rows]
    axes[0].barh(y - 0.2, top, height=0.4, color="tab:blue", label="lambda_max")
    axes[0].barh(y + 0.2, low, height=0.4, color=["tab:red" if neg else "tab:gray" for neg in negative],
                 hatch="//", label="|lambda_min| (red: negative; grey: zero or positive)")
    axes[0].set_xscale("log")
    axes[0].set_xlim(left=floor / 2)
    axes[0].set_yticks(y, names)
    axes[0].invert_yaxis()
    axes[0].legend(loc="lower right", fontsize=8)
    axes[0].set_title("extreme eigenvalues of each diagonal block")
    traces = [r.trace for r in rows]
    errors = [max(r.trace_high - r.trace, 0.0) for r in rows]
    axes[1].barh(y, traces, xerr=errors, color="tab:green")
    axes[1].axvline(0, color="black", lw=0.8)
    axes[1].set_title("trace (with its interval)")
    fig.suptitle(f"Hessian blocks by {report.by}")
    return _save(fig, path)


def plot_landscape(
    landscape: LandscapeSlice,
    path: str | os.PathLike[str],
    *,
    trajectory: TrajectoryProjection | None = None,
    title: str | None = None,
) -> Path:
    """A 1-D slice as a curve, a 2-D slice as a filled contour map (with a trajectory drawn on it)."""
    plt = _pyplot()
    losses = landscape.losses.double().numpy()
    if landscape.dim == 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(landscape.alphas.numpy(), losses, color="tab:blue")
        ax.axvline(0.0, color="grey", lw=0.8, ls=":")
        ax.set_xlabel(landscape.labels[0])
        ax.set_ylabel("loss")
    else:
        fig, ax = plt.subplots(figsize=(6.2, 5.2))
        assert landscape.betas is not None
        mesh = ax.contourf(landscape.alphas.numpy(), landscape.betas.numpy(), losses, levels=30, cmap="viridis")
        ax.contour(landscape.alphas.numpy(), landscape.betas.numpy(), losses, levels=15, colors="white",
                   linewidths=0.4, alpha=0.6)
        fig.colorbar(mesh, ax=ax, label="loss")
        ax.plot([0.0], [0.0], marker="*", color="red", ms=12, label="theta")
        if trajectory is not None:
            xy = trajectory.coords.numpy()
            ax.plot(xy[:, 0], xy[:, 1], color="white", lw=1.5, marker=".", ms=3, label="trajectory")
            ax.plot(xy[0, 0], xy[0, 1], marker="o", color="orange", ms=7, label="start")
        ax.set_xlabel(landscape.labels[0])
        ax.set_ylabel(landscape.labels[1])
        ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title or f"loss landscape ({landscape.kind} directions)")
    return _save(fig, path)


# ------------------------------------------------------------------ the report's PNGs (write_report)
def write_report_pngs(
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
    curvature = "n/a" if line["curvature"] is None else format(line["curvature"], ".4g")
    ax.set_title(f"escape direction (u^T H u = {curvature})")
    ax.legend(fontsize=8)
    return _save(fig, path)
