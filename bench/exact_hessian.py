"""Exact Hessian build and full analysis: digits tanh MLP 64-32-10, all 1,797 samples, float64.

Builds compared (same matrix, max difference printed):
  saddlescope (chunk k)     Objective.hessian: basis chunks through the reused gradient graph (is_grads_batched)
  replicated forward (k)    k copies of theta, vmap over the *forward* only, one plain double-backward per chunk
  vmap(jvp(grad)) 256       the plain chunked forward-over-reverse build the Foundation issue quotes
  torch.func.hessian        jacfwd(jacrev)
Then eigh variants, and ss.analyze end to end (Hessian + eigh + verdict).

Run: python bench/exact_hessian.py   (writes bench/results/exact_hessian.{md,json})
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from torch.func import functional_call, grad, hessian, jvp, vmap

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from common import digits_setup, environment, interleaved, save, table  # noqa: E402

import saddlescope as ss  # noqa: E402
from saddlescope.curvature import symmetric_eigh  # noqa: E402


def main(rounds: int = 3) -> None:
    dtype = torch.float64
    model, loss_fn, x, y = digits_setup(dtype)
    obj = ss.Objective.from_model(model, loss_fn, (x, y))
    theta, n = obj.theta0, obj.n_params
    names, shapes = obj.param_names, obj.param_shapes
    sizes = [s.numel() for s in shapes]

    def f(th):
        params = {nm: t.view(s) for nm, t, s in zip(names, torch.split(th, sizes), shapes)}
        return loss_fn(functional_call(model, params, (x,)), y)

    def vmap_jvp(chunk: int) -> torch.Tensor:
        out = torch.empty(n, n, dtype=dtype)
        gf = grad(f)
        for s in range(0, n, chunk):
            basis = torch.zeros(min(chunk, n - s), n, dtype=dtype)
            basis[:, s : s + chunk] = torch.eye(basis.shape[0], dtype=dtype)
            out[s : s + chunk] = vmap(lambda u: jvp(gf, (theta,), (u,))[1])(basis)
        return out

    def replicated(k: int) -> torch.Tensor:
        copies = theta.detach().expand(k, n).clone().requires_grad_(True)
        (g,) = torch.autograd.grad(vmap(f)(copies).sum(), copies, create_graph=True)
        out = torch.empty(n, n, dtype=dtype)
        for s in range(0, n, k):
            m = min(k, n - s)
            basis = torch.zeros(k, n, dtype=dtype)
            basis[torch.arange(m), torch.arange(s, s + m)] = 1.0
            (hv,) = torch.autograd.grad(g, copies, grad_outputs=basis, retain_graph=True)
            out[s : s + m] = hv[:m]
        return out

    reference = obj.hessian(theta)
    builds = {
        "saddlescope chunk 16": lambda: obj.hessian(theta, chunk_size=16),
        "saddlescope chunk 32 (default)": lambda: obj.hessian(theta, chunk_size=32),
        "saddlescope chunk 64": lambda: obj.hessian(theta, chunk_size=64),
        "replicated forward k=32": lambda: replicated(32),
        "replicated forward k=64": lambda: replicated(64),
        "vmap(jvp(grad)) chunk 256": lambda: vmap_jvp(256),
        "torch.func.hessian": lambda: hessian(f)(theta),
    }
    diffs = {name: float((fn() - reference).abs().max()) for name, fn in builds.items()}
    times = interleaved(builds, rounds=rounds, warmup=0)
    eig = interleaved({
        "scipy evd (vectors; used)": lambda: symmetric_eigh(reference, True),
        "scipy evd (values only)": lambda: symmetric_eigh(reference, False),
        "torch.linalg.eigh": lambda: torch.linalg.eigh(reference),
        "torch.linalg.eigvalsh": lambda: torch.linalg.eigvalsh(reference),
    }, rounds=rounds)
    end_to_end = []
    for _ in range(rounds):
        start = time.perf_counter()
        cp = ss.analyze(obj, theta)
        end_to_end.append(time.perf_counter() - start)
    md = [
        "# Exact Hessian: digits tanh MLP 64-32-10 (2,410 params), all 1,797 samples, float64\n",
        f"Environment: {environment()}\n",
        "## Build (seconds; ratio to the default)\n",
        table(times, "saddlescope chunk 32 (default)", unit="s"),
        "\nMax |difference| from the default build: "
        + ", ".join(f"{k}: {v:.1e}" for k, v in diffs.items()) + "\n",
        "## Eigendecomposition (seconds)\n",
        table(eig, "scipy evd (vectors; used)", unit="s"),
        f"\n## ss.analyze end to end\n\nmedian {statistics.median(end_to_end):.2f} s over {rounds} runs "
        f"(min {min(end_to_end):.2f}, max {max(end_to_end):.2f}); last split {cp.seconds}; verdict {cp.kind}\n",
    ]
    markdown = "\n".join(md)
    print(markdown)
    save("exact_hessian", {"environment": environment(), "build": times, "eigh": eig,
                           "analyze": end_to_end, "max_abs_diff": diffs}, markdown)


if __name__ == "__main__":
    main()
