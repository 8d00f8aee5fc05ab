"""Compact HTML for Jupyter (``_repr_html_``): the verdict first, then the numbers behind it.

Each renderer takes its result by duck typing (attribute names only) and imports nothing from the
package, so any layer may use it: :class:`~saddlescope.critical.CriticalPoint`,
:class:`~saddlescope.curvature.blocks.BlockReport`, the studies' results
(:class:`~saddlescope.experiments.min_ratio.MinRatioStudy`,
:class:`~saddlescope.experiments.prevalence.PrevalenceStudy`,
:class:`~saddlescope.experiments.race.RaceResult`) and the monitor's
:class:`~saddlescope.monitor.MonitorEvent` and :class:`~saddlescope.monitor.SaddleMonitor`. Every
string that comes from the user or the computation (block and problem names, reasons, notes,
messages) is HTML-escaped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from typing import Any

__all__ = [
    "block_report_html",
    "critical_point_html",
    "min_ratio_study_html",
    "monitor_event_html",
    "prevalence_study_html",
    "race_result_html",
    "saddle_monitor_html",
]

# What each verdict means, in a few words (CriticalPoint.kind).
VERDICT_WORDS = {
    "minimum": "local minimum",
    "maximum": "local maximum",
    "saddle": "saddle point",
    "degenerate": "degenerate: the second-order test is inconclusive",
    "inconclusive": "inconclusive: the eigensolver did not settle it",
    "not_critical": "not a critical point",
}
# One small style block per render, scoped to the class (inline styles on every cell would be
# most of the page for a race table).
_STYLE = (
    "<style>.saddlescope{font-family:sans-serif;font-size:0.9em;line-height:1.35}"
    ".saddlescope table{border-collapse:collapse;margin-top:0.3em}"
    ".saddlescope td,.saddlescope th{padding:1px 8px;text-align:left;border-bottom:1px solid #ddd}"
    ".saddlescope tbody th{font-weight:normal;color:#555}.saddlescope .aside{color:#555;margin:0.2em 0}"
    ".saddlescope tr.total td{font-weight:bold}</style>"
)


# ---------------------------------------------------------------------------------------- pieces
def _text(value: Any) -> str:
    return escape(str(value), quote=True)


def _num(value: Any, fmt: str = ".4g") -> str:
    """A number for a table cell; "-" for None."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return _text(value)
        return format(value, fmt) if isinstance(value, float) else str(value)
    try:
        return format(float(value), fmt)  # a 0-d tensor or numpy scalar
    except (TypeError, ValueError):
        return _text(value)


def _headline(verdict: str, detail: str = "") -> str:
    """The verdict line: the verdict in bold, then its reason (both escaped)."""
    line = f"<strong>{_text(verdict)}</strong>"
    if detail:
        line += f" &mdash; {_text(detail)}"
    return f"<p>{line}</p>"


def _rows(rows: Iterable[tuple[str, str]]) -> str:
    """A two-column table; values are already HTML (numbers from :func:`_num` or escaped text)."""
    body = "".join(f"<tr><th>{_text(name)}</th><td>{value}</td></tr>" for name, value in rows)
    return f"<table><tbody>{body}</tbody></table>"


