"""Data-parallel curvature over torch.distributed (gloo, CPU, 2 processes) against one process.

The test launches this file as a script: ``torchrun --nproc_per_node=2 tests/test_distributed.py
consistency OUT`` for the comparisons (every check in one launch, since processes start slowly),
and two ranks started by hand (``RANK``/``WORLD_SIZE``/``MASTER_*`` set as torchrun would, but no
agent that would kill the survivor) for the failure cases. Each rank writes ``OUT/rank{r}.json``;
the test compares those with the same quantities computed here, in one process on the full data.

The shards are unequal (1,100 and 697 samples, rank 0's in two batches), so an unweighted mean
of the ranks' means would be off by far more than the 1e-6 allowed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import saddlescope as ss
from saddlescope import distributed as ssd
from saddlescope.errors import DistributedError, EmptyDataError, InvalidInputError
from saddlescope.problems import load_digits_tensors

TOL = 1e-6
SPLIT = 1100  # rank 0: samples [0, 1100) in batches of 700 and 400; rank 1: [1100, 1797)
FAIL_TIMEOUT_S = 5.0


# ---------------------------------------------------------------------- the shared problem
def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)).double()  # 610 parameters


def full_data():
    return load_digits_tensors(torch.float64)


def shard(rank: int):
    x, y = full_data()
    if rank == 0:
        return [(x[:700], y[:700]), (x[700:SPLIT], y[700:SPLIT])]
    return [(x[SPLIT:], y[SPLIT:])]


def probe_vector(n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def measure(obj: ss.Objective) -> tuple[dict, torch.Tensor]:
    """Every quantity compared across ranks and with one process (same calls, same order on all
    ranks), and the exact Hessian."""
    theta = obj.theta0
    loss, grad = obj.loss_and_grad(theta)
    op = ss.HessianOperator(obj, theta)
    top = ss.eigs(op, 5, "largest", tol=1e-10)
    bottom = ss.eigs(op, 2, "smallest", tol=1e-10)
    tr = ss.trace(op, 30, seed=3)
    density = ss.spectral_density(op, n_probes=2, steps=25, seed=4)
    exact = ss.analyze(obj, exact=True, probe=False, grad_tol=10.0)
    iterative = ss.analyze(obj, exact=False, k=3, index_probes=2, index_steps=25, seed=5, grad_tol=10.0)
    hessian = obj.hessian(theta)
    line = ss.landscape(obj, theta, directions=[probe_vector(obj.n_params)], span=0.5, resolution=5)
    return {
        "landscape": line.losses.tolist(),
        "loss": float(obj.loss(theta)),
        "loss_from_pair": float(loss),
        "grad": grad.tolist(),
        "hvp": obj.hvp(theta, probe_vector(obj.n_params)).tolist(),
        "top5": top.eigenvalues.tolist(),
        "bottom2": bottom.eigenvalues.tolist(),
        "trace": tr.value,
        "density_nodes": density.quadrature.nodes.tolist(),
        "density_weights": density.quadrature.weights.tolist(),
        "exact_kind": exact.kind,
        "exact_eigenvalues": [float(v) for v in exact.eigenvalues],
        "iterative_kind": iterative.kind,
        "iterative_eigenvalues": [float(v) for v in iterative.eigenvalues],
        "n_samples": obj.n_samples,
    }, hessian


# ---------------------------------------------------------------------- what each rank runs
def worker_consistency(out: Path) -> None:
    assert ssd.init_from_env(timeout_s=60)
    rank = ssd.rank()
    model, loss_fn = make_model(), nn.functional.cross_entropy
    result: dict = {"rank": rank, "world_size": ssd.world_size(), "main": ssd.is_main_process()}

    obj = ss.Objective.from_model(model, loss_fn, shard(rank))
    result["description"] = obj.description
    result["local_samples"] = obj.local_samples
    result["measure"], hessian = measure(obj)
    torch.save(hessian, out / f"hessian{rank}.pt")

    # Opt-out: this rank's data alone, no collective (rank 1 makes none: rank 0 would hang if it did).
    alone = ss.Objective.from_model(model, loss_fn, shard(rank), distributed=False)
    x = torch.cat([b[0] for b in shard(rank)])
    y = torch.cat([b[1] for b in shard(rank)])
    with torch.no_grad():
        local = float(loss_fn(model(x), y))
    result["opt_out"] = {"loss_error": abs(float(alone.loss(alone.theta0)) - local),
                         "n_samples": alone.n_samples, "has_distributed": "distributed" in alone.description}

    # A max_batches subset: counted and fingerprinted over both ranks.
    subset = ss.Objective.from_model(model, loss_fn, shard(rank), max_batches=1)
    result["subset"] = {"description": subset.description["subset"], "loss": float(subset.loss(subset.theta0))}

    # The helper for quantities the objective does not reduce: (1100 * 1 + 697 * 2) / 1797.
    result["weighted_mean"] = float(ssd.weighted_mean(torch.tensor(rank + 1.0, dtype=torch.float64), obj.local_samples))

    # An empty shard: every rank raises the same EmptyDataError (no timeout).
    try:
        ss.Objective.from_model(model, loss_fn, shard(rank) if rank == 0 else [])
        result["empty"] = "no error"
    except EmptyDataError as exc:
        result["empty"] = str(exc)

    # Different parameters on rank 1: every rank raises DistributedError at construction...
    other = make_model()
    if rank == 1:
        with torch.no_grad():
            other[0].bias.add_(1e-3)
    try:
        ss.Objective.from_model(other, loss_fn, shard(rank))
        result["theta_mismatch"] = "no error"
    except DistributedError as exc:
        result["theta_mismatch"] = str(exc)
    # ... and when asked for products at a point that differs.
    theta = obj.theta0.clone()
    if rank == 1:
        theta[0] += 1e-12
    try:
        ss.HessianOperator(obj, theta)
        result["point_mismatch"] = "no error"
    except DistributedError as exc:
        result["point_mismatch"] = str(exc)

    # The CLI's path: all the batches given to every rank, sharded by batch; rank 0 alone writes.
    x, y = full_data()
    everything = [(x[:700], y[:700]), (x[700:SPLIT], y[700:SPLIT]), (x[SPLIT:], y[SPLIT:])]
    analysis = ss.analyze_model(make_model(), everything, loss="cross_entropy", method="exact", grad_tol=10.0,
                                out=out / f"report{rank}")
    result["analyze_model"] = {"eigenvalues": analysis.point.eigenvalues.tolist(), "kind": analysis.point.kind,
                               "local_samples": analysis.objective.local_samples,
                               "wrote": sorted(p.name for p in (out / f"report{rank}").glob("*"))}

    (out / f"rank{rank}.json").write_text(json.dumps(result))


def worker_failure(out: Path, how: str) -> None:
    """Rank 1 fails ("raise": exits with an exception; "stall": stays alive but stops taking part)
    after the objective is built and before the first HVP; rank 0 must raise DistributedError."""
    ssd.init_from_env(timeout_s=FAIL_TIMEOUT_S)
    rank = ssd.rank()
    obj = ss.Objective.from_model(make_model(), nn.functional.cross_entropy, shard(rank))
    if rank == 1:
        if how == "raise":
            raise RuntimeError("simulated failure on rank 1")
        time.sleep(120)  # the test kills it
        return
    start = time.perf_counter()
    try:
        ss.eigs(ss.HessianOperator(obj), 5)
        outcome = {"error": None}
    except DistributedError as exc:
        outcome = {"error": type(exc).__name__, "message": str(exc)}
    outcome["seconds"] = time.perf_counter() - start
    (out / "rank0.json").write_text(json.dumps(outcome))


# ---------------------------------------------------------------------- launching
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=2 ARGS`` on a free port; once more on another port if the first
    was taken between choosing it and binding it (the only race a fresh port leaves)."""
    for attempt in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={_free_port()}", *args]
        done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
        taken = "EADDRINUSE" in done.stderr or "address already in use" in done.stderr.lower()
        if done.returncode == 0 or not taken or attempt == 1:
            return done
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both ranks' results from one torchrun launch."""
    out = tmp_path_factory.mktemp("dist")
    done = _torchrun(__file__, "consistency", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r, result in enumerate(results):
        result["hessian"] = torch.load(out / f"hessian{r}.pt", weights_only=True)
    return results


@pytest.fixture(scope="module")
def reference():
    """One process, no process group, all 1,797 samples in one batch."""
    assert not ssd.is_distributed()
    x, y = full_data()
    numbers, hessian = measure(ss.Objective.from_model(make_model(), nn.functional.cross_entropy, (x, y)))
    return dict(numbers, hessian=hessian)


def _close(a, b, tol=TOL):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= tol, float((a - b).abs().max())


NUMBERS = ("landscape", "loss", "loss_from_pair", "grad", "hvp", "top5", "bottom2", "trace",
           "density_nodes", "density_weights", "exact_eigenvalues", "iterative_eigenvalues")


@pytest.mark.parametrize("key", NUMBERS)
def test_every_rank_matches_one_process(ranks, reference, key):
    for result in ranks:
        _close(result["measure"][key], reference[key])


def test_exact_hessian_matches_one_process(ranks, reference):
    for result in ranks:
        _close(result["hessian"], reference["hessian"])
    assert torch.equal(ranks[0]["hessian"], ranks[1]["hessian"])


def test_verdicts_and_eigenvalues_agree_across_ranks(ranks, reference):
    for result in ranks:
        assert result["measure"]["exact_kind"] == reference["exact_kind"]
        assert result["measure"]["iterative_kind"] == reference["iterative_kind"]
    # Lockstep: the ranks do not just agree to a tolerance, they compute the same bits.
    for key in ("top5", "bottom2", "iterative_eigenvalues", "density_nodes", "trace"):
        assert ranks[0]["measure"][key] == ranks[1]["measure"][key]


def test_description_and_sample_counts(ranks):
    assert [r["rank"] for r in ranks] == [0, 1] and [r["main"] for r in ranks] == [True, False]
    assert [r["local_samples"] for r in ranks] == [SPLIT, 1797 - SPLIT]
    for result in ranks:
        assert result["world_size"] == 2
        assert result["measure"]["n_samples"] == 1797
        info = result["description"]["distributed"]
        assert info == {"world_size": 2, "backend": "gloo", "samples": 1797, "samples_per_rank": [SPLIT, 1797 - SPLIT]}
    assert ranks[0]["description"] == ranks[1]["description"]


def test_max_batches_subset_spans_the_ranks(ranks):
    x, y = full_data()
    subset = [r["subset"] for r in ranks]
    assert subset[0] == subset[1]
    assert subset[0]["description"]["batches"] == 2 and subset[0]["description"]["samples"] == 700 + 697
    xs, ys = torch.cat([x[:700], x[SPLIT:]]), torch.cat([y[:700], y[SPLIT:]])
    with torch.no_grad():
        expected = float(nn.functional.cross_entropy(make_model()(xs), ys))
    assert abs(subset[0]["loss"] - expected) <= 1e-12


def test_opt_out_uses_this_ranks_data_alone(ranks):
    for result in ranks:
        assert result["opt_out"]["loss_error"] <= 1e-12
        assert result["opt_out"]["n_samples"] == result["local_samples"]
        assert not result["opt_out"]["has_distributed"]


def test_weighted_mean_helper(ranks):
    for result in ranks:
        assert abs(result["weighted_mean"] - (SPLIT * 1 + (1797 - SPLIT) * 2) / 1797) <= 1e-12


def test_empty_shard_fails_on_every_rank(ranks):
    for result in ranks:
        assert "rank(s) [1] of 2 have no samples" in result["empty"]


def test_different_parameters_fail_on_every_rank(ranks):
    for result in ranks:
        assert "parameters differ across ranks" in result["theta_mismatch"]
        assert "rank(s) [1] differ" in result["theta_mismatch"]
        assert "theta differs across ranks" in result["point_mismatch"]


@pytest.mark.parametrize("how", ["raise", "stall"])
def test_a_failed_rank_makes_the_other_fail_within_the_timeout(tmp_path, how):
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = dict(_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, __file__, how, str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        procs[0].wait(timeout=FAIL_TIMEOUT_S + 60)  # process start and model build, then the timeout
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        logs = [proc.communicate()[1] for proc in procs]
    assert procs[0].returncode == 0, logs[0][-4000:]
    outcome = json.loads((tmp_path / "rank0.json").read_text())
    assert outcome["error"] == "DistributedError", outcome
    assert "rank 0 of 2" in outcome["message"] and "another rank failed or stopped" in outcome["message"]
    assert outcome["seconds"] <= FAIL_TIMEOUT_S + 10
    if how == "raise":
        assert procs[1].returncode != 0 and "simulated failure on rank 1" in logs[1]


# ---------------------------------------------------------------------- in-process checks (no group)
def test_without_a_group_nothing_changes():
    x, y = full_data()
    obj = ss.Objective.from_model(make_model(), nn.functional.cross_entropy, (x, y))
    assert not obj.sharded and "distributed" not in obj.description
    assert obj.n_samples == obj.local_samples == 1797
    assert not ssd.is_distributed() and ssd.rank() == 0 and ssd.world_size() == 1 and ssd.is_main_process()
    with pytest.raises(DistributedError, match="no torch.distributed process group"):
        ss.Objective.from_model(make_model(), nn.functional.cross_entropy, (x, y), distributed=True)
    with pytest.raises(InvalidInputError, match="distributed must be"):
        ss.Objective.from_model(make_model(), nn.functional.cross_entropy, (x, y), distributed="yes")


def test_init_from_env_leaves_a_single_process_alone(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert ssd.init_from_env() is False
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert ssd.init_from_env() is False
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(DistributedError, match="MASTER_ADDR"):
        ssd.init_from_env()
    assert not ssd.is_distributed()


if __name__ == "__main__":
    torch.set_num_threads(1)
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    if scenario == "consistency":
        worker_consistency(out_dir)
    else:
        worker_failure(out_dir, scenario)


def test_analyze_model_shards_by_batch_and_only_rank_0_writes(ranks, reference):
    for result in ranks:
        _close(result["analyze_model"]["eigenvalues"], reference["exact_eigenvalues"])
        assert result["analyze_model"]["kind"] == reference["exact_kind"]
    assert [r["analyze_model"]["local_samples"] for r in ranks] == [700 + 697, SPLIT - 700]
    assert {"report.html", "report.json", "analysis.json"} <= set(ranks[0]["analyze_model"]["wrote"])
    assert ranks[1]["analyze_model"]["wrote"] == []


def test_cli_analyze_under_torchrun_matches_one_process(tmp_path):
    small = '{"channels": 2, "hidden": 4}'
    args = ["analyze", "--model", "saddlescope.examples:digits_cnn", "--model-kwargs", small,
            "--data", "saddlescope.examples:digits_batches", "--dtype", "float64", "--json"]
    done = _torchrun("-m", "saddlescope.cli", *args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    printed = json.loads(done.stdout)  # one JSON document: rank 1 prints nothing
    single = subprocess.run([sys.executable, "-m", "saddlescope.cli", *args], env=_env(), capture_output=True,
                            text=True, timeout=240)
    assert single.returncode == 0, single.stderr[-3000:]
    alone = json.loads(single.stdout)
    assert printed["objective"]["distributed"]["samples_per_rank"] == [128, 128]  # 4 batches of 64
    assert printed["kind"] == alone["kind"]
    _close(printed["eigenvalues"], alone["eigenvalues"])
