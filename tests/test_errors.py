"""Bad input gets a saddlescope.errors exception that names the problem."""

import math

import pytest
import torch
from torch import nn

import saddlescope as ss
from saddlescope import errors


def data(n=4):
    return torch.randn(n, 3, dtype=torch.float64), torch.randint(0, 2, (n,))


def model():
    return ss.problems.mlp((3, 4, 2), "tanh").double()


def test_non_scalar_loss():
    with pytest.raises(errors.NonScalarLossError, match="scalar"):
        ss.Objective.from_model(model(), nn.CrossEntropyLoss(reduction="none"), data())
    with pytest.raises(errors.NonScalarLossError):
        ss.Objective.from_function(lambda th: th * 2, [1.0, 2.0])


def test_no_trainable_parameters():
    m = model()
    for p in m.parameters():
        p.requires_grad_(False)
    with pytest.raises(errors.NoTrainableParametersError, match="requires_grad"):
        ss.Objective.from_model(m, nn.functional.cross_entropy, data())


def test_nan_and_inf_loss():
    x, y = data()
    x[0, 0] = float("nan")
    with pytest.raises(errors.NonFiniteLossError, match="not finite"):
        ss.Objective.from_model(model(), nn.functional.cross_entropy, (x, y))
    obj = ss.Objective.from_function(lambda th: torch.log(th[0]), [1.0])
    with pytest.raises(errors.NonFiniteLossError):
        obj.loss(torch.tensor([-1.0], dtype=torch.float64))
    with pytest.raises(errors.NonFiniteLossError):
        ss.analyze(obj, torch.tensor([0.0], dtype=torch.float64))


def test_theta_of_the_wrong_length_dtype_or_shape():
    obj = ss.Objective.from_model(model(), nn.functional.cross_entropy, data())
    with pytest.raises(errors.ThetaError, match=f"length {obj.n_params}"):
        obj.loss(torch.zeros(obj.n_params + 1, dtype=torch.float64))
    with pytest.raises(errors.ThetaError, match="dtype"):
        obj.grad(torch.zeros(obj.n_params, dtype=torch.float32))
    with pytest.raises(errors.ThetaError, match="1-D"):
        ss.analyze(obj, torch.zeros(1, obj.n_params, dtype=torch.float64))
    with pytest.raises(errors.ThetaError, match="torch.Tensor"):
        obj.hessian([0.0] * obj.n_params)
    with pytest.raises(errors.ThetaError):
        obj.hvp(obj.theta0, torch.zeros(3, dtype=torch.float64))


def test_empty_data():
    with pytest.raises(errors.EmptyDataError):
        ss.Objective.from_model(model(), nn.functional.cross_entropy, [])
    x, y = data(0)
    with pytest.raises(errors.EmptyDataError):
        ss.Objective.from_model(model(), nn.functional.cross_entropy, (x, y))
    with pytest.raises(errors.EmptyDataError):
        ss.Objective.from_model(model(), nn.functional.cross_entropy, None)


def test_mismatched_batch_shapes():
    x, _ = data(4)
    with pytest.raises(errors.BatchShapeError, match="4 inputs but 3 targets"):
        ss.Objective.from_model(model(), nn.functional.cross_entropy, (x, torch.zeros(3, dtype=torch.long)))
    with pytest.raises(errors.BatchShapeError, match="model failed"):
        ss.Objective.from_model(model(), nn.functional.cross_entropy, (torch.randn(4, 5), torch.zeros(4, dtype=torch.long)))
    with pytest.raises(errors.BatchShapeError, match="pair"):
        ss.Objective.from_model(model(), nn.functional.cross_entropy, [(x,)])


def test_exact_hessian_too_large_points_to_the_iterative_path():
    obj = ss.Objective.from_model(model(), nn.functional.cross_entropy, data())
    with pytest.raises(errors.TooLargeError, match="iterative"):
        ss.analyze(obj, exact=True, max_bytes=1000)
    assert ss.analyze(obj, max_bytes=1000, index_probes=1, index_steps=5).method == "lanczos"  # auto


def test_escape_at_a_minimum():
    obj = ss.problems.rosenbrock()
    cp = ss.analyze(obj, torch.tensor([1.0, 1.0], dtype=torch.float64))
    with pytest.raises(errors.NotADescentPointError, match="minimum"):
        ss.escape(obj, cp)


def test_bad_tolerances_and_arguments():
    obj = ss.problems.seed_toy()
    with pytest.raises(errors.InvalidInputError, match="rtol"):
        ss.analyze(obj, rtol=-1)
    with pytest.raises(errors.InvalidInputError, match="probe_radii"):
        ss.analyze(obj, probe_radii=(0.0,))
    with pytest.raises(errors.InvalidInputError):
        ss.Objective.from_model("not a model", nn.functional.mse_loss, data())
    with pytest.raises(errors.InvalidInputError):
        ss.Objective.from_model(model(), nn.functional.cross_entropy, data(), reduction="max")


def test_errors_are_value_errors_too():
    assert issubclass(errors.ThetaError, ValueError)
    assert issubclass(errors.SaddlescopeError, Exception)


def test_finiteness_is_settled_by_one_sum_and_overflow_is_not_a_nan():
    # all_finite checks a product's finiteness by its sum (torch.isfinite(t).all() cost about 1 s at 124M
    # entries, 40% of a product); a sum that overflows on finite entries is checked entry by entry.
    from saddlescope.objective import all_finite

    big = torch.full((4,), 3e38, dtype=torch.float32)
    assert not math.isfinite(float(big.sum())) and all_finite(big)
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.ones(1000)
        t[517] = bad
        assert not all_finite(t)
    t = torch.ones(10)
    t[2], t[7] = float("inf"), -float("inf")  # the sum is NaN, not inf
    assert not all_finite(t)
    op = ss.DenseOperator(torch.diag(torch.tensor([1.0, float("nan"), 2.0], dtype=torch.float64)), check_symmetric=False)
    with pytest.raises(errors.NonFiniteLossError, match="not finite"):
        op.matvec(torch.ones(3, dtype=torch.float64))


def test_a_device_that_cannot_compute_is_named_with_the_reason():
    # PyTorch's own errors here: AssertionError "Torch not compiled with CUDA enabled", or a list of device types.
    net, batch = model(), data()
    cases = [("gpu0", "is not a device PyTorch knows"), ("meta", "holds no values")]
    if not torch.cuda.is_available():
        cases += [("cuda", "no CUDA device is available"), ("cuda:1", "no CUDA device is available")]
    else:
        cases.append((f"cuda:{torch.cuda.device_count()}", "CUDA device(s), numbered 0"))
    for device, message in cases:
        with pytest.raises(errors.InvalidInputError, match=message):
            ss.Objective.from_model(net, nn.CrossEntropyLoss(), batch, device=device)
        with pytest.raises(errors.InvalidInputError, match=message):
            ss.analyze_model(net, batch, device=device)
    on_cpu = ss.Objective.from_model(net, nn.CrossEntropyLoss(), batch, device="cpu")
    assert on_cpu.device == torch.device("cpu")
    assert float(on_cpu.loss(on_cpu.theta0)) == pytest.approx(float(nn.CrossEntropyLoss()(net(batch[0]), batch[1])),
                                                             rel=1e-12)
