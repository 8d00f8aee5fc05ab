"""Scaling (issue 16): the verdict and the extreme eigenvalues from 10k to 1M parameters (5M and 20M with
--large), MLP, CNN and a GPT-2-style transformer, against PyHessian, hessian-eigenthings and curvlinops + eigsh.

Per model family and size (float32, the same briefly trained weights for every library, one batch):
  * ``ss.analyze`` end to end (Objective.from_model + analyze, defaults): wall seconds, products, peak
    resident-set growth, the verdict, and the Krylov basis plan (vectors, dtype, bytes, budget);
  * top-1 and top-5 (relative error <= 1e-4) and lambda_min (<= 1e-3) against a float64 reference with
    its residual bound: saddlescope's ``eigs`` once, each anchor from its cheapest setting up until one
    meets the target (bench/curvature.py's runs); wall time, products, peak resident-set growth, and
    ratios to the best anchor that met the target;
  * PyHessian's power iteration at its own tolerance 1e-3 (the common setting) beside our top-1 at 1e-4:
    products and errors;
  * the accuracy cost of a float32 Krylov basis (partial reorthogonalisation, float64 coefficients, what the
    memory plan falls back to) against the float64 basis: top-5 and lambda_min errors, products, bytes.
Peak resident-set growth: the kernel's high-water mark, reset before each run (/proc/self/clear_refs),
less the resident set at the start of the run.

Run: OMP_NUM_THREADS=1 python bench/scaling.py [--quick] [--large] [--models mlp,cnn,transformer]
(writes bench/results/scaling.{md,json}; --quick: the smallest size only, shorter training and time
limits, to scaling_quick.{md,json}). --sizes 100000,1000000 picks sizes, --tasks top1,top5 the eigenvalue
tasks (without lambda_min neither its reference nor the basis-precision rows are run), --name the results
file. The results are written after every model, so a run cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, save
from curvature import (
    CE,
    MIN_TARGET,
    TOP_TARGET,
    rel_err,
    run_curvlinops,
    run_eigenthings,
    run_pyhessian,
    sweep,
)
from curvature import trained as trained_with_adam

import saddlescope as ss
from saddlescope.problems import load_digits_tensors

SIZES = (10_000, 100_000, 1_000_000)
LARGE = (5_000_000, 20_000_000)
VOCAB, LENGTH, SEQUENCES = 64, 16, 128


# ------------------------------------------------------------------------------------------ memory
def _status(key: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(key))


def measured(fn: Callable[[], dict]) -> dict:
    """Run ``fn`` and add ``peak_rss_mb``: the growth of the resident set's high-water mark during it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the current resident set
        start = _status("VmRSS:")
    except OSError:
        start = None
    out = fn()
    if start is not None:
        out["peak_rss_mb"] = max(_status("VmHWM:") - start, 0) / 2**20
    return out


# ------------------------------------------------------------------------------------------ models
def _solve(count: Callable[[int], int], target: int, step: int = 1) -> int:
    """The width whose parameter count is nearest ``target``."""
    width = step
    while count(width + step) <= target:
        width += step
    return width if abs(count(width) - target) <= abs(count(width + step) - target) else width + step


def mlp(target: int) -> nn.Module:
    h = _solve(lambda w: w * w + 76 * w + 10, target)
    return nn.Sequential(nn.Linear(64, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, 10))


def cnn(target: int) -> nn.Module:
    c = _solve(lambda w: 73 * w * w + 55 * w + 10, target)
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, c, 3, padding=1), nn.Tanh(), nn.Conv2d(c, c, 3, padding=1),
        nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * c, 4 * c), nn.Tanh(), nn.Linear(4 * c, 10),
    )


class NextToken(nn.Module):
    """A Hugging Face GPT-2 as a plain classifier: token ids ``(B, T)`` in, next-token logits
    ``(B, V, T-1)`` out, so every library sees ``CrossEntropyLoss()(model(x), y)`` with targets ``(B, T-1)``."""

    def __init__(self, gpt: nn.Module) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.gpt(input_ids=ids).logits[:, :-1].transpose(1, 2)


def transformer(target: int) -> nn.Module:
    import transformers

    from saddlescope.examples import tiny_gpt2

    transformers.logging.set_verbosity_error()

    def count(d: int) -> int:
        return 2 * (12 * d * d + 13 * d) + (VOCAB + LENGTH + 2) * d

    d = _solve(count, target, step=4)
    return NextToken(tiny_gpt2(n_layer=2, n_embd=d, n_head=4, vocab_size=VOCAB, n_positions=LENGTH))


FAMILIES: dict[str, Callable[[int], nn.Module]] = {"mlp": mlp, "cnn": cnn, "transformer": transformer}


