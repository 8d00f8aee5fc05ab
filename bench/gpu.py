"""GPU (issue 16, item 4): a 124M-parameter GPT-2 on one GPU: HVP / gradient, the verdict, peak memory,
against PyHessian's top-1.

The model is Hugging Face's ``GPT2LMHeadModel`` built from its config (random weights, nothing
downloaded): 12 layers, 12 heads, width 768, vocabulary 50,257, 1,024 positions (124,439,808 parameters),
float32, eval mode (dropout off), eager attention (PyTorch's fused scaled_dot_product_attention kernels
implement a backward but no backward of it, so a Hessian-vector product through them fails). One batch of
8 x 512 synthetic tokens from a seeded generator; the loss is next-token cross-entropy (the logits at
positions 0..T-2 against the tokens at 1..T-1), the same loss, weights and batch for both libraries.

Measured, each stage with its own peak memory (CUDA: ``torch.cuda.max_memory_allocated``, reset before
the stage; CPU: the resident set's high-water mark, reset through /proc/self/clear_refs, or where that
cannot be reset the process-lifetime ``getrusage`` maximum; the report says which):
  * one gradient, and one Hessian-vector product on saddlescope's reused gradient graph
    (``obj.gradient_graph(theta).hvp(v)``; building the graph is reported apart): interleaved medians
    after a warm-up, CUDA synchronised, and the ratio HVP / gradient;
  * the verdict end to end (``Objective.from_model`` + ``ss.analyze(obj, exact=False, k=1, index_probes=0)``:
    lambda_max, the bottom end, the kind; the 60 s target is about this), and analyze at its defaults (ten top
    pairs and the index estimate) for the record: wall seconds
    and their split (top end, bottom end, index estimate), products, the verdict (kind, curvature_kind,
    resolved_by), lambda_max and lambda_min as what they are (bound, interval), the Krylov basis plan; out
    of memory with analyze's defaults, it runs again without the index estimate (index_probes=0) and says so;
  * PyHessian's top-1 (power iteration, maxIter=100, tol=1e-3, its defaults) on the same model, weights and
    batch: seconds (its setup included), products, its eigenvalue, peak memory; the ratio of our verdict's
    seconds to its top-1 and our lambda_max against its eigenvalue.
One-time costs (imports, building the model, the first gradient in the process, the first double
backward) are paid before anything is timed and reported apart.

Target (issue 16): the verdict in <= 60 s on one H100-class GPU.

Run: python bench/gpu.py            (CUDA: the 124M model, to bench/results/gpu.{md,json})
     OMP_NUM_THREADS=1 python bench/gpu.py --small
                                    (a CPU smoke run of the same code on a 2-layer, width-64 GPT-2 at 4 x 64
                                     tokens, to gpu_cpu_small.{md,json}; automatic, and said, without CUDA)
Sizes can be overridden (--layers --heads --embd --vocab --positions --batch --seq); a run at other than the default
sizes of its device writes gpu_<device>_custom.{md,json} (or --name). --no-defaults skips analyze at its
defaults. The 124M model on this CPU, one short sequence (bench/results/gpu_cpu_124m.md):
     OMP_NUM_THREADS=1 python bench/gpu.py --layers 12 --heads 12 --embd 768 --vocab 50257 --batch 1 --seq 64 \
         --positions 1024 --rounds 3 --no-defaults --name gpu_cpu_124m
"""

from __future__ import annotations

import time

_START = time.perf_counter()

import argparse
import gc
import importlib
import math
import resource
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

_TORCH_IMPORTED = time.perf_counter()

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, interleaved, save

import saddlescope as ss
from saddlescope.objective import one_time_costs

_SADDLESCOPE_IMPORTED = time.perf_counter()

TARGET_S = 60.0
# GPT-2 small (124M) at 8 x 512 tokens on CUDA; a model small enough for a one-thread CPU smoke run.
FULL = {"layers": 12, "heads": 12, "embd": 768, "vocab": 50257, "positions": 1024, "batch": 8, "seq": 512}
SMALL = {"layers": 2, "heads": 2, "embd": 64, "vocab": 512, "positions": 64, "batch": 4, "seq": 64}
PYHESSIAN = {"maxIter": 100, "tol": 1e-3, "top_n": 1}


