"""What precision costs: eigenvalues from float32, bfloat16 and float16 products of the same weights
against a float64 reference, with the Lanczos recurrence in float64 (the default) or float32.

For each model (trained in float64, then cast), the 5 largest and 5 smallest eigenvalues are
computed with ``ss.eigs(..., dtype=recurrence)`` on the model run in each precision. The error is
``max |lambda - lambda_ref|`` over those 10, also as a multiple of ``eps(model dtype) * ||H||``: the
unit of ``saddlescope.tolerances.PRODUCT_ROUNDING_EPS`` (64), the bound the package states. The
reference is ``eigvalsh`` of the float64 Hessian (or float64 Lanczos at tol 1e-10 for the GPT-2).
The verdict column is ``ss.analyze(exact=False)`` in that precision, with its default tolerances.

    python bench/precision.py
"""

from __future__ import annotations

import argparse
import time

import torch
from common import environment, save
from torch import nn

import saddlescope as ss
from saddlescope.problems import load_digits_tensors
from saddlescope.tolerances import PRODUCT_ROUNDING_EPS

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def train(model: nn.Module, loss_fn, x, y, steps: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()


def mlp_case(hidden, activation):
    from saddlescope.problems import mlp

    torch.manual_seed(0)
    x, y = load_digits_tensors(torch.float64)
    model = mlp((64, *hidden, 10), activation).double()
    train(model, nn.functional.cross_entropy, x, y, 300)
    return model, nn.functional.cross_entropy, (x, y)


def cnn_case():
    torch.manual_seed(0)
    x, y = load_digits_tensors(torch.float64)
    x = x.view(-1, 1, 8, 8)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 6, 3, stride=2, padding=1),
                          nn.Tanh(), nn.Flatten(), nn.Linear(6 * 16, 10)).double()
    train(model, nn.functional.cross_entropy, x, y, 300)
    return model, nn.functional.cross_entropy, (x, y)


def gpt2_case():
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=40, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).double()  # default attention (SDPA)
    ids = (torch.arange(16 * 12).view(16, 12) * 7 + torch.randint(0, 3, (16, 12))) % 40  # learnable pattern

    def loss_fn(out, targets):
        return nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 40), targets[:, 1:].reshape(-1))

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        loss_fn(model(input_ids=ids), ids).backward()
        opt.step()
    return model, loss_fn, ({"input_ids": ids}, ids)


CASES = {
    "mlp-tanh-2410": lambda: mlp_case((32,), "tanh"),
    "mlp-gelu-1482": lambda: mlp_case((16, 16), "gelu"),
    "cnn-tanh-1666": cnn_case,
    "gpt2-2layer": gpt2_case,
}


def reference(obj: ss.Objective) -> torch.Tensor:
    if obj.n_params <= 3000:
        values = torch.linalg.eigvalsh(obj.hessian(obj.theta0))
        return torch.cat([values[:5], values[-5:]])
    result = ss.eigs(ss.HessianOperator(obj), 5, "both", tol=1e-10, relative_to="value", max_hvps=4000)
    return result.eigenvalues


def run_case(name: str, build) -> list[dict]:
    model, loss_fn, data = build()
    obj64 = ss.Objective.from_model(model, loss_fn, data, dtype=torch.float64)
    ref = reference(obj64)
    norm = float(ref.abs().max())
    verdict64 = ss.analyze(obj64, exact=False, k=1, index_probes=0).kind
    rows = [{"model": name, "n_params": obj64.n_params, "products": "float64", "recurrence": "float64",
             "lambda_min": float(ref[0]), "lambda_max": float(ref[-1]), "error": 0.0, "error_eps_norm": 0.0,
             "verdict": verdict64, "seconds": None, "hvps": None}]
    for dtype in DTYPES:
        obj = ss.Objective.from_model(model, loss_fn, data, dtype=dtype)
        for recurrence in (torch.float64, torch.float32):
            if recurrence == torch.float32 and dtype != torch.float32:
                continue
            start = time.perf_counter()
            result = ss.eigs(ss.HessianOperator(obj), 5, "both", tol=1e-8, relative_to="value", dtype=recurrence)
            seconds = time.perf_counter() - start
            error = float((result.eigenvalues.double().cpu() - ref).abs().max())
            verdict = ss.analyze(obj, exact=False, k=1, index_probes=0).kind if recurrence == torch.float64 else ""
            rows.append({"model": name, "n_params": obj.n_params, "products": str(dtype).removeprefix("torch."),
                         "recurrence": str(recurrence).removeprefix("torch."),
                         "lambda_min": float(result.eigenvalues[0]), "lambda_max": float(result.eigenvalues[-1]),
                         "error": error, "error_eps_norm": error / (torch.finfo(dtype).eps * norm),
                         "verdict": verdict, "seconds": seconds, "hvps": result.hvp_count,
                         "converged": bool(result.all_converged)})
        print(f"{name} {dtype}: done", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "## Precision: eigenvalues from reduced-precision products against float64",
        "",
        "`python bench/precision.py`. Same trained weights (float64 Adam, then cast). Error: the largest "
        "|lambda - lambda_ref| over the 5 largest and 5 smallest eigenvalues; `x eps|H|` is that error "
        f"over eps(products dtype) x ||H||, the unit of the stated bound (`PRODUCT_ROUNDING_EPS` = "
        f"{PRODUCT_ROUNDING_EPS}). Verdict: `ss.analyze(exact=False)` with the dtype's default tolerances.",
        "",
        "| model | n | products | recurrence | lambda_min | lambda_max | error | x eps\\|H\\| | HVPs | s | verdict |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        secs = "" if r["seconds"] is None else f"{r['seconds']:.2f}"
        hvps = "" if r["hvps"] is None else str(r["hvps"])
        lines.append(
            f"| {r['model']} | {r['n_params']} | {r['products']} | {r['recurrence']} | {r['lambda_min']:.4g} | "
            f"{r['lambda_max']:.4g} | {r['error']:.2g} | {r['error_eps_norm']:.1f} | {hvps} | {secs} | {r['verdict']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES))
    args = parser.parse_args()
    rows: list[dict] = []
    for name in args.models.split(","):
        rows.extend(run_case(name, CASES[name]))
    text = markdown(rows)
    print(text)
    save("precision", {"environment": environment(), "rows": rows}, text)


if __name__ == "__main__":
    main()
