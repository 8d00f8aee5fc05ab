"""Objective.from_model on data, losses and models of other shapes.

Truth comes from outside saddlescope: full-data losses written out by hand over all samples at once,
their gradients by ``torch.autograd.grad`` and their Hessians by ``torch.autograd.functional.hessian``
of a function of the flat parameter vector built here (its own split into named tensors).
"""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

import saddlescope as ss
from saddlescope import errors
from saddlescope.loading import LOSSES, model_objective, resolve_loss


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def unflatten(theta, reference):
    """theta split into tensors shaped like ``reference`` (a dict), in its order."""
    sizes = [t.numel() for t in reference.values()]
    return {n: t.view(r.shape) for (n, r), t in zip(reference.items(), torch.split(theta, sizes))}


def assert_matches(obj, full_loss, theta):
    """obj's loss, gradient and Hessian at theta against ``full_loss(theta)`` differentiated by torch."""
    leaf = theta.detach().clone().requires_grad_(True)
    value = full_loss(leaf)
    (grad,) = torch.autograd.grad(value, leaf)
    hessian = torch.autograd.functional.hessian(full_loss, theta)
    assert float(obj.loss(theta)) == pytest.approx(float(value), rel=1e-12)
    assert rel_err(obj.grad(theta), grad) < 1e-12
    assert rel_err(obj.hessian(theta), hessian) < 1e-12
    v = torch.randn(theta.numel(), dtype=theta.dtype)
    assert rel_err(obj.hvp(theta, v), hessian @ v) < 1e-12


def regression_problem(n=17, seed=0):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return model, x, y


