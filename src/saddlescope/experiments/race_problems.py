r"""The escape race's problems: each starts at, or next to, a saddle.

A :class:`RaceProblem` is a small record: a name, a description, ``build(seed)`` returning a
:class:`RaceInstance` (parameters to optimise, a full-data loss and a mini-batch loss), the escape
threshold, a step cap and how to draw it. ``seed`` decides only the randomness that belongs to the
start (the noise of a noisy start, a network's initialisation); the data themselves are fixed.

Every instance offers two losses over the same parameters:

* ``loss()``: the full objective, deterministic. Every optimizer but ``sgd`` steps on it, and the
  escape test uses it for all of them.
* ``minibatch_loss(generator)``: an unbiased mini-batch estimate (gradient equal in expectation,
  value up to a constant), for SGD with mini-batch noise. Its data formulation is stated per
  problem: for the seed toy it is the model :math:`\hat y = w_1 w_2 x` on noisy labels (where every
  per-sample gradient vanishes at the origin, so mini-batch noise cannot leave that saddle); for
  the other analytic toys it is a set of per-sample linear tilts that average to zero, which is the
  same as adding zero-mean noise to the gradient.

The Du et al. chain (:class:`DuChain`) is documented in its class.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from saddlescope.errors import InvalidInputError
from saddlescope.problems import TwoLayerLinear, load_digits_tensors, mlp

F64 = torch.float64

# Independent random streams of one race seed (numpy SeedSequence keys).
STREAM_START = 1
STREAM_DATA = 2


def stream_seed(seed: int, stream: int) -> int:
    """An integer seed for ``stream`` of race seed ``seed`` (independent streams per pair)."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


def seeded_generator(seed: int, stream: int) -> torch.Generator:
    """A CPU generator for ``stream`` of race seed ``seed``."""
    return torch.Generator().manual_seed(stream_seed(seed, stream))


@dataclass
class RaceInstance:
    """One problem built for one seed.

    Attributes:
        params: leaf tensors the optimizer updates in place.
        loss: the full objective at the current parameters (differentiable).
        minibatch_loss: an unbiased mini-batch estimate, drawing its batch from the generator.
    """

    params: list[Tensor]
    loss: Callable[[], Tensor]
    minibatch_loss: Callable[[torch.Generator], Tensor]

    def flat(self) -> Tensor:
        """The parameters as one flat detached vector."""
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def set_flat(self, theta: Tensor) -> None:
        """Overwrite the parameters from a flat vector."""
        with torch.no_grad():
            nn.utils.vector_to_parameters(torch.as_tensor(theta, dtype=self.params[0].dtype), self.params)

    def loss_at(self, theta: Tensor) -> float:
        """The full loss at ``theta`` (the parameters are left at ``theta``)."""
        self.set_flat(theta)
        with torch.no_grad():
            return float(self.loss())


