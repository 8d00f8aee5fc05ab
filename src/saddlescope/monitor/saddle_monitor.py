"""The training monitor: :class:`SaddleMonitor` detects, decides and responds.

Detection is :mod:`saddlescope.monitor.rules`, the decision (budget, back-off, when an escape counts)
:mod:`saddlescope.monitor.policy`; this module wires them to a model: it builds the objective at the
model's current parameters, runs :func:`~saddlescope.critical.analyze`, takes
:func:`~saddlescope.escape.step.escape`'s line-search step in place, and times everything.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from saddlescope.critical import CriticalPoint, analyze
from saddlescope.curvature.two_pass import widened_norm
from saddlescope.display import saddle_monitor_html
from saddlescope.errors import InvalidInputError, NotADescentPointError, SaddlescopeError
from saddlescope.escape.step import escape
from saddlescope.monitor.events import MonitorEvent
from saddlescope.monitor.policy import (
    DEFAULT_ANALYZE_KWARGS,
    DEFAULT_ESCAPE_KWARGS,
    AnalysisBudget,
    AnalysisScheduler,
    Decision,
    Spending,
    judge_escape,
)
from saddlescope.monitor.rules import (
    DEFAULTS,
    Detection,
    DetectorConfig,
    StallDetector,
    TrainingHistory,
    _check_number,
)
from saddlescope.objective import Objective

__all__ = ["ACTIONS", "SaddleMonitor"]

# One logger for the whole monitor package, whatever module emits.
logger = logging.getLogger("saddlescope.monitor")

ACTIONS = ("none", "report", "escape")
BUDGET_DEFAULTS = AnalysisBudget()


class SaddleMonitor:
    """Watch a training loop; on a stall, ask whether it is a saddle and optionally escape it.

    Example::

        monitor = ss.SaddleMonitor(model, loss_fn, (x, y), action="escape")
        for batch in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(batch[0]), batch[1])
            loss.backward()
            optimizer.step()
            monitor.step(loss)

    The gradient norm of a step is read from the parameters' ``.grad`` (what ``backward`` left,
    the mini-batch gradient of the loss passed in); when no parameter has one, the full gradient on
    ``data`` at the current parameters is computed, but only when a rule needs it (the first step,
    for the scale, and steps where the loss is flat). An escape moves the parameters in place and
    leaves the optimizer's state (momentum) as it is.

    What a stall costs is bounded by the response policy (:mod:`saddlescope.monitor.policy`): an
    analysis budget (a count, and a fraction of the training time), exponential back-off while the
    verdict and the loss stay the same, and an escape that is a line search which must lower the
    loss by ``min_escape_decrease`` or says it could not. Every event says what was done and what it
    cost (seconds, Hessian-vector products, loss evaluations, loss before and after); ``spending``
    keeps the running totals. For trainers: :meth:`lightning_callback`, :meth:`transformers_callback`
    and, for a plain loop that logs to TensorBoard or any ``log(metrics, step)``, :meth:`watch`.

    Args:
        model: the model being trained.
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar``, as for :meth:`Objective.from_model`.
        data: the data a stall is analysed on: an ``(inputs, targets)`` pair or an iterable of
            batches (a one-shot iterator is read once into a list). Kept small: each analysis
            evaluates the loss on all of it many times.
        action: ``"none"`` (detect only), ``"report"`` (analyse stalls), ``"escape"`` (analyse
            and take a negative-curvature step when the verdict has a descent direction).
        window, beta, flat_tol, grad_tol, grad_rtol, rise_tol, osc_fraction, osc_ratio, osc_min_amplitude, cooldown:
            the detector's thresholds, see :class:`DetectorConfig`.
        max_analyses, time_fraction, backoff: the analysis budget, see
            :class:`~saddlescope.monitor.policy.AnalysisBudget` (default: no count limit, 5% of the
            training time, spacing doubled while nothing changes).
        min_escape_decrease: relative loss decrease an escape must reach to count (default
            ``flat_tol``).
        analyze_kwargs: passed to :func:`~saddlescope.critical.analyze` (e.g. ``exact``, ``k``,
            ``grad_tol``); the monitor's own defaults are ``index_probes=0`` and an
            ``exact_affordable_s`` from the time budget, unless given here.
        escape_kwargs: passed to :func:`~saddlescope.escape.step.escape` (e.g. ``initial_step``);
            the monitor's default is ``sufficient_decrease=1e-4``.
        objective_kwargs: passed to :meth:`Objective.from_model` (e.g. ``dtype``, ``train_mode``).
        callback: called with each :class:`MonitorEvent`.
        verbose: also print one line per event (events are always logged on the
            ``saddlescope.monitor`` logger).
        keep_history: record every step in :attr:`history`.

    Raises:
        InvalidInputError: a bad argument, or model, loss and data that do not fit together.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Tensor],
        data: Any,
        action: str = "report",
        *,
        window: int = DEFAULTS.window,
        beta: float = DEFAULTS.beta,
        flat_tol: float = DEFAULTS.flat_tol,
        grad_tol: float = DEFAULTS.grad_tol,
        grad_rtol: float = DEFAULTS.grad_rtol,
        rise_tol: float = DEFAULTS.rise_tol,
        osc_fraction: float = DEFAULTS.osc_fraction,
        osc_ratio: float = DEFAULTS.osc_ratio,
        osc_min_amplitude: float = DEFAULTS.osc_min_amplitude,
        cooldown: int | None = DEFAULTS.cooldown,
        max_analyses: int | None = BUDGET_DEFAULTS.max_analyses,
        time_fraction: float | None = BUDGET_DEFAULTS.time_fraction,
        backoff: float = BUDGET_DEFAULTS.backoff,
        min_escape_decrease: float | None = None,
        analyze_kwargs: Mapping[str, Any] | None = None,
        escape_kwargs: Mapping[str, Any] | None = None,
        objective_kwargs: Mapping[str, Any] | None = None,
        callback: Callable[[MonitorEvent], None] | None = None,
        verbose: bool = False,
        keep_history: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise InvalidInputError(f"model must be an nn.Module, got {type(model).__name__}")
        if action not in ACTIONS:
            raise InvalidInputError(f"action must be one of {ACTIONS}, got {action!r}")
        if callback is not None and not callable(callback):
            raise InvalidInputError(f"callback must be callable, got {type(callback).__name__}")
        config = DetectorConfig(
            window=window, beta=beta, flat_tol=flat_tol, grad_tol=grad_tol, grad_rtol=grad_rtol,
            rise_tol=rise_tol, osc_fraction=osc_fraction, osc_ratio=osc_ratio,
            osc_min_amplitude=osc_min_amplitude, cooldown=cooldown,
        )
        self.budget = AnalysisBudget(max_analyses=max_analyses, time_fraction=time_fraction, backoff=backoff)
        if min_escape_decrease is not None:
            _check_number("min_escape_decrease", min_escape_decrease, low=0.0)
        self.min_escape_decrease = config.flat_tol if min_escape_decrease is None else float(min_escape_decrease)
        self.model = model
        self.loss_fn = loss_fn
        # Every analysis rebuilds the objective from the data: a one-shot iterator would be spent.
        self.data = list(data) if _is_one_shot(data) else data
        self.action = action
        self.analyze_kwargs = _checked_kwargs("analyze_kwargs", analyze_kwargs, analyze, ("objective", "theta"))
        self.escape_kwargs = _checked_kwargs("escape_kwargs", escape_kwargs, escape, ("objective", "point"))
        self.objective_kwargs = _checked_kwargs(
            "objective_kwargs", objective_kwargs, Objective.from_model, ("model", "loss_fn", "data")
        )
        self.callback = callback
        self.verbose = bool(verbose)
        self.detector = StallDetector(config, keep_history=keep_history)
        self.scheduler = AnalysisScheduler(self.budget, config.cooldown_steps, config.flat_tol)
        self.events: list[MonitorEvent] = []
        self._left_at: float | None = None  # when the last call returned: training time starts there
        # Walking model.parameters() costs tens of microseconds a step on a small model: keep the list,
        # and walk again only when none of it has a gradient (parameters replaced by a wrapper).
        self._params = list(model.parameters())
        self.objective()  # fail now, with the model's own message, not after hours of training

    @property
    def history(self) -> TrainingHistory:
        """Per-step loss, smoothed loss and gradient norm."""
        return self.detector.history

    @property
    def config(self) -> DetectorConfig:
        return self.detector.config

    @property
    def spending(self) -> Spending:
        """Analyses, escapes, products and seconds spent so far, and the training time measured."""
        return self.scheduler.spending

    def objective(self) -> Objective:
        """The objective at the model's current parameters (``theta0``)."""
        return Objective.from_model(self.model, self.loss_fn, self.data, **self.objective_kwargs)

    def step(self, loss: Any) -> MonitorEvent | None:
        """Record the loss of one optimizer step; returns the event if one occurred.

        The wall time since the previous call counts as training time, the time inside this call
        as the monitor's (see :attr:`spending`).

        Args:
            loss: this step's training loss (a number or a one-element tensor).
        """
        entered = time.perf_counter()
        spent = self.spending
        if self._left_at is not None:
            spent.training_seconds += entered - self._left_at
        try:
            grad_norm = self._grad_norm()
            detection = self.detector.update(loss, self._data_grad_norm if grad_norm is None else grad_norm)
            event = None if detection is None else self._respond(detection)
            if event is not None:
                self.events.append(event)
                event.budget = self.scheduler.to_dict()
                self._report(event)
        finally:
            self._left_at = time.perf_counter()
            spent.monitor_seconds += self._left_at - entered
        return event

    def to_dict(self) -> dict[str, Any]:
        """Configuration, budget, spending, events and history as JSON-ready values."""
        return {
            "action": self.action,
            "config": self.config.to_dict(),
            "budget": self.budget.to_dict(),
            "min_escape_decrease": self.min_escape_decrease,
            "spending": self.spending.to_dict(),
            "steps": self.detector.step,
            "analyze_kwargs": _json_kwargs(self.analyze_kwargs),
            "escape_kwargs": _json_kwargs(self.escape_kwargs),
            "objective_kwargs": _json_kwargs(self.objective_kwargs),
            "events": [e.to_dict() for e in self.events],
            "history": self.history.to_dict(),
        }

    # -------------------------------------------------------------------- integrations
    def lightning_callback(self, prefix: str = "saddlescope/") -> Any:
        """A PyTorch Lightning ``Callback`` that calls :meth:`step` after every training batch and
        sends each event's :meth:`MonitorEvent.metrics` to the trainer's loggers.

        Imports ``lightning`` (or ``pytorch_lightning``) only now. Raises ImportError when
        neither is installed.
        """
        from saddlescope.monitor.integrations.lightning_callback import lightning_callback

        return lightning_callback(self, prefix=prefix)

    def transformers_callback(self, trainer: Any, prefix: str = "saddlescope/") -> Any:
        """A Hugging Face ``TrainerCallback``, added to ``trainer``: :meth:`step` after every optimizer
        step with the Trainer's own training loss, each event through ``trainer.log`` (its
        ``log_history`` and every ``report_to`` integration: TensorBoard, W&B, ...).

        Imports ``transformers`` only now; see
        :func:`saddlescope.monitor.integrations.transformers_callback.transformers_callback`.
        """
        from saddlescope.monitor.integrations.transformers_callback import transformers_callback

        return transformers_callback(self, trainer, prefix=prefix)

    def watch(self, *, writer: Any = None, log: Callable[..., Any] | None = None,
              prefix: str = "saddlescope/") -> Any:
        """The plain-loop helper: a :class:`~saddlescope.monitor.loop.LoopWatch` to call with each
        step's loss; events go to a TensorBoard ``SummaryWriter`` and/or ``log(metrics, step=...)``."""
        from saddlescope.monitor.loop import LoopWatch

        return LoopWatch(self, writer=writer, log=log, prefix=prefix)

    def _repr_html_(self) -> str:
        return saddle_monitor_html(self)

    # -------------------------------------------------------------------- internals
    def _grad_norm(self) -> float | None:
        """The norm of the parameters' ``.grad``; None when none has one."""
        norm = _param_grad_norm(self._params)
        if norm is None:
            params = list(self.model.parameters())
            if any(p is not q for p, q in zip(params, self._params)) or len(params) != len(self._params):
                self._params = params
                norm = _param_grad_norm(params)
        return norm

    def _data_grad_norm(self) -> float:
        objective = self.objective()
        _, grad = objective.loss_and_grad(objective.theta0)
        return widened_norm(grad, torch.float64)  # a float32 norm summed in float32 reads low at scale

    def _respond(self, detection: Detection) -> MonitorEvent | None:
        """The event for a detection, or None for a stall inside the back-off spacing."""
        event = MonitorEvent(
            step=detection.step,
            kind=detection.kind,
            loss=detection.loss,
            smoothed_loss=detection.smoothed_loss,
            grad_norm=detection.grad_norm,
            verdict=None,
            action="none",
            message=f"step {detection.step}: {detection.message}",
            details=detection.details,
        )
        if detection.kind != "stall" or self.action == "none":
            return event
        decision = self.scheduler.decide(detection.step)
        if decision.act == "quiet":
            self.spending.quiet += 1
            return None
        if decision.act == "defer":
            self.spending.deferred += 1
            event.action = "deferred"
            level = detection.smoothed_loss if detection.smoothed_loss is not None else detection.loss
            self.scheduler.record(detection.step, "deferred", level, moved=False)
            event.message += f"; analysis deferred: {decision.reason}{self._next_look()}"
            return event
        self._analyse(event, decision)
        return event

    def _analyse(self, event: MonitorEvent, decision: Decision) -> None:
        """Fill in the verdict and, with ``action="escape"``, move the parameters."""
        started = time.perf_counter()
        kwargs = {**DEFAULT_ANALYZE_KWARGS, **self.analyze_kwargs}
        if decision.affordable_s is not None and "exact" not in kwargs and "exact_affordable_s" not in kwargs:
            kwargs["exact_affordable_s"] = decision.affordable_s
        spent = self.spending
        spent.analyses += 1
        try:
            objective = self.objective()
            point = analyze(objective, **kwargs)
        except SaddlescopeError as exc:  # a failed analysis must not end the training run
            event.seconds = time.perf_counter() - started
            spent.analysis_seconds += event.seconds
            event.action = "failed"
            level = event.smoothed_loss if event.smoothed_loss is not None else event.loss
            self.scheduler.record(event.step, "failed", level, moved=False)
            event.message += f"; analysis failed: {exc}{self._next_look()}"
            return
        analysis_s = time.perf_counter() - started
        event.verdict = point.kind
        event.critical_point = point
        event.analysis = _analysis_summary(point, analysis_s)
        event.hvps = point.hvp_count
        event.message += (
            f"; verdict {point.kind} ({point.reason}), lambda_min {point.lambda_min:.3g} "
            f"[{point.method}, {analysis_s:.3g} s, {point.hvp_count} HVPs]"
        )
        event.action = "reported"
        moved = self.action == "escape" and self._escape(event, objective, point)
        event.seconds = time.perf_counter() - started
        spent.analysis_seconds += event.seconds
        spent.hvps += event.hvps
        self.scheduler.record(event.step, point.kind, point.loss, moved)
        event.message += self._next_look()

    def _escape(self, event: MonitorEvent, objective: Objective, point: CriticalPoint) -> bool:
        """The line search along the verdict's direction; True when the parameters moved."""
        started = time.perf_counter()
        try:
            step = escape(objective, point, **{**DEFAULT_ESCAPE_KWARGS, **self.escape_kwargs})
        except NotADescentPointError as exc:
            event.action = "no_escape"
            event.message += f"; no escape: {exc}"
            return False
        seconds = time.perf_counter() - started
        sharpening_hvps = int((step.sharpening or {}).get("hvps", 0))
        event.hvps += sharpening_hvps
        event.loss_evaluations = step.evaluations
        event.loss_before = step.loss_before
        judgement = judge_escape(step.loss_before, step.loss_after, self.min_escape_decrease)
        event.escape = {
            **step.to_dict(vectors=False),
            "accepted": judgement.accepted,
            "decrease": judgement.decrease,
            "required_decrease": judgement.required,
            "seconds": seconds,
            "hvps": sharpening_hvps,
        }
        cost = f"{step.evaluations} loss evaluations, {seconds:.3g} s"
        if not judgement.accepted:
            event.action = "no_escape"
            event.message += (
                f"; no escape: the line search along the negative-curvature direction lowered the loss only "
                f"{judgement.decrease:.3g} (step {step.step_size:.3g}; {cost}), less than the "
                f"{self.min_escape_decrease:.3g} relative ({judgement.required:.3g}) that counts; parameters "
                "left as they were"
            )
            return False
        _write_params(self.model, objective, step.theta)
        self.spending.escapes += 1
        event.action = "escaped"
        event.loss_after = step.loss_after
        event.step_size = step.step_size
        event.message += (
            f"; escaped: line search along the negative-curvature direction took step {step.step_size:.3g}, "
            f"loss {step.loss_before:.6g} -> {step.loss_after:.6g} ({cost})"
        )
        return True

    def _next_look(self) -> str:
        next_step = self.scheduler.next_step
        return "" if next_step is None else f"; next look at a stall from step {next_step}"

    def _report(self, event: MonitorEvent) -> None:
        level = logging.INFO if event.kind == "stall" else logging.WARNING
        logger.log(level, event.message)
        if self.verbose:
            print(event.message)
        if self.callback is not None:
            self.callback(event)


