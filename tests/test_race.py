"""The escape race against independent truth: the toys' own formulas, the Du et al. chain's analytic
lower bound for gradient descent, exact Hessians at the chain's saddles, and resumable records."""

import json
import math
import subprocess
import sys

import pytest
import torch

from saddlescope import problems as toys
from saddlescope.errors import InvalidInputError
from saddlescope.experiments import (
    OPTIMIZERS,
    PROBLEMS,
    DuChain,
    LrRow,
    RunRecord,
    du_chain_problem,
    race,
    read_records,
    run_one,
)
from saddlescope.experiments.race_problems import (
    monkey_saddle_surface,
    saddle_quadratic_surface,
    seed_toy_surface,
)
from saddlescope.report.race_plots import plot_race

F64 = torch.float64
PNG = b"\x89PNG\r\n\x1a\n"
ESCAPERS = ("perturbed-gd", "saddle-free-newton", "negative-curvature")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def true_loss(problem, theta):
    """The loss from saddlescope.problems (not from the race's own code)."""
    make = {"seed-toy": toys.seed_toy, "saddle-quadratic": toys.saddle_quadratic}[problem]
    theta = torch.tensor(theta, dtype=F64)
    return float(make(theta).loss(theta))


# ---------------------------------------------------------------------------------- exact saddles


@pytest.fixture(scope="module")
def exact_saddle_race():
    return race(["seed-toy", "saddle-quadratic"], ["gd", *ESCAPERS], seeds=5, quick=True)


def test_gd_never_leaves_an_exact_saddle(exact_saddle_race):
    for problem in ("seed-toy", "saddle-quadratic"):
        runs = [r for r in exact_saddle_race.records if r.problem == problem and r.optimizer == "gd"]
        assert len(runs) == 5
        for r in runs:
            assert not r.escaped and r.status in ("stuck", "censored")
            assert r.steps == r.max_steps  # censored, not an escape time
            assert r.final_theta == [0.0, 0.0]
            assert true_loss(problem, r.final_theta) == PROBLEMS[problem].saddle_loss
        best = exact_saddle_race.summary(problem, "gd").best
        assert best.escaped == 0 and best.steps_median_censored and best.wall_time_median_s is None


def test_saddle_aware_optimizers_escape_on_every_seed(exact_saddle_race):
    for problem in ("seed-toy", "saddle-quadratic"):
        threshold = PROBLEMS[problem].threshold
        for name in ESCAPERS:
            runs = [r for r in exact_saddle_race.records if r.problem == problem and r.optimizer == name]
            assert len(runs) == 5
            for r in runs:
                assert r.escaped and r.status == "escaped" and 0 < r.steps < r.max_steps
                # Re-evaluate at the final parameters with the package's own toy, not the race's loss.
                assert true_loss(problem, r.final_theta) < threshold
                assert true_loss(problem, r.final_theta) == pytest.approx(r.final_loss, abs=1e-12)


def test_table_shows_not_escaped_and_one_row_per_pair(exact_saddle_race):
    lines = exact_saddle_race.table().splitlines()
    assert len(lines) == 2 + 2 * 4
    gd_rows = [line for line in lines if "| gd |" in line]
    assert len(gd_rows) == 2 and all("not escaped" in line and "0/5" in line for line in gd_rows)


# ---------------------------------------------------------------------------------- Du et al. chain


def test_du_chain_saddles_are_where_the_construction_puts_them():
    """Exact Hessians: saddle k has one eigenvalue -2 gamma (along x_k), k-1 of 4 gamma, the rest 2L."""
    chain = DuChain(4, gamma=1.0, big_l=1.5)
    for k in range(1, chain.dim + 2):  # k = dim + 1 is the minimum
        x = torch.zeros(chain.dim, dtype=F64)
        x[: k - 1] = chain.a
        grad = torch.autograd.functional.jacobian(chain.loss, x)
        hess = torch.autograd.functional.hessian(chain.loss, x)
        assert float(grad.norm()) == 0.0
        expected = [-2.0] * (k <= chain.dim) + [4.0] * (k - 1) + [3.0] * (chain.dim - k)
        assert torch.linalg.eigvalsh(hess).tolist() == pytest.approx(sorted(expected), abs=1e-12)
        assert float(chain.loss(x)) == pytest.approx(chain.saddle_loss(k))
    assert chain.minimum_loss == chain.saddle_loss(chain.dim + 1)


