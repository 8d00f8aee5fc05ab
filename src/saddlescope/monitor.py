r"""Watch a training run for stalls, divergence and oscillation; analyse (and escape) stalls.

Call :meth:`SaddleMonitor.step` with the loss after each optimizer step of any training loop. The
monitor smooths the loss with a bias-corrected exponential moving average (as Adam does its
moments),

.. math::

    m_t = \beta\, m_{t-1} + (1-\beta)\, \ell_t, \qquad m_0 = 0, \qquad
    s_t = \frac{m_t}{1-\beta^t},

and, once ``window`` = :math:`W` steps have passed, checks three rules in this order (the first that
holds names the step; see :class:`DetectorConfig` for the defaults):

- **divergence**: the loss is NaN or infinite, or the smoothed loss rose by more than ``rise_tol``
  (relative) over the window, :math:`s_t - s_{t-W} > \mathrm{rise\_tol}\cdot|s_{t-W}|`, and rose on
  more than half of the window's steps (a trend, not one spike): the learning rate is too large.
- **oscillation**: the raw loss zigzags: consecutive differences :math:`d_i = \ell_i - \ell_{i-1}`
  change sign on at least ``osc_fraction`` of the window (independent noise does so on about 2/3),
  their median size is at least ``osc_ratio`` times the smoothed trend
  :math:`|s_t - s_{t-W}|/W` and at least ``osc_min_amplitude``:math:`\cdot|s_t|`: the step overshoots
  a narrow valley.
- **stall**: the smoothed loss is flat, :math:`|s_{t-W} - s_t| \le \mathrm{flat\_tol}\cdot|s_{t-W}|`,
  and the gradient is small next to the largest one seen in the run,
  :math:`\|g_t\| \le \mathrm{grad\_tol} + \mathrm{grad\_rtol}\cdot\max_{\tau \le t}\|g_\tau\|`
  (the form of the package's zero threshold for eigenvalues). A flat loss with a large gradient is
  SGD noise balancing progress, not a point to analyse.

On a stall the monitor builds :meth:`Objective.from_model` at the model's current parameters, runs
:func:`~saddlescope.critical.analyze` (exact or Lanczos by size) and, with ``action="escape"``,
takes :func:`~saddlescope.escape.step.escape`'s negative-curvature step in place. After an event of
one kind, that kind is not reported again for ``cooldown`` steps (default ``window``), so a persistent
plateau is analysed at most once per window.

:class:`StallDetector` holds the rules without any model, so they can be driven (and tested) with a
synthetic loss sequence.
"""

from __future__ import annotations

import inspect
import logging
import math
import statistics
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from saddlescope.critical import CriticalPoint, analyze
from saddlescope.errors import InvalidInputError, NotADescentPointError, SaddlescopeError
from saddlescope.escape.step import escape
from saddlescope.objective import Objective

__all__ = ["DetectorConfig", "Detection", "MonitorEvent", "SaddleMonitor", "StallDetector", "TrainingHistory"]

logger = logging.getLogger(__name__)

ACTIONS = ("none", "report", "escape")