# ---------------------------------------------------------------------------------------- helpers
def _param_grad_norm(params: list[Tensor]) -> float | None:
    """The norm of the ``.grad`` of the trainable ``params``; None when none has one."""
    grads = [p.grad for p in params if p.requires_grad and p.grad is not None]
    if not grads:
        return None
    # One fused kernel for all the norms (what clip_grad_norm_ uses) and one sync: this runs every step. Each
    # gradient in chunks, their norms combined in float64 (see _NORM_CHUNK); a sparse gradient (an
    # Embedding(sparse=True)'s) by its stored values.
    flat = [g.coalesce().values().reshape(-1) if g.is_sparse else g.reshape(-1) for g in grads]
    chunks = [chunk for g in flat for chunk in torch.split(g, _NORM_CHUNK)]
    norms = _foreach_norm(chunks) if _foreach_norm is not None else [torch.linalg.vector_norm(c) for c in chunks]
    return float(torch.linalg.vector_norm(torch.stack(norms).to(torch.float64)))  # stack promotes mixed dtypes


_foreach_norm = getattr(torch, "_foreach_norm", None)

# torch sums a float32 norm in float32: one kernel over GPT-2's 38.6M-entry embedding gradient read 0.23% low,
# over 4M entries 8e-5. In chunks of this many entries, the chunks' norms combined in float64: 1.7e-7 low, for
# 1.2x the fused kernel's time (17.1 against 14.3 ms at 38.6M entries, one CPU thread, medians of 7 rounds on a
# quiet machine); widening every entry to float64 took 9.6x (137 ms).
_NORM_CHUNK = 1 << 16


