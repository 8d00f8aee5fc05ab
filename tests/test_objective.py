"""Objective: loss, gradient, HVP and exact Hessian against finite differences and torch.func."""

import pytest
import torch
from torch import nn

import saddlescope as ss


def fd_hessian(obj, theta, h=1e-5):
    """Central finite differences of the gradient, column by column (not our Hessian code)."""
    n = theta.numel()
    cols = []
    for j in range(n):
        e = torch.zeros(n, dtype=theta.dtype)
        e[j] = h
        cols.append((obj.grad(theta + e) - obj.grad(theta - e)) / (2 * h))
    fd = torch.stack(cols, 1)
    return 0.5 * (fd + fd.T)


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("activation,sizes", [("tanh", (5, 4, 3)), ("sigmoid", (4, 6, 2)), ("softplus", (3, 5, 5, 2))])
def test_exact_hessian_matches_finite_differences_on_random_mlps(activation, sizes):
    torch.manual_seed(len(sizes))
    model = ss.problems.mlp(sizes, activation).double()
    x = torch.randn(23, sizes[0], dtype=torch.float64)
    y = torch.randint(0, sizes[-1], (23,))
    obj = ss.Objective.from_model(model, nn.functional.cross_entropy, (x, y))
    theta = obj.theta0 + 0.3 * torch.randn(obj.n_params, dtype=torch.float64)
    hess = obj.hessian(theta)
    assert rel_err(hess, fd_hessian(obj, theta)) < 1e-7
    assert torch.equal(hess, hess.T)


def test_exact_hessian_matches_torch_func_hessian():
    torch.manual_seed(1)
    model = ss.problems.mlp((6, 8, 3), "tanh").double()
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randn(40, 3, dtype=torch.float64)
    obj = ss.Objective.from_model(model, nn.functional.mse_loss, (x, y))
    names, shapes = obj.param_names, obj.param_shapes
    sizes = [s.numel() for s in shapes]

    def f(theta):
        params = {n: t.view(s) for n, t, s in zip(names, torch.split(theta, sizes), shapes)}
        return nn.functional.mse_loss(torch.func.functional_call(model, params, (x,)), y)

    reference = torch.func.hessian(f)(obj.theta0)
    assert rel_err(obj.hessian(obj.theta0, chunk_size=7), reference) < 1e-12


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        h = torch.tanh(self.bn(self.conv(x)))
        return self.head(self.drop(h.flatten(1)))


def test_cnn_with_batchnorm_in_eval_mode_matches_finite_differences():
    torch.manual_seed(2)
    model = SmallCNN().double()
    with torch.no_grad():  # non-trivial running statistics, which must be held fixed
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    x = torch.randn(10, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (10,))
    obj = ss.Objective.from_model(model, nn.functional.cross_entropy, (x, y))
    assert obj.mode == "eval"
    theta = obj.theta0
    # The loss is deterministic (dropout off) and uses the running statistics.
    model.eval()
    with torch.no_grad():
        assert float(obj.loss(theta)) == pytest.approx(float(nn.functional.cross_entropy(model(x), y)), rel=1e-12)
    model.train()
    assert rel_err(obj.hessian(theta), fd_hessian(obj, theta)) < 1e-7
    assert model.training  # the model's own mode is restored
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_batches_are_weighted_by_size_so_the_hessian_is_the_full_data_one():
    torch.manual_seed(3)
    model = ss.problems.mlp((4, 5, 3), "tanh").double()
    x, y = torch.randn(17, 4, dtype=torch.float64), torch.randint(0, 3, (17,))
    whole = ss.Objective.from_model(model, nn.functional.cross_entropy, (x, y))
    parts = [(x[:2], y[:2]), (x[2:11], y[2:11]), (x[11:], y[11:])]
    split = ss.Objective.from_model(model, nn.functional.cross_entropy, parts)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)
    lazy = ss.Objective.from_model(model, nn.functional.cross_entropy, loader)
    oneshot = ss.Objective.from_model(model, nn.functional.cross_entropy, iter(parts))
    theta = whole.theta0
    v = torch.randn(whole.n_params, dtype=torch.float64)
    for other in (split, lazy, oneshot):
        assert float(other.loss(theta)) == pytest.approx(float(whole.loss(theta)), rel=1e-13)
        assert rel_err(other.grad(theta), whole.grad(theta)) < 1e-12
        assert rel_err(other.hvp(theta, v), whole.hvp(theta, v)) < 1e-12
        assert rel_err(other.hessian(theta), whole.hessian(theta)) < 1e-12
    assert lazy.n_samples == 17


def test_hvp_and_gradient_graph_agree_with_the_hessian():
    torch.manual_seed(4)
    model = ss.problems.mlp((3, 4, 2), "tanh").double()
    x, y = torch.randn(9, 3, dtype=torch.float64), torch.randint(0, 2, (9,))
    obj = ss.Objective.from_model(model, nn.functional.cross_entropy, [(x[:4], y[:4]), (x[4:], y[4:])])
    theta = obj.theta0
    hess = obj.hessian(theta)
    vs = torch.randn(5, obj.n_params, dtype=torch.float64)
    for keep in (True, False):
        graph = obj.gradient_graph(theta, keep_graphs=keep)
        assert rel_err(graph.hvp_batch(vs), vs @ hess) < 1e-12
        assert rel_err(graph.hvp(vs[0]), hess @ vs[0]) < 1e-12
        assert graph.hvp_count == 6
        assert rel_err(graph.grad, obj.grad(theta)) < 1e-14


class DictModel(nn.Module):
    """Takes keyword inputs, as Hugging Face models do."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.out = nn.Linear(4, 7)

    def forward(self, input_ids, scale):
        return self.out(torch.tanh(self.emb(input_ids).mean(1) * scale))


def test_dict_inputs_are_passed_as_keywords():
    torch.manual_seed(5)
    model = DictModel().double()
    inputs = {"input_ids": torch.randint(0, 7, (6, 3)), "scale": torch.full((6, 1), 0.5, dtype=torch.float64)}
    y = torch.randint(0, 7, (6,))
    obj = ss.Objective.from_model(model, nn.functional.cross_entropy, (inputs, y))
    with torch.no_grad():
        assert float(obj.loss(obj.theta0)) == pytest.approx(float(nn.functional.cross_entropy(model(**inputs), y)))
    theta = obj.theta0 + 0.1 * torch.randn(obj.n_params, dtype=torch.float64)
    assert rel_err(obj.hessian(theta), fd_hessian(obj, theta)) < 1e-7


def test_frozen_parameters_are_held_fixed():
    model = ss.problems.mlp((3, 4, 2), "tanh").double()
    model[0].weight.requires_grad_(False)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    obj = ss.Objective.from_model(model, nn.functional.cross_entropy, (x, y))
    assert obj.param_names == ["0.bias", "2.weight", "2.bias"]
    assert obj.n_params == 4 + 8 + 2
    named = ss.Objective.from_model(model, nn.functional.cross_entropy, (x, y), params=["2.bias"])
    assert named.n_params == 2


def test_float32_model_with_float64_analysis():
    model = ss.problems.mlp((3, 4, 2), "tanh")  # float32 parameters
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    obj = ss.Objective.from_model(model, nn.functional.cross_entropy, (x, y), dtype=torch.float64)
    assert obj.dtype == torch.float64 and obj.theta0.dtype == torch.float64
    assert next(model.parameters()).dtype == torch.float32  # the model itself is untouched
    assert rel_err(obj.hessian(obj.theta0), fd_hessian(obj, obj.theta0)) < 1e-7