def test_du_chain_gd_time_grows_exponentially_perturbed_gd_does_not():
    lr, cap = 0.1, 4000
    gd, pgd, bound = {}, {}, {}
    for d in (2, 4):
        chain, problem = DuChain(d), du_chain_problem(d)
        bound[d] = chain.gd_lower_bound(chain.start(0), lr)
        gd[d] = run_one(problem, OPTIMIZERS["gd"], lr, 0, cap)
        pgd[d] = run_one(problem, OPTIMIZERS["perturbed-gd"], lr, 0, cap)
        assert gd[d].escaped and pgd[d].escaped
        # The analytic property: gradient descent cannot pass the chain before tau_d.
        assert gd[d].steps >= bound[d]
    kappa = math.log(1 / (1 - 2 * lr)) / math.log(1 + 2 * lr)  # L = gamma = 1
    assert bound[4] >= (1 + kappa) ** 2 * bound[2]  # two more saddles: the bound more than quadruples
    assert pgd[4].steps < bound[4]  # perturbed GD beats what GD provably needs
    assert gd[4].steps / gd[2].steps > 2 * pgd[4].steps / pgd[2].steps


def test_du_chain_bound_refuses_what_it_cannot_promise():
    chain = DuChain(3)
    with pytest.raises(InvalidInputError):
        chain.gd_lower_bound(chain.start(0), lr=0.6)  # 2 lr L >= 1: no contraction argument
    with pytest.raises(InvalidInputError):
        chain.gd_lower_bound(torch.tensor([0.5, 1e-3, 1e-3]), lr=0.1)  # starts past t0
    assert DuChain(2).gd_lower_bound(torch.tensor([1e-3, 1e-300], dtype=F64), lr=0.2) < math.inf
    assert DuChain(8).gd_lower_bound(DuChain(8).start(0), lr=0.2) == math.inf  # subnormal: stuck


# ---------------------------------------------------------------------------------- problems


def test_race_surfaces_are_the_package_toys():
    gen = torch.Generator().manual_seed(1)
    for surface, make in ((seed_toy_surface, toys.seed_toy), (saddle_quadratic_surface, toys.saddle_quadratic),
                          (monkey_saddle_surface, toys.monkey_saddle)):
        for _ in range(5):
            theta = torch.randn(2, generator=gen, dtype=F64)
            assert float(surface(theta[0], theta[1])) == pytest.approx(float(make(theta).loss(theta)), rel=1e-14)


