r"""Extreme eigenpairs of a symmetric operator: thick-restart Lanczos, its basis planned from a memory budget.

Wu & Simon (2000), "Thick-restart Lanczos method for large symmetric eigenvalue problems"; in the
Krylov–Schur form (Stewart 2001) where the projected matrix :math:`T = V^\top A V` is kept dense.

With an orthonormal basis :math:`V_j` built by Lanczos (every new vector orthogonalised twice against
all previous ones, "twice is enough"), :math:`A V_j = V_j T_j + r_j e_j^\top`. A Ritz pair
:math:`(\theta, y = V_j s)` of :math:`T_j s = \theta s` has residual
:math:`\|A y - \theta y\| = \|r_j\|\,|s_j|`. When the basis is full, some Ritz vectors (below) and the next
Lanczos vector are kept and the rest discarded: the decomposition keeps its form, so the iteration
goes on without losing what has converged.

What a restart keeps (:func:`restart_set`): the wanted pairs and as many neighbours, up to half the
basis (Wu & Simon), and every other pair that has converged: *locking* (Lehoucq & Sorensen 1996,
"Deflation techniques for an implicitly restarted Arnoldi iteration"; ARPACK likewise keeps more
vectors as more converge). A converged pair at the far end is an eigenvector to rounding. Discarded,
it is not gone: the next Lanczos vectors carry it at the rounding level, and since its eigenvalue lies
outside what remains of the spectrum the recurrence amplifies it like a Chebyshev polynomial, so the
next cycle spends its new vectors converging it again. (On the spectrum below with 300 vectors, the
eigenvector of lambda = 1, converged to a residual of 5e-21 and discarded, was 1e-16 of the basis
after the restart and 0.2 of the tenth new Lanczos vector.) Kept, full reorthogonalisation holds every
new vector orthogonal to it and the far end stays deflated: with 300 vectors, lambda_min of the
spectrum below converged in 2,400-2,700 products instead of 6,000-6,750.

How large a basis: restarting cannot do what one long run does when the wanted eigenvalue's gap is
tiny next to the spread, because then Lanczos sees it only after resolving (deflating) much of the
rest of the spectrum, and a restarted basis cannot hold what it has resolved. 999 eigenvalues
log-spaced in [1e-8, 1] under one at -1e-6 (relative gap 1e-6) take a single Lanczos run 360-450
products to show a Ritz value below -1e-9 and 560-590 to converge lambda_min (residual 1e-6 |lambda|);
a 100-vector basis needed 1,900-3,200 and about 18,000 (ARPACK's ``eigsh``, 100 vectors: 16,000; its
default 20: 226,000). So the basis is as large as the memory budget allows, up to :data:`KRYLOV_MAX`.

Memory is a budget (:func:`plan_basis`, reported as :class:`BasisPlan` in ``EigenResult.plan``). The
budget defaults to :data:`BASIS_MEMORY_SHARE` of the memory free where the basis lives (host memory, a
cgroup limit, or ``torch.cuda.mem_get_info``: :func:`saddlescope.memory.available_memory`) less the
gradient graph a product rebuilds. The plan degrades in a stated order, each step only when the one
before does not fit at :func:`preferred_basis` vectors:

1. a float64 basis with full reorthogonalisation, as many vectors as fit (at most :data:`KRYLOV_MAX`);
2. a float32 basis with *partial reorthogonalisation* (Simon 1984, "The Lanczos algorithm with partial
   reorthogonalization", Math. Comp. 42): the recurrence coefficients, the projected matrix and its
   eigenproblem stay float64, and so does the arithmetic (the basis is read a block at a time and
   widened). Each new vector is orthogonalised (twice) against the two before it, and Simon's recurrence
   for the estimates :math:`\omega_{j+1,k} \approx v_{j+1}^\top v_k`
   (:math:`\beta_{j+1}\omega_{j+1} = T\omega_j - \sum_{l \in L} T_{lj}\,\omega_l`, :math:`L` the vectors
   orthogonalised against, plus a rounding term :math:`\epsilon\|A\|/\beta_{j+1}`) says when it must be
   orthogonalised against the whole basis: when some :math:`|\omega| > \sqrt{\epsilon}`, that vector and
   the next, the coefficients discarded so :math:`T` stays tridiagonal. Semi-orthogonality keeps the
   Ritz values as accurate as full orthogonality would in the basis precision (Simon's theorem), with a
   full pass over the basis only every few steps. The recurrence is the three-term one's: after a thick
   restart every step is orthogonalised against the whole basis (kept Ritz vectors included), as with a
   float64 basis. (Carried across restarts, the estimates fell behind the basis's true loss of
   orthogonality, which reached O(1) after ten restarts on a planted spectrum.) Measured on the planted
   spectra of the tests: eigenvalue errors <= 1e-7 of ||A|| against <= 1e-8 for a float64 basis at
   ``tol=1e-6``, true residuals down to the floor :data:`COARSE_FLOOR_EPS` (about 8e-6 ||A||); where
   ||A|| is a few outliers over a bulk (network Hessians), Simon's estimate asks for a full pass every
   second step or so;
3. the same, down to :func:`minimum_basis` vectors (ARPACK's default ``ncv``);
4. on a GPU, the float32 basis in host memory while the products run on the GPU;
5. no basis at all: the three-term recurrence, with a second pass that regenerates the vectors for the
   Ritz vectors (:mod:`~saddlescope.curvature.two_pass`: ``5 + pairs`` vectors, float64 then float32,
   1.7-3x the products);
6. otherwise :class:`~saddlescope.errors.MemoryBudgetError` with the estimate, before any product.

On the CPU the basis is one ``torch.empty`` of the planned size: pages never written are never
committed, so a run that converges in ten steps holds ten vectors whatever the plan. On a GPU it grows
by doubling up to the plan (the plan counts the copy a growth makes).

Convergence is judged by residual norms, never by the change between iterates (:class:`StoppingRule`):
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
relation holds (a random start, no thick restart). Once the basis has ``max(2m + 1, 20)`` vectors the
former rule still accepts converged residuals (waiting for the bound there cost 5-25% more products on
slowly converging ends), so no run spends more products than before. With a start the caller chose
(``v0``) only the former rule applies. No single-vector Krylov method sees a second copy of a (nearly)
repeated eigenvalue; the guard does not claim to. Top-1 at ``tol=1e-4`` (products, confirmation
included, before -> now): the planted spectrum of the tests with 5 outliers up to 100, 21 -> 8-10;
the digits MLP at initialisation, 21 -> 18.

The recurrence, the basis and the small eigenproblem run in ``dtype`` (float64 by default), whatever
precision the operator computes in, unless the plan stores the basis in float32 (above).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from saddlescope.curvature.ritz import Ritz
from saddlescope.curvature.two_pass import TWO_PASS_VECTORS, TwoPassState, two_pass_bytes
from saddlescope.errors import InvalidInputError, MemoryBudgetError
from saddlescope.memory import available_memory, describe_bytes

WHICH = ("largest", "smallest", "both")
# BasisPlan.reorthogonalisation of a run that stores no basis (curvature/two_pass.py).
TWO_PASS = "none (two passes)"

# The basis is at most KRYLOV_MAX vectors, at least minimum_basis(m) (m pairs wanted), and otherwise as
# many as fit the memory budget. A larger basis restarts less and never needs more products (trained
# 26k-parameter MLP, float32: 200 HVPs with 40 vectors, 90 with 100; the log-spaced spectrum above:
# 560-590 with 1,000, about 18,000 with 100). The cap bounds the Rayleigh-Ritz cost, O(j^3) in the basis
# size j (0.3 s at j = 1,000 on one thread).
KRYLOV_MAX = 1000
# The budget when the free memory cannot be read (a device other than the CPU or a CUDA GPU).
KRYLOV_MEMORY_BYTES = 2**30
# Default budget: this share of the memory free where the basis lives, after the graph a product
# rebuilds; the rest stays for the caller, the allocator's slack and whatever runs beside.
BASIS_MEMORY_SHARE = 0.5
# Conversions between a float32 basis and float64 arithmetic, and the in-place restart, go through
# blocks of at most this many bytes, and at most an eighth of the basis.
CHUNK_BYTES = 16 * 2**20
# Default product budget: max(20 * basis size, 500), at most DEFAULT_MAX_HVPS (what a 100-vector basis
# got before the basis grew with memory: a larger basis needs fewer products, not a larger budget).
DEFAULT_MAX_HVPS = 2000
# Rayleigh-Ritz after every step while the basis has at most RITZ_EVERY_STEP vectors (0.7 ms at 100),
# then every ceil(j / RITZ_INTERVAL) steps: a large basis then spends little on it and stops at most
# about 3% of its products late.
RITZ_EVERY_STEP = 128
RITZ_INTERVAL = 32
# Residual floor of relative_to="value", in units of eps(operator dtype) * ||A||: products in float32
# reached 3 eps ||A|| on a trained MLP, so 16 leaves a margin without giving up accuracy.
VALUE_FLOOR_EPS = 16
# The same floor for a float32 basis with float64 coefficients, in units of eps(float32) * ||A||: a
# Ritz vector stored in float32 carries about sqrt(j) roundings (true residuals of 20-30 eps ||A|| on
# the planted spectra of the tests at 50-100 vectors), so 64 leaves the same margin.
COARSE_FLOOR_EPS = 64
# Probability, over the random start, that the guard lets a run stop with an extreme eigenvalue
# missed by more than the tolerance (see the module docstring).
DEFAULT_MISS_PROBABILITY = 1e-3


def minimum_basis(want: int, n: int) -> int:
    """The fewest basis vectors a plan may have for ``want`` pairs: ARPACK's default ``ncv``, ``max(2m + 1, 20)``."""
    return min(n, max(2 * want + 1, 20))


