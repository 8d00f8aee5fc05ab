"""Which HVP engine? One product at a fixed theta, as a Krylov run makes them, against a gradient.

Cases (digits tanh MLP 64-32-10, all 1,797 samples, one batch; and bench/curvature.py's 26k-parameter CNN, float32):
  gradient                     one gradient (the unit of cost)
  saddlescope reused graph     GradientGraph.hvp: gradient graph built once, one double-backward per product
  saddlescope one-shot         Objective.hvp: builds the graph, then the product (what a single call costs)
  torch.func jvp(grad)         forward-over-reverse, gradient recomputed for every product
  PyHessian                    its hessian_vector_product on its gradsH graph (also reused)
  curvlinops                   HessianLinearOperator @ v (recomputes the graph per product)
  hessian-eigenthings          HessianOperator.matvec (recomputes the graph per product)

Run: OMP_NUM_THREADS=1 python bench/hvp_engines.py   (writes bench/results/hvp_engines.{md,json})
"""

from __future__ import annotations

import sys

import torch
from torch.func import functional_call, grad, jvp

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from common import digits_setup, environment, interleaved, save, table  # noqa: E402

import saddlescope as ss  # noqa: E402


def cases_for(dtype: torch.dtype) -> dict:
    return engine_cases(*digits_setup(dtype))


def engine_cases(model, loss_fn, x, y) -> dict:
    """One gradient and one HVP by each engine, on the same model, loss and single batch."""
    dtype = x.dtype if x.is_floating_point() else next(model.parameters()).dtype
    obj = ss.Objective.from_model(model, loss_fn, (x, y))
    theta = obj.theta0
    v = torch.randn(obj.n_params, dtype=dtype)
    graph = obj.gradient_graph(theta)
    names, shapes = obj.param_names, obj.param_shapes
    sizes = [s.numel() for s in shapes]

    def f(th):
        params = {n: t.view(s) for n, t, s in zip(names, torch.split(th, sizes), shapes)}
        return loss_fn(functional_call(model, params, (x,)), y)

    cases = {
        "gradient": lambda: obj.grad(theta),
        "saddlescope reused graph": lambda: graph.hvp(v),
        "saddlescope one-shot": lambda: obj.hvp(theta, v),
        "torch.func jvp(grad)": lambda: jvp(grad(f), (theta,), (v,))[1],
    }
    params = list(model.parameters())
    vs = list(torch.split(v, sizes))
    vs = [t.view(s) for t, s in zip(vs, shapes)]
    try:
        from pyhessian.utils import hessian_vector_product

        model.zero_grad()
        loss = loss_fn(model(x), y)
        grads_h = torch.autograd.grad(loss, params, create_graph=True)
        ph = torch.cat([t.reshape(-1) for t in hessian_vector_product(grads_h, params, vs)])
        assert torch.allclose(ph, graph.hvp(v), rtol=1e-3, atol=1e-5), "PyHessian disagrees"
        cases["PyHessian (reused graph)"] = lambda: hessian_vector_product(grads_h, params, vs)
    except ImportError:
        print("PyHessian not installed: skipped (make bench installs it)")
    try:
        from curvlinops import HessianLinearOperator

        op = HessianLinearOperator(model, torch.nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False)
        assert torch.allclose(op @ v, graph.hvp(v), rtol=1e-3, atol=1e-5), "curvlinops disagrees"
        cases["curvlinops"] = lambda: op @ v
    except ImportError:
        print("curvlinops not installed: skipped")
    except Exception as exc:  # an anchor's API drift must not stop the others
        print(f"curvlinops failed: {exc}")
    try:
        import hessian_eigenthings as he

        hop = he.HessianOperator(model, [(x, y)], lambda m, batch: loss_fn(m(batch[0]), batch[1]))
        assert torch.allclose(hop.matvec(v), graph.hvp(v), rtol=1e-3, atol=1e-5), "eigenthings disagrees"
        cases["hessian-eigenthings"] = lambda: hop.matvec(v)
    except ImportError:
        print("hessian-eigenthings not installed: skipped")
    except Exception as exc:
        print(f"hessian-eigenthings failed: {exc}")
    return cases


def cnn_cases() -> dict:
    """bench/curvature.py's 26k-parameter CNN (two 3x3 convolutions of 32 channels, max-pool, two linear
    layers), trained 150 Adam steps on all 1,797 digit images, float32: where issue 18 measured our product
    at 1.51 gradients against PyHessian's 1.21."""
    from curvature import CE, cnn26k, trained

    model, x, y = trained(cnn26k)
    return engine_cases(model, CE, x, y)


def main() -> None:
    import os

    payload: dict = {"environment": environment(), "load_before": os.getloadavg(), "results": {}}
    parts = ["# HVP engines: one product at fixed theta, against one gradient\n",
             f"Environment: {environment()}\n"]
    for dtype in (torch.float32, torch.float64):
        times = interleaved(cases_for(dtype), rounds=30, warmup=3)
        payload["results"][str(dtype)] = times
        parts.append(f"## digits MLP 64-32-10 (2,410 params, 1,797 samples), {dtype}\n\n{table(times, 'gradient')}\n")
    times = interleaved(cnn_cases(), rounds=15, warmup=2)
    payload["results"]["cnn26k torch.float32"] = times
    parts.append("## CNN, 26,010 params (bench/curvature.py's cnn26k, trained), 1,797 digit images, torch.float32\n\n"
                 f"{table(times, 'gradient')}\n")
    payload["load_after"] = os.getloadavg()
    parts.insert(2, f"Load average before {payload['load_before']}, after {payload['load_after']}; "
                    "medians of interleaved rounds (every case once per round).\n")
    markdown = "\n".join(parts)
    print(markdown)
    save("hvp_engines", payload, markdown)


if __name__ == "__main__":
    main()
