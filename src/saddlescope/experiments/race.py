r"""The escape race: which optimizer leaves a saddle, how fast, and how reliably.

Nine optimizers, each with a small learning-rate grid, run from the starts of the problems in
:mod:`saddlescope.experiments.race_problems` (at or next to a saddle), several seeds each:

=====================  ======================================================================
``gd``                 gradient descent on the full loss (``torch.optim.SGD``)
``sgd``                the same on mini-batches: the only optimizer that sees mini-batch noise
``momentum``           heavy ball, :math:`\beta = 0.9`, full loss
``nesterov``           Nesterov momentum, :math:`\beta = 0.9`, full loss
``rmsprop``            ``torch.optim.RMSprop`` defaults, full loss
``adam``               ``torch.optim.Adam`` defaults, full loss
``perturbed-gd``       :class:`~saddlescope.optim.PerturbedGD` (Jin et al. 2017), defaults
``saddle-free-newton`` :class:`~saddlescope.optim.SaddleFreeNewton` (Dauphin et al. 2014), defaults
``negative-curvature`` :class:`~saddlescope.optim.NegativeCurvatureDescent`, defaults
=====================  ======================================================================

Only ``lr`` (and the seed) is varied. Every run goes through one loop: ``opt.step(closure)`` with a
closure that zeroes the gradients, evaluates the loss (the mini-batch loss for ``sgd``, the full
loss for the others), calls ``backward()`` and returns the loss. After each step the *full* loss is
evaluated; the run has **escaped** at the first step where it is below the problem's threshold, and
stops there. A run that has not escaped after ``max_steps`` is **censored**: its steps are recorded
as ``max_steps`` with ``escaped = False``, never as an escape time. A run also stops, censored, when
the loss becomes non-finite or exceeds the problem's divergence bound (``diverged``), when an
optimizer step raises (``error``), or when a deterministic optimizer is provably stuck
(``stuck``: the gradient and every optimizer buffer are exactly zero, so every later update is
exactly zero; this is what gradient descent, momentum, RMSprop and Adam do when started exactly at
a critical point).

**Seeds** drive the starting noise (noisy starts, network initialisation), the mini-batch order,
PerturbedGD's kicks and the Lanczos start vectors. A deterministic optimizer started exactly at a
saddle makes the same run for every seed.

**Final loss** is the full loss where the run stopped: just below the threshold for an escaped
run (the race measures leaving the saddle, not converging), the saddle's value for a stuck one.

**Per (optimizer, problem)** the best learning rate is chosen by this rule: the lowest *median
steps-to-escape* with censored runs counted as never escaping (so a setting that fails on more
than half the seeds ranks below every setting whose median run escaped); ties go to the higher
escaped fraction, then the lower median final loss, then the smaller learning rate. Quantiles are order statistics
(numpy's ``inverted_cdf``): each is an observed run, and one that falls on a censored run is
reported as censored (``> max_steps``), not as a number. Every learning rate's row is kept in the
JSON.

**Records** are appended to ``out/race_records.jsonl`` as each run finishes (one JSON line,
flushed and fsync'ed). Re-running with the same ``out`` skips every (problem, optimizer, lr,
seed, max_steps, threshold) already recorded; a line that does not parse (a run killed mid-write)
is dropped, and the file rewritten without it before anything is appended.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saddlescope.display import race_result_html
from saddlescope.errors import InvalidInputError
from saddlescope.experiments.race_problems import (
    DEFAULT_PROBLEMS,
    PROBLEMS,
    STREAM_DATA,
    RaceInstance,
    RaceProblem,
    get_problem,
    seeded_generator,
)
from saddlescope.experiments.records import atomic_write_json, json_restore, json_safe
from saddlescope.optim import NegativeCurvatureDescent, PerturbedGD, SaddleFreeNewton

RECORDS_FILE = "race_records.jsonl"
JSON_FILE = "race.json"
TABLE_FILE = "race.md"
TRACE_POINTS = 200  # loss (and 2-D path) points kept per run, evenly spaced, first and last included

BEST_LR_RULE = (
    "lowest median steps-to-escape (censored runs count as never escaping); ties: higher escaped "
    "fraction, then lower median final loss, then smaller lr"
)


# ---------------------------------------------------------------------------------- optimizers


def _gd(params: list[torch.Tensor], lr: float, seed: int) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr)


def _momentum(params: list[torch.Tensor], lr: float, seed: int) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def _nesterov(params: list[torch.Tensor], lr: float, seed: int) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)


def _rmsprop(params: list[torch.Tensor], lr: float, seed: int) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(params, lr=lr)


def _adam(params: list[torch.Tensor], lr: float, seed: int) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr)


def _perturbed_gd(params: list[torch.Tensor], lr: float, seed: int) -> torch.optim.Optimizer:
    return PerturbedGD(params, lr=lr, seed=seed)


def _saddle_free_newton(params: list[torch.Tensor], lr: float, seed: int) -> torch.optim.Optimizer:
    return SaddleFreeNewton(params, lr=lr, seed=seed)


def _negative_curvature(params: list[torch.Tensor], lr: float, seed: int) -> torch.optim.Optimizer:
    return NegativeCurvatureDescent(params, lr=lr, seed=seed)


@dataclass(frozen=True)
class RaceOptimizer:
    """An entrant: ``make(params, lr, seed)`` builds the optimizer.

    Attributes:
        lr_grid: the learning rates tried (a problem may replace them).
        quick_lr: the one learning rate of a ``quick`` race (a problem may replace it).
        stochastic: steps on mini-batch losses instead of the full loss.
        zero_is_fixed: with exactly zero gradient and exactly zero buffers every update is exactly
            zero (a deterministic torch optimizer without weight decay), so the run can stop.
    """

    name: str
    description: str
    make: Callable[[list[torch.Tensor], float, int], torch.optim.Optimizer]
    lr_grid: tuple[float, ...]
    quick_lr: float
    stochastic: bool = False
    zero_is_fixed: bool = False


OPTIMIZERS: dict[str, RaceOptimizer] = {
    o.name: o
    for o in (
        RaceOptimizer("gd", "gradient descent, full loss", _gd, (0.01, 0.03, 0.1), 0.1, zero_is_fixed=True),
        RaceOptimizer("sgd", "SGD on mini-batches", _gd, (0.01, 0.03, 0.1), 0.1, stochastic=True),
        RaceOptimizer("momentum", "heavy ball 0.9", _momentum, (0.003, 0.01, 0.03), 0.03, zero_is_fixed=True),
        RaceOptimizer("nesterov", "Nesterov 0.9", _nesterov, (0.003, 0.01, 0.03), 0.03, zero_is_fixed=True),
        RaceOptimizer("rmsprop", "RMSprop", _rmsprop, (0.001, 0.01, 0.1), 0.01, zero_is_fixed=True),
        RaceOptimizer("adam", "Adam", _adam, (0.001, 0.01, 0.1), 0.1, zero_is_fixed=True),
        RaceOptimizer("perturbed-gd", "PerturbedGD (Jin et al. 2017)", _perturbed_gd, (0.01, 0.03, 0.1), 0.1),
        RaceOptimizer(
            "saddle-free-newton", "SaddleFreeNewton (Dauphin et al. 2014)", _saddle_free_newton,
            (0.1, 0.3, 1.0), 1.0,
        ),
        RaceOptimizer(
            "negative-curvature", "NegativeCurvatureDescent", _negative_curvature, (0.01, 0.03, 0.1), 0.1
        ),
    )
}
DEFAULT_OPTIMIZERS: tuple[str, ...] = tuple(OPTIMIZERS)


def get_optimizer(name: str) -> RaceOptimizer:
    """The registered optimizer ``name``.

    Raises:
        InvalidInputError: no optimizer has that name.
    """
    if name not in OPTIMIZERS:
        raise InvalidInputError(f"unknown race optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]


# ---------------------------------------------------------------------------------- one run


@dataclass
class RunRecord:
    """One finished run (one line of ``race_records.jsonl``).

    Attributes:
        status: ``escaped``, ``censored`` (reached ``max_steps``), ``stuck`` (provably never
            moves again), ``diverged`` or ``error``.
        escaped: the full loss went below ``threshold``.
        steps: steps to escape; ``max_steps`` (censored) when not escaped.
        steps_run: optimizer steps actually taken.
        closure_calls: closure evaluations (curvature methods call it several times per step).
        wall_time_s: seconds from the first step to the escape (or to the stop).
        start_loss, final_loss: full loss at the start and where the run stopped.
        final_theta: the final parameters, for problems with at most 64 of them.
        trace: ``{"step": [...], "loss": [...]}`` (and ``"path"`` for 2-D problems), thinned to
            at most ``TRACE_POINTS`` points.
    """

    problem: str
    optimizer: str
    lr: float
    seed: int
    max_steps: int
    threshold: float
    status: str
    escaped: bool
    steps: int
    steps_run: int
    closure_calls: int
    wall_time_s: float
    start_loss: float
    final_loss: float
    final_theta: list[float] | None = None
    error: str | None = None
    trace: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str, float, int, int, float]:
        """What identifies a run on resume."""
        return _key(self.problem, self.optimizer, self.lr, self.seed, self.max_steps, self.threshold)

    def to_dict(self, trace: bool = True) -> dict[str, Any]:
        out = asdict(self)
        if not trace:
            out.pop("trace")
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunRecord:
        return cls(**{k: json_restore(v) for k, v in data.items() if k in cls.__dataclass_fields__})


def _key(
    problem: str, optimizer: str, lr: float, seed: int, max_steps: int, threshold: float
) -> tuple[str, str, float, int, int, float]:
    return (problem, optimizer, float(lr), int(seed), int(max_steps), float(threshold))


def _task_key(task: tuple[RaceProblem, RaceOptimizer, float, int, int]) -> tuple[str, str, float, int, int, float]:
    problem, optimizer, lr, seed, cap = task
    return _key(problem.name, optimizer.name, lr, seed, cap, problem.threshold)


def _thin(n: int, points: int = TRACE_POINTS) -> list[int]:
    """At most ``points`` indices of ``range(n)``, evenly spread, first and last included."""
    if n <= points:
        return list(range(n))
    return sorted({round(float(i)) for i in np.linspace(0, n - 1, points)})


def _exactly_stuck(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> bool:
    """Gradient and every buffer (but step counters) exactly zero: the next update is exactly zero."""
    for p in params:
        if p.grad is not None and bool(p.grad.any()):
            return False
    for state in optimizer.state.values():
        for key, value in state.items():
            if key != "step" and isinstance(value, torch.Tensor) and bool(value.any()):
                return False
    return True


def run_one(
    problem: RaceProblem, optimizer: RaceOptimizer, lr: float, seed: int, max_steps: int
) -> RunRecord:
    """One run of ``optimizer`` (step size ``lr``) on ``problem`` built for ``seed``."""
    instance: RaceInstance = problem.build(seed)
    params = instance.params
    opt = optimizer.make(params, lr, seed)
    batches = seeded_generator(seed, STREAM_DATA)
    calls = 0

    def closure() -> torch.Tensor:
        nonlocal calls
        calls += 1
        opt.zero_grad()
        value = instance.minibatch_loss(batches) if optimizer.stochastic else instance.loss()
        value.backward()
        return value

    def full_loss() -> float:
        with torch.no_grad():
            return float(instance.loss())

    two_d = problem.two_d
    loss = start_loss = full_loss()
    losses = [loss]
    path = [instance.flat().tolist()] if two_d else []
    status, steps, error = "censored", 0, None
    start = time.perf_counter()
    if loss < problem.threshold:
        status = "escaped"
    else:
        for step in range(1, max_steps + 1):
            steps = step
            try:
                opt.step(closure)
            except Exception as exc:  # noqa: BLE001 (an optimizer failure ends this run, not the race)
                status, error = "error", f"{type(exc).__name__}: {exc}"
                break
            loss = full_loss()
            losses.append(loss)
            if two_d:
                path.append(instance.flat().tolist())
            if loss < problem.threshold:
                status = "escaped"
                break
            if not math.isfinite(loss) or loss > problem.diverge_above:
                status = "diverged"
                break
            if optimizer.zero_is_fixed and _exactly_stuck(opt, params):
                status = "stuck"
                break
    wall = time.perf_counter() - start
    escaped = status == "escaped"
    keep = _thin(len(losses))
    trace: dict[str, list[Any]] = {"step": keep, "loss": [losses[i] for i in keep]}
    if two_d:
        trace["path"] = [path[i] for i in keep]
    theta = instance.flat()
    return RunRecord(
        problem=problem.name,
        optimizer=optimizer.name,
        lr=float(lr),
        seed=int(seed),
        max_steps=int(max_steps),
        threshold=float(problem.threshold),
        status=status,
        escaped=escaped,
        steps=steps if escaped else max_steps,
        steps_run=steps,
        closure_calls=calls,
        wall_time_s=wall,
        start_loss=start_loss,
        final_loss=loss,
        final_theta=theta.tolist() if theta.numel() <= 64 else None,
        error=error,
        trace=trace,
    )


# ---------------------------------------------------------------------------------- summaries


def _order_statistic(sorted_values: Sequence[float], q: float) -> float:
    """numpy's ``inverted_cdf`` quantile of sorted values: an observed value, never interpolated."""
    n = len(sorted_values)
    index = max(0, math.ceil(q * n) - 1)
    return sorted_values[min(index, n - 1)]


