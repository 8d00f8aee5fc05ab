"""saddlescope.optim against independent truth: toy saddles, planted quadratics (eigh), autograd HVPs."""

import copy
import io
import math

import pytest
import torch
from torch import nn

from saddlescope.errors import InvalidInputError
from saddlescope.escape.closure_curvature import finite_difference_hvp
from saddlescope.optim import NegativeCurvatureDescent, PerturbedGD, SaddleFreeNewton

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Problems here are tiny: extra threads only spin, and on a loaded machine they stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def seed_toy(w1, w2):
    """(1 - w1 w2)^2: saddle at 0 (loss 1), minima on w1 w2 = 1 (loss 0)."""
    return (1 - w1 * w2) ** 2


def bounded_saddle(x, y):
    """5x^2 - y^2 + y^4/4: saddle at 0 (loss 0), minima at (0, +-sqrt 2) (loss -1)."""
    return 5 * x**2 - y**2 + y**4 / 4


# (toy, loss below which the saddle has been left for a minimum)
TOYS = {"seed_toy": (seed_toy, 1e-2), "bounded_saddle": (bounded_saddle, -0.9)}

ESCAPERS = {
    "PerturbedGD": lambda params: PerturbedGD(params, lr=0.05, radius=0.1, t_thres=20, seed=0),
    "SaddleFreeNewton": lambda params: SaddleFreeNewton(params, seed=0),
    "NegativeCurvatureDescent": lambda params: NegativeCurvatureDescent(params, lr=0.05, seed=0),
}


def scalar_params(*values, dtype=F64):
    return [nn.Parameter(torch.tensor(float(v), dtype=dtype)) for v in values]


def make_closure(opt, loss_fn, *args):
    def closure():
        opt.zero_grad()
        loss = loss_fn(*args)
        loss.backward()
        return loss

    return closure


def planted(values, seed=0):
    """``Q diag(values) Q^T`` (float64) and the orthonormal eigenvectors ``Q`` (columns)."""
    gen = torch.Generator().manual_seed(seed)
    n = len(values)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    a = q @ torch.diag(torch.as_tensor(values, dtype=F64)) @ q.T
    return 0.5 * (a + a.T), q


SPECTRUM = [-3.0, -1.0, -0.25, 0.5, 2.0, 4.0]


class Quadratic:
    """1/2 theta^T A theta + b^T theta with theta split over two tensors (shapes (2,) and (2, 2))."""

    def __init__(self, a, b, theta0):
        self.a, self.b = a, b
        self.head = nn.Parameter(theta0[:2].clone())
        self.tail = nn.Parameter(theta0[2:].clone().view(2, 2))
        self.params = [self.head, self.tail]

    def theta(self):
        return torch.cat([self.head.detach(), self.tail.detach().reshape(-1)])

    def __call__(self):
        theta = torch.cat([self.head, self.tail.reshape(-1)])
        return 0.5 * theta @ self.a @ theta + self.b @ theta

    def grad(self):
        return self.a @ self.theta() + self.b


def tanh_net(dtype, zero=False, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Tanh(), nn.Linear(4, 2, bias=False)).to(dtype)
    if zero:  # all weights zero: gradient exactly 0, Hessian indefinite (W1-W2 coupling) -> a saddle
        for p in net.parameters():
            nn.init.zeros_(p)
    return net


def regression_data(dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, generator=gen, dtype=dtype)
    y = torch.tanh(x @ torch.randn(3, 2, generator=gen, dtype=dtype))
    return x, y


def two_groups(net):
    return [{"params": net[0].parameters(), "lr": 0.1}, {"params": net[2].parameters(), "lr": 0.2}]


def net_loss(net, x, y):
    return nn.functional.mse_loss(net(x), y)


# --------------------------------------------------------------------------- escaping exact saddles
@pytest.mark.parametrize("toy", list(TOYS))
def test_gradient_descent_stays_at_the_exact_saddle(toy):
    f, _ = TOYS[toy]
    params = scalar_params(0.0, 0.0)
    opt = torch.optim.SGD(params, lr=0.1)
    closure = make_closure(opt, f, *params)
    for _ in range(1000):
        opt.step(closure)
    assert all(float(p.detach()) == 0.0 for p in params)


