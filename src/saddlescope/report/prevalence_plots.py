"""Figures and the markdown report of the saddle-prevalence study
(:mod:`saddlescope.experiments.prevalence`)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from saddlescope.errors import InvalidInputError
from saddlescope.experiments.prevalence import PrevalenceRow, PrevalenceStudy
from saddlescope.report.io import atomic_write_text
from saddlescope.report.plots import _pyplot, _save

__all__ = ["plot_fraction_of_minima", "plot_index_vs_loss", "plot_search_outcomes", "write_prevalence_report"]

_FAMILY_STYLE = {
    "grf": ("o", "tab:blue", "confined Gaussian random field"),
    "polynomial": ("s", "tab:orange", "random polynomial"),
    "network": ("D", "tab:green", "teacher-student tanh network"),
    "double_well": ("^", "tab:purple", "double well"),
}


def _row_interval(row: PrevalenceRow) -> tuple[float, float, bool]:
    """The row's interval for a plot: the bootstrap over functions, or the Wilson interval (flagged)
    where there are too few functions for a bootstrap."""
    low, high = row.fraction_ci
    if math.isfinite(low) and math.isfinite(high):
        return low, high, True
    return row.wilson_ci[0], row.wilson_ci[1], False


def plot_fraction_of_minima(study: PrevalenceStudy, path: str | os.PathLike[str]) -> Path:
    """Fraction of minima among distinct critical points against :math:`n` (log y), with 95% intervals
    (bootstrap over functions; filled markers. With fewer than three functions, the Wilson interval over
    points; hollow markers), beside :math:`2^{-n}`, the GRF's Kac--Rice curve (band: 2 Monte Carlo errors) and the
    double well's closed form :math:`(2/3)^n`. A dimension with no minimum found is drawn at its upper
    bound (downward triangle)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.8), dpi=120)
    dims = np.array(study.config.dims, dtype=float)
    floor = 1e-4
    for family in study.config.families:
        marker, color, name = _FAMILY_STYLE[family]
        rows = [r for r in study.rows if r.family == family and r.distinct > 0]
        for boot in (True, False):
            found = [r for r in rows if r.minima > 0 and _row_interval(r)[2] == boot]
            if not found:
                continue
            x = np.array([r.n for r in found], dtype=float)
            y = np.array([r.fraction_minima for r in found])
            lo = np.array([_row_interval(r)[0] for r in found])
            hi = np.array([_row_interval(r)[1] for r in found])
            ax.errorbar(x, y, yerr=[np.maximum(y - np.maximum(lo, floor * 0.5), 0), np.maximum(hi - y, 0)],
                        fmt=marker, color=color, mfc=color if boot else "none", ms=6, capsize=3,
                        label=f"{name} ({'bootstrap over functions' if boot else 'under 3 functions: Wilson'})")
        none = [r for r in rows if r.minima == 0]
        if none:
            ax.scatter([r.n for r in none], [_row_interval(r)[1] for r in none], marker="v", color=color, s=40,
                       label=f"{name}: no minimum found (95% upper bound)")
    ax.plot(dims, 0.5**dims, "k--", lw=1.2, label="naive 0.5^n")
    if "double_well" in study.config.families:
        ax.plot(dims, double_well_fraction_curve(dims), ":", color=_FAMILY_STYLE["double_well"][1], lw=1.5,
                label="double well, closed form (2/3)^n")
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


def double_well_fraction_curve(dims: np.ndarray) -> np.ndarray:
    return (2.0 / 3.0) ** np.asarray(dims, dtype=float)


