"""Real models: frozen, unused and tied parameters, attention without double backward, reduced
precision, and verdicts on data subsets. Truth comes from hand-written functions differentiated by
torch.autograd.functional.hessian, eager attention, float64 eigvalsh and planted per-batch Hessians."""

import json

import pytest
import torch
from torch import nn
from torch.autograd.function import once_differentiable

import saddlescope as ss
from saddlescope import errors
from saddlescope.tolerances import precision_bound


# ---------------------------------------------------------------- frozen and unused parameters
class PartlyUsed(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(4, 5)
        self.out = nn.Linear(5, 2)
        self.unused = nn.Linear(3, 3)  # never called in forward
        self.spare = nn.Parameter(torch.randn(4))  # never touched either

    def forward(self, x):
        return self.out(torch.tanh(self.frozen(x)))


def test_frozen_layer_and_unused_parameters_analyse_with_the_right_dimension():
    torch.manual_seed(0)
    model = PartlyUsed().double()
    model.frozen.requires_grad_(False)
    x, y = torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 2, (30,))
    obj = ss.Objective.from_model(model, nn.functional.cross_entropy, (x, y))
    assert obj.param_names == ["spare", "out.weight", "out.bias", "unused.weight", "unused.bias"]
    assert obj.n_params == 4 + 10 + 2 + 9 + 3

    def by_hand(flat):  # the loss as a function of out.weight, out.bias only (truth)
        w, b = flat[:10].view(2, 5), flat[10:12]
        h = torch.tanh(x @ model.frozen.weight.T + model.frozen.bias)
        return nn.functional.cross_entropy(h @ w.T + b, y)

    used = torch.arange(4, 16)  # out.weight, out.bias
    expected = torch.zeros(obj.n_params, obj.n_params, dtype=torch.float64)
    expected[4:16, 4:16] = torch.autograd.functional.hessian(by_hand, obj.theta0[used])
    assert torch.allclose(obj.hessian(obj.theta0), expected, atol=1e-12)
    grad = obj.grad(obj.theta0)
    assert torch.count_nonzero(grad) == torch.count_nonzero(grad[used]) > 0

    cp = ss.analyze(obj)  # no crash; the unused coordinates are 16 exact zeros
    assert cp.n_params == 28 and cp.n_zero >= 16
    report = ss.per_block(obj, by="module")
    rows = {r.name: r for r in report.rows}
    assert set(rows) == {"out", "unused", "(root)"}
    assert rows["unused"].lambda_max == 0 and rows["(root)"].trace == 0
    only = ss.Objective.from_model(model, nn.functional.cross_entropy, (x, y), params=["out.weight"])
    assert only.n_params == 10


def test_a_model_with_nothing_trainable_is_refused():
    model = nn.Linear(3, 1).requires_grad_(False)
    with pytest.raises(errors.NoTrainableParametersError, match="requires_grad"):
        ss.Objective.from_model(model, nn.functional.mse_loss, (torch.randn(4, 3), torch.randn(4, 1)))


# ---------------------------------------------------------------- tied weights
class TiedLM(nn.Module):
    def __init__(self, vocab=7, dim=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight  # a language model's tied input and output embedding

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.emb(ids))))


def test_tied_weights_are_one_parameter_counted_once():
    torch.manual_seed(1)
    model = TiedLM().double()
    ids, targets = torch.randint(0, 7, (20,)), torch.randint(0, 7, (20,))
    obj = ss.Objective.from_model(model, nn.functional.cross_entropy, (ids, targets))
    assert obj.param_names == ["emb.weight", "mix.weight", "mix.bias"]
    assert obj.n_params == 7 * 3 + 3 * 3 + 3

    def by_hand(flat):  # the shared matrix E enters twice: lookup and output projection
        emb, w, b = flat[:21].view(7, 3), flat[21:30].view(3, 3), flat[30:]
        return nn.functional.cross_entropy(torch.tanh(emb[ids] @ w.T + b) @ emb.T, targets)

    expected = torch.autograd.functional.hessian(by_hand, obj.theta0)
    assert torch.allclose(obj.hessian(obj.theta0), expected, atol=1e-12)
    assert torch.allclose(obj.grad(obj.theta0), torch.func.grad(by_hand)(obj.theta0), atol=1e-12)


