r"""The monitor's response policy: when a stall is worth an analysis, and when an escape counts.

A training step costs one gradient; an analysis costs tens to thousands of Hessian-vector products
(each 1.25-2x a gradient) and an escape a line search of loss evaluations. Three rules keep what the
monitor spends in proportion to what it learns (:class:`AnalysisBudget` holds their settings,
:class:`AnalysisScheduler` their state):

- **Budget.** At most ``max_analyses`` analyses, and a new one starts only while the time spent in
  analyses and escapes so far is at most ``time_fraction`` of the training time so far (the wall
  time spent outside the monitor between its calls). The first stall is always analysed: it is what
  the monitor is for. Each analysis is asked to fit what is left (``exact_affordable_s`` of
  :func:`~saddlescope.critical.analyze`): the whole spectrum only when it is affordable, otherwise
  the iterative verdict, which stops at the first certificate. Over a run the analyses therefore
  cost at most ``time_fraction`` of the training time plus the first and the last analysis. The
  per-step bookkeeping (the loss average, the rules, a gradient norm: tens of microseconds a step)
  is not part of the budget; :attr:`Spending.overhead` reports everything together.
- **Back-off.** After a response to a stall, the monitor does not look at a stall again for
  ``spacing`` steps. The spacing starts at the detector's cooldown :math:`W` and is multiplied by
  ``backoff`` every time a response ends as the one before (the same verdict, failed again, or
  deferred by the budget: a deferral learns nothing new) with the loss unchanged,
  :math:`|L - L_{prev}| \le \mathrm{flat\_tol}\,|L_{prev}|` (the full-data loss of the analysis).
  A persistent plateau is thus analysed at steps :math:`s, s+W, s+3W, s+7W, \dots` instead of every
  :math:`W`; a new verdict, a moved loss or an escape resets the spacing to :math:`W`. Stall
  detections inside the spacing make no event.
- **An escape must lower the loss.** The escape is
  :func:`~saddlescope.escape.step.escape`'s line search along the verdict's direction
  (backtracking, then doubling the step while the loss keeps falling; the monitor uses the
  customary Armijo constant :math:`c = 10^{-4}`, Nocedal & Wright 2006, section 3.1, so the doubling
  is not cut short where the loss bends away from its quadratic model). It counts, and the
  parameters move, only when it lowers the full-data loss by at least the monitor's
  ``min_escape_decrease`` (relative; default ``flat_tol``: a smaller decrease is what the detector
  calls flat over a whole window, so the run would stay where it was). Otherwise the event says
  what the line search found and the parameters stay (:func:`judge_escape`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from saddlescope.errors import InvalidInputError

__all__ = [
    "DEFAULT_ANALYZE_KWARGS",
    "DEFAULT_ESCAPE_KWARGS",
    "AnalysisBudget",
    "AnalysisScheduler",
    "Decision",
    "EscapeJudgement",
    "Spending",
    "judge_escape",
]

# The monitor asks for a verdict and its escape direction, not the index estimate (300 more products).
DEFAULT_ANALYZE_KWARGS: dict[str, Any] = {"index_probes": 0}
# Armijo's customary constant: keep doubling while the loss falls (see the module docstring).
DEFAULT_ESCAPE_KWARGS: dict[str, Any] = {"sufficient_decrease": 1e-4}


@dataclass(frozen=True)
class AnalysisBudget:
    """What a :class:`~saddlescope.monitor.SaddleMonitor` may spend on analyses (module docstring).

    Attributes:
        max_analyses: analyses over the whole run; None: no count limit.
        time_fraction: the time in analyses and escapes as a fraction of the training time,
            checked before each analysis after the first; None: no time limit.
        backoff: factor by which the spacing between looks at a persistent stall grows while
            nothing changes (1: no back-off, a look every cooldown as before).
    """

    max_analyses: int | None = None
    time_fraction: float | None = 0.05
    backoff: float = 2.0

    def __post_init__(self) -> None:
        m = self.max_analyses
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 0):
            raise InvalidInputError(f"max_analyses must be None or an integer >= 0, got {m!r}")
        f = self.time_fraction
        if f is not None and not (_is_number(f) and 0 < f):
            raise InvalidInputError(f"time_fraction must be None or a finite number > 0, got {f!r}")
        if not (_is_number(self.backoff) and self.backoff >= 1):
            raise InvalidInputError(f"backoff must be a finite number >= 1, got {self.backoff!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Spending:
    """What the monitor has spent so far, and the training time it is measured against.

    Attributes:
        analyses, escapes: analyses run and escapes taken.
        deferred: stalls not analysed because the budget was spent (each made an event).
        quiet: stall detections inside a back-off spacing (no event).
        hvps: Hessian-vector products of the analyses and escape sharpening.
        analysis_seconds: time in analyses and escapes.
        monitor_seconds: all time inside the monitor (analyses included).
        training_seconds: wall time between the monitor's calls (the training loop's own time).
    """

    analyses: int = 0
    escapes: int = 0
    deferred: int = 0
    quiet: int = 0
    hvps: int = 0
    analysis_seconds: float = 0.0
    monitor_seconds: float = 0.0
    training_seconds: float = 0.0

    @property
    def overhead(self) -> float:
        """``monitor_seconds / training_seconds`` (NaN before any training time was measured)."""
        return self.monitor_seconds / self.training_seconds if self.training_seconds > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        overhead = self.overhead
        return {**asdict(self), "overhead": overhead if math.isfinite(overhead) else None}


@dataclass(frozen=True)
class Decision:
    """What to do about one stall detection.

    Attributes:
        act: ``"analyse"``, ``"defer"`` (the budget is spent: an event, no analysis) or ``"quiet"``
            (inside the back-off spacing: no event).
        reason: one phrase (empty for ``"analyse"``).
        affordable_s: seconds the time budget has left for this analysis (None: no time budget).
    """

    act: str
    reason: str = ""
    affordable_s: float | None = None


class AnalysisScheduler:
    """The budget and back-off rules over a run (see the module docstring).

    Args:
        budget: the limits.
        base_spacing: the spacing after a response that changed something (the detector's cooldown).
        flat_tol: relative loss change below which a repeated response counts as "unchanged".
    """

    def __init__(self, budget: AnalysisBudget, base_spacing: int, flat_tol: float) -> None:
        self.budget = budget
        self.base_spacing = max(int(base_spacing), 1)
        self.flat_tol = float(flat_tol)
        self.spending = Spending()
        self.spacing = self.base_spacing
        self.next_step: int | None = None
        self._last: tuple[str, float] | None = None  # (outcome, loss) of the last response

    def decide(self, step: int) -> Decision:
        """Whether the stall detected at ``step`` gets an analysis, a deferral or nothing."""
        if self.next_step is not None and step < self.next_step:
            return Decision("quiet", f"back-off: next look at step {self.next_step}")
        budget, spent = self.budget, self.spending
        if budget.max_analyses is not None and spent.analyses >= budget.max_analyses:
            return Decision("defer", f"the budget of {budget.max_analyses} analyses is spent")
        if budget.time_fraction is None:
            return Decision("analyse")
        allowed = budget.time_fraction * spent.training_seconds
        if spent.analyses and spent.analysis_seconds > allowed:
            return Decision(
                "defer",
                f"analyses have taken {spent.analysis_seconds:.3g} s, more than {budget.time_fraction:.3g} of "
                f"the {spent.training_seconds:.3g} s of training so far",
            )
        return Decision("analyse", affordable_s=max(allowed - spent.analysis_seconds, 0.0))

    def record(self, step: int, outcome: str, loss: float | None, moved: bool) -> None:
        """Note the response at ``step`` (its verdict, ``"deferred"`` or ``"failed"``) and set the
        next step at which a stall is looked at."""
        last = self._last
        # A deferral learns nothing new: it continues whatever the last outcome was.
        same = last is not None and (last[0] == outcome or outcome == "deferred")
        unchanged = (
            not moved and same and loss is not None and math.isfinite(loss)
            and abs(loss - last[1]) <= self.flat_tol * max(abs(last[1]), 1e-12)
        )
        self.spacing = math.ceil(self.spacing * self.budget.backoff) if unchanged else self.base_spacing
        self.next_step = step + self.spacing
        if moved or loss is None or not math.isfinite(loss):
            self._last = None
        elif not (outcome == "deferred" and last is not None):
            self._last = (outcome, float(loss))

    def to_dict(self) -> dict[str, Any]:
        return {**self.spending.to_dict(), "spacing": self.spacing, "next_step": self.next_step}


@dataclass(frozen=True)
class EscapeJudgement:
    """Whether a line search's step counts as an escape.

    Attributes:
        accepted: it lowered the loss by at least ``required``.
        decrease: ``loss_before - loss_after``; required: the smallest decrease that counts.
    """

    accepted: bool
    decrease: float
    required: float


def judge_escape(loss_before: float, loss_after: float, min_decrease: float) -> EscapeJudgement:
    """An escape counts when it lowers the loss by at least ``min_decrease * |loss_before|``."""
    decrease = loss_before - loss_after
    required = min_decrease * max(abs(loss_before), 1e-12)
    return EscapeJudgement(accepted=bool(decrease > 0 and decrease >= required), decrease=decrease, required=required)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
