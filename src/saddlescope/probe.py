r"""What the zero band hides: probing the null space of a degenerate point, and eigenvalues inside the
band that rounding cannot explain.

The second-order test counts an eigenvalue as zero when :math:`|\lambda| \le` ``rtol``
:math:`\cdot\max|\lambda| +` ``atol``. Two things then decide what :func:`saddlescope.analyze` says:

1. An eigenvalue inside the band but beyond the products' rounding
   (:func:`saddlescope.tolerances.precision_bound`), whose sign one more product confirms, rules out
   the extremum of the other sign (:class:`BandCurvature`): a -1e-12 eigenvalue at a critical point
   makes it a saddle even though the fall it implies is below the loss's rounding at any probe radius.
2. Otherwise the null space is probed (both signs, several radii). A straight line is not enough
   (Peano's surface :math:`y^2 - 3x^2y + 2x^4` rises along every line through 0 yet is a saddle), so
   at each probe point :math:`\theta' + t d` the loss is first minimised over the curved subspace
   (Newton steps with :math:`H`'s eigenpairs there): the probe follows the *reduced* function on the
   null directions. A change beyond first order that exceeds rounding noise proves "not a minimum"
   (or "not a maximum"); no curvature allowance is granted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saddlescope.objective import Objective

__all__ = ["BandCurvature", "ProbeResult", "band_curvature", "probe_null_space", "probe_verdict"]


@dataclass
class ProbeResult:
    """What probing the null space of a degenerate point found.

    Attributes:
        null_dim: number of eigenvalues counted as zero.
        directions: directions probed (each in both signs).
        complete: every null eigenvector was probed (besides random combinations), so a
            "minimum"/"maximum" from the probe covers the whole null space.
        found_decrease, found_increase: a significant change of that sign was seen.
        largest_decrease, largest_increase: the biggest significant changes of the loss.
        flat: no probe changed the loss significantly (e.g. a valley of minima).
        evaluations: loss/gradient evaluations spent.
        direction: unit displacement of the largest decrease (an escape direction), or None.
    """

    null_dim: int
    directions: int
    complete: bool
    found_decrease: bool
    found_increase: bool
    largest_decrease: float
    largest_increase: float
    flat: bool
    evaluations: int
    direction: Tensor | None = None

    def to_dict(self, vectors: bool = True) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in (
            "null_dim", "directions", "complete", "found_decrease", "found_increase",
            "largest_decrease", "largest_increase", "flat", "evaluations")}
        if vectors:
            out["direction"] = None if self.direction is None else self.direction.tolist()
        return out


def probe_verdict(result: ProbeResult, not_min: bool, not_max: bool) -> tuple[str, str]:
    """Combine what the probes saw with what the eigenvalues already rule out (``not_min``: a
    negative eigenvalue, or a confirmed one inside the zero band; ``not_max`` likewise)."""
    not_min = result.found_decrease or not_min
    not_max = result.found_increase or not_max
    radius = f"within the probed radii, null space of dimension {result.null_dim}"
    if not_min and not_max:
        what = "decrease" if result.found_decrease else "increase"
        size = result.largest_decrease if what == "decrease" else result.largest_increase
        return "saddle", f"degenerate; probing the null space found a loss {what} of {abs(size):.3g}"
    if not result.complete:
        return "degenerate", (
            f"{result.null_dim} zero eigenvalues, more than the probe covers; no decisive change "
            f"along {result.directions} random null directions"
        )
    if not_min:
        return "maximum", f"degenerate; the loss does not increase along the null directions ({radius})"
    flat = " and is flat" if result.flat else ""
    return "minimum", f"degenerate; the loss does not decrease along the null directions{flat} ({radius})"


@dataclass
class BandCurvature:
    """An eigenvalue inside the zero band but beyond rounding, checked by one product.

    The zero threshold decides which eigenvalues the second-order test counts as zero (and so which
    directions are probed). It is far above rounding (1e-9 against ~1e-14 of ``max|lambda|`` in
    float64), so an eigenvalue such as -1e-12 is both "zero" for the test and *resolvably* negative:
    the extremum of the other sign is then ruled out even when the fall it implies,
    ``0.5 * lambda * r**2``, is below the loss's rounding at every probed radius ``r``.

    At a point whose gradient is small but not zero, a tiny eigenvalue may be an artefact of being a
    gradient's length away from the critical point (a valley of minima seen from just beside it).
    So the curvature ``u^T H u`` along the eigenvector is recomputed by one Hessian-vector product
    at the Newton-corrected point ``theta - sum_i (v_i^T g / lambda_i) v_i`` (the curved eigenpairs
    only): it is the same point when ``g = 0``. The sign counts only when that product agrees.

    Attributes:
        eigenvalue: the eigenvalue from the dense eigendecomposition.
        curvature: ``u^T H u`` from the product, at the corrected point.
        direction: the unit eigenvector ``u``.
        correction: ``|theta_c - theta|``, the Newton correction's length (0 when ``g = 0``).
        rounding: the eigenvalues' rounding bound (:func:`saddlescope.tolerances.precision_bound`).
        confirmed: ``|curvature| > rounding`` with the eigenvalue's sign: a certificate.
        hvps: products spent (1).
    """

    eigenvalue: float
    curvature: float
    direction: Tensor
    correction: float
    rounding: float
    confirmed: bool
    hvps: int = 1

    def describe(self) -> str:
        where = "" if self.correction == 0 else f" at the Newton-corrected point ({self.correction:.2g} away)"
        return f"u^T H u = {self.curvature:.3g}{where}"


def band_curvature(
    objective: Objective, theta: Tensor, grad: Tensor, vals: Tensor, vecs: Tensor,
    threshold: float, rounding: float, sign: float,
) -> BandCurvature | None:
    """The most negative (``sign=-1``) or most positive (``+1``) eigenvalue when it lies inside the
    zero band yet beyond rounding, with its curvature confirmed by a product (see
    :class:`BandCurvature`); None when there is no such eigenvalue."""
    index = 0 if sign < 0 else -1
    value = float(vals[index])
    if not (rounding < sign * value <= threshold):
        return None
    u = vecs[:, index].to(theta.dtype)
    curved = vals.abs() > threshold
    basis = vecs[:, curved].to(theta.dtype)
    step = -(basis @ ((basis.T @ grad) / vals[curved].to(theta.dtype))) if basis.shape[1] else torch.zeros_like(theta)
    correction = float(step.norm())
    point = theta if correction == 0 else theta + step
    curvature = float(u.double() @ objective.hvp(point, u).double())
    return BandCurvature(value, curvature, u, correction, rounding, sign * curvature > rounding)


def band_reason(
    below: BandCurvature | None, above: BandCurvature | None, n_neg: int, n_pos: int,
    threshold: float, rounding: float,
) -> str:
    """Why a point with a confirmed eigenvalue inside the zero band is a saddle."""
    parts = []
    for band, sign_word, end, extremum, count in ((below, "negative", "lambda_min", "minimum", n_neg),
                                                  (above, "positive", "lambda_max", "maximum", n_pos)):
        if band is not None and band.confirmed:
            parts.append(
                f"{end} = {band.eigenvalue:.3g} lies inside the zero threshold {threshold:.3g} but beyond "
                f"the eigenvalues' rounding {rounding:.2g}, and a product confirms it ({band.describe()}): "
                f"{sign_word} curvature, so not a {extremum}"
            )
        elif count:
            parts.append(f"{count} {sign_word} eigenvalues beyond the zero threshold")
    return "; ".join(parts)


def band_note(below: BandCurvature | None, above: BandCurvature | None, rounding: float) -> str:
    """Say so when an eigenvalue beyond rounding was not confirmed by its product."""
    notes = [
        f"; {end} = {band.eigenvalue:.3g} is beyond rounding {rounding:.2g}, but {band.describe()} does "
        "not confirm its sign (an effect of the small gradient)"
        for band, end in ((below, "lambda_min"), (above, "lambda_max"))
        if band is not None and not band.confirmed
    ]
    return "".join(notes)


def probe_null_space(
    objective: Objective,
    theta: Tensor,
    loss0: float,
    eigenvalues: Tensor,
    eigenvectors: Tensor,
    threshold: float,
    radii: tuple[float, ...],
    *,
    grad: Tensor | None = None,
    n_random: int = 16,
    max_directions: int = 64,
    newton_steps: int = 40,
    seed: int = 0,
    skip_decrease: bool = False,
    skip_increase: bool = False,
) -> ProbeResult:
    """Probe the reduced loss along the null space of a degenerate point.

    Looking for a decrease (is it a minimum?) the loss is minimised over the positive-curvature
    subspace at each probe point; looking for an increase (a maximum?) it is maximised over the
    negative-curvature subspace. Only tests that can change the verdict are run: ``skip_decrease``
    (``skip_increase``) when the caller already knows the point is not a minimum (maximum). ``grad``
    is the gradient at ``theta`` if the caller has it.
    """
    null = eigenvalues.abs() <= threshold
    null_vecs = eigenvectors[:, null]
    null_dim = int(null.sum())
    complete = null_dim <= max_directions
    gen = torch.Generator(device="cpu").manual_seed(seed)
    directions: list[Tensor] = []
    if complete:
        directions.extend(null_vecs.T)
    n_comb = n_random if complete else max(n_random, max_directions)
    if null_dim > 1 or not complete:
        coeffs = torch.randn(n_comb, null_dim, generator=gen, dtype=torch.float64)
        combos = coeffs.to(null_vecs.dtype) @ null_vecs.T
        directions.extend(combos / combos.norm(dim=1, keepdim=True))
    has_pos = bool((eigenvalues > threshold).any())
    has_neg = bool((eigenvalues < -threshold).any())
    eps = torch.finfo(objective.dtype).eps
    scale = float(eigenvalues.abs().max())
    state = {"evals": 0}
    if grad is None:
        grad = objective.grad(theta)

    def search(sign: float) -> tuple[bool, float, Tensor | None, bool]:
        """Look for a significant fall of ``sign * loss`` beyond first order. Returns
        (found, largest change of the loss, displacement direction, every probe flat)."""
        sub = eigenvalues > threshold if sign > 0 else eigenvalues < -threshold
        basis, curv = eigenvectors[:, sub], (sign * eigenvalues[sub]).to(eigenvectors.dtype)
        # The reference is the reduced value at t = 0 (the reduction alone may lower it when the
        # gradient is small but not zero), and the reduced function's first-order term is taken
        # out: the probe asks about the higher-order shape, not about a gradient already judged
        # negligible (|grad| <= grad_tol).
        origin, _, landed_grad = _reduced(objective, theta, torch.zeros_like(theta), basis, curv, sign,
                                          newton_steps, state)
        # The reduced function's slope at t = 0 is the gradient where the reduction landed.
        slope_grad = grad if landed_grad is None else landed_grad
        best, best_dir, all_flat = 0.0, None, True
        for d in directions:
            for s in (1.0, -1.0):
                for r in radii:
                    value, disp, _ = _reduced(objective, theta, s * r * d, basis, curv, sign,
                                              newton_steps, state)
                    linear = sign * s * r * float(slope_grad @ d)
                    change = value - origin - linear  # change of sign * loss beyond first order
                    # The decision uses the loss's own rounding only: any allowance beyond it would
                    # let a small negative eigenvalue counted as zero pass for a minimum. The
                    # "flat" label may also forgive rounding on the scale of the curved terms.
                    noise = 64 * eps * (abs(origin) + abs(value) + abs(linear))
                    if abs(change) > noise + 64 * eps * 0.5 * scale * r * r:
                        all_flat = False
                    if abs(change) <= noise:
                        continue  # no detectable change at this radius: look further out
                    if change < 0 and change < best:
                        best, best_dir = change, disp / disp.norm()
                    break  # the smallest radius with a detectable change decides this direction
                if best_dir is not None:
                    return True, sign * best, best_dir, False  # one change settles this test
        return best_dir is not None, sign * best, best_dir, all_flat

    found_dec, dec, dec_dir, flat_min = (False, 0.0, None, True)
    found_inc, inc, flat_max = False, 0.0, True
    if not (has_neg or skip_decrease):  # could be a minimum: look for a decrease
        found_dec, dec, dec_dir, flat_min = search(+1.0)
    if not (has_pos or skip_increase):  # could be a maximum: look for an increase
        found_inc, inc, _, flat_max = search(-1.0)
    return ProbeResult(
        null_dim=null_dim,
        directions=len(directions),
        complete=complete,
        found_decrease=found_dec,
        found_increase=found_inc,
        largest_decrease=dec,
        largest_increase=inc,
        flat=flat_min and flat_max and not found_dec and not found_inc,
        evaluations=state["evals"],
        direction=dec_dir,
    )


def _reduced(
    objective: Objective,
    theta: Tensor,
    step: Tensor,
    basis: Tensor,
    curvature: Tensor,
    sign: float,
    newton_steps: int,
    state: dict[str, int],
) -> tuple[float, Tensor, Tensor | None]:
    """``min_w sign * L(theta + step + basis @ w)`` by Newton steps with the fixed curvatures.

    Only steps that lower the value are taken, so the result is always a real evaluated point.
    Returns the value, the displacement from ``theta`` and the gradient there (None when there is
    no subspace to minimise over and so no gradient was needed).
    """
    disp = step.clone()
    if basis.shape[1] == 0:
        state["evals"] += 1
        return sign * float(objective.loss(theta + disp)), disp, None
    loss, grad = objective.loss_and_grad(theta + disp)
    value = sign * float(loss)
    state["evals"] += 1
    eps = torch.finfo(objective.dtype).eps
    # Newton with the curvature at theta converges linearly at a rate O(|step|); it must run to
    # rounding level, since a reduction stopped early overestimates the value and hides decreases.
    for _ in range(newton_steps):
        move = -(basis @ ((sign * (basis.T @ grad)) / curvature))
        if float(move.norm()) <= eps * (1.0 + float((theta + disp).norm())):
            break
        improved = False
        for _ in range(6):
            trial_loss, trial_grad = objective.loss_and_grad(theta + disp + move)
            state["evals"] += 1
            trial = sign * float(trial_loss)
            if trial < value:
                disp, value, grad, improved = disp + move, trial, trial_grad, True
                break
            move = 0.5 * move
        if not improved:
            break
    return value, disp, grad
