r"""Convergence is judged by residual norms, never by the change between iterates (:class:`StoppingRule`, for :func:`~saddlescope.curvature.lanczos.eigs`):
relative to the spectral-norm estimate :math:`\max|\theta|` (the default), or relative to each Ritz
value itself (``relative_to="value"``). The second is what a small eigenvalue needs: a Ritz pair with
residual :math:`r` has an eigenvalue within :math:`r` of :math:`\theta` (for symmetric :math:`A`), so
:math:`r \le \text{tol}\,|\theta|` bounds the relative error of :math:`\theta` by ``tol`` even when
:math:`|\lambda_{min}| \ll \lambda_{max}`. On convergence the Ritz vectors are
multiplied once more (k extra products) to report *true* residuals: in floating point Lanczos loses
orthogonality and the cheap estimate can be optimistic.

Misconvergence guard (:func:`random_start_miss`). A small residual says :math:`\theta` is near *an*
eigenvalue, not that it is the extreme one: a start vector with almost no component along the extreme
eigenvector converges to the next one first. The former rule refused to judge convergence before
``max(2m + 1, 20)`` basis vectors (ARPACK's ``ncv``), so top-1 always cost 21 products. Now convergence
is checked from the first step, and a run may stop before that size only when a probabilistic bound
says the extreme eigenvalue cannot lie beyond the reported one by more than the tolerance, except with
probability at most ``miss_probability`` over the random start. The bound is the a posteriori form
(Hochstenbach 2013, "Probabilistic upper bounds for the matrix two-norm", J. Sci. Comput. 57) of the
random-start analysis of Kuczyński & Woźniakowski (1992, "Estimating the largest eigenvalue by the
power and Lanczos algorithms with a random start", SIAM J. Matrix Anal. Appl. 13): after :math:`j` steps
the characteristic polynomial :math:`p_j(t) = \prod_l (t - \theta_l)` of :math:`T_j` satisfies
:math:`p_j(A)v_1 = \beta_1\cdots\beta_j v_{j+1}`, so for every eigenpair :math:`(\lambda, u)`,
:math:`(u^\top v_1)^2 p_j(\lambda)^2 \le (\beta_1\cdots\beta_j)^2`. For a start uniform on the sphere
:math:`(u^\top v_1)^2 \sim \mathrm{Beta}(\tfrac12, \tfrac{n-1}2)`, whose distribution function is at most
:math:`\sqrt{2(n-1)x/\pi}`. If :math:`|p_j| \ge M` wherever a missed eigenvalue could be (at or above
:math:`\theta_{(k)} + \eta` and farther than :math:`\eta` from the reported Ritz values, for the k largest;
mirrored for the smallest), a miss needs :math:`(u^\top v_1)^2 \le (\beta_1\cdots\beta_j/M)^2`; the run
stops only when that level has probability at most ``miss_probability`` (split over the k eigenvectors
it covers). Since the level is fixed, stopping at the first step that passes does not raise the chance.

Guarantee, for ``which="largest"``, ``k = 1`` and a run stopped by the bound: with probability at least
``1 - miss_probability`` over the start, :math:`\lambda_{max} \le \theta + \eta` (:math:`\eta` the pair's
residual tolerance; and :math:`\lambda_{max} \ge \theta` always, a Rayleigh quotient). Whatever stopped
the run, ``EigenResult.guard`` reports the bound :math:`\lambda_{max} \le U` (and/or
:math:`\lambda_{min} \ge L`) the final Krylov space gives at that probability, while the polynomial
relation holds (a random start, no thick restart); after a restart, the bounds of the space just before
the first one. Those stay valid: the bounds of every Krylov space of one start hold together, on the one
event that the start is not nearly orthogonal to the extreme eigenvector. Once the basis has
``max(2m + 1, 20)`` vectors the former rule still accepts converged residuals (waiting for the bound
there cost 5-25% more products on slowly converging ends), so no run spends more products than before,
unless ``require_bound``: then converged residuals count only under the bound while it holds, at any
basis size (what :func:`~saddlescope.analyze` asks of its bottom run, on which a "minimum" rests: +3 to
+26% products on planted spectra of 500-2,000 eigenvalues, none where the run restarted). With a start
the caller chose (``v0``) only the former rule applies. No single-vector Krylov method sees a second copy of a (nearly)
repeated eigenvalue; the guard does not claim to. Top-1 at ``tol=1e-4`` (products, confirmation
included, before -> now): the planted spectrum of the tests with 5 outliers up to 100, 21 -> 8-10;
the digits MLP at initialisation, 21 -> 18.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from saddlescope.curvature.ritz import Ritz

# Rayleigh-Ritz after every step while the basis has at most RITZ_EVERY_STEP vectors (0.7 ms at 100),
# then every ceil(j / RITZ_INTERVAL) steps: a large basis then spends little on it and stops at most
# about 3% of its products late.
RITZ_EVERY_STEP = 128
RITZ_INTERVAL = 32
# Probability, over the random start, that the guard lets a run stop with an extreme eigenvalue
# missed by more than the tolerance (see the module docstring).
DEFAULT_MISS_PROBABILITY = 1e-3


class KrylovState(Protocol):
    """What :class:`StoppingRule` reads of a Lanczos run: :class:`~saddlescope.curvature.lanczos.LanczosState`
    (a stored basis) and :class:`~saddlescope.curvature.two_pass.TwoPassState` (none) both have it."""

    j: int
    norm_est: float
    krylov: bool
    saw_invariant: bool
    ritz_at: int
    restarts: int

    @property
    def full(self) -> bool: ...

    def log_krylov_norm(self) -> float: ...



def wanted(theta: Tensor, k: int, which: str, distinct: Tensor | None = None) -> Tensor:
    """Indices (into ascending Ritz values) of the pairs asked for; among ``distinct`` ones only, when given
    (:attr:`Ritz.distinct`: a ghost copy never takes a wanted place)."""
    if distinct is not None:
        return distinct[wanted(theta[distinct], k, which)]
    m = theta.numel()
    if which == "largest":
        return torch.arange(max(0, m - k), m)
    if which == "smallest":
        return torch.arange(0, min(k, m))
    low = torch.arange(0, min(k, m))
    high = torch.arange(max(0, m - k), m)
    return torch.unique(torch.cat([low, high]))


def _log_abs_poly(points: Tensor, roots: Tensor) -> Tensor:
    """``log |prod_l (x - roots_l)|`` at each of ``points``."""
    return torch.log((points[:, None] - roots[None, :]).abs()).sum(1)


def _log_tail_level(n: int, miss_probability: float, eigenvectors: int) -> float:
    r"""``log x`` with :math:`P(\mathrm{Beta}(\tfrac12, \tfrac{n-1}2) \le x) \le` ``miss_probability / eigenvectors``
    (from :math:`P \le \sqrt{2(n-1)x/\pi}`: the start's squared component along a fixed unit vector)."""
    share = miss_probability / eigenvectors
    return math.log(math.pi / 2) + 2 * math.log(share) - math.log(max(n - 1, 1))


def random_start_miss(values: Tensor, margins: Tensor, log_norm: float, log_level: float) -> bool:
    r"""Could a start of probability above the level have missed an eigenvalue above the top Ritz values?

    ``values``: the Ritz values (ascending); ``margins``: :math:`\eta` for the k largest, largest first.
    A missed eigenvalue of the k largest lies at or above :math:`\theta_{(k)} + \eta_{(k)}` and farther
    than :math:`\eta_{(m)}` from each :math:`\theta_{(m)}`, m < k; there :math:`|p_j| \ge M`, the least of
    :math:`|p_j|` at the ends of that set (``|p_j|`` is log-concave between its roots and grows beyond
    them). Returns True when a miss is still possible at this level, i.e. when
    :math:`2\log M + \log x < 2 \log(\beta_1\cdots\beta_j)` (see the module docstring).
    """
    if log_norm == -math.inf:
        return False
    k = margins.numel()
    top = torch.flip(values, [0])[:k].to(torch.float64)
    margins = margins.to(torch.float64)
    start = float(top[-1] + margins[-1])
    ends = torch.cat([torch.tensor([start], dtype=torch.float64), top[:-1] + margins[:-1], top[:-1] - margins[:-1]])
    inside = torch.zeros_like(ends, dtype=torch.bool)
    for theta, eta in zip(top[:-1].tolist(), margins[:-1].tolist(), strict=True):
        inside |= (ends > theta - eta) & (ends < theta + eta)
    ends = ends[(ends >= start) & ~inside]
    if ends.numel() == 0:
        return False
    least = float(_log_abs_poly(ends, values.to(torch.float64)).min())
    return 2 * least + log_level < 2 * log_norm


def random_start_bound(values: Tensor, log_norm: float, log_level: float) -> float:
    r"""The :math:`U > \theta_{max}` with :math:`|p_j(U)|^2 x = (\beta_1\cdots\beta_j)^2`: with probability
    at least ``1 - miss_probability`` over the start, no eigenvalue exceeds it."""
    values = values.to(torch.float64)
    top = float(values[-1])
    if log_norm == -math.inf:
        return top
    target = log_norm - 0.5 * log_level

    def log_p(x: float) -> float:
        return float(_log_abs_poly(torch.tensor([x], dtype=torch.float64), values)[0])

    width = max(float(values[-1] - values[0]), abs(top), 1e-300)
    step = width
    while log_p(top + step) < target and step < 1e300:
        step *= 2
    low, high = top, top + step
    for _ in range(200):
        mid = 0.5 * (low + high)
        if mid in (low, high):
            break
        if log_p(mid) < target:
            low = mid
        else:
            high = mid
    return high


@dataclass(frozen=True)
class StoppingRule:
    """When :func:`eigs` looks at its Ritz pairs and when it stops: everything about stopping in one place.

    Attributes:
        k, which: the pairs wanted (see :func:`eigs`).
        tol, relative_to, atol: the residual each wanted pair must reach (see :meth:`bound`).
        value_floor: for ``relative_to="value"`` without ``atol``, the floor per unit of ``||A||``.
        stop_below: stop at the first Ritz value below it (a certificate), at any basis size.
        budget: the product budget.
        min_dim: with no random-start bound (a given start, after a restart), the basis size below
            which convergence is not judged (ARPACK's default ``ncv``).
        n: the dimension.
        miss_probability: the random-start guard's level (module docstring); None when the start was
            given (the guard is then ``min_dim``).
        coarse_basis: the basis is stored coarser than the recurrence (float32): ``value_floor`` then
            applies to ``relative_to="norm"`` too, since residuals stop improving there.
        require_bound: with a random start and no restart, converged residuals are accepted only under
            the random-start bound, at any basis size (not by ``min_dim``): what a claim that rests on
            the extreme pair being the extreme one (a "minimum") needs.
        patience: once the extreme pair at each wanted end has converged (guarded, as for k = 1) after
            ``P`` products, the other wanted pairs get until ``(1 + patience) P`` products; then the run
            stops (``"patience"``) with those that converged by then. None: they get the whole budget.
    """

    k: int
    which: str
    tol: float
    relative_to: str
    atol: float | None
    value_floor: float
    stop_below: float | None
    budget: int
    min_dim: int
    n: int
    miss_probability: float | None = None
    coarse_basis: bool = False
    require_bound: bool = False
    patience: float | None = None

    def floor(self, norm_est: float) -> float:
        if self.atol is not None:
            return float(self.atol)
        return self.value_floor * norm_est if (self.relative_to == "value" or self.coarse_basis) else 0.0

    def bound(self, values: Tensor, norm_est: float) -> Tensor:
        """The residual each pair must reach: ``max(tol * scale, floor)``."""
        scale = values.abs() if self.relative_to == "value" else torch.full_like(values, norm_est)
        return torch.clamp(self.tol * scale, min=self.floor(norm_est))

    def _random_start(self, state: KrylovState) -> bool:
        return self.miss_probability is not None and state.krylov

    def _by_min_dim(self, state: KrylovState) -> bool:
        """Does the former rule (ARPACK's ``ncv``) accept converged residuals now?"""
        return state.j >= self.min_dim and not (self.require_bound and self._random_start(state))

    def due(self, state: KrylovState, products: int) -> bool:
        """Is a Rayleigh–Ritz worth its cost now?"""
        out_of_steps = state.full or products >= self.budget or state.j >= self.n
        if (state.j < self.min_dim and not out_of_steps and self.stop_below is None
                and not self._random_start(state)):
            # A given start: a Ritz pair can have a tiny residual and still not be the extreme one
            # (misconvergence), and nothing bounds that chance, so convergence is not checked before min_dim.
            return False
        every = 1 if state.j <= RITZ_EVERY_STEP else math.ceil(state.j / RITZ_INTERVAL)
        return out_of_steps or state.j - state.ritz_at >= every

    def guarded(self, state: KrylovState, ritz: Ritz) -> bool:
        """May the run stop on converged residuals, as far as misconvergence goes?"""
        if state.j >= self.n or (state.saw_invariant and self.miss_probability is not None):
            # Exact Ritz values; or the random start's Krylov space became invariant, so every eigenvalue
            # (almost surely every one has a component in a random start) is among them.
            return True
        if self._by_min_dim(state):
            return True  # the former rule (ARPACK's ncv); the bound is still reported
        if not self._random_start(state):
            return False
        assert self.miss_probability is not None
        ends = ("largest", "smallest") if self.which == "both" else (self.which,)
        level = _log_tail_level(self.n, self.miss_probability, self.k * len(ends))
        log_norm = state.log_krylov_norm()
        for end in ends:
            values = ritz.values if end == "largest" else -torch.flip(ritz.values, [0])
            top = torch.flip(values, [0])[: self.k]
            margins = self.bound(top, state.norm_est)
            if random_start_miss(values.cpu(), margins.cpu(), log_norm, level):
                return False
        return True

    def converged(self, state: KrylovState, ritz: Ritz) -> bool:
        """Have the wanted pairs reached their residual bound, guarded against misconvergence?"""
        idx = wanted(ritz.values, self.k, self.which, ritz.distinct)
        return bool((ritz.estimates[idx] <= self.bound(ritz.values[idx], state.norm_est)).all()) and self.guarded(state, ritz)

    def lead_converged(self, state: KrylovState, ritz: Ritz) -> bool:
        """Has the extreme pair at each wanted end converged (what ``patience`` counts from)?"""
        return dataclasses.replace(self, k=1).converged(state, ritz)

    def reason(self, state: KrylovState, ritz: Ritz, products: int, lead_at: int | None = None) -> str | None:
        """Why to stop now (``"certificate"``, ``"converged"``, ``"patience"``, ``"budget"``, ``"exhausted"``),
        or None; ``lead_at``: the products at which :meth:`lead_converged` first held."""
        if self.stop_below is not None and float(ritz.values[0]) < self.stop_below:
            return "certificate"  # a Rayleigh quotient needs no convergence, at any Krylov size
        if state.j < self.min_dim and products < self.budget and not self._random_start(state):
            return None
        if self.converged(state, ritz):
            return "converged"
        if self.patience is not None and lead_at is not None and products >= (1 + self.patience) * lead_at:
            return "patience"
        if products >= self.budget:
            return "budget"
        if state.j >= self.n:
            return "exhausted"  # V_j spans R^n: the Ritz pairs are exact
        return None

    def bounds(self, state: KrylovState, ritz: Ritz) -> dict[str, float] | None:
        """The random-start bounds on both extreme eigenvalues that the current Krylov space gives, at
        ``miss_probability`` for each (module docstring); None where they do not hold: a given start, or
        after a thick restart (the space is then no longer ``K_j(A, v_1)`` with its polynomial relation, and
        a restart may have dropped the far end's Ritz values)."""
        if self.miss_probability is None or state.restarts or not (state.krylov or state.saw_invariant):
            return None
        log_norm = -math.inf if state.saw_invariant or state.j >= self.n else state.log_krylov_norm()
        level = _log_tail_level(self.n, self.miss_probability, 1)
        values = ritz.values.cpu()
        # Both ends, whichever was asked: one Krylov space bounds both (analyze reads the far end's bound
        # to accept the top run's smallest Ritz pair as the bottom one).
        return {"lambda_max_at_most": random_start_bound(values, log_norm, level),
                "lambda_min_at_least": -random_start_bound(-torch.flip(values, [0]), log_norm, level),
                "bound_steps": state.j}

    def report(self, state: KrylovState, ritz: Ritz, stop: str,
               before_restart: dict[str, float] | None = None) -> dict[str, Any]:
        """The guard as a record: what let the run stop and the bounds on the extreme eigenvalues at both
        ends (:meth:`bounds`), from the final Krylov space while the bound holds there, else from the space
        just before the first thick restart (``before_restart``): every Krylov space of the same start gives
        bounds that hold together, on the one event that the start is not nearly orthogonal to the extreme
        eigenvector, so an earlier space's bounds stay valid after the restart; ``bound_steps`` says from
        how many steps."""
        rule = {"converged": "minimum Krylov dimension" if self._by_min_dim(state) else "random-start bound",
                "patience": "the extreme pair converged; the others ran out of patience"}.get(stop)
        if stop == "converged" and (state.j >= self.n or state.saw_invariant):
            rule = "exact"
        out: dict[str, Any] = {"stopped": stop, "rule": rule, "steps": state.j, "min_dim": self.min_dim,
                               "miss_probability": self.miss_probability}
        out.update(self.bounds(state, ritz) or before_restart or {})
        return out
