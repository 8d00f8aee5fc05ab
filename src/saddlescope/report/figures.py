"""The report's interactive figures (plotly): the spectrum in two binnings, the SLQ density with the
Ritz values, the loss surface and contours on the plane of the extreme eigenvectors, the loss along the
escape direction against its second-order model, and the per-block curvature. Each is drawn from the
numbers that also go into the report's JSON, so the page and the JSON cannot disagree."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from torch import Tensor

from saddlescope.critical import CriticalPoint
from saddlescope.landscape import LandscapeSlice

__all__ = ["interactive_figures"]


def interactive_figures(payload: dict[str, Any], cp: CriticalPoint,
                        plane: LandscapeSlice | None) -> list[tuple[str, Any]]:
    """The interactive plots, as ``(div id, plotly figure)`` in page order."""
    figures: list[tuple[str, Any]] = []
    if payload["spectrum"] is not None:
        figures.append(("spectrum", _spectrum_figure(payload["spectrum"], cp)))
    if payload["density"] is not None:
        figures.append(("density", _density_figure(payload["density"], cp)))
    if plane is not None:
        figures.append(("surface", _surface_figure(plane)))
        figures.append(("contour", _contour_figure(plane, cp)))
    if payload["landscape"]["escape"] is not None:
        figures.append(("escape-slice", _escape_figure(payload["landscape"]["escape"])))
    escape = payload["escape"]
    if escape is not None and len(escape["block_shares"]) > 1:
        figures.append(("escape-blocks", _escape_blocks_figure(escape["block_shares"])))
    if payload["blocks"] is not None:
        figures.append(("blocks", _blocks_figure(payload["blocks"])))
    return figures


def _go():
    import plotly.graph_objects as go

    return go


def _spectrum_figure(spectrum: dict[str, Any], cp: CriticalPoint):
    from plotly.subplots import make_subplots

    go = _go()
    tau = spectrum["zero_threshold"]
    fig = make_subplots(rows=2, cols=1, vertical_spacing=0.16, subplot_titles=(
        "all eigenvalues, linear bins (counts on a log axis)",
        f"bins geometric in |lambda| either side of the zero band |lambda| <= {tau:.3g}"))
    lin = spectrum["linear"]
    edges = np.array(lin["edges"])
    fig.add_trace(go.Bar(
        x=((edges[:-1] + edges[1:]) / 2).tolist(), y=lin["counts"], width=(edges[1:] - edges[:-1]).tolist(),
        customdata=np.stack([edges[:-1], edges[1:]], 1).tolist(), marker_color="#4c78a8", name="count",
        hovertemplate="[%{customdata[0]:.4g}, %{customdata[1]:.4g}): %{y}<extra></extra>"), row=1, col=1)
    fig.add_vrect(x0=-tau, x1=tau, fillcolor="grey", opacity=0.3, line_width=0, row=1, col=1)
    for value, name, colour, side in ((cp.lambda_min, "lambda_min", "#cf222e", "left"),
                                      (cp.lambda_max, "lambda_max", "#1a7f37", "right")):
        fig.add_vline(x=value, line_dash="dot", line_color=colour, row=1, col=1)
        _line_label(fig, value, f"{name} = {value:.4g}", side, colour, xref="x", yref="y domain")
    sym = spectrum["symlog"]
    sym_edges = sym["edges"]
    counts = sym["counts"]
    zero_bin = sym["zero_bin"]
    colours = ["#cf222e" if i < zero_bin else "grey" if i == zero_bin else "#1a7f37" for i in range(len(counts))]
    fig.add_trace(go.Bar(
        x=list(range(len(counts))), y=counts, marker_color=colours, name="count (geometric bins)",
        customdata=[[sym_edges[i], sym_edges[i + 1]] for i in range(len(counts))],
        hovertemplate="[%{customdata[0]:.3g}, %{customdata[1]:.3g}): %{y}<extra></extra>"), row=2, col=1)
    ticks = sorted({0, zero_bin, len(counts) - 1, *range(0, len(counts), max(1, len(counts) // 8))})
    fig.update_xaxes(tickvals=ticks, ticktext=[f"{sym_edges[i]:.2g}" for i in ticks],
                     title_text="lower edge of the bin (red: negative, grey: zero band, green: positive)", row=2, col=1)
    fig.update_xaxes(title_text="eigenvalue", row=1, col=1)
    fig.update_yaxes(type="log", dtick=1, title_text="count", row=1, col=1)
    fig.update_yaxes(type="log", dtick=1, title_text="count", row=2, col=1)
    fig.update_layout(height=720, showlegend=False, bargap=0.05,
                      title=f"Hessian spectrum: {spectrum['n']} eigenvalues ({cp.n_negative} negative, "
                            f"{cp.n_zero} zero, {cp.n_positive} positive)")
    return fig


def _line_label(fig: Any, x: float, text: str, side: str, colour: str, *, xref: str, yref: str) -> None:
    """A vertical line's label inside the plot, at its top, on the side away from the middle (labels
    above the plot collide with the title and with each other on narrow pages)."""
    fig.add_annotation(x=x, y=1, xref=xref, yref=yref, yanchor="top", xanchor="left" if side == "left" else "right",
                       xshift=4 if side == "left" else -4, text=text, showarrow=False, font={"size": 11, "color": colour},
                       bgcolor="rgba(255,255,255,0.7)")


def _density_figure(density: dict[str, Any], cp: CriticalPoint):
    go = _go()
    values = np.array(density["density"])
    peak = float(values.max()) if values.size else 1.0
    fig = go.Figure(go.Scatter(x=density["grid"], y=density["density"], mode="lines", name="SLQ density",
                               line_color="#4c78a8", hovertemplate="lambda %{x:.4g}: %{y:.3g}<extra></extra>"))
    est = cp.index_estimate
    if est is not None:
        fig.add_vrect(x0=-est.delta, x1=est.delta, fillcolor="grey", opacity=0.25, line_width=0)
        fig.add_annotation(x=0, y=0, xref="x", yref="y domain", yanchor="bottom", showarrow=False,
                           text=f"unresolved |lambda| <= delta = {est.delta:.3g}", font={"size": 11},
                           bgcolor="rgba(255,255,255,0.7)")
    for value, name, colour, side in ((cp.lambda_min, "lambda_min", "#cf222e", "left"),
                                      (cp.lambda_max, "lambda_max", "#1a7f37", "right")):
        fig.add_vline(x=value, line_dash="dot", line_color=colour)
        _line_label(fig, value, f"{name} = {value:.4g} ({cp.method})", side, colour, xref="x", yref="y domain")
    floor = max(peak * 1e-7, 1e-300)
    if cp.eigenvalues.numel() < cp.n_params:  # the iterative path's Ritz values, as a rug
        ritz = cp.eigenvalues.tolist()
        fig.add_trace(go.Scatter(x=ritz, y=[floor * 3] * len(ritz), mode="markers", name="Ritz values",
                                 marker={"symbol": "line-ns-open", "size": 14, "color": "#cf222e"},
                                 hovertemplate="Ritz value %{x:.6g}<extra></extra>"))
    fig.update_yaxes(type="log", dtick=1, range=[math.log10(floor), math.log10(max(peak, floor)) + 0.3],
                     title_text="density")
    fig.update_xaxes(title_text="eigenvalue")
    fig.update_layout(height=440, title=f"spectral density by stochastic Lanczos quadrature<br><sup>{density['hvp_count']} "
                                        f"HVPs, sigma = {density['sigma']:.3g}; extreme Ritz nodes "
                                        f"{density['lambda_min']:.4g}, {density['lambda_max']:.4g}</sup>")
    return fig


def _surface_figure(plane: LandscapeSlice):
    go = _go()
    z = _nan_to_none(plane.losses)
    assert plane.betas is not None
    fig = go.Figure(go.Surface(x=plane.alphas.tolist(), y=plane.betas.tolist(), z=z, colorscale="Viridis",
                               colorbar={"title": {"text": "loss"}}, name="loss"))
    fig.add_trace(go.Scatter3d(x=[0.0], y=[0.0], z=[plane.center_loss], mode="markers", name="theta",
                               marker={"size": 5, "color": "red"}))
    fig.update_layout(height=620, title="loss surface on the plane of the extreme eigenvectors",
                      margin={"l": 10, "r": 10, "b": 10, "t": 60},
                      scene={"xaxis_title": plane.labels[0], "yaxis_title": plane.labels[1], "zaxis_title": "loss",
                             "camera": {"eye": {"x": 1.9, "y": 1.9, "z": 1.2}},
                             "domain": {"x": [0.0, 0.9], "y": [0.05, 1.0]}})
    return fig


def _contour_figure(plane: LandscapeSlice, cp: CriticalPoint):
    go = _go()
    assert plane.betas is not None
    fig = go.Figure(go.Contour(x=plane.alphas.tolist(), y=plane.betas.tolist(), z=_nan_to_none(plane.losses),
                               colorscale="Viridis", ncontours=30, colorbar={"title": {"text": "loss"}}, name="loss"))
    fig.add_trace(go.Scatter(x=[0.0], y=[0.0], mode="markers", name=f"theta ({cp.kind})",
                             marker={"symbol": "x", "size": 12, "color": "red"}))
    fig.update_layout(height=520, title="loss contours (same plane)",
                      xaxis_title=plane.labels[0], yaxis_title=plane.labels[1])
    return fig


def _escape_figure(line: dict[str, Any]):
    go = _go()
    fig = go.Figure(go.Scatter(x=line["alphas"], y=line["delta_losses"], mode="lines+markers", name="L(theta + alpha u) - L(theta)",
                               hovertemplate="alpha %{x:.4g}: change %{y:.4g}<extra></extra>"))
    if line["quadratic_model"] is not None:
        fig.add_trace(go.Scatter(x=line["alphas"], y=line["quadratic_model"], mode="lines", line_dash="dash",
                                 name=f"second order: alpha g.u + alpha^2 (u^T H u) / 2, u^T H u = {line['curvature']:.4g}"))
    fig.add_hline(y=0.0, line_color="grey", line_width=1)
    fig.update_layout(height=420, title=f"loss change along the escape direction (L(theta) = {line['center_loss']:.6g})",
                      xaxis_title="alpha (distance along the unit vector u)", yaxis_title="loss change",
                      legend={"orientation": "h", "y": -0.25})
    return fig


def _escape_blocks_figure(shares: list[dict[str, Any]]):
    go = _go()
    fig = go.Figure(go.Bar(x=[s["share"] for s in shares], y=[f"{s['name']} ({s['n_params']:,})" for s in shares],
                           orientation="h", marker_color="#cf222e",
                           hovertemplate="%{y}: %{x:.4f} of |u|^2<extra></extra>"))
    fig.update_layout(height=160 + 28 * len(shares), title="share of the escape direction's |u|^2 in each block",
                      xaxis_title="share of |u|^2", xaxis_range=[0, 1])
    fig.update_yaxes(autorange="reversed")
    return fig


def _blocks_figure(blocks: dict[str, Any]):
    from plotly.subplots import make_subplots

    go = _go()
    rows = list(blocks["rows"])
    if blocks["whole"]["n_params"]:
        rows.append(blocks["whole"])
    names = [f"{r['name']} ({r['n_params']:,})" for r in rows]
    # As plot_blocks: magnitudes on a log axis down to 1e-6 of the largest; the sign is in the colour.
    peak = max([max(abs(r["lambda_max"]), abs(r["lambda_min"])) for r in rows] or [1.0]) or 1.0
    floor = 1e-6 * peak
    negative = [r["lambda_min"] < -max(r["delta"], floor) for r in rows]
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=("extreme eigenvalues of each diagonal block", "trace (with its interval)"))
    fig.add_trace(go.Bar(y=names, x=[max(r["lambda_max"], floor) for r in rows], orientation="h", name="lambda_max",
                         marker_color="#4c78a8", customdata=[r["lambda_max"] for r in rows],
                         hovertemplate="%{y}: lambda_max %{customdata:.4g}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Bar(y=names, x=[max(abs(r["lambda_min"]), floor) for r in rows], orientation="h",
                         name="|lambda_min| (red: negative)", marker_pattern_shape="/",
                         marker_color=["#cf222e" if neg else "#8c959f" for neg in negative],
                         customdata=[r["lambda_min"] for r in rows],
                         hovertemplate="%{y}: lambda_min %{customdata:.4g}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Bar(y=names, x=[r["trace"] for r in rows], orientation="h", name="trace", marker_color="#54a24b",
                         error_x={"type": "data", "symmetric": False,
                                  "array": [max(r["trace_high"] - r["trace"], 0.0) for r in rows],
                                  "arrayminus": [max(r["trace"] - r["trace_low"], 0.0) for r in rows]},
                         hovertemplate="%{y}: trace %{x:.4g}<extra></extra>"), row=1, col=2)
    fig.update_xaxes(type="log", dtick=1, title_text="magnitude", row=1, col=1)
    fig.update_xaxes(title_text="trace", row=1, col=2)
    fig.update_yaxes(autorange="reversed", row=1, col=1)
    fig.update_layout(height=200 + 45 * len(rows), barmode="group", title=f"Hessian blocks by {blocks['by']}",
                      legend={"orientation": "h", "y": -0.2})
    return fig


def _nan_to_none(values: Tensor) -> list[Any]:
    return [[None if math.isnan(v) else v for v in row] for row in values.double().tolist()]
