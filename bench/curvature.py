"""Curvature at scale: saddlescope against PyHessian, hessian-eigenthings and curvlinops + SciPy eigsh.

Same trained float32 weights for every library, in one run. Per model:
  * t_hvp / t_grad for each engine (interleaved rounds, medians);
  * top-1 and top-5 eigenvalues and lambda_min: wall time (setup included), HVPs, relative error;
    each anchor is run at several settings and the cheapest one that reaches the accuracy target is
    the one compared (a generous reading for the anchors);
  * the saddle certificate (analyze's bottom run, stop at the first confirmed negative Rayleigh
    quotient below -1e-4 lambda_max) against the cost of top-1;
  * spectral density with 100 HVPs of work (one SLQ probe, 100 Lanczos steps).
The reference eigenvalues come from a float64 copy of the model at a tight tolerance, each with its
residual bound |lambda - theta| <= r (so the reference certifies its own accuracy).
The index estimate is checked against eigh of the exact Hessian on digits models small enough for it.

Run: python bench/curvature.py [--models mlp26k,cnn26k,synth1m] [--limit 60]
(writes bench/results/curvature.{md,json}; docs/benchmarks.md is built from it by bench/report.py)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, interleaved, save  # noqa: E402
from hvp_engines import engine_cases  # noqa: E402

import saddlescope as ss  # noqa: E402
from saddlescope.problems import load_digits_tensors, mlp  # noqa: E402

CE = nn.CrossEntropyLoss()
TOP_TARGET = 1e-4  # relative error wanted for the top eigenvalues
MIN_TARGET = 1e-3  # and for lambda_min


class OutOfTime(Exception):
    pass


class Counter:
    """Counts products and stops a run (by raising OutOfTime) past its wall-clock limit."""

    def __init__(self, limit: float | None) -> None:
        self.n, self.limit, self.start = 0, limit, time.perf_counter()

    def tick(self, k: int = 1) -> None:
        self.n += k
        if self.limit is not None and time.perf_counter() - self.start > self.limit:
            raise OutOfTime


# ----------------------------------------------------------------------------------------- models
def _digits(images: bool):
    x, y = load_digits_tensors(torch.float32)
    return (x.view(-1, 1, 8, 8) if images else x), y


def mlp26k():
    torch.manual_seed(0)
    x, y = _digits(False)
    return mlp((64, 128, 128, 10), "tanh"), x, y, 300


def cnn26k():
    torch.manual_seed(0)
    x, y = _digits(True)
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.Tanh(), nn.Conv2d(32, 32, 3, padding=1), nn.Tanh(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(512, 32), nn.Tanh(), nn.Linear(32, 10),
    )
    return model, x, y, 150


def synth1m():
    torch.manual_seed(0)
    x = torch.randn(512, 256)
    teacher = torch.randn(256, 10)
    y = (x @ teacher + 0.5 * torch.randn(512, 10)).argmax(1)
    return mlp((256, 1024, 512, 256, 10), "tanh"), x, y, 60


def mlp2k():
    torch.manual_seed(0)
    x, y = _digits(False)
    return mlp((64, 32, 10), "tanh"), x, y, 1500


def cnn2k():
    torch.manual_seed(0)
    x, y = _digits(True)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.Tanh(),
        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10),
    )
    return model, x, y, 1500


MODELS: dict[str, Callable] = {"mlp26k": mlp26k, "cnn26k": cnn26k, "synth1m": synth1m}
INDEX_MODELS: dict[str, Callable] = {"mlp2k": mlp2k, "cnn2k": cnn2k}


def trained(builder: Callable):
    """Adam, full batch, fixed seed: the same weights for every library."""
    model, x, y, steps = builder()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        CE(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval(), x, y


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def rel_err(values, ref) -> float:
    v = np.sort(np.asarray(values, dtype=np.float64))
    r = np.sort(np.asarray(ref, dtype=np.float64))
    return float(np.max(np.abs(v - r) / np.abs(r)))


# -------------------------------------------------------------------------------------- reference
def reference(model, x, y, k: int = 5) -> dict:
    """Top-k and lambda_min of the float64 Hessian, tight tolerances, with residual bounds."""
    model64 = copy.deepcopy(model).double()
    obj = ss.Objective.from_model(model64, CE, (x.double(), y))
    op = ss.HessianOperator(obj)
    start = time.perf_counter()
    top = ss.eigs(op, k, "largest", tol=1e-10, relative_to="value", max_hvps=3000)
    bottom = ss.eigs(op, 1, "smallest", tol=1e-7, relative_to="value", max_hvps=3000, krylov_dim=120)
    return {
        "top": top.eigenvalues.tolist(),
        "top_bound": float((top.residuals / top.eigenvalues.abs()).max()),
        "lambda_min": float(bottom.eigenvalues[0]),
        "lambda_min_bound": float(bottom.residuals[0] / bottom.eigenvalues[0].abs()),
        "hvps": top.hvp_count + bottom.hvp_count,
        "seconds": time.perf_counter() - start,
    }


# ------------------------------------------------------------------------------------------- runs
def _pyhessian_module():
    """The module pyhessian.hessian (its package exports a class of the same name over it)."""
    import importlib

    return importlib.import_module("pyhessian.hessian")


def run_saddlescope(model, x, y, k: int, which: str, tol: float, limit: float) -> dict:
    start = time.perf_counter()
    obj = ss.Objective.from_model(model, CE, (x, y))
    op = ss.HessianOperator(obj)
    res = ss.eigs(op, k, which, tol=tol, relative_to="value", max_hvps=20000)
    return {"values": res.eigenvalues.tolist(), "hvps": res.hvp_count, "seconds": time.perf_counter() - start,
            "converged": res.all_converged, "setting": f"eigs tol {tol:g} (relative to |lambda|)"}


def run_certificate(model, x, y, lambda_max: float) -> dict:
    """analyze's bottom run: stop at the first confirmed Rayleigh quotient below -1e-4 lambda_max."""
    start = time.perf_counter()
    obj = ss.Objective.from_model(model, CE, (x, y))
    op = ss.HessianOperator(obj)
    res = ss.eigs(op, 1, "smallest", stop_below=-1e-4 * lambda_max, max_hvps=20000)
    return {"value": float(res.eigenvalues[0]), "hvps": res.hvp_count, "stopped_early": res.stopped_early,
            "seconds": time.perf_counter() - start}


