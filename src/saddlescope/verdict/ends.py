r"""The ends of the spectrum as the iterative verdict reads them, and what each number then is.

A Ritz value is a Rayleigh quotient, so :math:`\lambda_{min} \le \theta_b` and :math:`\lambda_{max} \ge
\theta_t` with no convergence needed: the certificates of negative and positive curvature. A converged pair
adds a bound from outside (:class:`End`): the residual bound, widened to the run's random-start bound where
that is further out. :func:`iterative_kind` turns the two ends into the curvature verdict, and
:func:`iterative_quantities` states every headline number as exact, a bound, an interval or an estimate
with its error (:mod:`saddlescope.quantity`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from saddlescope.curvature.index import UNRESOLVED_SKIP, IndexEstimate
from saddlescope.curvature.lanczos import EigenResult
from saddlescope.quantity import Quantity

__all__ = [
    "STOP_REASONS", "End", "extreme_ends", "iterative_kind", "iterative_quantities", "unresolved_quantities",
]


@dataclass(frozen=True)
class End:
    r"""One end of the spectrum as the iterative verdict reads it.

    ``value`` is the extreme Ritz value, a Rayleigh quotient: :math:`\lambda_{min} \le \theta_b` and
    :math:`\lambda_{max} \ge \theta_t` with no convergence needed. A converged pair adds an outside bound,
    ``outer``: the residual bound :math:`\theta_b - r_b` holds when the pair is the smallest one (Lanczos's
    premise); the run's random-start bound :math:`\lambda_{min} \ge L` (``EigenResult.guard``) holds with
    probability at least ``1 - miss_probability`` over the start, premise or not. Where the bound exists
    ``outer`` is the lesser of the two, true if either is, and ``backing`` says so; without it (a start the
    run did not draw at random) ``outer`` rests on the premise and ``backing`` says that. Mirrored at the top
    (the greater of :math:`\theta_t + r_t` and the bound :math:`\lambda_{max} \le U`).
    """

    name: str  # "lambda_min" or "lambda_max"
    value: float
    residual: float
    converged: bool
    outer: float
    backing: str

    @property
    def interval(self) -> tuple[float, float]:
        return (self.outer, self.value) if self.name == "lambda_min" else (self.value, self.outer)


def _end(run: EigenResult, name: str) -> End:
    """The bottom (``name="lambda_min"``) or top end of ``run`` as an :class:`End`."""
    at, sign, key = (0, -1.0, "lambda_min_at_least") if name == "lambda_min" else (-1, 1.0, "lambda_max_at_most")
    value, residual = float(run.eigenvalues[at]), float(run.residuals[at])
    by_residual = value + sign * residual
    guard = run.guard or {}
    bound = guard.get(key)
    said = f"converged pair {value:.4g}, residual {residual:.2g}"
    if bound is None:
        outer, backing = by_residual, f"{said}; Lanczos's premise that it is the extreme pair (a given start: no random-start bound)"
    else:
        outer = min(by_residual, bound) if sign < 0 else max(by_residual, bound)
        backing = (f"{said}; random-start bound {bound:.4g} at probability >= {1 - guard['miss_probability']:g}: "
                   f"the outer of the two")
    return End(name, value, residual, bool(run.converged[at]), outer, backing)


def extreme_ends(bottom: EigenResult, top: EigenResult) -> tuple[End, End]:
    return _end(bottom, "lambda_min"), _end(top, "lambda_max")


def iterative_kind(low: End, high: End, thr: float, certificate: bool, bottom_hvps: int,
                    rounding: float) -> tuple[str, str]:
    """The curvature verdict from the extreme ends (see
    :func:`~saddlescope.verdict.iterative.analyze_iterative`), zero threshold ``thr``."""
    tb, tt = low.value, high.value
    has_neg, has_pos = tb < -thr, tt > thr
    if has_neg and has_pos:
        how = "a confirmed Rayleigh quotient (certificate)" if certificate else "a converged eigenpair"
        return "saddle", f"negative curvature {tb:.3g} < -{thr:.3g} from {how}; positive curvature {tt:.3g}"
    if low.converged and low.outer > thr:
        return "minimum", f"lambda_min >= {low.outer:.4g} > {thr:.3g} ({low.backing})"
    if high.converged and high.outer < -thr:
        return "maximum", f"lambda_max <= {high.outer:.4g} < -{thr:.3g} ({high.backing})"
    end = high if has_neg else low  # negative curvature and none positive above the threshold: the top decides
    if not end.converged:
        return "inconclusive", (
            f"{end.name} did not converge in the HVP budget (Ritz value {end.value:.3g}, residual {end.residual:.2g}) "
            f"and no certificate decides the verdict; raise max_hvps"
            + (f" (the bottom run spent {bottom_hvps})" if end is low else "")
        )
    lo, hi = end.interval
    if -thr <= lo and hi <= thr:
        sign = ""
        if end is low and hi < -rounding:
            sign = f"; it is below -{rounding:.2g} (rounding): negative curvature, so not a minimum"
        elif end is high and lo > rounding:
            sign = f"; it is above {rounding:.2g} (rounding): positive curvature, so not a maximum"
        return "degenerate", (
            f"{end.name} is in [{lo:.3g}, {hi:.3g}], within the zero threshold {thr:.3g}: the second-order "
            f"test is inconclusive (probing the null space needs the exact path){sign}"
        )
    return "inconclusive", f"{end.name} is in [{lo:.3g}, {hi:.3g}], which straddles the zero threshold {thr:.3g}"


STOP_REASONS = {
    "probes": "all probes run",
    "target_error": "the error met its target",
    "quadrature_bound": "sampling error below the quadrature bracket (more probes would not help)",
    "max_hvps": "product budget spent",
    "unresolved": "nearly all of the spectrum is unresolved at this delta",
}


def iterative_quantities(
    low: End, high: End, curvature_kind: str, estimate: IndexEstimate | None, n: int, certificate: bool,
) -> dict[str, Quantity]:
    r"""The iterative path's numbers, each as what it is.

    A Ritz value is a Rayleigh quotient, so :math:`\lambda_{min} \le \theta_b` and
    :math:`\lambda_{max} \ge \theta_t` always (bounds); a converged pair of a run that stopped on
    convergence adds its outside bound (:class:`End`), and the number becomes an interval. The fractions
    are the quadrature's estimates with their error bars, unless the verdict proves them (a minimum has no
    eigenvalue at or below the zero threshold); intervals when the estimate stopped unresolved after one
    probe (:func:`unresolved_quantities`).
    """
    out: dict[str, Quantity] = {}
    # A stopped-early run never judged whether its pair is the extreme one (the misconvergence guard runs
    # only towards convergence), so a certificate stays a bound even when its residual happens to be small.
    if low.converged and not certificate:
        out["lambda_min"] = Quantity.interval(low.value, *low.interval, low.backing)
    else:
        why = ("the first confirmed negative Rayleigh quotient (a certificate); lambda_min may lie far below"
               if certificate else f"an unconverged Ritz value (residual {low.residual:.2g}), a Rayleigh quotient")
        out["lambda_min"] = Quantity.upper_bound(low.value, why)
    if high.converged:
        out["lambda_max"] = Quantity.interval(high.value, *high.interval, high.backing)
    else:
        out["lambda_max"] = Quantity.lower_bound(
            high.value, f"an unconverged Ritz value (residual {high.residual:.2g}), a Rayleigh quotient")
    proved = {"minimum": (0.0, 0.0, 1.0), "maximum": (1.0, 0.0, 0.0)}.get(curvature_kind)
    if proved is not None:
        why = f"proved by the verdict ({curvature_kind}: no eigenvalue within the zero threshold)"
        neg, zero, pos = (Quantity.exact(x, basis=why) for x in proved)
    elif estimate is not None:
        how = (f"stochastic Lanczos quadrature, {estimate.n_probes} probes x {estimate.steps} steps"
               + (f", {estimate.deflated} known eigenpairs deflated" if estimate.deflated else "")
               + ("" if estimate.reorthogonalised else ", three-term recurrence (the basis did not fit the memory budget)"))
        if not estimate.resolved:
            neg, zero, pos = unresolved_quantities(estimate, how, n)
            out.update(index=neg, min_ratio=pos, negative=neg, zero=zero, positive=pos)
            return out
        how += f", stopped: {STOP_REASONS.get(estimate.stopped, estimate.stopped)}; error = 2 stderr + quadrature bracket"
        neg = Quantity.estimate(estimate.value, estimate.error, f"fraction below -delta; {how}", (0.0, 1.0))
        pos = Quantity.estimate(estimate.min_ratio, estimate.min_ratio_error, f"fraction above +delta; {how}",
                                (0.0, 1.0))
        within_error = 2 * estimate.within_stderr + estimate.quadrature_bound + estimate.min_ratio_quadrature_bound
        zero = Quantity.estimate(estimate.within, within_error, f"fraction within +-delta (sign unresolved); {how}",
                                 (0.0, 1.0))
    else:
        return out
    out.update(index=neg, min_ratio=pos, negative=neg, zero=zero, positive=pos)
    return out


def unresolved_quantities(estimate: IndexEstimate, how: str, n: int) -> tuple[Quantity, Quantity, Quantity]:
    """The fractions of an estimate that stopped unresolved after one probe. The probe's quadrature
    proves that at least ``b`` of *its* spectral measure lies within ``+-delta``
    (:mod:`~saddlescope.curvature.index`); the probe's fraction estimates the spectrum's within a standard
    deviation ``sd <= sqrt(2/n)``. So each fraction is an estimate whose range is the proved one widened by
    ``2 sd``: within ``+-delta`` in ``[b - 2 sd, 1]``, below and above in ``[0, 1 - b + 2 sd]``; the
    quadrature's figure is the point. One probe has no standard error (so no ``+- inf``)."""
    bound = max(0.0, estimate.within_bound or 0.0)
    sd = math.sqrt(2 / n)
    planned = estimate.planned_steps or estimate.steps
    steps = (f"after {estimate.steps} of {planned} steps" if estimate.steps < planned
             else f"after all {planned} steps")
    band = f"+-delta = {estimate.delta:.3g}"
    if bound >= UNRESOLVED_SKIP:
        said = (f"NOT RESOLVED: at least {bound:.1%} of the spectrum lies within {band} (proved for one probe's "
                f"spectral measure by the Chebyshev-Markov-Stieltjes bracket of its quadrature {steps}")
    else:
        said = (f"NOT RESOLVED: one probe's quadrature puts {estimate.within:.1%} of the spectrum within {band} "
                f"{steps} (its Chebyshev-Markov-Stieltjes bracket proves at least {bound:.1%}")
    said += (f"; one probe estimates the spectrum's fraction within sd sqrt(2/n) = {sd:.2g}; error: the "
             f"proved range widened by 2 sd); {how}")

    def within_range(value: float, low: float, high: float, what: str) -> Quantity:
        value = min(max(value, low), high)
        return Quantity.estimate(value, max(value - low, high - value), f"{what}; {said}", (0.0, 1.0))

    top = min(1.0, 1.0 - bound + 2 * sd)
    neg = within_range(estimate.value, 0.0, top, "fraction below -delta")
    pos = within_range(estimate.min_ratio, 0.0, top, "fraction above +delta")
    zero = within_range(max(estimate.within, bound), max(0.0, bound - 2 * sd), 1.0,
                        "fraction within +-delta (sign unresolved)")
    return neg, zero, pos
