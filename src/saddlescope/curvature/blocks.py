r"""Curvature per block (layer, module, parameter group): the diagonal blocks :math:`H_{bb}`.

Each block's Hessian is the operator :math:`v_b \mapsto (H\,[0, \dots, v_b, \dots, 0])_b`, so one
gradient graph serves every block and every algorithm (eigs, trace, index) runs on a block unchanged.
The diagonal blocks say which layer is sharp (HAWQ-style quantisation ranks layers by their top
eigenvalue and trace) and where negative curvature lives; they ignore the couplings between blocks,
so a block's extreme eigenvalues bound nothing about the whole Hessian's beyond interlacing:
:math:`\lambda_{min}(H) \le \lambda_{min}(H_{bb})` and :math:`\lambda_{max}(H_{bb}) \le \lambda_{max}(H)`.
Block traces add up to the whole trace.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from saddlescope.curvature.exact import eigh_dtype, symmetric_eigh
from saddlescope.curvature.index import index_estimate
from saddlescope.curvature.lanczos import eigs
from saddlescope.curvature.operator import HessianOperator
from saddlescope.curvature.trace import trace
from saddlescope.display import block_report_html
from saddlescope.errors import InvalidInputError
from saddlescope.objective import Objective
from saddlescope.tolerances import default_tolerances


@dataclass
class BlockRow:
    """One block's curvature.

    Attributes:
        name, n_params: the block and its size.
        lambda_min, lambda_max: extreme eigenvalues of the block (exact, or Lanczos to ``tol``).
        trace, trace_low, trace_high: the trace and its interval (equal when exact).
        index, index_error: fraction of eigenvalues below ``-delta`` and its error bar (0 when exact).
        delta: the zero band (exact: ``rtol * max|lambda|``; iterative: the quadrature's resolution).
        method: ``"exact"`` or ``"lanczos"``; converged: the Lanczos pairs met ``tol``.
        hvp_count: products spent on this block.
    """

    name: str
    n_params: int
    lambda_min: float
    lambda_max: float
    trace: float
    trace_low: float
    trace_high: float
    index: float
    index_error: float
    delta: float
    method: str
    converged: bool
    hvp_count: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class BlockReport:
    """Per-block curvature, plus the whole model's row (``whole``)."""

    rows: list[BlockRow]
    whole: BlockRow
    by: str
    seconds: float
    hvp_count: int
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"by": self.by, "rows": [r.to_dict() for r in self.rows], "whole": self.whole.to_dict(),
                "seconds": self.seconds, "hvp_count": self.hvp_count, "settings": dict(self.settings),
                "notes": list(self.notes)}

    def _repr_html_(self) -> str:
        return block_report_html(self)  # Jupyter: where negative curvature lives first

    def table(self) -> str:
        """The rows as aligned text."""
        head = f"{'block':24s} {'n':>9s} {'lambda_min':>11s} {'lambda_max':>11s} {'trace':>11s} {'index':>7s} method"
        lines = [head]
        for r in [*self.rows, self.whole]:
            lines.append(f"{r.name[:24]:24s} {r.n_params:9d} {r.lambda_min:11.4g} {r.lambda_max:11.4g} "
                         f"{r.trace:11.4g} {r.index:7.3f} {r.method}")
        return "\n".join(lines)