@pytest.mark.parametrize("name", ["seed-toy-noisy", "saddle-quadratic", "du-chain-3", "linear-saddle"])
def test_minibatch_gradients_are_unbiased(name):
    instance = PROBLEMS[name].build(0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        instance.set_flat(instance.flat() + 0.3 * torch.randn(instance.flat().numel(), generator=gen, dtype=F64))
    (full,) = torch.autograd.grad(instance.loss(), instance.params)
    draws = torch.stack([torch.autograd.grad(instance.minibatch_loss(gen), instance.params)[0] for _ in range(600)])
    error = draws.std(0) / math.sqrt(len(draws))
    assert (draws.mean(0) - full).abs().max() <= 5 * error.max() + 1e-12
    assert float(draws.std(0).max()) > 0  # there is noise to average


def test_linear_saddle_starts_at_a_saddle_of_the_closed_form():
    instance = PROBLEMS["linear-saddle"].build(0)
    net = toys.TwoLayerLinear(4, 4, 2, seed=0)
    theta = instance.flat()
    hess = torch.autograd.functional.hessian(net.loss, theta)
    assert float(torch.autograd.functional.jacobian(net.loss, theta).norm()) < 1e-12
    assert torch.linalg.eigvalsh(hess)[0].item() == pytest.approx(-1.0, abs=1e-9)
    assert float(net.loss(theta)) == pytest.approx(PROBLEMS["linear-saddle"].saddle_loss)


# ---------------------------------------------------------------------------------- summaries


def fake(steps, escaped, lr=0.1, final=0.0):
    return RunRecord("p", "o", lr, 0, 100, 0.0, "escaped" if escaped else "censored", escaped,
                     steps if escaped else 100, steps, steps, 0.01, 1.0, final)


def test_quantiles_of_censored_runs_are_flagged_not_invented():
    row = LrRow.from_records(0.1, [fake(10, True), fake(20, True), fake(0, False), fake(0, False), fake(0, False)])
    assert row.escaped == 2 and row.escaped_fraction == 0.4
    assert (row.steps_q25, row.steps_q25_censored) == (20, False)
    assert (row.steps_median, row.steps_median_censored) == (100, True)
    assert row.steps_min == 10 and row.steps_max_censored
    assert row.wall_time_median_s == pytest.approx(0.01)
    majority = LrRow.from_records(0.3, [fake(50, True), fake(60, True), fake(70, True), fake(0, False), fake(0, False)])
    assert not majority.steps_median_censored and majority.steps_median == 70
    assert min([row, majority], key=LrRow.rank_key) is majority


# ---------------------------------------------------------------------------------- outputs and resume


QUICK = {"problems": ["seed-toy-noisy", "saddle-quadratic", "du-chain-3"], "optimizers": ["gd", "perturbed-gd"],
         "seeds": 2, "quick": True}


def test_outputs_json_table_and_plots(tmp_path):
    result = race(out=tmp_path, **QUICK)
    data = json.loads((tmp_path / "race.json").read_text())
    assert len(data["summaries"]) == 3 * 2 and len(data["records"]) == 3 * 2 * 2
    assert data["config"]["seeds"] == [0, 1] and data["best_lr_rule"]
    assert all(s["rows"] and s["best_lr"] in [r["lr"] for r in s["rows"]] for s in data["summaries"])
    table = (tmp_path / "race.md").read_text().strip().splitlines()
    assert len(table) == 2 + 3 * 2 and table[0].startswith("| problem | optimizer")
    paths = plot_race(result, tmp_path)
    assert sorted(p.name for p in paths) == ["race_du-chain-3_loss.png", "race_saddle-quadratic_trajectories.png",
                                            "race_seed-toy-noisy_trajectories.png"]
    assert all(p.read_bytes()[:8] == PNG for p in paths)


def test_resume_skips_finished_runs_and_redoes_a_damaged_one(tmp_path):
    first = race(out=tmp_path, **QUICK)
    assert first.executed == 12 and first.reused == 0
    again = race(out=tmp_path, **QUICK)
    assert again.executed == 0 and again.reused == 12
    assert again.table() == first.table()

    log = tmp_path / "race_records.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    damaged = RunRecord.from_dict(json.loads(lines[-1]))
    log.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # killed mid-write
    assert len(read_records(log)) == 11

    third = race(out=tmp_path, **QUICK)
    assert third.executed == 1 and third.reused == 11
    records = read_records(log)
    assert len(records) == 12 and records[-1].key == damaged.key
    assert log.read_text().endswith("\n") and all(json.loads(line) for line in log.read_text().splitlines())


def test_bad_arguments_are_refused():
    for kwargs in ({"problems": ["nope"]}, {"optimizers": "gd,nope"}, {"seeds": 0}, {"max_steps": 0},
                   {"lr_grid": [-1.0]}, {"lr_grid": {"nope": [0.1]}}, {"workers": 0}):
        with pytest.raises(InvalidInputError):
            race(**{"problems": ["seed-toy"], **kwargs})


# ---------------------------------------------------------------------------------- command line


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "saddlescope.cli", *args], check=False,
                          capture_output=True, text=True, timeout=300)


def test_cli_quick_race_as_json():
    res = run_cli("race", "--quick", "--problems", "seed-toy", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert len(out["summaries"]) == 9 and out["config"]["problems"] == ["seed-toy"]


def test_cli_unknown_optimizer_is_one_line():
    res = run_cli("race", "--quick", "--problems", "seed-toy", "--optimizers", "nope")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().startswith("error:") and len(res.stderr.strip().splitlines()) == 1, res.stderr
