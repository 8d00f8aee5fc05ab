"""A verdict at scale (issue 16, targets 3): saddlescope's certified verdict and top-1 against PyHessian's
top-1, on the same weights, at 1M and 5M parameters (20M with --large): time and peak memory, as ratios.

The model is bench/scaling.py's tanh MLP 64-h-h-10 (float32), trained briefly with Adam on all 1,797 digits
(one batch), so there is a gradient and negative curvature to find. Per size, in one process, one thread:
  * PyHessian's top-1: power iteration at its default tolerance (1e-3, relative change), its own setup
    (the gradient graph) included;
  * saddlescope's top-1: ``eigs(op, 1, "largest", tol=1e-4)`` (relative to |lambda|), the graph included;
    and the same in the least memory it can plan (``memory_budget`` = what two passes of the three-term
    recurrence in float32 vectors need: no basis stored);
  * saddlescope's verdict: ``Objective.from_model`` + ``analyze(obj, exact=False, k=1, index_probes=0)``:
    lambda_max, the bottom end (from the same Krylov space when it settles it) and the verdict, each number
    stated as what it is; no index estimate;
  * with --full: ``analyze(obj)`` at its defaults (10 top pairs and the index estimate) for the record.
For each: wall seconds, Hessian-vector products, and the peak resident-set growth during it (the kernel's
high-water mark, reset before the run through /proc/self/clear_refs, less the resident set at its start).
That growth favours whichever run comes first after memory was freed (it reuses freed pages without
growing), so the memory targets are judged on a second measurement: each top-1 and the verdict in a fresh
process, the whole process's peak resident set (VmHWM).

Targets (issue 16): a certified verdict in <= 3x PyHessian's top-1 time; peak memory of top-1 <= 1.2x
PyHessian's.

Run: OMP_NUM_THREADS=1 python bench/verdict_at_scale.py [--sizes 1000000,5000000] [--large] [--full] [--name N]
(writes bench/results/verdict_at_scale.{md,json}, or N.{md,json}; the 20M row:
--sizes 20000000 --name verdict_at_scale_20m).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, save
from curvature import CE, n_params, run_pyhessian
from scaling import measured, trained

import saddlescope as ss

SIZES = (1_000_000, 5_000_000)
LARGE = (20_000_000,)
TRAIN_STEPS = 20
TARGETS = {"verdict_over_pyhessian": 3.0, "top1_memory_over_pyhessian": 1.2}


def pyhessian_top1(model, x, y) -> dict:
    out = run_pyhessian(model, x, y, 1, 1e-3, None)
    out["lambda_max"] = float(out["values"][0]) if out.get("values") else None
    return out


def top1(model, x, y) -> dict:
    start = time.perf_counter()
    op = ss.HessianOperator(ss.Objective.from_model(model, CE, (x, y)))
    res = ss.eigs(op, 1, "largest", tol=1e-4, relative_to="value")
    return {"seconds": time.perf_counter() - start, "hvps": res.hvp_count, "lambda_max": float(res.eigenvalues[-1]),
            "converged": res.all_converged, "guard": res.guard.get("rule") if res.guard else None,
            "plan": res.plan.to_dict()}


def lean_top1(model, x, y) -> dict:
    """Top-1 in the least memory eigs can plan: no basis, two passes of the three-term recurrence in float32
    vectors (the budget is exactly what that plan needs)."""
    from saddlescope.curvature.two_pass import two_pass_bytes

    start = time.perf_counter()
    op = ss.HessianOperator(ss.Objective.from_model(model, CE, (x, y)))
    budget = two_pass_bytes(op.shape[0], 1, vector_dtype=torch.float32, recurrence_dtype=torch.float64)
    res = ss.eigs(op, 1, "largest", tol=1e-4, relative_to="value", memory_budget=budget)
    return {"seconds": time.perf_counter() - start, "hvps": res.hvp_count, "lambda_max": float(res.eigenvalues[-1]),
            "converged": res.all_converged, "plan": res.plan.to_dict()}


def f32_top1(model, x, y) -> dict:
    """Top-1 with the basis stored in float32 (partial reorthogonalisation, float64 coefficients): the
    middle way between the default float64 basis and no basis at all."""
    start = time.perf_counter()
    op = ss.HessianOperator(ss.Objective.from_model(model, CE, (x, y)))
    res = ss.eigs(op, 1, "largest", tol=1e-4, relative_to="value", basis_dtype=torch.float32)
    return {"seconds": time.perf_counter() - start, "hvps": res.hvp_count, "lambda_max": float(res.eigenvalues[-1]),
            "converged": res.all_converged, "plan": res.plan.to_dict()}


def verdict(model, x, y, **options) -> dict:
    start = time.perf_counter()
    obj = ss.Objective.from_model(model, CE, (x, y))
    cp = ss.analyze(obj, exact=False, **options) if options else ss.analyze(obj)
    q = cp.quantities
    return {"seconds": time.perf_counter() - start, "hvps": cp.hvp_count, "kind": cp.kind,
            "curvature_kind": cp.curvature_kind, "resolved_by": cp.resolved_by, "reason": cp.reason,
            "lambda_max": q["lambda_max"].text(".5g"), "lambda_min": q["lambda_min"].text(".5g"),
            "index": q["index"].text(".3g") if "index" in q else None,
            "stages": {k: round(v, 2) for k, v in cp.seconds.items()},
            "top_hvps": cp.lanczos["top"]["hvp_count"], "bottom_hvps": cp.lanczos["bottom"]["hvp_count"],
            "bottom_rule": (cp.lanczos["bottom"].get("guard") or {}).get("rule"),
            "plan": cp.lanczos["top"].get("plan")}


def run_size(target: int, full: bool) -> dict:
    model, x, y = trained("mlp", target, TRAIN_STEPS)
    n = n_params(model)
    print(f"[{n:,} params] trained {TRAIN_STEPS} Adam steps", flush=True)
    row: dict = {"params": n}
    # Warm-up outside every timed run: the process's first double backward (lazy imports), the allocator.
    warm = ss.Objective.from_model(model, CE, (x, y))
    warm.gradient_graph(warm.theta0).hvp(torch.ones(n))
    del warm
    gc.collect()
    for name, fn in (("pyhessian_top1", lambda: pyhessian_top1(model, x, y)),
                     ("saddlescope_top1", lambda: top1(model, x, y)),
                     ("f32_top1", lambda: f32_top1(model, x, y)),
                     ("lean_top1", lambda: lean_top1(model, x, y)),
                     ("verdict", lambda: verdict(model, x, y, k=1, index_probes=0))):
        row[name] = measured(fn)
        gc.collect()
        r = row[name]
        print(f"[{n:,} params] {name}: {r['seconds']:.1f} s, {r['hvps']} products, peak +{r.get('peak_rss_mb', float('nan')):.0f} MB"
              + (f", {r['kind']} ({r['resolved_by']})" if "kind" in r else ""), flush=True)
    if full:
        row["analyze_defaults"] = measured(lambda: verdict(model, x, y))
        r = row["analyze_defaults"]
        print(f"[{n:,} params] analyze defaults: {r['seconds']:.1f} s, {r['hvps']} products", flush=True)
    ph = row["pyhessian_top1"]
    row["verdict_over_pyhessian"] = row["verdict"]["seconds"] / ph["seconds"]
    row["top1_over_pyhessian"] = row["saddlescope_top1"]["seconds"] / ph["seconds"]
    if ph.get("peak_rss_mb"):
        row["top1_memory_over_pyhessian"] = row["saddlescope_top1"]["peak_rss_mb"] / ph["peak_rss_mb"]
        row["verdict_memory_over_pyhessian"] = row["verdict"]["peak_rss_mb"] / ph["peak_rss_mb"]
        row["lean_top1_memory_over_pyhessian"] = row["lean_top1"]["peak_rss_mb"] / ph["peak_rss_mb"]
    row["lean_top1_over_pyhessian"] = row["lean_top1"]["seconds"] / ph["seconds"]
    row["f32_top1_over_pyhessian"] = row["f32_top1"]["seconds"] / ph["seconds"]
    return row


# ------------------------------------------------------------------- memory, one process per run
CHILD_RUNS = {"PyHessian top-1": pyhessian_top1, "our top-1": top1, "our top-1, float32 basis": f32_top1,
              "our top-1, least memory": lean_top1,
              "our verdict": lambda model, x, y: verdict(model, x, y, k=1, index_probes=0)}


def _kib(key: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key))


def child(name: str, target: int) -> None:
    """One run in a fresh process: the peak resident set of the whole process (VmHWM) and what the run
    added to the resident set it started from (the model, data and one plain gradient built)."""
    model, x, y = trained("mlp", target, TRAIN_STEPS)
    CE(model(x), y).backward()  # a first backward, as any training process has made
    model.zero_grad(set_to_none=True)
    gc.collect()
    before = _kib("VmRSS:")
    out = CHILD_RUNS[name](model, x, y)
    peak = _kib("VmHWM:")
    print(json.dumps({"name": name, "params": n_params(model), "seconds": out["seconds"], "hvps": out["hvps"],
                      "start_mb": before / 1024, "peak_mb": peak / 1024, "added_mb": (peak - before) / 1024}))


def memory_rows(sizes: list[int]) -> list[dict]:
    rows = []
    for size in sizes:
        row: dict = {"target": size}
        for name in CHILD_RUNS:
            done = subprocess.run([sys.executable, __file__, "--child", name, str(size)], capture_output=True,
                                  text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
            row[name] = json.loads(done.stdout.strip().splitlines()[-1])
            row["params"] = row[name]["params"]
            r = row[name]
            print(f"[{r['params']:,} params, own process] {name}: peak {r['peak_mb']:.0f} MB "
                  f"(+{r['added_mb']:.0f} over {r['start_mb']:.0f} MB), {r['seconds']:.1f} s, {r['hvps']} products", flush=True)
        rows.append(row)
    return rows


def memory_markdown(rows: list[dict]) -> str:
    names = list(CHILD_RUNS)
    ours = [n for n in names if n.startswith("our top-1")]
    lines = ["", ("Peak memory, each run in a fresh process (the whole process's resident-set high-water mark, VmHWM; "
                  "in brackets what the run added to the resident set it started from: model, data and one gradient "
                  "built). Unlike the table above, no run inherits memory another freed."), "",
             "| params | " + " | ".join(f"{n} MB (+added)" for n in names)
             + " | " + " | ".join(f"{n} / PyHessian peak" for n in ours) + " (target <= 1.2) |",
             "| ---: | " + " | ".join("---:" for _ in names) + " | " + " | ".join("---:" for _ in ours) + " |"]
    for row in rows:
        ph = row["PyHessian top-1"]["peak_mb"]
        cells = [f"{row[n]['peak_mb']:.0f} (+{row[n]['added_mb']:.0f})" for n in names]
        lines.append(f"| {row['params']:,} | " + " | ".join(cells) + " | "
                     + " | ".join(f"{row[n]['peak_mb'] / ph:.2f}" for n in ours) + " |")
    return "\n".join(lines) + "\n"


def markdown(payload: dict) -> str:
    sizes = " and ".join(f"{row['params']:,}" for row in payload["rows"])
    lines = [f"# A verdict at scale, {sizes} parameters: saddlescope against PyHessian's top-1 (issue 16)", "",
             (f"Environment: {payload['environment']}; load average before {payload['load_before']}, after "
             f"{payload['load_after']}. tanh MLP 64-h-h-10, float32, {TRAIN_STEPS} Adam steps on all 1,797 digits "
             "(one batch). Peak = growth of the resident set's high-water mark during the run."), "",
             ("| params | PyHessian top-1 s (products, peak MB) | our top-1 s (products, peak MB) | our verdict s "
              "(products, peak MB) | verdict | verdict / PyHessian time (target <= 3) | top-1 / PyHessian time | "
              "top-1 / PyHessian in-process growth (not the target: see the fresh-process table) |"),
             "| ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for row in payload["rows"]:
        ph, ours, v = row["pyhessian_top1"], row["saddlescope_top1"], row["verdict"]

        def cell(r: dict) -> str:
            return f"{r['seconds']:.1f} ({r['hvps']}, {r.get('peak_rss_mb', float('nan')):.0f})"

        mem = row.get("top1_memory_over_pyhessian")
        lines.append(f"| {row['params']:,} | {cell(ph)} | {cell(ours)} | {cell(v)} | {v['kind']} (curvature: {v['curvature_kind']}) | "
                     f"{row['verdict_over_pyhessian']:.2f} | {row['top1_over_pyhessian']:.2f} | "
                     f"{'n/a' if mem is None else f'{mem:.2f}'} |")
    lines += ["", ("Top-1 in less memory: a float32 basis (basis_dtype=torch.float32: partial reorthogonalisation, "
                   "float64 coefficients), and the least memory (memory_budget = what two passes of the three-term "
                   "recurrence in float32 vectors need: no basis, 1.7-3x the products):"), "",
              "| params | plan | top-1 s (products, peak MB) | lambda_max | / PyHessian time |",
              "| ---: | --- | ---: | ---: | ---: |"]
    for row in payload["rows"]:
        for key, name in (("f32_top1", "float32 basis"), ("lean_top1", "least memory")):
            if key not in row:
                continue
            r = row[key]
            lines.append(f"| {row['params']:,} | {name} | {r['seconds']:.1f} ({r['hvps']}, {r.get('peak_rss_mb', float('nan')):.0f}) | "
                         f"{r['lambda_max']:.6g} | {row[f'{key}_over_pyhessian']:.2f} |")
    lines += ["", "Eigenvalues (each as what it is):", ""]
    for row in payload["rows"]:
        v = row["verdict"]
        lines.append(f"- {row['params']:,} params: PyHessian lambda_max {row['pyhessian_top1']['lambda_max']:.6g}; our top-1 "
                     f"{row['saddlescope_top1']['lambda_max']:.6g}; verdict lambda_max {v['lambda_max']}, lambda_min "
                     f"{v['lambda_min']} (top run {v['top_hvps']} products, bottom {v['bottom_hvps']}: {v['bottom_rule']}); "
                     f"{v['reason']}")
        if "analyze_defaults" in row:
            a = row["analyze_defaults"]
            lines.append(f"  - analyze at its defaults (10 top pairs, index estimate): {a['seconds']:.1f} s, {a['hvps']} products, "
                         f"peak +{a.get('peak_rss_mb', float('nan')):.0f} MB, index {a['index']}, stages {a['stages']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(str(s) for s in SIZES))
    parser.add_argument("--large", action="store_true", help="add 20M parameters")
    parser.add_argument("--full", action="store_true", help="also analyze at its defaults")
    parser.add_argument("--name", default="verdict_at_scale", help="results file name (bench/results/NAME.md)")
    parser.add_argument("--child", nargs=2, metavar=("RUN", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    sizes = [int(s) for s in args.sizes.split(",")] + (list(LARGE) if args.large else [])
    payload = {"environment": environment(), "load_before": os.getloadavg(), "rows": [], "targets": TARGETS}
    for size in sizes:
        payload["rows"].append(run_size(size, args.full))
    payload["memory"] = memory_rows(sizes)
    payload["load_after"] = os.getloadavg()
    text = markdown(payload) + memory_markdown(payload["memory"])
    print(text)
    save(args.name, payload, text)


if __name__ == "__main__":
    main()
