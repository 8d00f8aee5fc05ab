"""The saddle-prevalence study against truth from outside it: a closed-form landscape, a 1-D Gaussian
integral, the covariance of an isotropic field, the Wilson interval's closed form; resumable records,
the report and the CLI."""

import copy
import itertools
import json
import math
import subprocess
import sys

import pytest
import torch
from scipy.stats import norm

from saddlescope.errors import InvalidInputError
from saddlescope.experiments.prevalence import (
    ConfinedGaussianField,
    PrevalenceConfig,
    grf_minimum_fraction,
    index_loss_fit,
    make_function,
    network_shape,
    prevalence_study,
    run_id_of,
    summarize_prevalence,
    wilson_interval,
)
from saddlescope.experiments.records import RecordStore
from saddlescope.experiments.statistics import cluster_bootstrap, loss_levels
from saddlescope.report.prevalence_plots import write_prevalence_report

TINY = PrevalenceConfig(families=("grf", "polynomial", "network"), dims=(2, 3), instances=1, starts=3, kicks=1,
                        theory_samples=200, grf_features=256)


# ---------------------------------------------------------------------- a closed-form landscape
def test_the_double_well_study_finds_every_critical_point_with_its_index(tmp_path):
    """f = sum_i (x_i^2 - 1)^2 has its critical points at {-1, 0, 1}^n (f'' = 8 at +-1, -4 at 0): 3^n
    of them, C(n, k) 2^(n - k) of index k, 2^n minima."""
    config = PrevalenceConfig(families=("double_well",), dims=(1, 2, 3), instances=1, starts=100, kicks=2)
    study = prevalence_study(out=tmp_path, config=config, workers=0, progress=False)
    for n in (1, 2, 3):
        (record,) = [r for r in study.records if r["n"] == n]
        points = record["points"]
        assert len(points) == 3**n
        found = {tuple(round(v) for v in p["theta"]) for p in points}
        assert found == set(itertools.product((-1, 0, 1), repeat=n))
        for p in points:
            assert max(abs(v - round(v)) for v in p["theta"]) < 1e-9
            zeros = sum(1 for v in p["theta"] if round(v) == 0)
            assert p["n_negative"] == zeros and p["n_positive"] == n - zeros and p["n_zero"] == 0
            assert p["lambda_min"] == pytest.approx(-4.0 if zeros else 8.0, rel=1e-8)
            assert p["loss"] == pytest.approx(zeros, abs=1e-12)
        for k in range(n + 1):
            assert sum(p["n_negative"] == k for p in points) == math.comb(n, k) * 2 ** (n - k)
        row = study.row("double_well", n)
        assert row.minima == 2**n and row.fraction_minima == pytest.approx((2 / 3) ** n)
        assert row.naive == 0.5**n and row.theory is None


def test_the_double_wells_instances_are_distinct_rotations_with_one_closed_form(tmp_path):
    """Instance 0 is the separable double well; instance 1 a randomly rotated copy, a different function with
    the same answer: its critical points are Q^T {-1, 0, 1}^n, (2/3)^n of them minima."""
    config = PrevalenceConfig(families=("double_well",), dims=(2,), instances=2, starts=60, kicks=2)
    plain, rotated = (make_function("double_well", 2, 0, i, config) for i in (0, 1))
    x = torch.tensor([0.3, -0.7], dtype=torch.float64)
    assert not plain.describe["rotated"] and rotated.describe["rotated"]
    assert float(plain.f(x)) != pytest.approx(float(rotated.f(x)))
    study = prevalence_study(out=tmp_path, config=config, workers=0, progress=False)
    q = torch.tensor(rotated.describe["rotation"], dtype=torch.float64)
    (record,) = [r for r in study.records if r["instance"] == 1]
    assert len(record["points"]) == 9
    for p in record["points"]:
        y = q @ torch.tensor(p["theta"], dtype=torch.float64)
        assert float((y - y.round()).abs().max()) < 1e-8
        assert p["n_negative"] == int((y.round() == 0).sum())
    row = study.row("double_well", 2)
    assert row.closed_form == pytest.approx(4 / 9) and row.fraction_minima == pytest.approx(4 / 9)
    assert row.instances == 2 and math.isnan(row.fraction_ci[0])  # two functions: too few to resample
    assert row.wilson_ci[0] < 4 / 9 < row.wilson_ci[1]
    report = write_prevalence_report(study, command="x").read_text()
    assert "(2/3)^n" in report and "0.444 (exact)" in report