@dataclass(frozen=True)
class RaceProblem:
    """A problem of the race.

    Attributes:
        name: registry key (``--problems``).
        description: one line for tables and reports.
        build: ``build(seed) -> RaceInstance``.
        threshold: escaped once the full loss is below this.
        max_steps: step cap; a run that has not escaped by then is censored.
        quick_max_steps: the cap of a ``quick`` race.
        start: how the start is chosen.
        saddle_loss: the loss at the saddle the run starts at or next to.
        loss_floor: the infimum of the loss if finite (plots show ``loss - floor`` on log axes).
        surface: for 2-D problems, the loss as a function of ``(x, y)`` tensors of any shape.
        extent: the plot window ``(xmin, xmax, ymin, ymax)`` of a 2-D problem.
        diverge_above: a run whose loss exceeds this has diverged (non-finite always counts).
        lr_grid: per-optimizer learning-rate grids that replace the race's defaults here.
        quick_lr: per-optimizer learning rates that replace the optimizers' ``quick_lr`` here.
        reference: where the construction comes from.
    """

    name: str
    description: str
    build: Callable[[int], RaceInstance]
    threshold: float
    max_steps: int
    quick_max_steps: int
    start: str
    saddle_loss: float
    loss_floor: float | None = None
    surface: Callable[[Tensor, Tensor], Tensor] | None = None
    extent: tuple[float, float, float, float] | None = None
    diverge_above: float = math.inf
    lr_grid: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    quick_lr: Mapping[str, float] = field(default_factory=dict)
    reference: str = ""

    @property
    def two_d(self) -> bool:
        return self.surface is not None

    def info(self) -> dict[str, Any]:
        """The problem's settings, for reports."""
        return {
            "name": self.name,
            "description": self.description,
            "threshold": self.threshold,
            "max_steps": self.max_steps,
            "quick_max_steps": self.quick_max_steps,
            "start": self.start,
            "saddle_loss": self.saddle_loss,
            "loss_floor": self.loss_floor,
            "two_d": self.two_d,
            "diverge_above": self.diverge_above,
            "lr_grid": {k: list(v) for k, v in self.lr_grid.items()},
            "quick_lr": dict(self.quick_lr),
            "reference": self.reference,
        }


# ---------------------------------------------------------------------------------- analytic toys
# The same functions as saddlescope.problems.analytic, written on (x, y) so that they broadcast
# over a plotting grid.


def seed_toy_surface(x: Tensor, y: Tensor) -> Tensor:
    """:math:`(1 - w_1 w_2)^2`: saddle at 0 (loss 1), valley of minima :math:`w_1 w_2 = 1`."""
    return (1.0 - x * y) ** 2


def saddle_quadratic_surface(x: Tensor, y: Tensor) -> Tensor:
    """:math:`5x^2 - y^2`: saddle at 0, :math:`H = \\mathrm{diag}(10, -2)`, unbounded below."""
    return 5.0 * x**2 - y**2


def monkey_saddle_surface(x: Tensor, y: Tensor) -> Tensor:
    """:math:`x^3 - 3xy^2`: :math:`g = 0` and :math:`H = 0` at 0, unbounded below."""
    return x**3 - 3.0 * x * y**2


# Data formulations for SGD (fixed data, independent of the race seed).
TOY_SAMPLES = 16
TOY_BATCH = 4
TOY_LABEL_NOISE = 0.5  # seed toy: labels y_i = 1 + eps_i
TOY_TILT_SCALE = 1.0  # other toys: per-sample tilts c_i


def _centred_noise(shape: tuple[int, ...], scale: float) -> Tensor:
    """Fixed zero-mean noise (the toys' data sets: the same for every race seed)."""
    gen = torch.Generator().manual_seed(20170101)
    noise = torch.randn(*shape, generator=gen, dtype=F64)
    return scale * (noise - noise.mean(0, keepdim=True))


def _batch(generator: torch.Generator, n: int, size: int) -> Tensor:
    return torch.randperm(n, generator=generator)[:size]


def _seed_toy_instance(seed: int, noise: float) -> RaceInstance:
    """The seed toy as the model :math:`\\hat y = w_1 w_2 x` on 16 samples :math:`x_i = 1`,
    :math:`y_i = 1 + \\epsilon_i` with :math:`\\sum\\epsilon_i = 0`: the data loss is
    :math:`(1 - w_1 w_2)^2 + \\mathrm{var}(\\epsilon)`, the seed toy up to a constant (the escape
    test uses the seed toy itself)."""
    theta0 = torch.zeros(2, dtype=F64)
    if noise > 0:
        theta0 = noise * torch.randn(2, generator=seeded_generator(seed, STREAM_START), dtype=F64)
    theta = nn.Parameter(theta0)
    labels = 1.0 + _centred_noise((TOY_SAMPLES,), TOY_LABEL_NOISE)

    def loss() -> Tensor:
        return seed_toy_surface(theta[0], theta[1])

    def minibatch_loss(generator: torch.Generator) -> Tensor:
        idx = _batch(generator, TOY_SAMPLES, TOY_BATCH)
        return ((labels[idx] - theta[0] * theta[1]) ** 2).mean()

    return RaceInstance([theta], loss, minibatch_loss)


