"""The min-ratio study: critical-point search against known answers, resumable records, the report."""

import json
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
from saddlescope.experiments.critical_search import find_critical_point
from saddlescope.experiments.min_ratio import MinRatioConfig, min_ratio, network_config, run_network
from saddlescope.experiments.records import RecordStore
from saddlescope.report.study_plots import write_min_ratio_report

TINY = MinRatioConfig(hidden=((4,), (6,)), n_samples=60, train_steps=(0, 10, 50), max_iter=20)
TINY_CLI = ["--hidden", "4;6", "--n-samples", "60", "--train-steps", "0,10,50", "--max-iter", "20"]


# ---------------------------------------------------------------------- the search
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


def test_a_search_out_of_budget_is_not_converged():
    obj = ss.problems.rosenbrock()
    result = find_critical_point(obj, torch.tensor([-1.2, 1.0], dtype=obj.dtype), max_iter=2)
    assert result.label == "not_converged" and not result.stalled and result.iterations == 2


# ---------------------------------------------------------------------- the study
def test_a_small_study_runs_end_to_end_and_resumes_in_process(tmp_path):
    study = min_ratio(5, out=tmp_path, seed=3, config=TINY, workers=0, progress=False)
    assert [r["run_id"] for r in study.records] == list(range(5)) and study.computed == list(range(5))
    s = study.summary
    assert s.n_runs == 5 and sum(s.labels.values()) == 5
    assert set(s.labels) == {"critical", "gradient_flat", "not_converged", "error"}
    assert s.labels["error"] == 0
    for r in study.records:
        assert r["label"] in ("critical", "gradient_flat", "not_converged")
        assert 0.0 <= r["min_ratio"] <= 1.0 and 0.0 <= r["index"] <= 1.0
        assert r["n_negative"] + r["n_zero"] + r["n_positive"] == r["n_params"] == len(r["eigenvalues"])
        assert (r["grad_norm"] <= r["search"]["thresholds"]["grad_tol"]) == (r["label"] == "critical")
        assert r["config"] == network_config(TINY, 3, r["run_id"]).to_dict()
    # Every number of the summary is in summary.json.
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["summary"]["labels"] == s.labels and saved["config"] == TINY.to_dict()

    report = write_min_ratio_report(study, command="saddlescope study min-ratio --out X -n 5")
    text = report.read_text()
    for png in ("loss_vs_min_ratio.png", "loss_vs_index.png", "search_end.png"):
        assert (tmp_path / png).stat().st_size > 1000 and f"]({png})" in text
    assert "saddlescope study min-ratio --out X -n 5" in text and '"n_samples": 60' in text
    assert f"{s.labels['critical']} of 5" in text

    # Resuming skips every finished run; a larger n extends the study; a run is reproducible.
    again = min_ratio(6, out=tmp_path, seed=3, config=TINY, workers=0, progress=False)
    assert again.skipped == list(range(5)) and again.computed == [5]
    redo = run_network(TINY, 3, 2)
    kept = study.records[2]
    for key in ("loss", "grad_norm", "min_ratio", "index", "label", "eigenvalues"):
        assert redo[key] == kept[key], key


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
    # Slower runs than TINY, so that the kill lands while runs are in flight.
    args = [sys.executable, "-m", "saddlescope.cli", "study", "min-ratio", "--out", str(out), "-n", "8",
            "--seed", "1", "--hidden", "6", "--n-samples", "60", "--train-steps", "300,1000", "--max-iter", "30",
            "--workers", "2", "--no-progress"]
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
    assert 1 <= len(before) < 8, before
    snapshot = {i: store.path(i).read_text() for i in before}
    for i, text in snapshot.items():
        assert json.loads(text)["run_id"] == i  # every record counted is whole
    # The orphaned workers notice their parent is gone and exit.
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers)
    # A write cut short leaves at most a temporary file: never a record, removed on resume.
    (runs / ".run-000007.json.x1y2.tmp").write_text('{"run_id": 7, "lab')
    assert store.completed() == before

    res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert store.completed() == set(range(8))
    assert sorted(p.name for p in runs.iterdir()) == [f"run-{i:06d}.json" for i in range(8)]
    for i in range(8):
        assert json.loads(store.path(i).read_text())["run_id"] == i
    for i, text in snapshot.items():
        assert store.path(i).read_text() == text  # finished runs were skipped, not recomputed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["summary"]["n_runs"] == 8 and summary["skipped"] == len(before)
    assert (out / "report.md").exists() and "8 networks" in res.stdout
    # --seed makes it reproducible: a worker's record is what this process computes for that run (to
    # the last digits, which depend on how each process's BLAS was started).
    config = MinRatioConfig(hidden=((6,),), n_samples=60, train_steps=(300, 1000), max_iter=30)
    assert json.loads((out / "study.json").read_text())["config"] == config.to_dict()
    here, there = run_network(config, 1, 0), store.read(0)
    for key in ("label", "kind", "n_negative", "n_zero", "n_positive", "config"):
        assert here[key] == there[key], key
    for key in ("loss", "train_loss", "min_ratio", "index"):
        assert here[key] == pytest.approx(there[key], rel=1e-9, abs=1e-12), key


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
    {"pool": 3}, {"init_scale": (2.0, 1.0)}, {"train_steps": (-1,)}, {"weight_decay": -1.0},
    {"flat_fraction": 1.5}, {"max_iter": 0}, {"optimizers": ("sgd",)}, {"grad_tol": 0.0},
])
def test_bad_study_config(kwargs):
    with pytest.raises(InvalidInputError):
        MinRatioConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [
    {"grad_tol": -1.0}, {"flat_fraction": 0.0}, {"kernel_rtol": 2.0}, {"max_iter": 0}, {"stall_window": 1.5},
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


def test_the_cli_reports_bad_arguments_in_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "saddlescope.cli", "study", "min-ratio", "--out", str(tmp_path),
                          "--hidden", "8;x"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--hidden" in res.stderr and "Traceback" not in res.stderr
