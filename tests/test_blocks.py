"""Per-block curvature against the exact Hessian's diagonal blocks."""

import pytest
import torch
from torch import nn

import saddlescope as ss
from saddlescope.report import plot_blocks
from saddlescope import errors


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,))
    obj = ss.Objective.from_model(model, nn.functional.cross_entropy, (x, y))
    return obj, obj.hessian(obj.theta0)


def test_blocks_by_module_parameter_and_callable(net):
    obj, _ = net
    modules = obj.blocks("module")
    assert list(modules) == ["0", "2", "4"]
    assert [v.numel() for v in modules.values()] == [5 * 8 + 8, 8 * 6 + 6, 6 * 3 + 3]
    params = obj.blocks("parameter")
    assert list(params)[:2] == ["0.weight", "0.bias"] and len(params) == 6
    assert torch.equal(torch.cat(list(params.values())), torch.arange(obj.n_params))
    grouped = obj.blocks(lambda name: name.split(".")[1])  # all weights, all biases: not contiguous
    assert sorted(grouped) == ["bias", "weight"] and grouped["bias"].numel() == 8 + 6 + 3
    with pytest.raises(errors.InvalidInputError):
        obj.blocks("layer")
    fn = ss.problems.seed_toy()
    assert list(fn.blocks()) == ["theta"]


def test_block_operator_is_the_diagonal_block(net):
    obj, hess = net
    full = ss.HessianOperator(obj)
    for name, index in obj.blocks("parameter").items():
        op = full.block(name)
        v = torch.randn(index.numel(), 3, dtype=torch.float64)
        assert torch.allclose(op.matmat(v), hess[index][:, index] @ v, atol=1e-12)
    direct = ss.HessianOperator(obj, block="2")
    assert direct.shape == (54, 54)
    with pytest.raises(errors.InvalidInputError, match="no block"):
        full.block("nope")
    with pytest.raises(errors.InvalidInputError):
        full.block(torch.tensor([0, 0]))


@pytest.mark.parametrize("exact_max_params", [10_000, 0])
def test_per_block_against_eigvalsh_of_each_block(net, exact_max_params, tmp_path):
    obj, hess = net
    report = ss.per_block(obj, by="parameter", exact_max_params=exact_max_params, tol=1e-10,
                          trace_matvecs=300, index_probes=8, index_steps=40)
    blocks = obj.blocks("parameter")
    assert [r.name for r in report.rows] == list(blocks)
    total = 0.0
    for row in report.rows:
        index = blocks[row.name]
        exact = torch.linalg.eigvalsh(hess[index][:, index])
        scale = float(exact.abs().max())
        assert row.lambda_min == pytest.approx(float(exact[0]), abs=1e-8 * scale)
        assert row.lambda_max == pytest.approx(float(exact[-1]), abs=1e-8 * scale)
        truth = float(exact.sum())
        assert row.trace_low - 1e-9 <= truth <= row.trace_high + 1e-9  # exact rows: equal
        truth_index = float((exact < -row.delta).double().mean())
        assert abs(row.index - truth_index) <= row.index_error + 1e-12
        total += row.trace
    whole = torch.linalg.eigvalsh(hess)
    assert report.whole.lambda_max == pytest.approx(float(whole[-1]), rel=1e-8)
    if exact_max_params:  # block traces add up to the whole trace
        assert total == pytest.approx(float(hess.trace()), rel=1e-10)
        assert report.whole.method == "exact"
    else:
        assert all(r.method == "lanczos" for r in report.rows)
    assert report.hvp_count > 0 and "lambda_max" in report.table()
    png = plot_blocks(report, tmp_path / "blocks.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.to_dict()["rows"][0]["name"] == "0.weight"


def test_frozen_layer_is_left_out_of_the_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    model[0].requires_grad_(False)
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 2, (20,))
    obj = ss.Objective.from_model(model, nn.functional.cross_entropy, (x, y))
    assert list(obj.blocks()) == ["2"] and obj.n_params == 12
    report = ss.per_block(obj)
    assert [r.name for r in report.rows] == ["2"] and report.rows[0].n_params == 12


def test_a_blocks_columns_go_a_few_at_a_time_within_the_byte_cap(net, monkeypatch):
    """A block's column travels as a whole-model vector: the columns go in calls of as many as keep those
    vectors and their products under the cap, each call's products the block's own (autograd's Hessian)."""
    obj, _ = net
    (batch,) = list(obj._batches())
    truth = torch.autograd.functional.hessian(lambda t: obj.batch_share(t, batch), obj.theta0)
    from saddlescope.curvature import operator

    op = ss.HessianOperator(obj, block="2")
    index = obj.blocks("module")["2"]
    v = torch.randn(index.numel(), 5, dtype=torch.float64)
    calls = []
    hvp_batch = op._graph.hvp_batch
    monkeypatch.setattr(op._graph, "hvp_batch", lambda vs: calls.append(vs.shape[0]) or hvp_batch(vs))
    assert torch.allclose(op.matmat(v), truth[index][:, index] @ v, atol=1e-12) and calls == [5]
    monkeypatch.setattr(operator, "BATCHED_PRODUCT_BYTES", 2 * (2 * obj.n_params * 8))  # two columns a call
    calls.clear()
    assert torch.allclose(op.matmat(v), truth[index][:, index] @ v, atol=1e-12) and calls == [2, 2, 1]
