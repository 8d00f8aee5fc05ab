"""Curvature: exact spectra now; Hessian operators, Lanczos, density and trace build on the same objective."""

from saddlescope.curvature.exact import Spectrum, exact_spectrum, symmetric_eigh

__all__ = ["Spectrum", "exact_spectrum", "symmetric_eigh"]
