"""Never a wrong verdict, never an overstated number (issue 19, items 1, 5, 6).

Truth comes from closed forms: quadratics ``c + 0.5 t^T A t`` whose eigenpairs are planted, so the
eigenvalues, the eigenvectors and the fraction of negative eigenvalues are known exactly.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import saddlescope as ss


def planted_quadratic(eigenvalues: torch.Tensor, offset: float = 0.0, seed: int = 0):
    """``offset + 0.5 t^T Q diag(eigenvalues) Q^T t`` at ``t = 0`` (a critical point, ``g = 0``)."""
    n = eigenvalues.numel()
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    a = q @ torch.diag(eigenvalues.double()) @ q.T
    a = 0.5 * (a + a.T)
    obj = ss.Objective.from_function(lambda t: offset + 0.5 * t @ a @ t, torch.zeros(n, dtype=torch.float64))
    return obj, q


@pytest.mark.parametrize("n,offset,tiny", [(50, 1.0, -1e-12), (50, 0.0, -1e-12), (50, 100.0, -1e-10),
                                           (20, 1.0, -1e-11), (50, 1.0, -1e-13)])
def test_a_saddle_inside_the_zero_band_is_never_a_minimum(n, offset, tiny):
    # 49 eigenvalues in [1e-3, 1] and one tiny negative one: rtol 1e-9 counts it as zero, the probe cannot
    # see its fall (0.5 * 1e-12 * r^2 is below the loss's rounding), but it is far beyond eigh's rounding.
    values = torch.cat([torch.tensor([tiny]), torch.logspace(-3, 0, n - 1)]).double()
    obj, q = planted_quadratic(values, offset)
    cp = ss.analyze(obj)
    assert cp.curvature_kind == "degenerate"  # the second-order test alone counts it as zero
    assert cp.kind == "saddle" and cp.resolved_by == "certificate"
    assert cp.escape_curvature == pytest.approx(tiny, rel=1e-3)
    # The certificate is the planted eigenvector (up to sign).
    assert abs(float(cp.escape_direction @ q[:, 0])) == pytest.approx(1.0, abs=1e-6)
    assert "not a minimum" in cp.reason


def test_a_tiny_positive_eigenvalue_still_allows_the_minimum():
    # The same spectrum with +1e-12: positive definite, a strict minimum (the probe decides it).
    values = torch.cat([torch.tensor([1e-12]), torch.logspace(-3, 0, 49)]).double()
    cp = ss.analyze(planted_quadratic(values, 1.0)[0])
    assert cp.kind == "minimum"


def test_a_maximum_is_never_claimed_with_a_tiny_positive_eigenvalue():
    values = -torch.cat([torch.tensor([-1e-12]), torch.logspace(-3, 0, 29)]).double()
    obj, q = planted_quadratic(values, 1.0)
    cp = ss.analyze(obj)
    assert cp.kind == "saddle" and "not a maximum" in cp.reason


def test_a_tiny_negative_eigenvalue_with_probing_off_is_not_a_minimum():
    values = torch.cat([torch.tensor([-1e-12]), torch.logspace(-3, 0, 19)]).double()
    cp = ss.analyze(planted_quadratic(values, 1.0)[0], probe=False)
    assert cp.kind == "saddle" and cp.resolved_by == "certificate"


def test_no_minimum_on_tiny_negative_curvature_in_json():
    values = torch.cat([torch.tensor([-1e-12]), torch.logspace(-3, 0, 19)]).double()
    d = ss.analyze(planted_quadratic(values, 1.0)[0]).to_dict()
    json.dumps(d)
    assert d["kind"] == "saddle" and d["escape_curvature"] < 0


def deep_saddle(n: int = 300):
    """A saddle whose first negative Rayleigh quotient is far above lambda_min = -50: ten negative
    eigenvalues in [-50, -1], a bulk in [0.01, 1], five outliers up to 100."""
    values = torch.cat([torch.linspace(-50, -1, 10), torch.linspace(0.01, 1, n - 15), torch.linspace(5, 100, 5)])
    obj, q = planted_quadratic(values.double(), 0.0, seed=1)
    return obj, values.double(), q


def test_iterative_numbers_say_what_they_are():
    obj, values, _ = deep_saddle()
    cp = ss.analyze(obj, exact=False)
    assert cp.kind == "saddle" and cp.resolved_by == "certificate"
    q = cp.quantities
    # The certificate is a Rayleigh quotient: an upper bound on lambda_min (to the products' rounding).
    assert q["lambda_min"].status == "upper_bound" and float(values.min()) - 1e-9 <= q["lambda_min"].value < 0
    assert q["lambda_max"].status == "interval"
    assert q["lambda_max"].low - 1e-9 <= float(values.max()) <= q["lambda_max"].high + 1e-9
    # Counts from an estimate are not given as integers; the fractions carry intervals with the truth in them.
    assert cp.n_negative is None and cp.n_zero is None and cp.n_positive is None
    delta = cp.index_estimate.delta
    truth = {"negative": float((values < -delta).double().mean()), "positive": float((values > delta).double().mean())}
    for name, true in truth.items():
        assert q[name].status == "estimate" and q[name].low <= true <= q[name].high, (name, q[name], true)
    d = cp.to_dict()
    json.dumps(d)
    assert d["n_negative"] is None and d["quantities"]["lambda_min"]["is"] == "upper_bound"
    assert len(d["eigenvalue_residuals"]) == len(d["eigenvalues"]) == len(d["eigenvalues_converged"])
    assert "upper bound" in cp.summary() and "estimate" in cp.summary()


def test_a_converged_bottom_pair_is_an_interval_around_lambda_min():
    obj, values, _ = deep_saddle()
    cp = ss.analyze(obj, exact=False, stop_at_certificate=False, index_probes=0)
    q = cp.quantities["lambda_min"]
    assert q.status == "interval" and q.low - 1e-9 <= float(values.min()) <= q.high + 1e-9


def test_the_exact_path_says_its_numbers_are_exact():
    obj, values, _ = deep_saddle(60)
    cp = ss.analyze(obj)
    assert cp.quantities["lambda_min"].status == "exact"
    assert abs(cp.quantities["lambda_min"].value - float(values.min())) <= cp.quantities["lambda_min"].error
    assert cp.quantities["index"].value == pytest.approx(10 / 60)


def poor_certificate(cp, direction: torch.Tensor, curvature: float):
    """``cp`` as a bottom run stopped at its first negative Rayleigh quotient leaves it when that quotient
    is far above lambda_min (on an unconverged MLP: -5.12 against -1849): ``direction`` as the certificate."""
    converged = cp.converged.clone()
    converged[0] = False
    return dataclasses.replace(cp, escape_direction=direction.clone(), escape_curvature=curvature, converged=converged)


def test_the_escape_from_a_certificate_is_sharpened_towards_lambda_min():
    obj, values, q = deep_saddle()
    cp = ss.analyze(obj, exact=False, index_probes=0)
    lam = float(values.min())
    # One Lanczos run from both ends finds lambda_min itself on this spectrum; a certificate along the
    # eigenvector of -1 (negative curvature, far above lambda_min = -50) is what sharpening is for.
    cp = poor_certificate(cp, q[:, int(torch.argmax(torch.where(values < 0, values, -torch.inf)))], -1.0)
    assert cp.escape_curvature > 0.5 * lam  # the bare certificate is a poor escape
    sharp = ss.critical.sharpen_escape(obj, cp, fraction=0.5)
    record = sharp.escape_sharpening
    assert record["reached"] and record["certificate_curvature"] == cp.escape_curvature
    # The direction's curvature (checked here by a dense product) is within the asked fraction of lambda_min.
    a = obj.hessian(obj.theta0)
    curvature = float(sharp.escape_direction @ a @ sharp.escape_direction)
    assert curvature <= 0.5 * lam and curvature == pytest.approx(sharp.escape_curvature, rel=1e-8)
    assert record["lambda_min_lower_bound"] <= lam + 1e-8
    step = ss.escape(obj, cp)
    assert step.curvature == pytest.approx(sharp.escape_curvature) and step.sharpening["reached"]
    assert ss.escape(obj, cp, sharpen=None).curvature == cp.escape_curvature


def test_the_report_shows_bounds_and_fractions(tmp_path):
    obj, _, _ = deep_saddle()
    cp = ss.analyze(obj, exact=False)
    ss.report(cp, obj, out=tmp_path / "r", landscape=False, density=False)
    page = (tmp_path / "r" / "report.html").read_text()
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert "an upper bound" in page and "estimates, not counts" in page
    assert report["critical_point"]["n_negative"] is None
    assert report["critical_point"]["quantities"]["index"]["is"] == "estimate"


def test_a_layernorm_model_matches_finite_differences():
    # torch.func's second derivatives through layer_norm are wrong in torch 2.13 (CPU); ours must not be.
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 3)).double()
    x, y = torch.randn(17, 4, dtype=torch.float64), torch.randn(17, 3, dtype=torch.float64)
    obj = ss.Objective.from_model(model, torch.nn.functional.mse_loss, (x, y))
    theta = obj.theta0 + 0.2 * torch.randn(obj.n_params, dtype=torch.float64)
    h = 1e-5
    columns = []
    for j in range(obj.n_params):  # central differences of the gradient, column by column
        e = torch.zeros(obj.n_params, dtype=torch.float64)
        e[j] = h
        columns.append((obj.grad(theta + e) - obj.grad(theta - e)) / (2 * h))
    fd = torch.stack(columns, 1)
    fd = 0.5 * (fd + fd.T)
    hess = obj.hessian(theta)
    assert float((hess - fd).abs().max()) <= 1e-6 * float(fd.abs().max())
    v = torch.randn(obj.n_params, dtype=torch.float64)
    assert torch.allclose(obj.hvp(theta, v), fd @ v, rtol=0, atol=1e-6 * float(fd.abs().max()) * float(v.norm()))
    truth = torch.linalg.eigvalsh(fd)
    cp = ss.analyze(obj, theta, exact=True)
    assert torch.allclose(cp.eigenvalues, truth, rtol=0, atol=1e-6 * float(truth.abs().max()))


def test_the_gradient_norm_of_a_million_float32_entries_is_summed_in_float64():
    # torch sums a float32 norm in float32: at 1M entries it reads 9e-6 low, at 124M 1.3% low. The verdict's
    # |grad| (what grad_tol is compared with) is summed in float64.
    n = 1_000_000
    a = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float32) * 1e-3
    obj = ss.Objective.from_function(lambda th: th @ a, torch.zeros(n, dtype=torch.float32))
    truth = float(a.double().norm())
    cp = ss.analyze(obj, exact=False, index_probes=0, k=1)
    assert cp.kind == "not_critical"
    assert cp.grad_norm == pytest.approx(truth, rel=1e-7)