def _median(values: Sequence[float]) -> float | None:
    finite = [v for v in values if v is not None]
    return float(np.median(finite)) if finite else None


@dataclass
class LrRow:
    """All seeds of one (problem, optimizer, lr).

    Steps quantiles are order statistics with censored runs counted as ``+inf``; a quantile that
    lands on a censored run is reported as ``max_steps`` with its ``*_censored`` flag set.
    ``wall_time_median_s`` and ``closure_calls_median`` are over escaped runs only (``None`` if
    none escaped); ``final_loss_median`` over all runs.
    """

    lr: float
    runs: int
    escaped: int
    statuses: dict[str, int]
    max_steps: int
    steps_median: int
    steps_median_censored: bool
    steps_q25: int
    steps_q25_censored: bool
    steps_q75: int
    steps_q75_censored: bool
    steps_min: int
    steps_max: int
    steps_max_censored: bool
    wall_time_median_s: float | None
    closure_calls_median: float | None
    final_loss_median: float | None

    @property
    def escaped_fraction(self) -> float:
        return self.escaped / self.runs if self.runs else 0.0

    @classmethod
    def from_records(cls, lr: float, records: Sequence[RunRecord]) -> LrRow:
        cap = max(r.max_steps for r in records)
        ordered = sorted(float(r.steps) if r.escaped else math.inf for r in records)

        def quantile(q: float) -> tuple[int, bool]:
            value = _order_statistic(ordered, q)
            return (cap, True) if math.isinf(value) else (int(value), False)

        med, q25, q75 = quantile(0.5), quantile(0.25), quantile(0.75)
        hi = quantile(1.0)
        won = [r for r in records if r.escaped]
        statuses: dict[str, int] = {}
        for r in records:
            statuses[r.status] = statuses.get(r.status, 0) + 1
        finals = [r.final_loss if math.isfinite(r.final_loss) else math.inf for r in records]
        return cls(
            lr=float(lr),
            runs=len(records),
            escaped=len(won),
            statuses=statuses,
            max_steps=cap,
            steps_median=med[0],
            steps_median_censored=med[1],
            steps_q25=q25[0],
            steps_q25_censored=q25[1],
            steps_q75=q75[0],
            steps_q75_censored=q75[1],
            steps_min=int(ordered[0]) if not math.isinf(ordered[0]) else cap,
            steps_max=hi[0],
            steps_max_censored=hi[1],
            wall_time_median_s=_median([r.wall_time_s for r in won]),
            closure_calls_median=_median([float(r.closure_calls) for r in won]),
            final_loss_median=float(np.median(finals)) if finals else None,
        )

    def rank_key(self) -> tuple[float, float, float, float]:
        """Sort key of the best-lr rule (smaller is better)."""
        median = math.inf if self.steps_median_censored else float(self.steps_median)
        final = self.final_loss_median
        final = math.inf if final is None or not math.isfinite(final) else final
        return (median, -self.escaped_fraction, final, self.lr)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "escaped_fraction": self.escaped_fraction}


