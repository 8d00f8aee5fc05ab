"""Verdicts, eigenvalues and escape directions against hand-derived values (float64, <= 1e-6)."""

import math

import pytest
import torch

import saddlescope as ss
from saddlescope.errors import NotADescentPointError

TOL = 1e-6


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def assert_close(actual, expected, tol=TOL):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape
    assert float((actual - expected).abs().max()) <= tol, (actual, expected)


def assert_parallel(u, expected):
    """u equals expected up to sign (eigenvectors have no sign)."""
    expected = expected / expected.norm()
    assert min(float((u - expected).norm()), float((u + expected).norm())) <= TOL, (u, expected)


def test_seed_toy_origin_is_a_saddle_with_the_analytic_hessian():
    obj = ss.problems.seed_toy()
    origin = t(0, 0)
    assert_close(obj.grad(origin), [0, 0])
    assert_close(obj.hessian(origin), [[0, -2], [-2, 0]])
    cp = ss.analyze(obj, origin)
    assert cp.kind == "saddle" and cp.resolved_by == "eigenvalues"
    assert_close(cp.eigenvalues, [-2, 2])
    assert_parallel(cp.escape_direction, t(1, 1))
    assert cp.escape_curvature == pytest.approx(-2, abs=TOL)
    assert (cp.n_negative, cp.n_zero, cp.n_positive) == (1, 0, 1)
    assert cp.min_ratio == 0.5 and cp.index == 0.5
    assert cp.grad_norm == 0.0 and cp.loss == 1.0


def test_escape_from_the_toy_saddle_follows_the_analytic_loss():
    obj = ss.problems.seed_toy()
    cp = ss.analyze(obj, t(0, 0))
    step = ss.escape(obj, cp)
    alpha = step.step_size
    # Along (1,1)/sqrt2: w1 w2 = alpha^2 / 2, so L = (1 - alpha^2/2)^2.
    assert step.loss_after == pytest.approx((1 - alpha**2 / 2) ** 2, abs=1e-12)
    assert step.loss_after < step.loss_before == 1.0
    assert_close(step.theta, alpha * step.direction)
    assert_parallel(step.direction, t(1, 1))


@pytest.mark.parametrize("w1", [1.0, 2.0, -0.5, 3.0])
def test_toy_valley_is_a_flat_minimum_resolved_by_probing(w1):
    obj = ss.problems.seed_toy()
    w2 = 1.0 / w1
    cp = ss.analyze(obj, t(w1, w2))
    # H = [[2 w2^2, 4 w1 w2 - 2], [.., 2 w1^2]] = [[2w2^2, 2], [2, 2w1^2]]: eigenvalues 0, 2(w1^2 + w2^2).
    assert_close(cp.eigenvalues, [0, 2 * (w1**2 + w2**2)])
    assert cp.curvature_kind == "degenerate"
    assert cp.kind == "minimum" and cp.resolved_by == "probe"
    assert cp.probe.flat and cp.probe.complete and not cp.probe.found_decrease
    assert cp.escape_direction is None
    with pytest.raises(NotADescentPointError):
        ss.escape(obj, cp)


def test_quadratic_saddle():
    cp = ss.analyze(ss.problems.saddle_quadratic(), t(0, 0))
    assert cp.kind == "saddle"
    assert_close(cp.eigenvalues, [-2, 10])
    assert_parallel(cp.escape_direction, t(0, 1))


def test_monkey_saddle_needs_the_probe():
    cp = ss.analyze(ss.problems.monkey_saddle(), t(0, 0))
    assert_close(cp.eigenvalues, [0, 0])
    assert cp.curvature_kind == "degenerate"
    assert cp.kind == "saddle" and cp.resolved_by == "probe"
    assert cp.probe.found_decrease and cp.probe.found_increase
    # The probe's direction really descends: x^3 - 3 x y^2 < 0 a little way along it.
    x, y = (1e-2 * cp.escape_direction).tolist()
    assert x**3 - 3 * x * y**2 < 0


def test_peano_surface_is_a_saddle_though_every_line_rises():
    cp = ss.analyze(ss.problems.peano_surface(), t(0, 0))
    assert_close(cp.eigenvalues, [0, 2])
    assert cp.kind == "saddle" and cp.resolved_by == "probe"


def test_probing_off_leaves_a_degenerate_point_unresolved():
    cp = ss.analyze(ss.problems.monkey_saddle(), t(0, 0), probe=False)
    assert cp.kind == "degenerate" and cp.resolved_by == "unresolved"


def test_rosenbrock_minimum():
    cp = ss.analyze(ss.problems.rosenbrock(), t(1, 1))
    h = torch.tensor([[802.0, -400.0], [-400.0, 200.0]], dtype=torch.float64)
    tr, det = 1002.0, 802.0 * 200.0 - 400.0**2
    disc = math.sqrt(tr**2 / 4 - det)
    assert_close(cp.eigenvalues, [tr / 2 - disc, tr / 2 + disc], tol=1e-9 * 1002)
    assert_close(cp.eigenvalues, torch.linalg.eigvalsh(h), tol=1e-9 * 1002)
    assert cp.kind == "minimum" and cp.escape_direction is None