def run_pyhessian(model, x, y, k: int, tol: float, limit: float) -> dict:
    ph = _pyhessian_module()
    counter = Counter(limit)
    original = ph.hessian_vector_product

    def counted(*args):
        counter.tick()
        return original(*args)

    ph.hessian_vector_product = counted
    try:
        start = time.perf_counter()
        torch.manual_seed(0)
        h = ph.hessian(model, CE, data=(x, y), cuda=False)
        values, _ = h.eigenvalues(maxIter=1000, tol=tol, top_n=k)
        return {"values": values, "hvps": counter.n, "seconds": time.perf_counter() - start,
                "setting": f"power iteration tol {tol:g}"}
    except OutOfTime:
        return {"values": None, "hvps": counter.n, "seconds": time.perf_counter() - start,
                "setting": f"power iteration tol {tol:g}", "timeout": True}
    finally:
        ph.hessian_vector_product = original
        model.zero_grad(set_to_none=True)


def run_curvlinops(model, x, y, k: int, which: str, tol: float, limit: float) -> dict:
    from curvlinops import HessianLinearOperator

    counter = Counter(limit)
    start = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    op = HessianLinearOperator(model, CE, params, [(x, y)], check_deterministic=False)
    n = op.shape[0]

    def mv(v):
        v2 = np.asarray(v).reshape(n, -1)
        counter.tick(v2.shape[1])
        out = op @ torch.as_tensor(v2, dtype=torch.float32)
        return out.detach().numpy().astype(np.float64).reshape(np.shape(v))

    lin = LinearOperator((n, n), matvec=mv, matmat=mv, dtype=np.float64)
    setting = f"eigsh {which} tol {tol:g}"
    try:
        values = eigsh(lin, k=k, which=which, tol=tol, return_eigenvectors=False,
                       v0=np.random.default_rng(0).standard_normal(n))
        return {"values": sorted(values.tolist()), "hvps": counter.n, "seconds": time.perf_counter() - start,
                "setting": setting}
    except OutOfTime:
        return {"values": None, "hvps": counter.n, "seconds": time.perf_counter() - start, "setting": setting,
                "timeout": True}