@pytest.mark.parametrize("toy", list(TOYS))
@pytest.mark.parametrize("name", list(ESCAPERS))
def test_escapes_from_exactly_the_saddle(name, toy):
    f, escaped_below = TOYS[toy]
    params = scalar_params(0.0, 0.0)
    opt = ESCAPERS[name](params)
    closure = make_closure(opt, f, *params)
    first = opt.step(closure)
    assert float(first.detach()) == float(f(torch.tensor(0.0), torch.tensor(0.0)))  # the loss before the step
    for _ in range(199):
        opt.step(closure)
    assert float(f(*params).detach()) < escaped_below


# --------------------------------------------------------------------------- finite-difference HVPs
def test_finite_difference_hvp_matches_a_quadratic_and_restores_params_and_grads():
    a, _ = planted(SPECTRUM)
    gen = torch.Generator().manual_seed(2)
    quad = Quadratic(a, torch.randn(6, generator=gen, dtype=F64), torch.randn(6, generator=gen, dtype=F64))
    quad().backward()
    quad.tail.grad = None  # a missing gradient must come back missing
    before = [p.detach().clone() for p in quad.params]
    grad_before = quad.head.grad.clone()
    v = torch.randn(6, generator=gen, dtype=F64)

    def closure():
        for p in quad.params:
            p.grad = None
        loss = quad()
        loss.backward()
        return loss

    hv = finite_difference_hvp(closure, quad.params, v)
    assert torch.allclose(hv, a @ v, rtol=0, atol=1e-8 * float((a @ v).norm()))
    assert all(torch.equal(p, b) for p, b in zip(quad.params, before))
    assert torch.equal(quad.head.grad, grad_before) and quad.tail.grad is None


