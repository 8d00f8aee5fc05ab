r"""Loss-landscape slices: the loss on a line or a plane through :math:`\theta`.

.. math::

    f(\alpha) = L(\theta + \alpha d), \qquad f(\alpha, \beta) = L(\theta + \alpha d_1 + \beta d_2).

The directions decide what the picture means:

- ``"random"``: Gaussian directions, filter-normalised (Li et al. 2018, "Visualizing the Loss
  Landscape of Neural Nets"): each filter (a row of a weight: one output unit or channel) of the
  direction is rescaled to the norm of the same filter in :math:`\theta`, so the picture does not
  depend on the network's scale invariances. Biases and other vectors are scaled the same way as a
  whole; a filter whose weights are zero (a network at the origin) keeps a unit-norm direction.
- ``"hessian"``: the eigenvectors of the largest and the most negative eigenvalue. At a saddle the
  plane then shows one curving up and one curving down: the saddle itself.
- your own: one or two flat tensors.

:func:`trajectory_pca` projects a training trajectory on its top two principal directions (taken
about its last point, as Li et al. do), and a slice on that plane draws the path over the surface.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from saddlescope.errors import InvalidInputError, NonFiniteLossError
from saddlescope.objective import Objective


@dataclass
class LandscapeSlice:
    """The loss on a line (1-D) or a plane (2-D) through ``theta``.

    Attributes:
        alphas: coordinates along the first direction; betas: along the second (None for 1-D).
        losses: shape ``(len(alphas),)`` or ``(len(betas), len(alphas))`` (rows: beta); NaN where the
            loss is not finite.
        directions: the directions, shape ``(1 or 2, n)``.
        labels: what each direction is (e.g. ``"lambda_min = -2"``).
        center_loss: :math:`L(\\theta)`.
        method: ``"vmap"`` (batched) or ``"loop"``.
    """

    alphas: Tensor
    betas: Tensor | None
    losses: Tensor
    directions: Tensor
    labels: list[str]
    center_loss: float
    kind: str
    method: str
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return 1 if self.betas is None else 2

    def to_dict(self) -> dict[str, Any]:
        def clean(t: Tensor) -> Any:
            return [None if v != v else v for v in t.tolist()] if t.dim() == 1 else [clean(r) for r in t]

        return {
            "dim": self.dim,
            "kind": self.kind,
            "labels": list(self.labels),
            "alphas": self.alphas.tolist(),
            "betas": None if self.betas is None else self.betas.tolist(),
            "losses": clean(self.losses),
            "center_loss": self.center_loss,
            "method": self.method,
            "seconds": self.seconds,
            "settings": dict(self.settings),
        }


def landscape(
    objective: Objective,
    theta: Tensor | None = None,
    *,
    directions: str | Tensor | Sequence[Tensor] = "random",
    dim: int = 2,
    span: float | tuple[float, float] = 1.0,
    resolution: int = 31,
    seed: int = 0,
    batch_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> LandscapeSlice:
    """The loss on a 1-D or 2-D slice through ``theta``.

    Args:
        directions: ``"random"`` (filter-normalised), ``"hessian"`` (the largest and the most negative
            eigenvector; 1-D: the most negative only), or one/two flat tensors (used as given).
        dim: 1 or 2 for the named kinds; given tensors decide it themselves.
        span: the coordinates run over ``[-span, span]`` (or ``[lo, hi]``) along each direction.
        resolution: points per direction.
        batch_size: points evaluated per vectorised call.
        progress: ``progress(done, total)`` after each batch of points.
    """
    theta = objective.theta0 if theta is None else objective.check_theta(theta)
    if not (isinstance(resolution, int) and resolution >= 2):
        raise InvalidInputError(f"resolution must be an integer >= 2, got {resolution!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    lo, hi = (-float(span), float(span)) if isinstance(span, (int, float)) else (float(span[0]), float(span[1]))
    if not hi > lo:
        raise InvalidInputError(f"span must be positive (or lo < hi), got {span!r}")
    dirs, labels, kind = _directions(objective, theta, directions, dim, seed)
    start = time.perf_counter()
    coords = torch.linspace(lo, hi, resolution, dtype=objective.dtype, device=objective.device)
    if dirs.shape[0] == 1:
        points = theta + coords[:, None] * dirs[0]
        betas = None
    else:
        grid_b, grid_a = torch.meshgrid(coords, coords, indexing="ij")
        points = theta + grid_a.reshape(-1, 1) * dirs[0] + grid_b.reshape(-1, 1) * dirs[1]
        betas = coords
    losses, method = evaluate_many(objective, points, batch_size=batch_size, progress=progress)
    if betas is not None:
        losses = losses.view(resolution, resolution)
    return LandscapeSlice(
        alphas=coords.cpu(), betas=None if betas is None else betas.cpu(), losses=losses.cpu(),
        directions=dirs, labels=labels, center_loss=float(objective.loss(theta)), kind=kind, method=method,
        seconds=time.perf_counter() - start,
        settings={"span": [lo, hi], "resolution": resolution, "seed": seed, "dim": int(dirs.shape[0])},
    )


def evaluate_many(
    objective: Objective,
    points: Tensor,
    *,
    batch_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Tensor, str]:
    """:math:`L` at each row of ``points``: vectorised with ``torch.vmap`` in batches, or one by one
    where the model cannot be vmapped (data-dependent control flow, in-place buffer updates).
    Returns the losses (NaN where not finite) and ``"vmap"`` or ``"loop"``."""
    total = points.shape[0]
    out = torch.empty(total, dtype=objective.dtype, device=objective.device)
    batched = torch.vmap(objective._total)
    method = "vmap"
    with torch.no_grad():
        for start in range(0, total, batch_size):
            chunk = points[start : start + batch_size]
            if method == "vmap":
                try:
                    out[start : start + len(chunk)] = batched(chunk)
                except (RuntimeError, ValueError, NotImplementedError):
                    method = "loop"
            if method == "loop":
                for i, point in enumerate(chunk):
                    try:
                        out[start + i] = objective._total(point)
                    except NonFiniteLossError:
                        out[start + i] = float("nan")
            # Sharded data: each rank computed its share of every loss; add the ranks' shares.
            out[start : start + len(chunk)] = objective._all_sum(out[start : start + len(chunk)], "landscape losses")
            if progress is not None:
                progress(min(start + batch_size, total), total)
    out[~torch.isfinite(out)] = float("nan")
    return out, method


def filter_normalized(objective: Objective, theta: Tensor, direction: Tensor) -> Tensor:
    """Rescale ``direction`` filter by filter to the norms of ``theta``'s filters (Li et al. 2018).

    A filter is a row of a parameter with two or more dimensions (an output unit of a linear layer,
    an output channel of a convolution); a parameter with fewer is one filter. A filter of ``theta``
    with zero norm leaves the direction's filter at unit norm, so the slice is not empty at the origin.
    """
    out = direction.clone()
    shapes = objective.param_shapes or [torch.Size([objective.n_params])]
    offset = 0
    for shape in shapes:
        size = int(torch.Size(shape).numel())
        rows = shape[0] if len(shape) >= 2 else 1
        d = out[offset : offset + size].view(rows, -1)
        t = theta[offset : offset + size].view(rows, -1)
        target = t.norm(dim=1, keepdim=True)
        target = torch.where(target > 0, target, torch.ones_like(target))
        d.mul_(target / d.norm(dim=1, keepdim=True).clamp_min(torch.finfo(d.dtype).tiny))
        offset += size
    return out


def _directions(
    objective: Objective, theta: Tensor, directions: Any, dim: int, seed: int
) -> tuple[Tensor, list[str], str]:
    n = objective.n_params
    if isinstance(directions, str):
        if dim not in (1, 2):
            raise InvalidInputError(f"dim must be 1 or 2, got {dim!r}")
        if directions == "random":
            gen = torch.Generator().manual_seed(seed)
            raw = torch.randn(dim, n, generator=gen, dtype=torch.float64).to(objective.device, objective.dtype)
            dirs = torch.stack([filter_normalized(objective, theta, d) for d in raw])
            return dirs, [f"random {i + 1} (filter-normalised)" for i in range(dim)], "random"
        if directions == "hessian":
            return (*_hessian_directions(objective, theta, dim, seed), "hessian")
        raise InvalidInputError(f"directions must be 'random', 'hessian' or tensors, got {directions!r}")
    given = [directions] if isinstance(directions, Tensor) and directions.dim() == 1 else list(directions)
    if not 1 <= len(given) <= 2:
        raise InvalidInputError(f"give one or two directions, got {len(given)}")
    checked = []
    for i, d in enumerate(given):
        if not isinstance(d, Tensor) or d.dim() != 1 or d.numel() != n:
            raise InvalidInputError(f"direction {i} must be a flat tensor of length {n}")
        if not bool(torch.isfinite(d).all()) or float(d.norm()) == 0:
            raise InvalidInputError(f"direction {i} must be finite and non-zero")
        checked.append(d.to(objective.device, objective.dtype))
    return torch.stack(checked), [f"direction {i + 1}" for i in range(len(checked))], "given"


def _hessian_directions(objective: Objective, theta: Tensor, dim: int, seed: int) -> tuple[Tensor, list[str]]:
    from saddlescope.curvature.lanczos import eigs
    from saddlescope.curvature.operator import HessianOperator

    if objective.n_params < 3:  # too small for a Krylov run: the exact pairs
        values, vectors = torch.linalg.eigh(objective.hessian(theta).double())
    else:
        result = eigs(HessianOperator(objective, theta), 1, "both", seed=seed)
        values, vectors = result.eigenvalues, result.eigenvectors
    low = vectors[:, 0].to(objective.dtype)
    high = vectors[:, -1].to(objective.dtype)
    low_label, high_label = f"lambda_min = {float(values[0]):.4g}", f"lambda_max = {float(values[-1]):.4g}"
    if dim == 1:
        return low.unsqueeze(0), [low_label]
    return torch.stack([low, high]), [low_label, high_label]


@dataclass
class TrajectoryProjection:
    """A trajectory's coordinates on its top two principal directions about its last point.

    Attributes:
        coords: shape ``(T, 2)``, the projection of each point minus the last.
        directions: shape ``(2, n)``, orthonormal.
        explained: the fraction of the trajectory's variance (about the last point) each direction holds.
        center: the last point.
    """

    coords: Tensor
    directions: Tensor
    explained: Tensor
    center: Tensor

    def to_dict(self) -> dict[str, Any]:
        return {"coords": self.coords.tolist(), "explained": self.explained.tolist()}


def trajectory_pca(points: Tensor | Sequence[Tensor]) -> TrajectoryProjection:
    """Project a training trajectory (the parameter vectors, in order) on its top-2 PCA plane.

    Li et al. (2018) show that random directions miss the path (in high dimension they are nearly
    orthogonal to it); the principal directions of :math:`\\theta_i - \\theta_T` hold most of its motion.
    """
    stack = torch.stack(list(points)) if not isinstance(points, Tensor) else points
    if stack.dim() != 2 or stack.shape[0] < 3:
        raise InvalidInputError(f"need at least 3 points of one flat length, got shape {tuple(stack.shape)}")
    center = stack[-1]
    moves = (stack - center).double()
    _, sing, vh = torch.linalg.svd(moves, full_matrices=False)
    if float(sing[1]) == 0:
        raise InvalidInputError("the trajectory moves along fewer than two directions: nothing to project on a plane")
    directions = vh[:2]
    return TrajectoryProjection(
        coords=moves @ directions.T,
        directions=directions.to(stack.dtype),
        explained=(sing[:2] ** 2 / (sing**2).sum()),
        center=center,
    )
