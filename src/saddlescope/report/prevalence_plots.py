"""Figures and the markdown report of the saddle-prevalence study
(:mod:`saddlescope.experiments.prevalence`)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from saddlescope.errors import InvalidInputError
from saddlescope.experiments.prevalence import PrevalenceStudy
from saddlescope.report.io import atomic_write_text
from saddlescope.report.plots import _pyplot, _save

__all__ = ["plot_fraction_of_minima", "plot_index_vs_loss", "plot_search_outcomes", "write_prevalence_report"]

_FAMILY_STYLE = {
    "grf": ("o", "tab:blue", "confined Gaussian random field"),
    "polynomial": ("s", "tab:orange", "random polynomial"),
    "network": ("D", "tab:green", "teacher-student tanh network"),
    "double_well": ("^", "tab:purple", "separable double well"),
}


def plot_fraction_of_minima(study: PrevalenceStudy, path: str | os.PathLike[str]) -> Path:
    """Fraction of minima among distinct critical points against :math:`n` (log y), with 95% Wilson
    intervals, beside :math:`2^{-n}` and the GRF's Kac--Rice curve (band: 2 Monte Carlo errors). A
    dimension with no minimum found is drawn as its Wilson upper bound (downward triangle)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.8), dpi=120)
    dims = np.array(study.config.dims, dtype=float)
    floor = 1e-4
    for family in study.config.families:
        marker, color, name = _FAMILY_STYLE[family]
        rows = [r for r in study.rows if r.family == family and r.distinct > 0]
        found = [r for r in rows if r.minima > 0]
        if found:
            x = np.array([r.n for r in found], dtype=float)
            y = np.array([r.fraction_minima for r in found])
            lo = np.array([r.fraction_ci[0] for r in found])
            hi = np.array([r.fraction_ci[1] for r in found])
            ax.errorbar(x, y, yerr=[y - np.maximum(lo, floor * 0.5), hi - y], fmt=marker, color=color, ms=6,
                        capsize=3, label=f"{name} (distinct critical points)")
        none = [r for r in rows if r.minima == 0]
        if none:
            ax.scatter([r.n for r in none], [r.fraction_ci[1] for r in none], marker="v", color=color, s=40,
                       label=f"{name}: no minimum found (95% upper bound)")
    ax.plot(dims, 0.5**dims, "k--", lw=1.2, label="naive 0.5^n")
    if study.theory:
        ns = np.array(sorted(study.theory), dtype=float)
        frac = np.array([study.theory[int(n)].fraction for n in ns])
        err = np.array([study.theory[int(n)].stderr for n in ns])
        ax.plot(ns, frac, "-", color="tab:blue", lw=1.5,
                label=f"GRF, Kac-Rice (mu/R = {study.config.grf_edge_ratio:g})")
        ax.fill_between(ns, np.maximum(frac - 2 * err, floor * 0.5), frac + 2 * err, color="tab:blue", alpha=0.2)
    ax.set_yscale("log")
    ax.set_ylim(floor * 0.5, 1.3)
    ax.set_xlabel("dimension n")
    ax.set_ylabel("fraction of critical points that are minima")
    ax.set_title("how often a critical point is a minimum")
    ax.legend(fontsize=7, loc="lower left")
    return _save(fig, path)