def test_maxima_strict_and_degenerate():
    strict = ss.Objective.from_function(lambda th: -(th[0] ** 2) - 3 * th[1] ** 2, [0.0, 0.0])
    cp = ss.analyze(strict)
    assert cp.kind == "maximum"
    assert_close(cp.eigenvalues, [-6, -2])
    flat_top = ss.Objective.from_function(lambda th: -(th[0] ** 4) - th[1] ** 2, [0.0, 0.0])
    cp = ss.analyze(flat_top)
    assert cp.curvature_kind == "degenerate" and cp.kind == "maximum" and cp.resolved_by == "probe"


def test_quartic_minimum_is_not_flat():
    cp = ss.analyze(ss.Objective.from_function(lambda th: th[0] ** 4 + th[1] ** 2, [0.0, 0.0]))
    assert cp.kind == "minimum" and cp.resolved_by == "probe" and not cp.probe.flat


def test_cubic_hidden_in_a_combination_of_null_directions():
    # x*y*z vanishes along every axis; only oblique directions reveal the saddle.
    cp = ss.analyze(ss.Objective.from_function(lambda th: th[0] * th[1] * th[2] + th[3] ** 2, [0.0] * 4))
    assert cp.curvature_kind == "degenerate" and cp.kind == "saddle"


def test_not_critical_still_reports_the_spectrum():
    obj = ss.problems.seed_toy()
    w1, w2 = 0.5, 0.25
    cp = ss.analyze(obj, t(w1, w2))
    # grad = -2 (1 - w1 w2) (w2, w1)
    assert cp.grad_norm == pytest.approx(2 * (1 - w1 * w2) * math.hypot(w1, w2), rel=1e-12)
    assert cp.kind == "not_critical" and cp.resolved_by == "gradient"
    h = torch.tensor([[2 * w2**2, 4 * w1 * w2 - 2], [4 * w1 * w2 - 2, 2 * w1**2]], dtype=torch.float64)
    assert_close(cp.eigenvalues, torch.linalg.eigvalsh(h))
    # The escape direction of a non-critical point descends.
    assert float(obj.grad(t(w1, w2)) @ cp.escape_direction) <= 0


def test_grad_tol_is_respected_and_reported():
    obj = ss.problems.seed_toy()
    cp = ss.analyze(obj, t(1e-4, 0.0), grad_tol=1e-3)
    assert cp.kind == "saddle" and cp.tolerances.grad_tol == 1e-3
    assert ss.analyze(obj, t(1e-4, 0.0), grad_tol=1e-5).kind == "not_critical"


def test_zero_threshold_follows_rtol_and_atol():
    obj = ss.Objective.from_function(lambda th: th[0] ** 2 - 1e-7 * th[1] ** 2, [0.0, 0.0])
    fine = ss.analyze(obj)  # default rtol 1e-9 resolves the -2e-7 eigenvalue
    assert fine.kind == "saddle" and fine.tolerances.zero_threshold == pytest.approx(2e-9)
    coarse = ss.analyze(obj, rtol=1e-6)  # now -2e-7 counts as zero: degenerate, probe finds the drop
    assert coarse.curvature_kind == "degenerate"
    assert coarse.tolerances.zero_threshold == pytest.approx(2e-6)
    assert coarse.kind == "saddle"  # never "minimum" because of the zero threshold


def test_float32_tiny_negative_curvature_is_still_a_saddle():
    # Regression: in float32 the default rtol counts -2e-7 as zero; the probe must still find the saddle.
    obj = ss.Objective.from_function(lambda th: th[0] ** 2 - 1e-7 * th[1] ** 2, torch.zeros(2))
    assert obj.dtype == torch.float32
    cp = ss.analyze(obj)
    assert cp.curvature_kind == "degenerate" and cp.kind == "saddle"


def test_small_gradient_does_not_fake_a_saddle():
    # Near the valley (|grad| below grad_tol but not zero) the linear term must not look like a decrease.
    obj = ss.problems.seed_toy()
    theta = t(2.0, 0.5 + 1e-9)
    cp = ss.analyze(obj, theta, grad_tol=1e-6)
    assert 0 < cp.grad_norm < 1e-6
    assert cp.kind == "minimum"


def test_to_dict_has_every_number():
    cp = ss.analyze(ss.problems.seed_toy(), t(0, 0))
    d = cp.to_dict()
    for key in ("kind", "grad_norm", "eigenvalues", "min_ratio", "index", "n_zero", "escape_direction",
                "theta", "tolerances", "seed", "mode", "dtype"):
        assert key in d
    assert d["eigenvalues"] == pytest.approx([-2, 2])
    import json

    json.dumps(d)


def test_model_and_function_forms_of_the_toy_agree():
    model, loss_fn, data = ss.problems.seed_toy_model(0.3, -0.7)
    obj = ss.Objective.from_model(model, loss_fn, data, dtype=torch.float64)
    ref = ss.problems.seed_toy()
    theta = t(0.3, -0.7)
    assert_close(obj.theta0, theta)
    assert_close(obj.hessian(theta), ref.hessian(theta), tol=1e-12)
    assert_close(obj.grad(theta), ref.grad(theta), tol=1e-12)
