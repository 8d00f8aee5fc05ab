"""Figures and the markdown report of the min-ratio study (:mod:`saddlescope.experiments.min_ratio`).

Two panels answer the two claims: (a) the lecture's points, each at three resolutions and coloured by
its gradient norm; (b) certified critical points only, by verdict. Every plot shows the data loss (or
the error rate), never the penalised loss.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from saddlescope.errors import InvalidInputError
from saddlescope.experiments.min_ratio import (
    DELTAS,
    MinRatioStudy,
    MinRatioSummary,
    delta_key,
    gradient_ends,
    search_points,
)
from saddlescope.report.io import atomic_write_text
from saddlescope.report.plots import _pyplot, _save

__all__ = ["plot_index_vs_loss", "plot_min_ratio_panels", "plot_search_ends", "write_min_ratio_report"]

# Marker and colour per verdict of a critical point.
_KIND_STYLE = {
    "minimum": ("o", "tab:green"),
    "saddle": ("X", "tab:red"),
    "degenerate": ("s", "tab:gray"),
    "maximum": ("^", "tab:orange"),
}
_DELTA_MARKERS = {"0": "o", "1e-06": "s", "0.0001": "^"}


def _certified(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for p in search_points(records) if p.get("label") == "critical"]


def _kind_scatter(ax: Any, points: list[dict[str, Any]], x: str, y: str, scale: float = 1.0) -> None:
    """Certified points by verdict; collapsed ones hollow and black, apart."""
    for kind, (marker, color) in _KIND_STYLE.items():
        rows = [p for p in points if p["kind"] == kind and not p.get("collapsed")]
        if rows:
            ax.scatter([p[x] * scale for p in rows], [p[y] for p in rows], marker=marker, c=color, s=34,
                       edgecolors="black", linewidths=0.4, label=f"{kind} ({len(rows)})", zorder=3)
    collapsed = [p for p in points if p.get("collapsed")]
    if collapsed:
        ax.scatter([p[x] * scale for p in collapsed], [p[y] for p in collapsed], marker="D", facecolors="none",
                   edgecolors="black", s=40, label=f"collapsed: constant predictor ({len(collapsed)})", zorder=3)


def plot_min_ratio_panels(records: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """(a) The lecture's points: data loss against minimum ratio at each resolution delta (one marker per
    delta, joined per network), coloured by :math:`\\log_{10}\\|g\\|`. (b) Certified critical points: data
    loss against minimum ratio (the verdict's zero band), by verdict."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12.0, 4.8), dpi=120, sharey=True)
    lecture = [r["lecture"] for r in records if "lecture" in r]
    if lecture:
        colour = np.log10([max(p["grad_norm"], 1e-300) for p in lecture])
        low, high = float(colour.min()), float(colour.max()) + 1e-9
        for p, c in zip(lecture, colour):
            xs = [p["min_ratios"][delta_key(d)] for d in DELTAS]
            left.plot(xs, [p["data_loss"]] * len(xs), color="0.8", lw=0.6, zorder=1)
        for d in DELTAS:
            key = delta_key(d)
            scatter = left.scatter([p["min_ratios"][key] for p in lecture], [p["data_loss"] for p in lecture],
                                   c=colour, cmap="viridis", vmin=low, vmax=high, marker=_DELTA_MARKERS[key], s=30,
                                   edgecolors="black", linewidths=0.3, label=f"delta = {d:g} max|lambda|", zorder=2)
        bar = fig.colorbar(scatter, ax=left)
        bar.set_label("log10 |grad| at the point")
        left.legend(fontsize=7, loc="upper left")
    left.axvspan(0.5, 0.6, color="tab:orange", alpha=0.12, lw=0)
    left.set_xlim(-0.02, 1.02)
    left.set_xlabel("minimum ratio  (#eigenvalues > delta max|lambda| / #eigenvalues)")
    left.set_ylabel("training data loss at the point")
    left.set_title(f"(a) the lecture's points: trained, then |grad| minimised ({len(lecture)})", fontsize=10)
    certified = _certified(records)
    _kind_scatter(right, certified, "min_ratio", "data_loss")
    right.axvspan(0.5, 0.6, color="tab:orange", alpha=0.12, lw=0)
    right.set_xlim(-0.02, 1.02)
    right.set_xlabel("minimum ratio at the verdict's zero band (1e-9 max|lambda|)")
    right.set_title(f"(b) certified critical points only ({len(certified)})", fontsize=10)
    if certified:
        right.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def plot_index_vs_loss(records: Sequence[dict[str, Any]], path: str | os.PathLike[str], *,
                       summary: MinRatioSummary | None = None) -> Path:
    """Dauphin et al. (2014), Fig. 1: index against data loss and against error rate at certified points
    (collapsed apart), with the least-squares line where it exists; grey dots are where Newton-MR on
    :math:`\\|g\\|^2` was left for the loss (not critical)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12.0, 4.6), dpi=120, sharey=True)
    certified = _certified(records)
    ends = gradient_ends(search_points(records))
    for ax, x, scale, label in ((axes[0], "data_loss", 1.0, "training data loss"),
                                (axes[1], "error_rate", 100.0, "training error (%)")):
        if ends and x == "data_loss":
            ax.scatter([e.get("data_loss", e["loss"]) for e in ends], [e["index"] for e in ends], c="0.65", s=12,
                       zorder=1, label=f"Newton-MR's last point before loss mode, not critical ({len(ends)})")
        _kind_scatter(ax, certified, x, "index", scale)
        ax.set_xlabel(label)
    fit = summary is not None and math.isfinite(summary.fit_slope)
    if fit and certified:
        losses = [p["data_loss"] for p in certified if not p.get("collapsed")]
        xs = np.linspace(min(losses), max(losses), 50)
        axes[0].plot(xs, summary.fit_intercept + summary.fit_slope * xs, "k-", lw=1.0,
                     label=f"fit: index = {summary.fit_intercept:.3g} + {summary.fit_slope:.3g} loss")
    axes[0].set_ylabel("index  (#negative eigenvalues / #eigenvalues)")
    axes[0].set_title("index against loss (Dauphin et al. 2014, Fig. 1)", fontsize=10)
    axes[1].set_title("index against training error", fontsize=10)
    for ax in axes:
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def plot_search_ends(records: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Where each search ended: :math:`\\|g\\|` (log) against :math:`\\rho = \\|Hg\\|/(\\|H\\|\\|g\\|)` (log), by
    label, with the critical tolerance and the near-kernel cut. Critical points need no :math:`\\rho`
    (drawn at the left edge)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.6, 4.6), dpi=120)
    points = search_points(records)
    styles = {"critical": "tab:green", "gradient_flat": "tab:purple", "not_converged": "tab:orange"}
    ratios = [p["hg_ratio"] for p in points if math.isfinite(p.get("hg_ratio", math.nan)) and p["hg_ratio"] > 0]
    edge = min(ratios + [1e-9]) / 10
    for label, color in styles.items():
        rows = [p for p in points if p.get("label") == label]
        if rows:
            xs = [p["hg_ratio"] if math.isfinite(p["hg_ratio"]) and p["hg_ratio"] > 0 else edge for p in rows]
            ax.scatter(xs, [max(p["grad_norm"], 1e-300) for p in rows], c=color, s=22, label=f"{label} ({len(rows)})")
    if points:
        thresholds = points[0]["search"]["thresholds"]
        tol = points[0]["grad_tol"]
        ax.axhline(tol, color="black", ls="--", lw=0.8, label=f"grad_tol = {tol:.1e}")
        ax.axvline(thresholds["kernel_rtol"], color="tab:purple", ls=":", lw=0.8,
                   label=f"kernel cut = {thresholds['kernel_rtol']:g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("|Hg| / (|H| |g|) at the end (critical: not measured, drawn left)")
    ax.set_ylabel("|grad| at the end of the search")
    ax.set_title("where the critical-point searches ended")
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def _number(value: Any, fmt: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, fmt)


def _interval(low: float, high: float, fmt: str = ".2f") -> str:
    return f"[{_number(low, fmt)}, {_number(high, fmt)}]"


def _certified_numbers(study: MinRatioStudy) -> dict[str, Any]:
    certified = _certified(study.records)
    rest = [p for p in certified if not p.get("collapsed")]
    errors = [p["error_rate"] for p in rest]
    return {"certified": certified, "rest": rest,
            "error_range": (min(errors), max(errors)) if errors else (math.nan, math.nan),
            "saddles": [p for p in rest if p["kind"] == "saddle"]}


def _ceiling_sentence(largest: dict[str, float]) -> str:
    """Which resolutions reproduce the lecture's ceiling (a largest minimum ratio of about 0.5-0.6)."""
    matched = [k for k, v in largest.items() if math.isfinite(v) and 0.45 <= v <= 0.7]
    if not largest or all(not math.isfinite(v) for v in largest.values()):
        return ""
    if matched:
        return (f"The lecture's ceiling of about 0.5-0.6 is met only at delta = {', '.join(matched)} max|lambda|; "
                "at the other resolutions the largest ratio is far from it. ")
    return ("No resolution reproduces the lecture's ceiling of about 0.5-0.6: every one lets some point go well "
            "above it. ")


def conclusion(study: MinRatioStudy) -> list[str]:
    """The conclusion in plain words, built from the numbers: what of the lecture's claims (and
    Dauphin et al.'s) this run reproduces and what it does not."""
    s, cfg = study.summary, study.config
    lec = s.lecture
    numbers = _certified_numbers(study)
    rest, saddles = numbers["rest"], numbers["saddles"]
    n_min = s.kinds.get("minimum", 0)
    top = {k: _number(v, ".2f") for k, v in lec.largest_min_ratio.items()}
    median = {k: _number(v, ".2f") for k, v in lec.median_min_ratio.items()}
    lines = [
        f"**The lecture's figure (panel a).** After training (full-batch gradient descent or Adam) and then "
        f"{cfg.lecture_steps} Adam steps on |grad|^2, the {lec.points} points reach a minimum ratio of at most "
        f"{top['0']} when every positive eigenvalue counts, {top['1e-06']} at delta = 1e-6 max|lambda| and "
        f"{top['0.0001']} at delta = 1e-4 max|lambda| (medians {median['0']}, {median['1e-06']}, {median['0.0001']}). "
        + _ceiling_sentence(lec.largest_min_ratio)
        + f"Their gradient norms run from {_number(lec.grad_norm_range[0], '.1e')} to "
        f"{_number(lec.grad_norm_range[1], '.1e')} (median {_number(lec.median_grad_norm, '.1e')}): "
        f"{round(lec.critical.value * lec.points) if lec.points else 0} of {lec.points} are critical points "
        f"(|grad| <= {cfg.grad_rtol:g} x the loss scale). So the figure's points are not critical points"
        + (", and its minimum ratio is largely set by how near-zero eigenvalues are counted (the median moves by "
           f"{lec.median_min_ratio['0'] - lec.median_min_ratio['0.0001']:.2f} between delta = 0 and 1e-4)."
           if lec.points and lec.median_min_ratio["0"] - lec.median_min_ratio["0.0001"] > 0.1 else "."),
        "",
        f"**Certified critical points (panel b).** {s.labels.get('critical', 0)} of {s.n_searches} searches "
        f"({_number(100 * s.fraction_critical, '.0f')}%, 95% interval "
        f"{_interval(100 * s.fraction_critical_ci[0], 100 * s.fraction_critical_ci[1], '.0f')}%) "
        f"reached |grad| <= {cfg.grad_rtol:g} x the loss scale; {s.collapsed} of them are the collapsed constant "
        f"predictor, reported apart. Of the other {len(rest)}, {n_min} are minima (share "
        f"{_number(s.fraction_minima, '.2f')}, {_interval(*s.fraction_minima_ci)}) and {len(saddles)} saddles. "
        f"The minima lie at data losses {_number(s.minimum_loss_range[0], '.3f')} to "
        f"{_number(s.minimum_loss_range[1], '.3f')} (training errors "
        f"{_number(100 * numbers['error_range'][0], '.1f')}% to "
        f"{_number(100 * numbers['error_range'][1], '.1f')}%), over {s.loss_levels_uncollapsed} distinct loss levels.",
    ]
    if n_min and len(saddles) <= 0.1 * max(len(rest), 1):
        every = "every" if not saddles else f"all but {len(saddles)} of the"
        lines.append(
            "So the claim that a trained network stuck at a critical point is almost always at a saddle is **not "
            f"reproduced** here: {every} certified point{'s' if saddles else ''} these searches reached from trained "
            "networks is a minimum (or the collapsed predictor), and minima exist at high loss and error too, which "
            "contradicts \"minima only at the lowest error\" for networks this small."
        )
    elif saddles:
        lines.append(f"Saddles make up {len(saddles)} of the {len(rest)} certified points, at data losses "
                     f"{_number(s.saddle_loss_range[0], '.3f')} to {_number(s.saddle_loss_range[1], '.3f')}.")
    rho = s.spearman
    lines += [
        "",
        "**Index against loss (Dauphin et al. 2014).** "
        + ("Every certified index is 0, so over the certified points there is no curve: Spearman's rho is undefined "
           f"and the fitted slope is {_number(s.fit_slope, '.3g')}. The continuum is not reproduced among critical "
           "points. " if rest and all(p["index"] == 0 for p in rest) else
           f"Over certified points without the collapsed cluster, Spearman's rho = {rho.text('.2f')} ({rho.method}); "
           f"the fitted slope is {s.slope.text('.3g')} index per unit loss. ")
        + "Where the searches left Newton-MR on |grad|^2 for the loss (its budget spent, stalled, or the index down "
        f"to {cfg.loss_mode_index:g}; {s.stalls.points} points, "
        f"|grad| {_number(s.stalls.grad_norm_range[0], '.1e')} to {_number(s.stalls.grad_norm_range[1], '.1e')}, index "
        f"{_number(s.stalls.index_range[0], '.2f')} to {_number(s.stalls.index_range[1], '.2f')}), index does rise "
        "with "
        f"loss (Spearman rho = {s.stalls.spearman.text('.2f')}). Dauphin's monotone curve is visible at these "
        "non-critical points, and only there: the warning of Frye et al. (2020).",
        "",
        "**The penalty.** The searched loss includes "
        f"{cfg.weight_decay:g}/2 |theta|^2. {s.minima_penalty_only} of the {n_min} certified minima have eigenvalues "
        "of the data-loss Hessian (H - wI) inside the zero band or below it, by at most w: in those directions only "
        "the penalty makes them minima, and on the data loss alone they would be degenerate (flat, or falling at "
        "fourth order or slower). Without a penalty the searches stall there, because saturated units let the "
        "loss fall towards infinite weights.",
    ]
    return lines


def _cell(text: str) -> str:
    """Markdown table cells cannot hold a bare pipe (|grad|, max|lambda|)."""
    return text.replace("|", "\\|")


def _penalty_margin(study: MinRatioStudy) -> str:
    """How far the near-kernel cut sits below the penalty at the searches' end points."""
    cfg = study.config
    tops = [p["lambda_max"] for p in search_points(study.records) if math.isfinite(p.get("lambda_max", math.nan))]
    if not tops or cfg.weight_decay == 0:
        return "There is no penalty to keep the cut below." if cfg.weight_decay == 0 else ""
    margin = cfg.weight_decay / (cfg.kernel_rtol * max(tops))
    return (f"At the end points |H| runs from {min(tops):.3g} to {max(tops):.3g}, so the cut is at least "
            f"{margin:.3g} times below the penalty w = {cfg.weight_decay:g}"
            + (" (well below it)." if margin >= 10 else ": NOT well below it; lower kernel_rtol."))


def _table_rows(study: MinRatioStudy) -> list[str]:
    s, lec = study.summary, study.summary.lecture
    per_delta = " / ".join(f"{_number(lec.largest_min_ratio[k], '.3f')} ({_number(lec.median_min_ratio[k], '.3f')})"
                           for k in (delta_key(d) for d in DELTAS))
    per_start = "; ".join(f"{name}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
                          for name, counts in s.start_labels.items())
    rows = [
        ("networks / searches / errors / never left the initial plateau",
         f"{s.n_runs} / {s.n_searches} / {s.errors} / {s.on_plateau}"),
        ("search labels", ", ".join(f"{k} {v}" for k, v in s.labels.items())),
        ("labels by start", per_start),
        ("certified share (95% Wilson)",
         f"{_number(s.fraction_critical, '.3f')} {_interval(*s.fraction_critical_ci, '.3f')}"),
        ("collapsed (constant predictor)", str(s.collapsed)),
        ("verdicts of the other certified points", ", ".join(f"{k} {v}" for k, v in s.kinds.items()) or "none"),
        ("minima among them (95% Wilson)",
         f"{_number(s.fraction_minima, '.3f')} {_interval(*s.fraction_minima_ci, '.3f')}"),
        ("distinct loss levels (2% apart): all / without collapsed", f"{s.loss_levels} / {s.loss_levels_uncollapsed}"),
        ("data loss of minima / of other certified points",
         f"{_number(s.minimum_loss_range[0], '.4f')}-{_number(s.minimum_loss_range[1], '.4f')} / "
         f"{_number(s.saddle_loss_range[0], '.4f')}-{_number(s.saddle_loss_range[1], '.4f')}"),
        ("largest min ratio at a certified point / at one not a minimum",
         f"{_number(s.largest_min_ratio, '.4f')} / {_number(s.largest_min_ratio_saddle, '.4f')}"),
        ("index = a + b loss (certified, uncollapsed; b with its bootstrap)",
         f"a = {_number(s.fit_intercept, '.4g')}, b = {s.slope.text('.4g')}"),
        ("Spearman loss-index: uncollapsed / with collapsed; error-index",
         f"{s.spearman.text('.3f')} / {_number(s.spearman_with_collapsed, '.3f')}; "
         f"{_number(s.spearman_error_index, '.3f')}"),
        ("lecture points: largest (median) min ratio at delta = 0 / 1e-6 / 1e-4 max|lambda|", per_delta),
        ("lecture points: largest min ratio on the data-loss Hessian H - wI, same deltas",
         " / ".join(_number(lec.largest_data_min_ratio[delta_key(d)], '.3f') for d in DELTAS)),
        ("lecture points: |grad| range (median); share critical",
         f"{_number(lec.grad_norm_range[0], '.2e')}-{_number(lec.grad_norm_range[1], '.2e')} "
         f"({_number(lec.median_grad_norm, '.2e')}); {lec.critical.text('.3f')}"),
        ("Newton-MR stop points: count, |grad| range, Spearman loss-index",
         f"{s.stalls.points}, {_number(s.stalls.grad_norm_range[0], '.1e')}-"
         f"{_number(s.stalls.grad_norm_range[1], '.1e')}, "
         f"{s.stalls.spearman.text('.3f')}"),
        ("certified minima resting on the penalty in some direction", str(s.minima_penalty_only)),
        ("time", f"median {_number(s.median_seconds, '.1f')} s per network; this invocation computed "
                 f"{len(study.computed)} and resumed {len(study.skipped)} in {study.seconds / 60:.1f} min with "
                 f"{study.workers} worker(s)"),
    ]
    return [f"| {_cell(name)} | {_cell(value)} |" for name, value in rows]


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
    figures = [
        plot_min_ratio_panels(records, folder / "min_ratio_panels.png"),
        plot_index_vs_loss(records, folder / "index_vs_loss.png", summary=s),
        plot_search_ends(records, folder / "search_ends.png"),
    ]
    if command is None:
        command = (f"saddlescope.experiments.min_ratio({study.n_networks}, out={str(study.out)!r}, "
                   f"seed={study.seed}, workers={study.workers}, config=MinRatioConfig(**config))")
    sizes = [r["n_params"] for r in records if "n_params" in r]
    scales = sorted({round(r["loss_scale"], 6) for r in records if "loss_scale" in r})
    lines = [
        "# Min-ratio study",
        "",
        f"{s.n_runs} small networks trained on digits ({_number(min(sizes) if sizes else None, 'd')} to "
        f"{_number(max(sizes) if sizes else None, 'd')} parameters); for each, (a) the lecture's experiment "
        "(train, then minimise |grad|) and (b) three searches for certified critical points from its training "
        "trajectory (early, middle, late), each classified by its exact Hessian spectrum.",
        "",
        "## Conclusion",
        "",
        *conclusion(study),
        "",
        "## Numbers",
        "",
        "| | value |",
        "| --- | --- |",
        *_table_rows(study),
        "",
        "Intervals: Wilson score intervals for shares of searches; bootstraps over networks (not points: a "
        "network's three searches are not independent) for the slope and the rank correlations.",
        "",
        "## Figures",
        "",
        "![the two panels](min_ratio_panels.png)",
        "",
        "(a) The lecture's points: each network's end point after minimising |grad|, at three resolutions "
        "(circle: every positive eigenvalue counts; square: above 1e-6 max|lambda|; triangle: above 1e-4 "
        "max|lambda|), joined by a grey line and coloured by log10 |grad|. (b) Certified critical points only, by "
        "verdict (collapsed points hollow). The shaded band is the lecture's 0.5-0.6.",
        "",
        "![index against loss and error](index_vs_loss.png)",
        "",
        "Index against data loss and against training error at certified points (Dauphin et al. 2014, Fig. 1); grey "
        "dots are where the searches left Newton-MR on |grad|^2 for the loss (not critical points).",
        "",
        "![where the searches ended](search_ends.png)",
        "",
        "Final |grad| against |Hg| / (|H| |g|) for every search, with the critical tolerance and the near-kernel cut.",
        "",
        "## How the search labels its end point",
        "",
        f"Each search starts where the training loss had fallen by a third (early), by two thirds (middle) of the way "
        f"from the constant predictor's loss to the final loss, and at the end of training (late). It runs Newton-MR "
        f"on |grad|^2 (the damped minimum-residual solve of H p = -g with the exact Hessian, steps accepted when "
        f"|grad|^2 falls) for at most {cfg.gradient_budget} steps; it switches to trust-region Newton steps on the "
        "loss "
        f"itself (after up to {cfg.quasi_newton_iter} L-BFGS iterations) once at most {cfg.loss_mode_index:g} of the "
        f"eigenvalues are below the zero band, once that budget is spent, or once Newton-MR stops improving with the "
        f"gradient not in the near-kernel. At most {cfg.max_iter} Hessians in all.",
        "",
        f"- **critical**: |grad| <= {cfg.grad_rtol:g} x the loss scale (the constant predictor's data loss, "
        f"{', '.join(_number(v, '.4f') for v in scales) or 'n/a'}).",
        f"- **gradient_flat**: the search stopped improving (no step accepted in 12 tries, or the best |grad| fell by "
        f"less than a factor {cfg.stall_factor} over {cfg.stall_window} steps, and in loss mode the loss also stopped "
        f"falling) **and** |Hg| / (|H| |g|) <= {cfg.kernel_rtol:g}: the gradient lies where H is as small as its "
        f"near-kernel |lambda| <= {cfg.kernel_rtol:g} |H|. {_penalty_margin(study)}",
        "- **not_converged**: anything else (the budget ran out while the search was improving, or it stopped with "
        "the gradient not in the near-kernel).",
        "- **collapsed**: a certified point whose outputs vary over the samples by at most "
        f"{cfg.collapse_tol:g} (root mean square): the constant predictor, at the constant predictor's loss.",
        "",
        "## Definitions",
        "",
        f"- Data: the first {cfg.n_samples} digits, average-pooled by {cfg.pool}, float64, one batch. Loss: "
        + ("squared error to one-hot targets (summed over the 10 outputs, mean over samples)" if cfg.loss == "mse"
           else "cross-entropy") + f"; searched objective: that plus {cfg.weight_decay:g}/2 |theta|^2. Plots show the "
        "data loss and the error rate, never the penalised loss.",
        "- Verdicts: saddlescope.analyze(exact=True) at the search's end point: an eigenvalue is zero when |lambda| <= "
        "1e-9 max|lambda|; a confirmed negative eigenvalue inside that band still rules out a minimum; min ratio = "
        "#positive / n, index = #negative / n.",
        "- Lecture resolutions: min ratio at delta = #(lambda > delta max|lambda|) / n for delta in 0, 1e-6, 1e-4.",
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
        "Every number above is in `summary.json`; every run's record (configuration, training curve, lecture point, "
        "searches with labels, thresholds and eigenvalues) is in `runs/run-NNNNNN.json`.",
        "",
    ]
    assert all(p.exists() for p in figures)
    return atomic_write_text(folder / "report.md", "\n".join(lines))
