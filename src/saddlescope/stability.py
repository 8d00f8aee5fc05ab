r"""How much does a verdict depend on the data it was computed on?

A Hessian taken on a subsample is the Hessian of a different function: with per-batch Hessians
:math:`H_b`, the full-data Hessian is the weighted mean :math:`\bar H = \sum_b n_b H_b / \sum_b n_b`,
and the extreme eigenvalues of each :math:`H_b` scatter around those of :math:`\bar H` (PyHessian
users saw one model's top eigenvalue range from 159 to 1587 over ten batches of 128).
:func:`stability` repeats the analysis on disjoint subsets and reports the spread of
:math:`\lambda_{min}` and :math:`\lambda_{max}` and how often the subsets agree on the verdict. It warns
when the spread of :math:`\lambda_{min}` is larger than its distance to the zero threshold: then the
sign of the smallest eigenvalue, and with it "saddle" against "minimum", is decided by which samples
were drawn, not by the model.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from saddlescope.critical import CriticalPoint, analyze
from saddlescope.errors import InvalidInputError
from saddlescope.objective import Objective


@dataclass
class Spread:
    """Mean, sample standard deviation (``ddof=1``; 0 for one value), minimum and maximum."""

    mean: float
    std: float
    min: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(statistics.fmean(values), std, min(values), max(values))

    def to_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@dataclass
class SubsetResult:
    """The analysis of one subset."""

    index: int
    n_samples: int
    kind: str
    curvature_kind: str
    lambda_min: float
    lambda_max: float
    grad_norm: float
    zero_threshold: float
    method: str
    hvp_count: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class StabilityReport:
    """The verdict's dependence on the data subset.

    Attributes:
        subsets: one row per subset.
        lambda_min, lambda_max, grad_norm: their spread over the subsets.
        verdict, verdict_agreement: the most common verdict (``CriticalPoint.kind``) and the fraction
            of subsets that give it. The gradient test is part of the verdict, and a subset's
            gradient is noisier than the full data's, so this can disagree where the curvature does not.
        curvature, curvature_agreement: the same for the eigenvalue test alone (``curvature_kind``).
        margin: distance of the mean ``lambda_min`` beyond the mean zero threshold (negative when the
            mean lies inside the "zero" band).
        warnings: what the spread puts in doubt, in words.
    """

    subsets: list[SubsetResult]
    lambda_min: Spread
    lambda_max: Spread
    grad_norm: Spread
    verdict: str
    verdict_agreement: float
    curvature: str
    curvature_agreement: float
    margin: float
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "subsets": [s.to_dict() for s in self.subsets],
            "lambda_min": self.lambda_min.to_dict(),
            "lambda_max": self.lambda_max.to_dict(),
            "grad_norm": self.grad_norm.to_dict(),
            "verdict": self.verdict,
            "verdict_agreement": self.verdict_agreement,
            "curvature": self.curvature,
            "curvature_agreement": self.curvature_agreement,
            "margin": self.margin,
            "warnings": list(self.warnings),
            "seconds": self.seconds,
        }

    def summary(self) -> str:
        lo, hi = self.lambda_min, self.lambda_max
        lines = [
            f"{len(self.subsets)} disjoint subsets: verdict {self.verdict} on "
            f"{self.verdict_agreement:.0%}, curvature {self.curvature} on {self.curvature_agreement:.0%}",
            f"lambda_min {lo.mean:.4g} +- {lo.std:.3g} (range {lo.min:.4g} .. {lo.max:.4g})",
            f"lambda_max {hi.mean:.4g} +- {hi.std:.3g} (range {hi.min:.4g} .. {hi.max:.4g})",
        ]
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def stability(
    source: Callable[[int], Objective] | Iterable[Any],
    model: nn.Module | None = None,
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    *,
    n_subsets: int | None = None,
    batches_per_subset: int = 1,
    theta: Tensor | None = None,
    analyze_kwargs: dict[str, Any] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> StabilityReport:
    """Analyse the same parameters on disjoint data subsets and report the spread.

    Args:
        source: either a factory ``source(i) -> Objective`` for subset ``i`` (then ``n_subsets`` is
            required), or the data: an iterable of ``(inputs, targets)`` batches (a DataLoader),
            read once and cut into consecutive groups of ``batches_per_subset`` batches; then
            ``model`` and ``loss_fn`` are required and each subset's objective is
            ``Objective.from_model(model, loss_fn, group, **model_kwargs)``.
        n_subsets: how many subsets (data: default every complete group, at least 2).
        batches_per_subset: batches per subset when ``source`` is data.
        theta: the point (default each objective's ``theta0``, the model's parameters).
        analyze_kwargs: passed to :func:`saddlescope.analyze` (default ``k=1``: only the extreme
            eigenvalues are needed).
        progress: ``progress(done, total)`` after each subset.
    """
    objectives = _subset_objectives(source, model, loss_fn, n_subsets, batches_per_subset, model_kwargs)
    kwargs = {"k": 1, **(analyze_kwargs or {})}
    start = time.perf_counter()
    rows: list[SubsetResult] = []
    for i, make in enumerate(objectives):
        obj = make()
        cp = analyze(obj, theta, **kwargs)
        rows.append(_row(i, obj, cp))
        if progress is not None:
            progress(i + 1, len(objectives))
    return _report(rows, time.perf_counter() - start)


def _subset_objectives(
    source: Any,
    model: nn.Module | None,
    loss_fn: Callable[[Any, Any], Tensor] | None,
    n_subsets: int | None,
    batches_per_subset: int,
    model_kwargs: dict[str, Any] | None,
) -> list[Callable[[], Objective]]:
    """One deferred objective per subset (built when analysed, so one is alive at a time)."""
    if n_subsets is not None and not (isinstance(n_subsets, int) and n_subsets >= 2):
        raise InvalidInputError(f"n_subsets must be an integer >= 2 (a spread needs two), got {n_subsets!r}")
    if callable(source) and not isinstance(source, nn.Module):
        if n_subsets is None:
            raise InvalidInputError("with an objective factory, give n_subsets (how many times to call it)")
        return [lambda i=i: _checked(source(i), i) for i in range(n_subsets)]
    if model is None or loss_fn is None:
        raise InvalidInputError(
            "stability on data needs the model and loss_fn: stability(loader, model, loss_fn), "
            "or pass a factory i -> Objective"
        )
    if not isinstance(source, Iterable):
        raise InvalidInputError(f"source must be a factory or an iterable of batches, got {type(source).__name__}")
    if not (isinstance(batches_per_subset, int) and batches_per_subset >= 1):
        raise InvalidInputError(f"batches_per_subset must be a positive integer, got {batches_per_subset!r}")
    limit = None if n_subsets is None else n_subsets * batches_per_subset
    batches = list(itertools.islice(iter(source), limit))
    groups = [batches[i : i + batches_per_subset] for i in range(0, len(batches), batches_per_subset)]
    groups = [g for g in groups if len(g) == batches_per_subset]
    wanted = n_subsets or 2
    if len(groups) < wanted:
        raise InvalidInputError(
            f"the data gave {len(batches)} batches: {len(groups)} disjoint subsets of "
            f"{batches_per_subset}, but {wanted} are needed; use smaller batches or fewer subsets"
        )
    extra = model_kwargs or {}
    return [lambda g=g: Objective.from_model(model, loss_fn, g, **extra) for g in groups]


def _checked(obj: Any, i: int) -> Objective:
    if not isinstance(obj, Objective):
        raise InvalidInputError(f"the factory returned {type(obj).__name__} for subset {i}, not an Objective")
    return obj


def _row(i: int, obj: Objective, cp: CriticalPoint) -> SubsetResult:
    return SubsetResult(
        index=i,
        n_samples=obj.n_samples,
        kind=cp.kind,
        curvature_kind=cp.curvature_kind,
        lambda_min=cp.lambda_min,
        lambda_max=cp.lambda_max,
        grad_norm=cp.grad_norm,
        zero_threshold=cp.tolerances.zero_threshold,
        method=cp.method,
        hvp_count=cp.hvp_count,
    )


def _majority(labels: list[str]) -> tuple[str, float, str]:
    counts = Counter(labels)
    label, count = counts.most_common(1)[0]
    spelled = ", ".join(f"{c}/{len(labels)} {k}" for k, c in counts.most_common())
    return label, count / len(labels), spelled


def _report(rows: list[SubsetResult], seconds: float) -> StabilityReport:
    low = Spread.of([r.lambda_min for r in rows])
    high = Spread.of([r.lambda_max for r in rows])
    grads = Spread.of([r.grad_norm for r in rows])
    verdict, verdict_share, verdicts = _majority([r.kind for r in rows])
    curvature, curvature_share, curvatures = _majority([r.curvature_kind for r in rows])
    threshold = statistics.fmean(r.zero_threshold for r in rows)
    margin = abs(low.mean) - threshold
    warnings = []
    if curvature_share < 1:
        warnings.append(f"the subsets disagree on the curvature: {curvatures}")
    if low.std > margin:
        warnings.append(
            f"lambda_min = {low.mean:.3g} +- {low.std:.3g} over the subsets: the spread is larger "
            f"than its distance to the zero threshold ({margin:.3g}), so its sign depends on the data "
            "subset; analyse on more data (larger max_batches)"
        )
    if verdict_share < 1 and curvature_share == 1:
        warnings.append(f"the subsets disagree on the verdict ({verdicts}) through the gradient test")
    if not math.isfinite(low.mean):
        warnings.append("lambda_min is not finite on some subset")
    return StabilityReport(rows, low, high, grads, verdict, verdict_share, curvature, curvature_share,
                           margin, warnings, seconds)
