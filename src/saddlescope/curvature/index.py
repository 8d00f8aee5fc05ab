r"""The index (fraction of negative eigenvalues) and minimum ratio without the full spectrum.

From stochastic Lanczos quadrature (:mod:`saddlescope.curvature.density`): for each probe the mass
of the Ritz nodes below :math:`-\delta`, within :math:`\pm\delta` and above :math:`+\delta`; the
estimates are the means over probes.

Two errors are reported. Sampling: the standard error over probes, but never less than what the
variance of a Rademacher probe allows (below). Quadrature: by the
Chebyshev–Markov–Stieltjes inequalities, a Gauss quadrature's cumulative weight below :math:`c` is
within the weight of the two nodes adjacent to :math:`c` of the probe's true spectral distribution
at :math:`c` — a rigorous per-probe bracket, whose mean half-width is ``quadrature_bound``. Without it
the sampling error alone is badly overconfident near zero (on a digits MLP at :math:`\delta = 0`:
0.172 +- 0.002 against an exact 0.294).

Why a band :math:`\pm\delta`: Gauss quadrature with :math:`m` nodes cannot place an eigenvalue more
finely than about :math:`(\lambda_{max}-\lambda_{min})/m`, and trained networks have much of their
spectrum there, so the sign of that mass is not resolved and is reported as such, never guessed.

Spending products where they prove something: eigenpairs already computed (the verdict's extreme
pairs) are deflated (:mod:`saddlescope.curvature.density`), their signs counted exactly, so the span
the nodes must resolve shrinks by about :math:`\lambda_{max}/\lambda_{k+1}`; and probes are added one
at a time only while they shrink the error bar: the run stops when the error meets ``target_error``,
when the sampling error is already below the quadrature bracket (more probes cannot shrink what is
left), when the next probe would overrun ``max_hvps``, or after one probe when nearly everything is
unresolved at this resolution (``resolved`` is then False: the estimate says nothing useful).

Proving "unresolved" during the first probe. The first probe of an adaptive run is watched step by step
and stopped as soon as its own quadrature proves that at least ``UNRESOLVED_SKIP`` of the spectrum it
stands for lies within :math:`\pm\delta` (on a 5M-parameter network a probe is 60 products, two minutes).
The proof: the Gauss rule of :math:`j` Lanczos steps, nodes :math:`\theta_1 < \dots < \theta_j`,
weights :math:`w_i`, and the probe's spectral distribution :math:`F` satisfy the
Chebyshev–Markov–Stieltjes inequalities (Szegő, "Orthogonal polynomials", 1939, §3.41; Golub & Meurant,
"Matrices, moments and quadrature with applications", 2010, §6.2)

.. math::

    \textstyle\sum_{i<k} w_i \le F(\theta_k - 0), \qquad F(\theta_k) \le \sum_{i\le k} w_i .

Let :math:`\theta_l` be the smallest node :math:`\ge -\delta` and :math:`\theta_r` the largest
:math:`\le \delta`. Then :math:`F(\delta) \ge F(\theta_r - 0) \ge \sum_{i<r} w_i` and
:math:`F(-\delta - 0) \le F(\theta_l) \le \sum_{i\le l} w_i`, so the probe's mass in
:math:`[-\delta, \delta]` is at least :math:`\sum_{l<i<r} w_i`: the weight of the nodes in the band less
its outermost node on each side (nothing, with fewer than three nodes in the band). Under deflation the
per-probe fraction is counted as in the estimate, ``1 - scale * (mass outside) - (known outside) / n``,
so the bound is on the very ``within`` the estimate reports for that probe, with the true distribution in
place of the quadrature. The band: ``delta`` when given; by default the estimate's ``span / m`` with
:math:`m` the planned steps, measured at step :math:`j` as ``span_j / m``. The extreme nodes move outward
as :math:`j` grows (Cauchy interlacing: :math:`T_j` is a leading block of :math:`T_m`), so that band lies
inside the one a full probe would have used and the bound holds for it too. The test runs after every step up to
64 (then every :math:`j/32` steps, :func:`~saddlescope.curvature.density.check_due`): the eigendecomposition
of a small tridiagonal costs microseconds, a product milliseconds to minutes, and every step checked is a
product not spent. Later probes never stop early. On the three-term
recurrence (no stored basis) the rule is Gauss for a measure within tiny intervals of the probe's
(Greenbaum 1989, :mod:`~saddlescope.curvature.density`), so the bound holds up to eigenvalues within those
intervals of :math:`\pm\delta`.

Steps for a stated resolution (``fit_steps``). With ``delta`` fixed, the error bar has two parts that pull
against each other inside a product budget :math:`B`: the quadrature bracket at :math:`\pm\delta` falls as
a probe grows (about as :math:`1/m`: the nodes near :math:`\pm\delta` get closer and lighter), while the
sampling error of the :math:`B/m` probes the budget then leaves grows as :math:`\sigma_1\sqrt{m/B}`
(:math:`\sigma_1` one probe's deviation). Their sum :math:`b(m) + 2\sigma_1\sqrt{m/B}` with
:math:`b(m) \approx c/m` is least where :math:`b(m) = \sigma_1\sqrt{m/B}`, so the first probe grows until its
own bracket at :math:`\pm\delta` (the larger of the two, under deflation times its share of the trace) is at
most :math:`\sigma_1\sqrt{m/B}`, or until ``steps``; :math:`\sigma_1` is the Rademacher bound of
"Sampling error" below for the larger of the probe's fractions below :math:`-\delta` and above
:math:`+\delta`. Later probes take as many steps, and probes are added, up to the budget, while they
shrink the error bar. This only chooses :math:`m`; the error bar reported is the same as for any other
run. On a 2,410-parameter digits MLP at :math:`\delta = 10^{-3}\lambda_{max}` (1,400 products, five
probes planned, so at most 280 steps each) the first probe ran to 280 steps after 100 and 300 Adam steps
of training and stopped at 204-280 after 1,500, against 60 steps at the defaults (``bench/index_goal.py``).

Sampling error. For a spectral projector :math:`Q` (the eigenvalues below :math:`-\delta`, say) and a
Rademacher probe :math:`z`, :math:`z^\top Q z / n` estimates the fraction :math:`f = \operatorname{tr} Q / n`
with variance :math:`2(\|Q\|_F^2 - \sum_i Q_{ii}^2)/n^2 \le 2\operatorname{tr} Q/n^2 = 2f/n` (Hutchinson;
Avron & Toledo, J. ACM 58, 2011). Since :math:`z^\top z = n`, the complement gives the same variance, at
most :math:`2(1-f)/n`. Under deflation the probe is :math:`Pz`, :math:`P = I - UU^\top` of rank
:math:`n - k`: the fraction :math:`f'` the quadrature covers has :math:`\mathrm{sd} \le \sqrt{2f'/n}`,
and through the complement :math:`z^\top (P - Q') z` with :math:`\mathrm{Var}(z^\top P z) \le 2k`,
:math:`\mathrm{sd} \le \sqrt{2/n}(\sqrt{k/n} + \sqrt{1 - k/n - f'})` (:func:`probe_deviation`). The
standard error of :math:`p` probes is taken as the larger of the sample's and this bound over
:math:`\sqrt p` with the estimated fraction for :math:`f`: three to five probes estimate their own spread
poorly (three probes of 200 steps on a planted spectrum of 1,000 eigenvalues: a sample standard error of
0.0045 for the minimum ratio, against a true one near 0.013), and one probe has no sample spread at all.

What is proved is the probe's own fraction, :math:`z^\top Q z / n` with :math:`Q` the spectral projector of
the band (deflation: of the band within the complement, plus the known eigenvalues counted). For a
Rademacher probe it is an unbiased estimate of the spectrum's fraction with variance
:math:`2\sum_{i\ne k} Q_{ik}^2 / n^2 \le 2 \operatorname{tr} Q / n^2 \le 2/n`: one probe is within
:math:`\sqrt{2/n}` standard deviations of the fraction (0.0014 at a million parameters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saddlescope.curvature.density import ProbeQuadrature, Quadrature, quadrature_probe, stack_probes
from saddlescope.errors import InvalidInputError


@dataclass
class IndexEstimate:
    """Fractions of eigenvalues below ``-delta``, within ``+-delta`` and above ``+delta``.

    Attributes:
        value, stderr: the index at resolution ``delta`` (fraction below ``-delta``) and its sampling error
            (the probes' standard error, at least the Rademacher variance bound: module docstring).
        min_ratio, min_ratio_stderr: the fraction above ``+delta``.
        within, within_stderr: the unresolved fraction in ``[-delta, delta]``.
        quadrature_bound, min_ratio_quadrature_bound: the Gauss-quadrature (CMS) bracket half-widths.
        error, min_ratio_error: ``2 * stderr + quadrature_bound``, the error bar to quote.
        delta: the resolution (default: the quadrature's, span / steps).
        stopped, resolved: why the adaptive run stopped; False when nearly all the spectrum is within delta.
        reorthogonalised: every probe kept a full basis (False: the three-term recurrence, when a basis
            did not fit the memory budget).
        within_bound: when not ``resolved``: the fraction within ``+-delta`` that the first probe's quadrature
            proves (a lower bound on that probe's ``within``; module docstring), else None.
        planned_steps: the steps each probe was planned for (``steps`` is what ran: fewer when the first
            probe stopped as soon as it proved the spectrum unresolved).
    """

    value: float
    stderr: float
    min_ratio: float
    min_ratio_stderr: float
    within: float
    within_stderr: float
    quadrature_bound: float
    min_ratio_quadrature_bound: float
    delta: float
    n_probes: int
    steps: int
    hvp_count: int
    seed: int
    deflated: int = 0
    stopped: str = "probes"
    resolved: bool = True
    reorthogonalised: bool = True
    within_bound: float | None = None
    planned_steps: int | None = None

    @property
    def error(self) -> float:
        return 2 * self.stderr + self.quadrature_bound

    @property
    def min_ratio_error(self) -> float:
        return 2 * self.min_ratio_stderr + self.min_ratio_quadrature_bound

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "error": self.error, "min_ratio_error": self.min_ratio_error}


def _cms_half_width(quad: Quadrature, c: float) -> float:
    """Mean over probes of the CMS bracket half-width of the cumulative weight below ``c``:
    the larger of the weights of the last node below ``c`` and the first node at or above it (times
    the share of the trace the probe stands for, under deflation)."""
    below = quad.nodes < c
    w_below = torch.where(below, quad.weights, torch.zeros_like(quad.weights))
    w_above = torch.where(~below, quad.weights, torch.zeros_like(quad.weights))
    nodes_below = torch.where(below, quad.nodes, torch.full_like(quad.nodes, -float("inf")))
    nodes_above = torch.where(~below, quad.nodes, torch.full_like(quad.nodes, float("inf")))
    last = nodes_below.argmax(1, keepdim=True)
    first = nodes_above.argmin(1, keepdim=True)
    adjacent = torch.maximum(w_below.gather(1, last), w_above.gather(1, first))[:, 0]
    if quad.scale is not None:
        adjacent = adjacent * quad.scale
    return float(adjacent.mean())


UNRESOLVED_SKIP = 0.95


def probe_deviation(fraction: float, n: int, deflated: int = 0) -> float:
    """A bound on the standard deviation of one Rademacher probe's estimate of a spectral ``fraction`` of
    the ``n - deflated`` eigenvalues the quadrature covers (module docstring, "Sampling error"), with the
    estimated fraction in place of the true one."""
    f, d = min(max(fraction, 0.0), 1.0), deflated / n
    return math.sqrt(2.0 / n) * min(math.sqrt(f), math.sqrt(d) + math.sqrt(max(1.0 - d - f, 0.0)))


def resolution_reached(row: ProbeQuadrature, delta: float, budget: int, n: int, deflated: Tensor | None) -> bool:
    """Has the first probe grown far enough for ``delta`` (``fit_steps``, module docstring)? Its CMS bracket
    at ``+-delta`` is at most ``sigma_1 * sqrt(m / budget)``, the sampling deviation of the probes the budget
    leaves at this length."""
    one = _estimate(stack_probes([row], 0, 0 if deflated is None else int(deflated.numel())), delta, n, deflated)
    sigma_1 = max(one.stderr, one.min_ratio_stderr)  # one probe: its deviation bound (probe_deviation)
    bracket = max(one.quadrature_bound, one.min_ratio_quadrature_bound)
    return bracket <= sigma_1 * math.sqrt(row.nodes.numel() / budget)


def cms_mass_within(nodes: Tensor, weights: Tensor, delta: float) -> float:
    """A lower bound on the mass in ``[-delta, delta]`` of a measure whose Gauss rule is ``nodes``
    (ascending) and ``weights``: the weight of the nodes in the band less the outermost one on each side
    (Chebyshev–Markov–Stieltjes; module docstring)."""
    inside = ((nodes >= -delta) & (nodes <= delta)).nonzero()[:, 0]
    if inside.numel() < 3:
        return 0.0
    return float(weights[int(inside[0]) + 1 : int(inside[-1])].sum())


def probe_band(row: ProbeQuadrature, delta: float | None) -> float:
    """``delta``, or the default band at this step: the nodes' span over the planned steps."""
    if delta is not None:
        return float(delta)
    return float(row.nodes.max() - row.nodes.min()) / max(row.planned, row.nodes.numel(), 1)


def proved_within(row: ProbeQuadrature, delta: float, n: int, deflated: Tensor | None) -> float:
    """A lower bound on one probe's fraction within ``+-delta``, counted as :func:`_estimate` counts it
    (the quadrature's share ``scale`` and the deflated eigenvalues outside the band exactly)."""
    mass = cms_mass_within(row.nodes.double(), row.weights.double(), delta)
    if deflated is None:
        return mass
    known = deflated.double().cpu()
    outside = float(((known < -delta) | (known > delta)).sum()) / n
    return 1.0 - row.scale * (1.0 - mass) - outside


def index_estimate(
    op: Any,
    *,
    delta: float | None = None,
    n_probes: int = 10,
    steps: int = 80,
    seed: int = 0,
    quadrature: Quadrature | None = None,
    deflate: tuple[Tensor, Tensor] | None = None,
    max_hvps: int | None = None,
    target_error: float | None = None,
    adaptive: bool = False,
    memory_budget: int | None = None,
    fit_steps: bool = False,
) -> IndexEstimate:
    """Estimate the fraction of negative eigenvalues (and the minimum ratio) of ``op``.

    Args:
        delta: eigenvalues within ``+-delta`` are counted as unresolved; default the quadrature's
            resolution ``(max node - min node) / steps``.
        n_probes: probes (with ``adaptive``: at most this many).
        quadrature: reuse a :func:`lanczos_quadrature` (no new HVPs).
        deflate: known eigenpairs ``(values, vectors)`` (vectors orthonormal columns): counted exactly
            and projected out of the quadrature.
        max_hvps, target_error, adaptive: add probes one at a time and stop early (module docstring);
            ``max_hvps`` and ``target_error`` imply ``adaptive``.
        memory_budget: bytes each probe's vectors may hold; a full basis that does not fit runs the
            three-term recurrence (:mod:`~saddlescope.curvature.density`, "Memory"; recorded in
            ``reorthogonalised``).
        fit_steps: with ``delta`` and ``max_hvps``: ``steps`` is a cap, the first probe runs until its
            quadrature resolves ``+-delta`` as well as the probes left in the budget can sample (module
            docstring), later probes run as many steps, and up to ``max_hvps`` of them (``n_probes`` or more).
    """
    if delta is not None and delta < 0:
        raise InvalidInputError(f"delta must be >= 0, got {delta}")
    if fit_steps and (delta is None or max_hvps is None):
        raise InvalidInputError("fit_steps needs a stated delta and a product budget (max_hvps)")
    values, vectors = (None, None) if deflate is None else deflate
    if quadrature is not None:
        return _estimate(quadrature, delta, op.shape[0], values)
    adaptive = adaptive or max_hvps is not None or target_error is not None
    n = int(op.shape[0])

    def proved_unresolved(row: ProbeQuadrature) -> bool:
        return proved_within(row, probe_band(row, delta), n, values) >= UNRESOLVED_SKIP

    def first_stop(row: ProbeQuadrature) -> bool:
        fitted = fit_steps and resolution_reached(row, float(delta), int(max_hvps), n, values)  # type: ignore[arg-type]
        return fitted or proved_unresolved(row)

    rows: list[ProbeQuadrature] = []
    stopped, resolved, final_delta = "probes", True, delta
    while len(rows) < n_probes:
        cost = sum(r.hvp_count for r in rows)
        if max_hvps is not None and rows and cost + rows[-1].hvp_count > max_hvps:
            stopped = "max_hvps"
            break
        first = adaptive and not rows
        length = rows[0].nodes.numel() if fit_steps and rows else steps
        rows.append(quadrature_probe(op, len(rows), length, seed=seed, deflate=vectors, memory_budget=memory_budget,
                                     stop=first_stop if first else None))
        if first and fit_steps:
            n_probes = max(n_probes, int(max_hvps) // max(rows[0].hvp_count, 1))  # type: ignore[arg-type]
        if not adaptive:
            continue
        if first and proved_unresolved(rows[0]):
            stopped, resolved, final_delta = "unresolved", False, probe_band(rows[0], delta)
            break
        est = _estimate(stack_probes(rows, seed, 0 if vectors is None else int(vectors.shape[1])), delta,
                        n, values)
        if first and est.within >= UNRESOLVED_SKIP:
            stopped, resolved = "unresolved", False
            break
        if len(rows) >= 2:
            if target_error is not None and max(est.error, est.min_ratio_error) <= target_error:
                stopped = "target_error"
                break
            if 2 * max(est.stderr, est.min_ratio_stderr) <= max(est.quadrature_bound, est.min_ratio_quadrature_bound):
                stopped = "quadrature_bound"
                break
    quad = stack_probes(rows, seed, 0 if vectors is None else int(vectors.shape[1]))
    est = _estimate(quad, final_delta, n, values)
    est.stopped, est.resolved, est.planned_steps = stopped, resolved, rows[0].planned
    if not resolved:
        est.within_bound = proved_within(rows[0], est.delta, n, values)
    return est


def _estimate(quad: Quadrature, delta: float | None, n: int, deflated: Tensor | None) -> IndexEstimate:
    """The fractions from a quadrature, plus the deflated eigenvalues counted exactly."""
    m = quad.nodes.shape[1]
    span = float(quad.nodes.max() - quad.nodes.min())
    delta = span / m if delta is None else float(delta)
    below = quad.per_probe(lambda x: (x < -delta).to(x.dtype))
    above = quad.per_probe(lambda x: (x > delta).to(x.dtype))
    k, known_below, known_above = 0, 0.0, 0.0
    if deflated is not None:
        known = deflated.double().cpu()
        k = known.numel()
        known_below, known_above = float((known < -delta).sum()) / n, float((known > delta).sum()) / n
    within = 1.0 - below - above - known_below - known_above
    p = quad.n_probes

    def mean_err(values, known_fraction: float) -> tuple[float, float]:
        mean = float(values.mean())
        spread = float(values.std(unbiased=True)) / p**0.5 if p > 1 else 0.0
        return mean + known_fraction, max(spread, probe_deviation(mean, n, k) / p**0.5)

    (b, be), (a, ae) = mean_err(below, known_below), mean_err(above, known_above)
    w, we = mean_err(within, 0.0)
    # "above delta" is 1 - (weight at or below delta): bracket at the same place, nudged past delta.
    qb_below = _cms_half_width(quad, -delta)
    qb_above = _cms_half_width(quad, math.nextafter(delta, math.inf))
    return IndexEstimate(b, be, a, ae, w, we, qb_below, qb_above, delta, p, m, quad.hvp_count, quad.seed,
                         deflated=quad.deflated, reorthogonalised=quad.reorthogonalised)
