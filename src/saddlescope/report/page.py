"""The report's page: the verdict and every number it rests on, each said as what it is, the sections
around the figures, plotly.js (shared beside the page or inline), and the scripts that draw the figures
from a JSON island and record any error or layout problem in the DOM (where a headless browser's test
reads them)."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from saddlescope.atomic import atomic_write_text
from saddlescope.critical import CriticalPoint
from saddlescope.report.reading import plain_reading

__all__ = ["KIND_COLOURS", "PLOTLY_CONFIG", "PLOTLY_JS", "default_title", "fmt", "page", "write_plotly_js"]


KIND_COLOURS = {
    "minimum": "#1a7f37",
    "maximum": "#8250df",
    "saddle": "#cf222e",
    "degenerate": "#9a6700",
    "inconclusive": "#57606a",
    "not_critical": "#0969da",
}


PLOTLY_CONFIG = {"displaylogo": False, "responsive": True, "toImageButtonOptions": {"format": "png"}}


# Installed before anything else runs, so that an error anywhere after it (plotly.js included, or a
# resource that fails to load) is recorded in the DOM, where a headless browser's dump can read it.
_ERROR_CAPTURE = """(function () {
  var errors = [];
  window.__saddlescopeErrors = errors;
  function show() {
    document.documentElement.setAttribute("data-js-errors", String(errors.length));
    var box = document.getElementById("js-errors");
    if (box) { box.textContent = errors.join("\\n"); box.hidden = errors.length === 0; }
  }
  function record(message) { errors.push(String(message)); show(); }
  window.onerror = function (message, source, line) {
    record("error: " + message + " (" + (source || "inline") + ":" + (line || 0) + ")");
  };
  window.addEventListener("error", function (event) {
    if (event.target && event.target !== window) {
      record("failed to load: " + (event.target.src || event.target.href || event.target.tagName));
    }
  }, true);
  window.addEventListener("unhandledrejection", function (event) {
    var reason = event.reason;
    record("unhandled rejection: " + (reason && (reason.stack || reason.message) || reason));
  });
  document.addEventListener("DOMContentLoaded", show);
  show();
})();"""


# Draws every figure from the JSON island and marks the body once all are drawn.
_RENDER = """(function () {
  var figures = JSON.parse(document.getElementById("figure-data").textContent);
  var config = JSON.parse(document.getElementById("plotly-config").textContent);
  var jobs = figures.map(function (f) {
    return Plotly.newPlot(f.id, f.figure.data, f.figure.layout, config);
  });
  Promise.all(jobs).then(function () {
    document.body.setAttribute("data-layout-problems", JSON.stringify(layoutProblems()));
    document.body.setAttribute("data-plots-rendered", String(jobs.length));
  });

  // What a reader would see as broken, measured on the rendered SVG (the 3-D scene is WebGL and not
  // covered): tick labels of one axis overlapping each other, an axis title over tick labels, and
  // text outside its figure (clipped).
  function overlap(a, b) {
    return a.left < b.right - 1 && b.left < a.right - 1 && a.top < b.bottom - 1 && b.top < a.bottom - 1;
  }
  function boxes(nodes) {
    return Array.prototype.map.call(nodes, function (t) { return {text: t.textContent, r: t.getBoundingClientRect()}; })
      .filter(function (b) { return b.r.width > 0 && b.r.height > 0; });
  }
  function layoutProblems() {
    var problems = [];
    document.querySelectorAll(".plot").forEach(function (plot) {
      var frame = plot.getBoundingClientRect();
      var ticks = [];
      plot.querySelectorAll("g.xaxislayer-above, g.yaxislayer-above").forEach(function (layer) {
        var labels = boxes(layer.querySelectorAll("text"));
        for (var i = 0; i < labels.length; i++) for (var j = i + 1; j < labels.length; j++)
          if (overlap(labels[i].r, labels[j].r))
            problems.push(plot.id + ": tick labels overlap: " + labels[i].text + " / " + labels[j].text);
        ticks = ticks.concat(labels);
      });
      boxes(plot.querySelectorAll("g.g-xtitle text, g.g-ytitle text, g[class^='g-x'][class$='title'] text, " +
                                  "g[class^='g-y'][class$='title'] text")).forEach(function (title) {
        ticks.forEach(function (tick) {
          if (overlap(title.r, tick.r)) problems.push(plot.id + ": axis title over tick labels: " + title.text);
        });
      });
      var labels = boxes(plot.querySelectorAll("g.annotation text, g.g-gtitle text"));
      for (var a = 0; a < labels.length; a++) for (var b = a + 1; b < labels.length; b++)
        if (overlap(labels[a].r, labels[b].r))
          problems.push(plot.id + ": labels overlap: " + labels[a].text + " / " + labels[b].text);
      boxes(plot.querySelectorAll("svg text")).forEach(function (b) {
        if (b.r.left < frame.left - 1 || b.r.right > frame.right + 1 || b.r.top < frame.top - 1 ||
            b.r.bottom > frame.bottom + 1) problems.push(plot.id + ": text outside the figure: " + b.text);
      });
    });
    return problems.filter(function (p, i, all) { return all.indexOf(p) === i; });
  }
})();"""


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1100px;
       padding: 1rem 1.5rem 3rem; color: #1f2328; }
h1 { font-size: 1.5rem; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .3rem; margin-top: 2rem; }
.badge { display: inline-block; color: white; border-radius: 1rem; padding: .2rem .9rem; font-weight: 600;
         font-size: 1.2rem; }
.reason { margin: .6rem 0 1rem; }
#reading p { font-size: 1.08rem; margin: .5rem 0; max-width: 60rem; }
table { border-collapse: collapse; margin: .5rem 0; } td, th { padding: .2rem .8rem .2rem 0; text-align: left;
        vertical-align: top; } th { color: #57606a; font-weight: 500; }
td.num { font-variant-numeric: tabular-nums; }
.ok { color: #1a7f37; } .bad { color: #cf222e; } .note { color: #57606a; }
pre#js-errors { color: #cf222e; background: #ffebe9; padding: .5rem; }
.plot { min-height: 200px; }
code { background: #f6f8fa; padding: 0 .2rem; }
"""