# ---------------------------------------------------------------- attention without double backward
class TinyAttention(nn.Module):
    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, 1)

    def forward(self, x, fused=True):
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(x).chunk(3, dim=-1))
        if fused:
            h = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # the textbook formula: ordinary differentiable operations
            scores = (q @ k.transpose(-1, -2)) / (q.shape[-1] ** 0.5)
            mask = torch.ones(t, t, dtype=torch.bool).tril()
            h = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        return self.out(h.transpose(1, 2).reshape(b, t, d)).mean(dim=(1, 2))


def test_sdpa_hvps_fall_back_to_the_math_kernel_and_say_so():
    torch.manual_seed(2)
    model = TinyAttention().double()
    x, y = torch.randn(3, 5, 8, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    fused = ss.Objective.from_model(model, nn.functional.mse_loss, (x, y))
    manual = ss.Objective.from_model(lambda_module(model), nn.functional.mse_loss, (x, y))
    v = torch.randn(fused.n_params, dtype=torch.float64)
    assert torch.allclose(fused.hvp(fused.theta0, v), manual.hvp(manual.theta0, v), atol=1e-10)
    assert fused.math_attention and "math attention kernel" in fused.notes[0]
    assert not manual.notes
    cp = ss.analyze(fused)
    assert any("math attention" in note for note in cp.notes)
    assert json.loads(json.dumps(cp.to_dict()))["notes"] == cp.notes


def lambda_module(model):
    class Manual(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x, fused=False)

    return Manual()


class NoSecondDerivative(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad


def test_an_operation_without_second_derivative_gets_a_clear_error():
    model = nn.Linear(3, 1).double()
    obj = ss.Objective.from_model(
        model, lambda out, y: NoSecondDerivative.apply(out - y).mean(),
        (torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)),
    )
    with pytest.raises(errors.UnsupportedModelError, match="no second derivative"):
        obj.hvp(obj.theta0, torch.ones(4, dtype=torch.float64))


def test_hugging_face_gpt2_with_default_attention_matches_eager():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = dict(n_layer=2, n_head=2, n_embd=16, vocab_size=40, n_positions=16, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(3)
    default = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).double()
    assert default.config._attn_implementation != "eager"  # else this test proves nothing
    eager = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config, attn_implementation="eager")).double()
    eager.load_state_dict(default.state_dict())
    ids = torch.randint(0, 40, (3, 10))

    def loss_fn(out, targets):  # next-token prediction on the outputs' .logits
        return nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 40), targets[:, 1:].reshape(-1))

    objs = [ss.Objective.from_model(m, loss_fn, ({"input_ids": ids}, ids)) for m in (default, eager)]
    assert objs[0].n_params == sum(p.numel() for p in default.parameters())
    assert "lm_head.weight" not in objs[0].param_names  # tied to the token embedding: counted once
    vs = torch.randn(2, objs[0].n_params, dtype=torch.float64)
    products = [o.gradient_graph(o.theta0).hvp_batch(vs) for o in objs]
    assert torch.allclose(products[0], products[1], rtol=1e-9, atol=1e-11)
    assert objs[0].notes and not objs[1].notes


