"""Data-parallel speed-up: one HVP and the top-5 eigenpairs with 1 process against 2 (torch.distributed).

The problem is the bench's reference (``common.digits_setup``: tanh MLP 64-32-10, 2,410 parameters,
all 1,797 digits, float64), and the same with the digits repeated 8 times (14,376 samples: the same
Hessian, eight times the work per product), to see how the split pays as the data grow. Three cases
on the same total data:

* ``1 proc x 1 thread``: the baseline;
* ``2 procs x 1 thread``: two gloo ranks, each with half the data (samples ``rank::2``), every product
  all-reduced (``Objective.from_model`` does it when a process group is initialised);
* ``1 proc x 2 threads``: the same two cores used by intra-op threads instead, for reference.

Each case runs in fresh processes (``OMP_NUM_THREADS`` fixed before torch starts). A rank times its
own work between barriers and the slowest rank's time counts. The HVP is one product through the
reused gradient graph (the all-reduce included), timed over a loop; ``eigs`` is
``ss.eigs(op, 5, "largest")`` at its default tolerance on the same operator. The whole set of cases
runs ``--repeats`` times in turn and the medians are reported, since the machine is shared.

    python bench/distributed.py [--repeats 3] [--tiles 1,8]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import digits_setup, environment, save  # noqa: E402

import saddlescope as ss  # noqa: E402
from saddlescope import distributed as ssd  # noqa: E402

HVP_LOOP = 50
EIGS_RUNS = 3
CASES = {  # name -> (processes, threads per process)
    "1 proc x 1 thread": (1, 1),
    "2 procs x 1 thread": (2, 1),
    "1 proc x 2 threads": (1, 2),
}


def worker(out: Path, tile: int) -> None:
    """Time one HVP and a top-5 eigs on this rank's share of the data; rank 0 writes the result."""
    distributed = ssd.init_from_env(timeout_s=120)
    rank, world = ssd.rank(), ssd.world_size()
    model, loss_fn, x, y = digits_setup(torch.float64)
    x, y = x.repeat(tile, 1), y.repeat(tile)
    obj = ss.Objective.from_model(model, loss_fn, (x[rank::world], y[rank::world]))
    op = ss.HessianOperator(obj)
    v = torch.randn(obj.n_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def slowest(seconds: float) -> float:
        """The time of the slowest rank: the others wait for it at the next all-reduce anyway."""
        if not distributed:
            return seconds
        t = torch.tensor([seconds], dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t)

    def timed(fn) -> float:
        if distributed:
            torch.distributed.barrier()
        start = time.perf_counter()
        fn()
        return slowest(time.perf_counter() - start)

    op.matvec(v)  # warm up
    hvp = timed(lambda: [op.matvec(v) for _ in range(HVP_LOOP)]) / HVP_LOOP
    result = None

    def run_eigs() -> None:
        nonlocal result
        result = ss.eigs(op, 5, "largest")

    eigs_times = [timed(run_eigs) for _ in range(EIGS_RUNS)]
    # Where a distributed product's time goes: this rank's half alone, and the all-reduce alone.
    local_hvp = allreduce = None
    if distributed:
        alone = ss.Objective.from_model(model, loss_fn, (x[rank::world], y[rank::world]), distributed=False)
        local_op = ss.HessianOperator(alone)
        local_op.matvec(v)
        local_hvp = timed(lambda: [local_op.matvec(v) for _ in range(HVP_LOOP)]) / HVP_LOOP
        allreduce = timed(lambda: [ssd.all_reduce_sum(v, what="timing") for _ in range(HVP_LOOP)]) / HVP_LOOP
    if ssd.is_main_process():
        (out / "result.json").write_text(json.dumps({
            "world_size": world, "threads": torch.get_num_threads(), "n_params": obj.n_params,
            "n_samples": obj.n_samples, "hvp_s": hvp, "eigs_s": statistics.median(eigs_times),
            "eigs_hvps": result.hvp_count, "top5": result.eigenvalues.tolist(),
            "local_hvp_s": local_hvp, "allreduce_s": allreduce,
        }))
    if distributed:
        torch.distributed.destroy_process_group()


def _median_ms(results: list[dict], key: str) -> float | None:
    values = [r[key] for r in results if r.get(key) is not None]
    return statistics.median(values) * 1e3 if values else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, threads: int, tile: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    with tempfile.TemporaryDirectory() as tmp:
        if processes == 1:
            cmd = [sys.executable, __file__, "--worker", tmp, "--tiles", str(tile)]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                   f"--master_port={_free_port()}", __file__, "--worker", tmp, "--tiles", str(tile)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise SystemExit(f"{cmd} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        return json.loads((Path(tmp) / "result.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiles", default="1,8", help="comma-separated: how many times the digits are repeated")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    tiles = [int(t) for t in args.tiles.split(",")]
    if args.worker:
        worker(Path(args.worker), tiles[0])
        return

    runs: dict[tuple[int, str], list[dict]] = {(tile, name): [] for tile in tiles for name in CASES}
    for repeat in range(args.repeats):
        for (tile, name), results in runs.items():
            results.append(launch(*CASES[name], tile))
            print(f"[{repeat + 1}/{args.repeats}] digits x{tile}, {name}: hvp {results[-1]['hvp_s'] * 1e3:.2f} ms, "
                  f"eigs {results[-1]['eigs_s']:.3f} s", flush=True)

    base = "1 proc x 1 thread"
    med = {key: {q: statistics.median(r[q] for r in rs) for q in ("hvp_s", "eigs_s")} for key, rs in runs.items()}
    rows = []
    for (tile, name), rs in runs.items():
        ref = med[(tile, base)]
        top5 = torch.tensor(runs[(tile, base)][0]["top5"], dtype=torch.float64)
        rows.append({
            "samples": rs[0]["n_samples"], "case": name, "processes": CASES[name][0], "threads": CASES[name][1],
            "hvp_ms": med[(tile, name)]["hvp_s"] * 1e3, "hvp_speedup": ref["hvp_s"] / med[(tile, name)]["hvp_s"],
            "eigs_s": med[(tile, name)]["eigs_s"], "eigs_speedup": ref["eigs_s"] / med[(tile, name)]["eigs_s"],
            "eigs_hvps": rs[0]["eigs_hvps"],
            "top5_max_abs_diff": float((torch.tensor(rs[0]["top5"], dtype=torch.float64) - top5).abs().max()),
            "hvp_s_runs": [r["hvp_s"] for r in rs], "eigs_s_runs": [r["eigs_s"] for r in rs],
            "local_hvp_ms": _median_ms(rs, "local_hvp_s"), "allreduce_ms": _median_ms(rs, "allreduce_s"),
        })
    first = next(iter(runs.values()))[0]
    lines = [
        "## Data-parallel: 1 process against 2 (torch.distributed, gloo)",
        "",
        f"`python bench/distributed.py --repeats {args.repeats} --tiles {args.tiles}`. tanh MLP 64-32-10 "
        f"({first['n_params']:,} parameters) in float64 on the digits, repeated as many times as the samples "
        "column says (the same Hessian, more work per product); with 2 processes each rank holds half the "
        "samples and every product is all-reduced. HVP: one product through the reused gradient graph "
        "(all-reduce included); eigs: `ss.eigs(op, 5, \"largest\")` at its default tolerance. Medians of "
        f"{args.repeats} launches of each case; the slowest rank's time counts. Speed-up: 1 proc x 1 thread over "
        "the case, same samples. `|dlambda|`: the largest difference of the top-5 eigenvalues from the "
        f"1-process run. Measured on a {os.cpu_count()}-core CPU machine; such machines are noisy, so the "
        "ratios are indicative, not precise.",
        "",
        "With 2 processes, `of which` splits a product: the rank's half of the data alone (no all-reduce) + one "
        "all-reduce of the n numbers alone (slowest rank, medians).",
        "",
        "| samples | case | HVP ms | of which | HVP speed-up | eigs top-5 s | eigs speed-up | HVPs | \\|dlambda\\| |",
        "| ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        split = "" if row["local_hvp_ms"] is None else f"{row['local_hvp_ms']:.2f} + {row['allreduce_ms']:.2f}"
        lines.append(f"| {row['samples']:,} | {row['case']} | {row['hvp_ms']:.2f} | {split} | {row['hvp_speedup']:.2f} | "
                     f"{row['eigs_s']:.3f} | {row['eigs_speedup']:.2f} | {row['eigs_hvps']} | "
                     f"{row['top5_max_abs_diff']:.1e} |")
    text = "\n".join(lines)
    print(text)
    save("distributed", {"environment": environment(), "repeats": args.repeats, "tiles": tiles, "rows": rows}, text)


if __name__ == "__main__":
    main()