@dataclass
class RaceSummary:
    """One (problem, optimizer): every lr's row and the best one by :data:`BEST_LR_RULE`."""

    problem: str
    optimizer: str
    rows: list[LrRow]

    @property
    def best(self) -> LrRow:
        return min(self.rows, key=LrRow.rank_key)

    def to_dict(self) -> dict[str, Any]:
        return {
            "problem": self.problem,
            "optimizer": self.optimizer,
            "best_lr": self.best.lr,
            "best": self.best.to_dict(),
            "rows": [r.to_dict() for r in self.rows],
        }


def _fmt_steps(value: int, censored: bool) -> str:
    return f">{value}" if censored else str(value)


def _fmt_number(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}"


def _fmt_statuses(statuses: Mapping[str, int]) -> str:
    """Why runs did not escape, e.g. ``5 stuck`` or ``2 censored, 1 diverged``."""
    return ", ".join(f"{n} {status}" for status, n in sorted(statuses.items()) if status != "escaped")


def _fmt_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 0.01:
        return f"{value * 1000:.2g} ms"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


@dataclass
class RaceResult:
    """What :func:`race` found.

    Attributes:
        summaries: one per (problem, optimizer), problems in race order, optimizers within.
        records: every run of this race (reused ones included).
        problems: the problems' settings (:meth:`RaceProblem.info`).
        config: the race's arguments (seeds, grids, caps, quick, threads, workers).
        executed: runs computed by this call; ``reused``: runs read back from ``out``.
        wall_time_s: this call's duration.
        files: what was written into ``out`` (name -> path).
        specs: the :class:`RaceProblem` objects by name (for plots; not in the JSON).
    """

    summaries: list[RaceSummary]
    records: list[RunRecord]
    problems: list[dict[str, Any]]
    config: dict[str, Any]
    executed: int
    reused: int
    wall_time_s: float
    files: dict[str, str] = field(default_factory=dict)
    specs: dict[str, RaceProblem] = field(default_factory=dict, repr=False)

    def _repr_html_(self) -> str:
        return race_result_html(self)  # Jupyter: the fastest escaper first

    def summary(self, problem: str, optimizer: str) -> RaceSummary:
        for s in self.summaries:
            if s.problem == problem and s.optimizer == optimizer:
                return s
        raise InvalidInputError(f"no summary for problem {problem!r} and optimizer {optimizer!r}")

    def runs(self, problem: str, optimizer: str, lr: float | None = None) -> list[RunRecord]:
        """The records of one (problem, optimizer), at ``lr`` (default: its best lr), by seed."""
        if lr is None:
            lr = self.summary(problem, optimizer).best.lr
        chosen = [r for r in self.records if r.problem == problem and r.optimizer == optimizer and r.lr == lr]
        return sorted(chosen, key=lambda r: r.seed)

    def table(self) -> str:
        """One markdown row per (problem, optimizer), at its best lr."""
        lines = [
            (
                "| problem | optimizer | best lr | escaped | steps to escape: median [IQR] | "
                "closure calls (median) | time to escape (median) | final loss (median) | not escaped |"
            ),
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for s in self.summaries:
            b = s.best
            if b.escaped == 0:
                steps = f"not escaped (>{b.max_steps})"
            else:
                steps = (
                    f"{_fmt_steps(b.steps_median, b.steps_median_censored)} "
                    f"[{_fmt_steps(b.steps_q25, b.steps_q25_censored)}-"
                    f"{_fmt_steps(b.steps_q75, b.steps_q75_censored)}]"
                )
            lines.append(
                f"| {s.problem} | {s.optimizer} | {b.lr:g} | {b.escaped}/{b.runs} | {steps} | "
                f"{_fmt_number(b.closure_calls_median, 4)} | {_fmt_seconds(b.wall_time_median_s)} | "
                f"{_fmt_number(b.final_loss_median)} | {_fmt_statuses(b.statuses)} |"
            )
        return "\n".join(lines)

    def to_dict(self, records: bool = True, traces: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "config": self.config,
            "best_lr_rule": BEST_LR_RULE,
            "problems": self.problems,
            "executed": self.executed,
            "reused": self.reused,
            "wall_time_s": self.wall_time_s,
            "summaries": [s.to_dict() for s in self.summaries],
            "files": self.files,
        }
        if records:
            out["records"] = [r.to_dict(trace=traces) for r in self.records]
        return out


# ---------------------------------------------------------------------------------- records file


def read_records(path: str | os.PathLike[str]) -> list[RunRecord]:
    """The finished runs in a records file; lines that do not parse (a killed write) are skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            records.append(RunRecord.from_dict(json.loads(line)))
        except (ValueError, TypeError, KeyError):
            continue
    return records


class _RecordLog:
    """Append-only JSON lines, one per finished run, each flushed and fsync'ed."""

    def __init__(self, folder: Path) -> None:
        if folder.exists() and not folder.is_dir():
            raise InvalidInputError(f"{folder} exists and is not a folder; choose another out folder")
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / RECORDS_FILE
        self.records = read_records(self.path)
        if self.path.exists():
            text = self.path.read_bytes().decode("utf-8", errors="replace")
            if len(text.splitlines()) != len(self.records) or (text and not text.endswith("\n")):
                # A damaged line (a run killed mid-write): keep the good lines only, so that the
                # next append does not glue a record onto the broken one.
                _write_text(self.path, "".join(self._line(r) for r in self.records))

    @staticmethod
    def _line(record: RunRecord) -> str:
        return json.dumps(json_safe(record.to_dict()), allow_nan=False) + "\n"

    def append(self, record: RunRecord) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(self._line(record))
            fh.flush()
            os.fsync(fh.fileno())


# ---------------------------------------------------------------------------------- the race


def _names(value: str | Iterable[Any] | None, default: Sequence[str]) -> list[Any]:
    if value is None:
        return list(default)
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    items = list(value)
    if not items:
        raise InvalidInputError("an empty list of problems or optimizers: name at least one")
    return items


def _resolve(items: Any, default: Sequence[str], kind: type, lookup: Callable[[str], Any], what: str) -> list[Any]:
    """Names or instances of ``kind`` (a RaceProblem or RaceOptimizer) as instances, each at most once."""
    out = []
    for item in _names(items, default):
        if isinstance(item, kind):
            out.append(item)
        elif isinstance(item, str):
            out.append(lookup(item))
        else:
            raise InvalidInputError(f"a {what} must be a name or a {kind.__name__}, got {type(item).__name__}")
    names = [item.name for item in out]
    if len(set(names)) != len(names):
        raise InvalidInputError(f"{what}s named twice: {names}")
    return out


def _check_grid(name: str, grid: Any) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in grid)
    except (TypeError, ValueError):
        raise InvalidInputError(f"the lr grid of {name} must be a list of numbers, got {grid!r}") from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise InvalidInputError(f"the lr grid of {name} must hold positive finite numbers, got {list(grid)}")
    return tuple(sorted(set(values)))