# ------------------------------------------------------------------------------------------- model
class NextToken(nn.Module):
    """GPT-2 as a plain classifier: token ids ``(B, T)`` in, next-token logits ``(B, V, T-1)`` out, so both
    libraries see ``CrossEntropyLoss()(model(ids), targets)`` with targets ``ids[:, 1:]`` (inputs and targets
    share their first dimension, as saddlescope's batches must)."""

    def __init__(self, gpt: nn.Module) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.gpt(input_ids=ids).logits[:, :-1].transpose(1, 2)


def build(sizes: dict[str, int], device: torch.device, seed: int) -> tuple[NextToken, torch.Tensor, torch.Tensor]:
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()  # a small vocabulary does not hold GPT-2's bos/eos ids
    config = GPT2Config(n_layer=sizes["layers"], n_head=sizes["heads"], n_embd=sizes["embd"],
                        vocab_size=sizes["vocab"], n_positions=sizes["positions"], resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
    torch.manual_seed(seed)
    model = NextToken(GPT2LMHeadModel(config)).to(device).eval()
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, sizes["vocab"], (sizes["batch"], sizes["seq"]), generator=generator).to(device)
    return model, ids, ids[:, 1:]


# ------------------------------------------------------------------------------------------ memory
class PeakMemory:
    """The peak memory of a stage: CUDA's allocator peak, or the host resident set's high-water mark."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.what = "peak GPU memory allocated (torch.cuda.max_memory_allocated, reset per stage)"
        elif self._clear_refs():
            self.what = "peak resident set (VmHWM, reset per stage through /proc/self/clear_refs)"
        else:
            self.what = "peak resident set (getrusage ru_maxrss: the process lifetime's, NOT reset per stage)"

    @staticmethod
    def _clear_refs() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the high-water mark to the current resident set
            return True
        except OSError:
            return False

    @staticmethod
    def _status_mb(key: str) -> float | None:
        try:
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) / 1024 for line in status if line.startswith(key))
        except (OSError, StopIteration):
            return None

    def reset(self) -> float:
        """Reset the peak; returns the memory in use now (MiB)."""
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated() / 2**20
        self._clear_refs()
        now = self._status_mb("VmRSS:")
        return now if now is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def peak(self) -> float:
        """The peak since the last reset (MiB)."""
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        peak = self._status_mb("VmHWM:")
        return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def staged(name: str, memory: PeakMemory, fn: Callable[[], dict]) -> dict:
    """Run one stage: its wall seconds, its peak memory and the growth over what was in use at its start."""
    print(f"-- {name} ...", flush=True)
    before = memory.reset()
    start = time.perf_counter()
    out = fn()
    out["stage_s"] = time.perf_counter() - start
    out["peak_mb"] = memory.peak()
    out["growth_mb"] = max(out["peak_mb"] - before, 0.0)
    shown = {key: value for key, value in out.items() if not isinstance(value, dict | list)}
    print(f"   {name}: " + ", ".join(f"{key}={_short(value)}" for key, value in shown.items()), flush=True)
    return out


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# -------------------------------------------------------------------------------------------- runs
def first_gradient(obj: ss.Objective, device: torch.device) -> dict:
    """The process's first gradient (CUDA context, cuBLAS handles, kernel selection): a one-time cost."""
    start = time.perf_counter()
    obj.grad(obj.theta0)
    synchronize(device)
    return {"seconds": time.perf_counter() - start}


def one_gradient(obj: ss.Objective, device: torch.device) -> dict:
    start = time.perf_counter()
    loss, grad = obj.loss_and_grad(obj.theta0)
    synchronize(device)
    return {"seconds": time.perf_counter() - start, "loss": float(loss), "grad_norm": float(grad.norm())}


def one_hvp(obj: ss.Objective, device: torch.device, seed: int) -> dict:
    """Build the gradient graph (one gradient with create_graph=True), then one product on it."""
    theta = obj.theta0
    v = torch.randn(obj.n_params, generator=torch.Generator().manual_seed(seed)).to(device, obj.dtype)
    start = time.perf_counter()
    graph = obj.gradient_graph(theta)
    synchronize(device)
    built = time.perf_counter()
    graph.hvp(v)
    synchronize(device)
    return {"graph_build_s": built - start, "first_hvp_s": time.perf_counter() - built,
            "graph_plan": graph.plan.to_dict()}


