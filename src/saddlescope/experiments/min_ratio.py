r"""The min-ratio study: how often is a critical point of a trained network a true minimum?

Dauphin et al. (2014), "Identifying and attacking the saddle point problem in high-dimensional
non-convex optimization", Fig. 1: the critical points of small networks found by Newton-type
methods are mostly saddles, their index (fraction of negative eigenvalues) grows with the training
error, and only those at the lowest error are minima. This study repeats that measurement:

1. Train ``n_networks`` small MLPs (varied width, depth, smooth activation, initial scale, optimizer,
   learning rate, training length and seed; 226--658 parameters by default) on the first
   ``n_samples`` scikit-learn digits, average-pooled to 4x4 pixels, in float64, full batch (Adam,
   or L-BFGS with a strong-Wolfe line search) on cross-entropy plus an L2 penalty
   :math:`\tfrac{w}{2}\|\theta\|^2` (``weight_decay``). Without the penalty a separable training set
   has no minimum at finite weights: the search then "converges" by growing the weights until the
   cross-entropy gradient is below the tolerance, a critical point at infinity.
2. Drive each to a critical point with
   :func:`~saddlescope.experiments.critical_search.find_critical_point` (Levenberg--Marquardt on
   :math:`\tfrac12\|g\|^2` with the exact Hessian; Newton's method on the loss where the Hessian is
   positive definite) and label where it ended: ``"critical"``, ``"gradient_flat"`` (Frye et al.
   2020) or ``"not_converged"``.
3. Take the exact spectrum there with :func:`saddlescope.analyze` (``exact=True``; the package's
   tolerances: an eigenvalue is zero when :math:`|\lambda| \le` ``rtol`` :math:`\max|\lambda|`,
   rtol = 1e-9 in float64) and record loss, :math:`\|g\|`, min ratio, index, zero count and kind.

Runs are independent and reproducible: run ``i`` draws its configuration from
``numpy.random.default_rng([seed, i])`` and computes with one thread, so a run's numbers do not
depend on the worker count or on which runs were done before an interruption. Each finished run is
one JSON file written atomically (:class:`~saddlescope.experiments.records.RecordStore`); running
the same study again skips finished runs.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from saddlescope.critical import analyze
from saddlescope.display import min_ratio_study_html
from saddlescope.errors import InvalidInputError, SaddlescopeError
from saddlescope.experiments.critical_search import LABELS, find_critical_point
from saddlescope.experiments.workers import complete_runs, imap_tasks, one_thread
from saddlescope.experiments.records import RecordStore, atomic_write_json
from saddlescope.objective import Objective
from saddlescope.problems.digits import ACTIVATIONS, load_digits_tensors, mlp
from saddlescope.tolerances import default_tolerances

__all__ = ["MinRatioConfig", "MinRatioStudy", "MinRatioSummary", "NetworkConfig", "min_ratio", "network_config",
           "run_network", "summarize"]

# Activations with a second derivative everywhere (ReLU's Hessian is not defined at its kinks, and
# Newton-type searches for g = 0 need a smooth g).
SMOOTH_ACTIVATIONS = ("tanh", "softplus", "gelu", "sigmoid")
LOSSES = ("cross_entropy", "mse")
OPTIMIZERS = ("adam", "lbfgs")


@dataclass(frozen=True)
class MinRatioConfig:
    """Everything a run depends on besides its index and the study seed (checked on resume).

    Each run draws uniformly from ``hidden``, ``activations``, ``optimizers`` and ``train_steps``,
    and log-uniformly from ``init_scale`` and ``lr`` (both ``(low, high)``; ``lr`` is Adam's, L-BFGS
    takes unit steps with its line search). ``train_steps`` counts Adam steps or L-BFGS iterations.

    Attributes:
        n_samples: first digits used (float64, one batch).
        pool: average-pool the 8x8 images by this factor (2: 16 inputs per image).
        weight_decay: :math:`w` in the L2 penalty :math:`\\tfrac{w}{2}\\|\\theta\\|^2`.
        loss: ``"cross_entropy"`` or ``"mse"`` (squared error to one-hot targets, summed over the 10
            outputs, averaged over samples).
        grad_tol: "critical" when :math:`\\|g\\| \\le` this; None takes the float64 default (1e-6).
        kernel_rtol, flat_fraction, max_iter, stall_window, stall_factor: see
            :func:`~saddlescope.experiments.critical_search.find_critical_point`.
        probe: probe the null space of degenerate points in :func:`saddlescope.analyze`.
    """

    n_samples: int = 300
    pool: int = 2
    hidden: tuple[tuple[int, ...], ...] = ((8,), (12,), (16,), (24,), (8, 8), (12, 8), (16, 8), (8, 8, 8))
    activations: tuple[str, ...] = SMOOTH_ACTIVATIONS
    optimizers: tuple[str, ...] = OPTIMIZERS
    init_scale: tuple[float, float] = (0.2, 3.0)
    lr: tuple[float, float] = (3e-3, 3e-2)
    train_steps: tuple[int, ...] = (0, 3, 10, 30, 100, 300, 1000, 3000)
    weight_decay: float = 1e-3
    loss: str = "cross_entropy"
    grad_tol: float | None = None
    kernel_rtol: float = 1e-3
    flat_fraction: float = 0.9
    max_iter: int = 150
    stall_window: int = 10
    stall_factor: float = 0.9
    probe: bool = True

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> InvalidInputError:
            return InvalidInputError(f"MinRatioConfig.{name} {why}, got {getattr(self, name)!r}")

        def positive_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool) and x >= 1

        if not (positive_int(self.n_samples) and 10 <= self.n_samples <= 1797):
            raise bad("n_samples", "must be an integer in [10, 1797] (digits has 1,797 images)")
        if self.pool not in (1, 2, 4, 8):
            raise bad("pool", "must be 1, 2, 4 or 8 (a divisor of the 8x8 image)")
        hidden = tuple(tuple(h) for h in self.hidden) if isinstance(self.hidden, (list, tuple)) else None
        if not hidden or not all(h and all(positive_int(w) for w in h) for h in hidden):
            raise bad("hidden", "must be a non-empty list of non-empty tuples of positive widths")
        object.__setattr__(self, "hidden", hidden)
        if not self.activations or any(a not in SMOOTH_ACTIVATIONS for a in self.activations):
            raise bad("activations", f"must be a non-empty subset of {SMOOTH_ACTIVATIONS} (twice "
                                     f"differentiable; {sorted(set(ACTIVATIONS) - set(SMOOTH_ACTIVATIONS))} "
                                     "is not)")
        object.__setattr__(self, "activations", tuple(self.activations))
        if not self.optimizers or any(o not in OPTIMIZERS for o in self.optimizers):
            raise bad("optimizers", f"must be a non-empty subset of {OPTIMIZERS}")
        object.__setattr__(self, "optimizers", tuple(self.optimizers))
        for name in ("init_scale", "lr"):
            pair = getattr(self, name)
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                    and all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in pair)
                    and pair[0] <= pair[1]):
                raise bad(name, "must be a (low, high) pair of positive numbers with low <= high")
            object.__setattr__(self, name, (float(pair[0]), float(pair[1])))
        steps = self.train_steps
        if not (isinstance(steps, (list, tuple)) and steps
                and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in steps)):
            raise bad("train_steps", "must be a non-empty list of integers >= 0")
        object.__setattr__(self, "train_steps", tuple(steps))
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay)
                and self.weight_decay >= 0):
            raise bad("weight_decay", "must be a finite number >= 0")
        if self.grad_tol is not None and not (isinstance(self.grad_tol, (int, float)) and self.grad_tol > 0
                                              and math.isfinite(self.grad_tol)):
            raise bad("grad_tol", "must be a positive number or None")
        if self.loss not in LOSSES:
            raise bad("loss", f"must be one of {LOSSES}")
        for name in ("kernel_rtol", "flat_fraction", "stall_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 < value < 1):
                raise bad(name, "must lie strictly between 0 and 1")
        for name in ("max_iter", "stall_window"):
            if not positive_int(getattr(self, name)):
                raise bad(name, "must be a positive integer")

    @property
    def resolved_grad_tol(self) -> float:
        return self.grad_tol if self.grad_tol is not None else default_tolerances(torch.float64)[0]

    def to_dict(self) -> dict[str, Any]:
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        out["hidden"] = [list(h) for h in self.hidden]
        out["grad_tol"] = self.resolved_grad_tol
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MinRatioConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInputError(f"unknown MinRatioConfig fields {unknown}; known: {sorted(known)}")
        data = dict(data)
        for name in ("hidden",):
            if name in data:
                data[name] = tuple(tuple(h) for h in data[name])
        for name in ("activations", "optimizers", "init_scale", "lr", "train_steps"):
            if name in data:
                data[name] = tuple(data[name])
        return cls(**data)


@dataclass(frozen=True)
class NetworkConfig:
    """One network of the study, drawn from ``(seed, run_id)``."""

    run_id: int
    hidden: tuple[int, ...]
    activation: str
    init_scale: float
    optimizer: str
    lr: float
    train_steps: int
    model_seed: int

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["hidden"] = list(self.hidden)
        return out


def network_config(config: MinRatioConfig, seed: int, run_id: int) -> NetworkConfig:
    """Run ``run_id``'s configuration: a pure function of ``(config, seed, run_id)``."""
    rng = np.random.default_rng([seed, run_id])
    hidden = config.hidden[int(rng.integers(len(config.hidden)))]
    activation = config.activations[int(rng.integers(len(config.activations)))]
    lo, hi = config.init_scale
    init_scale = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    optimizer = config.optimizers[int(rng.integers(len(config.optimizers)))]
    lo, hi = config.lr
    lr = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    steps = config.train_steps[int(rng.integers(len(config.train_steps)))]
    model_seed = int(rng.integers(2**31 - 1))
    return NetworkConfig(run_id, tuple(hidden), activation, init_scale, optimizer, lr, int(steps), model_seed)


