"""What SaddleMonitor costs a training run (issue 20: <= 5% of training time at the default settings).

The run is the demo's digits MLP (src/saddlescope/demo.py): tanh 64-32-10 on all 1,797 digits,
float64, full-batch gradient descent with lr 0.5 from a 1e-4 initialisation, 700 steps (the demo's
400 steps to its stall plus 300 after). Each round trains a fresh copy of the same network twice,
once plain and once calling ``monitor.step(loss)`` after every step, rounds interleaved so drift
on a shared CPU hits both alike; the overhead is the ratio of the median wall times, minus one.

Scenarios:
  demo/defaults        the demo's run, ``SaddleMonitor(model, loss_fn, data)`` with every default.
  zero-init/escape     the same network started at exactly zero (a saddle gradient descent never
                       leaves), defaults with action="escape": the monitor detects the stall,
                       analyses it within its time budget and escapes.
  zero-init/unbudgeted the monitor as it behaved before the budget (no time budget, no back-off,
                       analyze's own defaults: exact spectrum and index estimate), action="report",
                       400 steps, one round (each exact analysis takes seconds).

Run: OMP_NUM_THREADS=1 .venv/bin/python bench/monitor_overhead.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, save

from saddlescope.monitor import SaddleMonitor
from saddlescope.problems import digits_mlp

LR = 0.5
STEPS = 700


def train(init_scale: float, steps: int, monitor_kwargs: dict | None) -> dict:
    """One run; returns its wall time (monitor construction excluded) and the monitor's accounting."""
    problem = digits_mlp(init_scale=init_scale, seed=0)
    model, loss_fn, x, y = problem.model, problem.loss_fn, problem.inputs, problem.targets
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    monitor = None if monitor_kwargs is None else SaddleMonitor(model, loss_fn, (x, y), **monitor_kwargs)
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        if monitor is not None:
            monitor.step(loss)
    seconds = time.perf_counter() - start
    out = {"seconds": seconds, "final_loss": float(loss.detach())}
    if monitor is not None:
        spent = monitor.spending
        out.update({
            "events": [(e.step, e.kind, e.verdict, e.action, (e.analysis or {}).get("method"), round(e.seconds, 3))
                       for e in monitor.events],
            "analyses": spent.analyses, "escapes": spent.escapes, "deferred": spent.deferred, "quiet": spent.quiet,
            "hvps": spent.hvps, "analysis_seconds": spent.analysis_seconds,
            "monitor_seconds": spent.monitor_seconds, "training_seconds": spent.training_seconds,
            "monitor_overhead": spent.overhead,
        })
    return out


def scenario(name: str, init_scale: float, steps: int, monitor_kwargs: dict, rounds: int) -> dict:
    train(init_scale, 20, monitor_kwargs)  # warm-up: the process's one-time costs (torch.func, kernels)
    plain, watched = [], []
    for _ in range(rounds):
        plain.append(train(init_scale, steps, None))
        watched.append(train(init_scale, steps, monitor_kwargs))
    t_plain = statistics.median(r["seconds"] for r in plain)
    t_watched = statistics.median(r["seconds"] for r in watched)
    last = watched[-1]
    return {
        "scenario": name, "steps": steps, "rounds": rounds, "monitor_kwargs": {k: repr(v) for k, v in monitor_kwargs.items()},
        "plain_s": t_plain, "monitored_s": t_watched, "overhead": t_watched / t_plain - 1.0,
        "per_step_us": (t_watched - t_plain) / steps * 1e6,
        "monitor_overhead_median": statistics.median(r["monitor_overhead"] for r in watched),
        "final_loss_plain": plain[-1]["final_loss"], "final_loss_monitored": last["final_loss"],
        "last_run": last,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    load = os.getloadavg()
    results = [
        scenario("demo/defaults", 1e-4, STEPS, {}, args.rounds),
        scenario("zero-init/escape", 0.0, STEPS, {"action": "escape"}, args.rounds),
        scenario("zero-init/unbudgeted", 0.0, 400,
                 {"action": "report", "time_fraction": None, "backoff": 1.0,
                  "analyze_kwargs": {"index_probes": 5, "exact_affordable_s": 10.0}}, 1),
    ]
    load_after = os.getloadavg()
    lines = [
        "# SaddleMonitor overhead on the demo's digits MLP run",
        "",
        (f"Load average (1, 5, 15 min) before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; after: "
         f"{load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f} (a shared machine: other work inflates both "
         f"columns alike, the interleaved rounds keep the ratio fair). Threads: {torch.get_num_threads()}."),
        "",
        ("| scenario | steps x rounds | plain s | monitored s | overhead (wall) | monitor's own accounting | "
         "per step | analyses | escapes | events | final loss plain / monitored |"),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in results:
        run = r["last_run"]
        events = ", ".join(f"{s}:{k}{'/' + v if v else ''}/{a}{f' ({m}, {t} s)' if m else ''}"
                           for s, k, v, a, m, t in run["events"]) or "none"
        lines.append(
            f"| {r['scenario']} | {r['steps']} x {r['rounds']} | {r['plain_s']:.2f} | {r['monitored_s']:.2f} | "
            f"{r['overhead']:+.1%} | {r['monitor_overhead_median']:.1%} | {r['per_step_us']:.0f} us | "
            f"{run['analyses']} | {run['escapes']} | {events} | {r['final_loss_plain']:.4f} / "
            f"{r['final_loss_monitored']:.4f} |"
        )
    markdown = "\n".join(lines)
    print(markdown)
    save("monitor_overhead", {"environment": environment(), "load_before": load, "load_after": load_after,
                              "results": results}, markdown)


if __name__ == "__main__":
    main()