GradNorm = float | Callable[[], float] | None


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidInputError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_number(name: str, value: Any, low: float, high: float = math.inf, high_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low <= value and (value < high if high_open else value <= high):
        return
    bounds = f">= {low}" if high == math.inf else f"in [{low}, {high}{')' if high_open else ']'}"
    raise InvalidInputError(f"{name} must be a finite number {bounds}, got {value!r}")


# ---------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class DetectorConfig:
    """Thresholds of the three rules (see the module docstring for the formulas).

    Attributes:
        window: steps ``W`` each rule looks back over; no rule but the non-finite check fires
            before ``W + 1`` finite losses have been seen.
        beta: EMA factor. 0.98 (fastai's smoothed loss uses the same) averages about 50 steps:
            the smoothed loss's noise is ``sqrt((1 - beta) / (1 + beta))`` = 10% of the raw
            loss's, so a 0.1% change over a window stands out from per-step noise of a few
            percent. The price is memory: after a descent of slope ``r`` per step the EMA lags by
            ``r beta / (1 - beta)`` and forgets it at rate ``beta`` a step, so a plateau reached
            by a steep descent is flagged a few windows in. A smaller beta reacts sooner and
            mistakes noise for flatness more often.
        flat_tol: relative change of the smoothed loss over the window below which it is flat.
        grad_tol, grad_rtol: a gradient norm is small when it is at most
            ``grad_tol + grad_rtol * (largest gradient norm recorded)``.
        rise_tol: relative rise of the smoothed loss over the window that means divergence.
        osc_fraction: fraction of sign changes of consecutive loss differences that means
            oscillation (0.9: independent noise reaches it in about 1e-5 windows of 50).
        osc_ratio: the median loss difference must exceed this multiple of the trend per step.
        osc_min_amplitude: ...and this fraction of the smoothed loss (ignores rounding flicker).
        cooldown: steps after an event before the same kind is reported again; None: ``window``.
    """

    window: int = 50
    beta: float = 0.98
    flat_tol: float = 1e-3
    grad_tol: float = 0.0
    grad_rtol: float = 0.1
    rise_tol: float = 0.1
    osc_fraction: float = 0.9
    osc_ratio: float = 4.0
    osc_min_amplitude: float = 1e-3
    cooldown: int | None = None

    def __post_init__(self) -> None:
        _check_int("window", self.window, minimum=3)
        if self.cooldown is not None:
            _check_int("cooldown", self.cooldown, minimum=0)
        _check_number("beta", self.beta, low=0.0, high=1.0, high_open=True)
        _check_number("osc_fraction", self.osc_fraction, low=0.5, high=1.0)
        for name in ("flat_tol", "grad_tol", "grad_rtol", "rise_tol", "osc_ratio", "osc_min_amplitude"):
            _check_number(name, getattr(self, name), low=0.0)

    @property
    def cooldown_steps(self) -> int:
        return self.window if self.cooldown is None else self.cooldown

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cooldown": self.cooldown_steps}


DEFAULTS = DetectorConfig()


# ---------------------------------------------------------------------------------------- results
@dataclass
class TrainingHistory:
    """Per-step record, one entry per :meth:`StallDetector.update` call (columns, for plotting).

    ``grad_norm`` is None on steps where no gradient norm was given or needed.
    """

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    smoothed_loss: list[float | None] = field(default_factory=list)
    grad_norm: list[float | None] = field(default_factory=list)

    def append(self, step: int, loss: float, smoothed: float | None, grad_norm: float | None) -> None:
        self.step.append(step)
        self.loss.append(loss)
        self.smoothed_loss.append(smoothed)
        self.grad_norm.append(grad_norm)

    def __len__(self) -> int:
        return len(self.step)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready columns; a non-finite value becomes None."""
        return {
            "step": list(self.step),
            "loss": [_json_float(x) for x in self.loss],
            "smoothed_loss": [_json_float(x) for x in self.smoothed_loss],
            "grad_norm": [_json_float(x) for x in self.grad_norm],
        }


@dataclass
class Detection:
    """What :class:`StallDetector` saw at one step.

    Attributes:
        kind: ``"stall"``, ``"divergence"`` or ``"oscillation"``.
        step: 1-based count of updates.
        loss, smoothed_loss, grad_norm: at that step (``grad_norm`` None when unknown).
        message: one sentence: what was seen and what to do.
        details: the numbers the rule compared (relative change, thresholds, fractions).
    """

    kind: str
    step: int
    loss: float
    smoothed_loss: float | None
    grad_norm: float | None
    message: str
    details: dict[str, Any]


@dataclass
class MonitorEvent:
    """One event of :class:`SaddleMonitor`.

    Attributes:
        step, kind, loss, smoothed_loss, grad_norm, details: from the :class:`Detection`.
        verdict: the analysis's ``CriticalPoint.kind`` on a stall, else None.
        action: ``"none"`` (detected and reported only: divergence, oscillation, or
            ``action="none"``), ``"reported"`` (stall analysed), ``"escaped"`` (parameters moved),
            ``"no_escape"`` (escape asked for but the verdict has no descent direction, or the line
            search found no decrease) or ``"failed"`` (the analysis raised; see ``message``).
        loss_after: the full-data loss after an escape (``analysis["loss"]`` is the one before).
        message: one line for logs.
        analysis: a few numbers of the verdict (kind, reason, loss, grad_norm, lambda_min, ...).
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
            "loss_after": _json_float(self.loss_after),
            "message": self.message,
            "details": {k: _json_float(v) if isinstance(v, float) else v for k, v in self.details.items()},
            "analysis": self.analysis,
        }