# ---------------------------------------------------------------------- one network
@lru_cache(maxsize=4)
def _digits(n_samples: int, pool: int) -> tuple[Tensor, Tensor]:
    x, y = load_digits_tensors(torch.float64, n_samples)
    if pool > 1:
        x = nn.functional.avg_pool2d(x.view(-1, 1, 8, 8), pool).reshape(x.shape[0], -1)
    return x, y


class _Penalised(nn.Module):
    """The network's logits together with :math:`\\|\\theta\\|^2`, so that the penalty is part of the
    objective that :meth:`Objective.from_model` builds (its parameters are substituted functionally)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.net(x), sum((p * p).sum() for p in self.net.parameters())


def _objectives(run: NetworkConfig, config: MinRatioConfig) -> tuple[Objective, Objective, nn.Module]:
    """The training objective (cross-entropy + penalty), the data loss alone (over the same theta)
    and the network."""
    x, y = _digits(config.n_samples, config.pool)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.model_seed)
        net = mlp((x.shape[1], *run.hidden, 10), run.activation).to(torch.float64)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(run.init_scale)
    data_fn = _data_loss(config.loss)
    decay = float(config.weight_decay)

    def penalised_loss(outputs: tuple[Tensor, Tensor], targets: Tensor) -> Tensor:
        logits, squared_norm = outputs
        return data_fn(logits, targets) + 0.5 * decay * squared_norm

    objective = Objective.from_model(_Penalised(net), penalised_loss, (x, y), dtype=torch.float64)
    data_loss = Objective.from_model(net, data_fn, (x, y), dtype=torch.float64)
    return objective, data_loss, net


def _data_loss(name: str) -> Any:
    if name == "cross_entropy":
        return nn.CrossEntropyLoss()

    def squared_error(outputs: Tensor, targets: Tensor) -> Tensor:
        one_hot = nn.functional.one_hot(targets, outputs.shape[1]).to(outputs.dtype)
        return ((outputs - one_hot) ** 2).sum(1).mean()

    return squared_error


def run_network(config: MinRatioConfig, seed: int, run_id: int) -> dict[str, Any]:
    """Train network ``run_id``, search for a critical point from where training stopped, and take
    the exact spectrum there. Returns the run's record (JSON-ready).

    A run that fails with a :class:`~saddlescope.errors.SaddlescopeError` (e.g. a non-finite loss)
    is recorded with label ``"error"`` and the message, so that resuming does not retry it.
    """
    start = time.perf_counter()
    run = network_config(config, seed, run_id)
    record: dict[str, Any] = {"run_id": run_id, "seed": seed, "config": run.to_dict()}
    with one_thread():
        try:
            record.update(_train_search_analyze(run, config))
        except SaddlescopeError as exc:
            record.update({"label": "error", "error": f"{type(exc).__name__}: {exc}"})
    record["seconds"] = {**record.get("seconds", {}), "total": time.perf_counter() - start}
    return record


def _train(objective: Objective, run: NetworkConfig) -> Tensor:
    """Full-batch training from ``objective.theta0``: ``run.train_steps`` Adam steps or L-BFGS iterations."""
    theta = objective.theta0.clone().requires_grad_(True)
    if run.train_steps == 0:
        return theta.detach()

    def closure() -> Tensor:
        loss, grad = objective.loss_and_grad(theta.detach())
        theta.grad = grad
        return loss

    if run.optimizer == "adam":
        adam = torch.optim.Adam([theta], lr=run.lr)
        for _ in range(run.train_steps):
            adam.step(closure)
    else:
        lbfgs = torch.optim.LBFGS([theta], lr=1.0, max_iter=run.train_steps, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-12, tolerance_change=0.0)
        lbfgs.step(closure)
    return theta.detach()


def _train_search_analyze(run: NetworkConfig, config: MinRatioConfig) -> dict[str, Any]:
    objective, data_loss, net = _objectives(run, config)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    theta = _train(objective, run)
    train_loss, train_grad = objective.loss_and_grad(theta)
    seconds["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    search = find_critical_point(
        objective, theta, grad_tol=config.resolved_grad_tol, kernel_rtol=config.kernel_rtol,
        flat_fraction=config.flat_fraction,
        max_iter=config.max_iter, stall_window=config.stall_window, stall_factor=config.stall_factor,
    )
    seconds["search"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    point = analyze(objective, search.theta, exact=True, grad_tol=config.resolved_grad_tol, probe=config.probe)
    seconds["spectrum"] = time.perf_counter() - t0

    inputs, targets = _digits(config.n_samples, config.pool)
    with torch.no_grad():
        nn.utils.vector_to_parameters(search.theta, net.parameters())  # theta's layout is parameters()'s
        logits = net(inputs)
    return {
        "n_params": objective.n_params,
        "label": search.label,
        "reason": search.reason,
        "train_loss": float(train_loss),
        "train_grad_norm": float(train_grad.norm()),
        "loss": point.loss,
        "data_loss": float(data_loss.loss(search.theta)),
        "accuracy": float((logits.argmax(1) == targets).double().mean()),
        "grad_norm": point.grad_norm,
        "kernel_fraction": search.kernel_fraction,
        "hg_ratio": search.hg_ratio,
        "kind": point.kind,
        "curvature_kind": point.curvature_kind,
        "min_ratio": point.min_ratio,
        "index": point.index,
        "n_negative": point.n_negative,
        "n_zero": point.n_zero,
        "n_positive": point.n_positive,
        "lambda_min": point.lambda_min,
        "lambda_max": point.lambda_max,
        "zero_threshold": point.tolerances.zero_threshold,
        "tolerances": point.tolerances.to_dict(),
        "search": search.to_dict(),
        "eigenvalues": point.eigenvalues.tolist(),
        "seconds": seconds,
    }


# ---------------------------------------------------------------------- summary
@dataclass
class MinRatioSummary:
    """The study's findings in numbers.

    Attributes:
        n_runs: finished runs summarised.
        labels: runs per search label (``"critical"``, ``"gradient_flat"``, ``"not_converged"``,
            ``"error"``).
        kinds: critical points per verdict of :func:`saddlescope.analyze` (minimum, saddle, ...).
        fraction_critical: runs whose search reached :math:`\\|g\\| \\le` ``grad_tol``.
        fraction_minima: true minima (every eigenvalue above the zero threshold, or a degenerate
            point the null-space probe proved a minimum) among the critical points.
        largest_min_ratio: the largest min ratio among critical points; ``largest_min_ratio_saddle``
            among critical points that are not minima.
        pearson_loss_index, spearman_loss_index: correlation of loss and index over critical points.
        fit_slope, fit_intercept: least-squares line ``loss = intercept + slope * index`` over them.
        minimum_loss_range: (lowest, highest) loss of the true minima; ``saddle_loss_range`` likewise.
    """

    n_runs: int
    labels: dict[str, int]
    kinds: dict[str, int]
    fraction_critical: float
    fraction_minima: float
    largest_min_ratio: float
    largest_min_ratio_saddle: float
    pearson_loss_index: float
    spearman_loss_index: float
    fit_slope: float
    fit_intercept: float
    minimum_loss_range: tuple[float, float]
    saddle_loss_range: tuple[float, float]
    median_seconds: float

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["minimum_loss_range"] = list(self.minimum_loss_range)
        out["saddle_loss_range"] = list(self.saddle_loss_range)
        return out


def summarize(records: Sequence[dict[str, Any]]) -> MinRatioSummary:
    """The findings over finished records (see :class:`MinRatioSummary`)."""
    labels = {label: 0 for label in (*LABELS, "error")}
    for r in records:
        labels[r["label"]] = labels.get(r["label"], 0) + 1
    critical = [r for r in records if r["label"] == "critical"]
    kinds: dict[str, int] = {}
    for r in critical:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    n, n_crit = len(records), len(critical)
    nan = math.nan
    minima = [r for r in critical if r["kind"] == "minimum"]
    saddles = [r for r in critical if r["kind"] != "minimum"]
    ratios = [r["min_ratio"] for r in critical]
    pearson = spearman = slope = intercept = nan
    index = np.array([r["index"] for r in critical], dtype=float)
    loss = np.array([r["loss"] for r in critical], dtype=float)
    if n_crit >= 3 and index.std() > 0 and loss.std() > 0:
        from scipy import stats

        pearson = float(stats.pearsonr(index, loss).statistic)
        spearman = float(stats.spearmanr(index, loss).statistic)
        slope, intercept = (float(v) for v in np.polyfit(index, loss, 1))

    def span(rows: list[dict[str, Any]]) -> tuple[float, float]:
        values = [r["loss"] for r in rows]
        return (min(values), max(values)) if values else (nan, nan)

    seconds = [r["seconds"]["total"] for r in records if "seconds" in r]
    return MinRatioSummary(
        n_runs=n,
        labels=labels,
        kinds=dict(sorted(kinds.items())),
        fraction_critical=n_crit / n if n else nan,
        fraction_minima=len(minima) / n_crit if n_crit else nan,
        largest_min_ratio=max(ratios) if ratios else nan,
        largest_min_ratio_saddle=max((r["min_ratio"] for r in saddles), default=nan),
        pearson_loss_index=pearson,
        spearman_loss_index=spearman,
        fit_slope=slope,
        fit_intercept=intercept,
        minimum_loss_range=span(minima),
        saddle_loss_range=span(saddles),
        median_seconds=float(np.median(seconds)) if seconds else nan,
    )


# ---------------------------------------------------------------------- the study
@dataclass
class MinRatioStudy:
    """A finished (or resumed) study: its settings, every record and the summary.

    Attributes:
        out: the study folder (``study.json``, ``runs/``, ``summary.json``).
        n_networks, seed, config: what was asked.
        records: the finished runs ``0 .. n_networks - 1``, by run id.
        summary: :func:`summarize` of ``records``.
        computed, skipped: run ids computed now and found finished from an earlier invocation.
        seconds: wall time of this invocation; ``workers``: processes used.
    """

    out: Path
    n_networks: int
    seed: int
    config: MinRatioConfig
    records: list[dict[str, Any]]
    summary: MinRatioSummary
    computed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    seconds: float = 0.0
    workers: int = 1

    def _repr_html_(self) -> str:
        return min_ratio_study_html(self)  # Jupyter: how many minima first

    def to_dict(self, records: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "study": "min_ratio",
            "out": str(self.out),
            "n_networks": self.n_networks,
            "seed": self.seed,
            "workers": self.workers,
            "config": self.config.to_dict(),
            "summary": self.summary.to_dict(),
            "computed": len(self.computed),
            "skipped": len(self.skipped),
            "seconds": self.seconds,
        }
        if records:
            out["records"] = self.records
        return out


def _study_key(config: MinRatioConfig, seed: int) -> dict[str, Any]:
    return {"study": "min_ratio", "seed": seed, "config": config.to_dict()}


def min_ratio(
    n_networks: int = 100,
    *,
    out: str | os.PathLike[str] = "min_ratio_study",
    seed: int = 0,
    workers: int = 1,
    config: MinRatioConfig | None = None,
    progress: bool = True,
) -> MinRatioStudy:
    """Run (or resume) the min-ratio study and summarise it.

    Runs ``0 .. n_networks - 1`` whose records are not yet in ``out`` are computed, by ``workers``
    processes (spawned, one thread each); each record is written atomically the moment its run
    finishes, so the study can be killed at any moment and resumed by calling this again with the
    same arguments (a larger ``n_networks`` extends it). The report (markdown and figures) is
    written from the result by :func:`saddlescope.report.study_plots.write_min_ratio_report`.

    Args:
        n_networks: networks in the study.
        out: the study folder.
        seed: the study seed; run ``i``'s configuration is drawn from ``(seed, i)``.
        workers: spawned processes computing runs, one thread each. Every worker starts with the same
            environment (one BLAS/OpenMP thread from its start), so a run's record is bitwise the same
            whatever the worker count. 0 computes in this process instead (no start-up cost; its
            numbers can differ from a worker's in the last digits, since this process's BLAS was
            started with its own thread settings).
        config: the distribution runs are drawn from and the search's thresholds (default
            :class:`MinRatioConfig`).
        progress: show a progress bar (rich, on stderr).

    Returns:
        A :class:`MinRatioStudy`; its ``summary`` is also written to ``out/summary.json``.

    Raises:
        saddlescope.errors.InvalidInputError: a bad argument, or ``out`` holds a study with other
            settings.
    """
    for name, value, low in (("n_networks", n_networks, 1), ("workers", workers, 0), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidInputError(f"{name} must be an integer >= {low}, got {value!r}")
    if config is None:
        config = MinRatioConfig()
    elif not isinstance(config, MinRatioConfig):
        raise InvalidInputError(f"config must be a MinRatioConfig, got {type(config).__name__}")
    start = time.perf_counter()
    store = RecordStore(out)
    store.bind(_study_key(config, seed))
    wanted = set(range(n_networks))
    todo, done = complete_runs(store, wanted, lambda ids: _compute(config, seed, ids, workers), progress=progress,
                               title="min-ratio study", labels=lambda record: {record["label"]: 1})
    records = store.load(wanted)
    summary = summarize(records)
    study = MinRatioStudy(
        out=Path(out), n_networks=n_networks, seed=seed, config=config, records=records, summary=summary,
        computed=todo, skipped=done, seconds=time.perf_counter() - start, workers=workers,
    )
    atomic_write_json(Path(out) / "summary.json", study.to_dict())
    return study


def _compute(config: MinRatioConfig, seed: int, todo: list[int], workers: int) -> Iterator[dict[str, Any]]:
    """Finished records in completion order, computed by spawned worker processes (or here, for 0)."""
    return imap_tasks(_worker_run, [(config, seed, run_id) for run_id in todo], workers)


def _worker_run(task: tuple[MinRatioConfig, int, int]) -> dict[str, Any]:
    config, seed, run_id = task
    return run_network(config, seed, run_id)
