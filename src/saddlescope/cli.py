"""The ``saddlescope`` command line.

Errors from :mod:`saddlescope.errors` become one readable line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import typer
from rich.console import Console

from saddlescope.errors import InvalidInputError, SaddlescopeError
from saddlescope.progress import stage_progress

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Why has training stalled? Minimum, saddle or plateau, proved from the Hessian.",
)


def _problems() -> dict[str, tuple[str, Callable[..., Any]]]:
    from saddlescope import problems

    return {
        "seed-toy": ("(1 - w1 w2)^2; saddle at 0, valley of minima w1 w2 = 1", problems.seed_toy),
        "saddle-quadratic": ("5x^2 - y^2; saddle at 0", problems.saddle_quadratic),
        "monkey-saddle": ("x^3 - 3xy^2; degenerate saddle at 0", problems.monkey_saddle),
        "rosenbrock": ("(1 - x)^2 + 100 (y - x^2)^2; minimum at (1, 1)", problems.rosenbrock),
        "peano": ("(y - x^2)(y - 2x^2); degenerate saddle at 0", problems.peano_surface),
        "digits-mlp": ("tanh MLP 64-32-10 on digits at its initialisation; 2,410 parameters in 2 layers",
                       lambda: problems.digits_mlp((32,)).objective),
    }


def _fail(message: str) -> None:
    Console(stderr=True).print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_output"), help="Folder for the PNGs and the JSON report."),
    seed: int = typer.Option(0, help="Seed for every random choice (recorded in the report)."),
    quick: bool = typer.Option(False, help="Shorter training comparison."),
) -> None:
    """The seed toy and a stalled digits MLP: verdicts, escape steps, a surface plot, a JSON report."""
    from saddlescope.demo import run_demo

    try:
        run_demo(out, Console(), seed=seed, quick=quick)
    except SaddlescopeError as exc:
        _fail(str(exc))


@app.command()
def analyze(
    problem: str = typer.Option(None, help="A built-in problem (see `saddlescope problems`)."),
    model: str = typer.Option(None, help="Your model: 'pkg.module:factory' or 'path/file.py:factory'."),
    checkpoint: Path = typer.Option(None, help="Weights for --model: a state dict (torch.save) or .safetensors."),
    data: str = typer.Option(None, help="Batches for --model: 'pkg.module:loader' (a function or a DataLoader)."),
    loss: str = typer.Option("auto", help="auto | cross_entropy | mse | lm | model | lightning | pkg.module:fn. "
                                          "Named losses average over the batch; a pkg.module:fn sums when it says "
                                          "so (fn.reduction = 'sum', or an nn loss with reduction='sum')."),
    model_kwargs: str = typer.Option(None, help="JSON keyword arguments for the model factory."),
    data_kwargs: str = typer.Option(None, help="JSON keyword arguments for the data function."),
    dtype: str = typer.Option(None, help="float64 | float32 | bfloat16 | float16 (default: the model's)."),
    device: str = typer.Option(None, help="--model: where to compute, e.g. cuda, cuda:1 or cpu (default: where the "
                                          "model's parameters are); the data follow."),
    max_batches: int = typer.Option(None, help="Analyse only the first N batches (a fixed subset)."),
    theta: str = typer.Option(None, help="--problem: comma-separated point, e.g. '0,0' (default: its start)."),
    grad_tol: float = typer.Option(None, help="Critical when |grad| <= this (default by dtype)."),
    rtol: float = typer.Option(None, help="Eigenvalue is zero when |lambda| <= rtol*max|lambda| + atol."),
    atol: float = typer.Option(None, help="See rtol."),
    method: str = typer.Option("auto", help="auto | exact | lanczos (auto: exact up to 4,096 parameters)."),
    k: int = typer.Option(10, "-k", help="Lanczos: eigenpairs at each end of the spectrum."),
    index_probes: int = typer.Option(5, help="Lanczos: at most this many probes for the index estimate; "
                                             "0 skips it (the verdict alone)."),
    index_rtol: float = typer.Option(None, help="Lanczos: resolve the index at +-index_rtol*max|lambda| (e.g. "
                                                "1e-3; default: the quadrature's own resolution); the probes "
                                                "are fitted to it within --index-hvps."),
    index_hvps: int = typer.Option(None, help="Lanczos: product budget of the index estimate "
                                              "(default: 60 per probe)."),
    memory_budget: str = typer.Option(None, help="Lanczos: memory each eigensolver run and index probe may hold, "
                                                 "e.g. 8GiB or 500MB (default: half of what is free). The "
                                                 "report gives the plan it chose."),
    by: str = typer.Option(None, "--by", help="Also curvature per block: module | parameter."),
    plot: Path = typer.Option(None, help="With --by: write the per-block bar chart to this PNG."),
    seed: int = typer.Option(0, help="Seed for every random choice (recorded)."),
    shard: bool = typer.Option(True, "--shard/--no-shard",
                               help="Under torchrun: rank r takes batches r, r+N, ... (--no-shard: the data "
                                    "function already returns this rank's shard)."),
    out: Path = typer.Option(None, help="Folder for the report: HTML page, JSON and PNGs."),
    json_out: bool = typer.Option(False, "--json", help="Print the verdict as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress (a bar on a terminal, timed lines elsewhere)."),
) -> None:
    """Classify a point: your model (--model, --data, --checkpoint) or a built-in --problem.

    Under `torchrun --nproc-per-node=N -m saddlescope.cli analyze ...` every sum is all-reduced over
    the ranks; rank 0 alone prints and writes the report."""
    import json

    from saddlescope.report import plot_blocks, to_jsonable

    try:
        if (problem is None) == (model is None):
            raise InvalidInputError("give either --model (with --data) for your own model, or --problem for a "
                                    "built-in one (see `saddlescope problems`)")
        if model is None:
            for name, value in (("--data", data), ("--checkpoint", checkpoint), ("--model-kwargs", model_kwargs),
                                ("--data-kwargs", data_kwargs), ("--max-batches", max_batches),
                                ("--device", device)):
                if value is not None:
                    raise InvalidInputError(f"{name} goes with --model, not --problem")
        elif data is None:
            raise InvalidInputError("--model needs --data 'pkg.module:loader' (the batches to analyse on)")
        elif theta is not None:
            raise InvalidInputError("--theta goes with --problem; a model is analysed at its checkpoint's weights")
        if plot is not None and by is None:
            raise InvalidInputError("--plot draws the per-block chart: give --by module as well")
        command = "saddlescope " + _shell_join(sys.argv[1:])
        with stage_progress(quiet) as progress:
            if model is not None:
                result = _analyze_model(model, data, loss=loss, checkpoint=checkpoint, model_kwargs=model_kwargs,
                                        data_kwargs=data_kwargs, dtype=dtype, device=device,
                                        max_batches=max_batches,
                                        method=method, k=k, index_probes=index_probes, index_rtol=index_rtol,
                                        index_hvps=index_hvps, memory_budget=memory_budget, by=by,
                                        grad_tol=grad_tol, rtol=rtol, atol=atol,
                                        seed=seed, shard=shard, out=out, command=command, progress=progress)
            else:
                result = _analyze_problem(problem, theta, dtype=dtype, method=method, k=k,
                                          index_probes=index_probes, index_rtol=index_rtol, index_hvps=index_hvps,
                                          memory_budget=memory_budget, by=by,
                                          grad_tol=grad_tol, rtol=rtol, atol=atol, seed=seed, out=out,
                                          command=command, progress=progress)
        if result.blocks is not None and plot is not None:
            plot_blocks(result.blocks, plot)
    except SaddlescopeError as exc:
        _fail(str(exc))
        return
    from saddlescope.distributed import is_main_process

    if not is_main_process():
        return
    if json_out:
        typer.echo(json.dumps(to_jsonable(result.to_dict()), indent=2))
    else:
        typer.echo(result.summary())


def _shell_join(args: list[str]) -> str:
    import shlex

    return shlex.join(args)


def _json_option(text: str | None, option: str) -> dict[str, Any] | None:
    import json

    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{option} must be a JSON object, e.g. '{{\"hidden\": 32}}': {exc}") from None
    if not isinstance(value, dict):
        raise InvalidInputError(f"{option} must be a JSON object, got {type(value).__name__}")
    return value


def _analyze_model(model: str, data: str, *, model_kwargs: str | None, data_kwargs: str | None,
                   **options: Any) -> Any:
    from saddlescope.workflow import analyze_model

    return analyze_model(model, data, model_kwargs=_json_option(model_kwargs, "--model-kwargs"),
                         data_kwargs=_json_option(data_kwargs, "--data-kwargs"), **options)


def _analyze_problem(problem: str, theta: str | None, *, dtype: str | None, method: str, k: int,
                     index_probes: int, index_rtol: float | None, index_hvps: int | None,
                     memory_budget: str | None, by: str | None,
                     grad_tol: float | None, rtol: float | None, atol: float | None, seed: int, out: Path | None,
                     command: str, progress: Callable[[str, int, int], None]) -> Any:
    from saddlescope.critical import analyze as analyze_point
    from saddlescope.curvature.blocks import per_block
    from saddlescope.workflow import METHODS, ModelAnalysis, memory_budget_bytes, write_model_report

    table = _problems()
    if problem not in table:
        raise InvalidInputError(f"unknown problem {problem!r}; choose one of {', '.join(table)}")
    if dtype is not None:
        raise InvalidInputError("--dtype goes with --model; built-in problems compute in float64")
    if method not in METHODS:
        raise InvalidInputError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if by is not None and by not in ("module", "parameter"):
        raise InvalidInputError(f"--by must be 'module' or 'parameter', got {by!r}")
    obj = table[problem][1]()
    point = None
    if theta is not None:
        try:
            values = [float(v) for v in theta.split(",")]
        except ValueError:
            raise InvalidInputError(f"--theta must be comma-separated numbers, got {theta!r}") from None
        point = torch.tensor(values, dtype=obj.dtype)
    budget = memory_budget_bytes(memory_budget)
    cp = analyze_point(obj, point, k=k, exact=METHODS[method], grad_tol=grad_tol, rtol=rtol, atol=atol, seed=seed,
                       index_probes=index_probes, index_rtol=index_rtol, index_hvps=index_hvps, memory_budget=budget,
                       progress=lambda done, total: progress("hessian products", done, total))
    blocks = None if by is None else per_block(obj, point, by=by, rtol=rtol, seed=seed)
    result = ModelAnalysis(point=cp, objective=obj, blocks=blocks,
                           settings={"problem": problem, "method": method, "k": k, "index_probes": index_probes,
                                     "index_rtol": index_rtol, "index_hvps": index_hvps,
                                     "memory_budget": budget, "by": by, "seed": seed,
                                     "command": command})
    if out is not None:
        result.files = write_model_report(result, out, command=command,
                                          progress=lambda done, total: progress("report", done, total))
    return result


@app.command()
def problems() -> None:
    """List the built-in problems."""
    for name, (text, _) in _problems().items():
        typer.echo(f"{name:18s} {text}")


@app.command()
def race(
    out: Path = typer.Option(None, help="Folder for the run records (resumable), race.json, race.md and PNGs."),
    quick: bool = typer.Option(False, help="One lr per optimizer and shorter step caps (well under a minute)."),
    seeds: int = typer.Option(5, help="Seeds 0..N-1 per (optimizer, problem, lr)."),
    problem_names: str = typer.Option(None, "--problems", help="Comma-separated problems (default: all)."),
    optimizer_names: str = typer.Option(None, "--optimizers", help="Comma-separated optimizers (default: all)."),
    workers: int = typer.Option(1, help="Parallel processes (wall times then share the CPU)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON instead of the table."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress (a bar on a terminal, timed lines elsewhere)."),
) -> None:
    """The escape race: nine optimizers from saddles; steps, time and reliability to escape."""
    import json

    from saddlescope.experiments.race import race as run_race
    from saddlescope.report import to_jsonable
    from saddlescope.report.race_plots import plot_race

    try:
        with stage_progress(quiet) as progress:
            result = run_race(
                problem_names, optimizer_names, seeds=seeds, out=out, quick=quick, workers=workers,
                progress=lambda done, total: progress("escape race", done, total),
            )
        if out is not None:
            for png in plot_race(result, out):
                result.files[png.stem] = str(png)
    except SaddlescopeError as exc:
        _fail(str(exc))
        return
    if json_out:
        typer.echo(json.dumps(to_jsonable(result.to_dict()), indent=2))
    else:
        typer.echo(result.table())
        typer.echo(f"\n{result.executed} runs executed, {result.reused} reused, {result.wall_time_s:.1f} s")


study_app = typer.Typer(no_args_is_help=True, help="Studies over many networks (resumable, parallel).")
app.add_typer(study_app, name="study")


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InvalidInputError(f"{option} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise InvalidInputError(f"{option} is empty")
    return values


@study_app.command("min-ratio")
def study_min_ratio(
    out: Path = typer.Option(Path("min_ratio_study"), help="Study folder: records (resumable), report.md, PNGs."),
    n_networks: int = typer.Option(100, "-n", "--n-networks", help="Networks in the study."),
    seed: int = typer.Option(0, help="Study seed: run i's network is drawn from (seed, i)."),
    workers: int = typer.Option(1, help="Processes (spawned, one thread each); 0 computes in this process."),
    hidden: str = typer.Option(None, help="Hidden widths to draw from, ';'-separated, e.g. '8;16;8,8'."),
    activations: str = typer.Option(None, help="Comma-separated, from tanh,softplus,gelu,sigmoid."),
    train_steps: str = typer.Option(None, help="Comma-separated training lengths to draw from (each >= 100)."),
    n_samples: int = typer.Option(None, help="First digits used (default 200)."),
    weight_decay: float = typer.Option(None, help="L2 penalty w in w/2 |theta|^2 (at most 1e-5; default 1e-5)."),
    loss: str = typer.Option(None, help="mse (default) | cross_entropy."),
    grad_rtol: float = typer.Option(None, help="Critical when |grad| <= this x the loss scale (default 1e-8)."),
    max_iter: int = typer.Option(None, help="Hessians per critical-point search at most."),
    lecture_steps: int = typer.Option(None, help="Adam steps on |grad|^2 for the lecture's panel (default 500)."),
    progress: bool = typer.Option(True, help="Show progress: a bar on a terminal, timed lines elsewhere."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Same as --no-progress."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Train N networks; the lecture's points (train, then minimise |grad|) and certified critical points from
    each trajectory, by exact spectrum; write report.md with both panels and a conclusion."""
    import json
    import shlex

    from saddlescope.experiments.min_ratio import MinRatioConfig, min_ratio
    from saddlescope.report import to_jsonable
    from saddlescope.report.study_plots import write_min_ratio_report

    try:
        options: dict[str, Any] = {}
        if hidden is not None:
            options["hidden"] = tuple(_int_list(part, "--hidden") for part in hidden.split(";") if part.strip())
        if activations is not None:
            options["activations"] = tuple(a.strip() for a in activations.split(",") if a.strip())
        if train_steps is not None:
            options["train_steps"] = _int_list(train_steps, "--train-steps")
        for name, value in (("n_samples", n_samples), ("weight_decay", weight_decay), ("loss", loss),
                            ("grad_rtol", grad_rtol), ("max_iter", max_iter), ("lecture_steps", lecture_steps)):
            if value is not None:
                options[name] = value
        study = min_ratio(n_networks, out=out, seed=seed, workers=workers, config=MinRatioConfig(**options),
                          progress=progress and not quiet)
        report = write_min_ratio_report(study, command="saddlescope " + shlex.join(sys.argv[1:]))
    except SaddlescopeError as exc:
        _fail(str(exc))
        return
    if json_out:
        typer.echo(json.dumps(to_jsonable(study.to_dict()), indent=2))
        return
    s = study.summary
    typer.echo(f"{s.n_runs} networks, {s.n_searches} searches: " + ", ".join(f"{k} {v}" for k, v in s.labels.items())
               + f" (certified {s.fraction_critical:.0%}, {s.loss_levels} loss levels)")
    typer.echo("certified: " + (", ".join(f"{k} {v}" for k, v in s.kinds.items()) or "none")
               + f", collapsed {s.collapsed}; Spearman loss-index {s.spearman.text('.2f')}")
    typer.echo("lecture points, largest min ratio at delta = 0, 1e-6, 1e-4: "
               + ", ".join(f"{v:.3f}" for v in s.lecture.largest_min_ratio.values())
               + f"; |grad| {s.lecture.grad_norm_range[0]:.1e} to {s.lecture.grad_norm_range[1]:.1e}")
    typer.echo(f"report: {report}")


