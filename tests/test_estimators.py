"""Spectral density, trace and index estimates against exact spectra (planted and from eigh)."""

import math

import pytest
import torch
from spectra import outlier_spectrum, planted
from torch import nn

import saddlescope as ss
from saddlescope import errors
from saddlescope.curvature import lanczos_quadrature

BULK = torch.cat([torch.linspace(-1.0, -0.2, 120), torch.linspace(0.3, 2.0, 280)]).double()


def test_quadrature_is_exact_for_low_degree_polynomials():
    # Gauss quadrature with m nodes integrates polynomials of degree < 2m exactly: the probe means of
    # the moments of the nodes are unbiased estimates of tr(A^p)/n.
    op = planted(BULK)
    quad = lanczos_quadrature(op, n_probes=30, steps=10, seed=1)
    assert torch.allclose(quad.weights.sum(1), torch.ones(30, dtype=torch.float64))
    for power in (1, 2, 3):
        estimate = float(quad.per_probe(lambda x, p=power: x**p).mean())
        exact = float((BULK**power).mean())
        assert estimate == pytest.approx(exact, abs=0.05 * float((BULK.abs() ** power).mean()))


def test_density_integrates_to_one_and_brackets_the_spectrum():
    sd = ss.spectral_density(planted(BULK), n_probes=4, steps=60, seed=0)
    assert float(torch.trapz(sd.density, sd.grid)) == pytest.approx(1.0, abs=1e-6)
    # Extreme Ritz values converge first: the density's support reaches the true extremes.
    assert sd.lambda_min == pytest.approx(-1.0, abs=1e-4) and sd.lambda_max == pytest.approx(2.0, abs=1e-4)
    # Mass on each side of the gap at (-0.2, 0.3) matches the planted counts.
    left = float(torch.trapz(sd.density[sd.grid < 0.05], sd.grid[sd.grid < 0.05]))
    assert left == pytest.approx(120 / 400, abs=0.03)
    assert sd.hvp_count == 4 * 60


@pytest.mark.parametrize("value", [0.0, 3.0, -1e-8])
def test_density_of_a_scalar_operator_is_finite_and_centred(value):
    # Every Ritz node coincides (H = value * I): the default width must not collapse to a subnormal.
    sd = ss.spectral_density(planted(torch.full((50,), value, dtype=torch.float64)), n_probes=2, steps=5)
    assert torch.isfinite(sd.density).all() and sd.sigma > 0
    assert float(torch.trapz(sd.density, sd.grid)) == pytest.approx(1.0, abs=1e-6)
    assert float(sd.grid[sd.density.argmax()]) == pytest.approx(value, abs=2 * sd.sigma)


def test_index_estimate_on_a_planted_spectrum_with_a_gap():
    est = ss.index_estimate(planted(BULK), delta=0.05, n_probes=20, steps=60, seed=0)
    assert est.within == pytest.approx(0.0, abs=1e-6)  # nothing planted within +-0.05
    assert abs(est.value - 0.3) <= est.error and est.error < 0.05
    assert abs(est.min_ratio - 0.7) <= est.min_ratio_error


def test_index_error_bars_cover_the_exact_fraction_on_a_network():
    torch.manual_seed(0)
    model = ss.problems.mlp((8, 16, 4), "tanh").double()
    x, y = torch.randn(200, 8, dtype=torch.float64), torch.randint(0, 4, (200,))
    obj = ss.Objective.from_model(model, nn.functional.cross_entropy, (x, y))
    exact = torch.linalg.eigvalsh(obj.hessian(obj.theta0))
    op = ss.HessianOperator(obj)
    quad = lanczos_quadrature(op, n_probes=10, steps=60, seed=2)
    for delta in (0.0, 1e-3, 1e-2, None):
        est = ss.index_estimate(op, delta=delta, quadrature=quad)
        below = float((exact < -est.delta).double().mean())
        above = float((exact > est.delta).double().mean())
        assert abs(est.value - below) <= est.error, (delta, est.value, below, est.error)
        assert abs(est.min_ratio - above) <= est.min_ratio_error, (delta, est.min_ratio, above)


@pytest.mark.parametrize("method", ["hutch++", "hutchinson"])
def test_trace_interval_covers_the_truth(method):
    values = torch.cat([torch.tensor([40.0, 25.0, 10.0]), torch.linspace(-0.5, 1.0, 297)]).double()
    exact = float(values.sum())
    covered = 0
    for seed in range(20):
        est = ss.trace(planted(values), 60, method=method, seed=seed)
        covered += est.low <= exact <= est.high
        assert est.hvp_count == 60
    # nominal 95%; zT A z is skewed by the outliers, so the normal interval is a little optimistic
    assert covered >= 15


def test_hutch_plus_plus_beats_hutchinson_on_a_decaying_spectrum():
    values = torch.tensor([100.0 / (i + 1) ** 2 for i in range(300)], dtype=torch.float64)
    exact = float(values.sum())
    errs = {m: sum(abs(ss.trace(planted(values), 60, method=m, seed=s).value - exact) for s in range(10))
            for m in ("hutch++", "hutchinson")}
    assert errs["hutch++"] < 0.5 * errs["hutchinson"]


