"""Plots of an escape race: trajectories over the contour map (2-D problems), loss curves (others).

Each optimizer is drawn at its best learning rate (see
:data:`saddlescope.experiments.race.BEST_LR_RULE`) on its first seed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from saddlescope.errors import InvalidInputError
from saddlescope.experiments.race import RaceResult, RunRecord
from saddlescope.experiments.race_problems import RaceProblem
from saddlescope.report.plots import _pyplot, _save


def ema(values: Sequence[float], span: float = 10.0) -> np.ndarray:
    """Bias-corrected exponential moving average with weight ``2 / (span + 1)`` on the newest value."""
    alpha = 2.0 / (span + 1.0)
    out = np.empty(len(values))
    avg, weight = 0.0, 0.0
    for i, v in enumerate(values):
        avg = (1 - alpha) * avg + alpha * v
        weight = (1 - alpha) * weight + alpha
        out[i] = avg / weight
    return out


def _first_seed_runs(result: RaceResult, problem: str) -> list[tuple[str, RunRecord]]:
    runs = []
    for s in result.summaries:
        if s.problem == problem:
            chosen = result.runs(problem, s.optimizer)
            if chosen:
                runs.append((s.optimizer, chosen[0]))
    return runs


def _label(optimizer: str, record: RunRecord) -> str:
    outcome = f"{record.steps} steps" if record.escaped else record.status
    return f"{optimizer} (lr {record.lr:g}): {outcome}"


def plot_race_trajectories(
    result: RaceResult, problem: RaceProblem, path: str | os.PathLike[str], resolution: int = 161
) -> Path:
    """Contour map of a 2-D problem with each optimizer's path (best lr, first seed)."""
    if problem.surface is None or problem.extent is None:
        raise InvalidInputError(f"{problem.name} is not a 2-D problem: plot its loss curves instead")
    plt = _pyplot()
    x0, x1, y0, y1 = problem.extent
    gx, gy = np.meshgrid(np.linspace(x0, x1, resolution), np.linspace(y0, y1, resolution))
    with torch.no_grad():
        values = problem.surface(torch.from_numpy(gx), torch.from_numpy(gy)).numpy()
    if problem.loss_floor is not None:
        shown, label = np.log10(values - problem.loss_floor + 1e-3), "log10(loss - min + 1e-3)"
    else:
        shown, label = values, "loss"
    fig, ax = plt.subplots(figsize=(7.2, 6.0), dpi=120)
    filled = ax.contourf(gx, gy, shown, levels=40, cmap="viridis")
    ax.contour(gx, gy, shown, levels=20, colors="white", linewidths=0.3, alpha=0.5)
    ax.contour(gx, gy, values, levels=[problem.threshold], colors="red", linewidths=1.2, linestyles="--")
    fig.colorbar(filled, ax=ax, label=label)
    colors = plt.get_cmap("tab10")
    for i, (optimizer, record) in enumerate(_first_seed_runs(result, problem.name)):
        points = np.asarray(record.trace.get("path", []), dtype=float)
        if points.size == 0:
            continue
        color = colors(i % 10)
        ax.plot(points[:, 0], points[:, 1], "-", color=color, lw=1.4, label=_label(optimizer, record))
        ax.scatter(points[-1:, 0], points[-1:, 1], color=color, s=30, edgecolors="black", zorder=5,
                   marker="o" if record.escaped else "X")
    ax.scatter([0.0], [0.0], marker="X", s=140, c="red", edgecolors="black", zorder=6, label="saddle")
    ax.plot([], [], "r--", lw=1.2, label=f"escape line: loss = {problem.threshold:g}")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_xlabel("theta[0]")
    ax.set_ylabel("theta[1]")
    ax.set_title(f"{problem.name}: trajectories (best lr, first seed)", fontsize=10)
    ax.legend(loc="upper left", fontsize=6.5, framealpha=0.85)
    return _save(fig, path)


def plot_race_losses(
    result: RaceResult, problem: RaceProblem, path: str | os.PathLike[str], span: float = 10.0
) -> Path:
    """Loss against step for each optimizer (best lr, first seed): raw and EMA-smoothed panels.

    With a known infimum the y-axis is ``loss - infimum`` on a log scale; otherwise log scale if every
    loss is positive, else linear.
    """
    plt = _pyplot()
    runs = _first_seed_runs(result, problem.name)
    floor = problem.loss_floor
    losses = [np.asarray(r.trace.get("loss", []), dtype=float) for _, r in runs]
    finite = np.concatenate([v[np.isfinite(v)] for v in losses]) if losses else np.array([])
    shift = floor if floor is not None else 0.0
    log_y = floor is not None or (finite.size > 0 and bool((finite > 0).all()))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), dpi=120, sharey=True)
    colors = plt.get_cmap("tab10")
    for i, ((optimizer, record), values) in enumerate(zip(runs, losses)):
        steps = np.asarray(record.trace.get("step", []), dtype=float)
        y = values - shift
        if log_y:
            y = np.where(np.isfinite(y), np.maximum(y, 1e-12), np.nan)
        color = colors(i % 10)
        axes[0].plot(steps, y, color=color, lw=1.0, alpha=0.9, label=_label(optimizer, record))
        smooth = ema(np.nan_to_num(y, nan=0.0), span) if y.size else y
        axes[1].plot(steps, smooth, color=color, lw=1.8)
    threshold = problem.threshold - shift
    for ax, title in zip(axes, ("raw", f"EMA-smoothed (span {span:g} points)")):
        if not (log_y and threshold <= 0):
            ax.axhline(threshold, color="red", ls="--", lw=1)
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlim(left=0)
        if log_y:
            ax.set_yscale("log")
            if floor is not None and problem.saddle_loss > floor:
                # much below the saddle's gap the curves only show rounding: keep 4 decades
                ax.set_ylim(bottom=1e-4 * (problem.saddle_loss - floor))
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=10)
    ylabel = f"loss - ({floor:g})" if floor is not None else "loss"
    axes[0].set_ylabel(ylabel + ("  (log)" if log_y else ""))
    axes[0].legend(loc="lower left", fontsize=6.5, framealpha=0.85)
    fig.suptitle(f"{problem.name}: loss (best lr, first seed); red: escape threshold", fontsize=10)
    return _save(fig, path)


def plot_race(result: RaceResult, out: str | os.PathLike[str]) -> list[Path]:
    """Every race plot into ``out``: ``race_<problem>_trajectories.png`` for 2-D problems,
    ``race_<problem>_loss.png`` for the others. Returns the paths."""
    out = Path(out)
    paths = []
    for name in result.config.get("problems", []):
        problem = result.specs.get(name)
        if problem is None:
            continue
        if problem.two_d:
            paths.append(plot_race_trajectories(result, problem, out / f"race_{name}_trajectories.png"))
        else:
            paths.append(plot_race_losses(result, problem, out / f"race_{name}_loss.png"))
    return paths


__all__ = ["ema", "plot_race", "plot_race_losses", "plot_race_trajectories"]
