r"""Curvature from a training closure alone, shared by the saddle-aware optimizers.

The optimizers in :mod:`saddlescope.optim` see what ``torch.optim.LBFGS`` sees: the parameters and
a closure that zeroes the gradients, computes the loss, calls ``backward()`` and returns the loss.
Hessian-vector products come from central differences of gradients, two closure calls each:

.. math::

    H v \approx \frac{g(\theta + \epsilon v) - g(\theta - \epsilon v)}{2 \epsilon},
    \qquad
    \epsilon = \frac{\varepsilon_{\mathrm{mach}}^{1/3} \max(1, \|\theta\|)}{\|v\|}.

The truncation error is :math:`O(\epsilon^2)` (third derivatives) and the rounding error
:math:`O(\varepsilon_{\mathrm{mach}} / \epsilon)`; the cube root balances the two, for a relative
error near :math:`\varepsilon_{\mathrm{mach}}^{2/3}` (about 4e-11 in float64, 2e-5 in float32). On
a quadratic only the rounding remains.

Why not the package's double-backward engine (:class:`~saddlescope.objective.GradientGraph`)? The
closure runs ``backward()`` itself and keeps no graph, so differences of gradients are all a closure
offers. The closure must be deterministic (same data, no dropout) for the differences to mean
anything, as for LBFGS; BatchNorm in training mode updates its running statistics on every call.

The Krylov projection uses the package's one Lanczos step,
:func:`~saddlescope.curvature.lanczos.lanczos_step` (full reorthogonalisation, basis vectors as rows).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saddlescope.curvature.lanczos import lanczos_step
from saddlescope.errors import InvalidInputError

Closure = Callable[[], Any]

# Krylov vectors, projections and flat copies of theta and g are kept in float64 whatever the
# parameters' dtype: the projected eigenproblem is small, and the step is cast back on the way out.
WORK_DTYPE = torch.float64


def require_closure(closure: Closure | None, optimizer: str) -> Closure:
    """The closure, wrapped to run with gradients enabled (``step`` runs under ``no_grad``).

    Raises:
        InvalidInputError: ``closure`` is missing or not callable.
    """
    if closure is None or not callable(closure):
        raise InvalidInputError(
            f"{optimizer}.step needs a closure that re-evaluates the loss, as torch.optim.LBFGS does: "
            "def closure(): opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); return loss; "
            "then opt.step(closure)"
        )
    return torch.enable_grad()(closure)


def flat_grad(params: list[Tensor]) -> Tensor:
    """The parameters' ``.grad`` as one flat ``float64`` vector; a missing gradient counts as zero."""
    return torch.cat(
        [
            torch.zeros(p.numel(), dtype=WORK_DTYPE, device=p.device)
            if p.grad is None
            else p.grad.detach().reshape(-1).to(WORK_DTYPE)
            for p in params
        ]
    )


def _displace(params: list[Tensor], origin: list[Tensor], direction: Tensor, scale: float) -> None:
    """Set each parameter to ``origin + scale * direction`` (its slice of the flat ``direction``)."""
    offset = 0
    for p, start in zip(params, origin):
        n = p.numel()
        p.copy_(start + scale * direction[offset : offset + n].view_as(p).to(p.dtype))
        offset += n


def _finite_difference_eps(params: list[Tensor]) -> float:
    """:math:`\\varepsilon_{mach}^{1/3}` of the least precise parameter dtype."""
    eps = max(torch.finfo(p.dtype).eps for p in params)
    return eps ** (1.0 / 3.0)


