r"""The saddle-prevalence study: how the chance that a critical point is a minimum falls with dimension.

For a critical point of a function on :math:`\mathbb{R}^n` to be a minimum, all :math:`n` Hessian
eigenvalues must be positive. If each sign were a fair coin, the chance would be :math:`2^{-n}` (the
*naive* curve). Random-matrix theory says more: eigenvalues of a random Hessian repel each other, so
a positive-definite Hessian is a large deviation and minima are rarer still
(Bray & Dean 2007, "Statistics of critical points of Gaussian fields on large-dimensional spaces",
PRL 98, 150201; Fyodorov 2004, PRL 92, 240601; Fyodorov & Williams 2007, J. Stat. Phys. 129, 1081;
Dauphin et al. 2014 drew the consequence for deep learning). This study measures the fraction of
minima among critical points found numerically, for four families of random functions of a flat
:math:`\theta \in \mathbb{R}^n`, each an :class:`~saddlescope.objective.Objective` built with
:meth:`~saddlescope.objective.Objective.from_function` so that every Hessian is our engine's exact one.

Families (``PrevalenceConfig.families``):

* ``"grf"`` --- a confined Gaussian random field (the model of Fyodorov 2004, Bray & Dean 2007,
  Fyodorov & Williams 2007):

  .. math::

      f(x) = \tfrac{\mu}{2}\|x\|^2 + V(x), \qquad
      V(x) = \frac{\sigma}{\sqrt{M}} \sum_{m=1}^{M} \big(a_m \cos(w_m\!\cdot x) + c_m \sin(w_m\!\cdot x)\big),

  with :math:`a_m, c_m \sim N(0, 1)` and :math:`w_m \sim N(0, I/\ell^2)` (random Fourier features,
  Rahimi & Recht 2007). Given the :math:`w_m`, :math:`V` is exactly Gaussian and stationary; averaged
  over them its covariance is :math:`\sigma^2 e^{-\|x-y\|^2 / (2\ell^2)}`, an isotropic field. Its
  derivatives at one point have (differentiate the covariance at 0)

  .. math::

      \mathrm{Cov}(\partial_i V, \partial_j V) = \tfrac{\sigma^2}{\ell^2}\delta_{ij}, \quad
      \mathrm{Cov}(\partial_i V, \partial_{jk} V) = 0, \quad
      \mathrm{Cov}(\partial_{ij} V, \partial_{kl} V) = s^2(\delta_{ij}\delta_{kl} + \delta_{ik}\delta_{jl}
      + \delta_{il}\delta_{jk}), \ s = \sigma/\ell^2,

  which is the general isotropic form :math:`4\rho''(0)(\cdots)` for a covariance
  :math:`\rho(\|x-y\|^2)` (Cheng & Schwartzman 2018, Bernoulli 24, 3422, Lemma 3.2). So the Hessian
  of :math:`V` is :math:`s(G + \xi I)` with :math:`G` a GOE matrix (:math:`G_{ii} \sim N(0,2)`,
  :math:`G_{ij} \sim N(0,1)`) and an independent :math:`\xi \sim N(0,1)`, and it is independent of
  the gradient. We use the scaling of Fyodorov (2004), :math:`\sigma = \ell = \sqrt{n}`, under which
  :math:`s = 1/\sqrt n`, the spectrum of :math:`sG` fills :math:`[-R, R]` with :math:`R = 2` for every
  :math:`n`, and :math:`\mu` is set as a fraction ``grf_edge_ratio`` of :math:`R`. Fyodorov's
  transition (one minimum above, exponentially many critical points below) is at :math:`\mu = R/2`.

* ``"polynomial"`` --- :math:`f(x) = b\cdot x + \tfrac12 x^\top A x + \tfrac16 T[x,x,x] + \tfrac14\|x\|^4`
  with independent :math:`N(0, 1/n)` entries of :math:`b` and :math:`T` and :math:`N(0, 9/n)` entries
  of :math:`A` (only the symmetric parts matter, which are orthogonally invariant); the quartic
  confines the critical points to :math:`\|x\| = O(1)`. Starts: :math:`N(0, (1.5^2/n) I)`.

* ``"network"`` --- the training loss of a teacher--student tanh network
  :math:`y = \sum_{j\le h} v_j \tanh(w_j\cdot x)`, :math:`x \in \mathbb{R}^d`, no biases, with
  :math:`n = h(d+1)` parameters (:func:`network_shape`), mean squared error on
  ``max(8, 2n)`` Gaussian inputs labelled by a random teacher of the same shape, plus
  :math:`\tfrac{w}{2}\|\theta\|^2` (``net_weight_decay``) so that no critical point escapes to
  infinity. :math:`n = 1` has no such network and is skipped.

* ``"double_well"`` --- :math:`f(x) = \sum_i ((Qx)_i^2 - 1)^2`, whose :math:`3^n` critical points are
  known in closed form (:math:`Qx \in \{-1, 0, 1\}^n`; curvature 8 at :math:`\pm1`, :math:`-4` at 0, so
  :math:`\binom{n}{k}2^{n-k}` have index :math:`k` and a share :math:`(2/3)^n` are minima). Instance 0
  has :math:`Q = I` (separable); instance :math:`i \ge 1` a random rotation :math:`Q`, so that the
  instances are distinct functions with the same closed-form answer. The check of the method.

Each (family, :math:`n`, instance) is one *run*: a function drawn from
``numpy.random.default_rng([seed, family code, n, instance])``, ``starts`` random starts, each driven
to a critical point by :func:`~saddlescope.experiments.critical_search.find_critical_point`
(damped Newton-MR on :math:`\tfrac12\|g\|^2` with exact Hessians; trust-region Newton steps on
:math:`f` where no eigenvalue is resolvably negative). Minimising :math:`\|g\|^2`
stalls at its own non-critical local minima (where :math:`Hg = 0 \ne g`), which in high dimension
are the majority (Doye & Wales 2002, J. Chem. Phys. 116, 3777; Frye et al. 2020); a search that ends
so is restarted ``kicks`` times from its end point plus a Gaussian kick of ``kick_scale`` times the
start scale. Points found several times are merged (distance at most ``dedup_tol``
:math:`\cdot (1 + \|\theta\|)`); each distinct point is classified from its exact spectrum
(an eigenvalue is zero when :math:`|\lambda| \le` ``rtol`` :math:`\max|\lambda|`, rtol = 1e-9): a
minimum has every eigenvalue positive; the index is the number of negative eigenvalues over
:math:`n`. Searches labelled ``gradient_flat`` or ``not_converged`` are counted and reported but are
not critical points and stay out of the fraction.

**The theory curve** (:func:`grf_minimum_fraction`). By the Kac--Rice formula, with the gradient
independent of the Hessian and :math:`\int p_{\nabla V}(-\mu x)\,dx = \mu^{-n}`,

.. math::

    \mathbb{E} N_{\rm crit} = \frac{\mathbb{E}|\det(\mu I + H)|}{\mu^n}, \qquad
    \mathbb{E} N_{\rm min} = \frac{\mathbb{E}[\det(\mu I + H)\,1\{\mu I + H \succ 0\}]}{\mu^n}, \qquad
    \text{fraction} = \frac{\mathbb{E} N_{\rm min}}{\mathbb{E} N_{\rm crit}},

a ratio of expectations over :math:`H = s(G + \xi I)` only. It is evaluated by Monte Carlo over
:math:`G` with the one-dimensional integral over :math:`\xi` done by quadrature for each sample
(conditioning on :math:`G`; far lower variance at large :math:`n`, where minima need a large
:math:`\xi`); the standard error is the delta-method error of the ratio. **Caveat**: Kac--Rice counts
every critical point once; random starts sample them with the weight of their basins of attraction
under the search, and a search finds only a few of the :math:`\mathbb{E}N_{\rm crit}` points when
that number is large. The two fractions answer different questions and are compared, not equated.

Runs are independent and reproducible (one thread each, seeded by ``(seed, family, n, instance)``),
each finished run one JSON file written atomically by
:class:`~saddlescope.experiments.records.RecordStore`; resuming skips finished runs, and a larger
grid (more families, dimensions or instances) extends a study, since a run's id and numbers do not
depend on the grid.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saddlescope.curvature.exact import exact_spectrum
from saddlescope.display import prevalence_study_html
from saddlescope.errors import InvalidInputError, SaddlescopeError
from saddlescope.experiments.critical_search import find_critical_point
from saddlescope.experiments.records import RecordStore, atomic_write_json, json_restore, json_safe
from saddlescope.experiments.statistics import (
    cluster_bootstrap,
    linear_fit,
    pearson,
    rank_correlation,
    wilson_interval,
)
from saddlescope.experiments.workers import complete_runs, imap_tasks, one_thread
from saddlescope.objective import Objective
from saddlescope.tolerances import default_tolerances

__all__ = ["FAMILIES", "ConfinedGaussianField", "GrfTheory", "IndexLossFit", "PrevalenceConfig", "PrevalenceRow",
           "PrevalenceStudy", "RandomFunction", "double_well_fraction", "grf_minimum_fraction", "index_loss_fit",
           "make_function", "network_shape", "prevalence_study", "run_instance", "summarize_prevalence",
           "wilson_interval"]

FAMILIES = ("grf", "polynomial", "network", "double_well")
_FAMILY_CODE = {"grf": 1, "polynomial": 2, "network": 3, "double_well": 4}
MAX_DIM = 200  # the exact Hessian is formed at every search step
MAX_INSTANCES = 1000  # run ids encode (family, n, instance) in decimal fields
# A bootstrap over two functions has three distinct resamples: too few for an interval.
MIN_BOOTSTRAP_FUNCTIONS = 3


# ---------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class PrevalenceConfig:
    """Everything the study depends on.

    The grid (``families``, ``dims``, ``instances``) picks which runs exist; the rest is what a run
    computes and is checked on resume (see :func:`prevalence_study`).

    Attributes:
        families: from :data:`FAMILIES`.
        dims: dimensions :math:`n` (parameters of the function); the network family skips 1.
        instances: random functions per family and dimension.
        starts: random starts per function.
        kicks: restarts of a search that ended without a critical point, each from its end point
            plus a Gaussian kick of ``kick_scale`` times the family's start scale.
        grad_tol: "critical" when :math:`\\|g\\| \\le` this (tight, so that duplicates merge).
        max_iter: Hessians per search (per kick).
        dedup_tol: two critical points are one when their distance is at most
            ``dedup_tol * (1 + |theta|)``.
        grf_edge_ratio: :math:`\\mu / R` for the GRF family (:math:`R` = 2, the edge of the field's
            Hessian spectrum; Fyodorov's transition at 0.5).
        grf_features: random Fourier features :math:`M` of the GRF.
        net_weight_decay: :math:`w` of the network family's penalty.
        theory_samples: Monte Carlo samples of :math:`G` per dimension for the GRF curve.
    """

    families: tuple[str, ...] = ("grf", "polynomial", "network")
    dims: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24)
    instances: int = 3
    starts: int = 16
    kicks: int = 6
    kick_scale: float = 0.3
    grad_tol: float = 1e-9
    max_iter: int = 40
    dedup_tol: float = 1e-5
    grf_edge_ratio: float = 0.3
    grf_features: int = 2048
    net_weight_decay: float = 1e-2
    theory_samples: int = 4000

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> InvalidInputError:
            return InvalidInputError(f"PrevalenceConfig.{name} {why}, got {getattr(self, name)!r}")

        def integer(x: Any, low: int) -> bool:
            return isinstance(x, int) and not isinstance(x, bool) and x >= low

        families = self.families
        if isinstance(families, str) or not isinstance(families, (list, tuple)) or not families \
                or any(f not in FAMILIES for f in families) or len(set(families)) != len(families):
            raise bad("families", f"must be distinct names from {FAMILIES}")
        object.__setattr__(self, "families", tuple(families))
        dims = self.dims
        if not isinstance(dims, (list, tuple)) or not dims or not all(integer(n, 1) and n <= MAX_DIM for n in dims):
            raise bad("dims", f"must be a non-empty list of integers in [1, {MAX_DIM}]")
        object.__setattr__(self, "dims", tuple(sorted(set(dims))))
        if not (integer(self.instances, 1) and self.instances <= MAX_INSTANCES):
            raise bad("instances", f"must be an integer in [1, {MAX_INSTANCES}]")
        for name, low in (("starts", 1), ("kicks", 0), ("max_iter", 1), ("grf_features", 1),
                          ("theory_samples", 2)):
            if not integer(getattr(self, name), low):
                raise bad(name, f"must be an integer >= {low}")
        for name in ("kick_scale", "grad_tol", "dedup_tol", "grf_edge_ratio", "net_weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise bad(name, "must be a finite number >= 0")
        for name in ("grad_tol", "dedup_tol", "grf_edge_ratio"):
            if getattr(self, name) <= 0:
                raise bad(name, "must be positive")

    def search_key(self) -> dict[str, Any]:
        """What a run computes (checked on resume); the grid is left out so that it can grow."""
        grid = {"families", "dims", "instances"}
        return {k: v for k, v in asdict(self).items() if k not in grid}

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrevalenceConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInputError(f"unknown PrevalenceConfig fields {unknown}; known: {sorted(known)}")
        data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**data)


# ---------------------------------------------------------------------- the random functions
@dataclass
class RandomFunction:
    """One function of the study: ``f`` of a flat float64 tensor, and how starts are drawn.

    Attributes:
        family, n: what it is; ``describe``: its parameters (JSON-ready).
        f: the function; ``start_scale``: starts are :math:`N(0, \\text{start\\_scale}^2 I)`, or
            uniform on :math:`[-\\text{start\\_scale}, \\text{start\\_scale}]^n` if ``uniform_starts``
            (rotated by ``start_rotation`` transposed, where given).
    """

    family: str
    n: int
    f: Callable[[Tensor], Tensor]
    start_scale: float
    describe: dict[str, Any]
    uniform_starts: bool = False
    start_rotation: Tensor | None = None

    def objective(self) -> Objective:
        return Objective.from_function(self.f, torch.zeros(self.n, dtype=torch.float64))

    def start(self, generator: torch.Generator) -> Tensor:
        if self.uniform_starts:
            u = self.start_scale * (2 * torch.rand(self.n, generator=generator, dtype=torch.float64) - 1)
            return u if self.start_rotation is None else self.start_rotation.T @ u
        return self.start_scale * torch.randn(self.n, generator=generator, dtype=torch.float64)


class ConfinedGaussianField:
    """:math:`f(x) = \\tfrac{\\mu}{2}\\|x\\|^2 + V(x)` with :math:`V` random Fourier features (module
    docstring), :math:`\\sigma = \\ell = \\sqrt n` and :math:`\\mu` = ``edge_ratio`` :math:`\\cdot 2`.

    Args:
        n: dimension. edge_ratio: :math:`\\mu / R`. features: :math:`M`.
        generator: the torch generator the field is drawn from.
    """

    def __init__(self, n: int, edge_ratio: float, features: int, generator: torch.Generator) -> None:
        self.n, self.features = n, features
        self.sigma = self.length = math.sqrt(n)
        self.edge = 2.0 * self.sigma / self.length**2 * math.sqrt(n)  # R = 2 s sqrt(n) = 2
        self.mu = edge_ratio * self.edge
        self.frequencies = torch.randn(features, n, generator=generator, dtype=torch.float64) / self.length
        self.cos_weights = torch.randn(features, generator=generator, dtype=torch.float64)
        self.sin_weights = torch.randn(features, generator=generator, dtype=torch.float64)

    @property
    def hessian_scale(self) -> float:
        """:math:`s = \\sigma/\\ell^2`: the Hessian of :math:`V` is :math:`s(G + \\xi I)`."""
        return self.sigma / self.length**2

    def potential(self, x: Tensor) -> Tensor:
        phase = self.frequencies @ x
        weighted = self.cos_weights @ torch.cos(phase) + self.sin_weights @ torch.sin(phase)
        return self.sigma / math.sqrt(self.features) * weighted

    def __call__(self, x: Tensor) -> Tensor:
        return 0.5 * self.mu * (x @ x) + self.potential(x)


def network_shape(n: int) -> tuple[int, int]:
    """``(hidden, inputs)`` of the network family's two-layer net with ``n = hidden * (inputs + 1)``
    parameters: the factorisation with ``inputs + 1`` the divisor of ``n`` (at least 2) closest to
    :math:`\\sqrt n` (a prime ``n`` gives one unit with ``n - 1`` inputs).

    Raises:
        saddlescope.errors.InvalidInputError: ``n < 2``.
    """
    if not isinstance(n, int) or n < 2:
        raise InvalidInputError(f"the network family needs n >= 2 parameters, got {n!r}")
    divisors = [k for k in range(2, n + 1) if n % k == 0]
    width = min(divisors, key=lambda k: (abs(k - math.sqrt(n)), k))
    return n // width, width - 1


def _polynomial(n: int, generator: torch.Generator) -> RandomFunction:
    scale = 1.0 / math.sqrt(n)
    b = scale * torch.randn(n, generator=generator, dtype=torch.float64)
    # A three times larger than b and T: its spectrum (about +-3 sqrt 2) beats the quartic's
    # curvature near |x| = 1, which gives many saddles (with the same scale, most starts end at one
    # minimum).
    a = 3 * scale * torch.randn(n, n, generator=generator, dtype=torch.float64)
    t = scale * torch.randn(n, n, n, generator=generator, dtype=torch.float64)

    def polynomial(x: Tensor) -> Tensor:
        cubic = torch.einsum("ijk,i,j,k->", t, x, x, x)
        squared = x @ x
        return b @ x + 0.5 * (x @ (a @ x)) + cubic / 6 + 0.25 * squared * squared

    return RandomFunction("polynomial", n, polynomial, 1.5 / math.sqrt(n),
                          {"form": "b.x + x'Ax/2 + T[x,x,x]/6 + |x|^4/4", "entry_std": {"b": scale, "A": 3 * scale, "T": scale}})


def _network(n: int, generator: torch.Generator, weight_decay: float) -> RandomFunction:
    hidden, inputs = network_shape(n)
    samples = max(8, 2 * n)
    x = torch.randn(samples, inputs, generator=generator, dtype=torch.float64)
    teacher_w = torch.randn(hidden, inputs, generator=generator, dtype=torch.float64) / math.sqrt(inputs)
    teacher_v = torch.randn(hidden, generator=generator, dtype=torch.float64) / math.sqrt(hidden)
    targets = torch.tanh(x @ teacher_w.T) @ teacher_v

    def network_loss(theta: Tensor) -> Tensor:
        w = theta[: hidden * inputs].reshape(hidden, inputs)
        v = theta[hidden * inputs:]
        residual = torch.tanh(x @ w.T) @ v - targets
        return 0.5 * (residual * residual).mean() + 0.5 * weight_decay * (theta @ theta)

    return RandomFunction("network", n, network_loss, 1.0,
                          {"hidden": hidden, "inputs": inputs, "samples": samples, "weight_decay": weight_decay,
                           "loss": "mean (y - teacher)^2 / 2 + w/2 |theta|^2"})


def _double_well(n: int, generator: torch.Generator | None) -> RandomFunction:
    """The double well; rotated by a random orthogonal :math:`Q` (Haar: QR of a Gaussian matrix with the
    signs of R's diagonal) unless ``generator`` is None. Starts are uniform on the cube in the rotated
    coordinates, so every instance sees the same search problem up to the rotation."""
    if generator is None:
        def double_well(x: Tensor) -> Tensor:
            return ((x * x - 1) ** 2).sum()

        return RandomFunction("double_well", n, double_well, 1.5, {"form": "sum_i (x_i^2 - 1)^2", "rotated": False},
                              uniform_starts=True)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    rotation = q * torch.sign(torch.diagonal(r))

    def rotated_double_well(x: Tensor) -> Tensor:
        y = rotation @ x
        return ((y * y - 1) ** 2).sum()

    return RandomFunction("double_well", n, rotated_double_well, 1.5,
                          {"form": "sum_i ((Q x)_i^2 - 1)^2", "rotated": True, "rotation": rotation.tolist()},
                          uniform_starts=True, start_rotation=rotation)


def make_function(family: str, n: int, seed: int, instance: int, config: PrevalenceConfig) -> RandomFunction:
    """Function ``instance`` of ``family`` in dimension ``n``: a pure function of its arguments.

    Raises:
        saddlescope.errors.InvalidInputError: an unknown family, or ``n`` it does not have.
    """
    if family not in FAMILIES:
        raise InvalidInputError(f"unknown family {family!r}; choose from {FAMILIES}")
    rng = np.random.default_rng([seed, _FAMILY_CODE[family], n, instance])
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    if family == "grf":
        field_ = ConfinedGaussianField(n, config.grf_edge_ratio, config.grf_features, generator)
        return RandomFunction("grf", n, field_, 1.0 / field_.mu,
                              {"mu": field_.mu, "sigma": field_.sigma, "length": field_.length,
                               "features": config.grf_features, "edge_ratio": config.grf_edge_ratio})
    if family == "polynomial":
        return _polynomial(n, generator)
    if family == "network":
        return _network(n, generator, config.net_weight_decay)
    return _double_well(n, generator if instance > 0 else None)


def double_well_fraction(n: int) -> float:
    """The closed-form share of minima among the :math:`3^n` critical points of the double well: :math:`(2/3)^n`."""
    return (2.0 / 3.0) ** n


def has_dimension(family: str, n: int) -> bool:
    return not (family == "network" and n < 2)


# ---------------------------------------------------------------------- one run
def run_id_of(family: str, n: int, instance: int) -> int:
    """A run's id, independent of the grid: ``family code * 10^6 + n * 10^3 + instance``."""
    return _FAMILY_CODE[family] * 1_000_000 + n * 1_000 + instance


def _classify(objective: Objective, theta: Tensor) -> dict[str, Any]:
    values = exact_spectrum(objective, theta, vectors=False).eigenvalues.double()
    rtol = default_tolerances(torch.float64)[1]
    zero = rtol * float(values.abs().max())
    n_negative, n_positive = int((values < -zero).sum()), int((values > zero).sum())
    n_zero = values.numel() - n_negative - n_positive
    kind = ("degenerate" if n_zero else "minimum" if n_negative == 0
            else "maximum" if n_positive == 0 else "saddle")
    return {"kind": kind, "n_negative": n_negative, "n_zero": n_zero, "n_positive": n_positive,
            "index": n_negative / values.numel(), "lambda_min": float(values[0]),
            "lambda_max": float(values[-1]), "zero_threshold": zero}


def _search(objective: Objective, function: RandomFunction, start: Tensor, config: PrevalenceConfig,
            generator: torch.Generator) -> tuple[Any, int]:
    """Search from ``start``; restart from a kicked end point while no critical point is found."""
    theta = start
    for attempt in range(config.kicks + 1):
        result = find_critical_point(objective, theta, grad_tol=config.grad_tol, max_iter=config.max_iter)
        if result.label == "critical" or attempt == config.kicks:
            return result, attempt
        kick = torch.randn(function.n, generator=generator, dtype=torch.float64)
        theta = result.theta + config.kick_scale * function.start_scale * kick
    raise AssertionError("unreachable")


def run_instance(config: PrevalenceConfig, seed: int, family: str, n: int, instance: int) -> dict[str, Any]:
    """Search for critical points of one function from ``config.starts`` starts, merge duplicates,
    classify each distinct point by its exact spectrum. Returns the run's record (JSON-ready).

    A start whose search fails with a :class:`~saddlescope.errors.SaddlescopeError` is recorded with
    label ``"error"``.
    """
    start_time = time.perf_counter()
    function = make_function(family, n, seed, instance, config)
    rng = np.random.default_rng([seed, _FAMILY_CODE[family], n, instance, 1])
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    points: list[dict[str, Any]] = []
    thetas: list[Tensor] = []
    starts: list[dict[str, Any]] = []
    with one_thread():
        objective = function.objective()
        for _ in range(config.starts):
            start = function.start(generator)
            try:
                result, kicks = _search(objective, function, start, config, generator)
            except SaddlescopeError as exc:
                starts.append({"label": "error", "error": f"{type(exc).__name__}: {exc}"})
                continue
            outcome = {"label": result.label, "kicks": kicks, "grad_norm": result.grad_norm,
                       "loss": result.loss, "iterations": result.iterations, "point": None}
            if result.label == "critical":
                outcome["point"] = _merge(objective, result, thetas, points, config.dedup_tol)
            starts.append(outcome)
    labels: dict[str, int] = {}
    for s in starts:
        labels[s["label"]] = labels.get(s["label"], 0) + 1
    return {"family": family, "n": n, "instance": instance, "seed": seed, "function": function.describe,
            "labels": labels, "starts": starts, "points": points, "seconds": time.perf_counter() - start_time}


def _merge(objective: Objective, result: Any, thetas: list[Tensor], points: list[dict[str, Any]],
           dedup_tol: float) -> int:
    """The index of ``result``'s point among ``points``, appending it if it is new."""
    theta = result.theta
    for i, other in enumerate(thetas):
        if float((theta - other).norm()) <= dedup_tol * (1.0 + max(float(theta.norm()), float(other.norm()))):
            points[i]["hits"] += 1
            return i
    thetas.append(theta)
    points.append({"theta": theta.tolist(), "loss": result.loss, "grad_norm": result.grad_norm, "hits": 1,
                   **_classify(objective, theta)})
    return len(points) - 1


# ---------------------------------------------------------------------- the theory curve
@dataclass
class GrfTheory:
    """The Kac--Rice prediction for the confined GRF in dimension ``n`` (module docstring).

    Attributes:
        fraction: :math:`\\mathbb{E}N_{\\min} / \\mathbb{E}N_{\\rm crit}`; ``stderr`` its Monte Carlo
            standard error (delta method over ``samples`` draws of :math:`G`).
        expected_critical, expected_minima: :math:`\\mathbb{E}N_{\\rm crit}`, :math:`\\mathbb{E}N_{\\min}`.
        shift: :math:`m = \\mu/s`, the confinement in units of the Hessian scale.
    """

    n: int
    edge_ratio: float
    shift: float
    fraction: float
    stderr: float
    expected_critical: float
    expected_minima: float
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def goe(n: int, count: int, generator: torch.Generator) -> Tensor:
    """``count`` GOE matrices: :math:`G_{ii} \\sim N(0, 2)`, :math:`G_{ij} = G_{ji} \\sim N(0, 1)`."""
    raw = torch.randn(count, n, n, generator=generator, dtype=torch.float64)
    return (raw + raw.transpose(1, 2)) / math.sqrt(2.0)


def grf_minimum_fraction(n: int, edge_ratio: float, *, samples: int = 4000, seed: int = 0,
                         step: float = 0.04) -> GrfTheory:
    """Kac--Rice fraction of minima of :math:`\\tfrac{\\mu}{2}\\|x\\|^2 + V(x)` for an isotropic
    Gaussian :math:`V` whose Hessian is :math:`s(G + \\xi I)`, at :math:`m = \\mu/s = 2\\,` ``edge_ratio``
    :math:`\\sqrt n`:

    .. math::

        \\text{fraction} = \\frac{\\mathbb{E}_G \\int \\prod_i (m + \\xi + \\lambda_i(G))\\,
        1\\{m + \\xi + \\lambda_{\\min}(G) > 0\\}\\,\\phi(\\xi)\\,d\\xi}
        {\\mathbb{E}_G \\int \\prod_i |m + \\xi + \\lambda_i(G)|\\,\\phi(\\xi)\\,d\\xi},

    the :math:`\\xi` integrals by the trapezoid rule (``step``) on
    :math:`[-(m + 2\\sqrt n + 12), m + 2\\sqrt n + 12]`, computed in logarithms. The expected counts
    are :math:`\\mathbb{E}|\\det(mI + G + \\xi I)| / m^n` and likewise for minima.

    Raises:
        saddlescope.errors.InvalidInputError: a bad argument.
    """
    if not (isinstance(n, int) and 1 <= n <= MAX_DIM):
        raise InvalidInputError(f"n must be an integer in [1, {MAX_DIM}], got {n!r}")
    if not (isinstance(edge_ratio, (int, float)) and math.isfinite(edge_ratio) and edge_ratio > 0):
        raise InvalidInputError(f"edge_ratio must be a positive number, got {edge_ratio!r}")
    if not (isinstance(samples, int) and samples >= 2):
        raise InvalidInputError(f"samples must be an integer >= 2, got {samples!r}")
    shift = 2.0 * edge_ratio * math.sqrt(n)
    half_width = shift + 2.0 * math.sqrt(n) + 12.0
    xi = torch.arange(-half_width, half_width + step / 2, step, dtype=torch.float64)
    log_weight = -0.5 * xi**2 - 0.5 * math.log(2 * math.pi) + math.log(step)
    log_weight[0] -= math.log(2.0)  # trapezoid end points
    log_weight[-1] -= math.log(2.0)
    generator = torch.Generator().manual_seed(seed)
    chunk = max(1, 4_000_000 // (xi.numel() * n))  # about 32 MB of factors at a time
    log_all, log_min = [], []
    for begin in range(0, samples, chunk):
        eigenvalues = torch.linalg.eigvalsh(goe(n, min(chunk, samples - begin), generator))
        shifted = shift + eigenvalues  # (count, n)
        factors = (shifted[:, None, :] + xi[None, :, None]).abs().clamp_min(1e-300)
        log_det = factors.log().sum(-1) + log_weight  # (count, grid)
        positive = xi[None, :] > -shifted[:, :1]  # m + xi + lambda_min > 0
        log_all.append(torch.logsumexp(log_det, 1))
        log_min.append(torch.logsumexp(log_det.masked_fill(~positive, -math.inf), 1))
    log_b, log_a = torch.cat(log_all), torch.cat(log_min)
    log_mean_b = float(torch.logsumexp(log_b, 0)) - math.log(samples)
    a, b = torch.exp(log_a - log_mean_b), torch.exp(log_b - log_mean_b)  # mean(b) = 1
    fraction = float(a.mean())
    stderr = float((a - fraction * b).std() / math.sqrt(samples))
    log_count = log_mean_b - n * math.log(shift)
    return GrfTheory(n=n, edge_ratio=float(edge_ratio), shift=shift, fraction=fraction, stderr=stderr,
                     expected_critical=math.exp(log_count), expected_minima=fraction * math.exp(log_count),
                     samples=samples)


# ---------------------------------------------------------------------- summary
@dataclass
class PrevalenceRow:
    """One family at one dimension, pooled over its instances (functions).

    Attributes:
        starts, labels: searches and their labels (critical / gradient_flat / not_converged / error).
        distinct: distinct critical points (merged within each function, summed over functions);
            ``kinds``: them by kind; ``minima`` = ``kinds["minimum"]``.
        fraction_minima: ``minima / distinct``. ``fraction_ci``: its 95% interval from a bootstrap over
            the functions (the pooled fraction of each resample; NaN with fewer than three), ``ci_method``
            how it was made; ``wilson_ci``: the Wilson interval that treats every point as independent
            (too short when a function's points are alike).
        start_fraction_minima: the share of critical searches that ended at a minimum (basin-weighted).
        naive: :math:`2^{-n}`. theory: the GRF's :class:`GrfTheory` (GRF rows only). closed_form: the
            double well's :math:`(2/3)^n` (double-well rows only).
        mean_index: mean index over distinct points.
    """

    family: str
    n: int
    instances: int
    starts: int
    labels: dict[str, int]
    distinct: int
    kinds: dict[str, int]
    minima: int
    fraction_minima: float
    fraction_ci: tuple[float, float]
    start_fraction_minima: float
    mean_index: float
    naive: float
    theory: GrfTheory | None = None
    wilson_ci: tuple[float, float] = (math.nan, math.nan)
    ci_method: str = ""
    closed_form: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["fraction_ci"], out["wilson_ci"] = list(self.fraction_ci), list(self.wilson_ci)
        out["theory"] = None if self.theory is None else self.theory.to_dict()
        return out


@dataclass
class IndexLossFit:
    """Index against loss at the distinct critical points of one family in one dimension.

    ``loss`` is :math:`f/n` for the GRF (an energy density, as in Bray & Dean 2007) and :math:`f`
    otherwise. ``slope``, ``intercept``: least squares ``index = intercept + slope * loss``; ``slope_ci``
    and ``spearman_ci``: 95% bootstraps over the functions (NaN with fewer than three).
    """

    family: str
    n: int
    points: int
    functions: int
    loss_per_dimension: bool
    pearson: float
    spearman: float
    slope: float
    intercept: float
    slope_ci: tuple[float, float] = (math.nan, math.nan)
    spearman_ci: tuple[float, float] = (math.nan, math.nan)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["slope_ci"], out["spearman_ci"] = list(self.slope_ci), list(self.spearman_ci)
        return out


def _loss_index(records: Sequence[dict[str, Any]], per_dimension: bool) -> tuple[list[float], list[float]]:
    points = [(p["loss"] / (r["n"] if per_dimension else 1), p["index"]) for r in records for p in r["points"]]
    return [p[0] for p in points], [p[1] for p in points]


def index_loss_fit(records: Sequence[dict[str, Any]], family: str, n: int, seed: int = 0) -> IndexLossFit:
    """The fit for ``family`` at dimension ``n`` (records of other families or dimensions are ignored)."""
    group = [r for r in records if r["family"] == family and r["n"] == n]
    per_dimension = family == "grf"
    loss, index = _loss_index(group, per_dimension)
    slope, intercept = linear_fit(loss, index)
    slope_boot = cluster_bootstrap(group, lambda g: linear_fit(*_loss_index(g, per_dimension))[0],
                                   what="functions", seed=seed, min_clusters=MIN_BOOTSTRAP_FUNCTIONS)
    rho_boot = cluster_bootstrap(group, lambda g: rank_correlation(*_loss_index(g, per_dimension)),
                                 what="functions", seed=seed + 1, min_clusters=MIN_BOOTSTRAP_FUNCTIONS)
    return IndexLossFit(family, n, len(loss), len(group), per_dimension, pearson(loss, index),
                        rank_correlation(loss, index), slope, intercept, (slope_boot.low, slope_boot.high),
                        (rho_boot.low, rho_boot.high))


def _pooled_fraction(group: Sequence[dict[str, Any]]) -> float:
    distinct = sum(len(r["points"]) for r in group)
    minima = sum(p["kind"] == "minimum" for r in group for p in r["points"])
    return minima / distinct if distinct else math.nan


def summarize_prevalence(records: Sequence[dict[str, Any]], config: PrevalenceConfig,
                         theory: dict[int, GrfTheory] | None = None, seed: int = 0) -> list[PrevalenceRow]:
    """One :class:`PrevalenceRow` per family and dimension present in ``records``."""
    rows = []
    theory = theory or {}
    for family in config.families:
        for n in config.dims:
            group = [r for r in records if r["family"] == family and r["n"] == n]
            if not group:
                continue
            labels: dict[str, int] = {}
            kinds: dict[str, int] = {}
            hits_min = hits = 0
            for r in group:
                for label, count in r["labels"].items():
                    labels[label] = labels.get(label, 0) + count
                for p in r["points"]:
                    kinds[p["kind"]] = kinds.get(p["kind"], 0) + 1
                    hits += p["hits"]
                    hits_min += p["hits"] if p["kind"] == "minimum" else 0
            distinct = sum(kinds.values())
            minima = kinds.get("minimum", 0)
            indices = [p["index"] for r in group for p in r["points"]]
            boot = cluster_bootstrap(group, _pooled_fraction, what="functions", seed=seed + n,
                                     min_clusters=MIN_BOOTSTRAP_FUNCTIONS)
            rows.append(PrevalenceRow(
                family=family, n=n, instances=len(group), starts=sum(len(r["starts"]) for r in group),
                labels=dict(sorted(labels.items())), distinct=distinct, kinds=dict(sorted(kinds.items())),
                minima=minima, fraction_minima=minima / distinct if distinct else math.nan,
                fraction_ci=(boot.low, boot.high), ci_method=boot.method,
                wilson_ci=wilson_interval(minima, distinct),
                start_fraction_minima=hits_min / hits if hits else math.nan,
                mean_index=float(np.mean(indices)) if indices else math.nan, naive=0.5**n,
                theory=theory.get(n) if family == "grf" else None,
                closed_form=double_well_fraction(n) if family == "double_well" else None,
            ))
    return rows


# ---------------------------------------------------------------------- the study
@dataclass
class PrevalenceStudy:
    """A finished (or resumed) prevalence study.

    Attributes:
        out: the study folder (``study.json``, ``runs/``, ``theory.json``, ``summary.json``).
        seed, config: what was asked. records: the grid's finished runs, by run id.
        rows: :func:`summarize_prevalence`; fits: :class:`IndexLossFit` per family and dimension.
        theory: the GRF curve by dimension (empty without the GRF family).
        computed, skipped: run ids computed now and found finished; seconds, workers.
    """

    out: Path
    seed: int
    config: PrevalenceConfig
    records: list[dict[str, Any]]
    rows: list[PrevalenceRow]
    fits: list[IndexLossFit]
    theory: dict[int, GrfTheory]
    computed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    seconds: float = 0.0
    workers: int = 1

    def _repr_html_(self) -> str:
        return prevalence_study_html(self)  # Jupyter: the share of minima first

    def row(self, family: str, n: int) -> PrevalenceRow:
        for r in self.rows:
            if r.family == family and r.n == n:
                return r
        raise InvalidInputError(f"no row for family {family!r} at n = {n}")

    def to_dict(self, records: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "study": "prevalence", "out": str(self.out), "seed": self.seed, "workers": self.workers,
            "config": self.config.to_dict(), "rows": [r.to_dict() for r in self.rows],
            "fits": [f.to_dict() for f in self.fits],
            "theory": {str(n): t.to_dict() for n, t in sorted(self.theory.items())},
            "computed": len(self.computed), "skipped": len(self.skipped), "seconds": self.seconds,
        }
        if records:
            out["records"] = self.records
        return out


def _grid(config: PrevalenceConfig) -> list[tuple[str, int, int]]:
    return [(family, n, i) for family in config.families for n in config.dims if has_dimension(family, n)
            for i in range(config.instances)]


def _theory(out: Path, config: PrevalenceConfig, seed: int) -> dict[int, GrfTheory]:
    """The GRF curve for every dimension, cached in ``theory.json`` (recomputed only when missing)."""
    if "grf" not in config.families:
        return {}
    path = out / "theory.json"
    key = {"edge_ratio": config.grf_edge_ratio, "samples": config.theory_samples, "seed": seed}
    cached: dict[str, Any] = {}
    if path.exists():
        import json

        stored = json_restore(json.loads(path.read_text(encoding="utf-8")))
        if stored.get("key") == key:
            cached = stored["values"]
    result = {int(n): GrfTheory(**v) for n, v in cached.items()}
    missing = [n for n in config.dims if n not in result]
    if missing:
        with one_thread():
            for n in missing:
                result[n] = grf_minimum_fraction(n, config.grf_edge_ratio, samples=config.theory_samples, seed=seed)
        atomic_write_json(path, {"key": key, "values": {str(n): t.to_dict() for n, t in sorted(result.items())}})
    return {n: result[n] for n in config.dims}


def prevalence_study(
    *,
    out: str | os.PathLike[str] = "prevalence_study",
    seed: int = 0,
    workers: int = 1,
    config: PrevalenceConfig | None = None,
    progress: bool = True,
) -> PrevalenceStudy:
    """Run (or resume) the saddle-prevalence study and summarise it.

    Every (family, :math:`n`, instance) of the grid whose record is not yet in ``out`` is computed
    by :func:`run_instance`, by ``workers`` spawned processes with one thread each (as
    :func:`~saddlescope.experiments.min_ratio.min_ratio`); each record is written atomically when its
    run finishes, so the study can be killed at any moment and resumed by calling this again. The
    report is written by :func:`saddlescope.report.prevalence_plots.write_prevalence_report`.

    Args:
        out: the study folder.
        seed: the study seed.
        workers: processes (0 computes in this process).
        config: the grid and the search settings (default :class:`PrevalenceConfig`).
        progress: show a progress bar (rich, on stderr).

    Returns:
        A :class:`PrevalenceStudy`, also written to ``out/summary.json``.

    Raises:
        saddlescope.errors.InvalidInputError: a bad argument, or ``out`` holds a study with other
            search settings or seed (the grid may differ: a larger one extends the study).
    """
    for name, value, low in (("workers", workers, 0), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidInputError(f"{name} must be an integer >= {low}, got {value!r}")
    if config is None:
        config = PrevalenceConfig()
    elif not isinstance(config, PrevalenceConfig):
        raise InvalidInputError(f"config must be a PrevalenceConfig, got {type(config).__name__}")
    start = time.perf_counter()
    store = RecordStore(out)
    store.bind({"study": "prevalence", "seed": seed, "search": config.search_key()})
    tasks = {run_id_of(*cell): cell for cell in _grid(config)}
    todo, done = complete_runs(
        store, set(tasks), lambda ids: _compute(config, seed, [(run_id, *tasks[run_id]) for run_id in ids], workers),
        progress=progress, title="prevalence study", labels=lambda record: record["labels"],
    )
    records = store.load(set(tasks))
    theory = _theory(Path(out), config, seed)
    rows = summarize_prevalence(records, config, theory, seed)
    fits = [index_loss_fit(records, row.family, row.n, seed) for row in rows]
    study = PrevalenceStudy(out=Path(out), seed=seed, config=config, records=records, rows=rows, fits=fits,
                            theory=theory, computed=todo, skipped=done,
                            seconds=time.perf_counter() - start, workers=workers)
    atomic_write_json(Path(out) / "summary.json", json_safe(study.to_dict()))
    return study


Task = tuple[int, str, int, int]  # run id, family, n, instance


def _compute(config: PrevalenceConfig, seed: int, todo: list[Task], workers: int) -> Iterator[dict[str, Any]]:
    """Finished records in completion order (largest runs first, so that the pool ends evenly)."""
    if not todo:
        return
    todo = sorted(todo, key=lambda task: (-task[2], task[0]))
    yield from imap_tasks(_worker_run, [(config, seed, task) for task in todo], workers)


def _worker_run(job: tuple[PrevalenceConfig, int, Task]) -> dict[str, Any]:
    config, seed, (run_id, family, n, instance) = job
    return {**run_instance(config, seed, family, n, instance), "run_id": run_id}