def fmt(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


def default_title(cp: CriticalPoint) -> str:
    return f"saddlescope report: {cp.kind.replace('_', ' ')} ({cp.n_params:,} parameters)"


def _rows(items: list[tuple[str, str]]) -> str:
    return "\n".join(f"<tr><th>{html.escape(k)}</th><td class=num>{v}</td></tr>" for k, v in items)


def _quantity_cell(c: dict[str, Any], name: str, spec: str = ".6g", span_id: str | None = None) -> str:
    """A number with what it is (``CriticalPoint.quantities``): exact, a bound and its side, an
    interval, or an estimate with its error; the bare value for an older report without them."""
    value = f"<span id={span_id}>{fmt(c[name], spec)}</span>" if span_id else fmt(c[name], spec)
    q = (c.get("quantities") or {}).get(name)
    if q is None:
        return value
    basis = f" <span class=note>({html.escape(q['basis'])})</span>" if q["basis"] else ""
    status = q["is"]
    if status == "exact":
        err = "" if q["error"] is None else f" &plusmn; {fmt(q['error'], '.2g')}"
        return f"{value}{err}{basis}"
    if status == "upper_bound":
        return f"&le; {value} <b>(an upper bound)</b>{basis}"
    if status == "lower_bound":
        return f"&ge; {value} <b>(a lower bound)</b>{basis}"
    if status == "interval":
        return f"{value}, in [{fmt(q['low'], spec)}, {fmt(q['high'], spec)}]{basis}"
    return (f"{value} &plusmn; {fmt(q['error'], '.3f')} <b>(an estimate)</b>, in "
            f"[{fmt(q['low'], '.4f')}, {fmt(q['high'], '.4f')}]{basis}")


def _counts_cell(c: dict[str, Any], tol: dict[str, Any]) -> str:
    """Integer counts where they were counted; fractions with their interval where estimated."""
    if c["n_negative"] is not None:
        return (f"{c['n_negative']} negative, {c['n_zero']} zero, {c['n_positive']} positive of "
                f"{c['n_params']:,} (counted; zero: |lambda| &le; {fmt(tol['zero_threshold'], '.3g')})")
    q = c.get("quantities") or {}
    if "negative" not in q:
        return f"not estimated ({c['n_params']:,} parameters)"
    parts = [f"{name} {fmt(q[name]['value'], '.3f')} [{fmt(q[name]['low'], '.3f')}, {fmt(q[name]['high'], '.3f')}]"
             for name in ("negative", "zero", "positive")]
    return f"fractions of {c['n_params']:,}: " + ", ".join(parts) + " (estimates, not counts)"


def _header(payload: dict[str, Any]) -> str:
    """The verdict and every number it rests on."""
    c = payload["critical_point"]
    tol = c["tolerances"]
    colour = KIND_COLOURS.get(c["kind"], "#57606a")
    critical = c["grad_norm"] <= tol["grad_tol"]
    grad = (f"{fmt(c['grad_norm'], '.3g')} <span class={'ok' if critical else 'bad'}>"
            f"{'&le;' if critical else '&gt;'} grad_tol {fmt(tol['grad_tol'], '.3g')}</span>")
    items = [
        ("loss", fmt(c["loss"], ".6g")),
        ("gradient norm", grad),
        ("lambda_min", _quantity_cell(c, "lambda_min", span_id="lambda-min")),
        ("lambda_max", _quantity_cell(c, "lambda_max", span_id="lambda-max")),
    ]
    est = c["index_estimate"]
    if est is None:
        items += [("min ratio", fmt(c["min_ratio"], ".4f")), ("index", fmt(c["index"], ".4f"))]
    elif not est.get("resolved", True) and "zero" in (c.get("quantities") or {}):
        # One probe that proved the spectrum unresolved: intervals, no standard error to quote.
        q = c["quantities"]
        items += [
            ("min ratio", f"in [0, {fmt(q['min_ratio']['high'], '.4f')}] (fraction above +delta; not resolved)"),
            ("index", f"in [0, {fmt(q['index']['high'], '.4f')}] (fraction below -delta; not resolved)"),
            ("unresolved", (f"in [{fmt(q['zero']['low'], '.4f')}, 1] within &plusmn;delta, delta = "
                            f"{fmt(est['delta'], '.3g')} <span class=note>({html.escape(q['zero']['basis'])})</span>")),
        ]
    else:
        items += [
            ("min ratio", (f"{fmt(est['min_ratio'], '.4f')} &plusmn; {fmt(est['min_ratio_error'], '.3f')} "
                           "(fraction above +delta)")),
            ("index", f"{fmt(est['value'], '.4f')} &plusmn; {fmt(est['error'], '.3f')} (fraction below -delta)"),
            ("unresolved", (f"{fmt(est['within'], '.4f')} (stderr {fmt(est['within_stderr'], '.2g')}) "
                            f"within &plusmn;delta, delta = {fmt(est['delta'], '.3g')} "
                            f"({est['n_probes']} probes x {est['steps']} steps)")),
        ]
    precision = c["precision"]
    items += [
        ("eigenvalues", _counts_cell(c, tol)),
        ("method", f"{html.escape(c['method'])}, resolved by {html.escape(c['resolved_by'])}, {c['hvp_count']} HVPs"),
        ("tolerances", (f"grad_tol {fmt(tol['grad_tol'], '.3g')}, rtol {fmt(tol['rtol'], '.3g')}, "
                        f"atol {fmt(tol['atol'], '.3g')}, zero threshold {fmt(tol['zero_threshold'], '.3g')}")),
        ("precision", (f"model {html.escape(precision['model'])}, eigensolver "
                       f"{html.escape(precision['eigensolver'])}, eigenvalue rounding "
                       f"{fmt(precision['eigenvalue_rounding'], '.3g')}")),
        ("mode, seed", f"{html.escape(c['mode'])}, seed {c['seed']} (report seed {payload['seed']})"),
    ]
    if c["probe"] is not None:
        p = c["probe"]
        items.append(("null-space probe", html.escape(
            f"null dimension {p['null_dim']}, {p['directions']} directions, largest decrease "
            f"{fmt(p['largest_decrease'], '.3g')}, largest increase {fmt(p['largest_increase'], '.3g')}, "
            f"{p['evaluations']} evaluations")))
    obj = payload["objective"]
    if obj is not None:
        described = ", ".join(f"{k}: {v}" for k, v in obj["description"].items())
        items.append(("objective", html.escape(f"{described}; {obj['n_params']:,} parameters, {obj['dtype']}")))
    if payload["command"]:
        items.append(("command", f"<code>{html.escape(payload['command'])}</code>"))
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in [*c["notes"], *payload["notes"]])
    return (
        f"<h1>{html.escape(payload['title'])}</h1>\n"
        f"<div id=verdict><span class=badge style='background:{colour}'>{html.escape(c['kind'])}</span> "
        f"<span class=note>(second-order test: {html.escape(c['curvature_kind'])})</span></div>\n"
        f"<div id=reading>{''.join(f'<p>{html.escape(line)}</p>' for line in plain_reading(c))}</div>\n"
        f"<p class=reason id=reason><span class=note>Why:</span> {html.escape(c['reason'])}</p>\n"
        f"<table id=summary>{_rows(items)}</table>\n"
        + (f"<h3>Notes</h3><ul id=notes>{notes}</ul>\n" if notes else "")
    )