def test_finite_difference_hvp_matches_double_backward_on_a_tanh_mlp():
    net = tanh_net(F64)
    x, y = regression_data(F64)
    params = list(net.parameters())
    v = torch.randn(sum(p.numel() for p in params), dtype=F64)

    def closure():
        net.zero_grad()
        loss = net_loss(net, x, y)
        loss.backward()
        return loss

    grads = torch.autograd.grad(net_loss(net, x, y), params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    exact = torch.cat([h.reshape(-1) for h in torch.autograd.grad(flat @ v, params)])
    hv = finite_difference_hvp(closure, params, v)
    assert float((hv - exact).norm()) <= 1e-6 * float(exact.norm())


# --------------------------------------------------------------------------- saddle-free Newton
def saddle_free_truth(a, grad, lr, damping):
    values, vectors = torch.linalg.eigh(a)
    return -lr * vectors @ ((vectors.T @ grad) / (values.abs() + damping))


@pytest.mark.parametrize("krylov_dim", [6, 9])
def test_saddle_free_newton_step_is_exact_on_a_quadratic(krylov_dim):
    a, _ = planted(SPECTRUM)
    gen = torch.Generator().manual_seed(3)
    quad = Quadratic(a, torch.randn(6, generator=gen, dtype=F64), torch.randn(6, generator=gen, dtype=F64))
    theta0, grad0 = quad.theta(), quad.grad()
    opt = SaddleFreeNewton(quad.params, lr=0.7, damping=0.05, krylov_dim=krylov_dim, seed=0)
    loss = opt.step(make_closure(opt, quad))
    expected = saddle_free_truth(a, grad0, 0.7, 0.05)
    assert float((quad.theta() - theta0 - expected).norm()) <= 1e-6 * float(expected.norm())
    assert float(loss.detach()) == pytest.approx(
        float(0.5 * theta0 @ a @ theta0 + quad.b @ theta0), rel=1e-14
    )
    assert opt.state[quad.head]["closure_calls"] == 1 + 2 * 6  # one gradient, six HVPs of two calls


def test_saddle_free_newton_stops_early_on_an_invariant_subspace():
    a, q = planted(SPECTRUM)
    # theta0 = 0 so g = b, and b spans two eigenvectors: K(A, g) is that plane after two steps.
    quad = Quadratic(a, q[:, 0] + 0.5 * q[:, 4], torch.zeros(6, dtype=F64))
    opt = SaddleFreeNewton(quad.params, lr=1.0, damping=0.01, krylov_dim=6, seed=0)
    opt.step(make_closure(opt, quad))
    state = opt.state[quad.head]
    assert state["invariant"] and state["basis_size"] == 2
    assert state["closure_calls"] == 1 + 2 * 2
    expected = saddle_free_truth(a, quad.b, 1.0, 0.01)
    assert float((quad.theta() - expected).norm()) <= 1e-6 * float(expected.norm())


# --------------------------------------------------------------------------- negative-curvature descent
def test_negative_curvature_step_follows_the_bottom_eigenvector_at_a_saddle():
    a, q = planted(SPECTRUM)
    quad = Quadratic(a, torch.zeros(6, dtype=F64), torch.zeros(6, dtype=F64))  # g = 0: a saddle
    opt = NegativeCurvatureDescent(quad.params, krylov_dim=6, curvature_lr=0.5, seed=0)
    opt.step(make_closure(opt, quad))
    step = quad.theta()
    bottom = q[:, 0]  # eigh-free truth: the planted eigenvector of lambda_min = -3
    assert abs(float(step @ bottom)) / float(step.norm()) == pytest.approx(1.0, abs=1e-9)
    assert float(step.norm()) == pytest.approx(0.5 * 3.0, rel=1e-6)
    assert opt.state[quad.head]["lambda_min"] == pytest.approx(-3.0, rel=1e-6)
    assert opt.state[quad.head]["curvature_steps"] == 1


@pytest.mark.parametrize("offset", [1e-5, -1e-5])
def test_negative_curvature_step_never_climbs_the_gradient(offset):
    a, q = planted(SPECTRUM)
    theta0 = offset * q[:, 0]  # g = -3 * offset * q0: small, along the escape direction
    quad = Quadratic(a, torch.zeros(6, dtype=F64), theta0)
    grad0 = quad.grad()
    opt = NegativeCurvatureDescent(quad.params, krylov_dim=6, curvature_step=0.1, seed=0)
    opt.step(make_closure(opt, quad))
    step = quad.theta() - theta0
    assert float(grad0 @ step) < 0
    assert torch.allclose(step, 0.1 * math.copysign(1.0, offset) * q[:, 0], atol=1e-9)


def test_negative_curvature_descent_takes_gradient_steps_elsewhere():
    a, _ = planted(SPECTRUM)
    gen = torch.Generator().manual_seed(4)
    quad = Quadratic(a, torch.randn(6, generator=gen, dtype=F64), torch.randn(6, generator=gen, dtype=F64))
    theta0, grad0 = quad.theta(), quad.grad()
    opt = NegativeCurvatureDescent(quad.params, lr=0.1, g_thres=1e-3, seed=0)
    opt.step(make_closure(opt, quad))  # ||g|| > g_thres: no curvature probe at all
    assert torch.allclose(quad.theta(), theta0 - 0.1 * grad0, rtol=0, atol=1e-14)
    assert opt.state[quad.head]["closure_calls"] == 1

    # A small gradient near a minimum (positive definite A): probed, no negative curvature, GD step.
    convex, _ = planted([0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
    quad = Quadratic(convex, torch.zeros(6, dtype=F64), torch.full((6,), 1e-5, dtype=F64))
    theta0, grad0 = quad.theta(), quad.grad()
    opt = NegativeCurvatureDescent(quad.params, lr=0.1, g_thres=1e-3, krylov_dim=6, seed=0)
    opt.step(make_closure(opt, quad))
    assert torch.allclose(quad.theta(), theta0 - 0.1 * grad0, rtol=0, atol=1e-15)
    state = opt.state[quad.head]
    assert state["curvature_steps"] == 0 and state["lambda_min"] == pytest.approx(0.5, rel=1e-6)
    assert state["closure_calls"] == 1 + 2 * 6 + 2  # gradient, Lanczos, confirming Rayleigh quotient


# --------------------------------------------------------------------------- perturbed GD
def flat_run(opt_factory, n, steps):
    """Points visited on a flat loss (g = 0 everywhere): every move is a perturbation."""
    theta = nn.Parameter(torch.zeros(n, dtype=F64))
    opt = opt_factory([theta])
    closure = make_closure(opt, lambda: (0.0 * theta).sum())
    points = [theta.detach().clone()]
    for _ in range(steps):
        opt.step(closure)
        points.append(theta.detach().clone())
    return torch.stack(points), opt.state[theta]


def test_perturbations_stay_in_the_ball_and_wait_t_thres_steps():
    points, state = flat_run(lambda p: PerturbedGD(p, radius=0.3, t_thres=3, seed=5), n=5, steps=20)
    moves = points[1:] - points[:-1]
    moved = [t for t in range(20) if float(moves[t].norm()) > 0]
    assert moved == [0, 4, 8, 12, 16]  # next perturbation only at t > t_noise + t_thres
    assert all(0 < float(moves[t].norm()) <= 0.3 for t in moved)
    assert state["perturbations"] == 5 and state["last_perturbation"] == 16
    assert state["closure_calls"] == 20 + 5  # a perturbed step re-evaluates at the new point


def test_perturbations_are_uniform_in_the_ball_not_on_the_sphere():
    draws = 2000
    points, _ = flat_run(lambda p: PerturbedGD(p, radius=2.0, t_thres=0, seed=6), n=2, steps=draws)
    radii = (points[1:] - points[:-1]).norm(dim=1) / 2.0
    # Uniform in the disc: P(r <= s R) = s^2, so half within R/sqrt(2) and E[r/R] = 2/3.
    assert float((radii <= 2**-0.5).double().mean()) == pytest.approx(0.5, abs=0.05)
    assert float(radii.mean()) == pytest.approx(2 / 3, abs=0.03)
    assert float(radii.max()) <= 1.0


def test_perturbed_gd_is_reproducible_from_its_seed():
    run = lambda seed: flat_run(lambda p: PerturbedGD(p, t_thres=1, seed=seed), n=4, steps=6)[0]  # noqa: E731
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    torch.manual_seed(3)
    first = flat_run(lambda p: PerturbedGD(p, t_thres=1), n=4, steps=6)[0]
    torch.manual_seed(3)
    assert torch.equal(first, flat_run(lambda p: PerturbedGD(p, t_thres=1), n=4, steps=6)[0])


def test_perturbed_gd_without_perturbations_is_sgd_bitwise():
    x, y = regression_data(torch.float32)
    nets = [tanh_net(torch.float32), tanh_net(torch.float32)]
    opts = [PerturbedGD(two_groups(nets[0]), g_thres=0.0, seed=0), torch.optim.SGD(two_groups(nets[1]))]
    for net, opt in zip(nets, opts):
        closure = make_closure(opt, net_loss, net, x, y)
        for _ in range(20):
            opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(nets[0].parameters(), nets[1].parameters()))


# --------------------------------------------------------------------------- all three, on a model
# g_thres is large in the round trip so that every step after the reload draws random numbers.
ROUND_TRIP = {
    "PerturbedGD": lambda groups, seed: PerturbedGD(groups, g_thres=10.0, radius=0.05, t_thres=1, seed=seed),
    "SaddleFreeNewton": lambda groups, seed: SaddleFreeNewton(groups, g_thres=10.0, krylov_dim=4, seed=seed),
    "NegativeCurvatureDescent": lambda groups, seed: NegativeCurvatureDescent(
        groups, g_thres=10.0, krylov_dim=4, seed=seed
    ),
}


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_state_dict_round_trip_continues_identically(name):
    x, y = regression_data(F64)
    net = tanh_net(F64, zero=True)
    opt = ROUND_TRIP[name](two_groups(net), 11)
    for _ in range(3):
        opt.step(make_closure(opt, net_loss, net, x, y))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    twin = copy.deepcopy(net)
    fresh = ROUND_TRIP[name](two_groups(twin), 99)  # another seed: the loaded state must win
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    for model, optimizer in ((net, opt), (twin, fresh)):
        for _ in range(3):
            optimizer.step(make_closure(optimizer, net_loss, model, x, y))
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), twin.parameters()))
    assert opt.state_dict()["state"] == fresh.state_dict()["state"]


