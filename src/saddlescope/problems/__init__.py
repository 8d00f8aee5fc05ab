"""Objectives with known answers: the seed toy, classic saddles, a linear network, a digits MLP."""

from saddlescope.problems.analytic import (
    SeedToyModel,
    monkey_saddle,
    peano_surface,
    rosenbrock,
    saddle_quadratic,
    seed_toy,
    seed_toy_model,
)
from saddlescope.problems.digits import DigitsProblem, digits_mlp, load_digits_tensors, mlp
from saddlescope.problems.linear_network import LinearCriticalPoint, TwoLayerLinear

__all__ = [
    "DigitsProblem",
    "LinearCriticalPoint",
    "SeedToyModel",
    "TwoLayerLinear",
    "digits_mlp",
    "load_digits_tensors",
    "mlp",
    "monkey_saddle",
    "peano_surface",
    "rosenbrock",
    "saddle_quadratic",
    "seed_toy",
    "seed_toy_model",
]