def _planted(family, n, instance, kinds_and_losses):
    points = [{"kind": kind, "loss": loss, "index": index, "hits": 1} for kind, loss, index in kinds_and_losses]
    return {"family": family, "n": n, "instance": instance, "labels": {"critical": len(points)},
            "starts": [{}] * len(points), "points": points}


def test_fractions_resample_functions_and_fits_are_per_dimension():
    """Four functions: two all minima, two all saddles. The pooled fraction is 1/2; the bootstrap over
    functions is wide (a resample can hold only minima-functions), the Wilson interval over 40 points is not.
    Index rises with loss at n = 2 and falls at n = 3: per-dimension fits keep both signs."""
    records = []
    for i in range(4):
        kind = "minimum" if i % 2 else "saddle"
        records.append(_planted("polynomial", 2, i, [(kind, 0.1 * k + i, (0.1 * k + i) / 10) for k in range(10)]))
        records.append(_planted("polynomial", 3, i, [(kind, 0.1 * k, 1 - 0.05 * k) for k in range(10)]))
    config = PrevalenceConfig(families=("polynomial",), dims=(2, 3), instances=4)
    rows = summarize_prevalence(records, config, seed=0)
    row = rows[0]
    assert row.fraction_minima == 0.5 and row.ci_method.startswith("bootstrap over functions")
    assert row.fraction_ci[0] <= 0.2 and row.fraction_ci[1] >= 0.8
    assert row.wilson_ci[0] > 0.3 and row.wilson_ci[1] < 0.7
    up, down = index_loss_fit(records, "polynomial", 2), index_loss_fit(records, "polynomial", 3)
    assert up.n == 2 and up.functions == 4 and up.points == 40 and up.spearman == pytest.approx(1.0)
    assert up.slope == pytest.approx(0.1) and up.slope_ci[0] == pytest.approx(0.1)
    assert down.spearman == pytest.approx(-1.0) and down.slope == pytest.approx(-0.5)
    single = summarize_prevalence(records[:2], config)[0]
    assert math.isnan(single.fraction_ci[0]) and single.ci_method.startswith("none")


def test_the_statistics_helpers():
    assert loss_levels([0.5, 0.505, 0.509, 0.7, 0.71, 2.3]) == 3
    assert loss_levels([0.1 + 0.01 * k for k in range(41)]) > 20  # a continuum is many levels
    assert loss_levels([]) == 0
    est = cluster_bootstrap([[1.0], [2.0], [3.0]], lambda g: sum(x for c in g for x in c) / len(g), what="groups")
    assert est.value == 2.0 and 1.0 <= est.low < 2.0 < est.high <= 3.0
    assert math.isnan(cluster_bootstrap([[1.0]], len, what="groups").low)


# ---------------------------------------------------------------------- the Kac-Rice curve
@pytest.mark.parametrize("edge_ratio", [0.3, 1.0])
def test_the_grf_curve_at_n1_matches_the_gaussian_integral(edge_ratio):
    """At n = 1, mu + H = M ~ N(m, 3) with m = 2 edge_ratio (G ~ N(0, 2), xi ~ N(0, 1)): the fraction of
    minima is E[M+] / E|M| and the expected count E|M| / m, both closed-form Gaussian integrals."""
    m, tau = 2 * edge_ratio, math.sqrt(3.0)
    z = m / tau
    positive = m * norm.cdf(z) + tau * norm.pdf(z)
    absolute = m * (2 * norm.cdf(z) - 1) + 2 * tau * norm.pdf(z)
    theory = grf_minimum_fraction(1, edge_ratio, samples=20000, seed=1)
    assert theory.stderr < 0.01
    assert theory.fraction == pytest.approx(positive / absolute, abs=4 * theory.stderr)
    assert theory.expected_critical == pytest.approx(absolute / m, rel=0.03)


