"""A batch of Hessian-vector products: one vmapped pass against one product at a time, memory and time.

``GradientGraph.hvp_batch`` takes k vectors at once (the eigensolver's confirmation of k Ritz pairs, the
trace's sketches, exact Hessians and exact blocks). A vmapped double backward (``is_grads_batched``)
holds about one copy of the graph's saved activations per row, so one pass of k rows can need k times
the memory of one product. This bench measures, per model, k products:

  * ``singles``: one product at a time;
  * ``one pass``: every row in one vmapped pass (what ``hvp_batch`` did before session 27);
  * ``default``: ``hvp_batch`` as it is, rows in passes whose estimated temporaries stay under
    ``BATCHED_PRODUCT_BYTES`` (saddlescope.objective.graph).

Each case runs in a fresh process: peak = the growth of the resident set's high-water mark over the
timed call, after a warm-up call of the same kind (so vmap's first-call cost is not in the time); the
model, data and gradient graph are built before. Time: the best of three calls. float32, one batch.

Run: OMP_NUM_THREADS=1 .venv/bin/python bench/batched_products.py  (writes results/batched_products.{md,json})
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, save

# (family, parameters, rows)
CASES = (("mlp", 2_400, 32), ("mlp", 100_000, 8), ("mlp", 1_000_000, 5), ("cnn", 100_000, 5),
         ("transformer", 100_000, 8), ("transformer", 1_000_000, 5))
MODES = ("singles", "one pass", "default")


def _status(key: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(key))


def child(family: str, size: int, rows: int, mode: str) -> dict:
    from scaling import FAMILIES, data
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import saddlescope as ss
    import saddlescope.objective.graph as graph_module

    if mode == "one pass":
        graph_module.BATCHED_PRODUCT_BYTES = 2**62
        graph_module.BATCHED_PRODUCT_MEMORY_SHARE = 1.0
    torch.manual_seed(0)
    with sdpa_kernel(SDPBackend.MATH):
        model = FAMILIES[family](size)
        x, y = data(family)
        obj = ss.Objective.from_model(model, torch.nn.CrossEntropyLoss(), (x, y))
        graph = obj.gradient_graph(obj.theta0)
        vs = torch.randn(rows, obj.n_params)

        def run() -> None:
            if mode == "singles":
                for v in vs:
                    graph.hvp(v)
            else:
                graph.hvp_batch(vs)

        run()  # warm-up: vmap's first call, the row-size estimate
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        start = _status("VmRSS:")
        times = []
        for _ in range(3):
            tick = time.perf_counter()
            run()
            times.append(time.perf_counter() - tick)
        peak = _status("VmHWM:") - start
        passes = 1 if mode == "one pass" else rows if mode == "singles" else -(-rows // graph.rows_per_pass(rows))
    return {"family": family, "params": obj.n_params, "rows": rows, "mode": mode, "seconds": min(times),
            "peak_mb": max(peak, 0) / 2**20, "passes": passes,
            "row_mb": None if graph._row_bytes is None else graph._row_bytes / 2**20}


def markdown(payload: dict) -> str:
    lines = ["# A batch of Hessian-vector products: one vmapped pass against one product at a time", "",
             (f"Environment: {payload['environment']}; load average before {payload['load_before']}, after "
              f"{payload['load_after']}. `OMP_NUM_THREADS=1 python bench/batched_products.py`; each case in a fresh "
              "process, time the best of three calls after a warm-up, peak the growth of the resident set's "
              "high-water mark over them."), "",
             ("| model | params | rows | estimated MB a row | singles s (peak MB) | one pass s (peak MB) "
              "| default: passes, s (peak MB) | one pass / singles time |"),
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    by_case: dict[tuple, dict] = {}
    for row in payload["runs"]:
        by_case.setdefault((row["family"], row["params"], row["rows"]), {})[row["mode"]] = row
    for (family, params, rows), runs in by_case.items():
        single, one, default = runs["singles"], runs["one pass"], runs["default"]
        lines.append(f"| {family} | {params:,} | {rows} | {default['row_mb']:.1f} | {single['seconds']:.3f} ({single['peak_mb']:.0f}) "
                     f"| {one['seconds']:.3f} ({one['peak_mb']:.0f}) | {default['passes']}, {default['seconds']:.3f} "
                     f"({default['peak_mb']:.0f}) | {one['seconds'] / single['seconds']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])))
        return
    with open("/proc/loadavg") as f:
        load_before = " ".join(f.read().split()[:3])
    runs = []
    for family, size, rows in CASES:
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, "--child", family, str(size), str(rows), mode],
                                 capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(runs[-1], flush=True)
    with open("/proc/loadavg") as f:
        load_after = " ".join(f.read().split()[:3])
    payload = {"environment": environment(), "load_before": load_before, "load_after": load_after, "runs": runs}
    save("batched_products", payload, markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    main()
