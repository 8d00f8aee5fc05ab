"""Kept and rebuilt gradient graphs (GradientGraph's plan) give the same products, the full-data ones.

Truth comes from outside saddlescope: the full-data loss written by hand with ``torch.func.functional_call``
(each batch's mean weighted by its size) and ``torch.autograd.functional.hessian`` of it, times the vectors.
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call

import saddlescope as ss
from saddlescope import memory
from saddlescope.errors import InvalidInputError
from saddlescope.objective import GraphPlan, one_time_costs
from saddlescope.objective import graph as graph_module


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


class BatchNormCNN(nn.Module):
    """Conv, BatchNorm (eval mode: running statistics, which are fixed buffers), ReLU, pooling, linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(3, 4)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class LayerNormNet(nn.Module):
    """LayerNorm between two linear layers (its double backward is what torch.func gets wrong in 2.13)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inp(x))))


def mlp_case():
    model = ss.problems.mlp((5, 6, 3), "tanh").double()
    x = torch.randn(16, 5, dtype=torch.float64)
    return model, x, torch.randint(0, 3, (16,))


def cnn_case():
    model = BatchNormCNN().double()
    with torch.no_grad():  # running statistics away from 0/1, so eval-mode BatchNorm is not the identity
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
    x = torch.randn(16, 1, 5, 5, dtype=torch.float64)
    return model, x, torch.randint(0, 4, (16,))


def layernorm_case():
    model = LayerNormNet().double()
    x = torch.randn(16, 5, dtype=torch.float64)
    return model, x, torch.randint(0, 3, (16,))


CASES = {"mlp": mlp_case, "batchnorm_cnn": cnn_case, "layernorm": layernorm_case}
SPLITS = ((0, 5), (5, 12), (12, 16))  # three batches of unequal size


def batches(x, y):
    return [(x[a:b], y[a:b]) for a, b in SPLITS]


def hessian_by_hand(model, x, y, theta):
    """The full-data Hessian, independently of saddlescope: the size-weighted mean of the batch losses."""
    model.eval()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    buffers = dict(model.named_buffers())

    def loss(flat):
        params = dict(zip(names, (t.view(s) for t, s in zip(torch.split(flat, [s.numel() for s in shapes]), shapes))))
        total = 0.0
        for xb, yb in batches(x, y):
            out = functional_call(model, {**params, **buffers}, (xb,))
            total = total + xb.shape[0] * nn.functional.cross_entropy(out, yb)
        return total / x.shape[0]

    return torch.autograd.functional.hessian(loss, theta)


@pytest.mark.parametrize("case", list(CASES))
def test_kept_rebuilt_and_partly_kept_graphs_give_the_full_data_products(case):
    torch.manual_seed(7)
    model, x, y = CASES[case]()
    obj = ss.Objective.from_model(model, nn.functional.cross_entropy, batches(x, y))
    theta = obj.theta0 + 0.2 * torch.randn(obj.n_params, dtype=torch.float64)
    vs = torch.randn(4, obj.n_params, dtype=torch.float64)
    truth = vs @ hessian_by_hand(model, x, y, theta)

    kept = obj.gradient_graph(theta, keep_graphs=True)
    rebuilt = obj.gradient_graph(theta, keep_graphs=False)
    auto = obj.gradient_graph(theta)
    one_graph = int(1.5 * auto.plan.bytes_per_graph)  # room for the first batch's graph, not the second's
    partial = obj.gradient_graph(theta, memory_budget=one_graph)
    none_kept = obj.gradient_graph(theta, memory_budget=0)

    assert (kept.plan.kept, rebuilt.plan.kept, auto.plan.kept, partial.plan.kept, none_kept.plan.kept) == (3, 0, 3, 1, 0)
    for graph in (kept, rebuilt, auto, partial, none_kept):
        assert rel_err(graph.hvp_batch(vs), truth) < 1e-12
        assert rel_err(graph.hvp(vs[0]), truth[0]) < 1e-12
        assert rel_err(graph.hvp(vs[1]), truth[1]) < 1e-12  # kept graphs are reused, not consumed
        assert graph.hvp_count == 6
    reference = rebuilt.hvp_batch(vs)
    for graph in (kept, auto, partial, none_kept):
        assert rel_err(graph.hvp_batch(vs), reference) < 1e-12


@pytest.mark.parametrize("keep_graphs", [True, False])
def test_a_batch_of_products_runs_in_passes_that_fit_the_byte_cap(monkeypatch, keep_graphs):
    """A vmapped pass holds one copy of the graph's activations per row: rows go in passes of as many as
    keep the estimate under the cap, each batch's graph built once per batch of products, not per pass."""
    torch.manual_seed(9)
    model, x, y = cnn_case()
    obj = ss.Objective.from_model(model, nn.functional.cross_entropy, batches(x, y))
    theta = obj.theta0 + 0.2 * torch.randn(obj.n_params, dtype=torch.float64)
    vs = torch.randn(5, obj.n_params, dtype=torch.float64)
    truth = vs @ hessian_by_hand(model, x, y, theta)
    graph = obj.gradient_graph(theta, keep_graphs=keep_graphs)
    assert graph.rows_per_pass(5) == 5 and graph.rows_per_pass(1) == 1  # a small model: one pass
    row = graph._row_bytes
    assert row >= graph_module.PRODUCT_ROW_VECTORS * 8 * obj.n_params

    passes, builds = [], []
    backward, build = graph_module._backward, graph._build
    monkeypatch.setattr(graph_module, "_backward", lambda g, leaf, block, **kw: passes.append(block.shape[0]) or
                        backward(g, leaf, block, **kw))
    monkeypatch.setattr(graph, "_build", lambda batch: builds.append(batch) or build(batch))
    monkeypatch.setattr(graph_module, "BATCHED_PRODUCT_BYTES", 2 * row + 1)  # room for two rows a pass
    assert graph.rows_per_pass(5) == 2
    assert rel_err(graph.hvp_batch(vs), truth) < 1e-12
    assert passes == [2, 2, 1] * 3  # three batches, three passes each
    assert len(builds) == (0 if keep_graphs else 3)  # a rebuilt graph serves all its passes
    monkeypatch.setattr(graph_module, "BATCHED_PRODUCT_BYTES", 1)  # not even one row: one row a pass
    passes.clear()
    assert rel_err(graph.hvp_batch(vs), truth) < 1e-12
    assert passes == [1] * 15 and graph.hvp_count == 10


