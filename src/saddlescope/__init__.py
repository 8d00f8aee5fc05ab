"""saddlescope: why has training stalled — minimum, saddle, plateau? Proved from the Hessian.

    import saddlescope as ss
    obj = ss.Objective.from_model(model, loss_fn, data)
    cp = ss.analyze(obj)          # -> ss.CriticalPoint
    step = ss.escape(obj, cp)     # negative-curvature step with a line search
"""

from saddlescope import errors, experiments, optim, problems, report
from saddlescope.critical import CriticalPoint, ProbeResult, Tolerances, analyze, sharpen_escape
from saddlescope.curvature import (
    BlockReport,
    DenseOperator,
    EigenResult,
    HessianOperator,
    IndexEstimate,
    SpectralDensity,
    Spectrum,
    TraceEstimate,
    eigs,
    exact_spectrum,
    index_estimate,
    per_block,
    spectral_density,
    trace,
)
from saddlescope.escape import EscapeStep, escape
from saddlescope.landscape import LandscapeSlice, TrajectoryProjection, landscape, trajectory_pca
from saddlescope.monitor import MonitorEvent, SaddleMonitor
from saddlescope.objective import GradientGraph, GraphPlan, Objective
from saddlescope.path_plan import PathPlan, plan_path
from saddlescope.quantity import Quantity
from saddlescope.stability import StabilityReport, stability
from saddlescope.workflow import ModelAnalysis, analyze_model

__version__ = "0.1.0"

__all__ = [
    "BlockReport",
    "CriticalPoint",
    "DenseOperator",
    "EigenResult",
    "HessianOperator",
    "IndexEstimate",
    "LandscapeSlice",
    "ModelAnalysis",
    "MonitorEvent",
    "SpectralDensity",
    "TraceEstimate",
    "TrajectoryProjection",
    "EscapeStep",
    "GradientGraph",
    "GraphPlan",
    "PathPlan",
    "Quantity",
    "Objective",
    "ProbeResult",
    "SaddleMonitor",
    "Spectrum",
    "StabilityReport",
    "Tolerances",
    "analyze",
    "analyze_model",
    "eigs",
    "errors",
    "escape",
    "exact_spectrum",
    "experiments",
    "index_estimate",
    "landscape",
    "optim",
    "per_block",
    "plan_path",
    "problems",
    "report",
    "sharpen_escape",
    "spectral_density",
    "stability",
    "trace",
    "trajectory_pca",
]