def _escape_section(payload: dict[str, Any]) -> str:
    escape = payload["escape"]
    if escape is None:
        return "<p class=note>No escape direction: no negative curvature (or decrease) was found.</p>"
    curvature = escape["curvature"]
    what = (f"unit eigenvector of negative curvature, u<sup>T</sup>Hu = {fmt(curvature, '.6g')}: "
            f"L(&theta; + &epsilon;u) &asymp; L(&theta;) + &epsilon; g&middot;u + &frac12; "
            f"({fmt(curvature, '.4g')}) &epsilon;<sup>2</sup>"
            if curvature is not None else "direction of the largest loss decrease found by the null-space probe "
                                          "(higher than second order: no curvature to quote)")
    line = payload["landscape"]["escape"]
    slope = "" if line is None else f" Slope along it: g&middot;u = {fmt(line['slope'], '.3g')}."
    parts = [f"<p id=escape-curvature>{what}.{slope}</p>"]
    if escape["block_shares"]:
        parts.append("<table id=escape-shares><tr><th>block</th><th>parameters</th><th>share of |u|&sup2;</th></tr>"
                     + "".join(f"<tr><td>{html.escape(s['name'])}</td><td class=num>{s['n_params']:,}</td>"
                               f"<td class=num>{s['share']:.4f}</td></tr>" for s in escape["block_shares"])
                     + "</table>")
    parts.append("<table id=escape-components><tr><th>parameter</th><th>flat index</th><th>component of u</th></tr>"
                 + "".join(f"<tr><td>{html.escape(t['name'])}</td><td class=num>{t['index']}</td>"
                           f"<td class=num>{t['value']:+.4f}</td></tr>" for t in escape["top_components"])
                 + "</table>")
    return "\n".join(parts)