# ---------------------------------------------------------------------------------------- detector
class StallDetector:
    """The monitor's rules over a stream of losses; needs no model.

    Example::

        detector = StallDetector(DetectorConfig(window=20))
        for loss, grad_norm in run:
            detection = detector.update(loss, grad_norm)

    Args:
        config: thresholds; default :class:`DetectorConfig()`.
        keep_history: record every step in :attr:`history` (four numbers a step); the rules
            themselves keep only the last ``window + 1`` values.
    """

    def __init__(self, config: DetectorConfig | None = None, *, keep_history: bool = True) -> None:
        if config is not None and not isinstance(config, DetectorConfig):
            raise InvalidInputError(f"config must be a DetectorConfig, got {type(config).__name__}")
        self.config = config or DetectorConfig()
        self.keep_history = keep_history
        self.history = TrainingHistory()
        self.step = 0
        self.smoothed_loss: float | None = None
        self.grad_scale: float | None = None  # the largest gradient norm recorded
        self._ema = 0.0
        self._n_finite = 0
        self._smoothed: deque[float] = deque(maxlen=self.config.window + 1)
        self._raw: deque[float] = deque(maxlen=self.config.window + 1)
        self._last_event: dict[str, int] = {}

    def update(self, loss: Any, grad_norm: GradNorm = None) -> Detection | None:
        """Record one step's loss and return a :class:`Detection` if a rule fires.

        Args:
            loss: the training loss of this step (a number or a one-element tensor).
            grad_norm: the gradient norm at this step, or a zero-argument function computing it,
                called only when needed (at the first step, to set the scale, and when the loss is
                flat), or None: then a stall is decided on flatness alone.
        """
        value = _scalar("loss", loss)
        self.step += 1
        if math.isfinite(value):
            self._add_finite(value)
        lazy = grad_norm if callable(grad_norm) else None
        known = None if lazy is not None else _grad_value(grad_norm)
        if lazy is not None and self.grad_scale is None:
            known = _grad_value(lazy())  # the first step sets the scale "small" is measured against
        self._record_grad(known)

        kind, details = self._classify(value)
        if kind == "flat" and self._cooling_down("stall"):
            kind = None  # and spare the lazy gradient: it could not make an event now
        elif kind == "flat":
            if known is None and lazy is not None:
                known = _grad_value(lazy())
                self._record_grad(known)
            kind, details = self._stall(details, known)
        if self.keep_history:
            self.history.append(self.step, value, self.smoothed_loss, known)
        if kind is None or self._cooling_down(kind):
            return None
        self._last_event[kind] = self.step
        return Detection(
            kind=kind,
            step=self.step,
            loss=value,
            smoothed_loss=self.smoothed_loss,
            grad_norm=known,
            message=_message(kind, value, self.config.window, details),
            details=details,
        )

    # -------------------------------------------------------------------- state
    def _add_finite(self, value: float) -> None:
        # A non-finite loss is kept out of the EMA, which would otherwise stay NaN for good.
        beta = self.config.beta
        self._n_finite += 1
        self._ema = beta * self._ema + (1.0 - beta) * value
        self.smoothed_loss = self._ema / (1.0 - beta**self._n_finite)
        self._smoothed.append(self.smoothed_loss)
        self._raw.append(value)

    def _record_grad(self, grad_value: float | None) -> None:
        if grad_value is not None:
            self.grad_scale = max(self.grad_scale or 0.0, grad_value)

    def _cooling_down(self, kind: str) -> bool:
        last = self._last_event.get(kind)
        return last is not None and self.step - last < self.config.cooldown_steps

    # -------------------------------------------------------------------- rules
    def _classify(self, value: float) -> tuple[str | None, dict[str, Any]]:
        """The first rule that holds: divergence, oscillation, or "flat" (a stall candidate)."""
        if not math.isfinite(value):
            return "divergence", {"non_finite": True}
        cfg = self.config
        if len(self._smoothed) < cfg.window + 1:
            return None, {}  # warm-up: every rule compares against the loss a window ago
        smoothed, raw = list(self._smoothed), list(self._raw)
        checks: tuple[tuple[str, Callable[[], dict[str, Any] | None]], ...] = (
            ("divergence", lambda: divergence_details(smoothed, cfg.rise_tol)),
            ("oscillation", lambda: oscillation_details(
                raw, smoothed, cfg.osc_fraction, cfg.osc_ratio, cfg.osc_min_amplitude)),
            ("flat", lambda: flatness_details(smoothed, cfg.flat_tol)),
        )
        for kind, check in checks:
            details = check()
            if details is not None:
                return kind, details
        return None, {}

    def _stall(self, flat: dict[str, Any], grad_value: float | None) -> tuple[str | None, dict[str, Any]]:
        """A flat window is a stall when the gradient is small (or unknown)."""
        if grad_value is None:
            return "stall", {**flat, "grad_checked": False}
        threshold = self.config.grad_tol + self.config.grad_rtol * (self.grad_scale or 0.0)
        if grad_value > threshold:
            return None, {}
        return "stall", {**flat, "grad_checked": True, "grad_norm": grad_value, "grad_threshold": threshold}


