"""Progress a user can see anywhere: a bar on a terminal, timed lines in a log, nothing when asked.

Long stages (building a Hessian column by column, a Lanczos run, a study's runs) report
``progress(stage, done, total)``. Where that goes depends on where the user is:

- a terminal (stderr is a TTY): a transient rich bar per stage;
- anything else (a log file, a job scheduler, a notebook, CI): a plain line when a stage starts, at
  most every ``interval`` seconds while it runs, and when it ends, with products done / total, the
  elapsed time and the time left at the stage's average rate. A heartbeat thread writes the line
  even when no update arrives (one slow product, a long ``eigh``), so the log is never silent for
  much longer than ``interval``;
- ``quiet``: nothing.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

ProgressFn = Callable[[str, int, int], None]

DEFAULT_INTERVAL_S = 10.0


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class LineProgress:
    """Timed progress lines for a stream that is not a terminal.

    Args:
        stream: where the lines go (default stderr).
        interval: seconds between lines of one stage (the first and the last line are always written).
        clock: monotonic seconds (injectable for tests).
        heartbeat: start a thread that repeats the current line when no update came for ``interval``.
        prefix: put before every line.
    """

    def __init__(self, stream: TextIO | None = None, *, interval: float = DEFAULT_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic, heartbeat: bool = True,
                 prefix: str = "[saddlescope] ") -> None:
        if not interval > 0:
            raise ValueError(f"interval must be positive, got {interval}")
        self.stream = sys.stderr if stream is None else stream
        self.interval = interval
        self.clock = clock
        self.prefix = prefix
        self._lock = threading.Lock()
        self._stage: str | None = None
        self._started = 0.0
        self._last_line = 0.0
        self._done = 0
        self._total = 0
        self._detail = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if heartbeat:
            self._thread = threading.Thread(target=self._beat, name="saddlescope-progress", daemon=True)
            self._thread.start()

    def __call__(self, stage: str, done: int, total: int) -> None:
        self.update(stage, done, total)

    def update(self, stage: str, done: int, total: int, detail: str = "") -> None:
        """Record ``done`` of ``total`` in ``stage`` (``detail``: shown after the counts)."""
        with self._lock:
            now = self.clock()
            if stage != self._stage:
                self._stage, self._started, self._last_line = stage, now, -float("inf")
            self._done, self._total, self._detail = int(done), int(total), detail
            finished = self._total > 0 and self._done >= self._total
            if finished or now - self._last_line >= self.interval:
                self._write(now)
            if finished:
                self._stage = None

    def line(self, now: float | None = None) -> str:
        """The current stage as one line, e.g. ``hessian: 480/1480 (32%), 2m14s elapsed, ~4m50s left``."""
        now = self.clock() if now is None else now
        elapsed = now - self._started
        text = f"{self._stage}: {self._done}"
        if self._total > 0:
            text += f"/{self._total} ({100 * self._done / self._total:.0f}%)"
        text += f", {_duration(elapsed)} elapsed"
        if 0 < self._done < self._total and elapsed >= 1:
            text += f", ~{_duration(elapsed / self._done * (self._total - self._done))} left"
        elif self._total > 0 and self._done >= self._total:
            text += ", done"
        if self._detail:
            text += f"; {self._detail}"
        return text

    def _write(self, now: float) -> None:
        self.stream.write(self.prefix + self.line(now) + "\n")
        self.stream.flush()
        self._last_line = now

    def _beat(self) -> None:
        while not self._stop.wait(self.interval / 2):
            with self._lock:
                now = self.clock()
                if self._stage is not None and now - self._last_line >= self.interval:
                    self._write(now)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)


class _RichProgress:
    """One transient rich bar per stage on stderr."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                            transient=True)
        self.bar.__enter__()
        self.tasks: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=total or None)
        self.bar.update(self.tasks[stage], completed=done, total=total or None)

    def close(self) -> None:
        self.bar.__exit__(None, None, None)


@contextmanager
def stage_progress(quiet: bool = False, *, interval: float = DEFAULT_INTERVAL_S,
                   stream: TextIO | None = None) -> Iterator[ProgressFn]:
    """``progress(stage, done, total)`` for where the user is (see the module docstring)."""
    if quiet:
        yield lambda stage, done, total: None
        return
    target = sys.stderr if stream is None else stream
    reporter: LineProgress | _RichProgress
    if stream is None and target.isatty():
        reporter = _RichProgress()
    else:
        reporter = LineProgress(target, interval=interval)
    try:
        yield reporter
    finally:
        reporter.close()
