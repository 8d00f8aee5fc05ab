"""The index at a resolution stated in advance: probes fitted to +-delta within a product budget.

Truth from ``torch.linalg.eigvalsh`` of the dense matrix: the exact fractions below ``-delta``, within
``+-delta`` and above ``+delta``; every estimate's error bar must cover them.
"""

import json
import subprocess
import sys

import pytest
import torch
from spectra import outlier_spectrum, planted

import saddlescope as ss
from saddlescope.curvature.density import CHECK_EVERY_STEP, check_due, quadrature_probe
from saddlescope.curvature.index import resolution_reached
from saddlescope.errors import InvalidInputError


def exact_fractions(values, delta):
    below = float((values < -delta).double().mean())
    above = float((values > delta).double().mean())
    return below, 1.0 - below - above, above


def test_the_rule_is_consulted_every_step_then_about_every_thirty_second_of_the_probe():
    due = [j for j in range(1, 2001) if check_due(j)]
    assert due[:CHECK_EVERY_STEP] == list(range(1, CHECK_EVERY_STEP + 1))
    gaps = [(b - a, a) for a, b in zip(due, due[1:], strict=False) if a >= CHECK_EVERY_STEP]
    assert all(gap <= a // 32 + 1 for gap, a in gaps)
    assert len(due) < 2000 // 4  # far fewer eigendecompositions than steps


def test_fitted_probes_cover_the_exact_fractions_of_a_planted_spectrum():
    """Five outliers up to 100 over a bulk in +-[0.01, 1] (the issue's planted spectrum), delta =
    1e-3 max|lambda|, the top five deflated from eigh, 600 products."""
    values = outlier_spectrum(n=1000)
    op = planted(values)
    w, q = torch.linalg.eigh(op.matrix)
    top = torch.argsort(w.abs(), descending=True)[:5]
    delta, budget = 1e-3 * float(values.abs().max()), 600
    est = ss.index_estimate(op, delta=delta, n_probes=3, steps=200, max_hvps=budget, fit_steps=True,
                            deflate=(w[top], q[:, top]))
    below, within, above = exact_fractions(values, delta)
    assert est.delta == delta and est.hvp_count <= budget and est.deflated == 5
    assert abs(est.value - below) <= est.error, (est.value, est.error, below)
    assert abs(est.min_ratio - above) <= est.min_ratio_error, (est.min_ratio, est.min_ratio_error, above)
    assert abs(est.within - within) <= 2 * est.within_stderr + est.quadrature_bound + est.min_ratio_quadrature_bound
    assert abs(est.value - below) <= 0.02  # the goal, here within its budget


def test_the_first_probe_stops_where_the_rule_is_met_and_the_others_follow_it():
    """A bulk far from +-delta: the bracket there shrinks fast, so the first probe stops well before its
    cap, and the budget pays for more probes than asked."""
    gen = torch.Generator().manual_seed(1)
    mags = torch.rand(800, generator=gen, dtype=torch.float64) * 0.5 + 0.5
    values = torch.where(torch.rand(800, generator=gen) < 0.3, -mags, mags)
    op = planted(values)
    n, delta, budget, cap = 800, 0.05, 1200, 300
    est = ss.index_estimate(op, delta=delta, n_probes=2, steps=cap, max_hvps=budget, fit_steps=True)
    m = est.steps
    assert m < cap and est.n_probes > 2 and est.hvp_count == est.n_probes * m <= budget
    first = quadrature_probe(op, 0, m, seed=0)
    assert resolution_reached(first, delta, budget, n, None)
    earlier = max(j for j in range(1, m) if check_due(j))
    assert not resolution_reached(quadrature_probe(op, 0, earlier, seed=0), delta, budget, n, None)
    below, _, above = exact_fractions(values, delta)
    assert abs(est.value - below) <= est.error and abs(est.min_ratio - above) <= est.min_ratio_error


def test_fit_steps_needs_a_delta_and_a_budget():
    op = planted(outlier_spectrum(n=100))
    with pytest.raises(InvalidInputError, match="fit_steps needs"):
        ss.index_estimate(op, max_hvps=100, fit_steps=True)
    with pytest.raises(InvalidInputError, match="fit_steps needs"):
        ss.index_estimate(op, delta=0.1, fit_steps=True)


def quadratic(values):
    a = planted(values).matrix
    return ss.Objective.from_function(lambda theta: 0.5 * theta @ (a @ theta),
                                      torch.zeros(values.numel(), dtype=torch.float64))


def test_analyze_states_the_resolution_relative_to_the_largest_eigenvalue():
    values = outlier_spectrum(n=800)
    obj = quadratic(values)
    cp = ss.analyze(obj, exact=False, k=5, index_rtol=1e-3, index_hvps=500)
    est = cp.index_estimate
    assert cp.kind == "saddle"
    assert est.delta == pytest.approx(1e-3 * 100.0, rel=1e-8)  # max|lambda| = 100, converged
    assert est.hvp_count <= 500 and est.deflated >= 5
    below, _, above = exact_fractions(values, est.delta)
    assert abs(cp.index - below) <= est.error and abs(cp.min_ratio - above) <= est.min_ratio_error
    assert "(0.001 max|lambda|;" in cp.summary()
    for bad in (0.0, 1.0, -1e-3, float("nan")):
        with pytest.raises(InvalidInputError, match="index_rtol"):
            ss.analyze(obj, exact=False, index_rtol=bad)
    with pytest.raises(InvalidInputError, match="index_hvps"):
        ss.analyze(obj, exact=False, index_hvps=0)


def test_the_command_line_takes_the_resolution_and_the_budget():
    def run(*args):
        return subprocess.run([sys.executable, "-m", "saddlescope.cli", "analyze", "--problem", "digits-mlp",
                               "--method", "lanczos", "-k", "3", *args], capture_output=True, text=True, timeout=300)

    res = run("--index-rtol", "1e-3", "--index-hvps", "400", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    est = out["index_estimate"]
    top = max(abs(v) for v in out["eigenvalues"])
    assert est["delta"] == pytest.approx(1e-3 * top, rel=1e-6) and est["hvp_count"] <= 400
    res = run("--index-rtol", "2")
    assert res.returncode != 0 and "index_rtol" in res.stderr and len(res.stderr.strip().splitlines()) == 1