def plot_index_vs_loss(study: PrevalenceStudy, path: str | os.PathLike[str]) -> Path:
    """Index against loss at the distinct critical points, one panel per family, coloured by :math:`n`,
    with one least-squares line per dimension (GRF: loss per dimension :math:`f/n`)."""
    plt = _pyplot()
    import matplotlib as mpl

    families = list(study.config.families)
    fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 4.0), dpi=120, squeeze=False)
    dims = [n for n in study.config.dims]
    norm = mpl.colors.Normalize(vmin=math.log2(min(dims)), vmax=math.log2(max(dims)) + 1e-9)
    cmap = mpl.colormaps["viridis"]
    for ax, family in zip(axes[0], families):
        per_dimension = family == "grf"
        points = [{**p, "n": r["n"]} for r in study.records if r["family"] == family for p in r["points"]]
        if points:
            loss = np.array([p["loss"] / (p["n"] if per_dimension else 1) for p in points])
            index = np.array([p["index"] for p in points])
            scatter = ax.scatter(loss, index, c=np.log2([p["n"] for p in points]), cmap=cmap, norm=norm, s=18,
                                 edgecolors="black", linewidths=0.3)
            fig.colorbar(scatter, ax=ax).set_label("log2 n")
            for fit in (f for f in study.fits if f.family == family and math.isfinite(f.slope)):
                mine = loss[[p["n"] == fit.n for p in points]]
                xs = np.linspace(mine.min(), mine.max(), 20)
                ax.plot(xs, fit.intercept + fit.slope * xs, "-", color=cmap(norm(math.log2(fit.n))), lw=1.0)
        ax.set_xlabel("f / n at the critical point" if per_dimension else "f at the critical point")
        ax.set_ylabel("index (#negative eigenvalues / n)")
        ax.set_title(f"{_FAMILY_STYLE[family][2]} ({len(points)} points; a line per n)", fontsize=9)
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
        "| family | n | functions | starts | critical / flat / not conv. | distinct | minima | fraction [95% bootstrap "
        "over functions] | Wilson over points | per-start fraction | mean index | 0.5^n | closed form or Kac-Rice "
        "(+- MC s.e.) | E N_crit (Kac-Rice) |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | --- | --- | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in study.rows:
        t = r.theory
        reference = (f"{r.closed_form:.3g} (exact)" if r.closed_form is not None
                     else "" if t is None else f"{t.fraction:.3g} +- {t.stderr:.1g}")
        lines.append(
            f"| {r.family} | {r.n} | {r.instances} | {r.starts} | {r.labels.get('critical', 0)} / "
            f"{r.labels.get('gradient_flat', 0)} / {r.labels.get('not_converged', 0) + r.labels.get('error', 0)} "
            f"| {r.distinct} | {r.minima} | {_number(r.fraction_minima)} [{_number(r.fraction_ci[0])}, "
            f"{_number(r.fraction_ci[1])}] | [{_number(r.wilson_ci[0])}, {_number(r.wilson_ci[1])}] "
            f"| {_number(r.start_fraction_minima)} | {_number(r.mean_index)} | {r.naive:.3g} | {reference} | "
            + ("" if t is None else f"{t.expected_critical:.3g}") + " |"
        )
    return lines


def _fit_table(study: PrevalenceStudy) -> list[str]:
    lines = ["| family | n | functions | points | Spearman rho [bootstrap over functions] | slope of index on loss "
             "[bootstrap] |", "| --- | ---: | ---: | ---: | --- | --- |"]
    for f in study.fits:
        lines.append(f"| {f.family} | {f.n} | {f.functions} | {f.points} | {_number(f.spearman, '.2f')} "
                     f"[{_number(f.spearman_ci[0], '.2f')}, {_number(f.spearman_ci[1], '.2f')}] | "
                     f"{_number(f.slope, '.3g')} [{_number(f.slope_ci[0], '.3g')}, {_number(f.slope_ci[1], '.3g')}] |")
    return lines


