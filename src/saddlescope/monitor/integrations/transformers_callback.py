"""Hugging Face ``transformers.Trainer``: a ``TrainerCallback`` that feeds a
:class:`~saddlescope.monitor.SaddleMonitor`.

The Trainer gives its callbacks no loss, so the callback reads the Trainer's own: it wraps
``trainer.training_step``, whose return values over one optimizer step's micro-batches add up to the
step's training loss exactly as the Trainer accumulates it for its ``"loss"`` log (already divided
by the gradient-accumulation steps where the Trainer does so). At ``on_optimizer_step`` (after the
optimizer step, before ``zero_grad``, so the monitor reads the step's ``.grad``; clipped, if
``max_grad_norm`` clips) it calls :meth:`SaddleMonitor.step`; an escape moves the parameters there,
before the scheduler and the next step. At ``on_step_end`` (``state.global_step`` counted) each
event's :meth:`~saddlescope.monitor.MonitorEvent.metrics` go through ``trainer.log``: into
``state.log_history`` and to every ``report_to`` integration (TensorBoard writes them as
``train/saddlescope/...``), leaving the Trainer's own logging of the step as it was.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from saddlescope.errors import InvalidInputError

if TYPE_CHECKING:
    from saddlescope.monitor.saddle_monitor import SaddleMonitor

__all__ = ["transformers_callback"]


def transformers_callback(monitor: SaddleMonitor, trainer: Any, prefix: str = "saddlescope/") -> Any:
    """Build a ``SaddleTrainerCallback`` for ``monitor`` and add it to ``trainer``.

    Args:
        monitor: built on the model the Trainer trains (``trainer.model``).
        trainer: a ``transformers.Trainer``.
        prefix: put before every metric name.

    Returns:
        The callback (already in ``trainer.callback_handler``).

    Raises:
        ImportError: ``transformers`` is not installed.
        InvalidInputError: ``trainer`` has no ``training_step``, ``log`` and ``add_callback``.
    """
    try:
        from transformers import TrainerCallback
    except ImportError as exc:
        raise ImportError(
            "SaddleMonitor.transformers_callback() needs Hugging Face transformers: pip install transformers "
            "(or call monitor.step(loss) yourself after each optimizer step)"
        ) from exc
    for name in ("training_step", "log", "add_callback"):
        if not callable(getattr(trainer, name, None)):
            raise InvalidInputError(f"trainer must be a transformers.Trainer (no {name}()), got {type(trainer).__name__}")
    if trainer.model is not monitor.model:
        raise InvalidInputError("the monitor watches another model than the trainer trains: build the "
                                "SaddleMonitor on trainer.model")
    if getattr(trainer.training_step, "saddlescope_callback", None) is not None:
        raise InvalidInputError("this trainer already feeds a SaddleMonitor (its losses would be counted twice)")

    class SaddleTrainerCallback(TrainerCallback):  # type: ignore[misc, valid-type]
        """Feeds the Trainer's per-step training loss to a :class:`SaddleMonitor`; events go to
        ``trainer.log``."""

        def __init__(self) -> None:
            self.monitor = monitor
            self.trainer = trainer
            self.prefix = prefix
            self._loss: Any = None  # this optimizer step's loss so far (a tensor: no sync per micro-batch)
            self._event: Any = None
            original = trainer.training_step

            def training_step(*args: Any, **kwargs: Any) -> Any:
                loss = original(*args, **kwargs)
                self._loss = loss.detach() if self._loss is None else self._loss + loss.detach()
                return loss

            training_step.saddlescope_callback = self  # type: ignore[attr-defined]
            trainer.training_step = training_step

        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            loss, self._loss = self._loss, None
            if loss is not None:
                self._event = self.monitor.step(loss)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            event, self._event = self._event, None
            if event is None:
                return
            # Trainer.log's on_log clears control.should_log, which would cancel the Trainer's own
            # log of this step (its loss would then be averaged into the next one): keep the flag.
            should_log = control.should_log
            self.trainer.log(event.metrics(self.prefix))
            control.should_log = self.trainer.control.should_log = should_log

    callback = SaddleTrainerCallback()
    trainer.add_callback(callback)
    return callback