@study_app.command("prevalence")
def study_prevalence(
    out: Path = typer.Option(Path("prevalence_study"), help="Study folder: records (resumable), report.md, PNGs."),
    seed: int = typer.Option(0, help="Study seed: function i of a family in dimension n is drawn from it."),
    workers: int = typer.Option(1, help="Processes (spawned, one thread each); 0 computes in this process."),
    families: str = typer.Option(None, help="Comma-separated, from grf,polynomial,network,double_well."),
    dims: str = typer.Option(None, help="Comma-separated dimensions n (default 1,2,3,4,6,8,12,16,24)."),
    starts: int = typer.Option(None, help="Random starts per function (default 16)."),
    instances: int = typer.Option(None, help="Random functions per family and dimension (default 3)."),
    kicks: int = typer.Option(None, help="Kicked restarts of a search that found no critical point (default 6)."),
    grf_edge_ratio: float = typer.Option(None, help="GRF confinement mu as a fraction of the Hessian edge R."),
    progress: bool = typer.Option(True, help="Show progress: a bar on a terminal, timed lines elsewhere."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Same as --no-progress."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Find critical points of random functions and small networks; fraction of minima against n; report.md."""
    import json
    import shlex

    from saddlescope.experiments.prevalence import PrevalenceConfig, prevalence_study
    from saddlescope.report import to_jsonable
    from saddlescope.report.prevalence_plots import write_prevalence_report

    try:
        options: dict[str, Any] = {}
        if families is not None:
            options["families"] = tuple(f.strip() for f in families.split(",") if f.strip())
        if dims is not None:
            options["dims"] = _int_list(dims, "--dims")
        for name, value in (("starts", starts), ("instances", instances), ("kicks", kicks),
                            ("grf_edge_ratio", grf_edge_ratio)):
            if value is not None:
                options[name] = value
        study = prevalence_study(out=out, seed=seed, workers=workers, config=PrevalenceConfig(**options),
                                 progress=progress and not quiet)
        report = write_prevalence_report(study, command="saddlescope " + shlex.join(sys.argv[1:]))
    except SaddlescopeError as exc:
        _fail(str(exc))
        return
    if json_out:
        typer.echo(json.dumps(to_jsonable(study.to_dict()), indent=2))
        return
    typer.echo(f"{len(study.records)} functions, {len(study.computed)} computed, {len(study.skipped)} resumed")
    for row in study.rows:
        theory = "" if row.theory is None else f", Kac-Rice {row.theory.fraction:.3g}"
        typer.echo(f"{row.family:>11} n={row.n:<3} distinct {row.distinct:>3}, minima {row.minima:>3}, "
                   f"fraction {row.fraction_minima:.3g} [{row.fraction_ci[0]:.2g}, {row.fraction_ci[1]:.2g}], "
                   f"0.5^n {row.naive:.3g}{theory}")
    typer.echo(f"report: {report}")


def main() -> None:  # console-script entry point
    try:
        app()
    except SaddlescopeError as exc:  # anything that escaped a command's own handler
        Console(stderr=True).print(f"[bold red]error:[/bold red] {exc}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