def test_the_plan_says_what_was_kept_and_the_objective_notes_a_partial_one():
    torch.manual_seed(8)
    model, x, y = mlp_case()
    obj = ss.Objective.from_model(model, nn.functional.cross_entropy, batches(x, y))
    auto = obj.gradient_graph(obj.theta0)
    plan = auto.plan
    assert isinstance(plan, GraphPlan) and obj.graph_plan is plan
    assert (plan.policy, plan.batches, plan.kept, plan.recomputed) == ("auto", 3, 3, 0)
    assert plan.bytes_per_graph > 0 and plan.budget_bytes > 3 * plan.bytes_per_graph
    assert plan.budget_source in ("MemAvailable", "cgroup memory limit", "psutil")
    assert not obj.notes

    budget = int(1.5 * plan.bytes_per_graph)
    partial = obj.gradient_graph(obj.theta0, memory_budget=budget).plan
    assert partial.to_dict() == {
        "policy": "auto", "batches": 3, "kept": 1, "recomputed": 2, "bytes_per_graph": partial.bytes_per_graph,
        "budget_bytes": budget, "budget_source": "memory_budget", "reason": partial.reason,
    }
    assert "1 of 3 graphs kept" in partial.reason
    assert obj.notes == [("gradient graphs kept for 1 of 3 batches within the memory budget; the other 2 are "
                          "rebuilt for every product (see graph_plan)")]
    obj.gradient_graph(obj.theta0, memory_budget=budget)
    assert len(obj.notes) == 1  # said once, however many graphs are built

    forced = obj.gradient_graph(obj.theta0, keep_graphs=False).plan
    assert (forced.policy, forced.kept, forced.bytes_per_graph, forced.budget_bytes) == ("recompute", 0, None, None)
    assert obj.gradient_graph(obj.theta0, keep_graphs=True).plan.policy == "keep"


def test_a_single_batch_is_kept_without_measuring():
    model, x, y = mlp_case()
    obj = ss.Objective.from_model(model, nn.functional.cross_entropy, (x, y))
    plan = obj.gradient_graph(obj.theta0, memory_budget=0).plan
    assert (plan.kept, plan.recomputed, plan.bytes_per_graph) == (1, 0, None)


def test_the_estimate_grows_with_the_batch_and_leaves_out_the_data():
    """A graph's size grows with its batch; the data and the fixed buffers are not the graph's."""
    torch.manual_seed(9)
    model = ss.problems.mlp((50, 40, 3), "tanh").double()
    sizes = {}
    for n in (200, 400):
        x, y = torch.randn(2 * n, 50, dtype=torch.float64), torch.randint(0, 3, (2 * n,))
        obj = ss.Objective.from_model(model, nn.functional.cross_entropy, [(x[:n], y[:n]), (x[n:], y[n:])])
        sizes[n] = obj.gradient_graph(obj.theta0).plan.bytes_per_graph
        # at least the hidden activations (n x 40 doubles) and at most a few copies of everything per sample
        assert 40 * n * 8 < sizes[n] < 8 * (50 + 40 + 3) * n * 8 + 8 * obj.n_params * 8
    assert 1.6 < sizes[400] / sizes[200] < 2.05


