"""Getting out of saddles: escape steps and saddle-aware optimizers."""

from saddlescope.escape.negative_curvature import NegativeCurvatureDescent
from saddlescope.escape.perturbed_gd import PerturbedGD
from saddlescope.escape.saddle_free_newton import SaddleFreeNewton
from saddlescope.escape.step import EscapeStep, escape

__all__ = ["EscapeStep", "NegativeCurvatureDescent", "PerturbedGD", "SaddleFreeNewton", "escape"]