def per_block(
    objective: Objective,
    theta: Tensor | None = None,
    *,
    by: str | Callable[[str], str] = "module",
    exact_max_params: int = 1024,
    tol: float = 1e-6,
    rtol: float | None = None,
    trace_matvecs: int = 60,
    index_probes: int = 4,
    index_steps: int = 40,
    whole: bool = True,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> BlockReport:
    """Extreme eigenvalues, trace and index of every diagonal block of the Hessian.

    Args:
        by: how to split ``theta`` (see :meth:`Objective.blocks`).
        exact_max_params: blocks up to this size are formed and diagonalised exactly; larger
            ones use Lanczos (both ends, to ``tol`` relative to the spectral norm), Hutch++ with
            ``trace_matvecs`` products and stochastic Lanczos quadrature for the index.
        rtol: zero threshold of the exact index, relative to the block's ``max|lambda|``
            (default by dtype, as in :func:`saddlescope.analyze`).
        whole: also compute the whole Hessian's row the same way.
        progress: ``progress(done, total)`` after each block.
    """
    if exact_max_params < 0 or trace_matvecs < 6 or index_probes < 1 or index_steps < 2:
        raise InvalidInputError("need exact_max_params >= 0, trace_matvecs >= 6, index_probes >= 1, index_steps >= 2")
    rtol = default_tolerances(objective.dtype)[1] if rtol is None else float(rtol)
    start = time.perf_counter()
    full = HessianOperator(objective, theta)
    table = objective.blocks(by)
    jobs: list[tuple[str, HessianOperator]] = [(name, full.block(index)) for name, index in table.items()]
    if whole:
        jobs.append(("(whole model)", full))
    rows = []
    for i, (name, op) in enumerate(jobs):
        before = full.hvp_count
        n = op.shape[0]
        if n <= exact_max_params:
            rows.append(_exact_row(name, op, rtol))
        else:
            rows.append(_iterative_row(name, op, tol, trace_matvecs, index_probes, index_steps, seed))
        rows[-1].hvp_count = full.hvp_count - before
        if progress is not None:
            progress(i + 1, len(jobs))
    whole_row = rows.pop() if whole else _empty_row()
    label = by if isinstance(by, str) else getattr(by, "__name__", "callable")
    return BlockReport(rows, whole_row, label, time.perf_counter() - start, full.hvp_count,
                       {"exact_max_params": exact_max_params, "tol": tol, "rtol": rtol,
                        "trace_matvecs": trace_matvecs, "index_probes": index_probes,
                        "index_steps": index_steps, "seed": seed,
                        "precision": {"model": str(objective.dtype), "exact_eigensolver": str(eigh_dtype(objective.dtype)),
                                      "lanczos": "torch.float64"}},
                       list(objective.notes))


def _exact_row(name: str, op: HessianOperator, rtol: float) -> BlockRow:
    n = op.shape[0]
    columns = []
    for start in range(0, n, 64):
        eye = torch.zeros(n, min(64, n - start), dtype=op.dtype, device=op.device)
        eye[start + torch.arange(eye.shape[1]), torch.arange(eye.shape[1])] = 1
        columns.append(op.matmat(eye))
    matrix = torch.cat(columns, 1).to(torch.float64).cpu()
    values, _ = symmetric_eigh(0.5 * (matrix + matrix.T), vectors=False)
    delta = rtol * float(values.abs().max())
    tr = float(values.sum())
    return BlockRow(name, n, float(values[0]), float(values[-1]), tr, tr, tr,
                    float((values < -delta).double().mean()), 0.0, delta, "exact", True, 0)


def _iterative_row(name: str, op: HessianOperator, tol: float, trace_matvecs: int, index_probes: int,
                   index_steps: int, seed: int) -> BlockRow:
    n = op.shape[0]
    ends = eigs(op, 1, "both", tol=tol, seed=seed)
    tr = trace(op, min(trace_matvecs, 3 * n), seed=seed)
    est = index_estimate(op, n_probes=index_probes, steps=min(index_steps, n), seed=seed)
    return BlockRow(name, n, float(ends.eigenvalues[0]), float(ends.eigenvalues[-1]), tr.value, tr.low, tr.high,
                    est.value, est.error, est.delta, "lanczos", ends.all_converged, 0)


def _empty_row() -> BlockRow:
    nan = math.nan
    return BlockRow("(whole model)", 0, nan, nan, nan, nan, nan, nan, nan, nan, "skipped", False, 0)