def plot_index_vs_loss(study: PrevalenceStudy, path: str | os.PathLike[str]) -> Path:
    """Index against loss at the distinct critical points, one panel per family, coloured by
    :math:`n`, with the least-squares line (GRF: loss per dimension :math:`f/n`)."""
    plt = _pyplot()
    families = list(study.config.families)
    fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 4.0), dpi=120, squeeze=False)
    fits = {f.family: f for f in study.fits}
    for ax, family in zip(axes[0], families):
        points = [{**p, "n": r["n"]} for r in study.records if r["family"] == family for p in r["points"]]
        fit = fits[family]
        if points:
            loss = np.array([p["loss"] / (p["n"] if fit.loss_per_dimension else 1) for p in points])
            index = np.array([p["index"] for p in points])
            dims = np.array([p["n"] for p in points])
            scatter = ax.scatter(loss, index, c=np.log2(dims), cmap="viridis", s=18, edgecolors="black",
                                 linewidths=0.3)
            bar = fig.colorbar(scatter, ax=ax)
            bar.set_label("log2 n")
            if math.isfinite(fit.slope):
                xs = np.linspace(loss.min(), loss.max(), 50)
                ax.plot(xs, fit.intercept + fit.slope * xs, "k-", lw=1.0,
                        label=f"index = {fit.intercept:.3g} + {fit.slope:.3g} loss (r = {fit.pearson:.2f})")
                ax.legend(fontsize=7, loc="upper left")
        ax.set_xlabel("f / n at the critical point" if fit.loss_per_dimension else "f at the critical point")
        ax.set_ylabel("index (#negative eigenvalues / n)")
        ax.set_title(f"{_FAMILY_STYLE[family][2]} ({len(points)} points)", fontsize=9)
    return _save(fig, path)