def module_loss(model, x, y, loss_of_outputs):
    """The full-data loss of ``model`` as a function of its flat parameters (all samples in one call)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    return lambda theta: loss_of_outputs(functional_call(model, unflatten(theta, params), (x,)), y)


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# ------------------------------------------------------------------ 2. data that change between passes
class ReplayLoader:
    """A re-iterable loader that yields ``passes[k]`` on its k-th pass (the last one thereafter)."""

    def __init__(self, *passes):
        self.passes, self.count = passes, 0

    def __iter__(self):
        self.count += 1
        return iter(self.passes[min(self.count, len(self.passes)) - 1])


def chunks(x, y, bounds):
    return [(x[a:b], y[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


@pytest.mark.parametrize("drop_last", [True, False])
def test_a_reshuffling_loader_is_refused_at_construction_naming_the_fix(drop_last):
    model, x, y = regression_problem()
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True, drop_last=drop_last,
                        generator=torch.Generator().manual_seed(1))
    # What the refusal prevents: each pass is a different function of theta.
    losses = [sum(float(F.mse_loss(model(a), b)) * len(b) for a, b in loader) for _ in range(3)]
    if drop_last:
        assert len(set(losses)) == 3
    with pytest.raises(errors.DataChangedError) as caught:
        ss.Objective.from_model(model, F.mse_loss, loader)
    message = str(caught.value)
    assert "shuffle=False" in message and "max_batches=" in message and "\n" not in message
    assert "other data" in message  # same sizes every pass: it is the contents that changed


def test_max_batches_fixes_a_subset_of_a_shuffling_loader():
    model, x, y = regression_problem()

    def loader():
        return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True, drop_last=True,
                          generator=torch.Generator().manual_seed(2))

    obj = ss.Objective.from_model(model, F.mse_loss, loader(), max_batches=3)
    kept = list(loader())[:3]  # the same generator seed draws the same first permutation
    xs, ys = torch.cat([a for a, _ in kept]), torch.cat([b for _, b in kept])
    theta = obj.theta0
    assert [float(obj.loss(theta)) for _ in range(3)] == [float(obj.loss(theta))] * 3
    assert_matches(obj, module_loss(model, xs, ys, F.mse_loss), theta)
    assert obj.n_samples == 12


def test_a_loader_that_yields_the_same_batches_in_another_order_is_accepted():
    model, x, y = regression_problem()
    batches = chunks(x, y, [0, 3, 9, 17])
    rotating = ReplayLoader(batches, batches[1:] + batches[:1], batches[::-1])
    obj = ss.Objective.from_model(model, F.mse_loss, rotating)
    assert_matches(obj, module_loss(model, x, y, F.mse_loss), flat_params(model))
    assert rotating.count > 3  # it really was re-read, in the other orders


def test_a_loader_that_changes_after_construction_is_caught_on_the_next_pass():
    model, x, y = regression_problem()
    same = chunks(x, y, [0, 8, 17])
    regrouped = chunks(x, y, [0, 9, 17])  # the same samples, other batches
    noisy = [(a + 1e-3 * torch.randn_like(a), b) for a, b in same]  # a random transform
    for changed, detail in ((regrouped, "2 of 2 batches hold other data"), (noisy, "2 of 2 batches"),
                            (same[:1], "8 samples in 1 batches, the first 17 in 2")):
        obj = ss.Objective.from_model(model, F.mse_loss, ReplayLoader(same, same, changed))  # 2 passes here
        with pytest.raises(errors.DataChangedError, match=detail):
            obj.grad(obj.theta0)
        with pytest.raises(errors.DataChangedError):  # and on every later pass
            obj.hessian(obj.theta0)


# -------------------------------------------------------------------------------- 3. losses that sum
def summing_losses():
    def plain_sum(outputs, targets):
        return ((outputs - targets) ** 2).sum()

    def declared_sum(outputs, targets):
        return ((outputs - targets) ** 2).sum()

    declared_sum.reduction = "sum"
    return {
        "nn.MSELoss(reduction='sum')": (nn.MSELoss(reduction="sum"), None),
        "partial(F.mse_loss, reduction='sum')": (functools.partial(F.mse_loss, reduction="sum"), None),
        "function with reduction='sum' argument": (plain_sum, "sum"),
        "function with fn.reduction = 'sum'": (declared_sum, None),
    }


@pytest.mark.parametrize("name", list(summing_losses()))
def test_a_summing_loss_over_three_batches_is_the_full_data_sum(name):
    loss_fn, reduction = summing_losses()[name]
    model, x, y = regression_problem()
    obj = ss.Objective.from_model(model, loss_fn, chunks(x, y, [0, 2, 11, 17]), reduction=reduction)
    assert obj.description["reduction"] == "sum"

    def full_sum(theta):
        return F.mse_loss(functional_call(model, unflatten(theta, dict(model.named_parameters())), (x,)), y,
                          reduction="sum")

    theta = flat_params(model) + 0.1 * torch.randn(obj.n_params, dtype=torch.float64)
    assert_matches(obj, full_sum, theta)
    # What mean weighting would have reported (sum_b n_b * sum_b / N): far from the true sum.
    with torch.no_grad():
        weighted = sum(len(b) * float(F.mse_loss(model(a), b, reduction="sum"))
                       for a, b in chunks(x, y, [0, 2, 11, 17]))
        truth = float(F.mse_loss(model(x), y, reduction="sum"))
    assert abs(weighted / 17 - truth) > 0.1 * truth


def test_a_summed_cross_entropy_and_a_batchmean_kl_divergence_are_exact():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(13, 4, dtype=torch.float64)
    labels = torch.randint(0, 3, (13,))
    targets = torch.softmax(torch.randn(13, 3, dtype=torch.float64), 1)
    bounds = [0, 5, 6, 13]
    summed = ss.Objective.from_model(model, nn.CrossEntropyLoss(reduction="sum"), chunks(x, labels, bounds))
    assert_matches(summed, module_loss(model, x, labels, functools.partial(F.cross_entropy, reduction="sum")),
                   flat_params(model))

    def kl(outputs, probabilities):  # KLDivLoss(batchmean): the sum over a sample, the mean over samples
        return F.kl_div(F.log_softmax(outputs, 1), probabilities, reduction="batchmean")

    kl_loss = nn.KLDivLoss(reduction="batchmean")
    batchmean = ss.Objective.from_model(model, lambda out, p: kl_loss(F.log_softmax(out, 1), p),
                                        chunks(x, targets, bounds), reduction="mean")
    assert_matches(batchmean, module_loss(model, x, targets, kl), flat_params(model))
    # Read from the loss itself (a module whose forward takes log-probabilities).
    log_model = nn.Sequential(model, nn.LogSoftmax(1))
    declared = ss.Objective.from_model(log_model, kl_loss, chunks(x, targets, bounds))
    assert declared.description["reduction"] == "mean"
    expected = float(batchmean.loss(batchmean.theta0))
    assert float(declared.loss(declared.theta0)) == pytest.approx(expected, rel=1e-12)


def test_a_per_sample_loss_or_a_contradiction_is_refused_with_the_fix():
    model, x, y = regression_problem()
    cases = [
        ((nn.MSELoss(reduction="none"), None), ["reduction='none'", "one per sample", "reduction='mean'"]),
        ((F.mse_loss, "none"), ["reduction='none'", "'sum'"]),
        ((functools.partial(F.mse_loss, reduction="none"), None), ["reduction='none'"]),
        ((nn.MSELoss(reduction="sum"), "mean"), ["reduction='sum' but reduction='mean' was passed"]),
        ((F.mse_loss, "average"), ["reduction='average'"]),
    ]
    for (loss_fn, reduction), needles in cases:
        with pytest.raises(errors.InvalidInputError) as caught:
            ss.Objective.from_model(model, loss_fn, (x, y), reduction=reduction)
        for needle in needles:
            assert needle in str(caught.value), (needle, str(caught.value))
    agreeing = ss.Objective.from_model(model, nn.MSELoss(reduction="sum"), (x, y), reduction="sum")
    assert agreeing.description["reduction"] == "sum"


def test_named_losses_declare_a_mean_and_a_users_summing_loss_is_kept():
    model, x, y = regression_problem()
    for name in LOSSES:
        if name != "auto":
            assert resolve_loss(name)[0].reduction == "mean", name
    batches = chunks(x, y, [0, 5, 17])
    named = model_objective(model, batches, "mse", dtype=torch.float64)
    assert named.description["reduction"] == "mean" and named.description["loss"] == "mse"
    assert_matches(named, module_loss(model, x, y, F.mse_loss), flat_params(model))
    own = model_objective(model, batches, nn.MSELoss(reduction="sum"), dtype=torch.float64)
    assert own.description["reduction"] == "sum"
    assert_matches(own, module_loss(model, x, y, functools.partial(F.mse_loss, reduction="sum")),
                   flat_params(model))


# ------------------------------------------------------------------ 4. inputs and models of other shapes
class BatchDictModel(nn.Module):
    """``forward(self, batch)``: takes the whole dict as one argument."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(6, 3)
        self.head = nn.Linear(3 + 2, 4)

    def forward(self, batch, temperature=1.0):
        features = torch.cat([torch.tanh(self.emb(batch["tokens"]).mean(1)), batch["extra"]], 1)
        return self.head(features) / temperature