def test_a_larger_later_batch_is_expected_to_need_more():
    torch.manual_seed(10)
    model, _, _ = mlp_case()
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,))
    obj = ss.Objective.from_model(model, nn.functional.cross_entropy, [(x[:4], y[:4]), (x[4:], y[4:])])
    size = obj.gradient_graph(obj.theta0).plan.bytes_per_graph
    # room for two graphs of the first batch's size, but the second batch is nine times larger
    assert obj.gradient_graph(obj.theta0, memory_budget=2 * size + 1).plan.kept == 1


def test_objective_defaults_and_the_operator_thread_the_policy():
    model, x, y = mlp_case()
    obj = ss.Objective.from_model(model, nn.functional.cross_entropy, batches(x, y))
    obj.keep_graphs = False
    assert obj.gradient_graph(obj.theta0).plan.policy == "recompute"
    assert obj.gradient_graph(obj.theta0, keep_graphs=True).plan.policy == "keep"  # the call wins
    obj.keep_graphs = None
    obj.graph_memory_budget = 0
    assert obj.gradient_graph(obj.theta0).plan.kept == 0
    op = ss.HessianOperator(obj, memory_budget=10**12)
    assert op.graph_plan.kept == 3 and op.graph_plan.budget_bytes == 10**12
    assert ss.HessianOperator(obj, keep_graphs=True).graph_plan.policy == "keep"


@pytest.mark.parametrize("kwargs", [{"memory_budget": -1}, {"memory_budget": 1.5}, {"memory_budget": True},
                                    {"keep_graphs": True, "memory_budget": 10}, {"keep_graphs": "yes"}])
def test_bad_graph_policies_are_refused(kwargs):
    model, x, y = mlp_case()
    obj = ss.Objective.from_model(model, nn.functional.cross_entropy, batches(x, y))
    with pytest.raises(InvalidInputError):
        obj.gradient_graph(obj.theta0, **kwargs)


class TinyAttention(nn.Module):
    """scaled_dot_product_attention: its fused CPU kernel has no double backward."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, 1)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(x).chunk(3, dim=-1))
        h = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(h.transpose(1, 2).reshape(b, t, d)).mean(dim=(1, 2))


def test_graphs_kept_before_the_switch_to_the_math_kernel_are_rebuilt():
    """Two graphs kept with the fused kernel: the first product switches the objective to the math
    kernel; the second graph's kept (fused) graphs must be rebuilt, not reported unsupported."""
    torch.manual_seed(11)
    model = TinyAttention().double()
    x, y = torch.randn(6, 5, 8, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    obj = ss.Objective.from_model(model, nn.functional.mse_loss, [(x[:3], y[:3]), (x[3:], y[3:])])
    first, second = obj.gradient_graph(obj.theta0), obj.gradient_graph(obj.theta0)
    v = torch.randn(obj.n_params, dtype=torch.float64)
    product = first.hvp(v)
    assert obj.math_attention
    assert rel_err(second.hvp(v), product) < 1e-12
    assert rel_err(obj.gradient_graph(obj.theta0, keep_graphs=False).hvp(v), product) < 1e-12
    assert sum("math attention" in note for note in obj.notes) == 1


def test_one_time_costs_are_paid_once_per_process():
    model, x, y = mlp_case()
    obj = ss.Objective.from_model(model, nn.functional.cross_entropy, (x, y))
    obj.gradient_graph(obj.theta0)
    costs = one_time_costs()
    assert costs["double_backward_warmup"] > 0
    obj.gradient_graph(obj.theta0)
    assert one_time_costs() == costs


def test_available_memory_reads_the_host_and_a_cgroup_limit(tmp_path, monkeypatch):
    free, source = memory.available_memory("cpu")
    assert free is None or free > 0
    assert source in ("MemAvailable", "cgroup memory limit", "psutil", "unknown")
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    limit.write_text(f"{3 * 2**20}\n")
    usage.write_text(f"{2**20}\n")
    monkeypatch.setattr(memory, "_CGROUP_FILES", ((str(limit), str(usage)),))
    assert memory.available_memory("cpu") == (2 * 2**20, "cgroup memory limit")
    limit.write_text("max\n")
    assert memory.available_memory("cpu")[1] != "cgroup memory limit"
    assert memory.available_memory("meta") == (None, "unknown")