# ---------------------------------------------------------------- precision
@pytest.fixture(scope="module")
def trained_mlp():
    from saddlescope.problems.digits import digits_mlp

    problem = digits_mlp((16,), dtype=torch.float64, seed=1, n_samples=400)
    opt = torch.optim.Adam(problem.model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        problem.loss_fn(problem.model(problem.inputs), problem.targets).backward()
        opt.step()
    theta = torch.cat([p.detach().reshape(-1) for p in problem.model.parameters()])
    reference = torch.linalg.eigvalsh(problem.objective.hessian(theta))
    return problem, reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_eigenvalues_agree_with_float64_to_the_stated_bound(trained_mlp, dtype):
    problem, reference = trained_mlp
    obj = ss.Objective.from_model(problem.model, problem.loss_fn, (problem.inputs, problem.targets), dtype=dtype)
    bound = precision_bound(dtype, float(reference.abs().max()))
    result = ss.eigs(ss.HessianOperator(obj), 3, "both", tol=1e-8, relative_to="value")
    assert result.dtype == "torch.float64" and result.operator_dtype == str(dtype)
    truth = torch.cat([reference[:3], reference[-3:]])
    assert (result.eigenvalues - truth).abs().max() <= bound
    cp = ss.analyze(obj, exact=True, probe=False)
    assert (cp.eigenvalues.double() - reference).abs().max() <= bound
    precision = cp.to_dict()["precision"]
    assert precision["model"] == str(dtype) and precision["eigensolver"] in ("torch.float32", "torch.float64")
    # The zero threshold never lets rounding noise pass for negative curvature.
    assert cp.tolerances.zero_threshold >= precision["eigenvalue_rounding"] or dtype == torch.float32
    if dtype == torch.bfloat16:
        assert any("float32" in note for note in cp.notes)


# ---------------------------------------------------------------- subsets
def planted_batches(lowest):
    """Batches whose Hessians at w = 0 are diag(lowest_b, 1, 2) for the loss mean(0.5 (x.w)^2)."""
    batches = []
    for low in lowest:
        diag = torch.tensor([low, 1.0, 2.0], dtype=torch.float64)
        # x_j = sqrt(3 |a_j|) e_j with a sign flip for negative curvature: H = mean_j s_j x_j x_j^T
        x = torch.diag(torch.sqrt(3 * diag.abs()))
        batches.append((x, torch.sign(diag)))
    return batches


def planted_loss(out, sign):
    return 0.5 * (sign * out.squeeze(-1) ** 2).mean()


def test_max_batches_uses_a_fixed_recorded_subset():
    torch.manual_seed(4)
    data = torch.utils.data.TensorDataset(torch.randn(64, 3), torch.randn(64, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)
    model = nn.Linear(3, 1)
    obj = ss.Objective.from_model(model, nn.functional.mse_loss, loader, max_batches=2)
    assert obj.n_samples == 16 and obj.description["subset"]["batches"] == 2
    assert float(obj.loss(obj.theta0)) == float(obj.loss(obj.theta0))  # the same subset every pass
    with pytest.raises(errors.InvalidInputError, match="max_batches"):
        ss.Objective.from_model(model, nn.functional.mse_loss, loader, max_batches=0)


def test_stability_reports_the_planted_spread_and_warns():
    lowest = [-0.1, 0.05, 0.2, -0.05]
    model = nn.Linear(3, 1, bias=False).double()
    nn.init.zeros_(model.weight)  # w = 0: a critical point of every batch's loss
    batches = planted_batches(lowest)
    for (x, s), low in zip(batches, lowest):  # the construction is right
        obj = ss.Objective.from_model(model, planted_loss, (x, s))
        assert torch.allclose(obj.hessian(obj.theta0), torch.diag(torch.tensor([low, 1.0, 2.0], dtype=torch.float64)))
    report = ss.stability(batches, model, planted_loss)
    truth = torch.tensor(lowest, dtype=torch.float64)
    assert report.lambda_min.mean == pytest.approx(float(truth.mean()), abs=1e-12)
    assert report.lambda_min.std == pytest.approx(float(truth.std()), abs=1e-12)
    assert report.lambda_max.std == pytest.approx(0.0, abs=1e-12)
    assert [s.kind for s in report.subsets] == ["saddle", "minimum", "minimum", "saddle"]
    assert report.verdict_agreement == 0.5 and report.curvature_agreement == 0.5
    assert any("sign depends on the data" in w for w in report.warnings)
    json.dumps(report.to_dict())

    steady = ss.stability(planted_batches([0.5, 0.55, 0.45, 0.5]), model, planted_loss, batches_per_subset=2)
    assert len(steady.subsets) == 2 and steady.verdict == "minimum" and steady.verdict_agreement == 1.0
    assert steady.lambda_min.mean == pytest.approx(0.5, abs=1e-12) and not steady.warnings


def test_stability_with_a_factory_and_bad_arguments():
    made = []

    def factory(i):
        made.append(i)
        return ss.Objective.from_function(lambda t: (1 + 0.1 * i) * t[0] ** 2 - t[1] ** 2 * (i - 1.5), [0.0, 0.0])

    report = ss.stability(factory, n_subsets=4)
    assert made == [0, 1, 2, 3]
    assert [s.curvature_kind for s in report.subsets] == ["minimum", "minimum", "saddle", "saddle"]
    with pytest.raises(errors.InvalidInputError, match="n_subsets"):
        ss.stability(factory)
    with pytest.raises(errors.InvalidInputError, match="model and loss_fn"):
        ss.stability([(torch.zeros(2, 3), torch.zeros(2))])
    with pytest.raises(errors.InvalidInputError, match="disjoint subsets"):
        ss.stability(planted_batches([0.1]), nn.Linear(3, 1), planted_loss)
    with pytest.raises(errors.InvalidInputError, match="not an Objective"):
        ss.stability(lambda i: 3, n_subsets=2)