def test_a_dict_goes_whole_to_a_forward_that_takes_one_batch_argument():
    torch.manual_seed(4)
    model = BatchDictModel().double()
    tokens, extra = torch.randint(0, 6, (11, 3)), torch.randn(11, 2, dtype=torch.float64)
    labels = torch.randint(0, 4, (11,))
    batches = [({"tokens": tokens[a:b], "extra": extra[a:b]}, labels[a:b]) for a, b in ((0, 4), (4, 11))]
    obj = ss.Objective.from_model(model, F.cross_entropy, batches)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def full_loss(theta):
        outputs = functional_call(model, unflatten(theta, params), ({"tokens": tokens, "extra": extra},))
        return F.cross_entropy(outputs, labels)

    assert_matches(obj, full_loss, flat_params(model) + 0.1 * torch.randn(obj.n_params, dtype=torch.float64))


def test_a_dict_that_fits_neither_way_is_refused_naming_keys_and_parameters():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 1)

        def forward(self, x, z):
            return self.lin(x) + z

    inputs = {"a": torch.randn(3, 2), "b": torch.randn(3, 1)}
    with pytest.raises(errors.BatchShapeError, match=r"keys \['a', 'b'\], but TwoInputs.forward\(x, z\)"):
        ss.Objective.from_model(TwoInputs(), F.mse_loss, (inputs, torch.randn(3, 1)))