class ClosureCurvature:
    """Loss, gradient and Hessian-vector products of a closure at the parameters' current values.

    Every product restores the parameters and their ``.grad`` exactly (from copies, not by
    stepping back), so the caller sees them as they were after :meth:`loss_and_grad`.

    Args:
        closure: zeroes the gradients, computes the loss, calls ``backward()``, returns the loss.
        params: the parameters, in the order of the flat vectors.
        fd_step: the length :math:`\\epsilon\\|v\\|` of the finite-difference displacement; default
            :math:`\\varepsilon_{mach}^{1/3} \\max(1, \\|\\theta\\|)`.

    Attributes:
        calls: closure calls made so far.
    """

    def __init__(self, closure: Closure, params: list[Tensor], fd_step: float | None = None) -> None:
        self.closure = closure
        self.params = params
        self.fd_step = fd_step
        self.calls = 0

    def loss_and_grad(self) -> tuple[Any, Tensor]:
        """Call the closure once: its return value and the flat ``float64`` gradient."""
        loss = self.closure()
        self.calls += 1
        return loss, flat_grad(self.params)

    def hvp(self, v: Tensor) -> Tensor:
        """:math:`Hv` by central differences of gradients (two closure calls), in ``float64``."""
        v_norm = float(v.norm())
        if v_norm == 0.0:
            return torch.zeros_like(v, dtype=WORK_DTYPE)
        origin = [p.detach().clone() for p in self.params]
        grads = [None if p.grad is None else p.grad.detach().clone() for p in self.params]
        step = self.fd_step
        if step is None:
            theta_norm = math.sqrt(sum(float(p.detach().to(WORK_DTYPE).pow(2).sum()) for p in origin))
            step = _finite_difference_eps(self.params) * max(1.0, theta_norm)
        eps = step / v_norm
        try:
            _displace(self.params, origin, v, eps)
            _, grad_plus = self.loss_and_grad()
            _displace(self.params, origin, v, -eps)
            _, grad_minus = self.loss_and_grad()
        finally:
            for p, start, grad in zip(self.params, origin, grads):
                p.copy_(start)
                p.grad = grad
        return (grad_plus - grad_minus) / (2.0 * eps)


def finite_difference_hvp(
    closure: Closure, params: Iterable[Tensor], v: Tensor, fd_step: float | None = None
) -> Tensor:
    """One Hessian-vector product of a closure's loss at the parameters' current values.

    Args:
        closure: as for ``torch.optim.LBFGS``; called twice (with gradients enabled).
        params: the parameters (several tensors are flattened in order).
        v: a flat vector with one entry per parameter element.
        fd_step: see :class:`ClosureCurvature`.

    Returns:
        :math:`Hv` as a flat ``float64`` vector; parameters and ``.grad`` are left as they were.
    """
    params = list(params)
    n = sum(p.numel() for p in params)
    if v.dim() != 1 or v.numel() != n:
        raise InvalidInputError(f"v must be a flat vector of length {n}, got shape {tuple(v.shape)}")
    with torch.no_grad():
        return ClosureCurvature(torch.enable_grad()(closure), params, fd_step).hvp(v.to(WORK_DTYPE))


@dataclass
class KrylovProjection:
    """An orthonormal Krylov basis :math:`V` (rows) and the projection :math:`T = V H V^\\top`.

    Attributes:
        basis: shape ``(m, n)``, orthonormal rows.
        projected: shape ``(m, m)``, symmetric.
        invariant: Lanczos broke down (the remainder vanished): ``span(V)`` is an invariant
            subspace of :math:`H` (to the accuracy of the products) and the run stopped early.
    """

    basis: Tensor
    projected: Tensor
    invariant: bool

    def ritz_pairs(self) -> tuple[Tensor, Tensor]:
        """Ritz values (ascending) and unit Ritz vectors (columns, shape ``(n, m)``)."""
        values, coords = torch.linalg.eigh(self.projected)
        vectors = self.basis.T @ coords
        return values, vectors / vectors.norm(dim=0, keepdim=True)


def krylov_projection(
    hvp: Callable[[Tensor], Tensor], start: Tensor, dim: int, breakdown_rtol: float
) -> KrylovProjection:
    """Lanczos from ``start`` for at most ``dim`` steps (capped at ``n``), one product per step.

    Args:
        hvp: :math:`v \\mapsto Hv` on flat ``float64`` vectors.
        start: a non-zero flat vector; the first basis vector is ``start / ||start||``.
        dim: the largest basis size.
        breakdown_rtol: stop when the remainder's norm is at most this times ``max |T_ij|``: with
            finite-difference products a smaller remainder is noise, not a new direction.
    """
    n = start.numel()
    size = min(dim, n)
    basis = torch.zeros(size, n, dtype=WORK_DTYPE, device=start.device)
    projected = torch.zeros(size, size, dtype=WORK_DTYPE, device=start.device)
    basis[0] = start.to(WORK_DTYPE) / start.norm()

    def apply(block: Tensor) -> Tensor:  # lanczos_step multiplies an (n, 1) block
        return hvp(block[:, 0])[:, None]

    scale = 0.0
    for j in range(size):
        beta = lanczos_step(apply, basis, projected, j)
        scale = max(scale, float(projected[: j + 1, j].abs().max()))
        if beta <= breakdown_rtol * scale:
            return KrylovProjection(basis[: j + 1], projected[: j + 1, : j + 1], invariant=True)
    return KrylovProjection(basis, projected, invariant=size == n)