def test_the_grf_curve_falls_with_dimension_and_rises_with_confinement():
    low = [grf_minimum_fraction(n, 0.3, samples=1000).fraction for n in (2, 8)]
    assert 1 > low[0] > low[1] > 0
    assert grf_minimum_fraction(8, 2.0, samples=1000).fraction > 0.99  # mu beyond the spectrum edge


def test_the_random_fourier_field_has_the_hessian_covariance_of_an_isotropic_field():
    """Over fields, Cov(d_ij V, d_kl V) = s^2 (d_ij d_kl + d_ik d_jl + d_il d_jk) with s = sigma / ell^2,
    Var(d_i V) = sigma^2 / ell^2, and the gradient is uncorrelated with the Hessian (the squared-exponential
    covariance differentiated at 0)."""
    n, count, features = 3, 8000, 64
    x = torch.tensor([0.3, -1.1, 0.7], dtype=torch.float64)
    fields = [ConfinedGaussianField(n, 0.3, features, torch.Generator().manual_seed(seed)) for seed in range(count)]
    field = fields[0]
    stacked = [torch.stack([getattr(f, name) for f in fields])
               for name in ("frequencies", "cos_weights", "sin_weights")]

    def derivatives(frequencies, cos_weights, sin_weights):
        one = copy.copy(field)  # the class's own potential, with this field's draws
        one.frequencies, one.cos_weights, one.sin_weights = frequencies, cos_weights, sin_weights
        return torch.func.grad(one.potential)(x), torch.func.hessian(one.potential)(x)

    g, h = torch.func.vmap(derivatives)(*stacked)
    s2 = field.hessian_scale**2
    assert s2 == pytest.approx(1 / n)
    h = h - h.mean(0)
    covariance = torch.einsum("aij,akl->ijkl", h, h) / count
    eye = torch.eye(n, dtype=torch.float64)
    expected = s2 * (torch.einsum("ij,kl->ijkl", eye, eye) + torch.einsum("ik,jl->ijkl", eye, eye)
                     + torch.einsum("il,jk->ijkl", eye, eye))
    assert torch.allclose(covariance, expected, atol=0.15 * s2)
    assert covariance[0, 0, 0, 0] / covariance[0, 0, 1, 1] == pytest.approx(3.0, rel=0.2)
    gradient_variance = field.sigma**2 / field.length**2
    assert torch.allclose(torch.cov(g.T), gradient_variance * eye, atol=0.1)
    cross = torch.einsum("ai,ajk->ijk", g - g.mean(0), h) / count
    assert cross.abs().max() < 0.1


# ---------------------------------------------------------------------- small pieces
def test_wilson_interval_closed_forms():
    z = 1.959964
    assert wilson_interval(0, 10) == pytest.approx((0.0, z * z / (10 + z * z)))
    lo, hi = wilson_interval(5, 10)
    assert lo + hi == pytest.approx(1.0) and 0.2 < lo < 0.25
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_network_shapes():
    for n in range(2, 61):
        hidden, inputs = network_shape(n)
        assert hidden * (inputs + 1) == n and inputs >= 1
    assert network_shape(12) == (4, 2) and network_shape(7) == (1, 6)
    with pytest.raises(InvalidInputError):
        network_shape(1)


