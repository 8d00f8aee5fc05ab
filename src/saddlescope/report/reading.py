"""The verdict in plain words: what the numbers mean for the user's training, and what to try.

Built from the report's JSON (``CriticalPoint.to_dict()``), so the page, the notebook display and any
later reader of ``report.json`` say the same thing. Each reading names the numbers it rests on, with
what they are (an upper bound is called one; an estimate keeps its error bar).
"""

from __future__ import annotations

import math
from typing import Any


def _num(value: float | None, spec: str = ".3g") -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return format(value, spec)


def _lambda_min(c: dict[str, Any]) -> str:
    q = (c.get("quantities") or {}).get("lambda_min")
    if q is None or q["is"] == "exact":
        return f"lambda_min = {_num(c['lambda_min'])}"
    if q["is"] == "upper_bound":
        return f"lambda_min <= {_num(q['value'])} (a certified upper bound)"
    if q["is"] == "interval":
        return f"lambda_min in [{_num(q['low'])}, {_num(q['high'])}]"
    return f"lambda_min ~ {_num(q['value'])}"


def _index(c: dict[str, Any]) -> str:
    q = (c.get("quantities") or {}).get("index")
    if q is None:
        return "" if c["index"] is None or not math.isfinite(c["index"]) else f"{100 * c['index']:.1f}%"
    if q["is"] == "estimate":
        return f"about {100 * q['value']:.1f}% (+-{100 * q['error']:.1f}%, an estimate)"
    return f"{100 * q['value']:.1f}%"


def plain_reading(c: dict[str, Any]) -> list[str]:
    """Two or three sentences for the top of the report: what this point is, and what to try.

    Args:
        c: a verdict as JSON (:meth:`saddlescope.CriticalPoint.to_dict`).
    """
    kind = c["kind"]
    grad, grad_tol = c["grad_norm"], c["tolerances"]["grad_tol"]
    escape = c.get("escape_curvature")
    index = _index(c)
    share = f" ({index} of the Hessian's eigenvalues are negative)" if index else ""
    if kind == "not_critical":
        first = (f"Training has not reached a critical point: the gradient norm is {_num(grad)}, above the "
                 f"tolerance {_num(grad_tol)}, so the loss can still fall by plain gradient steps.")
        if escape is not None and escape < 0:
            return [first, (f"The Hessian has negative curvature here ({_lambda_min(c)}){share}: the loss curves "
                            "downward along the escape direction, so a slow phase now is gradient descent passing "
                            "near a saddle, not a minimum."),
                    "What to try: keep training; if progress is slow, a larger learning rate, momentum or Adam "
                    "cross such regions faster, and a step along the escape direction (ss.escape) leaves at once."]
        return [first, ("All curvature seen is non-negative: the point sits on a slope of a bowl or a flat "
                        "region. What to try: keep training, or raise the learning rate if steps are tiny.")]
    if kind == "saddle":
        how = ("a certified direction of negative curvature (one Rayleigh quotient proves it)"
               if c["resolved_by"] == "certificate" else "the eigenvalues")
        return [
            (f"This is a saddle point: the gradient has (nearly) vanished ({_num(grad)} <= {_num(grad_tol)}), yet "
             f"the loss still falls along some directions{share}; proved by {how}, {_lambda_min(c)}."),
            ("Gradient descent slows down here because the gradient vanishes, not because there is nowhere lower "
             "to go: a stall at this point is a saddle, not a local minimum."),
            ("What to try: step along the escape direction (ss.escape, or SaddleMonitor(action='escape') during "
             "training); or add noise (smaller batches, ss.optim.PerturbedGD), momentum or Adam, or a "
             "curvature-aware optimizer (ss.optim.SaddleFreeNewton, ss.optim.NegativeCurvatureDescent)."),
        ]
    if kind == "minimum":
        return [
            (f"This is a local minimum, to the stated tolerances: the gradient has vanished ({_num(grad)}) and every "
             "direction curves upward (or is flat and the loss does not fall along it)."),
            ("No small step lowers the loss. What to try: if the loss is not good enough, leave the basin: restart "
             "from another initialisation, train with more noise or a larger learning rate, or change the model "
             "or the data; if it is, training is done."),
        ]
    if kind == "maximum":
        return [f"This is a local maximum: every direction curves downward ({_lambda_min(c)}). Any step lowers the "
                "loss; gradient descent leaves at once with a perturbation."]
    if kind == "degenerate":
        return [
            ("The second-order test cannot decide: some curvature is zero to the tolerances, and probing along those "
             "flat directions did not settle it (see the reason)."),
            ("Such flat directions are common in networks (symmetries, dead units). What to try: analyse at a "
             "tighter tolerance or on the exact path, and watch whether training moves along them."),
        ]
    return [
        "The iterative eigensolver did not settle the verdict within its product budget (see the reason).",
        "What to try: raise max_hvps, or use the exact path on a model small enough for it.",
    ]