def _div(fig_id: str, ids: set[str]) -> str:
    return f"<div id='{fig_id}' class=plot></div>" if fig_id in ids else ""


PLOTLY_JS = "plotly.min.js"


def write_plotly_js(folder: Path) -> str:
    """plotly.js beside the page (kept when an identical copy is already there); returns its name."""
    from plotly.offline import get_plotlyjs

    path, code = folder / PLOTLY_JS, get_plotlyjs()
    if not (path.is_file() and path.stat().st_size == len(code.encode()) and path.read_text() == code):
        atomic_write_text(path, code)
    return PLOTLY_JS


def _plotly_script(payload: dict[str, Any]) -> str:
    """plotly.js: a script element loading the shared copy beside the page, or the library inline."""
    shared = payload["files"].get("plotly_js")
    if shared:
        return f"<script src='{html.escape(shared)}'></script>"
    from plotly.offline import get_plotlyjs

    return f"<script>{get_plotlyjs()}</script>"


def page(payload: dict[str, Any], figures: list[tuple[str, Any]]) -> str:
    """The HTML: error capture first, plotly.js (shared or inline), then sections; figures drawn from a
    JSON island."""
    import plotly.io as pio

    ids = {fig_id for fig_id, _ in figures}
    data = [{"id": fig_id, "figure": json.loads(pio.to_json(fig, validate=False))} for fig_id, fig in figures]
    notes = payload["notes"]
    spectrum_note = ("" if "spectrum" in ids or "density" in ids
                     else "<p class=note>No spectrum to show: the iterative path without the objective.</p>")
    why = "; ".join(n for n in notes if n.startswith("landscape")) or "landscape left out"
    landscape_note = "" if "surface" in ids else f"<p class=note>{html.escape(why)}.</p>"
    files = payload["files"]
    links = " &middot; ".join(f"<a href='{html.escape(name)}'>{html.escape(name)}</a>"
                              for name in [files["json"], *files["pngs"].values()])
    body = f"""
<pre id=js-errors hidden></pre>
<header>{_header(payload)}</header>
<section id=spectrum-section><h2>Spectrum</h2>{spectrum_note}{_div('spectrum', ids)}{_div('density', ids)}</section>
<section id=landscape-section><h2>Landscape</h2>{landscape_note}{_div('surface', ids)}{_div('contour', ids)}</section>
<section id=escape-section><h2>Escape direction</h2>{_div('escape-slice', ids)}{_escape_section(payload)}{_div('escape-blocks', ids)}</section>
{"<section id=blocks-section><h2>Per-block curvature</h2>" + _div('blocks', ids) + "</section>" if 'blocks' in ids else ""}
<footer><h2>Files</h2><p>{links} (every number on this page is in {html.escape(files['json'])})</p></footer>
"""
    # "</" inside a script element would end it early; "<\\/" is the same JSON string.
    island = json.dumps(data).replace("</", "<\\/")
    return (
        "<!DOCTYPE html>\n<html lang=en data-js-errors=0>\n<head>\n<meta charset='utf-8'>\n"
        f"<script>{_ERROR_CAPTURE}</script>\n"
        f"<title>{html.escape(payload['title'])}</title>\n"
        "<meta name=viewport content='width=device-width, initial-scale=1'>\n"
        f"<style>{_CSS}</style>\n"
        f"{_plotly_script(payload)}\n"
        f"</head>\n<body data-plots-expected={len(figures)}>\n{body}\n"
        f"<script type='application/json' id=figure-data>{island}</script>\n"
        f"<script type='application/json' id=plotly-config>{json.dumps(PLOTLY_CONFIG)}</script>\n"
        f"<script>{_RENDER}</script>\n</body>\n</html>\n"
    )
