"""Test helper: symmetric operators with a planted spectrum."""

import math

import torch

import saddlescope as ss


def planted(values, seed=0):
    """``Q diag(values) Q^T`` for a random orthogonal ``Q``, as a DenseOperator."""
    gen = torch.Generator().manual_seed(seed)
    n = len(values)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    a = q @ torch.diag(torch.as_tensor(values, dtype=torch.float64)) @ q.T
    return ss.DenseOperator(0.5 * (a + a.T))


def log_spaced_under_a_tiny_negative(n=1000, low=1e-8, negative=-1e-6):
    """``n - 1`` eigenvalues log-spaced from 1 down to ``low``, and one at ``negative``.

    The bottom's gap is about 1e-6 of the spread and the bulk is dense near it: Krylov methods see
    the negative eigenvalue only after resolving most of the bulk (the issue "Lanczos that stalls").
    """
    bulk = torch.logspace(0, math.log10(low), n - 1, dtype=torch.float64)
    return torch.cat([torch.tensor([negative], dtype=torch.float64), bulk])


def outlier_spectrum(n=600, seed=0):
    """Five outliers up to 100 over a bulk of both signs in +-[0.01, 1] (a network-like spread)."""
    gen = torch.Generator().manual_seed(seed)
    bulk = torch.rand(n - 5, generator=gen, dtype=torch.float64) * 0.99 + 0.01
    signs = torch.where(torch.rand(n - 5, generator=gen) < 0.4, -1.0, 1.0).double()
    return torch.cat([torch.tensor([100.0, 60, 30, 20, 10]).double(), bulk * signs])