def _tilted_toy_instance(seed: int, surface: Callable[[Tensor, Tensor], Tensor], noise: float) -> RaceInstance:
    """An analytic 2-D toy with per-sample losses :math:`f(\\theta) + c_i^\\top\\theta`,
    :math:`\\sum c_i = 0`: the full loss is :math:`f` exactly, and a mini-batch gradient is
    :math:`\\nabla f` plus the batch mean of the tilts (zero-mean gradient noise)."""
    theta0 = torch.zeros(2, dtype=F64)
    if noise > 0:
        theta0 = noise * torch.randn(2, generator=seeded_generator(seed, STREAM_START), dtype=F64)
    theta = nn.Parameter(theta0)
    tilts = _centred_noise((TOY_SAMPLES, 2), TOY_TILT_SCALE)

    def loss() -> Tensor:
        return surface(theta[0], theta[1])

    def minibatch_loss(generator: torch.Generator) -> Tensor:
        idx = _batch(generator, TOY_SAMPLES, TOY_BATCH)
        return loss() + tilts[idx].mean(0) @ theta

    return RaceInstance([theta], loss, minibatch_loss)


# ---------------------------------------------------------------------------------- Du et al. chain


@dataclass(frozen=True)
class DuChain:
    r"""A smooth, simplified version of the construction of Du, Jin, Lee, Jordan, Poczos & Singh
    (2017), "Gradient Descent Can Take Exponential Time to Escape Saddle Points" (NeurIPS).

    Their function chains :math:`d` saddles: the escape direction of saddle :math:`i` is the
    coordinate :math:`x_i`, and while gradient descent escapes saddle :math:`i`, every later
    coordinate sits in a direction of *positive* curvature and is contracted. So the next escape
    starts from an exponentially smaller distance, and the time per saddle grows geometrically.
    They build it from quadratic pieces on a tube of boxes joined by spline interpolation. Here the
    same mechanism is written as one :math:`C^2` function on all of :math:`\mathbb{R}^d`:

    .. math::

        f(x) = \varphi(x_1) + \sum_{i=2}^{d} \Big[ s(x_{i-1})\,\varphi(x_i)
               + \big(1 - s(x_{i-1})\big)\, L x_i^2 \Big],
        \qquad \varphi(t) = \gamma\Big(\frac{t^4}{2a^2} - t^2\Big),

    with the switch :math:`s(t) = S\big((t^2 - t_0^2)/(t_1^2 - t_0^2)\big)`, :math:`S` the
    smootherstep :math:`6u^5 - 15u^4 + 10u^3` clamped to :math:`[0, 1]`: :math:`s = 0` for
    :math:`|t| \le t_0`, :math:`s = 1` for :math:`|t| \ge t_1`. Stage :math:`i`'s escape direction
    is switched on only once :math:`x_{i-1}` has escaped.

    * Saddle :math:`k` (:math:`k = 1..d`) is :math:`x = (\pm a, \dots, \pm a, 0, \dots, 0)` with
      :math:`k-1` escaped coordinates: one negative curvature :math:`-2\gamma` (along :math:`x_k`),
      the others :math:`+4\gamma` (escaped) and :math:`+2L` (waiting); loss :math:`-(k-1)\gamma a^2/2`.
      The minima :math:`(\pm a, \dots, \pm a)` have loss :math:`-d\gamma a^2/2`; :math:`f` is bounded
      below by it.
    * The chain is passed (``threshold``) once :math:`f < -(d - \tfrac12)\gamma a^2/2`; that
      needs :math:`\varphi(x_d) < -\gamma a^2/4`, i.e. :math:`|x_d| > 0.54a > t_0`.

    **Why gradient descent is slow** (the analytic property; see :meth:`gd_lower_bound`): with step
    :math:`\eta` (:math:`2\eta L < 1`), let :math:`\tau_j` be the first step with
    :math:`|x_j| \ge t_0`. Until :math:`\tau_{j-1}`, :math:`x_j` sits in :math:`L x_j^2` and is
    multiplied by exactly :math:`\rho = 1 - 2\eta L` per step; afterwards it grows by at most
    :math:`\mu = 1 + 2\eta\gamma` per step. Hence

    .. math::

        \tau_j \ge \tau_{j-1}(1 + \kappa) + \frac{\log(t_0 / |x_j(0)|)}{\log\mu},
        \qquad \kappa = \frac{\log(1/\rho)}{\log\mu} \approx \frac{L}{\gamma},

    so the steps to pass the chain grow like :math:`(1 + \kappa)^d`: exponential in :math:`d`
    (in floating point, worse: once :math:`|x_j(0)|\rho^{\tau_{j-1}}` falls into the subnormal
    range, the updates of :math:`x_j` round to nothing and gradient descent never escapes). A method that injects noise of size :math:`r` when the gradient is
    small (perturbed GD), or that steps along negative curvature, restarts each escape from
    distance about :math:`r` instead, and needs about :math:`d\log(t_0/r)/\log\mu` steps.

    Args:
        dim: the number :math:`d` of saddles (and of coordinates).
        gamma: :math:`\gamma`, the negative curvature is :math:`-2\gamma`.
        big_l: :math:`L`, the waiting coordinates' curvature is :math:`2L`.
        a: the escaped coordinates' value.
        t0, t1: the switch's ends (:math:`0 < t_0 < t_1 < a`).
    """

    dim: int
    gamma: float = 1.0
    big_l: float = 1.0
    a: float = 1.0
    t0: float = 0.25
    t1: float = 0.75

    def __post_init__(self) -> None:
        if not (isinstance(self.dim, int) and self.dim >= 1):
            raise InvalidInputError(f"dim must be an int >= 1, got {self.dim!r}")
        if not (self.gamma > 0 and self.big_l > 0 and 0 < self.t0 < self.t1 < self.a):
            raise InvalidInputError("need gamma > 0, L > 0 and 0 < t0 < t1 < a")

    def switch(self, t: Tensor) -> Tensor:
        u = ((t**2 - self.t0**2) / (self.t1**2 - self.t0**2)).clamp(0.0, 1.0)
        return u**3 * (10.0 - 15.0 * u + 6.0 * u**2)

    def phi(self, t: Tensor) -> Tensor:
        return self.gamma * (t**4 / (2.0 * self.a**2) - t**2)

    def loss(self, x: Tensor) -> Tensor:
        """:math:`f(x)` for a flat ``x`` of length ``dim``."""
        phi = self.phi(x)
        if self.dim == 1:
            return phi.sum()
        s = self.switch(x[:-1])
        rest = s * phi[1:] + (1.0 - s) * self.big_l * x[1:] ** 2
        return phi[0] + rest.sum()

    def saddle_loss(self, k: int) -> float:
        """The loss at saddle ``k`` (1-based)."""
        return -(k - 1) * self.gamma * self.a**2 / 2.0

    @property
    def minimum_loss(self) -> float:
        return -self.dim * self.gamma * self.a**2 / 2.0

    @property
    def threshold(self) -> float:
        """Passed the chain: more than halfway down the last stage."""
        return -(self.dim - 0.5) * self.gamma * self.a**2 / 2.0

    def start(self, seed: int, scale: float = 1e-3) -> Tensor:
        """Next to the first saddle (the origin): each coordinate uniform in ``[scale, 2 scale]``."""
        u = torch.rand(self.dim, generator=seeded_generator(seed, STREAM_START), dtype=F64)
        return scale * (1.0 + u)

    def gd_lower_bound(self, x0: Tensor, lr: float) -> float:
        r"""A lower bound on the steps gradient descent with step ``lr`` needs to pass the chain
        from ``x0`` (inside the first box, :math:`|x_j(0)| < t_0`): :math:`\tau_d` of the
        recursion in the class docstring.

        Returns ``inf`` when, in exact arithmetic, some coordinate would be below float64's smallest
        normal number when its escape begins. Floating point cannot follow the construction there:
        once :math:`|x_j|` is a few subnormal units, :math:`\eta \cdot 2L x_j` and
        :math:`\eta \cdot 2\gamma x_j` round to no change at all, and gradient descent stays at
        that saddle for ever (observed for ``dim`` 7 and 8 at ``lr`` 0.1 and 0.2: no escape in
        40,000 steps). So ``inf`` is what happens, not a bound proved by the recursion."""
        if not 0 < 2 * lr * self.big_l < 1:
            raise InvalidInputError(f"the bound needs 0 < 2 lr L < 1, got lr = {lr}")
        x0 = torch.as_tensor(x0, dtype=F64).abs()
        if bool((x0 >= self.t0).any()) or bool((x0 == 0).any()):
            raise InvalidInputError("the bound needs 0 < |x0_j| < t0 for every coordinate")
        log_mu = math.log1p(2 * lr * self.gamma)
        log_rho = math.log1p(-2 * lr * self.big_l)
        tiny = math.log(np.finfo(np.float64).smallest_normal)
        tau = 0.0
        for j in range(self.dim):
            log_start = math.log(float(x0[j])) + tau * log_rho  # |x_j(tau_{j-1})|, exactly
            if log_start < tiny:
                return math.inf
            tau += (math.log(self.t0) - log_start) / log_mu
        return tau


