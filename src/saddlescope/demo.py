"""The guided demo behind ``make demo`` / ``saddlescope demo`` (interface layer).

1. The seed toy ``L = (1 - w1 w2)^2`` at the origin: gradient, Hessian, eigenvalues, verdict,
   escape direction, one escape step; the same at a point of the valley ``w1 w2 = 1``.
2. An error-surface PNG and a JSON report.
3. A tanh MLP on digits trained by plain gradient descent from a tiny initialisation until it
   stalls; its verdict, an escape step, and how many steps gradient descent needs with and without it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from saddlescope.critical import CriticalPoint, analyze
from saddlescope.escape import escape
from saddlescope.objective import Objective
from saddlescope.problems import digits_mlp, seed_toy
from saddlescope.report import plot_loss_curve, plot_surface_2d, write_json


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    )


def _fmt(t: torch.Tensor) -> str:
    return np.array2string(t.detach().numpy(), precision=4, suppress_small=True)


def _verdict_table(title: str, cp: CriticalPoint) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_row("verdict", f"[bold]{cp.kind}[/bold] (resolved by {cp.resolved_by})")
    table.add_row("why", cp.reason)
    table.add_row("loss", f"{cp.loss:.6g}")
    table.add_row("|grad|", f"{cp.grad_norm:.3g}")
    if cp.n_params <= 8:
        table.add_row("eigenvalues", _fmt(cp.eigenvalues))
    else:
        table.add_row("eigenvalues", f"min {cp.lambda_min:.4g}  max {cp.lambda_max:.4g}")
    table.add_row("counts", f"{cp.n_negative} negative / {cp.n_zero} zero / {cp.n_positive} positive"
                  f"  (zero: |lambda| <= {cp.tolerances.zero_threshold:.2g})")
    table.add_row("min ratio / index", f"{cp.min_ratio:.4f} / {cp.index:.4f}")
    if cp.escape_direction is not None and cp.n_params <= 8:
        table.add_row("escape direction", _fmt(cp.escape_direction))
    return table


def _train_gd(
    objective: Objective, theta: torch.Tensor, lr: float, steps: int, *, progress: Progress,
    label: str, stop_below: float | None = None, stall_window: int | None = None, stall_rtol: float = 1e-4,
) -> tuple[torch.Tensor, list[float], int | None]:
    """Plain full-batch gradient descent. Stops at a stall (relative loss change over the window
    below ``stall_rtol``) or once the loss is below ``stop_below``; returns (theta, losses, stop step)."""
    losses: list[float] = []
    task = progress.add_task(label, total=steps)
    stopped = None
    for step in range(steps):
        loss, grad = objective.loss_and_grad(theta)
        losses.append(float(loss))
        progress.advance(task)
        if stop_below is not None and losses[-1] < stop_below:
            stopped = step
            break
        if stall_window and step >= stall_window:
            old = losses[-1 - stall_window]
            if (old - losses[-1]) <= stall_rtol * abs(old):
                stopped = step
                break
        theta = theta - lr * grad
    progress.remove_task(task)
    return theta, losses, stopped


def run_demo(out: Path, console: Console | None = None, *, seed: int = 0, quick: bool = False) -> dict[str, Any]:
    """Run the demo, print it, write ``out/demo_report.json`` and PNGs; return the report."""
    console = console or Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    report: dict[str, Any] = {"seed": seed, "command": "saddlescope demo"}

    console.rule("[bold]1. The seed toy: y = w1*w2*x, one sample (x=1, y=1), L = (1 - w1*w2)^2")
    toy = seed_toy()
    origin = torch.zeros(2, dtype=torch.float64)
    console.print(f"gradient at (0, 0): {_fmt(toy.grad(origin))}")
    console.print(f"Hessian at (0, 0):\n{_fmt(toy.hessian(origin))}")
    cp0 = analyze(toy, origin)
    console.print(_verdict_table("at the origin", cp0))
    step = escape(toy, cp0)
    console.print(
        f"escape step: along {_fmt(step.direction)}, length {step.step_size:.3g}: "
        f"loss {step.loss_before:.4g} -> [bold green]{step.loss_after:.4g}[/bold green]"
    )
    valley_point = torch.tensor([2.0, 0.5], dtype=torch.float64)
    cp1 = analyze(toy, valley_point)
    console.print(_verdict_table("at (2, 0.5), on the valley w1*w2 = 1", cp1))
    console.print(
        f"second-order test alone: [bold]{cp1.curvature_kind}[/bold] (eigenvalues {_fmt(cp1.eigenvalues)}); "
        f"the probe along the null direction settles it: {cp1.kind}"
        + (" (flat: loss constant along the valley)" if cp1.probe and cp1.probe.flat else "")
    )
    png = plot_surface_2d(
        toy, out / "seed_toy_surface.png", points=[cp0, cp1],
        curves=[("valley of minima w1*w2 = 1", lambda x: np.where(np.abs(x) > 1e-9, 1.0 / x, np.nan))],
        extent=(-2.5, 2.5, -2.5, 2.5), title="seed toy L = (1 - w1 w2)^2",
    )
    console.print(f"surface plot: {png}")
    report["toy"] = {"origin": cp0.to_dict(), "escape": step.to_dict(), "valley": cp1.to_dict()}

    console.rule("[bold]2. A tanh MLP 64-32-10 on digits, plain gradient descent from a tiny initialisation")
    problem = digits_mlp(init_scale=1e-4, seed=seed)
    obj = problem.objective
    lr = 0.5
    with _progress(console) as progress:
        theta, losses, stall = _train_gd(obj, obj.theta0, lr, 400, progress=progress,
                                         label="training until it stalls", stall_window=20)
    console.print(
        f"{obj.n_params} parameters, {obj.n_samples} samples, {obj.mode} mode, {obj.dtype}; "
        + (f"stalled at step {stall}: loss {losses[-1]:.5f}, changed < 1e-4 (relative) over 20 steps"
           if stall is not None else f"no stall within {len(losses)} steps")
    )
    with _progress(console) as progress:
        task = progress.add_task("exact Hessian (HVP chunks)", total=obj.n_params)
        started = time.perf_counter()
        cp = analyze(obj, theta, exact=True, progress=lambda done, total: progress.update(task, completed=done))
        seconds = time.perf_counter() - started
    console.print(_verdict_table(f"at the stall (exact analysis in {seconds:.1f} s)", cp))
    if cp.kind == "not_critical" and cp.curvature_kind in ("saddle", "maximum"):
        console.print(
            "[yellow]not a critical point yet, but the Hessian has negative curvature: "
            "gradient descent is crawling past a saddle (a plateau).[/yellow]"
        )
    result: dict[str, Any] = {"stall_step": stall, "verdict": cp.to_dict(vectors=False), "lr": lr,
                              "analysis_seconds": seconds}
    if cp.escape_direction is not None:
        jump = escape(obj, cp)
        console.print(
            f"escape step along the most negative eigenvector (lambda = {cp.lambda_min:.3g}), "
            f"length {jump.step_size:.3g}: loss {jump.loss_before:.5f} -> [bold green]{jump.loss_after:.5f}[/bold green]"
        )
        budget = 60 if quick else 300
        target = 2.0
        with _progress(console) as progress:
            _, plain, plain_stop = _train_gd(obj, theta, lr, budget, progress=progress,
                                             label="gradient descent, no escape", stop_below=target)
            _, escaped, escaped_stop = _train_gd(obj, jump.theta, lr, budget, progress=progress,
                                                 label="gradient descent after escape", stop_below=target)

        def steps_to(stop: int | None) -> str:
            return f"{stop} steps" if stop is not None else f"more than {budget} steps"

        console.print(
            f"steps to bring the loss below {target}: plain gradient descent {steps_to(plain_stop)}; "
            f"after one escape step {steps_to(escaped_stop)}"
        )
        curve = plot_loss_curve(
            losses + plain, out / "digits_loss.png", label="plain gradient descent",
            runs=[("after one escape step at the stall", len(losses) - 1, [jump.loss_before, *escaped])],
            markers=[(len(losses) - 1, "stall: analyse + escape")],
            title="digits MLP: gradient descent with and without an escape step",
        )
        console.print(f"loss curve: {curve}")
        result.update({"escape": jump.to_dict(vectors=False), "target_loss": target,
                       "steps_plain": plain_stop, "steps_after_escape": escaped_stop, "budget": budget})
    report["digits"] = result
    path = write_json(out / "demo_report.json", report)
    console.print(f"JSON report: {path}")
    return report