MODEL_OPTIMIZERS = {
    "PerturbedGD": lambda groups: PerturbedGD(groups, radius=0.1, seed=0),
    "SaddleFreeNewton": lambda groups: SaddleFreeNewton(groups, seed=0),
    "NegativeCurvatureDescent": lambda groups: NegativeCurvatureDescent(groups, seed=0),
}


@pytest.mark.parametrize("name", list(MODEL_OPTIMIZERS))
def test_two_param_groups_leave_a_network_saddle_that_traps_gd(name):
    x, y = regression_data(torch.float32)
    losses = {}
    for label, factory in (("gd", lambda groups: torch.optim.SGD(groups)), (name, MODEL_OPTIMIZERS[name])):
        net = tanh_net(torch.float32, zero=True)
        opt = factory(two_groups(net))
        closure = make_closure(opt, net_loss, net, x, y)
        for _ in range(40):
            opt.step(closure)
        losses[label] = float(net_loss(net, x, y).detach())
    start = float(nn.functional.mse_loss(torch.zeros_like(y), y))
    assert losses["gd"] == start  # the zero network is a critical point: GD never moves
    assert losses[name] < 0.7 * losses["gd"]


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("cls", [PerturbedGD, SaddleFreeNewton, NegativeCurvatureDescent])
def test_step_without_a_closure_is_refused(cls):
    opt = cls(scalar_params(0.0), seed=0)
    with pytest.raises(InvalidInputError, match="closure"):
        opt.step()


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (PerturbedGD, {"lr": 0.0}),
        (PerturbedGD, {"lr": -1.0}),
        (PerturbedGD, {"lr": float("nan")}),
        (PerturbedGD, {"g_thres": -1e-3}),
        (PerturbedGD, {"radius": 0.0}),
        (PerturbedGD, {"t_thres": -1}),
        (PerturbedGD, {"t_thres": 2.5}),
        (PerturbedGD, {"seed": -1}),
        (SaddleFreeNewton, {"lr": 0.0}),
        (SaddleFreeNewton, {"damping": 0.0}),
        (SaddleFreeNewton, {"krylov_dim": 0}),
        (SaddleFreeNewton, {"radius": -1.0}),
        (SaddleFreeNewton, {"fd_step": 0.0}),
        (NegativeCurvatureDescent, {"lr": -0.1}),
        (NegativeCurvatureDescent, {"eps": -1.0}),
        (NegativeCurvatureDescent, {"krylov_dim": 1.5}),
        (NegativeCurvatureDescent, {"curvature_lr": 0.0}),
        (NegativeCurvatureDescent, {"curvature_step": -1.0}),
    ],
)
def test_bad_hyper_parameters_are_refused(cls, kwargs):
    with pytest.raises(InvalidInputError):
        cls(scalar_params(0.0), **kwargs)


def test_param_groups_may_differ_only_in_lr():
    a, b = scalar_params(0.0, 0.0)
    NegativeCurvatureDescent([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.5}])
    with pytest.raises(InvalidInputError, match="only in lr"):
        NegativeCurvatureDescent([{"params": [a]}, {"params": [b], "g_thres": 0.5}])
    with pytest.raises(InvalidInputError, match="lr"):
        PerturbedGD([{"params": [a]}, {"params": [b], "lr": 0.0}])