def preferred_basis(want: int, n: int) -> int:
    """Below this many vectors a float64 basis gives way to a float32 one: ``max(3m + 10, 40)`` (the former default's floor)."""
    return min(n, max(3 * want + 10, 40))


@dataclass
class BasisPlan:
    """How :func:`eigs` holds its Krylov basis, and why (:func:`plan_basis`).

    Attributes:
        vectors: basis size before a thick restart.
        dtype: precision the basis is stored in; ``recurrence_dtype``: that of the recurrence
            coefficients, the projected matrix and its eigenproblem (float64 unless asked otherwise).
        reorthogonalisation: ``"full"`` (every vector against all, twice), ``"partial"`` (Simon 1984), or
            :data:`TWO_PASS` (no basis: the three-term recurrence, and a second pass for the Ritz vectors;
            ``vectors`` is then the count of vectors it holds, :mod:`~saddlescope.curvature.two_pass`).
        device: where the basis lives (the operator's device, or ``"cpu"`` for a GPU operator's
            basis held in host memory).
        bytes: the peak the eigensolver's own tensors are planned to hold (basis, a growth copy on a
            GPU, the projected matrix, working and Ritz vectors); the operator's graphs are not in it.
        budget: the bytes it may use (None: unknown, :data:`KRYLOV_MEMORY_BYTES` assumed);
            ``budget_source``: where that figure came from.
        why: one sentence.
    """

    vectors: int
    dtype: str
    recurrence_dtype: str
    reorthogonalisation: str
    device: str
    bytes: int
    budget: int | None
    budget_source: str
    why: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def planned_bytes(n: int, vectors: int, want: int, *, basis_dtype: torch.dtype, recurrence_dtype: torch.dtype,
                  partial: bool, grows_by_copy: bool) -> int:
    """The peak bytes of :func:`eigs`'s own tensors for a basis of ``vectors`` vectors of length ``n``."""
    item = torch.finfo(basis_dtype).bits // 8
    rec = torch.finfo(recurrence_dtype).bits // 8
    rows = vectors + 1
    basis = rows * n * item
    if grows_by_copy:
        basis += ((rows + 1) // 2) * n * item  # the last growth holds the old half beside the new whole
    small = vectors * vectors * rec + (rows * rows * 8 if partial else 0)
    # The product's input and output, the vector being orthogonalised and its projections; at the end
    # the Ritz vectors, their products and residuals.
    working = n * rec * (5 + 3 * want)
    blocks = 2 * min(CHUNK_BYTES, math.ceil(rows / 8) * n * 8, rows * math.ceil(n / 8) * 8)  # source and result
    return basis + small + working + blocks


def default_budget(op: Any, device: torch.device) -> tuple[int | None, str]:
    """:data:`BASIS_MEMORY_SHARE` of the memory free on ``device`` after the gradient graph a product
    rebuilds (an operator that keeps its graphs holds them already; the free figure has them out)."""
    free, source = available_memory(device)
    if free is None:
        return None, source
    rebuilt = 0
    graphs = getattr(op, "graph_plan", None)
    if graphs is not None and graphs.recomputed > 0 and graphs.bytes_per_graph:
        rebuilt = int(graphs.bytes_per_graph)
    where = f"{BASIS_MEMORY_SHARE:.0%} of {describe_bytes(free)} free ({source})"
    if rebuilt:
        where += f" less a rebuilt gradient graph ({describe_bytes(rebuilt)})"
    return int(BASIS_MEMORY_SHARE * max(free - rebuilt, 0)), where


def plan_basis(
    n: int,
    want: int,
    *,
    budget: int | None,
    budget_source: str,
    device: torch.device | str = "cpu",
    recurrence_dtype: torch.dtype = torch.float64,
    krylov_dim: int | None = None,
    basis_dtype: torch.dtype | None = None,
    host_budget: int | None = None,
    host_source: str = "",
) -> BasisPlan:
    """Choose the basis size, its precision and where it lives from a memory budget (module docstring).

    Args:
        n: the dimension; want: the pairs wanted (``2k`` for ``"both"``).
        budget, budget_source: bytes the eigensolver may use where the operator lives (None: unknown,
            then the former rule: as many float64 vectors as fit :data:`KRYLOV_MEMORY_BYTES`).
        device: the operator's device.
        recurrence_dtype: precision of the coefficients and the projected problem; anything but
            float64 keeps the basis in that precision with full reorthogonalisation (no fallback).
        krylov_dim, basis_dtype: fix the size or the basis precision instead of choosing them.
        host_budget, host_source: on a GPU, the host memory a basis may take there instead.

    Raises:
        MemoryBudgetError: nothing fits, not even the two-pass recurrence's few float32 vectors (with
            ``krylov_dim`` or ``basis_dtype`` fixed: not even that basis).
    """
    device = torch.device(device)
    cap = min(n, max(KRYLOV_MAX, 3 * want + 10))
    fixed = None if krylov_dim is None else min(n, krylov_dim)
    preferred, minimum = preferred_basis(want, n), minimum_basis(want, n)
    # (basis dtype, partial reorthogonalisation, where, fewest vectors, budget there, its source), in order
    options: list[tuple[torch.dtype, bool, torch.device, int, int | None, str]]
    if basis_dtype is not None or recurrence_dtype != torch.float64:
        dtype = basis_dtype or recurrence_dtype
        partial = torch.finfo(dtype).bits < torch.finfo(recurrence_dtype).bits
        options = [(dtype, partial, device, minimum, budget, budget_source)]
    else:
        options = [(torch.float64, False, device, preferred, budget, budget_source),
                   (torch.float32, True, device, preferred, budget, budget_source),
                   (torch.float32, True, device, minimum, budget, budget_source)]
        if device.type == "cuda":
            options.append((torch.float32, True, torch.device("cpu"), minimum, host_budget, host_source))

    def peak(size: int, dtype: torch.dtype, partial: bool, where: torch.device) -> int:
        return planned_bytes(n, size, want, basis_dtype=dtype, recurrence_dtype=recurrence_dtype, partial=partial,
                             grows_by_copy=where.type != "cpu")

    if budget is None:  # the former rule: the basis alone in 1 GiB, never fewer than the preferred floor
        dtype = options[0][0]
        fits = KRYLOV_MEMORY_BYTES // (n * torch.finfo(dtype).bits // 8) - 1
        size = fixed if fixed is not None else min(cap, max(preferred_basis(want, n), fits))
        return BasisPlan(size, str(dtype), str(recurrence_dtype), "partial" if options[0][1] else "full", str(device),
                         peak(size, dtype, options[0][1], device), None, budget_source,
                         f"free memory unknown ({budget_source}): {size} vectors, as many as fit "
                         f"{describe_bytes(KRYLOV_MEMORY_BYTES)}")
    if fixed is not None:  # a fixed size: fewer vectors are not an option, only another precision or place
        options = list(dict.fromkeys((d, p, w, fixed, r, src) for d, p, w, _, r, src in options))
    tried: list[str] = []
    for dtype, partial, where, floor, room, source in options:
        room = 0 if room is None else room
        high = cap if fixed is None else fixed
        size = _largest_fitting(lambda s, d=dtype, p=partial, w=where, r=room: peak(s, d, p, w) <= r, floor, high)
        kind = f"{str(dtype).removeprefix('torch.')} basis" + (" in host memory" if where != device else "")
        if size >= floor:
            why = "; ".join(tried + [
                f"a {kind} of {size} vectors"
                + (" (the cap)" if size == cap and fixed is None else "" if fixed is None else " (as asked)")
                + f" needs {describe_bytes(peak(size, dtype, partial, where))} of {describe_bytes(room)} ({source})"
            ])
            if partial:
                why += "; partial reorthogonalisation, coefficients in " + str(recurrence_dtype).removeprefix("torch.")
            return BasisPlan(size, str(dtype), str(recurrence_dtype), "partial" if partial else "full", str(where),
                             peak(size, dtype, partial, where), room, source, why)
        tried.append(f"a {kind} of {floor} vectors would need {describe_bytes(peak(floor, dtype, partial, where))}")
    if fixed is None and basis_dtype is None:  # no basis at all: the three-term recurrence, twice
        for vector_dtype in dict.fromkeys((recurrence_dtype, torch.float32)):
            need = two_pass_bytes(n, want, vector_dtype=vector_dtype, recurrence_dtype=recurrence_dtype)
            kind = f"two passes of the three-term recurrence, {str(vector_dtype).removeprefix('torch.')} vectors"
            if need <= budget:
                why = "; ".join(tried + [f"{kind} need {describe_bytes(need)} of {describe_bytes(budget)} ({budget_source})"])
                return BasisPlan(TWO_PASS_VECTORS + want + 1, str(vector_dtype), str(recurrence_dtype), TWO_PASS,
                                 str(device), need, budget, budget_source,
                                 why + "; no basis is stored: 1.7-3x the products")
            tried.append(f"{kind} would need {describe_bytes(need)}")
    dtype, partial, where, smallest, room, source = options[-1]
    need = peak(smallest, dtype, partial, where)
    if fixed is None and basis_dtype is None:
        smallest_kind, need = "the two-pass recurrence's", min(need, two_pass_bytes(
            n, want, vector_dtype=torch.float32, recurrence_dtype=recurrence_dtype))
    else:
        smallest_kind = f"{smallest} {str(dtype).removeprefix('torch.')} vectors of {n:,} numbers"
    raise MemoryBudgetError(
        f"the Krylov basis does not fit the memory budget: even {smallest_kind} need about {describe_bytes(need)} "
        f"({need:,} bytes), and the budget is {describe_bytes(budget)} ({budget_source}); free memory, pass a "
        "larger memory_budget, or analyse a block of the parameters (Objective.blocks)"
    )


def _largest_fitting(fits: Callable[[int], bool], low: int, high: int) -> int:
    """The largest size in ``[low, high]`` that ``fits`` (monotone), or ``low - 1`` when none does."""
    if high < low or not fits(low):
        return low - 1
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low


@dataclass
class EigenResult:
    """Eigenpairs from :func:`eigs`, eigenvalues ascending.

    Attributes:
        eigenvalues: shape ``(m,)`` (m = k, or 2k for ``which="both"``), ascending.
        eigenvectors: shape ``(n, m)``, unit columns.
        residuals: true residual norms ``||A v - lambda v||`` (one extra product per pair).
        converged: per pair, ``residual <= max(tol * scale, atol)`` with ``scale`` the spectral norm
            (``relative_to="norm"``) or the pair's ``|eigenvalue|`` (``relative_to="value"``).
        spectral_norm: the estimate ``max |Ritz value|`` the tolerance is relative to.
        hvp_count: operator products spent, including the confirmation.
        restarts: thick restarts made.
        which, tol, relative_to, atol: what was asked.
        stopped_early: the run stopped at ``stop_below`` before converging.
        dtype: precision of the basis (that of the recurrence, unless the plan stores the basis in
            float32); operator_dtype: precision of the products (the model's).
        plan: the memory plan (:class:`BasisPlan`): basis vectors, dtype, bytes, budget, why.
        guard: the misconvergence guard (module docstring): ``rule`` (``"random start"`` or
            ``"minimum Krylov dimension"``), ``miss_probability``, and where the random-start bound holds
            at the end, ``lambda_max_at_most`` and ``lambda_min_at_least`` (both ends, whichever was
            asked): each bound holds with probability at least ``1 - miss_probability`` over the start.
        reorthogonalisations: full passes over the basis made by partial reorthogonalisation (0 with
            full reorthogonalisation, where every step makes one).
        opposite, opposite_ritz_value: for ``which="largest"`` or ``"smallest"``, the Ritz vector at the
            *other* end of the final basis (unit, unconfirmed: no product was spent on it) and its Ritz
            value. A Krylov space grown for one end resolves the other end too (Lanczos's Ritz values
            converge at both ends first), so this vector's Rayleigh quotient is often already a
            certificate of curvature of the opposite sign (``analyze`` confirms it with one product
            before running a second solver).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    converged: Tensor
    spectral_norm: float
    hvp_count: int
    restarts: int
    which: str
    tol: float
    stopped_early: bool = False
    relative_to: str = "norm"
    atol: float = 0.0
    dtype: str = "torch.float64"
    operator_dtype: str = "torch.float64"
    plan: BasisPlan | None = None
    guard: dict[str, Any] | None = None
    reorthogonalisations: int = 0
    opposite: Tensor | None = None
    opposite_ritz_value: float | None = None

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())

    def to_dict(self, vectors: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "eigenvalues": self.eigenvalues.tolist(),
            "residuals": self.residuals.tolist(),
            "converged": self.converged.tolist(),
            "spectral_norm": self.spectral_norm,
            "hvp_count": self.hvp_count,
            "restarts": self.restarts,
            "which": self.which,
            "tol": self.tol,
            "relative_to": self.relative_to,
            "atol": self.atol,
            "stopped_early": self.stopped_early,
            "dtype": self.dtype,
            "operator_dtype": self.operator_dtype,
            "plan": None if self.plan is None else self.plan.to_dict(),
            "guard": self.guard,
            "reorthogonalisations": self.reorthogonalisations,
            "opposite_ritz_value": self.opposite_ritz_value,
        }
        if vectors:
            out["eigenvectors"] = self.eigenvectors.T.tolist()
        return out


def lanczos_step(apply: Any, basis: Tensor, proj: Tensor, j: int) -> float:
    """Extend a Lanczos basis by one vector (the package's one Lanczos step, full reorthogonalisation).

    The basis vectors are the *rows* of ``basis`` (so every slice ``basis[:j+1]`` is contiguous and
    the projections are dense matrix-vector products). ``basis[:j+1]`` is orthonormal; computes
    ``w = A basis[j]``, orthogonalises it twice against all of ``basis[:j+1]`` ("twice is enough",
    full reorthogonalisation), stores the projections in column/row ``j`` of ``proj`` (so
    ``proj[:j+1, :j+1] = V^T A V``) and the normalised remainder in ``basis[j+1]`` when there is
    room. Returns the remainder's norm (beta).
    """
    w = apply(basis[j : j + 1].T)[:, 0]
    done = basis[: j + 1]
    coeffs = done @ w
    w = w - done.T @ coeffs
    again = done @ w
    w = w - done.T @ again
    coeffs = coeffs + again
    proj[: j + 1, j] = coeffs
    proj[j, : j + 1] = coeffs
    beta = float(w.norm())
    if j + 1 < basis.shape[0] and beta > 0:
        basis[j + 1] = w / beta
    return beta


def _fresh_direction(basis: Tensor, gen: torch.Generator) -> Tensor:
    """A random unit vector orthogonal to the rows of ``basis``."""
    fresh = torch.randn(basis.shape[1], generator=gen, dtype=basis.dtype).to(basis.device)
    for _ in range(2):
        fresh = fresh - basis.T @ (basis @ fresh)
    return fresh / fresh.norm()


def _wanted(theta: Tensor, k: int, which: str, distinct: Tensor | None = None) -> Tensor:
    """Indices (into ascending Ritz values) of the pairs asked for; among ``distinct`` ones only, when given
    (:attr:`Ritz.distinct`: a ghost copy never takes a wanted place)."""
    if distinct is not None:
        return distinct[_wanted(theta[distinct], k, which)]
    m = theta.numel()
    if which == "largest":
        return torch.arange(max(0, m - k), m)
    if which == "smallest":
        return torch.arange(0, min(k, m))
    low = torch.arange(0, min(k, m))
    high = torch.arange(max(0, m - k), m)
    return torch.unique(torch.cat([low, high]))


class LanczosState:
    r"""A Lanczos decomposition :math:`A V_j = V_j T_j + \beta v_{j+1} e_j^\top`, grown by :meth:`step`
    and cut back by :meth:`restart`; :meth:`ritz` solves the projected problem.

    The basis vectors are the rows of ``basis`` (up to ``size + 1`` of them: the last holds
    :math:`v_{j+1}` when the basis is full). On the CPU it is allocated whole but uncommitted (pages
    never written cost nothing); elsewhere it grows by doubling as the run needs it. ``proj`` holds
    :math:`T_j` dense (after a thick restart it is diagonal plus one coupling row, then tridiagonal).
    With a basis stored in a coarser precision than ``start`` (the recurrence's), steps use partial
    reorthogonalisation until the first thick restart and full reorthogonalisation after it, in the
    recurrence's precision (module docstring); ``omega`` holds Simon's estimates of the basis's inner
    products meanwhile.
    """

    def __init__(self, start: Tensor, size: int, seed: int, *, basis_dtype: torch.dtype | None = None):
        self.n = start.numel()
        self.size = size
        self.dtype = start.dtype  # recurrence: coefficients, T, working vectors
        basis_dtype = basis_dtype or start.dtype
        self.coarse = torch.finfo(basis_dtype).bits < torch.finfo(start.dtype).bits
        self.partial = self.coarse  # partial reorthogonalisation until a thick restart, then full
        self.eps = torch.finfo(basis_dtype).eps
        # Elsewhere than the CPU, rows as the run needs them, doubling, with the last growth from half the
        # plan (so a growth holds at most 1.5 bases, as planned_bytes counts).
        self._sizes = [size + 1]
        while start.device.type != "cpu" and self._sizes[0] > 64:
            self._sizes.insert(0, math.ceil(self._sizes[0] / 2))
        self.basis = torch.empty(self._sizes[0], self.n, dtype=basis_dtype, device=start.device)
        self.proj = torch.zeros(size, size, dtype=start.dtype, device=start.device)
        self.basis[0] = start / start.norm()
        self.j = 0
        self.beta = 0.0
        self.decoupled = False  # beta ~ 0: V_j spans an invariant subspace
        self.norm_est = 0.0  # max |entry of T| and |Ritz value| so far: a lower bound on ||A||
        self.restarts = 0
        self.ritz_at = 0  # basis size at the last Rayleigh-Ritz
        # The basis is the Krylov space of the start, with p_j(A) v_1 = beta_1...beta_j v_{j+1}
        # (until a restart or a fresh direction after an invariant subspace breaks it).
        self.krylov = True
        self.saw_invariant = False  # a Krylov space of the start became invariant: every eigenvalue seen
        self.reorthogonalisations = 0
        self._force = False  # partial: orthogonalise this step's vector fully (Simon: the pair after a loss)
        if self.partial:
            self.omega = torch.zeros(size + 1, size + 1, dtype=torch.float64, device=start.device)
            self.omega[0, 0] = 1.0
        self._gen = torch.Generator(device="cpu").manual_seed(seed + 1)

    @property
    def full(self) -> bool:
        return self.j >= self.size

    @property
    def coupling(self) -> float:
        """``beta`` of the decomposition, 0 when ``V_j`` spans an invariant subspace (or all of R^n)."""
        return 0.0 if (self.decoupled or self.j >= self.n) else self.beta

    def _room_for(self, rows: int) -> None:
        if self.basis.shape[0] < rows:
            bigger = next(size for size in self._sizes if size > self.basis.shape[0])
            grown = torch.empty(bigger, self.n, dtype=self.basis.dtype, device=self.basis.device)
            grown[: self.basis.shape[0]] = self.basis
            self.basis = grown

    def step(self, apply: Callable[[Tensor], Tensor]) -> None:
        """One Lanczos step: extend the basis by ``A v_j``, orthogonalised (fully or partially, see above)."""
        self._room_for(self.j + 2)
        if self.partial:
            self.beta = self._partial_step(apply)
        elif self.coarse:
            self.beta = self._full_coarse_step(apply)
        else:
            self.beta = lanczos_step(apply, self.basis, self.proj, self.j)
        self.j += 1
        self.norm_est = max(self.norm_est, float(self.proj[: self.j, self.j - 1].abs().max()))
        self.decoupled = self.beta <= 1e-12 * max(self.norm_est, 1e-300)
        if self.decoupled and self.j < self.n:
            # Invariant subspace: its Ritz values are exact. Go on from a fresh random direction
            # orthogonal to the basis, decoupled from it (T stays block diagonal).
            if self.krylov:
                self.saw_invariant = True
            self.krylov = False
            if self.coarse:
                fresh = torch.randn(self.n, generator=self._gen, dtype=self.dtype).to(self.basis.device)
                self._orthogonalise(fresh, 0, self.j)
                self._orthogonalise(fresh, 0, self.j)
                self.basis[self.j] = fresh / fresh.norm()
                if self.partial:
                    self._set_omega(self.j, torch.full((self.j,), self.eps, dtype=torch.float64))
            else:
                self.basis[self.j] = _fresh_direction(self.basis[: self.j], self._gen)

    # -- partial reorthogonalisation (float32 basis, float64 arithmetic) ---------------------------
    def _block_columns(self, rows: int) -> int:
        """Columns per block when ``rows`` basis rows are combined (at most CHUNK_BYTES, an eighth of n)."""
        return max(1, min(math.ceil(self.n / 8), CHUNK_BYTES // (max(rows, 1) * 8)))

    def _rows(self, lo: int, hi: int):
        """Blocks ``(r0, rows in the recurrence dtype)`` of ``basis[lo:hi]``, at most CHUNK_BYTES each
        and an eighth of the basis."""
        per = max(1, min(CHUNK_BYTES // (self.n * 8), math.ceil((self.size + 1) / 8)))
        for r0 in range(lo, hi, per):
            yield r0, self.basis[r0 : min(hi, r0 + per)].to(self.dtype)

    def _orthogonalise(self, w: Tensor, lo: int, hi: int) -> Tensor:
        """Subtract from ``w`` (in place) its components along ``basis[lo:hi]``, block by block; return them."""
        coeffs = torch.zeros(hi - lo, dtype=self.dtype, device=w.device)
        for r0, block in self._rows(lo, hi):
            c = block @ w
            w -= block.T @ c
            coeffs[r0 - lo : r0 - lo + c.numel()] += c
        return coeffs

    def _set_omega(self, row: int, values: Tensor) -> None:
        self.omega[row, :row] = values.to(self.omega.device)
        self.omega[:row, row] = values.to(self.omega.device)
        self.omega[row, row] = 1.0

    def _full_coarse_step(self, apply: Callable[[Tensor], Tensor]) -> float:
        """:func:`lanczos_step` on a coarse basis: float64 arithmetic, the basis read a block at a time."""
        j = self.j
        w = apply(self.basis[j : j + 1].T.to(self.dtype))[:, 0]
        coeffs = self._orthogonalise(w, 0, j + 1)
        coeffs += self._orthogonalise(w, 0, j + 1)
        self.proj[: j + 1, j] = coeffs
        self.proj[j, : j + 1] = coeffs
        beta = float(w.norm())
        if j + 1 < self.basis.shape[0] and beta > 0:
            self.basis[j + 1] = w / beta
        return beta

    def _partial_step(self, apply: Callable[[Tensor], Tensor]) -> float:
        j = self.j
        w = apply(self.basis[j : j + 1].T.to(self.dtype))[:, 0]
        lo = max(j - 1, 0)  # the three-term recurrence (partial reorthogonalisation ends at a restart)
        coeffs = self._orthogonalise(w, lo, j + 1)
        coeffs += self._orthogonalise(w, lo, j + 1)  # twice is enough
        self.proj[lo : j + 1, j] = coeffs
        self.proj[j, lo : j + 1] = coeffs
        beta = float(w.norm())
        if beta <= 0:
            return beta
        # Simon's recurrence: beta omega_{j+1} = T omega_j - sum_{l in L} T_lj omega_l, plus rounding.
        t = self.proj[: j + 1, : j + 1].to(torch.float64)
        om = self.omega
        new = (t @ om[: j + 1, j] - om[: j + 1, lo : j + 1] @ t[lo : j + 1, j]) / beta
        new += torch.sign(new) * self.eps * max(self.norm_est, float(coeffs.abs().max())) / beta
        new[lo : j + 1] = self.eps
        forced, lost = self._force, bool(new.abs().max() > math.sqrt(self.eps))
        if forced or lost:
            self._orthogonalise(w, 0, j + 1)  # coefficients discarded: T stays tridiagonal (and arrow)
            self._orthogonalise(w, 0, j + 1)
            beta = float(w.norm())
            new.fill_(self.eps)
            self.reorthogonalisations += 1
        self._force = lost and not forced
        self._set_omega(j + 1, new)
        if j + 1 < self.basis.shape[0] and beta > 0:
            self.basis[j + 1] = w / beta
        return beta

    # -------------------------------------------------------------------------------------------------
    def ritz(self) -> Ritz:
        """Rayleigh–Ritz on the current basis (cheap next to a product while the basis is small)."""
        t = self.proj[: self.j, : self.j]
        values, coeffs = torch.linalg.eigh(0.5 * (t + t.T))
        self.norm_est = max(self.norm_est, float(values.abs().max()))
        self.ritz_at = self.j
        return Ritz(values, coeffs, (self.coupling * coeffs[self.j - 1, :]).abs())

    def log_krylov_norm(self) -> float:
        r""":math:`\log \|p_j(A) v_1\| = \log(\beta_1\cdots\beta_j)`, from the subdiagonal of ``T_j`` and
        ``beta`` (meaningful while :attr:`krylov`)."""
        if self.coupling == 0.0:
            return -math.inf
        sub = torch.diagonal(self.proj[: self.j, : self.j], -1).abs().to(torch.float64)
        if bool((sub <= 0).any()):
            return -math.inf
        return float(torch.log(sub).sum()) + math.log(self.beta)

    def restart(self, ritz: Ritz, keep: Tensor) -> None:
        r"""Thick restart: the basis becomes the kept Ritz vectors ``Y`` and ``v_{j+1}``.

        The decomposition keeps its form, :math:`A Y = Y \Theta + v_{j+1} c^\top` with
        :math:`c = \beta s_{j,keep}`: ``T`` becomes ``diag(theta_keep)`` bordered by ``c`` in its next
        row and column, and the next step recomputes that row in full from ``A v_{j+1}``. ``Y`` is
        formed in place, a block of columns at a time (no second copy of the kept vectors).
        """
        kept = keep.numel()
        s = ritz.coeffs[:, keep]
        coupling = self.coupling * ritz.coeffs[self.j - 1, keep]
        per = self._block_columns(self.j)
        for c0 in range(0, self.n, per):
            block = self.basis[: self.j, c0 : c0 + per].to(self.dtype)
            self.basis[:kept, c0 : c0 + per] = (s.T @ block).to(self.basis.dtype)
        self.basis[kept] = self.basis[self.j]
        self.proj.zero_()
        self.proj[:kept, :kept] = torch.diag(ritz.values[keep])
        self.proj[kept, :kept] = coupling
        self.proj[:kept, kept] = coupling
        if self.partial:
            # Simon's recurrence is for the three-term Lanczos recurrence; a thick restart ends it, and
            # from here every step orthogonalises against the whole basis (kept vectors included).
            self.partial = False
            del self.omega
        self.j = kept
        self.ritz_at = kept
        self.restarts += 1
        self.krylov = False

    def vectors(self, ritz: Ritz, idx: Tensor) -> Tensor:
        """The Ritz vectors ``V_j s_i`` for ``i`` in ``idx``, unit columns (shape ``(n, len(idx))``)."""
        coeffs = ritz.coeffs[:, idx]
        if self.basis.dtype == self.dtype:
            vectors = self.basis[: self.j].T @ coeffs
        else:
            vectors = torch.empty(self.n, coeffs.shape[1], dtype=self.dtype, device=self.basis.device)
            per = self._block_columns(self.j)
            for c0 in range(0, self.n, per):
                vectors[c0 : c0 + per] = self.basis[: self.j, c0 : c0 + per].to(self.dtype).T @ coeffs
        return vectors / vectors.norm(dim=0, keepdim=True)


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

    def floor(self, norm_est: float) -> float:
        if self.atol is not None:
            return float(self.atol)
        return self.value_floor * norm_est if (self.relative_to == "value" or self.coarse_basis) else 0.0

    def bound(self, values: Tensor, norm_est: float) -> Tensor:
        """The residual each pair must reach: ``max(tol * scale, floor)``."""
        scale = values.abs() if self.relative_to == "value" else torch.full_like(values, norm_est)
        return torch.clamp(self.tol * scale, min=self.floor(norm_est))

    def _random_start(self, state: LanczosState) -> bool:
        return self.miss_probability is not None and state.krylov

    def due(self, state: LanczosState, products: int) -> bool:
        """Is a Rayleigh–Ritz worth its cost now?"""
        out_of_steps = state.full or products >= self.budget or state.j >= self.n
        if (state.j < self.min_dim and not out_of_steps and self.stop_below is None
                and not self._random_start(state)):
            # A given start: a Ritz pair can have a tiny residual and still not be the extreme one
            # (misconvergence), and nothing bounds that chance, so convergence is not checked before min_dim.
            return False
        every = 1 if state.j <= RITZ_EVERY_STEP else math.ceil(state.j / RITZ_INTERVAL)
        return out_of_steps or state.j - state.ritz_at >= every

    def guarded(self, state: LanczosState, ritz: Ritz) -> bool:
        """May the run stop on converged residuals, as far as misconvergence goes?"""
        if state.j >= self.n or (state.saw_invariant and self.miss_probability is not None):
            # Exact Ritz values; or the random start's Krylov space became invariant, so every eigenvalue
            # (almost surely every one has a component in a random start) is among them.
            return True
        if state.j >= self.min_dim:
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

    def reason(self, state: LanczosState, ritz: Ritz, products: int) -> str | None:
        """Why to stop now (``"certificate"``, ``"converged"``, ``"budget"``, ``"exhausted"``), or None."""
        if self.stop_below is not None and float(ritz.values[0]) < self.stop_below:
            return "certificate"  # a Rayleigh quotient needs no convergence, at any Krylov size
        if state.j < self.min_dim and products < self.budget and not self._random_start(state):
            return None
        idx = _wanted(ritz.values, self.k, self.which, ritz.distinct)
        if bool((ritz.estimates[idx] <= self.bound(ritz.values[idx], state.norm_est)).all()) and self.guarded(state, ritz):
            return "converged"
        if products >= self.budget:
            return "budget"
        if state.j >= self.n:
            return "exhausted"  # V_j spans R^n: the Ritz pairs are exact
        return None

    def report(self, state: LanczosState, ritz: Ritz, stop: str) -> dict[str, Any]:
        """The guard as a record: what let the run stop and, while the random-start bound holds (a random
        start, no restart), the bounds it gives on the extreme eigenvalues at both ends."""
        rule = {"converged": "random-start bound" if state.j < self.min_dim else "minimum Krylov dimension"}.get(stop)
        if stop == "converged" and (state.j >= self.n or state.saw_invariant):
            rule = "exact"
        out: dict[str, Any] = {"stopped": stop, "rule": rule, "steps": state.j, "min_dim": self.min_dim,
                               "miss_probability": self.miss_probability}
        if self.miss_probability is None or not (state.krylov or state.saw_invariant):
            return out
        log_norm = -math.inf if state.saw_invariant or state.j >= self.n else state.log_krylov_norm()
        level = _log_tail_level(self.n, self.miss_probability, 1)
        values = ritz.values.cpu()
        # Both ends, whichever was asked: one Krylov space bounds both (analyze reads the far end's bound
        # to accept the top run's smallest Ritz pair as the bottom one).
        out["lambda_max_at_most"] = random_start_bound(values, log_norm, level)
        out["lambda_min_at_least"] = -random_start_bound(-torch.flip(values, [0]), log_norm, level)
        return out


def restart_set(ritz: Ritz, k: int, which: str, size: int, converged: Tensor) -> Tensor:
    """The Ritz pairs a thick restart keeps: indices into ``ritz.values``, ascending.

    Near the wanted end, the wanted pairs and as many neighbours, up to half the basis (Wu & Simon).
    Besides them, every converged pair (locking: see the module docstring), most accurate first,
    while a third of the basis stays free for new vectors; locked pairs take their room from the
    neighbours, down to as many neighbours as wanted pairs.
    """
    j = ritz.values.numel()
    n_wanted = _wanted(ritz.values, k, which).numel()
    room = size - max(size // 3, 2)  # kept at most
    n_near = min(j - 1, size - 2, n_wanted + max(n_wanted, (size - n_wanted) // 2))

    def nearest(count: int) -> Tensor:
        """The ``count`` pairs nearest the wanted end (``count / 2`` at each end for ``"both"``)."""
        return _wanted(ritz.values, count // 2 if which == "both" else count, which)

    elsewhere = torch.ones(j, dtype=torch.bool)
    elsewhere[nearest(n_near)] = False
    lockable = torch.nonzero(elsewhere & converged.cpu()).flatten()
    lockable = lockable[torch.argsort(ritz.estimates.cpu()[lockable])]  # most accurate first
    n_near = max(min(n_near, room - lockable.numel()), min(n_near, 2 * n_wanted))
    near = nearest(n_near)
    locked = lockable[: max(0, room - near.numel())]
    return torch.sort(torch.cat([near, locked])).values


def _budget_plan(op: Any, n: int, want: int, *, memory_budget: int | None, krylov_dim: int | None,
                 basis_dtype: torch.dtype | None, dtype: torch.dtype) -> BasisPlan:
    device = torch.device(op.device)
    if memory_budget is not None:
        if not (isinstance(memory_budget, int) and memory_budget >= 0):
            raise InvalidInputError(f"memory_budget must be a number of bytes >= 0, got {memory_budget!r}")
        budget, source = memory_budget, "memory_budget"
    else:
        budget, source = default_budget(op, device)
    host_budget, host_source = None, ""
    if device.type == "cuda" and basis_dtype is None and dtype == torch.float64:
        host_budget, host_source = default_budget(None, torch.device("cpu"))
    return plan_basis(n, want, budget=budget, budget_source=source, device=device, recurrence_dtype=dtype,
                      krylov_dim=krylov_dim, basis_dtype=basis_dtype, host_budget=host_budget,
                      host_source=host_source)


def eigs(
    op: Any,
    k: int = 1,
    which: str = "largest",
    *,
    tol: float = 1e-6,
    krylov_dim: int | None = None,
    max_hvps: int | None = None,
    seed: int = 0,
    v0: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    stop_below: float | None = None,
    relative_to: str = "norm",
    atol: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    memory_budget: int | None = None,
    basis_dtype: torch.dtype | None = None,
    miss_probability: float = DEFAULT_MISS_PROBABILITY,
) -> EigenResult:
    """The ``k`` extreme eigenpairs of a symmetric operator.

    Args:
        op: anything with ``shape``, ``dtype``, ``device`` and ``matmat`` (e.g.
            :class:`~saddlescope.curvature.operator.HessianOperator`).
        k: pairs wanted at each requested end.
        which: ``"largest"``, ``"smallest"`` (the most negative: what decides a saddle) or ``"both"``.
        tol: converged when ``||A v - lambda v|| <= max(tol * scale, atol)``, where ``scale`` is the
            spectral-norm estimate ``max|lambda|`` (``relative_to="norm"``) or ``|lambda|`` of the
            pair itself (``relative_to="value"``: then ``tol`` bounds each eigenvalue's relative error).
        krylov_dim: basis size before a thick restart (default: planned from ``memory_budget``, see
            :func:`plan_basis`: as many vectors as fit, at most :data:`KRYLOV_MAX`; at most n).
        max_hvps: product budget (default ``min(2000, max(20 * krylov_dim, 500))``); the result says
            which pairs converged within it.
        seed: for the starting vector.
        v0: starting vector instead of a random one (then no random-start guard: convergence is not
            judged before ``max(2m + 1, 20)`` basis vectors, m pairs wanted).
        dtype: precision of the recurrence, basis and projected eigenproblem.
        stop_below: stop as soon as the smallest Ritz value is below this (a Ritz value is a Rayleigh
            quotient, so a negative one certifies negative curvature without convergence); the
            result's ``stopped_early`` says so and its Rayleigh quotients are recomputed exactly.
        relative_to: ``"norm"`` or ``"value"`` (see ``tol``).
        atol: absolute residual floor. Default 0 for ``"norm"``; for ``"value"``
            ``16 * eps(op.dtype) * max|lambda|``, near where products in the operator's precision stop
            improving, so an eigenvalue at zero does not spend the whole budget. With a float32 basis
            under float64 coefficients the floor is at least ``64 * eps(float32) * max|lambda|``
            (:data:`COARSE_FLOOR_EPS`), for either ``relative_to``: residuals stop improving there.
        progress: ``progress(products, max_hvps)`` after every Lanczos step.
        memory_budget: bytes the eigensolver's own tensors may hold (default: half of what is free
            where the operator lives, less the gradient graph a product rebuilds; see
            :func:`default_budget`). The result's ``plan`` says what was chosen and why.
        basis_dtype: store the basis in this precision instead of letting the plan choose (float32
            with float64 ``dtype``: partial reorthogonalisation).
        miss_probability: the misconvergence guard's level (module docstring).

    Raises:
        MemoryBudgetError: not even the smallest useful basis fits the budget (before any product).
    """
    if which not in WHICH:
        raise InvalidInputError(f"which must be one of {WHICH}, got {which!r}")
    n = int(op.shape[0])
    want = 2 * k if which == "both" else k
    if not (isinstance(k, int) and 1 <= k and want <= n):
        raise InvalidInputError(f"k = {k} pairs ({which}) do not fit an operator of dimension {n}")
    if not (tol > 0):
        raise InvalidInputError(f"tol must be positive, got {tol}")
    if relative_to not in ("norm", "value"):
        raise InvalidInputError(f"relative_to must be 'norm' or 'value', got {relative_to!r}")
    if atol is not None and not (atol >= 0):
        raise InvalidInputError(f"atol must be >= 0, got {atol}")
    if not (0 < miss_probability < 1):
        raise InvalidInputError(f"miss_probability must lie in (0, 1), got {miss_probability}")
    if krylov_dim is not None and min(n, krylov_dim) < min(n, want + 2):
        raise InvalidInputError(f"krylov_dim = {min(n, krylov_dim)} is too small for {want} pairs; use at least {want + 2}")
    plan = _budget_plan(op, n, want, memory_budget=memory_budget, krylov_dim=krylov_dim, basis_dtype=basis_dtype,
                        dtype=dtype)
    two_pass = plan.reorthogonalisation == TWO_PASS
    m_max = KRYLOV_MAX if two_pass else plan.vectors  # a two-pass run is never full: its steps are the budget's
    budget = max_hvps if max_hvps is not None else min(DEFAULT_MAX_HVPS, max(20 * m_max, 500))
    if budget < 1:
        raise InvalidInputError(f"max_hvps must be at least 1, got {budget}")
    where = torch.device(plan.device)
    stored = getattr(torch, plan.dtype.removeprefix("torch."))
    products = 0

    def apply(block: Tensor) -> Tensor:
        nonlocal products
        products += block.shape[1]
        return op.matmat(block.to(op.device, op.dtype)).to(where, dtype)

    random_start = v0 is None
    if v0 is None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        v0 = torch.randn(n, generator=gen, dtype=dtype)
    v = v0.to(where, dtype)
    if float(v.norm()) == 0:
        raise InvalidInputError("v0 must be non-zero")
    coarse = torch.finfo(stored).bits < torch.finfo(dtype).bits
    if coarse:
        floor = max(VALUE_FLOOR_EPS * torch.finfo(op.dtype).eps, COARSE_FLOOR_EPS * torch.finfo(stored).eps)
    else:
        floor = VALUE_FLOOR_EPS * torch.finfo(op.dtype).eps
    rule = StoppingRule(
        k=k, which=which, tol=tol, relative_to=relative_to, atol=atol,
        value_floor=floor, stop_below=stop_below, budget=budget,
        min_dim=min(n, m_max, max(2 * want + 1, 20)), n=n,
        miss_probability=miss_probability if random_start else None, coarse_basis=coarse,
    )
    state: LanczosState | TwoPassState
    if two_pass:
        state = TwoPassState(v, vector_dtype=stored)
    else:
        state = LanczosState(v, m_max, seed, basis_dtype=stored)
    while True:
        if not state.full and products < budget:
            state.step(apply)
            if progress is not None:
                progress(products, budget)
        if not rule.due(state, products):
            continue
        ritz = state.ritz()
        stop = rule.reason(state, ritz, products)
        if stop is not None:
            break
        if state.full and two_pass:
            stop = "exhausted"  # the recurrence broke down: its Krylov space is invariant, its Ritz pairs exact
            break
        if state.full:
            converged = ritz.estimates <= rule.bound(ritz.values, state.norm_est)
            state.restart(ritz, restart_set(ritz, k, which, m_max, converged))

    guard = rule.report(state, ritz, stop)
    # The wanted Ritz vectors, and the far end's (one call: a two-pass state spends a pass on it).
    wanted = _wanted(ritz.values, k, which, ritz.distinct)
    far = None
    if which != "both" and ritz.values.numel() > k:
        far = 0 if which == "largest" else ritz.values.numel() - 1
    everything = state.vectors(ritz, wanted if far is None else torch.cat([wanted, torch.tensor([far])]))
    vectors = everything[:, : wanted.numel()]
    opposite, opposite_value = None, None
    if far is not None:
        opposite, opposite_value = everything[:, -1].to(op.device), float(ritz.values[far])
    # True residuals: Lanczos's estimate can be optimistic in floating point.
    confirm = apply(vectors)
    rayleigh = (vectors * confirm).sum(0)
    residuals = (confirm - vectors * rayleigh).norm(dim=0)
    order = torch.argsort(rayleigh)
    norm_est = max(state.norm_est, float(rayleigh.abs().max()))
    return EigenResult(
        eigenvalues=rayleigh[order].to(op.device),
        eigenvectors=vectors[:, order].to(op.device),
        residuals=residuals[order].to(op.device),
        converged=(residuals[order] <= rule.bound(rayleigh[order], norm_est)).cpu(),
        spectral_norm=norm_est,
        hvp_count=products,
        restarts=state.restarts,
        which=which,
        tol=tol,
        stopped_early=stop == "certificate",
        relative_to=relative_to,
        atol=rule.floor(norm_est),
        dtype=str(stored),
        operator_dtype=str(op.dtype),
        plan=plan,
        guard=guard,
        reorthogonalisations=state.reorthogonalisations,
        opposite=opposite,
        opposite_ritz_value=opposite_value,
    )
