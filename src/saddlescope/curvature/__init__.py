"""Curvature: the Hessian as an operator, exact spectra, extreme eigenpairs by Lanczos."""

from saddlescope.curvature.exact import Spectrum, exact_spectrum, symmetric_eigh
from saddlescope.curvature.lanczos import EigenResult, eigs
from saddlescope.curvature.operator import DenseOperator, HessianOperator

__all__ = ["DenseOperator", "EigenResult", "HessianOperator", "Spectrum", "eigs", "exact_spectrum", "symmetric_eigh"]
