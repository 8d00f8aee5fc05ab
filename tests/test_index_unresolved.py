"""The index estimate proves "unresolved" during its first probe and stops there.

Truth from ``torch.linalg.eigh`` of the dense matrix: a probe :math:`z`'s spectral measure puts
:math:`(q_i^\\top z)^2 / \\|z\\|^2` on each eigenvalue, so its exact mass in a band is a sum over the
eigenpairs; the Chebyshev-Markov-Stieltjes bound the estimate claims must never exceed it.
"""

import re

import pytest
import torch
from spectra import outlier_spectrum, planted

import saddlescope as ss
from saddlescope.curvature.density import _probe_vector, quadrature_probe
from saddlescope.curvature.index import UNRESOLVED_SKIP, cms_mass_within


def tiny_bulk(n=2000, large=40, seed=0):
    """``n - large`` eigenvalues uniform in +-1e-4 and ``large`` log-spaced in +-[1, 100], half each sign."""
    gen = torch.Generator().manual_seed(seed)
    tiny = (torch.rand(n - large, generator=gen, dtype=torch.float64) * 2 - 1) * 1e-4
    big = torch.logspace(0, 2, large // 2, dtype=torch.float64)
    return torch.cat([tiny, big, -big])


def spectrum_of(op):
    return torch.linalg.eigh(op.matrix)


def probe_outside(values, vectors, z, delta, keep=None):
    """The exact weight ``sum (q_i . z)^2`` of the eigenpairs outside ``[-delta, delta]`` (``keep``: only those).
    An eigenvalue on the edge (``delta`` equal to it up to rounding: eigh's and the quadrature's differ in
    the last bits) counts as inside, as the bound may take it."""
    edge = delta * (1 + 1e-9)
    outside = (values < -edge) | (values > edge)
    if keep is not None:
        outside = outside & keep
    return float(((vectors.T @ z) ** 2)[outside].sum())


LEAN = {"full basis": None, "three-term": lambda n: 12 * n * 8}  # 12 vectors: no room for a 61-vector basis


@pytest.mark.parametrize("path", LEAN)
def test_a_tiny_bulk_is_proved_unresolved_before_the_probe_ends(path):
    values = tiny_bulk()
    op = planted(values)
    n, steps, seed = values.numel(), 60, 0
    budget = LEAN[path] and LEAN[path](n)
    est = ss.index_estimate(op, n_probes=5, steps=steps, seed=seed, adaptive=True, memory_budget=budget)
    assert est.stopped == "unresolved" and not est.resolved and est.n_probes == 1
    assert est.reorthogonalised == (budget is None)
    assert est.hvp_count == est.steps < steps and est.planned_steps == steps
    assert est.within_bound >= UNRESOLVED_SKIP and est.within >= est.within_bound
    # The claim, against the probe's exact measure: mass within +-delta >= the bound.
    w, q = spectrum_of(op)
    z = _probe_vector(n, 0, seed, torch.float64)
    exact = 1.0 - probe_outside(w, q, z, est.delta) / float(z @ z)
    assert est.within_bound <= exact + 1e-12, (est.within_bound, exact)
    # The band proved lies inside the one the full probe would have used (its span / steps).
    full = ss.index_estimate(op, n_probes=1, steps=steps, seed=seed, memory_budget=budget)
    assert full.hvp_count == steps and est.delta <= full.delta * (1 + 1e-12)  # interlacing, up to rounding


@pytest.mark.parametrize("path", LEAN)
def test_under_deflation_the_bound_is_on_the_within_the_estimate_reports(path):
    values = tiny_bulk()
    op = planted(values)
    n, steps, seed, k = values.numel(), 60, 3, 6
    w, q = spectrum_of(op)
    known = torch.cat([torch.arange(3), torch.arange(n - 3, n)])  # three pairs at each end
    budget = LEAN[path] and LEAN[path](n)
    est = ss.index_estimate(op, n_probes=5, steps=steps, seed=seed, adaptive=True, memory_budget=budget,
                            deflate=(w[known], q[:, known]))
    assert est.stopped == "unresolved" and est.deflated == k and est.hvp_count < steps
    # The probe's within as the estimate counts it: 1 - (the probe's weight outside the band among the
    # other eigenpairs) / n - (known eigenvalues outside) / n, all from eigh.
    z = _probe_vector(n, 0, seed, torch.float64)
    rest = torch.ones(n, dtype=torch.bool)
    rest[known] = False
    known_outside = float(((w[known] < -est.delta) | (w[known] > est.delta)).sum())
    exact = 1.0 - probe_outside(w, q, z, est.delta, keep=rest) / n - known_outside / n
    assert UNRESOLVED_SKIP <= est.within_bound <= exact + 1e-12, (est.within_bound, exact)


@pytest.mark.parametrize("path", LEAN)
@pytest.mark.parametrize("spectrum", ["outliers", "tiny bulk"])
def test_the_bracket_never_claims_more_than_the_probe_holds_at_any_step_or_band(path, spectrum):
    # The Chebyshev-Markov-Stieltjes bound itself, at every step of a probe and for bands around every
    # scale of the spectrum, on a spread spectrum (where it is near-tight) and on the tiny bulk.
    values = outlier_spectrum() if spectrum == "outliers" else tiny_bulk(600, 20)
    op = planted(values)
    n, steps, seed = values.numel(), 40, 1
    rows = []
    budget = LEAN[path] and LEAN[path](n)
    row = quadrature_probe(op, 0, steps, seed=seed, memory_budget=budget, stop=lambda r: rows.append(r) or False)
    assert row.hvp_count == steps and len(rows) == steps - 1 and row.reorthogonalised == (budget is None)
    w, q = spectrum_of(op)
    z = _probe_vector(n, 0, seed, torch.float64)
    deltas = torch.cat([torch.logspace(-5, 2, 30, dtype=torch.float64), w.abs()[::37]])
    tight = 0.0
    for r in [*rows, row]:
        assert torch.all(r.nodes[1:] >= r.nodes[:-1])
        for delta in deltas.tolist():
            exact = 1.0 - probe_outside(w, q, z, delta) / n
            bound = cms_mass_within(r.nodes, r.weights, delta)
            assert bound <= exact + 1e-10, (r.nodes.numel(), delta, bound, exact)
            tight = max(tight, bound)
    assert tight > 0.5  # not vacuous
    # Fewer than three nodes in the band prove nothing.
    nodes = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    assert cms_mass_within(nodes, weights, 0.5) == 0.0 and cms_mass_within(nodes, weights, 1.0) == 0.5


@pytest.mark.parametrize("path", LEAN)
def test_a_resolved_spectrum_runs_every_step_of_every_probe(path):
    values = torch.cat([torch.linspace(-1.0, -0.2, 120), torch.linspace(0.3, 2.0, 280)]).double()
    op = planted(values)
    budget = LEAN[path] and LEAN[path](values.numel())
    est = ss.index_estimate(op, n_probes=4, steps=40, seed=0, adaptive=True, memory_budget=budget)
    assert est.resolved and est.stopped != "unresolved" and est.within_bound is None
    assert est.steps == est.planned_steps == 40 and est.hvp_count == est.n_probes * 40


def test_analyze_says_what_an_unresolved_estimate_proved_with_no_inf_anywhere(tmp_path):
    from saddlescope.display import critical_point_html
    from saddlescope.report import write_report

    values = tiny_bulk(600, 12)
    a = planted(values).matrix
    obj = ss.Objective.from_function(lambda th: 0.5 * th @ (a @ th), torch.zeros(600, dtype=torch.float64))
    cp = ss.analyze(obj, exact=False)
    est = cp.index_estimate
    assert cp.kind == "saddle" and est.stopped == "unresolved" and est.hvp_count < est.planned_steps
    zero, index = cp.quantities["zero"], cp.quantities["index"]
    # Estimates whose range is the proved one widened by two of one probe's standard deviations, sqrt(2/n).
    sd = (2 / 600) ** 0.5
    assert zero.status == index.status == "estimate"
    assert est.within_bound >= UNRESOLVED_SKIP
    assert zero.low == pytest.approx(est.within_bound - 2 * sd) and zero.high == pytest.approx(1.0)
    assert index.low == 0.0 and index.high == pytest.approx(1 - est.within_bound + 2 * sd)
    truth = torch.linalg.eigvalsh(a)
    assert float((truth < -est.delta).double().mean()) <= index.high
    summary = cp.summary()
    assert "NOT RESOLVED: at least" in summary and f"after {est.steps} of {est.planned_steps} steps" in summary
    files = write_report(cp, obj, out=tmp_path, landscape=False, density=False)
    page = files.html.read_text()
    shown = re.sub(r"<script.*?</script>", "", page, flags=re.DOTALL)  # the data island keeps the raw stderr
    for text in (summary, critical_point_html(cp), shown):
        assert not re.search(r"\b(inf|nan)\b", text), re.search(r".{80}\b(inf|nan)\b.{20}", text)
    assert "NOT RESOLVED" in shown


def test_an_unresolved_stop_the_bracket_did_not_prove_says_so():
    # The quadrature's own figure passed UNRESOLVED_SKIP after all its steps, the bracket proved less:
    # the text gives both, with no +- inf.
    from saddlescope.verdict.ends import unresolved_quantities as _unresolved_quantities
    from saddlescope.curvature.index import IndexEstimate

    inf = float("inf")
    est = IndexEstimate(0.01, inf, 0.02, inf, 0.97, inf, 0.01, 0.01, 0.5, 1, 20, 20, 0,
                        stopped="unresolved", resolved=False, within_bound=0.6, planned_steps=20)
    neg, zero, pos = _unresolved_quantities(est, "stochastic Lanczos quadrature", 10_000)
    assert (zero.low, zero.high, neg.high, pos.high) == (
        pytest.approx(0.6 - 0.02 * 2**0.5), pytest.approx(1.0), pytest.approx(0.4 + 0.02 * 2**0.5),
        pytest.approx(0.4 + 0.02 * 2**0.5))
    assert "puts 97.0% of the spectrum" in zero.basis and "proves at least 60.0%" in zero.basis
    assert "after all 20 steps" in zero.basis
    assert not re.search(r"\b(inf|nan)\b", " ".join(q.text() + q.basis for q in (neg, zero, pos)))
