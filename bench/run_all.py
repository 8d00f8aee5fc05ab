"""Run every benchmark in one process, one after the other; results land in bench/results/."""

import runpy
from pathlib import Path

HERE = Path(__file__).parent

for script in ("hvp_engines.py", "exact_hessian.py"):
    print(f"\n===== {script} =====", flush=True)
    runpy.run_path(str(HERE / script), run_name="__main__")
