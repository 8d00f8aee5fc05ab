"""Saddle-aware optimizers: ``torch.optim.Optimizer`` subclasses driven by the closure alone.

Each takes ``step(closure)`` exactly as ``torch.optim.LBFGS`` does::

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)

- :class:`PerturbedGD`: gradient descent with a random kick from a ball when the gradient is small
  (Jin et al. 2017).
- :class:`SaddleFreeNewton`: :math:`-\\eta V(|T| + \\delta I)^{-1}V^\\top g` in a Lanczos subspace
  (Dauphin et al. 2014).
- :class:`NegativeCurvatureDescent`: a step along the most negative curvature when the gradient is
  small, else a gradient step.

The curvature the last two need comes from extra closure calls (finite-difference Hessian-vector
products, :mod:`saddlescope.escape.closure_curvature`); ``state["closure_calls"]`` counts them all.
"""

from saddlescope.escape.negative_curvature import NegativeCurvatureDescent
from saddlescope.escape.perturbed_gd import PerturbedGD
from saddlescope.escape.saddle_free_newton import SaddleFreeNewton

__all__ = ["NegativeCurvatureDescent", "PerturbedGD", "SaddleFreeNewton"]