def data(family: str) -> tuple[torch.Tensor, torch.Tensor]:
    if family == "transformer":
        gen = torch.Generator().manual_seed(0)
        start = torch.randint(0, VOCAB, (SEQUENCES, 1), generator=gen)
        ids = (start + torch.arange(LENGTH)) % VOCAB
        return ids, ids[:, 1:]
    return load_digits_tensors(torch.float32)


def trained(family: str, target: int, steps: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Adam, full batch, fixed seed: the same weights for every library."""
    torch.manual_seed(0)
    model, (x, y) = FAMILIES[family](target), data(family)
    return trained_with_adam(lambda: (model, x, y, steps))


# ------------------------------------------------------------------------------------------- runs
def reference(model, x, y, k: int = 5, bottom_end: bool = True) -> dict:
    """Top-k and lambda_min (unless not ``bottom_end``) of the float64 Hessian at tight tolerances, with
    residual bounds."""
    model64 = copy.deepcopy(model).double()
    obj = ss.Objective.from_model(model64, CE, (x.double() if x.is_floating_point() else x, y))
    op = ss.HessianOperator(obj)
    start = time.perf_counter()
    top = ss.eigs(op, k, "largest", tol=1e-10, relative_to="value", max_hvps=3000)
    out = {"top": top.eigenvalues.tolist(), "top_bound": float((top.residuals / top.eigenvalues.abs()).max()),
           "lambda_min": math.nan, "lambda_min_bound": math.nan, "hvps": top.hvp_count}
    if bottom_end:
        bottom = ss.eigs(op, 1, "smallest", tol=1e-7, relative_to="value", max_hvps=3000)
        out.update(lambda_min=float(bottom.eigenvalues[0]), hvps=top.hvp_count + bottom.hvp_count,
                   lambda_min_bound=float(bottom.residuals[0] / bottom.eigenvalues[0].abs()))
    out["seconds"] = time.perf_counter() - start
    return out


def run_analyze(model, x, y) -> dict:
    start = time.perf_counter()
    obj = ss.Objective.from_model(model, CE, (x, y))
    cp = ss.analyze(obj)
    plan = (cp.lanczos or {}).get("top", {}).get("plan")
    return {"seconds": time.perf_counter() - start, "hvps": cp.hvp_count, "kind": cp.kind, "method": cp.method,
            "reason": cp.reason, "lambda_min": cp.lambda_min, "lambda_max": cp.lambda_max, "plan": plan}


def run_eigs(model, x, y, k: int, which: str, tol: float, basis_dtype=None) -> dict:
    start = time.perf_counter()
    op = ss.HessianOperator(ss.Objective.from_model(model, CE, (x, y)))
    res = ss.eigs(op, k, which, tol=tol, relative_to="value", max_hvps=20000, basis_dtype=basis_dtype)
    return {"values": res.eigenvalues.tolist(), "hvps": res.hvp_count, "seconds": time.perf_counter() - start,
            "converged": res.all_converged, "plan": res.plan.to_dict(), "guard": res.guard,
            "setting": f"eigs tol {tol:g} (relative to |lambda|)"
                       + ("" if basis_dtype is None else f", {str(basis_dtype).removeprefix('torch.')} basis")}


def anchored(fn: Callable[[], dict]) -> dict:
    """An anchor run, or why it could not run."""
    try:
        return measured(fn)
    except ImportError as exc:
        return {"values": None, "hvps": 0, "seconds": float("nan"), "setting": f"not installed: {exc.name}",
                "missing": True}
    except Exception as exc:  # noqa: BLE001 - an anchor that fails on this torch or model is reported, not fatal
        return {"values": None, "hvps": 0, "seconds": float("nan"),
                "setting": f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", "failed": True}


def eigen_tasks(model, x, y, ref: dict, limit: float, tasks: tuple[str, ...] = ("top1", "top5", "lambda_min")) -> dict:
    out: dict = {}
    for k in [k for k in (1, 5) if f"top{k}" in tasks]:
        r = ref["top"][-k:]
        out[f"top{k}"] = {
            "saddlescope": sweep([lambda k=k: measured(lambda: run_eigs(model, x, y, k, "largest", TOP_TARGET))],
                                 r, TOP_TARGET),
            "PyHessian": sweep([lambda k=k, t=t: anchored(lambda: run_pyhessian(model, x, y, k, t, limit))
                                for t in (1e-3, 1e-4, 1e-5, 1e-6)], r, TOP_TARGET),
            "curvlinops + eigsh": sweep([lambda k=k, t=t: anchored(lambda: run_curvlinops(model, x, y, k, "LA", t, limit))
                                         for t in (1e-2, 1e-3, 1e-4, 1e-6)], r, TOP_TARGET),
            "hessian-eigenthings": sweep([lambda k=k, m=m: anchored(lambda: run_eigenthings(model, x, y, k, "LA", m, limit))
                                          for m in (2 * k + 5, 4 * k + 10, 8 * k + 20, 16 * k + 40)], r, TOP_TARGET),
        }
    if "lambda_min" not in tasks:
        return out
    r = [ref["lambda_min"]]
    out["lambda_min"] = {
        "saddlescope": sweep([lambda: measured(lambda: run_eigs(model, x, y, 1, "smallest", MIN_TARGET))],
                             r, MIN_TARGET),
        "curvlinops + eigsh": sweep([lambda t=t: anchored(lambda: run_curvlinops(model, x, y, 1, "SA", t, limit))
                                     for t in (1e-2, 1e-3, 1e-4, 1e-6)], r, MIN_TARGET),
        "hessian-eigenthings": sweep([lambda m=m: anchored(lambda: run_eigenthings(model, x, y, 1, "SA", m, limit))
                                      for m in (40, 80, 160, 320, 640)], r, MIN_TARGET),
    }
    return out


def basis_precision(model, x, y, ref: dict) -> dict:
    """Top-5 at 1e-6 and lambda_min at 1e-4 (relative), float64 basis against float32 basis."""
    rows = {}
    for name, dtype in (("float64 basis", None), ("float32 basis", torch.float32)):
        top = run_eigs(model, x, y, 5, "largest", 1e-6, dtype)
        bottom = run_eigs(model, x, y, 1, "smallest", 1e-4, dtype)
        rows[name] = {"top5_error": rel_err(top["values"], ref["top"][-5:]), "top5_hvps": top["hvps"],
                      "lambda_min_error": rel_err(bottom["values"], [ref["lambda_min"]]),
                      "lambda_min_hvps": bottom["hvps"], "plan_bytes": top["plan"]["bytes"],
                      "reorthogonalisation": top["plan"]["reorthogonalisation"]}
    return rows


# ----------------------------------------------------------------------------------------- report
def _best_anchor(task: dict) -> tuple[str, dict] | None:
    found = [(lib, res["best"]) for lib, res in task.items() if lib != "saddlescope" and res["best"] is not None]
    return min(found, key=lambda item: item[1]["seconds"]) if found else None


def markdown(payload: dict) -> str:
    runs = ", ".join(payload["models"]) or "no model finished"
    tasks = ", ".join(payload.get("tasks", ("top1", "top5", "lambda_min")))
    lines = [f"# Scaling ({runs}; {tasks}): saddlescope against PyHessian, hessian-eigenthings, curvlinops + eigsh\n",
             (f"Environment: {payload['environment']}; load average before the run: {payload['load']}, after the "
              f"last model: {payload.get('load_after', 'not recorded')}. "
               f"float32 models, the same briefly trained weights for every library, one batch. Targets: top "
              f"eigenvalues to relative error <= {TOP_TARGET:g}, lambda_min to <= {MIN_TARGET:g}, against a float64 "
              f"reference with residual bounds. Anchors run from their cheapest setting up to the first that meets "
              f"the target; ratios are to the fastest anchor that met it. Time limit per anchor run: "
              f"{payload['limit']:g} s. Peak RSS: growth of the resident set's high-water mark during the run.\n")]
    if payload.get("quick"):
        lines.append("**Quick run** (--quick): smallest size only, short training; a smoke run, not the targets' figures.\n")
    lines.append("## analyze end to end\n")
    lines.append("| model | params | wall s | HVPs | peak RSS MB | verdict | path | Krylov basis plan |")
    lines.append("| --- | ---: | ---: | ---: | ---: | --- | --- | --- |")
    for key, m in payload["models"].items():
        a = m["analyze"]
        plan = a.get("plan")
        plan_text = "" if not plan else (f"{plan['vectors']} x {plan['dtype'].removeprefix('torch.')}, "
                                         f"{plan['bytes'] / 2**20:.1f} MiB of {(plan['budget'] or 0) / 2**30:.1f} GiB")
        lines.append(f"| {key} | {m['n_params']:,} | {a['seconds']:.2f} | {a['hvps']} | {a.get('peak_rss_mb', float('nan')):.0f} "
                     f"| {a['kind']} | {a['method']} | {plan_text} |")
    lines.append("")
    ran = [task for task in ("top1", "top5", "lambda_min") if all(task in m["eigen"] for m in payload["models"].values())]
    for task in ran:
        lines.append(f"## {task}\n")
        lines.append("| model | library | wall s | HVPs | peak RSS MB | rel. error | setting | time / best anchor |")
        lines.append("| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |")
        for key, m in payload["models"].items():
            runs = m["eigen"][task]
            best = _best_anchor(runs)
            for lib, res in runs.items():
                run = res["best"] or (res["tried"][-1] if res["tried"] else None)
                if run is None:
                    continue
                err = "" if run.get("error") is None else f"{run['error']:.1e}"
                ratio = "" if best is None or res["best"] is None else f"{run['seconds'] / best[1]['seconds']:.2f}"
                mark = "" if res["best"] is not None else " (target not met)"
                lines.append(f"| {key} | {lib}{mark} | {run['seconds']:.2f} | {run['hvps']} | "
                             f"{run.get('peak_rss_mb', float('nan')):.0f} | {err} | {run['setting']} | {ratio} |")
        lines.append("")
    if "top1" not in ran:
        return "\n".join(lines)
    lines.append("## top-1: our tol 1e-4 against PyHessian's power iteration at 1e-3\n")
    lines.append("| model | ours: HVPs, rel. error, stopped by | power iteration 1e-3: HVPs, rel. error |")
    lines.append("| --- | --- | --- |")
    for key, m in payload["models"].items():
        ours = m["eigen"]["top1"]["saddlescope"]["tried"][0]
        power = m["eigen"]["top1"]["PyHessian"]["tried"][0]
        rule = (ours.get("guard") or {}).get("rule")
        perr = "" if power.get("error") is None else f"{power['error']:.1e}"
        lines.append(f"| {key} | {ours['hvps']}, {ours['error']:.1e}, {rule} | {power['hvps']}, {perr} |")
    lines.append("")
    if not all(m.get("basis_precision") for m in payload["models"].values()):
        return "\n".join(lines)
    lines.append("## Accuracy cost of a float32 Krylov basis (partial reorthogonalisation, float64 coefficients)\n")
    lines.append("| model | basis | top-5 rel. error (tol 1e-6) | HVPs | lambda_min rel. error (tol 1e-4) | HVPs | planned MiB |")
    lines.append("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for key, m in payload["models"].items():
        for name, row in m["basis_precision"].items():
            lines.append(f"| {key} | {name} | {row['top5_error']:.1e} | {row['top5_hvps']} | {row['lambda_min_error']:.1e} "
                         f"| {row['lambda_min_hvps']} | {row['plan_bytes'] / 2**20:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--large", action="store_true", help="also 5M and 20M parameters")
    parser.add_argument("--models", default=",".join(FAMILIES))
    parser.add_argument("--limit", type=float, default=None, help="wall-clock limit of one anchor run (s)")
    parser.add_argument("--sizes", default=None, help="comma-separated parameter counts (default by --quick/--large)")
    parser.add_argument("--tasks", default="top1,top5,lambda_min")
    parser.add_argument("--name", default=None, help="results file name (default scaling or scaling_quick)")
    args = parser.parse_args()
    sizes = SIZES[:1] if args.quick else SIZES + (LARGE if args.large else ())
    if args.sizes:
        sizes = tuple(int(size) for size in args.sizes.split(","))
    tasks = tuple(args.tasks.split(","))
    name = args.name or ("scaling_quick" if args.quick else "scaling")
    limit = args.limit or (30.0 if args.quick else 300.0)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    payload: dict = {"environment": environment(), "load": load, "limit": limit, "quick": args.quick,
                     "tasks": tasks, "models": {}}
    for family in args.models.split(","):
        for size in sizes:
            key = f"{family}{size // 1000}k" if size < 10**6 else f"{family}{size // 10**6}M"
            print(f"== {key}", flush=True)
            with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
                model, x, y = trained(family, size, steps=20 if args.quick else 100)
                entry: dict = {"n_params": sum(p.numel() for p in model.parameters()), "n_samples": len(x)}
                entry["analyze"] = measured(lambda m=model, x=x, y=y: run_analyze(m, x, y))
                print(f"   analyze {entry['analyze']}", flush=True)
                entry["reference"] = ref = reference(model, x, y, bottom_end="lambda_min" in tasks)
                print(f"   reference top {ref['top'][-1]:.6g} min {ref['lambda_min']:.6g} ({ref['hvps']} HVPs)", flush=True)
                entry["eigen"] = eigen_tasks(model, x, y, ref, limit, tasks)
                for task, runs in entry["eigen"].items():
                    for lib, res in runs.items():
                        run = res["best"] or (res["tried"][-1] if res["tried"] else {})
                        print(f"   {task:10s} {lib:20s} {run.get('seconds', math.nan):.2f} s {run.get('hvps')} HVPs "
                              f"err {run.get('error')} {run.get('setting')}", flush=True)
                if "lambda_min" in tasks:
                    entry["basis_precision"] = basis_precision(model, x, y, ref)
                    print(f"   basis precision {entry['basis_precision']}", flush=True)
            payload["models"][key] = entry
            with open("/proc/loadavg") as f:
                payload["load_after"] = " ".join(f.read().split()[:3])
            save(name, payload, markdown(payload))  # after every model: a run cut short keeps what it finished
    print(markdown(payload))


if __name__ == "__main__":
    main()