def flatness_details(smoothed: Sequence[float], flat_tol: float) -> dict[str, Any] | None:
    """The stall's flatness test on the window's smoothed losses (oldest first); None if not flat."""
    first, last = smoothed[0], smoothed[-1]
    change = (last - first) / _scale(first)
    if abs(change) > flat_tol:
        return None
    return {"relative_change": change, "flat_tol": flat_tol}


def divergence_details(smoothed: Sequence[float], rise_tol: float) -> dict[str, Any] | None:
    """The divergence test on the window's smoothed losses (oldest first); None if it fails."""
    first, last = smoothed[0], smoothed[-1]
    rise = (last - first) / _scale(first)
    steps = len(smoothed) - 1
    rising = sum(b > a for a, b in zip(smoothed[:-1], smoothed[1:])) / steps
    # A single spike lifts the EMA once and then decays: requiring a rise on most steps skips it.
    if rise > rise_tol and rising > 0.5:
        return {"relative_rise": rise, "rise_tol": rise_tol, "rising_fraction": rising, "non_finite": False}
    return None


def oscillation_details(
    raw: Sequence[float],
    smoothed: Sequence[float],
    fraction: float,
    ratio: float,
    min_amplitude: float,
) -> dict[str, Any] | None:
    """The oscillation test on the window's raw and smoothed losses (oldest first); None if it fails."""
    diffs = [b - a for a, b in zip(raw[:-1], raw[1:])]
    flips = sum(a * b < 0 for a, b in zip(diffs[:-1], diffs[1:])) / (len(diffs) - 1)
    amplitude = statistics.median(abs(d) for d in diffs)
    trend = abs(smoothed[-1] - smoothed[0]) / (len(smoothed) - 1)
    floor = min_amplitude * abs(smoothed[-1])
    if flips >= fraction and amplitude >= ratio * trend and amplitude > floor:
        return {"sign_change_fraction": flips, "amplitude": amplitude, "trend_per_step": trend}
    return None