def plot_search_outcomes(study: PrevalenceStudy, path: str | os.PathLike[str]) -> Path:
    """Share of searches ending critical / gradient-flat / not converged, per family against :math:`n`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.2), dpi=120)
    for family in study.config.families:
        marker, color, name = _FAMILY_STYLE[family]
        rows = [r for r in study.rows if r.family == family]
        if not rows:
            continue
        x = [r.n for r in rows]
        ax.plot(x, [r.labels.get("critical", 0) / r.starts for r in rows], marker=marker, color=color, ls="-",
                label=f"{name}: critical")
        ax.plot(x, [r.labels.get("gradient_flat", 0) / r.starts for r in rows], marker=marker, color=color,
                ls=":", mfc="none", label=f"{name}: gradient-flat")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("dimension n")
    ax.set_ylabel("share of starts")
    ax.set_title("where the searches for critical points ended")
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def _number(value: float | None, fmt: str = ".3g") -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, fmt)


def _table(study: PrevalenceStudy) -> list[str]:
    lines = [
        "| family | n | starts | critical / flat / not conv. | distinct | minima | fraction [95% Wilson] "
        "| per-start fraction | mean index | 0.5^n | GRF Kac-Rice (+- MC s.e.) | E N_crit (Kac-Rice) |",
        "| --- | ---: | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in study.rows:
        t = r.theory
        lines.append(
            f"| {r.family} | {r.n} | {r.starts} | {r.labels.get('critical', 0)} / "
            f"{r.labels.get('gradient_flat', 0)} / {r.labels.get('not_converged', 0) + r.labels.get('error', 0)} "
            f"| {r.distinct} | {r.minima} | {_number(r.fraction_minima)} [{_number(r.fraction_ci[0])}, "
            f"{_number(r.fraction_ci[1])}] | {_number(r.start_fraction_minima)} | {_number(r.mean_index)} "
            f"| {r.naive:.3g} | " + ("" if t is None else f"{t.fraction:.3g} +- {t.stderr:.1g}") + " | "
            + ("" if t is None else f"{t.expected_critical:.3g}") + " |"
        )
    return lines


def _findings(study: PrevalenceStudy) -> list[str]:
    lines = []
    for family in study.config.families:
        rows = [r for r in study.rows if r.family == family and r.distinct > 0]
        if not rows:
            lines.append(f"- **{family}**: no critical point found.")
            continue
        top = rows[-1]
        above = [r for r in rows if r.minima > 0 and r.fraction_ci[0] > r.naive]
        lines.append(
            f"- **{family}**: fraction of minima {_number(rows[0].fraction_minima)} at n = {rows[0].n} "
            f"and {_number(top.fraction_minima)} (95% interval {_number(top.fraction_ci[0])} to "
            f"{_number(top.fraction_ci[1])}) at n = {top.n}, against 0.5^n = {top.naive:.3g}; "
            f"the interval lies above 0.5^n at {len(above)} of {len(rows)} dimensions."
        )
        if family == "grf" and top.theory is not None:
            inside = [r for r in rows if r.theory is not None
                      and r.fraction_ci[0] <= r.theory.fraction <= r.fraction_ci[1]]
            lines.append(
                f"  Kac-Rice predicts {top.theory.fraction:.3g} +- {top.theory.stderr:.1g} at n = {top.n} "
                f"(and E N_crit = {top.theory.expected_critical:.3g} critical points per function, of which "
                f"{top.labels.get('critical', 0)} searches found {top.distinct} distinct over {top.instances} "
                f"functions); the Wilson interval contains the Kac-Rice value at {len(inside)} of {len(rows)} "
                "dimensions."
            )
    for fit in study.fits:
        lines.append(
            f"- **index against {'f/n' if fit.loss_per_dimension else 'f'}, {fit.family}** ({fit.points} "
            f"points): Pearson r = {_number(fit.pearson, '.3f')}, Spearman rho = {_number(fit.spearman, '.3f')}, "
            f"index = {_number(fit.intercept, '.3g')} + {_number(fit.slope, '.3g')} * loss."
        )
    return lines


def write_prevalence_report(
    study: PrevalenceStudy,
    out: str | os.PathLike[str] | None = None,
    *,
    command: str | None = None,
) -> Path:
    """Write ``report.md`` and its PNGs into ``out`` (default: the study folder).

    Args:
        study: what :func:`saddlescope.experiments.prevalence.prevalence_study` returned.
        command: the command line that produced it (recorded verbatim); default: the Python call.

    Returns:
        The path of ``report.md``.
    """
    if not isinstance(study, PrevalenceStudy):
        raise InvalidInputError(f"study must be a PrevalenceStudy, got {type(study).__name__}")
    folder = Path(out) if out is not None else study.out
    folder.mkdir(parents=True, exist_ok=True)
    cfg = study.config
    figures = [
        plot_fraction_of_minima(study, folder / "fraction_of_minima.png"),
        plot_index_vs_loss(study, folder / "index_vs_loss.png"),
        plot_search_outcomes(study, folder / "search_outcomes.png"),
    ]
    if command is None:
        command = (f"saddlescope.experiments.prevalence_study(out={str(study.out)!r}, seed={study.seed}, "
                   f"workers={study.workers}, config=PrevalenceConfig(**config))")
    n_runs = len(study.records)
    lines = [
        "# Saddle-prevalence study",
        "",
        f"Critical points of random functions found by Levenberg-Marquardt on 1/2 |grad|^2 (exact Hessians) from "
        f"{cfg.starts} random starts per function, {cfg.instances} functions per family and dimension "
        f"({n_runs} functions in all), duplicates merged, each classified by its exact Hessian spectrum.",
        "",
        "## Findings",
        "",
        *_findings(study),
        f"- This invocation computed {len(study.computed)} functions and resumed {len(study.skipped)} in "
        f"{study.seconds:.0f} s with {study.workers} worker(s).",
        "",
        "## Per family and dimension",
        "",
        "fraction = distinct minima / distinct critical points (summed over the functions); per-start fraction = "
        "share of the critical searches that ended at a minimum (weighted by basins of attraction); "
        "critical / flat / not conv. = how the searches (after up to "
        f"{cfg.kicks} kicked restarts each) ended.",
        "",
        *_table(study),
        "",
        "## Figures",
        "",
        "![fraction of minima against dimension](fraction_of_minima.png)",
        "",
        "Fraction of minima among the distinct critical points found (95% Wilson intervals; a triangle "
        "pointing down is the upper bound where no minimum was found), beside 0.5^n and the Kac-Rice curve of "
        "the confined Gaussian random field (band: +-2 Monte Carlo standard errors).",
        "",
        "![index against loss](index_vs_loss.png)",
        "",
        "Index against loss at every distinct critical point, with the least-squares line.",
        "",
        "![where the searches ended](search_outcomes.png)",
        "",
        "Share of starts whose search ended at a critical point (solid) or stalled gradient-flat (dotted).",
        "",
        "## How to read these numbers",
        "",
        "- **Sampling bias.** Kac-Rice counts every critical point once; a search from a random start finds "
        "a point with the probability of its basin of attraction under the search, and only a few of the "
        "E N_crit points when that number is large. Levenberg-Marquardt on |grad|^2 switches to Newton's "
        "method on the loss where the Hessian is positive definite, which favours minima. The measured "
        "fraction is therefore a property of (function, search), compared with, not equal to, the Kac-Rice "
        "fraction.",
        "- **Spurious stops.** Minimising |grad|^2 ends at non-critical points (H g = 0 with g != 0) more often "
        "as n grows (Doye & Wales 2002; Frye et al. 2020); those searches are counted above (gradient-flat, "
        "not converged) and are not in any fraction.",
        "- **Error bars.** The Wilson interval treats distinct points as independent draws; points of one "
        "function are not independent, so the intervals are optimistic.",
        "- **The GRF curve** is E[det(mu I + H) 1{mu I + H > 0}] / E|det(mu I + H)| with H = s (G + xi I), "
        "G GOE, xi ~ N(0, 1) (the Hessian law of an isotropic field: Cov(H_ij, H_kl) = s^2 (d_ij d_kl + "
        "d_ik d_jl + d_il d_jk), Cheng & Schwartzman 2018), by Monte Carlo over "
        f"{cfg.theory_samples} draws of G per n with the xi integral by quadrature. Large-n theory (Fyodorov "
        "2004; Bray & Dean 2007, PRL 98, 150201; Fyodorov & Williams 2007): below mu = R/2 critical points are "
        "exponentially many in n and minima an exponentially small fraction of them; the index of a critical "
        "point rises linearly with its energy density.",
        "",
        "## Definitions and thresholds",
        "",
        f"- GRF: f = mu/2 |x|^2 + V(x), V random Fourier features ({cfg.grf_features} features, sigma = ell = "
        f"sqrt(n), so the Hessian of V has spectrum edge R = 2), mu = {cfg.grf_edge_ratio:g} R.",
        "- polynomial: f = b.x + x'Ax/2 + T[x,x,x]/6 + |x|^4/4, entries of b, T ~ N(0, 1/n), of A ~ N(0, 9/n).",
        "- network: y = sum_j v_j tanh(w_j . x), n = hidden * (inputs + 1) parameters, mean squared error to a "
        f"random teacher of the same shape on max(8, 2n) Gaussian inputs, plus {cfg.net_weight_decay:g}/2 "
        "|theta|^2; n = 1 has no such network.",
        f"- critical: |grad| <= {cfg.grad_tol:.0e} (at most {cfg.max_iter} Hessians per search, then up to "
        f"{cfg.kicks} restarts from the end point plus a Gaussian kick of {cfg.kick_scale:g} x the start scale). "
        f"Duplicates: distance <= {cfg.dedup_tol:g} (1 + |theta|).",
        "- An eigenvalue is zero when |lambda| <= 1e-9 max|lambda|; index = #negative / n; a minimum has every "
        "eigenvalue positive (degenerate points are counted as critical points, not minima).",
        "",
        "## Reproduce",
        "",
        "```",
        command,
        "```",
        "",
        f"Study seed {study.seed}; function i of a family in dimension n is drawn from "
        "numpy.random.default_rng([seed, family code, n, i]). Config:",
        "",
        "```json",
        json.dumps(cfg.to_dict(), indent=1),
        "```",
        "",
        "Every number above is in `summary.json`; every function's record (starts, labels, distinct points with "
        "their positions and spectra) is in `runs/run-NNNNNNN.json`; the Kac-Rice curve in `theory.json`.",
        "",
    ]
    assert all(p.exists() for p in figures)
    return atomic_write_text(folder / "report.md", "\n".join(lines))