def _du_chain_instance(seed: int, chain: DuChain) -> RaceInstance:
    """The chain from next to its first saddle; mini-batches are per-sample tilts (zero mean)."""
    x = nn.Parameter(chain.start(seed))
    tilts = _centred_noise((TOY_SAMPLES, chain.dim), TOY_TILT_SCALE)

    def loss() -> Tensor:
        return chain.loss(x)

    def minibatch_loss(generator: torch.Generator) -> Tensor:
        idx = _batch(generator, TOY_SAMPLES, TOY_BATCH)
        return loss() + tilts[idx].mean(0) @ x

    return RaceInstance([x], loss, minibatch_loss)


def du_chain_problem(dim: int, max_steps: int = 3000, quick_max_steps: int = 1000) -> RaceProblem:
    """The :class:`DuChain` with ``dim`` saddles as a race problem."""
    chain = DuChain(dim)
    return RaceProblem(
        name=f"du-chain-{dim}",
        description=f"Du et al. 2017 chain of {dim} saddles (smooth simplified), start next to the first",
        build=functools.partial(_du_chain_instance, chain=chain),
        threshold=chain.threshold,
        max_steps=max_steps,
        quick_max_steps=quick_max_steps,
        start="each coordinate uniform in [1e-3, 2e-3] (next to the first saddle, the origin)",
        saddle_loss=chain.saddle_loss(1),
        loss_floor=chain.minimum_loss,
        lr_grid={"sgd": (0.03, 0.1, 0.2), "gd": (0.03, 0.1, 0.2), "perturbed-gd": (0.03, 0.1, 0.2)},
        quick_lr={"sgd": 0.2, "gd": 0.2, "perturbed-gd": 0.2},
        reference="Du, Jin, Lee, Jordan, Poczos & Singh (2017), Gradient Descent Can Take "
        "Exponential Time to Escape Saddle Points, NeurIPS",
    )


