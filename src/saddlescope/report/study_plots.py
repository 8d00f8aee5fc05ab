"""Figures and the markdown report of the min-ratio study (:mod:`saddlescope.experiments.min_ratio`)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from saddlescope.errors import InvalidInputError
from saddlescope.experiments.min_ratio import MinRatioStudy
from saddlescope.report.io import atomic_write_text
from saddlescope.report.plots import _pyplot, _save

__all__ = ["plot_grad_norms", "plot_loss_vs_index", "plot_loss_vs_min_ratio", "write_min_ratio_report"]

# Marker and colour per verdict of a critical point; gradient-flat points are drawn apart (hollow).
_KIND_STYLE = {
    "minimum": ("o", "tab:green"),
    "saddle": ("X", "tab:red"),
    "degenerate": ("s", "tab:gray"),
    "maximum": ("^", "tab:orange"),
}


def _critical(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("label") == "critical"]


def plot_loss_vs_min_ratio(records: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Training loss (y) against minimum ratio (x) at every critical point, by kind; gradient-flat
    points (not critical) hollow, for comparison."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=120)
    critical = _critical(records)
    for kind, (marker, color) in _KIND_STYLE.items():
        rows = [r for r in critical if r["kind"] == kind]
        if rows:
            ax.scatter([r["min_ratio"] for r in rows], [r["loss"] for r in rows], marker=marker, c=color,
                       s=36, edgecolors="black", linewidths=0.4, label=f"{kind} ({len(rows)})", zorder=3)
    flat = [r for r in records if r.get("label") == "gradient_flat"]
    if flat:
        ax.scatter([r["min_ratio"] for r in flat], [r["loss"] for r in flat], marker="o", facecolors="none",
                   edgecolors="tab:purple", s=36, label=f"gradient-flat, not critical ({len(flat)})", zorder=2)
    ax.axvline(1.0, color="black", lw=0.8, ls=":")
    ax.set_xlabel("minimum ratio  (#positive eigenvalues / #eigenvalues)")
    ax.set_ylabel("training loss at the point")
    ax.set_yscale("log")
    ax.set_title(f"{len(critical)} critical points of {len(records)} networks")
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_loss_vs_index(
    records: Sequence[dict[str, Any]],
    path: str | os.PathLike[str],
    *,
    slope: float = math.nan,
    intercept: float = math.nan,
    pearson: float = math.nan,
) -> Path:
    """Training loss (y) against index (x) at every critical point, with the least-squares line
    ``loss = intercept + slope * index`` (Dauphin et al. 2014, Fig. 1)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=120)
    critical = _critical(records)
    for kind, (marker, color) in _KIND_STYLE.items():
        rows = [r for r in critical if r["kind"] == kind]
        if rows:
            ax.scatter([r["index"] for r in rows], [r["loss"] for r in rows], marker=marker, c=color, s=36,
                       edgecolors="black", linewidths=0.4, label=f"{kind} ({len(rows)})", zorder=3)
    if critical and math.isfinite(slope) and math.isfinite(intercept):
        top = max(r["index"] for r in critical)
        xs = np.linspace(0.0, max(top, 1e-3), 50)
        ax.plot(xs, intercept + slope * xs, color="black", lw=1.2,
                label=f"fit: loss = {intercept:.3g} + {slope:.3g} index (r = {pearson:.2f})")
    ax.set_xlabel("index  (#negative eigenvalues / #eigenvalues)")
    ax.set_ylabel("training loss at the critical point")
    ax.set_title("loss against index at critical points")
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_grad_norms(records: Sequence[dict[str, Any]], path: str | os.PathLike[str], *, grad_tol: float) -> Path:
    """Where each search ended: final :math:`\\|g\\|` (log) against the share of :math:`\\|g\\|^2` in the
    Hessian's near-kernel, by label, with the thresholds of the labels."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=120)
    styles = {"critical": "tab:green", "gradient_flat": "tab:purple", "not_converged": "tab:orange"}
    thresholds = None
    for label, color in styles.items():
        rows = [r for r in records if r.get("label") == label]
        if not rows:
            continue
        thresholds = rows[0]["search"]["thresholds"]
        # A critical point needs no Hessian at its end: its share is not measured (drawn at 0).
        shares = [r["kernel_fraction"] if math.isfinite(r["kernel_fraction"]) else 0.0 for r in rows]
        ax.scatter(shares, [max(r["grad_norm"], 1e-300) for r in rows], c=color, s=24,
                   label=f"{label} ({len(rows)})")
    ax.axhline(grad_tol, color="black", ls="--", lw=0.8, label=f"grad_tol = {grad_tol:.0e}")
    if thresholds is not None:
        ax.axvline(thresholds["flat_fraction"], color="tab:purple", ls=":", lw=0.8,
                   label=f"flat_fraction = {thresholds['flat_fraction']:g}")
    ax.set_yscale("log")
    ax.set_xlim(-0.05, 1.05)
    rtol = thresholds["kernel_rtol"] if thresholds else math.nan
    ax.set_xlabel(f"share of |g|^2 on eigenvalues |lambda| <= {rtol:g} |H| (critical: not measured)")
    ax.set_ylabel("|grad| at the end of the search")
    ax.set_title("where the critical-point searches ended")
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def _number(value: float, fmt: str = ".3g") -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, fmt)


def write_min_ratio_report(
    study: MinRatioStudy,
    out: str | os.PathLike[str] | None = None,
    *,
    command: str | None = None,
) -> Path:
    """Write ``report.md`` and its PNGs into ``out`` (default: the study folder).

    Args:
        study: what :func:`saddlescope.experiments.min_ratio` returned.
        command: the command line that produced it (recorded verbatim); default: the equivalent
            Python call.

    Returns:
        The path of ``report.md``.
    """
    if not isinstance(study, MinRatioStudy):
        raise InvalidInputError(f"study must be a MinRatioStudy, got {type(study).__name__}")
    folder = Path(out) if out is not None else study.out
    folder.mkdir(parents=True, exist_ok=True)
    s, records, cfg = study.summary, study.records, study.config
    grad_tol = cfg.resolved_grad_tol
    figures = {
        "loss_vs_min_ratio.png": plot_loss_vs_min_ratio(records, folder / "loss_vs_min_ratio.png"),
        "loss_vs_index.png": plot_loss_vs_index(records, folder / "loss_vs_index.png", slope=s.fit_slope,
                                                intercept=s.fit_intercept, pearson=s.pearson_loss_index),
        "search_end.png": plot_grad_norms(records, folder / "search_end.png", grad_tol=grad_tol),
    }
    n_crit = s.labels.get("critical", 0)
    n_min = s.kinds.get("minimum", 0)
    if command is None:
        command = (f"saddlescope.experiments.min_ratio({study.n_networks}, out={str(study.out)!r}, "
                   f"seed={study.seed}, workers={study.workers}, config=MinRatioConfig(**config))")
    sizes = [r["n_params"] for r in records if "n_params" in r]
    lines = [
        "# Min-ratio study",
        "",
        f"{s.n_runs} networks trained on digits, each then driven to a critical point by Levenberg-Marquardt "
        "steps on 1/2 |grad|^2 with the exact Hessian, and the exact Hessian spectrum taken where the search "
        "ended.",
        "",
        "## Findings",
        "",
        f"- **Reached a critical point** (|grad| <= {grad_tol:.0e}): {n_crit} of {s.n_runs} "
        f"({_number(100 * s.fraction_critical, '.0f')}%).",
        f"- **Gradient-flat** (stalled with at least {cfg.flat_fraction:g} of |g|^2 on eigenvalues "
        f"|lambda| <= {cfg.kernel_rtol:g} |H|; not critical points): "
        f"{s.labels.get('gradient_flat', 0)}. **Not converged**: {s.labels.get('not_converged', 0)}. "
        f"**Errors**: {s.labels.get('error', 0)}.",
        f"- **True minima among the critical points**: {n_min} of {n_crit} "
        f"(fraction {_number(s.fraction_minima)}); verdicts: "
        + (", ".join(f"{k} {v}" for k, v in s.kinds.items()) or "none") + ".",
        f"- **Largest minimum ratio** at a critical point: {_number(s.largest_min_ratio, '.4f')}; "
        f"at a critical point that is not a minimum: {_number(s.largest_min_ratio_saddle, '.4f')}.",
        f"- **Loss against index** (critical points): Pearson r = {_number(s.pearson_loss_index, '.3f')}, "
        f"Spearman rho = {_number(s.spearman_loss_index, '.3f')}; least-squares fit "
        f"loss = {_number(s.fit_intercept, '.4g')} + {_number(s.fit_slope, '.4g')} * index.",
        f"- Loss of the minima: {_number(s.minimum_loss_range[0], '.4g')} to "
        f"{_number(s.minimum_loss_range[1], '.4g')}; of the other critical points: "
        f"{_number(s.saddle_loss_range[0], '.4g')} to {_number(s.saddle_loss_range[1], '.4g')}.",
        f"- Networks had {min(sizes) if sizes else 'n/a'} to {max(sizes) if sizes else 'n/a'} parameters; "
        f"median time per network {_number(s.median_seconds, '.1f')} s; this invocation computed "
        f"{len(study.computed)} runs and resumed {len(study.skipped)} in {study.seconds:.0f} s with "
        f"{study.workers} worker(s).",
        "",
        "## Figures",
        "",
        "![training loss against minimum ratio](loss_vs_min_ratio.png)",
        "",
        "Training loss against minimum ratio at each critical point (gradient-flat points hollow).",
        "",
        "![training loss against index](loss_vs_index.png)",
        "",
        "Training loss against index at each critical point, with the least-squares line.",
        "",
        "![where the searches ended](search_end.png)",
        "",
        "Final |grad| against the share of |g|^2 in the Hessian's near-kernel for every search, with the "
        "thresholds of the labels.",
        "",
        "## Definitions and thresholds",
        "",
        f"- Loss: mean cross-entropy on the first {cfg.n_samples} digits (average-pooled by {cfg.pool}) plus "
        f"{cfg.weight_decay:g}/2 |theta|^2, in float64.",
        f"- critical: |grad| <= grad_tol = {grad_tol:.1e}. gradient_flat: the search stalled (no step lowered "
        f"|grad|, or |grad| fell by less than a factor {cfg.stall_factor} over {cfg.stall_window} iterations) "
        f"with at least flat_fraction = {cfg.flat_fraction:g} of |g|^2 on eigenvectors with |lambda| <= "
        f"kernel_rtol * |H| = {cfg.kernel_rtol:g} |H| (Frye et al. 2020). not_converged: otherwise (at most "
        f"{cfg.max_iter} Hessians per search).",
        "- Search: Levenberg-Marquardt steps on 1/2 |grad|^2 with the exact Hessian (pseudo-inverse cutoff "
        "1e-12 |H|); where the Hessian is positive definite, Newton steps with Armijo backtracking on the loss.",
        "- An eigenvalue is zero when |lambda| <= rtol * max|lambda| (rtol = 1e-9 in float64, saddlescope's "
        "default); min ratio = #positive / n, index = #negative / n; a minimum has every eigenvalue positive "
        "(or, if degenerate, the null-space probe found no decrease).",
        "",
        "## Reproduce",
        "",
        "```",
        command,
        "```",
        "",
        f"Study seed {study.seed}; run i draws its network from numpy.random.default_rng([seed, i]). Config:",
        "",
        "```json",
        json.dumps(cfg.to_dict(), indent=1),
        "```",
        "",
        "Every number above is in `summary.json`; every run's record (configuration, labels, thresholds, "
        "eigenvalues) is in `runs/run-NNNNNN.json`.",
        "",
    ]
    assert all(p.exists() for p in figures.values())
    return atomic_write_text(folder / "report.md", "\n".join(lines))
