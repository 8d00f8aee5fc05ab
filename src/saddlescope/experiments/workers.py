"""Worker processes for the studies: one thread each, and none outliving a killed parent."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch

from saddlescope.experiments.records import RecordStore
from saddlescope.progress import LineProgress

T = TypeVar("T")

# Children read these when their BLAS starts; one thread each keeps the workers from competing.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One thread for torch and BLAS: the machine is shared, and results do not depend on threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn brings threadpoolctl
        limits: Any = contextlib.nullcontext()
    else:
        limits = threadpool_limits(1)
    try:
        with limits:
            yield
    finally:
        torch.set_num_threads(previous)


def imap_tasks(function: Callable[[T], dict[str, Any]], tasks: Sequence[T], workers: int) -> Iterator[dict[str, Any]]:
    """``function(task)`` for every task, in completion order: here when ``workers`` is 0, else in
    that many spawned processes. ``function`` must be a module-level function (it is pickled)."""
    if not tasks:
        return
    if workers == 0:
        for task in tasks:
            yield function(task)
        return
    context = multiprocessing.get_context("spawn")
    saved = {k: os.environ.get(k) for k in THREAD_VARIABLES}
    os.environ.update({k: "1" for k in THREAD_VARIABLES})
    try:
        pool = context.Pool(min(workers, len(tasks)), initializer=_worker_start, initargs=(os.getpid(),))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    with pool:
        yield from pool.imap_unordered(function, list(tasks))


def _worker_start(parent: int) -> None:
    """One thread per worker, and exit when the parent is gone (killed with SIGKILL, a worker
    would otherwise compute on for nobody)."""
    torch.set_num_threads(1)

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()


@contextlib.contextmanager
def study_progress(show: bool, total: int, done: int, *, title: str,
                   labels: Callable[[dict[str, Any]], dict[str, int]]) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A progress bar over a study's runs (stderr) that tallies each finished record's labels;
    yields ``advance(record)``. With ``show`` False, ``advance`` does nothing."""
    if not show:
        yield lambda record: None
        return
    counts: dict[str, int] = {}

    def tally(record: dict[str, Any]) -> str:
        for label, count in labels(record).items():
            counts[label] = counts.get(label, 0) + count
        return " ".join(f"{k} {v}" for k, v in sorted(counts.items()))

    if not sys.stderr.isatty():  # a log: timed lines (saddlescope.progress), never silent
        lines = LineProgress(sys.stderr)
        finished = done
        lines.update(title, finished, total, f"{done} resumed" if done else "")

        def advance_line(record: dict[str, Any]) -> None:
            nonlocal finished
            finished += 1
            lines.update(title, finished, total, tally(record))

        try:
            yield advance_line
        finally:
            lines.close()
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[labels]}"), console=Console(stderr=True), transient=False,
    ) as bar:
        task = bar.add_task("runs", total=total, completed=done, labels="" if not done else f"{done} resumed")

        def advance(record: dict[str, Any]) -> None:
            bar.update(task, advance=1, labels=tally(record))

        yield advance


def complete_runs(
    store: RecordStore,
    wanted: set[int],
    compute: Callable[[list[int]], Iterable[dict[str, Any]]],
    *,
    progress: bool,
    title: str,
    labels: Callable[[dict[str, Any]], dict[str, int]],
) -> tuple[list[int], list[int]]:
    """Compute the runs of ``wanted`` that ``store`` does not hold yet, writing each record the moment
    it arrives (so a kill loses only the runs in flight). ``compute(todo)`` yields records with a
    ``"run_id"``. Returns the run ids computed now and those found finished."""
    store.clean_temporary()
    done = store.completed() & wanted
    todo = sorted(wanted - done)
    with study_progress(progress, len(wanted), len(done), title=title, labels=labels) as advance:
        for record in compute(todo):
            store.write(record["run_id"], record)
            advance(record)
    return todo, sorted(done)
