"""What the monitor saw, what it did about it and what that cost: :class:`MonitorEvent`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from saddlescope.display import monitor_event_html
from saddlescope.monitor.rules import _json_float

if TYPE_CHECKING:
    from saddlescope.critical import CriticalPoint

__all__ = ["ACTIONS_TAKEN", "MonitorEvent"]

# MonitorEvent.action values.
ACTIONS_TAKEN = ("none", "reported", "escaped", "no_escape", "failed", "deferred")


@dataclass
class MonitorEvent:
    """One event of :class:`~saddlescope.monitor.SaddleMonitor`.

    Attributes:
        step, kind, loss, smoothed_loss, grad_norm, details: from the
            :class:`~saddlescope.monitor.rules.Detection` (``step`` counts the monitor's calls).
        verdict: the analysis's ``CriticalPoint.kind`` on a stall, else None.
        action: ``"none"`` (detected and reported only: divergence, oscillation, or
            ``action="none"``), ``"reported"`` (stall analysed), ``"escaped"`` (parameters moved),
            ``"no_escape"`` (escape asked for but the verdict has no descent direction, or the line
            search found no decrease large enough to count: see ``escape``), ``"failed"`` (the
            analysis raised; see ``message``) or ``"deferred"`` (the analysis budget is spent).
        message: one line for logs: what was seen, what was done, what it cost.
        loss_before, loss_after: the full-data loss where the escape's line search started and
            where it ended, when an escape was tried and found a decrease (``loss_after`` only when
            the parameters moved).
        step_size: the length of the escape step (the direction has unit norm), when one was taken.
        analysis: a few numbers of the verdict (kind, reason, loss, grad_norm, lambda_min, ...).
        escape: the line search's record (step size, losses, evaluations, curvature, sharpening,
            the decrease required and whether it was accepted); None when no escape was tried.
        seconds: time spent responding to this event (analysis and escape).
        hvps: Hessian-vector products spent on it (analysis and sharpening of the direction).
        loss_evaluations: loss evaluations of the escape's line search.
        budget: what the monitor had spent after this event (:class:`~saddlescope.monitor.policy.Spending`
            and the back-off spacing, ``next_step`` being the first step a stall is looked at again).
        critical_point: the full verdict (not in :meth:`to_dict`; use its own ``to_dict``).
    """

    step: int
    kind: str
    loss: float
    smoothed_loss: float | None
    grad_norm: float | None
    verdict: str | None
    action: str
    message: str
    loss_after: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    analysis: dict[str, Any] | None = None
    loss_before: float | None = None
    step_size: float | None = None
    escape: dict[str, Any] | None = None
    seconds: float = 0.0
    hvps: int = 0
    loss_evaluations: int = 0
    budget: dict[str, Any] = field(default_factory=dict)
    critical_point: CriticalPoint | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values; a non-finite number becomes None."""
        return {
            "step": self.step,
            "kind": self.kind,
            "loss": _json_float(self.loss),
            "smoothed_loss": _json_float(self.smoothed_loss),
            "grad_norm": _json_float(self.grad_norm),
            "verdict": self.verdict,
            "action": self.action,
            "loss_before": _json_float(self.loss_before),
            "loss_after": _json_float(self.loss_after),
            "step_size": _json_float(self.step_size),
            "message": self.message,
            "details": {k: _json_float(v) if isinstance(v, float) else v for k, v in self.details.items()},
            "analysis": self.analysis,
            "escape": self.escape,
            "seconds": self.seconds,
            "hvps": self.hvps,
            "loss_evaluations": self.loss_evaluations,
            "budget": dict(self.budget),
        }

    def metrics(self, prefix: str = "saddlescope/") -> dict[str, float]:
        """Flat numeric values for a trainer's logger (TensorBoard scalars, ``Trainer.log``, W&B).

        Keys (after ``prefix``): ``<kind>`` (1 for the event's kind: ``stall``, ``divergence``,
        ``oscillation``), ``loss``, ``smoothed_loss``, ``grad_norm``; after an analysis
        ``verdict/<kind>`` (1), ``lambda_min``, ``lambda_max``; after an escape attempt ``escaped``
        (1 or 0), ``loss_before``, ``loss_after``, ``step_size``; ``analysed`` (1 or 0),
        ``seconds``, ``hvps``, ``loss_evaluations`` and ``overhead`` (the monitor's time over the
        training time so far). Non-finite and unknown values are left out.
        """
        values: dict[str, Any] = {
            self.kind: 1.0,
            "loss": self.loss,
            "smoothed_loss": self.smoothed_loss,
            "grad_norm": self.grad_norm,
        }
        if self.kind == "stall":
            values["analysed"] = 1.0 if self.verdict is not None else 0.0
        if self.verdict is not None:
            values[f"verdict/{self.verdict}"] = 1.0
            if self.analysis is not None:
                values["lambda_min"] = self.analysis.get("lambda_min")
                values["lambda_max"] = self.analysis.get("lambda_max")
        if self.escape is not None or self.action in ("escaped", "no_escape"):
            values["escaped"] = 1.0 if self.action == "escaped" else 0.0
            values["loss_before"] = self.loss_before
            values["loss_after"] = self.loss_after
            values["step_size"] = self.step_size
        if self.kind == "stall":
            values["seconds"] = self.seconds
            values["hvps"] = self.hvps
            values["loss_evaluations"] = self.loss_evaluations
        values["overhead"] = self.budget.get("overhead")
        return {
            prefix + key: float(value)
            for key, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        }

    def _repr_html_(self) -> str:
        return monitor_event_html(self)