# ---------------------------------------------------------------------- the study
def test_a_small_study_runs_writes_its_report_and_resumes(tmp_path):
    study = prevalence_study(out=tmp_path, seed=2, config=TINY, workers=0, progress=False)
    ids = {run_id_of(f, n, 0) for f in TINY.families for n in TINY.dims}
    store = RecordStore(tmp_path)
    assert store.completed() == ids and sorted(study.computed) == sorted(ids)
    assert {(r.family, r.n) for r in study.rows} == {(f, n) for f in TINY.families for n in TINY.dims}
    for r in study.rows:
        assert r.starts == 3 and sum(r.labels.values()) == 3
        assert r.distinct == sum(r.kinds.values()) <= r.labels.get("critical", 0)
        assert (r.theory is not None) == (r.family == "grf")
    for record in study.records:
        for p in record["points"]:
            assert p["grad_norm"] <= TINY.grad_tol and len(p["theta"]) == record["n"]
            assert p["n_negative"] + p["n_zero"] + p["n_positive"] == record["n"]
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["config"] == TINY.to_dict() and len(saved["rows"]) == len(study.rows)

    report = write_prevalence_report(study, command="saddlescope study prevalence --out X")
    text = report.read_text()
    for png in ("fraction_of_minima.png", "index_vs_loss.png", "search_outcomes.png"):
        assert (tmp_path / png).stat().st_size > 1000 and f"]({png})" in text
    assert "saddlescope study prevalence --out X" in text and "Kac-Rice" in text and '"starts": 3' in text

    # Resuming recomputes nothing; a larger grid computes only what is new; other settings are refused.
    before = {i: store.path(i).read_text() for i in ids}
    again = prevalence_study(out=tmp_path, seed=2, config=TINY, workers=0, progress=False)
    assert again.computed == [] and sorted(again.skipped) == sorted(ids)
    assert {i: store.path(i).read_text() for i in ids} == before
    wider = PrevalenceConfig(**{**TINY.to_dict(), "dims": (2, 3, 4), "families": ("grf",)})
    grown = prevalence_study(out=tmp_path, seed=2, config=wider, workers=0, progress=False)
    assert grown.computed == [run_id_of("grf", 4, 0)]
    with pytest.raises(InvalidInputError, match="different settings"):
        prevalence_study(out=tmp_path, seed=2, config=PrevalenceConfig(**{**TINY.to_dict(), "starts": 4}),
                         workers=0, progress=False)
    with pytest.raises(InvalidInputError, match="different settings"):
        prevalence_study(out=tmp_path, seed=3, config=TINY, workers=0, progress=False)


@pytest.mark.parametrize("kwargs", [
    {"families": ("grf", "spin_glass")}, {"families": ()}, {"dims": (0,)}, {"dims": (2, 500)}, {"instances": 0},
    {"starts": 0}, {"kicks": -1}, {"grad_tol": 0.0}, {"grf_edge_ratio": -1.0}, {"kick_scale": math.nan},
])
def test_bad_config(kwargs):
    with pytest.raises(InvalidInputError):
        PrevalenceConfig(**kwargs)


def test_bad_study_arguments(tmp_path):
    with pytest.raises(InvalidInputError):
        prevalence_study(out=tmp_path, workers=-1, config=TINY, progress=False)
    with pytest.raises(InvalidInputError):
        prevalence_study(out=tmp_path, config={"starts": 2}, progress=False)
    with pytest.raises(InvalidInputError):
        grf_minimum_fraction(0, 0.3)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "saddlescope.cli", "study", "prevalence", *args],
                          capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("args,word", [(["--dims", "2,x"], "--dims"), (["--families", "grf,foo"], "families"),
                                       (["--starts", "0"], "starts")])
def test_the_cli_reports_bad_arguments_in_one_line(tmp_path, args, word):
    from typer.testing import CliRunner

    from saddlescope.cli import app

    res = CliRunner().invoke(app, ["study", "prevalence", "--out", str(tmp_path), *args])
    assert res.exit_code == 2 and word in res.stderr and "Traceback" not in res.stderr
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert len([line for line in res.stderr.splitlines() if line.strip()]) <= 2  # one message (may wrap)


def test_the_cli_runs_a_small_study_with_two_workers(tmp_path):
    res = _cli("--out", str(tmp_path), "--families", "polynomial,network", "--dims", "2,3", "--starts", "2",
               "--instances", "2", "--kicks", "0", "--workers", "2", "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "report:" in res.stdout and (tmp_path / "report.md").exists()
    assert len(RecordStore(tmp_path).completed()) == 8
    assert "--workers 2" in (tmp_path / "report.md").read_text()
