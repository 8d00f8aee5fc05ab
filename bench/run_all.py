"""Run every benchmark in one process, one after the other; results land in bench/results/, and
docs/benchmarks.md is rebuilt from them."""

import runpy
import sys
from pathlib import Path

HERE = Path(__file__).parent

for script in ("everyday.py", "verdict_at_scale.py", "scaling.py", "certificate_cost.py", "gpu.py", "index_goal.py", "hvp_engines.py", "batched_products.py",
               "exact_hessian.py",
               "curvature.py", "precision.py", "distributed.py", "report.py"):
    print(f"\n===== {script} =====", flush=True)
    sys.argv = [script]
    runpy.run_path(str(HERE / script), run_name="__main__")