def run_eigenthings(model, x, y, k: int, which: str, max_iter: int, limit: float) -> dict:
    import hessian_eigenthings as he

    counter = Counter(limit)
    start = time.perf_counter()
    hop = he.HessianOperator(model, [(x, y)], lambda m, batch: CE(m(batch[0]), batch[1]))
    original = hop.matvec

    def counted(v):
        counter.tick()
        return original(v)

    hop.matvec = counted
    setting = f"lanczos {which} max_iter {max_iter}"
    try:
        res = he.lanczos(hop, k=k, max_iter=min(max_iter, hop.size - 1), which=which, seed=0, reorthogonalize=True)
        return {"values": sorted(res.eigenvalues.tolist()), "hvps": counter.n,
                "seconds": time.perf_counter() - start, "setting": setting}
    except OutOfTime:
        return {"values": None, "hvps": counter.n, "seconds": time.perf_counter() - start, "setting": setting,
                "timeout": True}


def sweep(runs: list[Callable[[], dict]], ref, target: float) -> dict:
    """Run settings from cheap to expensive; stop at the first that meets the target."""
    tried = []
    for run in runs:
        out = run()
        out["error"] = None if out["values"] is None else rel_err(out["values"], ref)
        tried.append(out)
        if out["error"] is not None and out["error"] <= target:
            break
        if out.get("timeout"):
            break
    best = next((t for t in tried if t["error"] is not None and t["error"] <= target), None)
    return {"tried": tried, "best": best}


def eigen_tasks(model, x, y, ref: dict, limit: float) -> dict:
    top = ref["top"]
    out: dict = {}
    for k in (1, 5):
        r = top[-k:]
        out[f"top{k}"] = {
            "saddlescope": sweep([lambda k=k: run_saddlescope(model, x, y, k, "largest", TOP_TARGET, limit)], r,
                                 TOP_TARGET),
            "PyHessian": sweep([lambda k=k, t=t: run_pyhessian(model, x, y, k, t, limit)
                                for t in (1e-3, 1e-4, 1e-5, 1e-6)], r, TOP_TARGET),
            "curvlinops + eigsh": sweep([lambda k=k, t=t: run_curvlinops(model, x, y, k, "LA", t, limit)
                                         for t in (1e-2, 1e-3, 1e-4, 1e-6)], r, TOP_TARGET),
            "hessian-eigenthings": sweep([lambda k=k, m=m: run_eigenthings(model, x, y, k, "LA", m, limit)
                                          for m in (2 * k + 5, 4 * k + 10, 8 * k + 20, 16 * k + 40)], r, TOP_TARGET),
        }
    r = [ref["lambda_min"]]
    out["lambda_min"] = {
        "saddlescope": sweep([lambda: run_saddlescope(model, x, y, 1, "smallest", MIN_TARGET, limit)], r, MIN_TARGET),
        "curvlinops + eigsh": sweep([lambda t=t: run_curvlinops(model, x, y, 1, "SA", t, limit)
                                     for t in (1e-2, 1e-3, 1e-4, 1e-6)], r, MIN_TARGET),
        "hessian-eigenthings": sweep([lambda m=m: run_eigenthings(model, x, y, 1, "SA", m, limit)
                                      for m in (40, 80, 160, 320, 640)], r, MIN_TARGET),
        "PyHessian": {"tried": [], "best": None, "note": "no smallest-eigenvalue routine"},
    }
    out["certificate"] = run_certificate(model, x, y, top[-1])
    return out