# ---------------------------------------------------------------------------------- linear network

LINEAR_SADDLE_SUBSET = (0, 2)


def _linear_network() -> TwoLayerLinear:
    return TwoLayerLinear(4, 4, 2, seed=0)


def _linear_saddle_instance(seed: int) -> RaceInstance:
    """:math:`\\tfrac12\\|M - W_2W_1\\|_F^2` from its saddle :math:`J = \\{0, 2\\}` (exact up to
    rounding: the seed changes nothing here). Data formulation: the four whitened inputs
    :math:`x_k = e_k` with targets :math:`M e_k`; a mini-batch of two columns, scaled by 4/2."""
    net = _linear_network()
    point = next(cp for cp in net.critical_points() if cp.subset == LINEAR_SADDLE_SUBSET)
    theta = nn.Parameter(point.theta.clone())

    def loss() -> Tensor:
        return net.loss(theta)

    def minibatch_loss(generator: torch.Generator) -> Tensor:
        idx = _batch(generator, net.n, 2)
        w1, w2 = net.unpack(theta)
        residual = net.target[:, idx] - w2 @ w1[:, idx]
        return 0.5 * (net.n / idx.numel()) * (residual**2).sum()

    return RaceInstance([theta], loss, minibatch_loss)


def _linear_saddle_problem() -> RaceProblem:
    net = _linear_network()
    sigma = net.sigma.tolist()
    saddle = 0.5 * sum(s**2 for i, s in enumerate(sigma) if i not in LINEAR_SADDLE_SUBSET)
    minimum = 0.5 * sum(s**2 for s in sigma[net.p :])
    return RaceProblem(
        name="linear-saddle",
        description="two-layer linear net 4-2-4 (16 params) at its saddle J={0,2}: "
        "one negative eigenvalue (-1)",
        build=_linear_saddle_instance,
        threshold=0.5 * (saddle + minimum),
        max_steps=1500,
        quick_max_steps=600,
        start="exactly at the saddle critical point J = {0, 2} (|g| ~ 1e-15 from rounding)",
        saddle_loss=saddle,
        loss_floor=minimum,
        reference="Baldi & Hornik (1989); saddlescope.problems.TwoLayerLinear",
    )


