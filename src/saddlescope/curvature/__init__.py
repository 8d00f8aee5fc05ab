"""Curvature: the Hessian as an operator, exact spectra, Lanczos eigenpairs, density, trace, index."""

from saddlescope.curvature.blocks import BlockReport, BlockRow, per_block
from saddlescope.curvature.density import Quadrature, SpectralDensity, lanczos_quadrature, spectral_density
from saddlescope.curvature.exact import Spectrum, exact_spectrum, symmetric_eigh
from saddlescope.curvature.index import IndexEstimate, index_estimate
from saddlescope.curvature.lanczos import EigenResult, eigs
from saddlescope.curvature.operator import DenseOperator, HessianOperator
from saddlescope.curvature.trace import TraceEstimate, trace

__all__ = [
    "BlockReport", "BlockRow", "DenseOperator", "EigenResult", "HessianOperator", "IndexEstimate", "Quadrature", "SpectralDensity",
    "Spectrum", "TraceEstimate", "eigs", "exact_spectrum", "index_estimate", "lanczos_quadrature",
    "per_block", "spectral_density", "symmetric_eigh", "trace",
]