def curvature_noise_floor(params: list[Tensor]) -> float:
    """Relative size below which a finite-difference curvature is indistinguishable from noise.

    Products carry a relative error near :math:`\\varepsilon^{2/3}`; the square root of the machine
    epsilon of the least precise parameter dtype sits above that with a margin.
    """
    return math.sqrt(max(torch.finfo(p.dtype).eps for p in params))


def seeded_generator(seed: int, draw: int) -> torch.Generator:
    """A CPU generator for the ``draw``-th random draw of an optimizer seeded with ``seed``.

    Derived with numpy's ``SeedSequence`` (independent streams for every ``(seed, draw)``), so an
    optimizer's randomness is two integers that ``state_dict`` carries, and the numbers are the same
    on every device.
    """
    entropy = np.random.SeedSequence([seed, draw]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(entropy))


def random_unit_vector(n: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """A direction uniform on the unit sphere of :math:`\\mathbb{R}^n` (``float64``)."""
    z = torch.randn(n, generator=generator, dtype=WORK_DTYPE)
    return (z / z.norm()).to(device)


def resolve_seed(seed: int | None) -> int:
    """``seed``, or one drawn from torch's global generator (so ``torch.manual_seed`` fixes it)."""
    if seed is None:
        return int(torch.randint(0, 2**62, (1,)).item())
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidInputError(f"seed must be a non-negative int or None, got {seed!r}")
    return seed


def check_number(name: str, value: Any, *, low: float = 0.0, strict: bool = True) -> None:
    """Raise :class:`InvalidInputError` unless ``value`` is a finite real ``> low`` (``>= low``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = value > low if strict else value >= low
    if not ok:
        relation = ">" if strict else ">="
        raise InvalidInputError(f"{name} must be a finite number {relation} {low:g}, got {value!r}")


def check_count(name: str, value: Any, *, low: int) -> None:
    """Raise :class:`InvalidInputError` unless ``value`` is an ``int >= low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidInputError(f"{name} must be an int >= {low}, got {value!r}")


class ClosureOptimizer(torch.optim.Optimizer):
    """What the saddle-aware optimizers share.

    - A closure is required (:func:`require_closure`).
    - Curvature couples all parameters, so every hyper-parameter but ``lr`` is one value for all
      param groups (a group may set its own ``lr``, which scales its slice of the gradient part of
      the step); :meth:`_check_hyper` validates a group.
    - The optimizer's state belongs to the whole problem, so it is kept, as in ``LBFGS``, under the
      first parameter, where ``state_dict`` carries it. Only ints, floats, bools and ``None`` go in
      it: ``load_state_dict`` would cast tensors to the parameter dtype and mangle strings.
    """

    def _check_hyper(self, group: dict[str, Any]) -> None:
        """Raise :class:`InvalidInputError` if a group's hyper-parameters are out of range."""
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self._check_hyper(merged)
        if self.param_groups:
            first = self.param_groups[0]
            differ = sorted(k for k in self.defaults if k != "lr" and merged[k] != first[k])
            if differ:
                raise InvalidInputError(
                    f"param groups may differ only in lr; {differ} must be the same in every group "
                    "(curvature couples all parameters)"
                )
        super().add_param_group(param_group)

    @property
    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _global_state(self, initial: dict[str, Any]) -> dict[str, Any]:
        """The problem-wide state, created from ``initial`` on first use."""
        state = self.state[self._params[0]]
        for key, value in initial.items():
            state.setdefault(key, value)
        return state

    def _add_flat(self, delta: Tensor, *, scale_by_lr: bool) -> None:
        """Add the flat ``delta`` to the parameters, each group's slice times its ``lr`` if asked."""
        offset = 0
        for group in self.param_groups:
            factor = group["lr"] if scale_by_lr else 1.0
            for p in group["params"]:
                n = p.numel()
                p.add_(delta[offset : offset + n].view_as(p).to(p.dtype), alpha=factor)
                offset += n