def _grid(
    problem: RaceProblem, optimizer: RaceOptimizer, lr_grid: Any, quick: bool
) -> tuple[float, ...]:
    """The lrs for one pair: the user's grid, else the problem's override, else the optimizer's."""
    if lr_grid is None:
        grid = problem.lr_grid.get(optimizer.name, optimizer.lr_grid)
    elif isinstance(lr_grid, Mapping):
        unknown = sorted(set(lr_grid) - set(OPTIMIZERS))
        if unknown:
            raise InvalidInputError(f"lr_grid names unknown optimizers {unknown}; known: {', '.join(OPTIMIZERS)}")
        grid = lr_grid.get(optimizer.name, problem.lr_grid.get(optimizer.name, optimizer.lr_grid))
    else:
        grid = lr_grid
    if quick and lr_grid is None:
        grid = (problem.quick_lr.get(optimizer.name, optimizer.quick_lr),)
    return _check_grid(optimizer.name, grid)


def _seeds(seeds: int | Sequence[int]) -> list[int]:
    if isinstance(seeds, bool):
        raise InvalidInputError(f"seeds must be a count or a list of ints, got {seeds!r}")
    if isinstance(seeds, int):
        if seeds < 1:
            raise InvalidInputError(f"seeds must be >= 1, got {seeds}")
        return list(range(seeds))
    out = list(seeds)
    if not out or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in out):
        raise InvalidInputError(f"seeds must be non-negative ints, got {out!r}")
    if len(set(out)) != len(out):
        raise InvalidInputError(f"seeds repeated: {out}")
    return out