def product_times(obj: ss.Objective, device: torch.device, seed: int, rounds: int) -> dict:
    """Interleaved medians: one gradient against one product on a gradient graph built once."""
    theta = obj.theta0
    v = torch.randn(obj.n_params, generator=torch.Generator().manual_seed(seed)).to(device, obj.dtype)
    graph = obj.gradient_graph(theta)

    def gradient() -> None:
        obj.grad(theta)
        synchronize(device)

    def hvp() -> None:
        graph.hvp(v)
        synchronize(device)

    times = interleaved({"gradient": gradient, "hvp": hvp}, rounds=rounds, warmup=1)
    grad_s, hvp_s = statistics.median(times["gradient"]), statistics.median(times["hvp"])
    return {"gradient_s": grad_s, "hvp_s": hvp_s, "hvp_over_gradient": hvp_s / grad_s, "rounds": rounds,
            "times": times}


def product_stages(obj: ss.Objective, device: torch.device, memory: PeakMemory, seed: int, rounds: int) -> dict:
    """A gradient alone and a graph + HVP alone (for their peak memory), then both timed interleaved."""
    return {"gradient": staged("gradient", memory, lambda: one_gradient(obj, device)),
            "hvp": staged("graph + HVP", memory, lambda: one_hvp(obj, device, seed)),
            "products": staged("gradient vs HVP timing", memory, lambda: product_times(obj, device, seed, rounds))}


VERDICT = {"k": 1, "index_probes": 0}  # the certified verdict alone: lambda_max, the bottom end, the kind


def verdict(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor, device: torch.device) -> dict:
    """The verdict the 60 s target is about: ``analyze(exact=False, k=1, index_probes=0)``."""
    return _verdict(model, ids, targets, device, **VERDICT)


def defaults(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor, device: torch.device) -> dict:
    """analyze at its defaults (ten top pairs, the index estimate); out of memory there, again without the
    index estimate, so a one-off GPU run still has the record."""
    try:
        return _verdict(model, ids, targets, device)
    except (torch.OutOfMemoryError, MemoryError) as exc:
        failed = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(f"   out of memory with analyze's defaults ({failed}); again with index_probes=0", flush=True)
    out = _verdict(model, ids, targets, device, index_probes=0)
    out["defaults_failed"] = failed
    return out


def _verdict(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor, device: torch.device, **options) -> dict:
    """Objective.from_model + ss.analyze(exact=False), timed end to end."""
    start = time.perf_counter()
    obj = ss.Objective.from_model(model, nn.CrossEntropyLoss(), (ids, targets))
    built = time.perf_counter()
    cp = ss.analyze(obj, exact=False, **options)
    synchronize(device)
    end = time.perf_counter()
    top = (cp.lanczos or {}).get("top", {})
    bottom = (cp.lanczos or {}).get("bottom", {})
    quantities = {name: {**q.to_dict(), "text": q.text()} for name, q in cp.quantities.items()}
    return {
        "seconds": end - start, "objective_s": built - start, "analyze_s": end - built,
        # the kind is settled by the two ends; the index estimate (SLQ) comes after it
        "before_index_s": end - start - cp.seconds.get("index", 0.0),
        "split_s": dict(cp.seconds), "hvps": cp.hvp_count, "options": options or "defaults",
        "top_hvps": top.get("hvp_count"), "bottom_hvps": bottom.get("hvp_count"),
        "kind": cp.kind, "curvature_kind": cp.curvature_kind, "resolved_by": cp.resolved_by, "reason": cp.reason,
        "method": cp.method, "loss": cp.loss, "grad_norm": cp.grad_norm, "grad_tol": cp.tolerances.grad_tol,
        "lambda_max": cp.lambda_max, "lambda_min": cp.lambda_min, "quantities": quantities,
        "bottom_stopped_early": bottom.get("stopped_early"),
        "plan": top.get("plan"), "bottom_plan": bottom.get("plan"), "graph_plan": cp.graph_plan,
        "dtype": cp.dtype, "eigensolver_dtype": cp.eigensolver_dtype, "notes": list(cp.notes) + list(obj.notes),
    }