def density_times(model, x, y, rounds: int) -> dict:
    import hessian_eigenthings as he

    ph = _pyhessian_module()

    def ours():
        op = ss.HessianOperator(ss.Objective.from_model(model, CE, (x, y)))
        ss.spectral_density(op, n_probes=1, steps=100, seed=0)

    def pyhessian():
        h = ph.hessian(model, CE, data=(x, y), cuda=False)
        h.density(iter=100, n_v=1)
        model.zero_grad(set_to_none=True)

    def eigenthings():
        hop = he.HessianOperator(model, [(x, y)], lambda m, batch: CE(m(batch[0]), batch[1]))
        he.spectral_density(hop, num_runs=1, lanczos_steps=100, num_grid_points=1000, seed=0)

    cases = {"saddlescope": ours, "PyHessian": pyhessian, "hessian-eigenthings": eigenthings}
    failures = {}
    for name, fn in list(cases.items()):
        try:
            fn()  # also the warm-up
        except Exception as exc:  # an anchor that cannot run on this torch is reported, not fatal
            failures[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            del cases[name]
            model.zero_grad(set_to_none=True)
    return {"times": interleaved(cases, rounds=rounds, warmup=0), "failures": failures}


def index_accuracy() -> dict:
    """index_estimate against eigh of the exact float64 Hessian, at two resolutions."""
    out = {}
    for name, builder in INDEX_MODELS.items():
        model, x, y = trained(builder)
        model = model.double()
        obj = ss.Objective.from_model(model, CE, (x.double(), y))
        exact = torch.linalg.eigvalsh(obj.hessian(obj.theta0))
        lmax = float(exact.abs().max())
        op = ss.HessianOperator(obj)
        rows = []
        for steps in (80, 200):
            quad = ss.curvature.density.lanczos_quadrature(op, 10, steps, seed=0)
            for delta in (None, 1e-3 * lmax):
                est = ss.index_estimate(op, delta=delta, quadrature=quad)
                truth = float((exact < -est.delta).double().mean())
                rows.append({"steps": steps, "delta": est.delta, "estimate": est.value, "error_bar": est.error,
                             "exact": truth, "abs_error": abs(est.value - truth),
                             "covered": abs(est.value - truth) <= est.error, "hvps": est.hvp_count})
        out[name] = {"n_params": obj.n_params, "lambda_min": float(exact[0]), "lambda_max": float(exact[-1]),
                     "rows": rows}
    return out


# ----------------------------------------------------------------------------------------- report
def fmt_run(run: dict | None) -> str:
    if run is None:
        return "not reached"
    return f"{run['seconds']:.2f} s, {run['hvps']} HVPs, err {run['error']:.1e} ({run['setting']})"


def markdown(payload: dict) -> str:
    lines = ["# Curvature at scale: saddlescope against PyHessian, hessian-eigenthings, curvlinops + eigsh\n",
             f"Environment: {payload['environment']}. All runs float32 on the same trained weights; "
             f"reference: float64, tight tolerance, with its residual bound. Targets: top eigenvalues to "
             f"relative error <= {TOP_TARGET:g}, lambda_min to <= {MIN_TARGET:g}. Each anchor's settings are "
             f"tried from cheap to expensive and the first that meets the target is reported; wall time "
             f"includes each library's setup. Time limit per run: {payload['limit']:g} s.\n"]
    for name, m in payload["models"].items():
        ref = m["reference"]
        lines.append(f"## {name}: {m['n_params']:,} parameters, {m['n_samples']} samples\n")
        lines.append(f"Reference: lambda_max {ref['top'][-1]:.6g}, lambda_min {ref['lambda_min']:.6g} "
                     f"(relative bounds {ref['top_bound']:.1e} / {ref['lambda_min_bound']:.1e}; "
                     f"{ref['hvps']} HVPs, {ref['seconds']:.1f} s). Gradient at the trained point: "
                     f"|g| = {m['grad_norm']:.3g}.\n")
        hvp = m["hvp_over_grad"]
        lines.append("| engine | t_hvp / t_grad |\n| --- | ---: |")
        lines += [f"| {k} | {v:.2f} |" for k, v in hvp.items()]
        lines.append("")
        for task in ("top1", "top5", "lambda_min"):
            lines.append(f"**{task}**\n\n| library | wall time | HVPs | rel. error | setting | x saddlescope time |")
            lines.append("| --- | ---: | ---: | ---: | --- | ---: |")
            ours = m["eigen"][task]["saddlescope"]["best"]
            for lib, res in m["eigen"][task].items():
                best = res["best"]
                if best is None:
                    last = res["tried"][-1] if res["tried"] else None
                    why = res.get("note") or (
                        "timed out" if last and last.get("timeout") else "target not reached")
                    err = "" if not last or last["error"] is None else f"{last['error']:.1e}"
                    lines.append(f"| {lib} | {why} | {last['hvps'] if last else ''} | {err} | "
                                 f"{last['setting'] if last else ''} | |")
                    continue
                ratio = best["seconds"] / ours["seconds"] if ours else float("nan")
                lines.append(f"| {lib} | {best['seconds']:.2f} s | {best['hvps']} | {best['error']:.1e} | "
                             f"{best['setting']} | {ratio:.2f} |")
            lines.append("")
        cert = m["eigen"]["certificate"]
        top1 = m["eigen"]["top1"]["saddlescope"]["best"]
        lines.append(f"Saddle certificate (Rayleigh quotient {cert['value']:.3g} < -1e-4 lambda_max): "
                     f"{cert['hvps']} HVPs, {cert['seconds']:.2f} s; top-1 took "
                     f"{top1['hvps'] if top1 else '?'} HVPs, {top1['seconds'] if top1 else float('nan'):.2f} s.\n")
        dens = m["density"]["times"]
        base = statistics.median(dens["saddlescope"])
        lines.append("Spectral density, 100 HVPs of work (1 probe x 100 Lanczos steps), median of rounds:\n")
        lines.append("| library | median s | x saddlescope |\n| --- | ---: | ---: |")
        lines += [f"| {k} | {statistics.median(v):.2f} | {statistics.median(v) / base:.2f} |" for k, v in dens.items()]
        lines += [f"| {k} | fails: {why} | |" for k, why in m["density"]["failures"].items()]
        lines.append("")
    if "index" in payload:
        lines.append("## Index estimate against eigh (exact Hessian, float64)\n")
        lines.append("| model | n | steps | delta | estimate +- error bar | exact | abs. error | covered |")
        lines.append("| --- | ---: | ---: | ---: | --- | ---: | ---: | --- |")
        for name, m in payload["index"].items():
            for r in m["rows"]:
                lines.append(f"| {name} | {m['n_params']} | {r['steps']} | {r['delta']:.2e} | "
                             f"{r['estimate']:.4f} +- {r['error_bar']:.4f} | {r['exact']:.4f} | "
                             f"{r['abs_error']:.4f} | {r['covered']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--limit", type=float, default=60.0, help="wall-clock limit of one anchor run (s)")
    parser.add_argument("--density-rounds", type=int, default=3)
    parser.add_argument("--no-index", action="store_true")
    args = parser.parse_args()
    payload: dict = {"environment": environment(), "limit": args.limit, "models": {}}
    for name in args.models.split(","):
        print(f"== {name}", flush=True)
        model, x, y = trained(MODELS[name])
        for p in model.parameters():
            p.requires_grad_(True)
        obj = ss.Objective.from_model(model, CE, (x, y))
        entry: dict = {"n_params": n_params(model), "n_samples": len(y), "grad_norm": float(obj.grad(obj.theta0).norm())}
        entry["reference"] = ref = reference(model, x, y)
        print(f"   reference {ref}", flush=True)
        times = interleaved(engine_cases(model, CE, x, y), rounds=10, warmup=2)
        grad_t = statistics.median(times.pop("gradient"))
        entry["hvp_over_grad"] = {k: statistics.median(v) / grad_t for k, v in times.items()}
        print(f"   hvp/grad {entry['hvp_over_grad']}", flush=True)
        entry["eigen"] = eigen_tasks(model, x, y, ref, args.limit)
        for task in ("top1", "top5", "lambda_min"):
            for lib, res in entry["eigen"][task].items():
                print(f"   {task:10s} {lib:20s} {fmt_run(res['best'])}", flush=True)
        print(f"   certificate {entry['eigen']['certificate']}", flush=True)
        entry["density"] = density_times(model, x, y, args.density_rounds)
        print(f"   density {({k: statistics.median(v) for k, v in entry['density']['times'].items()})} "
              f"{entry['density']['failures']}", flush=True)
        payload["models"][name] = entry
    if not args.no_index:
        payload["index"] = index_accuracy()
    text = markdown(payload)
    print(text)
    save("curvature", payload, text)


if __name__ == "__main__":
    main()