def _message(kind: str, loss: float, window: int, details: Mapping[str, Any]) -> str:
    """One sentence: what the rule saw and what to do about it."""
    if kind == "divergence" and details.get("non_finite"):
        return (
            f"loss is {loss}: training diverged; the learning rate is probably too large (or the loss "
            "is numerically unstable): lower it, clip gradients, or restart from a checkpoint"
        )
    if kind == "divergence":
        return (
            f"divergence: smoothed loss rose {details['relative_rise']:.1%} over {window} steps; the "
            "learning rate is too large: lower it (2-10x) or clip gradients"
        )
    if kind == "oscillation":
        return (
            f"oscillation: loss alternates up/down on {details['sign_change_fraction']:.0%} of the last "
            f"{window} steps (swing {details['amplitude']:.3g}, trend {details['trend_per_step']:.3g}/step): "
            "the step overshoots a narrow valley; lower the learning rate"
        )
    grad = "gradient not checked"
    if details["grad_checked"]:
        grad = f"|grad| {details['grad_norm']:.3g} <= {details['grad_threshold']:.3g}"
    return (
        f"stall: smoothed loss changed {details['relative_change']:.2e} (relative) over {window} steps "
        f"with {grad}"
    )


# ---------------------------------------------------------------------------------------- monitor
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

    Args:
        model: the model being trained.
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar``, as for :meth:`Objective.from_model`.
        data: the data a stall is analysed on: an ``(inputs, targets)`` pair or an iterable of
            batches (a one-shot iterator is read once into a list). Kept small: each analysis
            evaluates the loss on all of it many times.
        action: ``"none"`` (detect only), ``"report"`` (analyse stalls), ``"escape"`` (analyse
            and take a negative-curvature step when the verdict has a descent direction).
        window, beta, flat_tol, grad_tol, grad_rtol, rise_tol, osc_fraction, osc_ratio,
            osc_min_amplitude, cooldown: the detector's thresholds, see :class:`DetectorConfig`.
        analyze_kwargs: passed to :func:`~saddlescope.critical.analyze` (e.g. ``exact``, ``k``,
            ``grad_tol``).
        escape_kwargs: passed to :func:`~saddlescope.escape.step.escape` (e.g. ``initial_step``).
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
        self.events: list[MonitorEvent] = []
        self.objective()  # fail now, with the model's own message, not after hours of training

    @property
    def history(self) -> TrainingHistory:
        """Per-step loss, smoothed loss and gradient norm."""
        return self.detector.history

    @property
    def config(self) -> DetectorConfig:
        return self.detector.config

    def objective(self) -> Objective:
        """The objective at the model's current parameters (``theta0``)."""
        return Objective.from_model(self.model, self.loss_fn, self.data, **self.objective_kwargs)

    def step(self, loss: Any) -> MonitorEvent | None:
        """Record the loss of one optimizer step; returns the event if one occurred.

        Args:
            loss: this step's training loss (a number or a one-element tensor).
        """
        grad_norm = _param_grad_norm(self.model)
        detection = self.detector.update(loss, self._data_grad_norm if grad_norm is None else grad_norm)
        if detection is None:
            return None
        event = self._respond(detection)
        self.events.append(event)
        self._report(event)
        return event

    def to_dict(self) -> dict[str, Any]:
        """Configuration, events and history as JSON-ready values."""
        return {
            "action": self.action,
            "config": self.config.to_dict(),
            "steps": self.detector.step,
            "analyze_kwargs": _json_kwargs(self.analyze_kwargs),
            "escape_kwargs": _json_kwargs(self.escape_kwargs),
            "objective_kwargs": _json_kwargs(self.objective_kwargs),
            "events": [e.to_dict() for e in self.events],
            "history": self.history.to_dict(),
        }

    def lightning_callback(self) -> Any:
        """A PyTorch Lightning ``Callback`` that calls :meth:`step` after every training batch.

        Imports ``lightning`` (or ``pytorch_lightning``) only now. Raises ImportError when
        neither is installed.
        """
        return _lightning_callback_class()(self)

    # -------------------------------------------------------------------- internals
    def _data_grad_norm(self) -> float:
        objective = self.objective()
        _, grad = objective.loss_and_grad(objective.theta0)
        return float(grad.norm())

    def _respond(self, detection: Detection) -> MonitorEvent:
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
        if detection.kind == "stall" and self.action != "none":
            self._analyse(event)
        return event

    def _analyse(self, event: MonitorEvent) -> None:
        """Fill in the verdict and, with ``action="escape"``, move the parameters."""
        try:
            objective = self.objective()
            point = analyze(objective, **self.analyze_kwargs)
        except SaddlescopeError as exc:  # a failed analysis must not end the training run
            event.action = "failed"
            event.message += f"; analysis failed: {exc}"
            return
        event.verdict = point.kind
        event.critical_point = point
        event.analysis = _analysis_summary(point)
        event.message += f"; verdict {point.kind} ({point.reason}), lambda_min {point.lambda_min:.3g}"
        event.action = "reported"
        if self.action != "escape":
            return
        try:
            step = escape(objective, point, **self.escape_kwargs)
        except NotADescentPointError as exc:
            event.action = "no_escape"
            event.message += f"; no escape: {exc}"
            return
        _write_params(self.model, objective, step.theta)
        event.action = "escaped"
        event.loss_after = step.loss_after
        event.message += (
            f"; escaped along negative curvature: loss {step.loss_before:.6g} -> {step.loss_after:.6g} "
            f"(step {step.step_size:.3g})"
        )

    def _report(self, event: MonitorEvent) -> None:
        level = logging.INFO if event.kind == "stall" else logging.WARNING
        logger.log(level, event.message)
        if self.verbose:
            print(event.message)
        if self.callback is not None:
            self.callback(event)