def pyhessian_top1(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor, device: torch.device,
                   seed: int, max_iter: int) -> dict:
    """PyHessian's power iteration for the top eigenvalue, its products counted, its setup included."""
    try:
        ph = importlib.import_module("pyhessian.hessian")  # the package exports a class of the same name
    except ImportError as exc:
        return {"skipped": f"not importable: {exc}"}
    original = ph.hessian_vector_product
    count = 0

    def counted(*args):
        nonlocal count
        count += 1
        return original(*args)

    ph.hessian_vector_product = counted
    try:
        with warnings.catch_warnings():  # its backward(create_graph=True) warns of the cycle we break below
            warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
            torch.manual_seed(seed)  # its random start comes from the global generator
            start = time.perf_counter()
            h = ph.hessian(model, nn.CrossEntropyLoss(), data=(ids, targets), cuda=device.type == "cuda")
            synchronize(device)
            setup = time.perf_counter() - start
            values, _ = h.eigenvalues(maxIter=max_iter, tol=PYHESSIAN["tol"], top_n=PYHESSIAN["top_n"])
            synchronize(device)
            seconds = time.perf_counter() - start
            del h
    except Exception as exc:  # noqa: BLE001 - the anchor failing (e.g. out of memory) is reported, not fatal
        failed = f"failed after {count} products: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        return {"skipped": failed, "failed": True}
    finally:
        ph.hessian_vector_product = original
        model.zero_grad(set_to_none=True)  # its gradients carry their graph (backward(create_graph=True))
    # Power iteration converges to the eigenvalue of largest magnitude, which may be the negative end.
    return {"seconds": seconds, "setup_s": setup, "hvps": count, "eigenvalue": float(values[0]),
            "setting": f"power iteration, maxIter={max_iter}, tol={PYHESSIAN['tol']:g} (relative change)",
            "hit_max_iter": count >= max_iter}


# ------------------------------------------------------------------------------------------ report
def compare(ours: dict, theirs: dict) -> dict:
    """Seconds ratio, and PyHessian's eigenvalue against our end of the same sign and our lambda_max."""
    value = theirs["eigenvalue"]
    end = "lambda_max" if value >= 0 else "lambda_min"

    def rel(x: float) -> float:
        return abs(x - value) / abs(value) if value else math.nan

    return {"verdict_over_pyhessian": ours["seconds"] / theirs["seconds"], "our_end": end, "ours": ours[end],
            "ours_is": ours["quantities"][end]["is"], "rel_diff": rel(ours[end]),
            "lambda_max_rel_diff": rel(ours["lambda_max"])}


