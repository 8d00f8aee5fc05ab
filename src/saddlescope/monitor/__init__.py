"""Watch a training run for stalls, divergence and oscillation; analyse (and escape) stalls.

Call :meth:`SaddleMonitor.step` with the loss after each optimizer step of any training loop, or
plug the monitor into a trainer. The package splits the job by concern:

- :mod:`~saddlescope.monitor.rules`: what counts as a stall, divergence or oscillation
  (:class:`StallDetector`, needs no model);
- :mod:`~saddlescope.monitor.policy`: what a stall is worth: the analysis budget, back-off while
  nothing changes, and when an escape counts (:class:`AnalysisBudget`);
- :mod:`~saddlescope.monitor.saddle_monitor`: :class:`SaddleMonitor`, which wires both to a model,
  :func:`~saddlescope.critical.analyze` and :func:`~saddlescope.escape.step.escape`;
- :mod:`~saddlescope.monitor.events`: :class:`MonitorEvent`, what was seen, done and spent;
- :mod:`~saddlescope.monitor.loop` (plain loops) and :mod:`~saddlescope.monitor.integrations`
  (Lightning, Hugging Face ``Trainer``): events to the trainer's own loggers. Trainer packages are
  imported only when an integration is used.
"""

from saddlescope.monitor.events import MonitorEvent
from saddlescope.monitor.loop import LoopWatch, log_event
from saddlescope.monitor.policy import AnalysisBudget, Spending
from saddlescope.monitor.rules import (
    DEFAULTS,
    Detection,
    DetectorConfig,
    StallDetector,
    TrainingHistory,
    divergence_details,
    flatness_details,
    oscillation_details,
)
from saddlescope.monitor.saddle_monitor import ACTIONS, SaddleMonitor

__all__ = [
    "ACTIONS",
    "DEFAULTS",
    "AnalysisBudget",
    "Detection",
    "DetectorConfig",
    "LoopWatch",
    "MonitorEvent",
    "SaddleMonitor",
    "Spending",
    "StallDetector",
    "TrainingHistory",
    "divergence_details",
    "flatness_details",
    "log_event",
    "oscillation_details",
]
