"""Reports: JSON (atomic) and plots."""

from saddlescope.report.io import atomic_write_text, to_jsonable, write_json
from saddlescope.report.plots import plot_blocks, plot_landscape, plot_loss_curve, plot_surface_2d

__all__ = [
    "atomic_write_text",
    "plot_blocks",
    "plot_landscape",
    "plot_loss_curve",
    "plot_surface_2d",
    "to_jsonable",
    "write_json",
]
