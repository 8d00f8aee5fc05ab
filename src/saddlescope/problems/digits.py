"""A small MLP on scikit-learn's digits (1,797 8x8 images shipped with the package: no download)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saddlescope.errors import InvalidInputError
from saddlescope.objective import Objective

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "gelu": nn.GELU, "softplus": nn.Softplus}


@dataclass
class DigitsProblem:
    """A model, its loss and the digits data, with the objective over them."""

    model: nn.Module
    loss_fn: nn.Module
    inputs: Tensor
    targets: Tensor
    objective: Objective


def load_digits_tensors(dtype: torch.dtype = torch.float64, n_samples: int | None = None) -> tuple[Tensor, Tensor]:
    """Digits as ``(inputs, targets)``: 64 pixel intensities scaled to [0, 1] and class labels."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    if n_samples is not None:
        x, y = x[:n_samples], y[:n_samples]
    return torch.tensor(x / 16.0, dtype=dtype), torch.tensor(y, dtype=torch.long)


def mlp(sizes: Sequence[int], activation: str = "tanh") -> nn.Sequential:
    """A fully connected network with the given layer sizes, e.g. ``(64, 32, 10)``."""
    if activation not in ACTIVATIONS:
        raise InvalidInputError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if len(sizes) < 2:
        raise InvalidInputError(f"sizes needs an input and an output size, got {list(sizes)}")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def digits_mlp(
    hidden: Sequence[int] = (32,),
    *,
    activation: str = "tanh",
    init_scale: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    n_samples: int | None = None,
) -> DigitsProblem:
    """A tanh MLP 64-32-10 (by default; 2,410 parameters) with cross-entropy on all digits.

    Args:
        hidden: hidden layer widths.
        init_scale: multiplies PyTorch's default initialisation (small values start on a plateau).
        seed: for the initialisation.
        n_samples: use only the first samples.
    """
    torch.manual_seed(seed)
    model = mlp((64, *hidden, 10), activation).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(init_scale)
    x, y = load_digits_tensors(dtype, n_samples)
    loss_fn = nn.CrossEntropyLoss()
    return DigitsProblem(model, loss_fn, x, y, Objective.from_model(model, loss_fn, (x, y), dtype=dtype))