def _write_params(model: nn.Module, objective: Objective, theta: Tensor) -> None:
    """Copy the flat ``theta`` into the model's parameters, in the objective's order."""
    assert objective.param_names is not None and objective.param_shapes is not None
    named = dict(model.named_parameters())
    sizes = [int(torch.Size(s).numel()) for s in objective.param_shapes]
    with torch.no_grad():
        for name, chunk, shape in zip(objective.param_names, torch.split(theta, sizes), objective.param_shapes):
            named[name].copy_(chunk.view(shape))


def _analysis_summary(point: CriticalPoint, seconds: float) -> dict[str, Any]:
    return {
        "kind": point.kind,
        "reason": point.reason,
        "loss": point.loss,
        "grad_norm": point.grad_norm,
        "lambda_min": point.lambda_min,
        "lambda_max": point.lambda_max,
        "n_negative": point.n_negative,
        "n_params": point.n_params,
        "method": point.method,
        "has_escape_direction": point.escape_direction is not None,
        "hvps": point.hvp_count,
        "seconds": seconds,
    }


def _checked_kwargs(
    name: str, kwargs: Mapping[str, Any] | None, func: Callable[..., Any], taken: tuple[str, ...]
) -> dict[str, Any]:
    """``kwargs`` as a dict, refusing names ``func`` does not take (fail now, not at the first stall)."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise InvalidInputError(f"{name} must be a mapping, got {type(kwargs).__name__}")
    accepted = set(inspect.signature(func).parameters) - set(taken)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise InvalidInputError(f"{name} has unknown names {unknown}; {func.__name__} takes {sorted(accepted)}")
    return dict(kwargs)


def _json_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    def value(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)

    return {k: value(v) for k, v in kwargs.items()}


def _is_one_shot(data: Any) -> bool:
    try:
        return iter(data) is data
    except TypeError:
        return False  # not iterable: from_model gives the message
