r"""The monitor's detection rules: stall, divergence and oscillation from a stream of losses.

:class:`StallDetector` smooths the loss with a bias-corrected exponential moving average (as Adam
does its moments),

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

After an event of one kind, that kind is not reported again for ``cooldown`` steps (default
``window``). The detector needs no model, so the rules can be driven (and tested) with a synthetic
loss sequence; :class:`~saddlescope.monitor.SaddleMonitor` feeds it a real run.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor

from saddlescope.errors import InvalidInputError

__all__ = [
    "DEFAULTS",
    "Detection",
    "DetectorConfig",
    "GradNorm",
    "StallDetector",
    "TrainingHistory",
    "divergence_details",
    "flatness_details",
    "oscillation_details",
]

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
        # Sign changes of consecutive raw differences over the window, kept as a running count so
        # the oscillation rule's first test costs O(1) a step (the full test runs only when it passes).
        self._flips: deque[bool] = deque(maxlen=self.config.window - 1)
        self._flip_count = 0
        self._last_diff: float | None = None
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
        if self._raw:
            diff = value - self._raw[-1]
            if self._last_diff is not None:
                if len(self._flips) == self._flips.maxlen:
                    self._flip_count -= self._flips[0]
                flip = diff * self._last_diff < 0
                self._flips.append(flip)
                self._flip_count += flip
            self._last_diff = diff
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
        # The same fraction oscillation_details computes first, from the running count.
        may_oscillate = self._flip_count / (cfg.window - 1) >= cfg.osc_fraction
        checks: tuple[tuple[str, Callable[[], dict[str, Any] | None]], ...] = (
            ("divergence", lambda: divergence_details(smoothed, cfg.rise_tol)),
            ("oscillation", lambda: oscillation_details(
                raw, smoothed, cfg.osc_fraction, cfg.osc_ratio, cfg.osc_min_amplitude) if may_oscillate else None),
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
    if not rise > rise_tol:
        return None  # the common case, decided without the O(window) count (the monitor runs every step)
    steps = len(smoothed) - 1
    rising = sum(b > a for a, b in zip(smoothed[:-1], smoothed[1:])) / steps
    # A single spike lifts the EMA once and then decays: requiring a rise on most steps skips it.
    if rising > 0.5:
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
    if flips < fraction:
        return None  # the common case, decided before the median (the monitor runs every step)
    amplitude = statistics.median(abs(d) for d in diffs)
    trend = abs(smoothed[-1] - smoothed[0]) / (len(smoothed) - 1)
    floor = min_amplitude * abs(smoothed[-1])
    if amplitude >= ratio * trend and amplitude > floor:
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


def _json_float(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _scale(value: float) -> float:
    # Relative changes of a loss near zero: fall back to an absolute change below tiny losses.
    return max(abs(value), 1e-12)
