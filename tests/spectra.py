"""Test helper: symmetric operators with a planted spectrum."""

import torch

import saddlescope as ss


def planted(values, seed=0):
    """``Q diag(values) Q^T`` for a random orthogonal ``Q``, as a DenseOperator."""
    gen = torch.Generator().manual_seed(seed)
    n = len(values)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    a = q @ torch.diag(torch.as_tensor(values, dtype=torch.float64)) @ q.T
    return ss.DenseOperator(0.5 * (a + a.T))
