"""analyze on the iterative (Lanczos) path, against planted spectra, closed forms and eigh."""

import json

import pytest
import torch
from spectra import planted

import saddlescope as ss
from saddlescope import errors
from saddlescope.report import to_jsonable


def quadratic(values, dtype=torch.float64, seed=0):
    """f(theta) = theta^T A theta / 2 with a planted spectrum; theta = 0 is critical."""
    a = planted(values, seed=seed).matrix.to(dtype)
    obj = ss.Objective.from_function(lambda th: 0.5 * th @ (a @ th), torch.zeros(len(values), dtype=dtype))
    return obj, a


BULK = torch.linspace(1e-2, 1.0, 299, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_positive_definite_is_a_minimum_with_a_residual_bound(dtype):
    values = torch.cat([torch.tensor([2e-3], dtype=torch.float64), BULK])
    obj, _ = quadratic(values, dtype)
    cp = ss.analyze(obj, exact=False)
    assert cp.method == "lanczos" and cp.kind == "minimum" and cp.resolved_by == "eigenvalues"
    bottom = cp.lanczos["bottom"]
    assert bottom["converged"][0]
    # The claim is backed by the bound lambda_min >= theta - r > threshold; the truth agrees.
    assert bottom["eigenvalues"][0] - bottom["residuals"][0] > cp.tolerances.zero_threshold
    tol = 1e-6 if dtype == torch.float64 else 1e-3
    assert cp.lambda_min == pytest.approx(2e-3, rel=tol)
    assert cp.lambda_max == pytest.approx(1.0, rel=tol)
    assert (cp.index, cp.min_ratio) == (0.0, 1.0)
    assert cp.escape_direction is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_tiny_negative_eigenvalue_is_a_saddle_never_a_minimum(dtype):
    values = torch.cat([torch.tensor([-1e-3], dtype=torch.float64), BULK])
    obj, a = quadratic(values, dtype)
    cp = ss.analyze(obj, exact=False)
    assert cp.kind == "saddle"
    u = cp.escape_direction.double()
    # The certificate is a true Rayleigh quotient of the operator, below the zero threshold.
    rq = float(u @ a.double() @ u)
    assert rq == pytest.approx(cp.escape_curvature, rel=1e-3 if dtype == torch.float32 else 1e-9)
    assert rq < -cp.tolerances.zero_threshold
    # A Rayleigh quotient never undershoots lambda_min, but for the rounding of the product that measures it.
    assert cp.lambda_min >= -1e-3 * (1 + 1e-6) - cp.precision()["eigenvalue_rounding"]
    # Converging from the certificate gives the eigenvalue itself.
    full = ss.analyze(obj, exact=False, stop_at_certificate=False)
    assert full.kind == "saddle" and full.resolved_by == "eigenvalues"
    assert full.lambda_min == pytest.approx(-1e-3, rel=1e-6 if dtype == torch.float64 else 1e-3)


@pytest.mark.parametrize("lowest,kind", [(-1e-3, "saddle"), (2e-3, "minimum")])
def test_one_lanczos_run_serves_both_ends(lowest, kind):
    # The top run's Krylov space resolves the bottom end too: its smallest Ritz vector, re-measured by one
    # product, is the certificate (saddle) or, under the random-start bound at that end, the converged
    # bottom pair (minimum). A bottom run of its own used to cost as much again as the top run.
    values = torch.cat([torch.tensor([lowest], dtype=torch.float64), BULK])
    obj, a = quadratic(values)
    cp = ss.analyze(obj, exact=False, index_probes=0)
    assert cp.kind == kind and cp.lanczos["bottom"]["hvp_count"] == 1
    assert cp.hvp_count == cp.lanczos["top"]["hvp_count"] + 1
    assert cp.lambda_min == pytest.approx(lowest, rel=1e-6)
    if kind == "saddle":
        u = cp.escape_direction
        assert float(u @ a @ u) == pytest.approx(cp.escape_curvature, rel=1e-9)
    else:
        assert cp.quantities["lambda_min"].status == "interval"
        assert cp.quantities["lambda_min"].low - 1e-12 <= lowest <= cp.quantities["lambda_min"].high + 1e-12


def test_certificate_stops_early_and_is_cheaper_than_convergence():
    values = torch.cat([torch.tensor([-0.3], dtype=torch.float64), torch.linspace(-0.05, 1.0, 399, dtype=torch.float64)])
    obj, _ = quadratic(values)
    quick = ss.analyze(obj, exact=False, index_probes=0)
    full = ss.analyze(obj, exact=False, index_probes=0, stop_at_certificate=False)
    assert quick.kind == full.kind == "saddle"
    assert quick.resolved_by == "certificate" and quick.lanczos["bottom"]["stopped_early"]
    assert quick.lanczos["bottom"]["hvp_count"] < full.lanczos["bottom"]["hvp_count"]
    assert full.lambda_min == pytest.approx(-0.3, rel=1e-9)


def test_negative_definite_is_a_maximum():
    obj, _ = quadratic(-torch.linspace(0.1, 2.0, 120).double())
    cp = ss.analyze(obj, exact=False)
    assert cp.kind == "maximum" and (cp.index, cp.min_ratio) == (1.0, 0.0)


def test_zero_block_is_degenerate_not_a_minimum():
    values = torch.cat([torch.zeros(30), torch.linspace(0.5, 2.0, 170)]).double()
    obj, _ = quadratic(values)
    cp = ss.analyze(obj, exact=False)
    assert cp.kind == "degenerate" and cp.resolved_by == "unresolved"
    assert abs(cp.lambda_min) <= cp.tolerances.zero_threshold


def test_unconverged_run_is_inconclusive_never_a_minimum():
    values = torch.cat([torch.tensor([1e-4], dtype=torch.float64), torch.linspace(1e-3, 1.0, 399, dtype=torch.float64)])
    obj, _ = quadratic(values)
    cp = ss.analyze(obj, exact=False, max_hvps=8)
    assert cp.kind == "inconclusive" and cp.resolved_by == "unresolved"
    assert "did not converge" in cp.reason
    assert ss.analyze(obj, exact=False).kind == "minimum"  # with the default budget it settles


@pytest.mark.parametrize("m,n,p,sigma", [(4, 3, 2, [3.0, 2.0, 0.5]), (5, 4, 3, [5.0, 3.5, 2.0, 0.7])])
def test_iterative_agrees_with_exact_on_every_linear_network_critical_point(m, n, p, sigma):
    net = ss.problems.TwoLayerLinear(m, n, p, sigma, seed=3)
    obj = net.objective()
    for point in net.critical_points():
        exact = ss.analyze(obj, point.theta, exact=True, probe=False)
        quick = ss.analyze(obj, point.theta, exact=False)
        it = ss.analyze(obj, point.theta, exact=False, stop_at_certificate=False)
        assert quick.curvature_kind == it.curvature_kind == exact.curvature_kind, (point.subset, it.reason)
        assert quick.lambda_min >= exact.lambda_min - 1e-12  # a certificate is a Rayleigh quotient
        assert it.lambda_min == pytest.approx(exact.lambda_min, abs=1e-6)
        assert it.lambda_max == pytest.approx(exact.lambda_max, rel=1e-9)


@pytest.fixture(scope="module")
def trained_mlp():
    prob = ss.problems.digits_mlp((16,), n_samples=400, seed=1)
    opt = torch.optim.SGD(prob.model.parameters(), lr=0.5)
    for _ in range(300):
        opt.zero_grad()
        prob.loss_fn(prob.model(prob.inputs), prob.targets).backward()
        opt.step()
    obj = ss.Objective.from_model(prob.model, prob.loss_fn, (prob.inputs, prob.targets))
    hess = obj.hessian(obj.theta0)
    return obj, hess, torch.linalg.eigvalsh(hess)


def test_iterative_on_a_network_against_eigh(trained_mlp):
    obj, hess, exact = trained_mlp
    assert exact[0] < -1e-6 * exact[-1]  # the trained point has real negative curvature
    cp = ss.analyze(obj, exact=False, grad_tol=1.0, k=3, stop_at_certificate=False, index_probes=8, index_steps=80)
    assert cp.kind == "saddle" and cp.method == "lanczos"
    bottom, top = cp.eigenvalues[:3], cp.eigenvalues[-3:]
    assert torch.allclose(top, exact[-3:], rtol=1e-6)
    assert torch.allclose(bottom, exact[:3], rtol=1e-5, atol=1e-9 * float(exact[-1]))
    u = cp.escape_direction
    assert float(u @ hess @ u) == pytest.approx(cp.escape_curvature, rel=1e-9)
    assert float(u @ obj.grad(obj.theta0)) <= 0  # signed to descend
    # The index estimate's error bar covers the exact fraction at its own resolution.
    est = cp.index_estimate
    truth = float((exact < -est.delta).double().mean())
    assert abs(est.value - truth) <= est.error
    assert cp.hvp_count == cp.lanczos["top"]["hvp_count"] + cp.lanczos["bottom"]["hvp_count"] + est.hvp_count


def test_the_automatic_choice_and_the_record(trained_mlp, tmp_path):
    obj, _, _ = trained_mlp
    small = ss.analyze(ss.problems.seed_toy(), torch.zeros(2, dtype=torch.float64))
    assert small.method == "exact"
    cp = ss.analyze(obj, exact_max_params=100, grad_tol=1.0, index_probes=2, index_steps=20)
    assert cp.method == "lanczos" and cp.hvp_count > 0
    record = to_jsonable(cp.to_dict())
    text = json.dumps(record)
    assert '"method": "lanczos"' in text and record["index_estimate"]["n_probes"] == 2
    assert record["lanczos"]["bottom"]["which"] == "smallest"
    assert "lanczos" in cp.summary() and "resolution" in cp.summary()
    with pytest.raises(errors.TooLargeError):
        ss.analyze(obj, exact=True, max_bytes=1000)


def test_iterative_is_reproducible_with_a_seed(trained_mlp):
    obj, _, _ = trained_mlp
    a = ss.analyze(obj, exact=False, grad_tol=1.0, seed=3, index_probes=2, index_steps=20)
    b = ss.analyze(obj, exact=False, grad_tol=1.0, seed=3, index_probes=2, index_steps=20)
    assert torch.equal(a.eigenvalues, b.eigenvalues) and a.index == b.index and a.hvp_count == b.hvp_count


@pytest.mark.parametrize("kwargs", [{"k": 0}, {"eig_tol": 0.0}, {"exact": "yes"}, {"index_probes": -1}])
def test_bad_arguments(kwargs):
    with pytest.raises(errors.InvalidInputError):
        ss.analyze(ss.problems.seed_toy(), exact=kwargs.pop("exact", False), **kwargs)


def test_a_minimum_rests_on_the_random_start_bound_not_on_the_basis_size():
    # With k=1 the top run stops before its far end settles, so the bottom end gets a run of its own.
    # The "minimum" needs that run's pair to be the smallest: it stops under the random-start bound, and
    # both outer ends are the outer of the residual bound and the random-start bound.
    values = torch.linspace(0.05, 1.0, 300, dtype=torch.float64)
    obj, a = quadratic(values)
    cp = ss.analyze(obj, exact=False, k=1, index_probes=0)
    bottom, top = cp.lanczos["bottom"], cp.lanczos["top"]
    assert cp.kind == "minimum" and bottom["hvp_count"] > 1
    assert bottom["guard"]["rule"] == "random-start bound" and "random-start bound" in cp.reason
    truth = torch.linalg.eigvalsh(a)
    low, high = cp.quantities["lambda_min"], cp.quantities["lambda_max"]
    eps = 1e-12  # the products' rounding
    assert low.low - eps <= float(truth[0]) <= low.high + eps and high.low - eps <= float(truth[-1]) <= high.high + eps
    assert low.low == min(bottom["eigenvalues"][0] - bottom["residuals"][0], bottom["guard"]["lambda_min_at_least"])
    assert high.high == max(top["eigenvalues"][-1] + top["residuals"][-1], top["guard"]["lambda_max_at_most"])


def test_an_interval_from_a_given_start_says_it_rests_on_lanczos_premise():
    # stop_at_certificate=False converges lambda_min from the certificate's vector: a start the run did not
    # draw at random, so no random-start bound, and the interval says what it rests on.
    values = torch.cat([torch.tensor([-0.3], dtype=torch.float64), torch.linspace(-0.05, 1.0, 399, dtype=torch.float64)])
    obj, _ = quadratic(values)
    full = ss.analyze(obj, exact=False, index_probes=0, stop_at_certificate=False)
    q = full.quantities["lambda_min"]
    assert q.status == "interval" and "premise" in q.basis
    assert q.low <= -0.3 * (1 - 1e-12) and q.high >= -0.3 * (1 + 1e-12)
