r"""How :func:`~saddlescope.curvature.lanczos.eigs` holds its Krylov basis: memory is a budget
(:func:`plan_basis`, reported as :class:`BasisPlan` in ``EigenResult.plan``). The
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
   Ritz vectors (:mod:`~saddlescope.curvature.two_pass`: ``5 + pairs`` vectors, ``2 pairs + 1`` beyond
   four pairs; 1.7-3x the products). Its vectors are float32 first when the products arrive in float32 or
   narrower (a network in float32): every product is rounded there already, and the recurrence loses
   orthogonality at the products' rounding whatever the vectors hold, so float64 vectors would only double
   the memory traffic of each step (a 124M-parameter GPT-2 on one CPU thread: the verdict took 620 s and
   10.1 GB with float64 vectors, 466 s and 8.7 GB with float32 ones, the same 83 products and lambda_max;
   ``bench/gpu.py``); float64 then float32 otherwise;
6. otherwise :class:`~saddlescope.errors.MemoryBudgetError` with the estimate, before any product.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from saddlescope.curvature.two_pass import TWO_PASS_VECTORS, two_pass_bytes
from saddlescope.errors import InvalidInputError, MemoryBudgetError
from saddlescope.memory import available_memory, describe_bytes

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
    operand_dtype: torch.dtype | None = None,
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
        operand_dtype: the precision the products arrive in (the operator's); narrower than the
            recurrence's, a run without a basis holds its vectors in float32 first (module docstring, 5).

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
        for vector_dtype in _two_pass_dtypes(recurrence_dtype, operand_dtype):
            need = two_pass_bytes(n, want, vector_dtype=vector_dtype, recurrence_dtype=recurrence_dtype)
            kind = f"two passes of the three-term recurrence, {str(vector_dtype).removeprefix('torch.')} vectors"
            if need <= budget:
                why = "; ".join(tried + [f"{kind} need {describe_bytes(need)} of {describe_bytes(budget)} ({budget_source})"])
                return BasisPlan(max(TWO_PASS_VECTORS + want + 1, 2 * want + 1), str(vector_dtype), str(recurrence_dtype), TWO_PASS,
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


def _two_pass_dtypes(recurrence_dtype: torch.dtype, operand_dtype: torch.dtype | None) -> tuple[torch.dtype, ...]:
    """The vector precisions a run without a basis tries, in order (module docstring, 5)."""
    narrow = operand_dtype is not None and torch.finfo(operand_dtype).bits < torch.finfo(recurrence_dtype).bits
    return tuple(dict.fromkeys((torch.float32, recurrence_dtype) if narrow else (recurrence_dtype, torch.float32)))


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


def budget_plan(op: Any, n: int, want: int, *, memory_budget: int | None, krylov_dim: int | None,
                 basis_dtype: torch.dtype | None, dtype: torch.dtype) -> BasisPlan:
    """The plan :func:`~saddlescope.curvature.lanczos.eigs` runs under: the budget given, or the default
    (:func:`default_budget`), and on a GPU with a float64 recurrence the host memory a basis may move to."""
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
                      host_source=host_source, operand_dtype=getattr(op, "dtype", None))