# ---------------------------------------------------------------------------------- digits plateau

DIGITS_HIDDEN = 32
DIGITS_BATCH = 64
DIGITS_INIT_SCALE = 1e-3


@functools.lru_cache(maxsize=2)
def _digits_data(n_samples: int | None) -> tuple[Tensor, Tensor]:
    return load_digits_tensors(F64, n_samples)


def _digits_instance(seed: int, n_samples: int | None = None) -> RaceInstance:
    """A tanh MLP 64-32-10 with PyTorch's initialisation times 1e-3 (the init is the seed's
    starting noise): near the origin, a critical point of cross-entropy, the loss sits on a
    plateau at :math:`\\log 10`. Mini-batches of 64 drawn without replacement."""
    inputs, targets = _digits_data(n_samples)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, STREAM_START))
        model = mlp((64, DIGITS_HIDDEN, 10), "tanh").to(F64)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(DIGITS_INIT_SCALE)
    criterion = nn.CrossEntropyLoss()

    def loss() -> Tensor:
        return criterion(model(inputs), targets)

    def minibatch_loss(generator: torch.Generator) -> Tensor:
        idx = _batch(generator, inputs.shape[0], DIGITS_BATCH)
        return criterion(model(inputs[idx]), targets[idx])

    return RaceInstance(list(model.parameters()), loss, minibatch_loss)


def _digits_problem() -> RaceProblem:
    return RaceProblem(
        name="digits-plateau",
        description=f"tanh MLP 64-{DIGITS_HIDDEN}-10 on digits (2,410 params), init x{DIGITS_INIT_SCALE:g}: "
        "plateau at log 10",
        build=_digits_instance,
        threshold=1.0,
        max_steps=600,
        quick_max_steps=300,
        start=f"PyTorch's initialisation times {DIGITS_INIT_SCALE:g} (seeded)",
        saddle_loss=math.log(10.0),
        loss_floor=0.0,
        diverge_above=10.0 * math.log(10.0),
        lr_grid={
            "gd": (0.3, 1.0, 3.0),
            "sgd": (0.3, 1.0, 3.0),
            "momentum": (0.03, 0.1, 0.3),
            "nesterov": (0.03, 0.1, 0.3),
            "perturbed-gd": (0.3, 1.0, 3.0),
            "negative-curvature": (0.3, 1.0, 3.0),
        },
        quick_lr={"gd": 1.0, "sgd": 1.0, "momentum": 0.3, "nesterov": 0.3, "perturbed-gd": 1.0,
                  "negative-curvature": 1.0},
        reference="saddlescope.problems.digits_mlp (scikit-learn digits)",
    )


