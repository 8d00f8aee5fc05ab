r"""Intervals and fits for the studies: every fraction with an interval, every fit with a bootstrap.

* :func:`wilson_interval` --- the Wilson score interval for a binomial proportion (Wilson 1927; Brown,
  Cai & DasGupta 2001 recommend it over the normal interval for small counts and extreme shares).
* :func:`cluster_bootstrap` --- the percentile bootstrap (Efron & Tibshirani 1993, ch. 13) that resamples
  *clusters* (networks, functions) with replacement rather than points: points of one network or one
  function are not independent, and resampling them as if they were gives intervals that are too short.
* :func:`linear_fit`, :func:`rank_correlation` --- least squares and Spearman's rho, NaN when there is
  too little to fit.
* :func:`loss_levels` --- how many distinct levels a set of losses has (two tight clusters are two
  levels however many points each holds).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["Estimate", "cluster_bootstrap", "linear_fit", "loss_levels", "pearson", "rank_correlation",
           "wilson_interval"]

Z95 = 1.959964


def wilson_interval(successes: int, total: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (95% by default) for a binomial proportion; (nan, nan) if total = 0."""
    if total <= 0:
        return (math.nan, math.nan)
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class Estimate:
    """A number with its 95% interval and how the interval was made.

    Attributes:
        value: the estimate on all the data.
        low, high: the interval (NaN when it cannot be made, e.g. from one cluster).
        method: ``"wilson"``, ``"bootstrap over <clusters>"`` or ``"none"``.
        n: the count it rests on (points, or clusters for a bootstrap).
    """

    value: float
    low: float
    high: float
    method: str
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def fraction(cls, successes: int, total: int) -> Estimate:
        low, high = wilson_interval(successes, total)
        return cls(successes / total if total else math.nan, low, high, "wilson", total)

    def text(self, fmt: str = ".3g") -> str:
        def number(v: float) -> str:
            return "n/a" if not math.isfinite(v) else format(v, fmt)

        if not math.isfinite(self.low):
            return number(self.value)
        return f"{number(self.value)} [{number(self.low)}, {number(self.high)}]"


def cluster_bootstrap(clusters: Sequence[Any], statistic: Callable[[list[Any]], float], *, what: str,
                      resamples: int = 2000, seed: int = 0, min_clusters: int = 2) -> Estimate:
    r"""The statistic on all clusters, with a 95% percentile interval from resampling the clusters with
    replacement (resamples where the statistic is NaN are dropped; the interval is NaN with fewer than
    ``min_clusters`` clusters, or when fewer than half the resamples give a number). With k clusters there
    are only :math:`\binom{2k-1}{k}` distinct resamples: with very few, the interval is too short.

    Args:
        clusters: one item per cluster (e.g. the list of points of one network).
        statistic: maps a list of clusters to a number.
        what: the clusters' name, for :attr:`Estimate.method`.
    """
    items = list(clusters)
    value = statistic(items) if items else math.nan
    if len(items) < max(2, min_clusters):
        return Estimate(value, math.nan, math.nan, f"none (fewer than {max(2, min_clusters)} {what})", len(items))
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        picked = [items[i] for i in rng.integers(len(items), size=len(items))]
        v = statistic(picked)
        if math.isfinite(v):
            draws.append(v)
    if len(draws) < resamples / 2:
        return Estimate(value, math.nan, math.nan, f"bootstrap over {what} (too few resamples had a value)",
                        len(items))
    low, high = (float(q) for q in np.quantile(draws, [0.025, 0.975]))
    return Estimate(value, low, high, f"bootstrap over {what} ({resamples} resamples)", len(items))


def linear_fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Least squares ``y = intercept + slope * x``: ``(slope, intercept)``; NaN with fewer than 3 points
    or no spread."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xs.size < 3 or _constant(xs):
        return math.nan, math.nan
    if _constant(ys):
        return 0.0, float(ys[0])
    slope, intercept = np.polyfit(xs - xs.mean(), ys, 1)
    return float(slope), float(intercept - slope * xs.mean())


def _constant(values: np.ndarray) -> bool:
    return bool(np.all(values == values[0]))


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho; NaN with fewer than 3 points or no spread in either."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xs.size < 3 or _constant(xs) or _constant(ys):
        return math.nan
    from scipy import stats

    return float(stats.spearmanr(xs, ys).statistic)


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xs.size < 3 or _constant(xs) or _constant(ys):
        return math.nan
    return float(np.corrcoef(xs, ys)[0, 1])


def loss_levels(losses: Sequence[float], rtol: float = 0.02) -> int:
    """Distinct levels among ``losses``: sorted, each level takes every loss within ``rtol`` (relative,
    plus 1e-12) above its lowest member, and the next loss beyond starts a new level. A tight cluster is
    one level however many points it holds; a continuum from 0.1 to 0.5 is about 80."""
    values = sorted(float(v) for v in losses if math.isfinite(v))
    if not values:
        return 0
    levels, anchor = 1, values[0]
    for value in values[1:]:
        if value - anchor > rtol * abs(anchor) + 1e-12:
            levels, anchor = levels + 1, value
    return levels