def _findings(study: PrevalenceStudy) -> list[str]:
    lines = []
    for family in study.config.families:
        rows = [r for r in study.rows if r.family == family and r.distinct > 0]
        if not rows:
            lines.append(f"- **{family}**: no critical point found.")
            continue
        top = rows[-1]
        low, high, boot = _row_interval(top)
        above = [r for r in rows if r.minima > 0 and _row_interval(r)[0] > r.naive]
        lines.append(
            f"- **{family}**: fraction of minima {_number(rows[0].fraction_minima)} at n = {rows[0].n} "
            f"and {_number(top.fraction_minima)} (95% interval {_number(low)} to {_number(high)}, "
            f"{'bootstrap over functions' if boot else 'Wilson over points: too few functions to resample'}) "
            f"at n = {top.n}, "
            f"against 0.5^n = {top.naive:.3g}; the interval lies above 0.5^n at {len(above)} of {len(rows)} dimensions."
        )
        if family == "double_well":
            exact = [r for r in rows if r.closed_form is not None and abs(r.fraction_minima - r.closed_form) < 1e-12]
            lines.append(f"  The closed form (2/3)^n is met exactly at {len(exact)} of {len(rows)} dimensions (all 3^n "
                         "critical points found there); elsewhere the searches missed some.")
        if family == "grf" and top.theory is not None:
            inside = [r for r in rows if r.theory is not None and _row_interval(r)[0] <= r.theory.fraction
                      <= _row_interval(r)[1]]
            lines.append(
                f"  Kac-Rice predicts {top.theory.fraction:.3g} +- {top.theory.stderr:.1g} at n = {top.n} "
                f"(and E N_crit = {top.theory.expected_critical:.3g} critical points per function, of which "
                f"{top.labels.get('critical', 0)} searches found {top.distinct} distinct over {top.instances} "
                f"functions); the interval contains the Kac-Rice value at {len(inside)} of {len(rows)} dimensions."
            )
        fits = [f for f in study.fits if f.family == family and math.isfinite(f.spearman)]
        if fits:
            booted = [f for f in fits if math.isfinite(f.spearman_ci[0])]
            positive = [f for f in booted if f.spearman_ci[0] > 0]
            lines.append(f"  Index against {'f/n' if family == 'grf' else 'f'}, per dimension: Spearman rho from "
                         f"{min(f.spearman for f in fits):.2f} to {max(f.spearman for f in fits):.2f}; "
                         + (f"its bootstrap interval lies above 0 at {len(positive)} of {len(booted)} dimensions."
                            if booted else "no bootstrap interval (fewer than three functions per dimension)."))
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
        f"Critical points of random functions found by Newton-MR (damped) on 1/2 |grad|^2 (exact Hessians) from "
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
        "fraction = distinct minima / distinct critical points (summed over the functions); closed form: the "
        "double well's (2/3)^n; per-start fraction = "
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
        "Fraction of minima among the distinct critical points found (95% intervals from a bootstrap over the "
        "functions, filled; hollow where there are fewer than three functions and only the Wilson interval over "
        "points; a "
        "triangle pointing down is the upper bound where no minimum was found), beside 0.5^n, the double well's "
        "closed form (2/3)^n and the Kac-Rice curve of the confined Gaussian random field (band: +-2 Monte Carlo "
        "standard errors).",
        "",
        "![index against loss](index_vs_loss.png)",
        "",
        "Index against loss at every distinct critical point, with one least-squares line per dimension "
        "(pooling dimensions would mix energy scales).",
        "",
        "## Index against loss, per dimension",
        "",
        *_fit_table(study),
        "",
        "![where the searches ended](search_outcomes.png)",
        "",
        "Share of starts whose search ended at a critical point (solid) or stalled gradient-flat (dotted).",
        "",
        "## How to read these numbers",
        "",
        "- **Sampling bias.** Kac-Rice counts every critical point once; a search from a random start finds "
        "a point with the probability of its basin of attraction under the search, and only a few of the "
        "E N_crit points when that number is large. The search switches to trust-region Newton steps on the loss "
        "where no eigenvalue is resolvably negative, which favours minima. The measured "
        "fraction is therefore a property of (function, search), compared with, not equal to, the Kac-Rice "
        "fraction.",
        "- **Spurious stops.** Minimising |grad|^2 ends at non-critical points (H g = 0 with g != 0) more often "
        "as n grows (Doye & Wales 2002; Frye et al. 2020); those searches are counted above (gradient-flat, "
        "not converged) and are not in any fraction.",
        "- **Error bars.** Points of one function are not independent draws, so the intervals resample whole "
        "functions (a percentile bootstrap over the functions of each family and dimension). With few functions "
        "they are wide, as they should be; the Wilson interval over points is listed beside them for comparison "
        "and is used only where there are fewer than three functions.",
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
        "- double well: f = sum_i ((Q x)_i^2 - 1)^2, Q = I for function 0 and a random rotation for the others "
        "(distinct functions, one closed form: 3^n critical points, (2/3)^n of them minima).",
        "- Search labels: critical when |grad| <= the tolerance below; gradient_flat when the search stopped improving "
        "and |Hg| / (|H| |g|) <= 1e-8 (the gradient in the Hessian's near-kernel); not_converged otherwise.",
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