# ---------------------------------------------------------------------------------- registry


def _registry() -> dict[str, RaceProblem]:
    toys = [
        RaceProblem(
            name="seed-toy",
            description="(1 - w1 w2)^2 from exactly (0, 0): saddle, H eigenvalues -2, 2",
            build=functools.partial(_seed_toy_instance, noise=0.0),
            threshold=0.1,
            max_steps=1000,
            quick_max_steps=400,
            start="exactly the saddle (0, 0)",
            saddle_loss=1.0,
            loss_floor=0.0,
            surface=seed_toy_surface,
            extent=(-1.6, 1.6, -1.6, 1.6),
            reference="saddlescope DESIGN.md (the seed toy)",
        ),
        RaceProblem(
            name="seed-toy-noisy",
            description="(1 - w1 w2)^2 from (0, 0) + N(0, 1e-6^2) noise",
            build=functools.partial(_seed_toy_instance, noise=1e-6),
            threshold=0.1,
            max_steps=1000,
            quick_max_steps=400,
            start="(0, 0) + N(0, 1e-12 I) (seeded)",
            saddle_loss=1.0,
            loss_floor=0.0,
            surface=seed_toy_surface,
            extent=(-1.6, 1.6, -1.6, 1.6),
            reference="saddlescope DESIGN.md (the seed toy)",
        ),
        RaceProblem(
            name="saddle-quadratic",
            description="5x^2 - y^2 from exactly (0, 0): unbounded below, escaped at loss < -1",
            build=functools.partial(_tilted_toy_instance, surface=saddle_quadratic_surface, noise=0.0),
            threshold=-1.0,
            max_steps=500,
            quick_max_steps=300,
            start="exactly the saddle (0, 0)",
            saddle_loss=0.0,
            surface=saddle_quadratic_surface,
            extent=(-1.2, 1.2, -1.6, 1.6),
            reference="classic non-degenerate saddle",
        ),
        RaceProblem(
            name="monkey-saddle",
            description="x^3 - 3xy^2 from exactly (0, 0): g = 0 and H = 0 there; escaped at loss < -1",
            build=functools.partial(_tilted_toy_instance, surface=monkey_saddle_surface, noise=0.0),
            threshold=-1.0,
            max_steps=1000,
            quick_max_steps=400,
            start="exactly the (degenerate) saddle (0, 0)",
            saddle_loss=0.0,
            surface=monkey_saddle_surface,
            extent=(-1.6, 1.6, -1.6, 1.6),
            reference="classic degenerate saddle: no second-order certificate exists at 0",
        ),
    ]
    chains = [du_chain_problem(3, quick_max_steps=600), du_chain_problem(6)]
    problems = [*toys, *chains, _linear_saddle_problem(), _digits_problem()]
    return {p.name: p for p in problems}


PROBLEMS: dict[str, RaceProblem] = _registry()
DEFAULT_PROBLEMS: tuple[str, ...] = tuple(PROBLEMS)


def get_problem(name: str) -> RaceProblem:
    """The registered problem ``name``.

    Raises:
        InvalidInputError: no problem has that name.
    """
    if name not in PROBLEMS:
        raise InvalidInputError(f"unknown race problem {name!r}; choose from {', '.join(PROBLEMS)}")
    return PROBLEMS[name]