def _grid(header: Sequence[str], rows: Iterable[Sequence[str]], bold_last: bool = False) -> str:
    """A table with a header; cells are already HTML."""
    rows = list(rows)
    head = "".join(f"<th>{_text(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        total = " class=\"total\"" if bold_last and i == len(rows) - 1 else ""
        body.append(f"<tr{total}>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _notes(notes: Iterable[Any]) -> str:
    items = "".join(f"<li>{_text(n)}</li>" for n in notes)
    return f"<ul class=\"aside\">{items}</ul>" if items else ""


def _box(*parts: str) -> str:
    return f"{_STYLE}<div class=\"saddlescope\">{''.join(parts)}</div>"


def _counts(counts: Mapping[str, Any] | None) -> str:
    if not counts:
        return "-"
    return _text(", ".join(f"{n} {name}" for name, n in counts.items()))


# ---------------------------------------------------------------------------------------- verdicts
def critical_point_html(point: Any) -> str:
    """A :class:`~saddlescope.critical.CriticalPoint`: verdict and reason, then loss, gradient,
    extreme eigenvalues, counts or estimates, the method and its cost."""
    kind = str(point.kind)
    words = VERDICT_WORDS.get(kind, kind)
    if kind == "not_critical" and getattr(point, "curvature_kind", None) in ("saddle", "maximum"):
        words += ", with negative curvature: gradient descent is crawling past a saddle"
    head = _headline(f"{kind}: {words}", str(point.reason))
    rows: list[tuple[str, str]] = [
        ("loss", _num(point.loss, ".6g")),
        ("|grad|", _num(point.grad_norm, ".3g")),
        ("lambda_min", _num(point.lambda_min)),
        ("lambda_max", _num(point.lambda_max)),
    ]
    tolerances = getattr(point, "tolerances", None)
    zero = getattr(tolerances, "zero_threshold", None)
    if point.n_negative is not None:
        counts = (f"{_num(point.n_negative)} negative / {_num(point.n_zero)} zero / {_num(point.n_positive)} positive "
                  f"(zero: |lambda| &le; {_num(zero, '.2g')})")
        rows.append(("eigenvalues", counts))
    rows.append(("min ratio / index", f"{_num(point.min_ratio)} / {_num(point.index)}"))
    rows.append(("escape direction", "yes" if point.escape_direction is not None else "none"))
    if getattr(point, "escape_curvature", None) is not None:
        rows.append(("its curvature", _num(point.escape_curvature)))
    method = f"{_text(point.method)}, {_num(point.hvp_count)} HVPs, n = {_num(point.n_params)}"
    rows.append(("method", f"{method}, {_text(getattr(point, 'dtype', ''))}"))
    seconds = getattr(point, "seconds", None) or {}
    if "total" in seconds:
        rows.append(("time", f"{_num(seconds['total'], '.3g')} s"))
    return _box(head, _rows(rows), _notes(getattr(point, "notes", ())))


def block_report_html(report: Any) -> str:
    """A :class:`~saddlescope.curvature.blocks.BlockReport`: where negative curvature lives and which
    block is sharpest, then one row per block and the whole model's row."""
    rows = list(report.rows)
    negative = [r for r in rows if r.lambda_min < -r.delta]
    if negative:
        names = ", ".join(str(r.name) for r in negative)
        verdict = f"negative curvature in {len(negative)} of {len(rows)} blocks"
        detail = f"{names} (lambda_min below -delta, the block's zero band)"
    else:
        verdict = f"no negative curvature in any of {len(rows)} blocks"
        detail = "every block's lambda_min is within its zero band or above"
    if rows:
        sharpest = max(rows, key=lambda r: r.lambda_max)
        detail += f"; sharpest block: {sharpest.name} (lambda_max {sharpest.lambda_max:.4g})"
    table = _grid(
        ("block", "n", "lambda_min", "lambda_max", "trace", "index", "method"),
        [(_text(r.name), _num(r.n_params), _num(r.lambda_min), _num(r.lambda_max), _num(r.trace),
          _num(r.index, ".3f"), _text(r.method) + ("" if r.converged else " (not converged)"))
         for r in [*rows, report.whole]],
        bold_last=True,
    )
    cost = f"<p class=\"aside\">by {_text(report.by)}; {_num(report.hvp_count)} HVPs, {_num(report.seconds, '.3g')} s</p>"
    return _box(_headline(verdict, detail), table, cost, _notes(getattr(report, "notes", ())))


# ---------------------------------------------------------------------------------------- studies
def min_ratio_study_html(study: Any) -> str:
    """A :class:`~saddlescope.experiments.min_ratio.MinRatioStudy`: how many critical points were
    minima, then the summary's numbers."""
    s = study.summary
    kinds = dict(s.kinds)
    critical = sum(kinds.values())
    minima = kinds.get("minimum", 0)
    verdict = f"{minima} of {critical} critical points are minima"
    detail = (f"{s.n_runs} networks searched, {_num(s.fraction_critical, '.0%')} reached a critical point; "
              f"the largest min ratio at a saddle is {_num(s.largest_min_ratio_saddle, '.3f')}")
    rows = [
        ("verdicts", _counts(kinds)),
        ("search labels", _counts(s.labels)),
        ("fraction minima", _num(s.fraction_minima, ".3f")),
        ("largest min ratio (all / saddles)",
         f"{_num(s.largest_min_ratio, '.3f')} / {_num(s.largest_min_ratio_saddle, '.3f')}"),
        ("loss vs index (Pearson / Spearman)",
         f"{_num(s.pearson_loss_index, '.3f')} / {_num(s.spearman_loss_index, '.3f')}"),
        ("fit index = a + b loss", f"a {_num(s.fit_intercept)}, b {_num(s.fit_slope)}"),
        ("loss of minima / saddles", f"{_range(s.minimum_loss_range)} / {_range(s.saddle_loss_range)}"),
        ("runs computed / reused", f"{_num(len(study.computed))} / {_num(len(study.skipped))}"),
        ("seed, time", f"{_num(study.seed)}, {_num(study.seconds, '.3g')} s"),
    ]
    return _box(_headline(verdict, detail), _rows(rows))


def prevalence_study_html(study: Any) -> str:
    """A :class:`~saddlescope.experiments.prevalence.PrevalenceStudy`: the share of minima at each
    family's largest dimension, then one row per family and dimension."""
    rows = list(study.rows)
    largest: dict[str, Any] = {}
    for r in rows:
        if r.family not in largest or r.n > largest[r.family].n:
            largest[r.family] = r
    parts = [f"{f} n={r.n}: {r.minima} of {r.distinct}" for f, r in largest.items()]
    verdict = "minima among the distinct critical points found" if parts else "no critical points yet"
    detail = "; ".join(parts) + (" (at each family's largest dimension)" if parts else "")
    table = _grid(
        ("family", "n", "instances", "distinct", "minima", "fraction [95% CI]", "2^-n", "theory", "mean index"),
        [(_text(r.family), _num(r.n), _num(r.instances), _num(r.distinct), _num(r.minima),
          f"{_num(r.fraction_minima, '.3f')} [{_num(r.fraction_ci[0], '.3f')}, {_num(r.fraction_ci[1], '.3f')}]",
          _num(r.naive, ".3g"), _num(getattr(r.theory, "fraction", None), ".3g"), _num(r.mean_index, ".3f"))
         for r in rows],
    )
    return _box(_headline(verdict, detail), table)


def race_result_html(result: Any) -> str:
    """A :class:`~saddlescope.experiments.race.RaceResult`: the fastest escaper on each problem, then
    one row per (problem, optimizer) at its best learning rate."""
    fastest: dict[str, tuple[Any, Any]] = {}
    for s in result.summaries:
        best = s.best
        if best.escaped and (s.problem not in fastest or best.rank_key() < fastest[s.problem][1].rank_key()):
            fastest[s.problem] = (s, best)
    parts = [f"{p}: {s.optimizer} ({_steps(b.steps_median, b.steps_median_censored)} steps, median)"
             for p, (s, b) in fastest.items()]
    problems = list(dict.fromkeys(s.problem for s in result.summaries))
    stuck = [p for p in problems if p not in fastest]
    detail = "; ".join(parts) + ("; " if parts and stuck else "") + (
        f"no optimizer escaped on {', '.join(stuck)}" if stuck else "")
    table = _grid(
        ("problem", "optimizer", "best lr", "escaped", "steps: median [IQR]", "final loss (median)"),
        [(_text(s.problem), _text(s.optimizer), _num(s.best.lr, "g"), f"{s.best.escaped}/{s.best.runs}",
          _steps_iqr(s.best), _num(s.best.final_loss_median, ".3g"))
         for s in result.summaries],
    )
    return _box(_headline("fastest escape", detail), table)


# ---------------------------------------------------------------------------------------- monitor
def monitor_event_html(event: Any) -> str:
    """A :class:`~saddlescope.monitor.MonitorEvent`: what was seen and done, then what it cost."""
    verdict = f"{event.kind} at step {event.step}"
    if event.verdict is not None:
        verdict += f": {event.verdict}"
    rows: list[tuple[str, str]] = [("action", _text(event.action)), ("loss", _num(event.loss, ".6g"))]
    if event.loss_before is not None:
        rows.append(("escape: loss before / after", f"{_num(event.loss_before, '.6g')} / {_num(event.loss_after, '.6g')}"))
    if event.step_size is not None:
        rows.append(("escape: step", _num(event.step_size, ".3g")))
    if event.kind == "stall":
        cost = f"{_num(event.seconds, '.3g')} s, {_num(event.hvps)} HVPs, {_num(event.loss_evaluations)} loss evaluations"
        rows.append(("cost", cost))
    return _box(_headline(verdict, str(event.message)), _rows(rows))


def saddle_monitor_html(monitor: Any) -> str:
    """A :class:`~saddlescope.monitor.SaddleMonitor`: the latest event first, then every event and
    what the monitor has spent."""
    events = list(monitor.events)
    steps = monitor.detector.step
    if events:
        last = events[-1]
        verdict = f"{len(events)} events in {steps} steps; latest: {last.kind} at step {last.step}"
        verdict += f" ({last.verdict}, {last.action})" if last.verdict is not None else f" ({last.action})"
    else:
        verdict = f"no events in {steps} steps"
    spent = monitor.spending
    detail = (f"{spent.analyses} analyses, {spent.escapes} escapes, {spent.hvps} HVPs; monitor "
              f"{spent.monitor_seconds:.3g} s over {spent.training_seconds:.3g} s of training")
    table = _grid(
        ("step", "kind", "verdict", "action", "loss", "seconds", "HVPs"),
        [(_num(e.step), _text(e.kind), _text(e.verdict or "-"), _text(e.action), _num(e.loss, ".6g"),
          _num(e.seconds, ".3g"), _num(e.hvps)) for e in events[-20:]],
    ) if events else ""
    return _box(_headline(verdict, detail), table)


# ---------------------------------------------------------------------------------------- helpers
def _range(span: Sequence[float]) -> str:
    low, high = span
    return "-" if low is None or (isinstance(low, float) and math.isnan(low)) else f"{_num(low)}..{_num(high)}"


def _steps(value: int, censored: bool) -> str:
    return f"&gt;{value}" if censored else str(value)


def _steps_iqr(row: Any) -> str:
    """``median [q25-q75]`` of a race row, censored quantiles as ``>cap``."""
    median = _steps(row.steps_median, row.steps_median_censored)
    return (f"{median} [{_steps(row.steps_q25, row.steps_q25_censored)}-"
            f"{_steps(row.steps_q75, row.steps_q75_censored)}]")