def markdown(p: dict) -> str:
    s, prod, v, ph, mem, d = p["sizes"], p["products"], p["verdict"], p["pyhessian"], p["memory"], p["defaults"]
    lines = [f"# GPU: GPT-2 ({p['n_params']:,} parameters) on {p['device_name']}\n",
             f"Environment: {p['environment']}; load average before the run: {p['load']}, after: {p['load_after']}.\n",
             (f"Model: GPT2LMHeadModel from its config, {s['layers']} layers, {s['heads']} heads, width {s['embd']}, "
             f"vocabulary {s['vocab']:,}, {s['positions']} positions; float32, eval mode, eager attention. "
             f"Data: one batch of {s['batch']} x {s['seq']} synthetic tokens (seed {p['seed']}); loss: next-token "
             f"cross-entropy (mean over {s['batch'] * (s['seq'] - 1):,} predictions). Memory: {mem}.\n")]
    if p["small_note"]:
        lines.append(f"**{p['small_note']}**\n")
    lines += ["## Products\n",
              ("| gradient s | HVP s (reused graph) | HVP / gradient | graph build s | gradient peak MiB "
              "| graph + HVP peak MiB |"),
              "| ---: | ---: | ---: | ---: | ---: | ---: |",
              (f"| {prod['gradient_s']:.4f} | {prod['hvp_s']:.4f} | {prod['hvp_over_gradient']:.2f} "
              f"| {p['hvp']['graph_build_s']:.4f} | {p['gradient']['peak_mb']:.0f} | {p['hvp']['peak_mb']:.0f} |"),
              "",
              f"Medians of {prod['rounds']} interleaved rounds after one warm-up.\n",
              "## Verdict end to end (Objective.from_model + ss.analyze(obj, exact=False, k=1, index_probes=0))\n"]
    target = ""
    if p["device"] == "cuda" and not p["custom"]:
        target = f" ({'meets' if v['seconds'] <= TARGET_S else 'misses'} the {TARGET_S:g} s target)"
    split = ", ".join(f"{key} {value:.2f}" for key, value in v["split_s"].items())
    q = v["quantities"]
    plan = v.get("plan")
    plan_text = "none" if not plan else (
        f"{plan['vectors']} vectors x {plan['dtype'].removeprefix('torch.')} on {plan['device']}, "
        f"{plan['reorthogonalisation']} reorthogonalisation, {plan['bytes'] / 2**20:.1f} MiB of "
        f"{(plan['budget'] or 0) / 2**30:.1f} GiB ({plan['budget_source']}): {plan['why']}")
    lines += ["| quantity | value |", "| --- | --- |",
              (f"| time to verdict | {v['seconds']:.2f} s{target}; {v['before_index_s']:.2f} s before the index "
               "estimate |"),
              *([f"| analyze's defaults failed | {v['defaults_failed']}; figures here: {v['options']} |"]
                if "defaults_failed" in v else []),
              f"| split | objective {v['objective_s']:.2f} s, analyze {v['analyze_s']:.2f} s ({split}) |",
              f"| HVPs | {v['hvps']} (top {v['top_hvps']}, bottom {v['bottom_hvps']}) |",
              f"| peak memory | {v['peak_mb']:.0f} MiB (growth {v['growth_mb']:.0f}) |",
              f"| kind / curvature_kind / resolved_by | {v['kind']} / {v['curvature_kind']} / {v['resolved_by']} |",
              f"| reason | {v['reason']} |",
              f"| loss, gradient norm (grad_tol) | {v['loss']:.6g}, {v['grad_norm']:.4g} ({v['grad_tol']:.3g}) |",
              f"| lambda_max | {q['lambda_max']['text']}: {q['lambda_max']['basis']} |",
              f"| lambda_min | {q['lambda_min']['text']}: {q['lambda_min']['basis']} |",
              f"| Krylov basis plan (top) | {plan_text} |",
              f"| notes | {'; '.join(v['notes']) or 'none'} |",
              "",
              (f"analyze at its defaults: skipped ({d['skipped']})." if "skipped" in d else
               f"analyze at its defaults (ten top pairs, the index estimate): {d['seconds']:.2f} s, {d['hvps']} HVPs, "
               f"peak {d['peak_mb']:.0f} MiB, index {d['quantities'].get('index', {}).get('text', 'not estimated')}"
               + (f"; defaults failed ({d['defaults_failed']}), figures for {d['options']}" if "defaults_failed" in d else "")
               + "."),
              "",
              "## Against PyHessian's top-1\n"]
    if "skipped" in ph:
        lines.append(f"PyHessian skipped: {ph['skipped']}.")
    else:
        c = p["comparison"]
        lines += ["| library | seconds | HVPs | peak MiB | eigenvalues | setting |",
                  "| --- | ---: | ---: | ---: | --- | --- |",
                  (f"| saddlescope verdict | {v['seconds']:.2f} | {v['hvps']} | {v['peak_mb']:.0f} | "
                   f"lambda_max {q['lambda_max']['text']}; lambda_min {q['lambda_min']['text']} "
                   f"| analyze(exact=False), {v['options']} |"),
                  (f"| PyHessian top-1 | {ph['seconds']:.2f} | {ph['hvps']} | {ph['peak_mb']:.0f} | "
                   f"{ph['eigenvalue']:.6g} | {ph['setting']}{' (hit maxIter)' if ph['hit_max_iter'] else ''} |"),
                  "",
                  (f"saddlescope verdict seconds / PyHessian top-1 seconds: **{c['verdict_over_pyhessian']:.2f}**. "
                   f"Power iteration converges to the eigenvalue of largest magnitude; here it is "
                   f"{'negative' if ph['eigenvalue'] < 0 else 'positive'}, so it is compared with our "
                   f"{c['our_end']} ({c['ours']:.6g}): relative difference {c['rel_diff']:.1e}; our lambda_max "
                   f"against it: {c['lambda_max_rel_diff']:.1e}.")]
    lines += ["", "## One-time costs (paid before anything was timed)\n",
              ", ".join(f"{key} {value:.2f} s" for key, value in p["one_time_s"].items())]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="the CPU smoke-run sizes (default without CUDA)")
    for key in ("layers", "heads", "embd", "vocab", "positions", "batch", "seq"):
        parser.add_argument(f"--{key}", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of gradient and HVP")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pyhessian-iters", type=int, default=PYHESSIAN["maxIter"])
    parser.add_argument("--no-pyhessian", action="store_true")
    parser.add_argument("--no-defaults", action="store_true",
                        help="skip analyze at its defaults (ten top pairs and the index estimate: long on a CPU)")
    parser.add_argument("--name", default=None, help="results file name (default: by device and sizes)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = args.small or device.type != "cuda"
    small_note = ""
    if device.type != "cuda" and not any(getattr(args, key) is not None for key in FULL):
        small_note = ("No CUDA device: a CPU smoke run at small sizes; its figures say the script works, "
                      "not what the 124M model costs on a GPU.")
    elif device.type != "cuda":
        small_note = "No CUDA device: the CPU, at the sizes given; not what the model costs on a GPU."
    elif args.small:
        small_note = "--small on CUDA: small sizes, not the 124M target's figures."
    sizes = dict(SMALL if small else FULL)
    overrides = {key: getattr(args, key) for key in ("layers", "heads", "embd", "vocab", "positions", "batch", "seq")
                 if getattr(args, key) is not None}
    sizes.update(overrides)
    sizes["positions"] = max(sizes["positions"], sizes["seq"])
    custom = bool(overrides) or (device.type == "cuda" and small)
    name = "gpu" if device.type == "cuda" and not custom else f"gpu_{device.type}_{'custom' if custom else 'small'}"
    name = args.name or name
    print(f"== {name}: device {device}, sizes {sizes}" + (f" ({small_note})" if small_note else ""), flush=True)

    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    memory = PeakMemory(device)
    env = environment()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else env["processor"]
    if device.type == "cuda":
        env.update(cuda=torch.version.cuda, gpu=device_name,
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)

    start = time.perf_counter()
    import transformers  # noqa: F401 - timed apart: an import, not the model
    imported = time.perf_counter()
    model, ids, targets = build(sizes, device, args.seed)
    synchronize(device)
    built = time.perf_counter()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"   {n_params:,} parameters, built in {built - imported:.2f} s", flush=True)
    obj = ss.Objective.from_model(model, nn.CrossEntropyLoss(), (ids, targets))
    one_time = {"import torch": _TORCH_IMPORTED - _START, "import saddlescope": _SADDLESCOPE_IMPORTED - _TORCH_IMPORTED,
                "import transformers": imported - start, "build model": built - imported,
                "first gradient": first_gradient(obj, device)["seconds"]}
    obj.gradient_graph(obj.theta0)  # the first double backward in the process (and its one-time costs)
    one_time.update(one_time_costs())

    payload: dict = {"environment": env, "load": load, "device": device.type, "device_name": device_name,
                     "sizes": sizes, "seed": args.seed, "n_params": n_params, "small_note": small_note,
                     "custom": custom, "memory": memory.what, "target_s": TARGET_S, "one_time_s": one_time}
    payload.update(product_stages(obj, device, memory, args.seed, args.rounds))
    del obj  # its gradient graphs are gone with it: the verdict builds its own objective
    payload["verdict"] = staged("verdict", memory, lambda: verdict(model, ids, targets, device))
    if args.no_defaults:
        payload["defaults"] = {"skipped": "--no-defaults"}
    else:
        payload["defaults"] = staged("analyze defaults", memory, lambda: defaults(model, ids, targets, device))
    if args.no_pyhessian:
        payload["pyhessian"] = {"skipped": "--no-pyhessian"}
    else:
        payload["pyhessian"] = staged("PyHessian top-1", memory, lambda: pyhessian_top1(
            model, ids, targets, device, args.seed, args.pyhessian_iters))
    ph = payload["pyhessian"]
    if "skipped" not in ph:
        payload["comparison"] = compare(payload["verdict"], ph)
    with open("/proc/loadavg") as f:
        payload["load_after"] = " ".join(f.read().split()[:3])
    text = markdown(payload)
    print(text, flush=True)
    save(name, payload, text)


if __name__ == "__main__":
    main()
