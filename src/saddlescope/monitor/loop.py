"""The plain-loop helper: feed a :class:`~saddlescope.monitor.SaddleMonitor` and log its events.

Example::

    from torch.utils.tensorboard import SummaryWriter

    monitor = ss.SaddleMonitor(model, loss_fn, probe_batch, action="escape")
    with monitor.watch(writer=SummaryWriter("runs/a")) as after_step:
        for step, (x, y) in enumerate(loader):
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            after_step(loss, step)

Each event's :meth:`~saddlescope.monitor.MonitorEvent.metrics` become TensorBoard scalars at the
loop's step (and its message a text entry), and/or go to ``log(metrics, step=step)``: the shape of
``wandb.log`` and ``mlflow.log_metrics``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Self

from saddlescope.errors import InvalidInputError
from saddlescope.monitor.events import MonitorEvent

if TYPE_CHECKING:
    from saddlescope.monitor.saddle_monitor import SaddleMonitor

__all__ = ["LoopWatch", "log_event"]


def log_event(
    event: MonitorEvent,
    step: int,
    *,
    writer: Any = None,
    log: Callable[..., Any] | None = None,
    prefix: str = "saddlescope/",
) -> dict[str, float]:
    """Send one event to a TensorBoard writer and/or a ``log(metrics, step=...)`` function.

    Args:
        event: the event.
        step: the training loop's step (the x axis of the logger).
        writer: anything with ``add_scalar(tag, value, step)`` (``torch.utils.tensorboard.SummaryWriter``);
            ``add_text(tag, text, step)`` is used for the message when present.
        log: ``log(metrics, step=step)``.
        prefix: put before every key.

    Returns:
        The metrics sent.
    """
    metrics = event.metrics(prefix)
    if writer is not None:
        for tag, value in metrics.items():
            writer.add_scalar(tag, value, step)
        if hasattr(writer, "add_text"):
            writer.add_text(f"{prefix}message", event.message, step)
    if log is not None:
        log(metrics, step=step)
    return metrics


class LoopWatch:
    """Call after each optimizer step of a plain loop: ``monitor.step(loss)``, then the event (if
    any) to the loop's loggers. Made by :meth:`SaddleMonitor.watch`.

    Args:
        monitor: the monitor to feed.
        writer: a TensorBoard ``SummaryWriter`` (or anything with ``add_scalar``); flushed by
            :meth:`close` and on leaving a ``with`` block (not closed: it is the caller's).
        log: ``log(metrics, step=...)``, e.g. ``wandb.log``.
        prefix: put before every metric name.
    """

    def __init__(self, monitor: SaddleMonitor, *, writer: Any = None, log: Callable[..., Any] | None = None,
                 prefix: str = "saddlescope/") -> None:
        if writer is not None and not callable(getattr(writer, "add_scalar", None)):
            raise InvalidInputError(f"writer must have add_scalar(tag, value, step), got {type(writer).__name__}")
        if log is not None and not callable(log):
            raise InvalidInputError(f"log must be callable, got {type(log).__name__}")
        self.monitor = monitor
        self.writer = writer
        self.log = log
        self.prefix = prefix

    def __call__(self, loss: Any, step: int | None = None) -> MonitorEvent | None:
        """Record one step's loss; log and return the event, if one occurred.

        Args:
            loss: the step's training loss.
            step: the loop's step for the logger (default: the monitor's count of steps).
        """
        event = self.monitor.step(loss)
        if event is not None:
            log_event(event, event.step if step is None else int(step), writer=self.writer, log=self.log,
                      prefix=self.prefix)
        return event

    def close(self) -> None:
        """Flush the writer."""
        if self.writer is not None and callable(getattr(self.writer, "flush", None)):
            self.writer.flush()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