def mlp_function(params, x):
    """A torch.func-style model: parameters as a dict of named tensors, then the inputs."""
    hidden = torch.tanh(x @ params["w1"].T + params["b1"])
    return hidden @ params["w2"].T + params["b2"]


def mlp_params(seed=5):
    generator = torch.Generator().manual_seed(seed)
    shapes = {"w1": (4, 3), "b1": (4,), "w2": (2, 4), "b2": (2,)}
    return {n: torch.randn(s, generator=generator, dtype=torch.float64) for n, s in shapes.items()}


def test_a_functional_model_gives_the_hessian_of_the_same_function():
    _, x, y = regression_problem()
    params = mlp_params()
    obj = ss.Objective.from_model(mlp_function, F.mse_loss, chunks(x, y, [0, 6, 17]), params=params)
    assert obj.param_names == ["w1", "b1", "w2", "b2"] and obj.n_params == 12 + 4 + 8 + 2
    assert obj.description["model"] == "mlp_function"
    theta = torch.cat([t.reshape(-1) for t in params.values()])
    assert torch.equal(obj.theta0, theta)
    assert_matches(obj, lambda flat: F.mse_loss(mlp_function(unflatten(flat, params), x), y), theta + 0.2)
    assert set(obj.blocks("parameter")) == set(params)


def test_a_functional_model_with_dict_inputs_and_keyword_inputs():
    _, x, y = regression_problem()
    params = mlp_params(6)
    half = {"left": x[:, :2], "right": x[:, 2:]}

    def on_batch(params, batch):  # the dict as one argument
        return mlp_function(params, torch.cat([batch["left"], batch["right"]], 1))

    def on_keywords(params, left, right):  # the dict's keys as parameters
        return mlp_function(params, torch.cat([left, right], 1))

    batches = [({k: v[a:b] for k, v in half.items()}, y[a:b]) for a, b in ((0, 7), (7, 17))]
    theta = torch.cat([t.reshape(-1) for t in params.values()])
    for f in (on_batch, on_keywords):
        obj = ss.Objective.from_model(f, F.mse_loss, batches, params=params)
        assert_matches(obj, lambda flat: F.mse_loss(mlp_function(unflatten(flat, params), x), y), theta)


def test_a_functional_model_without_its_parameters_is_refused_with_the_api():
    _, x, y = regression_problem()
    with pytest.raises(errors.InvalidInputError, match=r"params=\{name: tensor\}"):
        ss.Objective.from_model(mlp_function, F.mse_loss, (x, y))
    with pytest.raises(errors.InvalidInputError, match="floating tensors"):
        integer = {"w1": torch.ones(2, dtype=torch.long)}
        ss.Objective.from_model(mlp_function, F.mse_loss, (x, y), params=integer)
    with pytest.raises(errors.InvalidInputError, match="train_mode"):
        ss.Objective.from_model(mlp_function, F.mse_loss, (x, y), params=mlp_params(), train_mode=True)
    model = regression_problem()[0]
    with pytest.raises(errors.InvalidInputError, match="load_state_dict"):
        ss.Objective.from_model(model, F.mse_loss, (x, y), params=dict(model.named_parameters()))
    with pytest.raises(errors.InvalidInputError, match="nn.Module or a function"):
        ss.Objective.from_model(42, F.mse_loss, (x, y))
    with pytest.raises(errors.InvalidInputError, match=r"pass an instance, BatchDictModel\(...\)"):
        ss.Objective.from_model(BatchDictModel, F.mse_loss, (x, y))
