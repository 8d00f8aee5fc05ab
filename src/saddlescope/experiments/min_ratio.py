r"""The min-ratio study: is a trained network "stuck" at a saddle or at a minimum?

Two claims are measured on the same networks and data.

**(a) The lecture's figure.** Small networks are trained by full-batch gradient descent (or Adam) to a
plateau, then the gradient norm is minimised (Adam on :math:`\tfrac12\|g\|^2`, whose gradient is
:math:`Hg`), and each end point is drawn as (minimum ratio, training loss), where the minimum ratio is
the fraction of Hessian eigenvalues above :math:`\delta\max|\lambda|`. The figure reaches a ratio of
about 0.5--0.6 at most, and is read as "critical points of trained networks are saddles". Here every
point also shows its :math:`\|g\|` (is it critical at all?) and its ratio at
:math:`\delta \in \{0, 10^{-6}, 10^{-4}\}` (how much of the figure is near-zero eigenvalues?).

**(b) Dauphin et al. (2014), Fig. 1, with certified critical points only.** From three points of each
training trajectory (early, middle, late: where the loss has fallen by a third, by two thirds, and
the end), :func:`~saddlescope.experiments.critical_search.find_critical_point` searches for a point
with :math:`\|g\| \le` ``grad_rtol`` :math:`\times` the loss scale (Newton-MR on
:math:`\tfrac12\|g\|^2`, then a trust-region Newton step on the loss once the index is tiny). Only
searches that reach it are *certified*; each is classified by the exact spectrum
(:func:`saddlescope.analyze` with ``exact=True``) and drawn as (index, data loss) and (index, error rate).
Networks that collapse to the constant predictor (every output weight near zero; the loss is the
constant predictor's, :math:`\ln 10` for cross-entropy on balanced classes) are reported apart: they
are one saddle shared by every architecture, and a correlation that joins it to the rest measures two
clusters, not a curve.

Set-up (:class:`MinRatioConfig`): the first ``n_samples`` scikit-learn digits, average-pooled to 4x4
pixels, float64, one full batch; MLPs of varied width, depth, smooth activation, initial scale,
optimizer, learning rate, training length and seed. The default loss is the squared error to one-hot
targets, whose minimisers are finite (cross-entropy on separable data has none); an L2 penalty
:math:`\tfrac w2\|\theta\|^2` of at most ``1e-5`` keeps saturated units finite. The penalty adds
:math:`w` to every eigenvalue, so each point records its counts on :math:`H` (the searched objective)
and on :math:`H - wI` (the data loss alone); plots show the data loss, never the penalised one.

Runs are independent and reproducible: run ``i`` draws its configuration from
``numpy.random.default_rng([seed, i])`` and computes with one thread, so a run's numbers do not depend on
the worker count or on what was done before an interruption. Each finished run is one JSON file written
atomically (:class:`~saddlescope.experiments.records.RecordStore`); running the same study again skips
finished runs.
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
from saddlescope.experiments.records import RecordStore, atomic_write_json
from saddlescope.experiments.statistics import (
    Estimate,
    cluster_bootstrap,
    linear_fit,
    loss_levels,
    pearson,
    rank_correlation,
)
from saddlescope.experiments.workers import complete_runs, imap_tasks, one_thread
from saddlescope.objective import Objective
from saddlescope.problems.digits import ACTIVATIONS, load_digits_tensors, mlp
from saddlescope.tolerances import default_tolerances

__all__ = ["DELTAS", "LectureSummary", "MinRatioConfig", "MinRatioStudy", "MinRatioSummary", "NetworkConfig",
           "StallSummary", "gradient_ends", "min_ratio", "network_config", "run_network", "search_points", "summarize"]

# Activations with a second derivative everywhere (ReLU's Hessian is not defined at its kinks, and
# Newton-type searches for g = 0 need a smooth g).
SMOOTH_ACTIVATIONS = ("tanh", "softplus", "gelu", "sigmoid")
LOSSES = ("mse", "cross_entropy")
OPTIMIZERS = ("gd", "adam")
STARTS = ("early", "middle", "late")
# The lecture's resolutions: an eigenvalue counts as positive when it is above delta * max|lambda|.
DELTAS = (0.0, 1e-6, 1e-4)
MAX_WEIGHT_DECAY = 1e-5
MIN_TRAIN_STEPS = 100


def delta_key(delta: float) -> str:
    """The JSON key of a resolution: ``"0"``, ``"1e-06"``, ``"0.0001"``."""
    return format(delta, "g")


@dataclass(frozen=True)
class MinRatioConfig:
    """Everything a run depends on besides its index and the study seed (checked on resume).

    Each run draws uniformly from ``hidden``, ``activations``, ``optimizers`` and ``train_steps``, and
    log-uniformly from ``init_scale`` and the optimizer's learning rate (``lr`` for Adam, ``gd_lr`` for
    gradient descent; both ``(low, high)``).

    Attributes:
        n_samples: first digits used (float64, one batch). pool: average-pool the 8x8 images by this.
        loss: ``"mse"`` (squared error to one-hot targets, summed over the 10 outputs, averaged over
            samples) or ``"cross_entropy"``.
        weight_decay: :math:`w` in :math:`\\tfrac w2\\|\\theta\\|^2`, at most 1e-5 (a larger penalty makes
            the minimum ratio measure the penalty).
        train_steps: full-batch steps; at least 100, and continued (up to 3x) while the loss is above 0.9
            times the constant predictor's, so that networks leave the initial plateau.
        grad_rtol: "critical" when :math:`\\|g\\| \\le` ``grad_rtol`` times the loss scale (the constant
            predictor's loss).
        kernel_rtol, loss_mode_index, gradient_budget, descend_after_stall, quasi_newton_iter, max_iter,
            stall_window, stall_factor: the search's
            (:func:`~saddlescope.experiments.critical_search.find_critical_point`).
        lecture_steps, lecture_lr: Adam on :math:`\\tfrac12\\|g\\|^2` after training, for panel (a).
        collapse_tol: a point is *collapsed* (the constant predictor) when the network's outputs vary
            over the samples by at most this (root mean square about their mean); at a penalised critical
            point that means output weights near zero (both are recorded).
        probe: probe the null space of degenerate points in :func:`saddlescope.analyze`.
    """

    n_samples: int = 200
    pool: int = 2
    hidden: tuple[tuple[int, ...], ...] = ((2,), (3,), (4,), (6,), (8,), (10,), (4, 4), (6, 4))
    activations: tuple[str, ...] = SMOOTH_ACTIVATIONS
    optimizers: tuple[str, ...] = OPTIMIZERS
    init_scale: tuple[float, float] = (0.3, 2.0)
    lr: tuple[float, float] = (3e-3, 3e-2)
    gd_lr: tuple[float, float] = (0.03, 0.15)
    train_steps: tuple[int, ...] = (500, 1000, 2000)
    weight_decay: float = 1e-5
    loss: str = "mse"
    grad_rtol: float = 1e-8
    kernel_rtol: float = 1e-9
    loss_mode_index: float = 0.03
    gradient_budget: int = 25
    descend_after_stall: bool = True
    quasi_newton_iter: int = 2000
    max_iter: int = 80
    stall_window: int = 15
    stall_factor: float = 0.9
    lecture_steps: int = 500
    lecture_lr: float = 1e-3
    collapse_tol: float = 1e-3
    probe: bool = True

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> InvalidInputError:
            return InvalidInputError(f"MinRatioConfig.{name} {why}, got {getattr(self, name)!r}")

        def integer(x: Any, low: int) -> bool:
            return isinstance(x, int) and not isinstance(x, bool) and x >= low

        def number(x: Any) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        if not (integer(self.n_samples, 10) and self.n_samples <= 1797):
            raise bad("n_samples", "must be an integer in [10, 1797] (digits has 1,797 images)")
        if self.pool not in (1, 2, 4, 8):
            raise bad("pool", "must be 1, 2, 4 or 8 (a divisor of the 8x8 image)")
        hidden = tuple(tuple(h) for h in self.hidden) if isinstance(self.hidden, (list, tuple)) else None
        if not hidden or not all(h and all(integer(w, 1) for w in h) for h in hidden):
            raise bad("hidden", "must be a non-empty list of non-empty tuples of positive widths")
        object.__setattr__(self, "hidden", hidden)
        for name, allowed in (("activations", SMOOTH_ACTIVATIONS), ("optimizers", OPTIMIZERS)):
            value = getattr(self, name)
            if isinstance(value, str) or not value or any(v not in allowed for v in value):
                extra = (f" (twice differentiable; {sorted(set(ACTIVATIONS) - set(SMOOTH_ACTIVATIONS))} is not)"
                         if name == "activations" else "")
                raise bad(name, f"must be a non-empty subset of {allowed}{extra}")
            object.__setattr__(self, name, tuple(value))
        for name in ("init_scale", "lr", "gd_lr"):
            pair = getattr(self, name)
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(number(v) and v > 0 for v in pair)
                    and pair[0] <= pair[1]):
                raise bad(name, "must be a (low, high) pair of positive numbers with low <= high")
            object.__setattr__(self, name, (float(pair[0]), float(pair[1])))
        steps = self.train_steps
        if not (isinstance(steps, (list, tuple)) and steps and all(integer(s, MIN_TRAIN_STEPS) for s in steps)):
            raise bad("train_steps", f"must be a non-empty list of integers >= {MIN_TRAIN_STEPS} (networks must "
                                     "leave the initial plateau; 0-30 steps only reach the constant predictor)")
        object.__setattr__(self, "train_steps", tuple(steps))
        if not (number(self.weight_decay) and 0 <= self.weight_decay <= MAX_WEIGHT_DECAY):
            raise bad("weight_decay", f"must lie in [0, {MAX_WEIGHT_DECAY:g}] (a larger penalty lifts every eigenvalue "
                                      "by itself, and the minimum ratio then measures the penalty)")
        if self.loss not in LOSSES:
            raise bad("loss", f"must be one of {LOSSES}")
        for name in ("grad_rtol", "kernel_rtol", "stall_factor", "lecture_lr", "collapse_tol"):
            value = getattr(self, name)
            if not (number(value) and value > 0) or (name in ("kernel_rtol", "stall_factor") and value >= 1):
                raise bad(name, "must be a positive number" + (" below 1" if name in ("kernel_rtol", "stall_factor")
                                                               else ""))
        if not (number(self.loss_mode_index) and 0 <= self.loss_mode_index <= 1):
            raise bad("loss_mode_index", "must lie in [0, 1]")
        for name, low in (("max_iter", 1), ("stall_window", 1), ("gradient_budget", 1), ("quasi_newton_iter", 0),
                          ("lecture_steps", 0)):
            if not integer(getattr(self, name), low):
                raise bad(name, f"must be an integer >= {low}")
        for name in ("probe", "descend_after_stall"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be True or False")

    def to_dict(self) -> dict[str, Any]:
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        out["hidden"] = [list(h) for h in self.hidden]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MinRatioConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInputError(f"unknown MinRatioConfig fields {unknown}; known: {sorted(known)}")
        data = dict(data)
        if "hidden" in data:
            data["hidden"] = tuple(tuple(h) for h in data["hidden"])
        for name in ("activations", "optimizers", "init_scale", "lr", "gd_lr", "train_steps"):
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

    def log_uniform(pair: tuple[float, float]) -> float:
        return float(math.exp(rng.uniform(math.log(pair[0]), math.log(pair[1]))))

    hidden = config.hidden[int(rng.integers(len(config.hidden)))]
    activation = config.activations[int(rng.integers(len(config.activations)))]
    init_scale = log_uniform(config.init_scale)
    optimizer = config.optimizers[int(rng.integers(len(config.optimizers)))]
    lr = log_uniform(config.lr if optimizer == "adam" else config.gd_lr)
    steps = config.train_steps[int(rng.integers(len(config.train_steps)))]
    model_seed = int(rng.integers(2**31 - 1))
    return NetworkConfig(run_id, tuple(hidden), activation, init_scale, optimizer, lr, int(steps), model_seed)


# ---------------------------------------------------------------------- one network: the problem
@lru_cache(maxsize=4)
def _digits(n_samples: int, pool: int) -> tuple[Tensor, Tensor]:
    x, y = load_digits_tensors(torch.float64, n_samples)
    if pool > 1:
        x = nn.functional.avg_pool2d(x.view(-1, 1, 8, 8), pool).reshape(x.shape[0], -1)
    return x, y


class _Penalised(nn.Module):
    """The network's outputs together with :math:`\\|\\theta\\|^2`, so that the penalty is part of the
    objective that :meth:`Objective.from_model` builds (its parameters are substituted functionally)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.net(x), sum((p * p).sum() for p in self.net.parameters())


def _data_loss(name: str) -> Any:
    if name == "cross_entropy":
        return nn.CrossEntropyLoss()

    def squared_error(outputs: Tensor, targets: Tensor) -> Tensor:
        one_hot = nn.functional.one_hot(targets, outputs.shape[1]).to(outputs.dtype)
        return ((outputs - one_hot) ** 2).sum(1).mean()

    return squared_error


def constant_predictor_loss(targets: Tensor, loss: str) -> float:
    """The data loss of the best constant prediction (the collapsed network): the entropy of the class
    frequencies for cross-entropy (:math:`\\ln 10` on balanced classes), :math:`1 - \\sum_k p_k^2` for the
    squared error to one-hot targets."""
    freq = torch.bincount(targets, minlength=10).double() / targets.numel()
    if loss == "cross_entropy":
        nonzero = freq[freq > 0]
        return float(-(nonzero * nonzero.log()).sum())
    return float(1 - (freq**2).sum())


@dataclass
class NetworkProblem:
    """One network with its data: the searched objective (data loss + penalty), the data loss alone
    (same :math:`\\theta`), the module, and where the output layer's weights sit in :math:`\\theta`."""

    objective: Objective
    data_loss: Objective
    net: nn.Module
    inputs: Tensor
    targets: Tensor
    loss_scale: float
    output_weights: slice
    weight_decay: float

    def describe(self, theta: Tensor) -> dict[str, Any]:
        """Data loss, error rate and the collapse test at ``theta``."""
        with torch.no_grad():
            nn.utils.vector_to_parameters(theta, self.net.parameters())  # theta's layout is parameters()'s
            outputs = self.net(self.inputs)
        spread = float((outputs - outputs.mean(0)).pow(2).mean().sqrt())
        return {"data_loss": float(self.data_loss.loss(theta)),
                "error_rate": float((outputs.argmax(1) != self.targets).double().mean()),
                "output_weight_norm": float(theta[self.output_weights].norm()), "output_spread": spread}


def network_problem(run: NetworkConfig, config: MinRatioConfig) -> NetworkProblem:
    """The objective of network ``run`` (its initial weights are ``objective.theta0``)."""
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
        prediction, squared_norm = outputs
        return data_fn(prediction, targets) + 0.5 * decay * squared_norm

    objective = Objective.from_model(_Penalised(net), penalised_loss, (x, y), dtype=torch.float64)
    data_loss = Objective.from_model(net, data_fn, (x, y), dtype=torch.float64)
    sizes = [p.numel() for p in net.parameters()]
    last_weight = len(sizes) - 2  # parameters(): ..., last weight, last bias
    begin = sum(sizes[:last_weight])
    return NetworkProblem(objective, data_loss, net, x, y, constant_predictor_loss(y, config.loss),
                          slice(begin, begin + sizes[last_weight]), decay)


# ---------------------------------------------------------------------- one network: the steps
@dataclass
class Trajectory:
    """Training: the loss and :math:`\\|g\\|` at every step and :math:`\\theta` at every step (kept in
    memory only)."""

    losses: list[float]
    grad_norms: list[float]
    thetas: list[Tensor]

    def starts(self, loss_scale: float) -> list[tuple[str, int]]:
        """Early, middle and late: the first steps where the loss has fallen by a third and by two thirds
        of the way from the constant predictor's loss (or the first loss, if lower) to the final loss,
        and the last step. A network still on the initial plateau has its starts at a third, two thirds
        and the end of training instead."""
        last = len(self.losses) - 1
        top = min(loss_scale, self.losses[0])
        bottom = self.losses[-1]
        if not bottom < top:
            return [("early", last // 3), ("middle", 2 * last // 3), ("late", last)]
        picks = []
        for name, share in (("early", 1 / 3), ("middle", 2 / 3)):
            level = top - share * (top - bottom)
            picks.append((name, next(i for i, loss in enumerate(self.losses) if loss <= level)))
        return [*picks, ("late", last)]


def train(problem: NetworkProblem, run: NetworkConfig, plateau_factor: float = 0.9,
          max_extension: int = 3) -> Trajectory:
    """Full-batch training from ``objective.theta0``: ``run.train_steps`` steps of gradient descent or Adam
    on the searched objective, continued (up to ``max_extension`` times as many steps in all) while the loss
    is still above ``plateau_factor`` times the constant predictor's: every network leaves the initial
    plateau if it can."""
    theta = problem.objective.theta0.clone().requires_grad_(True)
    optimizer: torch.optim.Optimizer = (torch.optim.Adam([theta], lr=run.lr) if run.optimizer == "adam"
                                        else torch.optim.SGD([theta], lr=run.lr))
    trajectory = Trajectory([], [], [])
    plateau = plateau_factor * problem.loss_scale
    while True:
        loss, grad = problem.objective.loss_and_grad(theta.detach())
        trajectory.losses.append(float(loss))
        trajectory.grad_norms.append(float(grad.norm()))
        trajectory.thetas.append(theta.detach().clone())
        steps = len(trajectory.losses) - 1
        if steps >= run.train_steps and (float(loss) < plateau or steps >= max_extension * run.train_steps):
            return trajectory
        theta.grad = grad
        optimizer.step()


def minimise_gradient_norm(objective: Objective, theta: Tensor, steps: int, lr: float) -> tuple[Tensor, list[float]]:
    """The lecture's second phase: Adam on :math:`\\tfrac12\\|g\\|^2` (its gradient is :math:`Hg`, one
    Hessian-vector product). Returns the point with the smallest :math:`\\|g\\|` seen and the trace of
    :math:`\\|g\\|` every 50 steps."""
    x = theta.clone().requires_grad_(True)
    adam = torch.optim.Adam([x], lr=lr)
    best, best_norm, trace = theta.clone(), math.inf, []
    for step in range(steps + 1):
        graph = objective.gradient_graph(x.detach())
        norm = float(graph.grad.norm())
        if norm < best_norm:
            best, best_norm = x.detach().clone(), norm
        if step % 50 == 0 or step == steps:
            trace.append(norm)
        if step == steps:
            break
        x.grad = graph.hvp(graph.grad)
        adam.step()
    return best, trace


def ratios(eigenvalues: Tensor, shift: float = 0.0) -> dict[str, float]:
    """Minimum ratio at each resolution of :data:`DELTAS`: the share of eigenvalues of :math:`H - \\text{shift}\\,I`
    above :math:`\\delta\\max|\\lambda|`."""
    values = eigenvalues.double() - shift
    top = float(values.abs().max())
    return {delta_key(d): float((values > d * top).sum()) / values.numel() for d in DELTAS}


def spectrum_counts(eigenvalues: Tensor, threshold_rtol: float, shift: float = 0.0) -> dict[str, Any]:
    """Negative / zero / positive counts of :math:`H - \\text{shift}\\,I` under the zero band
    :math:`|\\lambda| \\le` ``threshold_rtol`` :math:`\\max|\\lambda|`."""
    values = eigenvalues.double() - shift
    band = threshold_rtol * float(values.abs().max())
    n_negative, n_positive = int((values < -band).sum()), int((values > band).sum())
    n = values.numel()
    return {"n_negative": n_negative, "n_zero": n - n_negative - n_positive, "n_positive": n_positive,
            "index": n_negative / n, "min_ratio": n_positive / n, "min_ratios": ratios(eigenvalues, shift)}


def lecture_point(problem: NetworkProblem, theta: Tensor, config: MinRatioConfig) -> dict[str, Any]:
    """Panel (a): minimise :math:`\\|g\\|` from the end of training, then the exact spectrum there."""
    start = time.perf_counter()
    point, trace = minimise_gradient_norm(problem.objective, theta, config.lecture_steps, config.lecture_lr)
    verdict = analyze(problem.objective, point, exact=True, grad_tol=config.grad_rtol * problem.loss_scale,
                      probe=False)
    return {"grad_norm": verdict.grad_norm, "loss": verdict.loss, **problem.describe(point),
            "grad_norm_trace": trace, "lambda_min": verdict.lambda_min, "lambda_max": verdict.lambda_max,
            "min_ratios": ratios(verdict.eigenvalues),
            "data_min_ratios": ratios(verdict.eigenvalues, problem.weight_decay),
            "kind": verdict.kind, "eigenvalues": verdict.eigenvalues.tolist(), "seconds": time.perf_counter() - start}


def certified_search(problem: NetworkProblem, name: str, step: int, theta: Tensor,
                     config: MinRatioConfig) -> dict[str, Any]:
    """Panel (b): search from ``theta`` and, where it reaches a critical point, its exact verdict."""
    grad_tol = config.grad_rtol * problem.loss_scale
    start_counts = spectrum_counts(
        analyze(problem.objective, theta, exact=True, probe=False).eigenvalues, default_tolerances(torch.float64)[1])
    search = find_critical_point(
        problem.objective, theta, grad_tol=grad_tol, kernel_rtol=config.kernel_rtol,
        loss_mode_index=config.loss_mode_index, gradient_budget=config.gradient_budget,
        descend_after_stall=config.descend_after_stall, quasi_newton_iter=config.quasi_newton_iter,
        max_iter=config.max_iter, stall_window=config.stall_window, stall_factor=config.stall_factor,
    )
    if search.gradient_end is not None:  # the data loss there: the penalty is known in closed form
        end = search.gradient_end
        end["data_loss"] = end["loss"] - 0.5 * problem.weight_decay * end["theta_norm"] ** 2
    t0 = time.perf_counter()
    verdict = analyze(problem.objective, search.theta, exact=True, grad_tol=grad_tol, probe=config.probe)
    rtol = verdict.tolerances.rtol
    described = problem.describe(search.theta)
    return {
        "start": name, "start_step": step, "start_loss": search.start_loss, "start_grad_norm": search.start_grad_norm,
        "start_index": start_counts["index"], "start_data_loss": float(problem.data_loss.loss(theta)),
        "label": search.label, "reason": search.reason, "loss": verdict.loss, **described,
        "collapsed": described["output_spread"] <= config.collapse_tol,
        "grad_norm": verdict.grad_norm, "grad_tol": grad_tol, "kernel_fraction": search.kernel_fraction,
        "hg_ratio": search.hg_ratio, "kind": verdict.kind, "curvature_kind": verdict.curvature_kind,
        "resolved_by": verdict.resolved_by, "verdict_reason": verdict.reason,
        "min_ratio": verdict.min_ratio, "index": verdict.index, "n_negative": verdict.n_negative,
        "n_zero": verdict.n_zero, "n_positive": verdict.n_positive, "lambda_min": verdict.lambda_min,
        "lambda_max": verdict.lambda_max, "zero_threshold": verdict.tolerances.zero_threshold,
        "min_ratios": ratios(verdict.eigenvalues),
        "data_hessian": spectrum_counts(verdict.eigenvalues, rtol, problem.weight_decay),
        "search": search.to_dict(), "eigenvalues": verdict.eigenvalues.tolist(),
        "seconds": {"search": search.seconds, "verdict": time.perf_counter() - t0},
    }


def run_network(config: MinRatioConfig, seed: int, run_id: int) -> dict[str, Any]:
    """Train network ``run_id``, take the lecture's point (panel a) and search for critical points from
    three points of its trajectory (panel b). Returns the run's record (JSON-ready).

    A run that fails with a :class:`~saddlescope.errors.SaddlescopeError` (e.g. a non-finite loss)
    is recorded with label ``"error"`` and the message, so that resuming does not retry it.
    """
    start = time.perf_counter()
    run = network_config(config, seed, run_id)
    record: dict[str, Any] = {"run_id": run_id, "seed": seed, "config": run.to_dict()}
    with one_thread():
        try:
            record.update(_train_and_search(run, config))
            record["label"] = "done"
        except SaddlescopeError as exc:
            record.update({"label": "error", "error": f"{type(exc).__name__}: {exc}"})
    record["seconds"] = {**record.get("seconds", {}), "total": time.perf_counter() - start}
    return record


def _train_and_search(run: NetworkConfig, config: MinRatioConfig) -> dict[str, Any]:
    problem = network_problem(run, config)
    t0 = time.perf_counter()
    trajectory = train(problem, run)
    seconds = {"train": time.perf_counter() - t0}
    final = trajectory.thetas[-1]
    every = max(1, run.train_steps // 100)
    training = {"steps": len(trajectory.losses) - 1, "losses": trajectory.losses[::every],
                "grad_norms": trajectory.grad_norms[::every], "every": every,
                "final_loss": trajectory.losses[-1], "final_grad_norm": trajectory.grad_norms[-1],
                "left_plateau": problem.describe(final)["data_loss"] < 0.9 * problem.loss_scale,
                **{f"final_{k}": v for k, v in problem.describe(final).items()}}
    t0 = time.perf_counter()
    lecture = lecture_point(problem, final, config)
    seconds["lecture"] = time.perf_counter() - t0
    searches = []
    for name, step in trajectory.starts(problem.loss_scale):
        t0 = time.perf_counter()
        searches.append(certified_search(problem, name, step, trajectory.thetas[step], config))
        seconds[f"search_{name}"] = time.perf_counter() - t0
    return {"n_params": problem.objective.n_params, "loss_scale": problem.loss_scale,
            "weight_decay": problem.weight_decay, "training": training, "lecture": lecture, "searches": searches,
            "seconds": seconds}


# ---------------------------------------------------------------------- summary
def search_points(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every search of every record, each with its record's ``run_id`` (a record without ``searches`` is
    taken as one search point itself)."""
    points = []
    for r in records:
        if "searches" in r:
            points.extend({**s, "run_id": r.get("run_id")} for s in r["searches"])
        elif r.get("label") in LABELS:
            points.append(r)
    return points


@dataclass
class LectureSummary:
    """Panel (a) in numbers: the lecture's points (after minimising :math:`\\|g\\|`).

    Attributes:
        points: networks with a lecture point.
        largest_min_ratio, median_min_ratio: by resolution (:data:`DELTAS`, keys ``"0"``, ``"1e-06"``,
            ``"0.0001"``), on :math:`H`; ``largest_data_min_ratio`` on :math:`H - wI`.
        grad_norm_range, median_grad_norm: the :math:`\\|g\\|` they reached.
        critical: how many of them have :math:`\\|g\\|` at most the study's ``grad_tol``, with its interval.
    """

    points: int
    largest_min_ratio: dict[str, float]
    median_min_ratio: dict[str, float]
    largest_data_min_ratio: dict[str, float]
    grad_norm_range: tuple[float, float]
    median_grad_norm: float
    critical: Estimate

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["grad_norm_range"] = list(self.grad_norm_range)
        out["critical"] = self.critical.to_dict()
        return out


@dataclass
class StallSummary:
    r"""Where the searches left Newton-MR on :math:`\tfrac12\|g\|^2` for loss mode (its budget spent, a stall, or
    a tiny index): the points a looser tolerance would have called critical (Frye et al. 2020).

    Attributes:
        points: searches that switched to loss mode after gradient mode had run.
        grad_norm_range: their :math:`\|g\|`; index_range: their index (share of eigenvalues below the zero band).
        spearman: Spearman's rho of data loss and index over them, bootstrap over networks.
    """

    points: int
    grad_norm_range: tuple[float, float]
    index_range: tuple[float, float]
    spearman: Estimate

    def to_dict(self) -> dict[str, Any]:
        return {"points": self.points, "grad_norm_range": list(self.grad_norm_range),
                "index_range": list(self.index_range), "spearman": self.spearman.to_dict()}


def gradient_ends(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The gradient-mode end points of searches that went on in loss mode after at least one gradient step."""
    ends = []
    for p in points:
        end = (p.get("search") or {}).get("gradient_end")
        if end and (p["search"].get("mode_steps") or {}).get("gradient", 0) > 0:
            ends.append({**end, "run_id": p.get("run_id"), "start": p.get("start")})
    return ends


def _stall_summary(points: Sequence[dict[str, Any]], seed: int) -> StallSummary:
    ends = gradient_ends(points)
    by_network: dict[Any, list[dict[str, Any]]] = {}
    for e in ends:
        by_network.setdefault(e["run_id"], []).append(e)

    def rho(groups: list[list[dict[str, Any]]]) -> float:
        flat = [e for g in groups for e in g]
        return rank_correlation([e.get("data_loss", e["loss"]) for e in flat], [e["index"] for e in flat])

    def span(name: str) -> tuple[float, float]:
        values = [e[name] for e in ends]
        return (min(values), max(values)) if values else (math.nan, math.nan)

    return StallSummary(len(ends), span("grad_norm"), span("index"),
                        cluster_bootstrap(list(by_network.values()), rho, what="networks", seed=seed + 2))


@dataclass
class MinRatioSummary:
    """The study's findings in numbers (panel (b) unless it says otherwise).

    Attributes:
        n_runs: networks; n_searches: searches (three per network); errors: networks that failed;
            on_plateau: networks whose training never left the initial plateau (loss above 0.9 times the
            constant predictor's after the extended training).
        labels: searches per label (``"critical"``, ``"gradient_flat"``, ``"not_converged"``).
        fraction_critical: certified searches among all, with a Wilson interval
            (``fraction_critical_ci``).
        collapsed: certified points at the constant predictor (reported apart from everything below).
        kinds: verdicts of the other certified points; fraction_minima: minima among them, with a
            Wilson interval (``fraction_minima_ci``).
        largest_min_ratio, largest_min_ratio_saddle: among certified points (all / not minima).
        loss_levels: distinct data-loss levels among certified points (2% apart,
            :func:`~saddlescope.experiments.statistics.loss_levels`); ``loss_levels_uncollapsed`` without
            the collapsed ones.
        index_fit: least squares ``index = intercept + slope * data loss`` over uncollapsed certified
            points; ``fit_slope``/``fit_intercept`` its numbers, ``slope`` its bootstrap over networks.
        spearman_loss_index: Spearman's rho of data loss and index over uncollapsed certified points
            (bootstrap over networks); pearson_loss_index: Pearson's r, likewise; ``with_collapsed``: rho
            with the collapsed cluster in, for comparison.
        spearman_error_index: rho of error rate and index (uncollapsed).
        minimum_loss_range, saddle_loss_range: data loss of the certified minima / other certified points.
        minima_penalty_only: certified minima whose data-loss Hessian :math:`H - wI` has eigenvalues in
            the zero band or below it (their "minimum" rests on the penalty in those directions).
        lecture: :class:`LectureSummary`.
        stalls: :class:`StallSummary` (where the searches left Newton-MR for loss mode).
        start_labels: labels per start (early/middle/late).
        median_seconds: per network.
    """

    n_runs: int
    n_searches: int
    errors: int
    on_plateau: int
    labels: dict[str, int]
    fraction_critical: float
    fraction_critical_ci: tuple[float, float]
    collapsed: int
    kinds: dict[str, int]
    fraction_minima: float
    fraction_minima_ci: tuple[float, float]
    largest_min_ratio: float
    largest_min_ratio_saddle: float
    loss_levels: int
    loss_levels_uncollapsed: int
    fit_slope: float
    fit_intercept: float
    slope: Estimate
    spearman: Estimate
    pearson_loss_index: float
    spearman_with_collapsed: float
    spearman_error_index: float
    minimum_loss_range: tuple[float, float]
    saddle_loss_range: tuple[float, float]
    minima_penalty_only: int
    lecture: LectureSummary
    stalls: StallSummary
    start_labels: dict[str, dict[str, int]]
    median_seconds: float

    @property
    def spearman_loss_index(self) -> float:
        return self.spearman.value

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for name in ("fraction_critical_ci", "fraction_minima_ci", "minimum_loss_range", "saddle_loss_range"):
            out[name] = list(getattr(self, name))
        out["slope"], out["spearman"] = self.slope.to_dict(), self.spearman.to_dict()
        out["lecture"], out["stalls"] = self.lecture.to_dict(), self.stalls.to_dict()
        out["spearman_loss_index"] = self.spearman_loss_index
        return out


def _lecture_summary(records: Sequence[dict[str, Any]]) -> LectureSummary:
    points = [r["lecture"] | {"grad_tol": r["searches"][0]["grad_tol"]} for r in records
              if "lecture" in r and r.get("searches")]
    keys = [delta_key(d) for d in DELTAS]
    nan = math.nan

    def stat(name: str, reduce: Any) -> dict[str, float]:
        return {k: float(reduce([p[name][k] for p in points])) if points else nan for k in keys}

    norms = [p["grad_norm"] for p in points]
    critical = sum(p["grad_norm"] <= p["grad_tol"] for p in points)
    return LectureSummary(
        points=len(points), largest_min_ratio=stat("min_ratios", max), median_min_ratio=stat("min_ratios", np.median),
        largest_data_min_ratio=stat("data_min_ratios", max),
        grad_norm_range=(min(norms), max(norms)) if norms else (nan, nan),
        median_grad_norm=float(np.median(norms)) if norms else nan, critical=Estimate.fraction(critical, len(points)),
    )


def _index_statistics(certified: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    """The index-loss fit and rank correlations over uncollapsed certified points, with bootstraps over
    networks (a network's points are not independent)."""
    by_network: dict[Any, list[dict[str, Any]]] = {}
    for p in certified:
        by_network.setdefault(p.get("run_id"), []).append(p)
    clusters = list(by_network.values())

    def flat(groups: list[list[dict[str, Any]]]) -> tuple[list[float], list[float]]:
        points = [p for g in groups for p in g]
        return [p["data_loss"] for p in points], [p["index"] for p in points]

    loss, index = flat(clusters)
    slope, intercept = linear_fit(loss, index)
    return {
        "fit_slope": slope, "fit_intercept": intercept,
        "slope": cluster_bootstrap(clusters, lambda g: linear_fit(*flat(g))[0], what="networks", seed=seed),
        "spearman": cluster_bootstrap(clusters, lambda g: rank_correlation(*flat(g)), what="networks", seed=seed + 1),
        "pearson_loss_index": pearson(loss, index),
        "spearman_error_index": rank_correlation([p["error_rate"] for p in certified], index),
    }


def summarize(records: Sequence[dict[str, Any]], seed: int = 0) -> MinRatioSummary:
    """The findings over finished records (see :class:`MinRatioSummary`); ``seed`` seeds the bootstraps."""
    points = search_points(records)
    labels = {label: 0 for label in LABELS}
    start_labels: dict[str, dict[str, int]] = {}
    for p in points:
        labels[p["label"]] = labels.get(p["label"], 0) + 1
        if "start" in p:
            per = start_labels.setdefault(p["start"], {label: 0 for label in LABELS})
            per[p["label"]] += 1
    certified = [{"data_loss": p.get("loss", math.nan), "error_rate": math.nan, **p}
                 for p in points if p["label"] == "critical"]
    collapsed = [p for p in certified if p.get("collapsed")]
    rest = [p for p in certified if not p.get("collapsed")]
    kinds: dict[str, int] = {}
    for p in rest:
        kinds[p["kind"]] = kinds.get(p["kind"], 0) + 1
    minima = [p for p in rest if p["kind"] == "minimum"]
    others = [p for p in rest if p["kind"] != "minimum"]
    nan = math.nan

    def span(rows: list[dict[str, Any]]) -> tuple[float, float]:
        values = [r["data_loss"] for r in rows]
        return (min(values), max(values)) if values else (nan, nan)

    seconds = [r["seconds"]["total"] for r in records if "seconds" in r and "total" in r["seconds"]]
    critical_share = Estimate.fraction(len(certified), len(points))
    minima_share = Estimate.fraction(len(minima), len(rest))
    every = [p["index"] for p in certified]
    return MinRatioSummary(
        n_runs=len(records), n_searches=len(points), errors=sum(r.get("label") == "error" for r in records),
        on_plateau=sum(not r["training"]["left_plateau"] for r in records if "training" in r),
        labels=labels, fraction_critical=critical_share.value,
        fraction_critical_ci=(critical_share.low, critical_share.high), collapsed=len(collapsed),
        kinds=dict(sorted(kinds.items())), fraction_minima=minima_share.value,
        fraction_minima_ci=(minima_share.low, minima_share.high),
        largest_min_ratio=max((p["min_ratio"] for p in certified), default=nan),
        largest_min_ratio_saddle=max((p["min_ratio"] for p in certified if p["kind"] != "minimum"), default=nan),
        loss_levels=loss_levels([p["data_loss"] for p in certified]),
        loss_levels_uncollapsed=loss_levels([p["data_loss"] for p in rest]),
        **_index_statistics(rest, seed),
        spearman_with_collapsed=rank_correlation([p["data_loss"] for p in certified], every),
        minimum_loss_range=span(minima), saddle_loss_range=span(others),
        minima_penalty_only=sum(1 for p in minima if "data_hessian" in p
                                and p["data_hessian"]["n_negative"] + p["data_hessian"]["n_zero"] > 0),
        lecture=_lecture_summary(records), stalls=_stall_summary(points, seed), start_labels=start_labels,
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
            "study": "min_ratio", "out": str(self.out), "n_networks": self.n_networks, "seed": self.seed,
            "workers": self.workers, "config": self.config.to_dict(), "summary": self.summary.to_dict(),
            "computed": len(self.computed), "skipped": len(self.skipped), "seconds": self.seconds,
        }
        if records:
            out["records"] = self.records
        return out


def _study_key(config: MinRatioConfig, seed: int) -> dict[str, Any]:
    return {"study": "min_ratio", "version": 2, "seed": seed, "config": config.to_dict()}


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
        progress: show progress on stderr (a bar on a terminal, timed lines elsewhere).

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
                               title="min-ratio study", labels=_tally)
    records = store.load(wanted)
    study = MinRatioStudy(
        out=Path(out), n_networks=n_networks, seed=seed, config=config, records=records,
        summary=summarize(records, seed), computed=todo, skipped=done, seconds=time.perf_counter() - start,
        workers=workers,
    )
    atomic_write_json(Path(out) / "summary.json", study.to_dict())
    return study


def _tally(record: dict[str, Any]) -> dict[str, int]:
    """What the progress line counts for a finished network: its searches' labels (or its error)."""
    if record.get("label") == "error":
        return {"error": 1}
    counts: dict[str, int] = {}
    for s in record.get("searches", []):
        counts[s["label"]] = counts.get(s["label"], 0) + 1
    return counts


def _compute(config: MinRatioConfig, seed: int, todo: list[int], workers: int) -> Iterator[dict[str, Any]]:
    """Finished records in completion order, computed by spawned worker processes (or here, for 0)."""
    return imap_tasks(_worker_run, [(config, seed, run_id) for run_id in todo], workers)


def _worker_run(task: tuple[MinRatioConfig, int, int]) -> dict[str, Any]:
    config, seed, run_id = task
    return run_network(config, seed, run_id)