def test_estimators_are_reproducible_and_check_input():
    op = planted(BULK)
    a, b = ss.index_estimate(op, seed=4, n_probes=3, steps=20), ss.index_estimate(op, seed=4, n_probes=3, steps=20)
    assert a.value == b.value and a.min_ratio == b.min_ratio
    with pytest.raises(errors.InvalidInputError):
        ss.trace(op, 3)
    with pytest.raises(errors.InvalidInputError):
        ss.trace(op, 30, method="exact")
    with pytest.raises(errors.InvalidInputError):
        ss.spectral_density(op, n_probes=0)
    with pytest.raises(errors.InvalidInputError):
        ss.index_estimate(op, delta=-1.0, n_probes=2, steps=5)
    assert math.isfinite(ss.trace(op, 6).value)


def test_deflating_known_pairs_sharpens_the_resolution_and_keeps_the_truth_inside_the_bars():
    values = outlier_spectrum()
    op = planted(values)
    dense = op.matmat(torch.eye(values.numel(), dtype=torch.float64))
    w, v = torch.linalg.eigh(0.5 * (dense + dense.T))
    plain = ss.index_estimate(op, n_probes=6, steps=40, seed=1)
    deflated = ss.index_estimate(op, n_probes=6, steps=40, seed=1, deflate=(w[-5:], v[:, -5:]))
    # The nodes no longer have to span the outliers: the default resolution shrinks ~ 100 / 1.
    assert deflated.delta < 0.1 * plain.delta and deflated.deflated == 5
    for est in (plain, deflated):
        below = float((values < -est.delta).double().mean())
        above = float((values > est.delta).double().mean())
        assert abs(est.value - below) <= est.error, (est.value, below, est.error)
        assert abs(est.min_ratio - above) <= est.min_ratio_error
    assert abs(deflated.value - float((values < -deflated.delta).double().mean())) < 0.02


def test_adaptive_probes_stop_on_target_or_budget():
    op = planted(outlier_spectrum())
    loose = ss.index_estimate(op, delta=0.2, n_probes=10, steps=30, seed=2, target_error=1.0)
    assert loose.n_probes == 2 and loose.stopped == "target_error"
    capped = ss.index_estimate(op, delta=0.2, n_probes=10, steps=30, seed=2, max_hvps=100, target_error=1e-9)
    assert capped.hvp_count <= 100 and capped.stopped in ("max_hvps", "quadrature_bound")
    # The same probes whatever the count: an adaptive run's first probes are a fixed run's.
    fixed = ss.index_estimate(op, delta=0.2, n_probes=2, steps=30, seed=2)
    assert loose.value == pytest.approx(fixed.value, rel=1e-12)


def test_an_estimate_that_resolves_nothing_stops_after_one_probe_and_says_so():
    values = torch.cat([torch.tensor([100.0]), 1e-3 * torch.linspace(-1, 1, 399)]).double()
    est = ss.index_estimate(planted(values), n_probes=5, steps=20, seed=0, adaptive=True)
    assert not est.resolved and est.stopped == "unresolved" and est.n_probes == 1 and est.within > 0.95


def test_a_probe_whose_basis_does_not_fit_runs_the_three_term_recurrence():
    # A budget below a full basis ((steps + 1) * n numbers) but above three vectors: the plain recurrence,
    # whose lost orthogonality the quadrature survives (Greenbaum 1989): the truth stays inside the bars
    # and the figures stay close to the reorthogonalised ones.
    values = outlier_spectrum()
    op = planted(values)
    n, steps = values.numel(), 40
    small = 12 * n * 8  # room for 12 vectors: not the 45 a full basis needs
    full = ss.index_estimate(op, n_probes=6, steps=steps, seed=1)
    lean = ss.index_estimate(op, n_probes=6, steps=steps, seed=1, memory_budget=small)
    assert full.reorthogonalised and not lean.reorthogonalised and lean.hvp_count == full.hvp_count
    for est in (full, lean):
        below = float((values < -est.delta).double().mean())
        assert abs(est.value - below) <= est.error, (est.value, below, est.error)
    assert lean.value == pytest.approx(full.value, abs=0.02)
    # Each probe's rule is still Gauss for its probe z: sum_i w_i theta_i^p = z^T A^p z / n for p < 2 * steps.
    from saddlescope.curvature.density import _probe_vector

    quad = lanczos_quadrature(op, n_probes=3, steps=steps, seed=1, memory_budget=small)
    assert not quad.reorthogonalised
    dense = op.matmat(torch.eye(n, dtype=torch.float64))
    for probe in range(3):
        z = _probe_vector(n, probe, 1, torch.float64)
        for power in (1, 2, 3, 5):
            exact = float(z @ torch.linalg.matrix_power(dense, power) @ z) / n
            rule = float((quad.weights[probe] * quad.nodes[probe] ** power).sum())
            assert rule == pytest.approx(exact, rel=1e-8), (probe, power)
    with pytest.raises(errors.MemoryBudgetError, match="index_probes=0"):
        ss.index_estimate(op, n_probes=2, steps=steps, memory_budget=3 * n * 8)