def _worker_init(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def _task(args: tuple[RaceProblem, RaceOptimizer, float, int, int]) -> RunRecord:
    return run_one(*args)


def race(
    problems: str | Iterable[str | RaceProblem] | None = None,
    optimizers: str | Iterable[str | RaceOptimizer] | None = None,
    seeds: int | Sequence[int] = 5,
    lr_grid: Mapping[str, Sequence[float]] | Sequence[float] | None = None,
    max_steps: int | None = None,
    out: str | os.PathLike[str] | None = None,
    *,
    quick: bool = False,
    workers: int = 1,
    threads: int | None = 1,
    progress: Callable[[int, int], None] | None = None,
) -> RaceResult:
    """Run the escape race (see the module docstring for the rules).

    Args:
        problems: names (or :class:`RaceProblem` objects, or ``"a,b"``); default all registered.
        optimizers: names (or :class:`RaceOptimizer` objects); default all nine.
        seeds: how many (seeds ``0..n-1``) or which.
        lr_grid: one list for every optimizer, or ``{optimizer: list}`` replacing those grids;
            default each optimizer's grid (a problem may override it).
        max_steps: the step cap for every problem; default each problem's own.
        out: folder for ``race_records.jsonl`` (resumable), ``race.json`` and ``race.md``;
            ``None`` keeps everything in memory. Plots: :func:`saddlescope.report.race_plots.plot_race`.
        quick: one lr per optimizer (its ``quick_lr``, unless ``lr_grid`` is given) and each
            problem's shorter ``quick_max_steps``.
        workers: processes running runs in parallel (1: in this process). They are spawned, so
            a script calling this needs the ``if __name__ == "__main__":`` guard. Wall times
            measured with several workers share the CPU and compare less well.
        threads: ``torch.set_num_threads`` during the race (restored after); the problems are tiny,
            more threads only add overhead. ``None`` leaves it alone.
        progress: ``progress(done, total)`` after each run (reused runs count at the start).

    Returns:
        :class:`RaceResult`.

    Raises:
        InvalidInputError: an unknown problem or optimizer, or a bad seed, grid, cap or count.
    """
    started = time.perf_counter()
    problem_list = _resolve(problems, DEFAULT_PROBLEMS, RaceProblem, get_problem, "problem")
    optimizer_list = _resolve(optimizers, DEFAULT_OPTIMIZERS, RaceOptimizer, get_optimizer, "optimizer")
    seed_list = _seeds(seeds)
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise InvalidInputError(f"max_steps must be an int >= 1, got {max_steps!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InvalidInputError(f"workers must be an int >= 1, got {workers!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InvalidInputError(f"threads must be an int >= 1 or None, got {threads!r}")

    tasks: list[tuple[RaceProblem, RaceOptimizer, float, int, int]] = []
    grids: dict[str, dict[str, list[float]]] = {}
    for problem in problem_list:
        cap = max_steps if max_steps is not None else (problem.quick_max_steps if quick else problem.max_steps)
        grids[problem.name] = {}
        for optimizer in optimizer_list:
            grid = _grid(problem, optimizer, lr_grid, quick)
            grids[problem.name][optimizer.name] = list(grid)
            tasks.extend((problem, optimizer, lr, seed, cap) for lr in grid for seed in seed_list)

    log = _RecordLog(Path(out)) if out is not None else None
    done: dict[tuple[str, str, float, int, int, float], RunRecord] = {}
    if log is not None:
        wanted = {_task_key(task) for task in tasks}
        for record in log.records:
            if record.key in wanted:
                done[record.key] = record  # a later line for the same run wins
    reused = len(done)
    todo = [task for task in tasks if _task_key(task) not in done]
    total = len(tasks)
    if progress is not None:
        progress(reused, total)

    def finish(record: RunRecord) -> None:
        done[record.key] = record
        if log is not None:
            log.append(record)
        if progress is not None:
            progress(len(done), total)

    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        if workers == 1 or len(todo) <= 1:
            for task in todo:
                finish(run_one(*task))
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            context = multiprocessing.get_context("spawn")  # no fork of a threaded torch
            with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                                     initargs=(threads,)) as pool:
                futures = [pool.submit(_task, task) for task in todo]
                for future in as_completed(futures):
                    finish(future.result())
    finally:
        torch.set_num_threads(previous_threads)

    records = [done[_task_key(task)] for task in tasks]
    summaries = []
    for problem in problem_list:
        for optimizer in optimizer_list:
            rows = []
            for lr in grids[problem.name][optimizer.name]:
                chosen = [r for r in records if r.problem == problem.name and r.optimizer == optimizer.name
                          and r.lr == float(lr)]
                rows.append(LrRow.from_records(lr, chosen))
            summaries.append(RaceSummary(problem.name, optimizer.name, rows))
    config = {
        "problems": [p.name for p in problem_list],
        "optimizers": [o.name for o in optimizer_list],
        "seeds": seed_list,
        "lr_grids": grids,
        "max_steps": {p.name: (max_steps if max_steps is not None else
                               (p.quick_max_steps if quick else p.max_steps)) for p in problem_list},
        "quick": quick,
        "workers": workers,
        "threads": threads,
    }
    result = RaceResult(
        summaries=summaries,
        records=records,
        problems=[p.info() for p in problem_list],
        config=config,
        executed=len(todo),
        reused=reused,
        wall_time_s=time.perf_counter() - started,
        specs={p.name: p for p in problem_list},
    )
    if out is not None:
        folder = Path(out)
        result.files = {
            "records": str(folder / RECORDS_FILE),
            "json": str(folder / JSON_FILE),
            "table": str(folder / TABLE_FILE),
        }
        atomic_write_json(folder / JSON_FILE, result.to_dict())
        _write_text(folder / TABLE_FILE, result.table() + "\n")
    return result


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically (temporary file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


__all__ = [
    "BEST_LR_RULE",
    "DEFAULT_OPTIMIZERS",
    "DEFAULT_PROBLEMS",
    "OPTIMIZERS",
    "PROBLEMS",
    "LrRow",
    "RaceOptimizer",
    "RaceResult",
    "RaceSummary",
    "RunRecord",
    "get_optimizer",
    "race",
    "read_records",
    "run_one",
]
