"""Landscape slices against closed forms and point-by-point evaluation."""

import json
import math

import pytest
import torch
from torch import nn

import saddlescope as ss
from saddlescope import errors
from saddlescope.landscape import evaluate_many, filter_normalized
from saddlescope.report import plot_landscape


def test_hessian_plane_at_the_seed_toy_saddle_is_the_closed_form():
    obj = ss.problems.seed_toy()
    view = ss.landscape(obj, torch.zeros(2, dtype=torch.float64), directions="hessian", span=1.5, resolution=7)
    assert view.labels == ["lambda_min = -2", "lambda_max = 2"]
    # Along u = (1, 1)/sqrt2 (lambda = -2) and v = (1, -1)/sqrt2 (lambda = 2): w1 w2 = (a^2 - b^2) / 2.
    a = view.alphas.view(1, -1)
    b = view.betas.view(-1, 1)
    expected = (1 - (a**2 - b**2) / 2) ** 2
    assert torch.allclose(view.losses, expected, atol=1e-12)
    assert view.losses[3, 0] < view.center_loss < view.losses[0, 3]  # down along u, up along v
    assert json.loads(json.dumps(view.to_dict()))["dim"] == 2


def test_random_slice_of_a_network_equals_point_by_point_losses():
    problem = ss.problems.digits_mlp((8,), n_samples=200)
    obj = problem.objective
    view = ss.landscape(obj, dim=1, span=0.5, resolution=9, seed=3, batch_size=4)
    assert view.method == "vmap" and view.losses.shape == (9,)
    for i in (0, 4, 8):
        point = obj.theta0 + view.alphas[i] * view.directions[0]
        assert float(view.losses[i]) == pytest.approx(float(obj.loss(point)), rel=1e-12)
    assert float(view.losses[4]) == pytest.approx(view.center_loss, rel=1e-12)
    again = ss.landscape(obj, dim=1, span=0.5, resolution=9, seed=3)
    assert torch.equal(again.losses, view.losses)  # seeded


def test_filter_normalisation_matches_each_filters_norm():
    problem = ss.problems.digits_mlp((8,), n_samples=50)
    obj = problem.objective
    theta = obj.theta0.clone()
    theta[:64] = 0.0  # the first hidden unit's weights: a zero filter
    direction = filter_normalized(obj, theta, torch.randn(obj.n_params, dtype=torch.float64))
    weight = direction[: 8 * 64].view(8, 64)
    target = theta[: 8 * 64].view(8, 64).norm(dim=1)
    assert weight[0].norm() == pytest.approx(1.0)
    assert torch.allclose(weight[1:].norm(dim=1), target[1:])
    bias = direction[8 * 64 : 8 * 64 + 8]
    assert bias.norm() == pytest.approx(float(theta[8 * 64 : 8 * 64 + 8].norm()))


class Branchy(nn.Module):
    """Data-dependent control flow: cannot be vmapped over parameters."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x):
        out = self.lin(x)
        return out * 2 if float(out.sum()) > 0 else out


def test_models_that_cannot_be_vmapped_are_evaluated_one_by_one():
    torch.manual_seed(0)
    model = Branchy().double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)
    obj = ss.Objective.from_model(model, nn.functional.mse_loss, (x, y))
    points = obj.theta0 + torch.randn(5, obj.n_params, dtype=torch.float64)
    losses, method = evaluate_many(obj, points)
    assert method == "loop"
    assert torch.allclose(losses, torch.stack([obj.loss(p) for p in points]))


def test_given_directions_and_bad_input():
    obj = ss.problems.saddle_quadratic()
    e1, e2 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    view = ss.landscape(obj, directions=[e1, e2], span=(-1.0, 1.0), resolution=3)
    assert view.losses.tolist() == [[4.0, -1.0, 4.0], [5.0, 0.0, 5.0], [4.0, -1.0, 4.0]]  # 5a^2 - b^2
    line = ss.landscape(obj, directions=e2, resolution=3)
    assert line.losses.tolist() == [-1.0, 0.0, -1.0]
    for kwargs in ({"directions": "pca"}, {"directions": torch.zeros(2, dtype=torch.float64)},
                   {"directions": torch.ones(3)}, {"resolution": 1}, {"span": -1.0}, {"dim": 3}):
        with pytest.raises(errors.InvalidInputError):
            ss.landscape(obj, **kwargs)


def test_trajectory_pca_recovers_a_planted_plane(tmp_path):
    gen = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(50, 2, generator=gen, dtype=torch.float64))
    steps = torch.linspace(0, 1, 40, dtype=torch.float64)
    coords = torch.stack([3 * (1 - steps), torch.sin(6 * steps) * (1 - steps)], dim=1)  # ends at the origin
    end = torch.randn(50, generator=gen, dtype=torch.float64)
    path = end + coords @ basis.T + 1e-9 * torch.randn(40, 50, generator=gen, dtype=torch.float64)
    proj = ss.trajectory_pca(path)
    assert float(proj.explained.sum()) > 1 - 1e-12
    # The PCA plane is the planted one: projecting the basis onto it loses nothing.
    assert float(torch.linalg.det(proj.directions @ basis).abs()) == pytest.approx(1.0, abs=1e-8)
    assert torch.allclose(proj.coords.norm(dim=1), coords.norm(dim=1), atol=1e-7)

    obj = ss.Objective.from_function(lambda t: ((t - end) ** 2).sum() + t[0] ** 3 * 0.01, end)
    view = ss.landscape(obj, end, directions=list(proj.directions), span=3.5, resolution=11)
    png = plot_landscape(view, tmp_path / "pca.png", trajectory=proj)
    line = plot_landscape(ss.landscape(obj, end, dim=1, resolution=11), tmp_path / "line.png")
    for f in (png, line):
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(errors.InvalidInputError):
        ss.trajectory_pca(path[:2])
    assert math.isfinite(view.center_loss)
