"""The command line: verdicts, JSON, one-line errors, and the demo end to end."""

import json
import re
import subprocess
import sys

import pytest


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "saddlescope.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_analyze_a_builtin_problem_as_json():
    res = run("analyze", "--problem", "seed-toy", "--theta", "0,0", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["kind"] == "saddle" and out["eigenvalues"] == pytest.approx([-2, 2])


def test_analyze_with_lanczos():
    res = run("analyze", "--problem", "saddle-quadratic", "--method", "lanczos", "-k", "1", "--index-probes", "0",
              "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["method"] == "lanczos" and out["kind"] == "saddle" and out["hvp_count"] > 0
    assert out["lanczos"]["top"]["eigenvalues"] == pytest.approx([10])  # 5x^2 - y^2: H = diag(10, -2)
    # --index-probes 0: the verdict alone, every product spent on the two ends.
    assert out["index_estimate"] is None
    assert out["hvp_count"] == out["lanczos"]["top"]["hvp_count"] + out["lanczos"]["bottom"]["hvp_count"]


def test_analyze_takes_a_memory_budget_in_words():
    res = run("analyze", "--problem", "saddle-quadratic", "--method", "lanczos", "-k", "1", "--index-probes", "0",
              "--memory-budget", "1.5MB", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    plan = out["lanczos"]["top"]["plan"]
    assert (plan["budget"], plan["budget_source"]) == (1_500_000, "memory_budget") and out["kind"] == "saddle"
    for budget, message in (("lots", "memory_budget: not a number of bytes: 'lots'"),
                            ("8B", "does not fit the memory budget")):
        res = run("analyze", "--problem", "saddle-quadratic", "--method", "lanczos", "--memory-budget", budget)
        assert res.returncode != 0 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_analyze_by_module_gives_every_layer_and_a_chart(tmp_path):
    chart = tmp_path / "blocks.png"
    res = run("analyze", "--problem", "digits-mlp", "--method", "exact", "--by", "module", "--plot", str(chart), "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    rows = out["blocks"]["rows"]
    assert [r["name"] for r in rows] == ["0", "2"]  # the two Linear layers of 64-32-10
    assert [r["n_params"] for r in rows] == [64 * 32 + 32, 32 * 10 + 10]
    # The diagonal blocks of H sit inside its spectrum (Cauchy interlacing).
    assert all(out["lambda_min"] - 1e-6 <= r["lambda_min"] <= r["lambda_max"] <= out["lambda_max"] + 1e-6
               for r in rows)
    # Off a terminal the long stage still says where it is: timed lines on stderr, never silence.
    assert re.search(r"\[saddlescope\] hessian products: \d+/2410", res.stderr) and "2410/2410 (100%)" in res.stderr
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quiet_silences_progress():
    res = run("analyze", "--problem", "seed-toy", "--theta", "0,0", "--quiet")
    assert res.returncode == 0 and "saddle" in res.stdout
    assert res.stderr == ""
    loud = run("analyze", "--problem", "seed-toy", "--theta", "0,0")
    assert "[saddlescope] hessian products" in loud.stderr


def test_errors_are_one_line_without_traceback():
    for args in (["analyze", "--problem", "nope"], ["analyze", "--problem", "seed-toy", "--theta", "1,2,3"],
                 ["analyze", "--problem", "seed-toy", "--theta", "a,b"],
                 ["analyze", "--problem", "seed-toy", "--method", "magic"],
                 ["analyze", "--problem", "seed-toy", "--by", "layer"],
                 ["analyze", "--problem", "seed-toy", "--plot", "x.png"]):
        res = run(*args)
        assert res.returncode == 2
        assert "Traceback" not in res.stderr
        assert res.stderr.strip().startswith("error:")
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_demo_runs_end_to_end(tmp_path):
    res = run("demo", "--out", str(tmp_path), "--quick", timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "demo_report.json").read_text())
    assert report["toy"]["origin"]["kind"] == "saddle"
    assert report["toy"]["origin"]["eigenvalues"] == pytest.approx([-2, 2])
    assert report["toy"]["valley"]["kind"] == "minimum"
    assert report["toy"]["escape"]["loss_after"] < report["toy"]["escape"]["loss_before"]
    assert report["digits"]["verdict"]["n_params"] == 2410
    for png in ("seed_toy_surface.png", "digits_loss.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