# ---------------------------------------------------------------------------------------- lightning
def _lightning_callback_class() -> type:
    """Build the Lightning callback class on a ``Callback`` base imported now (not at module import)."""
    try:
        from lightning.pytorch import Callback
    except ImportError:
        try:
            from pytorch_lightning import Callback
        except ImportError as exc:
            raise ImportError(
                "SaddleMonitor.lightning_callback() needs PyTorch Lightning: pip install lightning "
                "(or call monitor.step(loss) yourself after each optimizer step)"
            ) from exc

    class LightningSaddleCallback(Callback):
        """Feeds each training batch's loss to a :class:`SaddleMonitor`."""

        def __init__(self, monitor: SaddleMonitor) -> None:
            super().__init__()
            self.monitor = monitor

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            # training_step may return the loss, a dict with "loss", or None (skip the batch).
            loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
            if loss is not None:
                self.monitor.step(loss)

    return LightningSaddleCallback


# ---------------------------------------------------------------------------------------- helpers
def _scalar(name: str, value: Any) -> float:
    """A Python float from a number or a one-element tensor."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise InvalidInputError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value.detach().reshape(()).item())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInputError(f"{name} must be a number or a one-element tensor, got {type(value).__name__}")
    return float(value)


def _grad_value(grad_norm: Any) -> float | None:
    """A gradient norm, None when unknown (a NaN gradient says nothing about smallness)."""
    if grad_norm is None:
        return None
    value = _scalar("grad_norm", grad_norm)
    if math.isnan(value):
        return None
    if value < 0:
        raise InvalidInputError(f"grad_norm must be >= 0, got {value}")
    return value


def _param_grad_norm(model: nn.Module) -> float | None:
    """The norm of the ``.grad`` of the trainable parameters; None when none has one."""
    grads = [p.grad.detach() for p in model.parameters() if p.requires_grad and p.grad is not None]
    if not grads:
        return None
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def _write_params(model: nn.Module, objective: Objective, theta: Tensor) -> None:
    """Copy the flat ``theta`` into the model's parameters, in the objective's order."""
    assert objective.param_names is not None and objective.param_shapes is not None
    named = dict(model.named_parameters())
    sizes = [int(torch.Size(s).numel()) for s in objective.param_shapes]
    with torch.no_grad():
        for name, chunk, shape in zip(objective.param_names, torch.split(theta, sizes), objective.param_shapes):
            named[name].copy_(chunk.view(shape))


def _analysis_summary(point: CriticalPoint) -> dict[str, Any]:
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
    return {k: v if isinstance(v, (int, float, str, bool, type(None))) else repr(v) for k, v in kwargs.items()}


def _is_one_shot(data: Any) -> bool:
    try:
        return iter(data) is data
    except TypeError:
        return False  # not iterable: from_model gives the message


def _json_float(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _scale(value: float) -> float:
    # Relative changes of a loss near zero: fall back to an absolute change below tiny losses.
    return max(abs(value), 1e-12)
