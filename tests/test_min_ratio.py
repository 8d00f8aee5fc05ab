"""The min-ratio study: the critical-point search against known answers (linear networks, planted
functions, the trust-region subproblem's closed form), the summary against planted records, resumable
records, the report and the CLI."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import saddlescope as ss
from saddlescope.errors import InvalidInputError
from saddlescope.experiments.critical_search import find_critical_point, trust_region_subproblem
from saddlescope.experiments.min_ratio import (
    MinRatioConfig,
    min_ratio,
    network_config,
    run_network,
    summarize,
)
from saddlescope.experiments.records import RecordStore
from saddlescope.report.study_plots import write_min_ratio_report

# Small and fast: 64-91 parameters, 60 samples, short training and searches.
TINY = MinRatioConfig(hidden=((2,), (3,)), n_samples=60, train_steps=(150,), lecture_steps=20, max_iter=25,
                      gradient_budget=5, quasi_newton_iter=200)
TINY_CLI = ["--hidden", "2;3", "--n-samples", "60", "--train-steps", "150", "--max-iter", "8", "--lecture-steps", "20"]

# The study's own search settings (MinRatioConfig's defaults), for the known-answer tests.
STUDY = MinRatioConfig()
STUDY_SEARCH = {name: getattr(STUDY, name) for name in (
    "loss_mode_index", "gradient_budget", "descend_after_stall", "quasi_newton_iter", "kernel_rtol", "stall_window",
    "max_iter")}


# ---------------------------------------------------------------------- the search: known answers
@pytest.mark.parametrize("subset", [(), (1,), (0, 2), (1, 2), (0, 1)])
def test_search_converges_to_the_nearby_critical_point_of_a_linear_network(subset):
    """Start 0.05 away from a closed-form critical point of (1/2)|M - W2 W1|^2: the search lands on the
    same critical set (same product W2 W1 and loss) with the same number of negative eigenvalues."""
    net = ss.problems.TwoLayerLinear(4, 4, 2, seed=1)
    point = next(p for p in net.critical_points() if p.subset == subset)
    gen = torch.Generator().manual_seed(0)
    start = point.theta + 0.05 * torch.randn(net.n_params, generator=gen, dtype=torch.float64)
    obj = net.objective(start)
    result = find_critical_point(obj, grad_tol=1e-10)
    assert result.label == "critical", result.reason
    assert result.grad_norm <= 1e-10 < result.start_grad_norm
    w1, w2 = net.unpack(result.theta)
    c1, c2 = net.unpack(point.theta)
    assert torch.allclose(w2 @ w1, c2 @ c1, atol=1e-8)
    assert result.loss == pytest.approx(point.loss, abs=1e-10)
    # The critical sets are manifolds (the GL(q) gauge and more), whose zero eigenvalues move with
    # the point: compare the negative counts resolved away from zero.
    found = ss.exact_spectrum(obj, result.theta).eigenvalues
    known = ss.exact_spectrum(obj, point.theta).eigenvalues
    delta = 1e-6 * float(known.abs().max())
    assert int((found < -delta).sum()) == int((known < -delta).sum())
    assert int((found.abs() <= delta).sum()) == int((known.abs() <= delta).sum())
    verdict = ss.analyze(obj, result.theta, grad_tol=1e-9)
    assert verdict.kind == ("minimum" if net.is_minimum(subset) else "saddle")


def test_the_study_search_certifies_known_critical_points_of_a_linear_network():
    """With the study's settings, from random starts every search ends at a certified critical point whose
    loss is one of the closed-form critical losses (the energy of the discarded singular values) and whose
    verdict is the closed form's: a minimum exactly at the top-p subset. Near the minimum and near a saddle
    it certifies that point, the saddle by Newton-MR (it never switches to the loss, which would leave it)."""
    net = ss.problems.TwoLayerLinear(4, 4, 2, [4.0, 3.0, 2.0, 1.0], seed=2)
    known = {round(p.loss, 9): net.is_minimum(p.subset) for p in net.critical_points()}
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        obj = net.objective(torch.randn(net.n_params, generator=gen, dtype=torch.float64))
        result = find_critical_point(obj, grad_tol=1e-10, **STUDY_SEARCH)
        assert result.label == "critical", result.reason
        assert round(result.loss, 9) in known, result.loss
        kind = ss.analyze(obj, result.theta, grad_tol=1e-9).kind
        assert kind == ("minimum" if known[round(result.loss, 9)] else "saddle")

    minimum = next(p for p in net.critical_points() if net.is_minimum(p.subset))
    saddle = next(p for p in net.critical_points() if p.subset == (1, 2))
    for point, kind in ((minimum, "minimum"), (saddle, "saddle")):
        near = point.theta + 0.02 * torch.randn(net.n_params, generator=gen, dtype=torch.float64)
        obj = net.objective(near)
        result = find_critical_point(obj, grad_tol=1e-10, **STUDY_SEARCH)
        assert result.label == "critical" and (kind == "minimum" or result.mode == "gradient"), result.reason
        assert result.loss == pytest.approx(point.loss, abs=1e-9)
        assert ss.analyze(obj, result.theta, grad_tol=1e-9).kind == kind


def test_search_polishes_a_nondegenerate_saddle_quadratically():
    obj = ss.problems.saddle_quadratic()
    result = find_critical_point(obj, torch.tensor([0.3, -0.2], dtype=obj.dtype), grad_tol=1e-12)
    assert result.label == "critical" and result.iterations == 1  # a quadratic: one Newton step
    assert result.theta.abs().max() < 1e-12


@pytest.mark.parametrize("curved", [False, True])
def test_a_planted_gradient_flat_point_is_not_called_critical(curved):
    """f = x^2 (- z^2) + c y: the gradient (2x, c, ...) never vanishes, and at x = 0 it lies in the kernel
    of H = diag(2, 0, ...): H g = 0. No Newton-type step can lower |g| below c."""
    c = 0.5

    def plateau(t):
        return t[0] ** 2 + c * t[1] - (t[2] ** 2 if curved else 0 * t[2])

    obj = ss.Objective.from_function(plateau, [1.0, 0.3, 0.2 if curved else 0.0])
    result = find_critical_point(obj)
    assert result.label == "gradient_flat", result.reason
    assert result.stalled and result.grad_norm == pytest.approx(c)
    assert result.kernel_fraction == pytest.approx(1.0)
    assert result.hg_ratio == pytest.approx(0.0, abs=1e-12)
    assert ss.analyze(obj, result.theta).kind == "not_critical"


def test_a_stall_with_the_gradient_outside_the_kernel_is_not_gradient_flat():
    """f = x^2 + c y + e y^2 with a tiny e: the gradient's y part lies on an eigenvalue 2e, not in the
    kernel, yet it is far above the near-kernel cut: a search that must stop there is not_converged."""
    e = 1e-6

    def shallow(t):
        return t[0] ** 2 + 0.5 * t[1] + e * t[1] ** 2

    obj = ss.Objective.from_function(shallow, [1.0, 0.0])
    result = find_critical_point(obj, max_iter=1, loss_mode_index=1.0, initial_radius=1e-3)
    assert result.label == "not_converged" and result.hg_ratio > 1e-8, result.reason


def test_loss_mode_reaches_rosenbrocks_minimum_where_newton_mr_alone_crawls():
    obj = ss.problems.rosenbrock()
    start = torch.tensor([-1.2, 1.0], dtype=obj.dtype)
    result = find_critical_point(obj, start, grad_tol=1e-10, loss_mode_index=1.0, max_iter=60)
    assert result.label == "critical" and result.mode == "loss" and result.loss_mode_at == 1, result.reason
    assert torch.allclose(result.theta, torch.ones(2, dtype=obj.dtype), atol=1e-8)
    assert ss.analyze(obj, result.theta, grad_tol=1e-9).kind == "minimum"


def test_a_spent_gradient_budget_switches_to_loss_mode_and_records_where():
    """f = x^2 + (y^2 - 1)^2 from (1, 0.1): one Newton-MR step lands next to the saddle at 0; with a budget of
    one step the search then goes down the loss to a minimum (0, +-1), and records where it left."""

    def well(t):
        return t[0] ** 2 + (t[1] ** 2 - 1) ** 2

    obj = ss.Objective.from_function(well, [1.0, 0.1])
    result = find_critical_point(obj, grad_tol=1e-10, gradient_budget=1, quasi_newton_iter=50, max_iter=30)
    assert result.label == "critical" and result.mode == "loss", result.reason
    assert result.theta[0].abs() < 1e-8 and result.theta[1].abs() == pytest.approx(1.0, abs=1e-8)
    end = result.gradient_end
    assert end is not None and "budget" in end["why"] and result.mode_steps["gradient"] == 1
    assert end["index"] == 0.5 and end["loss"] == pytest.approx(1.0, abs=0.01) and result.quasi_newton_iterations > 0


def test_a_search_out_of_budget_is_not_converged():
    obj = ss.problems.rosenbrock()
    result = find_critical_point(obj, torch.tensor([-1.2, 1.0], dtype=obj.dtype), max_iter=2)
    assert result.label == "not_converged" and not result.stalled and result.iterations == 2


def _subproblem_by_brute_force(values, coeffs, radius, samples=200_000):
    gen = torch.Generator().manual_seed(0)
    directions = torch.randn(samples, values.numel(), generator=gen, dtype=torch.float64)
    directions /= directions.norm(dim=1, keepdim=True)
    q = directions * radius  # the minimum of a nonconvex model lies on the boundary
    model = q @ coeffs + 0.5 * (q * q) @ values
    return float(model.min())


@pytest.mark.parametrize("values,coeffs,radius", [
    ([1.0, 3.0], [0.5, -0.3], 10.0),      # the Newton step is interior
    ([1.0, 3.0], [2.0, -3.0], 0.5),       # convex, on the boundary
    ([-2.0, 1.0], [0.3, 0.4], 1.0),       # indefinite
    ([-2.0, 1.0], [0.0, 0.4], 1.0),       # the hard case: no gradient on the negative direction
])
def test_the_trust_region_step_solves_its_subproblem(values, coeffs, radius):
    values, coeffs = torch.tensor(values, dtype=torch.float64), torch.tensor(coeffs, dtype=torch.float64)
    q = trust_region_subproblem(values, coeffs, radius)
    assert float(q.norm()) <= radius * (1 + 1e-9)
    model = float(q @ coeffs + 0.5 * (q * q) @ values)
    interior = bool((values > 0).all()) and float((coeffs / values).norm()) <= radius
    best = float((-coeffs / values) @ coeffs * 0.5) if interior else _subproblem_by_brute_force(values, coeffs, radius)
    assert model <= best + 1e-6 * max(1.0, abs(best))


# ---------------------------------------------------------------------- the summary on planted records
def _record(run_id, points, lecture_ratio=0.55, grad=1e-3):
    searches = []
    for i, (loss, index, kind, collapsed) in enumerate(points):
        loss, index = (0.9, 0.3) if kind is None else (loss, index)
        searches.append({
            "start": ("early", "middle", "late")[i], "label": "critical" if kind else "not_converged",
            "kind": kind or "not_critical", "data_loss": loss, "loss": loss, "error_rate": loss / 2,
            "index": index, "min_ratio": 1 - index, "collapsed": collapsed, "grad_tol": 1e-8, "hg_ratio": math.nan,
            "lambda_max": 10.0, "search": {"gradient_end": {"loss": loss + 0.2, "data_loss": loss + 0.2,
                                                              "index": 0.1 + loss / 4, "grad_norm": 1e-3},
                                           "mode_steps": {"gradient": 3, "loss": 2}},
            "data_hessian": {"n_negative": 0, "n_zero": 1 if kind == "minimum" else 0},
        })
    return {"run_id": run_id, "label": "done", "searches": searches, "seconds": {"total": 2.0},
            "lecture": {"grad_norm": grad, "data_loss": 0.5,
                        "min_ratios": {"0": 0.8, "1e-06": 0.7, "0.0001": lecture_ratio},
                        "data_min_ratios": {"0": 0.8, "1e-06": 0.7, "0.0001": lecture_ratio}}}


def test_the_summary_keeps_the_collapsed_cluster_apart_and_bootstraps_over_networks():
    """Saddles whose index rises exactly with the loss, plus a collapsed cluster at a high loss with index
    0: without the cluster the rank correlation is 1 and the fitted slope is the planted one."""
    records = []
    for run_id in range(12):
        loss = 0.1 + 0.05 * run_id
        records.append(_record(run_id, [(loss, 0.2 * loss, "saddle", False), (2.3, 0.0, "saddle", True),
                                        (None, None, None, False)], lecture_ratio=0.4 + 0.01 * run_id))
    s = summarize(records, seed=1)
    assert s.n_runs == 12 and s.n_searches == 36
    assert s.labels == {"critical": 24, "gradient_flat": 0, "not_converged": 12}
    assert s.fraction_critical == pytest.approx(24 / 36)
    assert s.fraction_critical_ci[0] < 24 / 36 < s.fraction_critical_ci[1]
    assert s.collapsed == 12 and s.kinds == {"saddle": 12}
    assert s.spearman.value == pytest.approx(1.0) and s.spearman.method.startswith("bootstrap over networks")
    assert s.fit_slope == pytest.approx(0.2) and s.slope.low == pytest.approx(0.2) == s.slope.high
    assert s.spearman_with_collapsed < 0.5  # the cluster at loss 2.3, index 0 breaks the curve
    assert s.loss_levels_uncollapsed == 12 and s.loss_levels == 13
    assert s.lecture.largest_min_ratio == {"0": 0.8, "1e-06": 0.7, "0.0001": pytest.approx(0.51)}
    assert s.lecture.critical.value == 0.0 and s.stalls.points == 36
    assert s.stalls.spearman.value == pytest.approx(1.0, abs=0.05)


def test_the_summary_of_minima_only_has_no_curve():
    records = [_record(i, [(0.1 * (i + 1), 0.0, "minimum", False)] * 3) for i in range(5)]
    s = summarize(records)
    assert s.kinds == {"minimum": 15} and s.fraction_minima == 1.0 and s.minima_penalty_only == 15
    assert math.isnan(s.spearman.value) and s.fit_slope == 0.0 and s.loss_levels == 5


# ---------------------------------------------------------------------- the study
def test_a_small_study_runs_end_to_end_and_resumes_in_process(tmp_path):
    study = min_ratio(3, out=tmp_path, seed=3, config=TINY, workers=0, progress=False)
    assert [r["run_id"] for r in study.records] == list(range(3)) and study.computed == list(range(3))
    s = study.summary
    assert s.n_runs == 3 and s.n_searches == 9 and sum(s.labels.values()) == 9 and s.errors == 0
    for r in study.records:
        assert r["label"] == "done" and r["config"] == network_config(TINY, 3, r["run_id"]).to_dict()
        assert r["training"]["steps"] >= 150 and len(r["searches"]) == 3
        lecture = r["lecture"]
        assert set(lecture["min_ratios"]) == {"0", "1e-06", "0.0001"}
        assert lecture["min_ratios"]["0"] >= lecture["min_ratios"]["1e-06"] >= lecture["min_ratios"]["0.0001"]
        for p in r["searches"]:
            assert p["label"] in ("critical", "gradient_flat", "not_converged")
            assert (p["grad_norm"] <= p["grad_tol"]) == (p["label"] == "critical")
            assert p["grad_tol"] == pytest.approx(1e-8 * r["loss_scale"])
            assert p["n_negative"] + p["n_zero"] + p["n_positive"] == r["n_params"] == len(p["eigenvalues"])
            assert 0.0 <= p["error_rate"] <= 1.0 and p["data_loss"] <= p["loss"]
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["summary"]["labels"] == s.labels and saved["config"] == TINY.to_dict()

    report = write_min_ratio_report(study, command="saddlescope study min-ratio --out X -n 3")
    text = report.read_text()
    for png in ("min_ratio_panels.png", "index_vs_loss.png", "search_ends.png"):
        assert (tmp_path / png).stat().st_size > 1000 and f"]({png})" in text
    assert "## Conclusion" in text and "The lecture's figure" in text and "gradient_flat" in text
    assert "saddlescope study min-ratio --out X -n 3" in text and '"n_samples": 60' in text
    assert f"{s.labels['critical']} of 9 searches" in text

    # Resuming skips every finished run; a larger n extends the study; a run is reproducible.
    again = min_ratio(4, out=tmp_path, seed=3, config=TINY, workers=0, progress=False)
    assert again.skipped == list(range(3)) and again.computed == [3]
    redo = run_network(TINY, 3, 1)
    kept = study.records[1]
    for i, (a, b) in enumerate(zip(redo["searches"], kept["searches"])):
        for key in ("loss", "grad_norm", "min_ratio", "index", "label", "eigenvalues"):
            assert a[key] == b[key], (i, key)


def _children(pid):
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry.name))
    return kids


def _alive(pid):
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find the worker processes")
def test_a_killed_study_resumes_without_lost_or_duplicated_records(tmp_path):
    out = tmp_path / "study"
    args = [sys.executable, "-m", "saddlescope.cli", "study", "min-ratio", "--out", str(out), "-n", "4",
            "--seed", "1", *TINY_CLI, "--workers", "2", "--no-progress"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    runs = out / "runs"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if runs.is_dir() and any(p.name.startswith("run-") for p in runs.iterdir()):
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        workers = _children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    store = RecordStore(out)
    before = store.completed()
    assert 1 <= len(before) < 4, before
    snapshot = {i: store.path(i).read_text() for i in before}
    for i, text in snapshot.items():
        assert json.loads(text)["run_id"] == i  # every record counted is whole
    # The orphaned workers notice their parent is gone and exit.
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers)
    # A write cut short leaves at most a temporary file: never a record, removed on resume.
    (runs / ".run-000003.json.x1y2.tmp").write_text('{"run_id": 3, "lab')
    assert store.completed() == before

    res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert store.completed() == set(range(4))
    assert sorted(p.name for p in runs.iterdir()) == [f"run-{i:06d}.json" for i in range(4)]
    for i in range(4):
        assert json.loads(store.path(i).read_text())["run_id"] == i
    for i, text in snapshot.items():
        assert store.path(i).read_text() == text  # finished runs were skipped, not recomputed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["summary"]["n_runs"] == 4 and summary["skipped"] == len(before)
    assert (out / "report.md").exists() and "4 networks, 12 searches" in res.stdout
    assert "largest min ratio at delta = 0, 1e-6, 1e-4" in res.stdout
    # --seed makes it reproducible: a worker's record is what this process computes for that run (to
    # the last digits, which depend on how each process's BLAS was started).
    config = MinRatioConfig(hidden=((2,), (3,)), n_samples=60, train_steps=(150,), max_iter=8, lecture_steps=20)
    assert json.loads((out / "study.json").read_text())["config"] == config.to_dict()
    here, there = run_network(config, 1, 0), store.read(0)
    assert here["config"] == there["config"]
    for a, b in zip(here["searches"], there["searches"]):
        assert a["label"] == b["label"] and a["kind"] == b["kind"]
        for key in ("loss", "start_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs", [
    {"n_networks": 0}, {"n_networks": 2.5}, {"workers": -1}, {"seed": -1}, {"config": {"n_samples": 60}},
])
def test_bad_study_arguments(tmp_path, kwargs):
    kwargs = {"n_networks": 2, "out": tmp_path, "progress": False, **kwargs}
    with pytest.raises(InvalidInputError):
        min_ratio(**kwargs)


@pytest.mark.parametrize("kwargs", [
    {"activations": ("relu",)}, {"hidden": ()}, {"hidden": ((0,),)}, {"n_samples": 5}, {"loss": "hinge"},
    {"pool": 3}, {"init_scale": (2.0, 1.0)}, {"train_steps": (30,)}, {"train_steps": (0, 300)},
    {"weight_decay": 1e-3}, {"weight_decay": -1.0}, {"kernel_rtol": 1.5}, {"max_iter": 0}, {"optimizers": ("sgd",)},
    {"grad_rtol": 0.0}, {"loss_mode_index": 2.0}, {"gradient_budget": 0}, {"descend_after_stall": "yes"},
])
def test_bad_study_config(kwargs):
    with pytest.raises(InvalidInputError):
        MinRatioConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [
    {"grad_tol": -1.0}, {"kernel_rtol": 2.0}, {"max_iter": 0}, {"stall_window": 1.5}, {"loss_mode_index": 1.5},
    {"gradient_budget": 0}, {"quasi_newton_iter": -1},
])
def test_bad_search_arguments(kwargs):
    with pytest.raises(InvalidInputError):
        find_critical_point(ss.problems.saddle_quadratic(), **kwargs)


def test_a_folder_of_another_study_is_refused(tmp_path):
    min_ratio(1, out=tmp_path, config=TINY, workers=0, progress=False)
    with pytest.raises(InvalidInputError, match="different settings"):
        min_ratio(1, out=tmp_path, seed=5, config=TINY, workers=0, progress=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(InvalidInputError):
        RecordStore(tmp_path / "file")


@pytest.mark.parametrize("args,word", [(["--hidden", "8;x"], "--hidden"), (["--train-steps", "10"], "train_steps"),
                                       (["--weight-decay", "0.001"], "weight_decay")])
def test_the_cli_reports_bad_arguments_in_one_line(tmp_path, args, word):
    from typer.testing import CliRunner

    from saddlescope.cli import app

    res = CliRunner().invoke(app, ["study", "min-ratio", "--out", str(tmp_path), *args])
    assert res.exit_code == 2 and word in res.stderr and "Traceback" not in res.stderr
