"""PyTorch Lightning: a ``Callback`` that feeds a :class:`~saddlescope.monitor.SaddleMonitor`.

``on_train_batch_end`` passes the batch's loss (what ``training_step`` returned) to
:meth:`SaddleMonitor.step`; Lightning zeroes gradients just before the next backward, so the
``.grad`` the monitor reads is this batch's. Each event's
:meth:`~saddlescope.monitor.MonitorEvent.metrics` go to every logger of the trainer
(``logger.log_metrics(metrics, step=trainer.global_step)``: TensorBoard, CSV, W&B, ...), directly
rather than through ``pl_module.log``, which hands values to the loggers only every
``log_every_n_steps`` and would drop an event between two of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from saddlescope.monitor.saddle_monitor import SaddleMonitor

__all__ = ["lightning_callback"]


def _callback_base() -> type:
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
    return Callback


def lightning_callback(monitor: SaddleMonitor, prefix: str = "saddlescope/") -> Any:
    """A ``LightningSaddleCallback`` for ``monitor`` (the class is built on the installed Lightning).

    Raises:
        ImportError: neither ``lightning`` nor ``pytorch_lightning`` is installed.
    """
    base = _callback_base()

    class LightningSaddleCallback(base):  # type: ignore[misc, valid-type]
        """Feeds each training batch's loss to a :class:`SaddleMonitor`; events go to the loggers."""

        def __init__(self, monitor: SaddleMonitor, prefix: str) -> None:
            super().__init__()
            self.monitor = monitor
            self.prefix = prefix

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            # training_step may return the loss, a dict with "loss", or None (skip the batch).
            loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
            if loss is None:
                return
            event = self.monitor.step(loss)
            if event is None:
                return
            metrics = event.metrics(self.prefix)
            step = int(getattr(trainer, "global_step", event.step))
            for logger in getattr(trainer, "loggers", None) or ():
                logger.log_metrics(metrics, step=step)

    return LightningSaddleCallback(monitor, prefix)
