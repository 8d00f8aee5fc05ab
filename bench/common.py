"""Shared timing helpers: interleaved rounds, medians, ratios (absolute times drift on shared CPUs)."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def interleaved(cases: dict[str, Callable[[], object]], rounds: int = 5, warmup: int = 1) -> dict[str, list[float]]:
    """Time every case once per round, rounds interleaved so drift hits all cases alike."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def table(times: dict[str, list[float]], baseline: str, unit: str = "ms") -> str:
    scale = 1e3 if unit == "ms" else 1.0
    base = statistics.median(times[baseline])
    lines = [f"| case | median {unit} | min {unit} | max {unit} | x {baseline} |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, ts in times.items():
        med = statistics.median(ts)
        lines.append(f"| {name} | {med * scale:.2f} | {min(ts) * scale:.2f} | {max(ts) * scale:.2f} | {med / base:.2f} |")
    return "\n".join(lines)


def environment() -> dict[str, object]:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "commit": commit()}


def commit() -> str:
    """The code measured: the checkout's commit, ``+changes`` when a tracked file other than the results
    (bench/results/, docs/benchmarks.md) differs from it."""
    root = Path(__file__).parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)bench/results", ":(exclude)docs/benchmarks.md"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return head + ("+changes" if dirty else "")


def save(name: str, payload: dict, markdown: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown + "\n")


def digits_setup(dtype: torch.dtype, hidden: int = 32):
    """The issue's reference problem: tanh MLP 64-hidden-10 on all 1,797 digits."""
    from torch import nn

    from saddlescope.problems import load_digits_tensors

    torch.manual_seed(0)
    x, y = load_digits_tensors(dtype)
    model = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)).to(dtype)
    return model, nn.functional.cross_entropy, x, y
