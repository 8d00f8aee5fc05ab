"""Reports: JSON (atomic), plots, and the interactive HTML page (``saddlescope.report(cp, obj, out=DIR)``)."""

import sys
import types

from saddlescope.report.html import ReportFiles, write_report
from saddlescope.report.io import atomic_write_text, to_jsonable, write_json
from saddlescope.report.plots import plot_blocks, plot_landscape, plot_loss_curve, plot_surface_2d

__all__ = [
    "ReportFiles",
    "atomic_write_text",
    "plot_blocks",
    "plot_landscape",
    "plot_loss_curve",
    "plot_surface_2d",
    "to_jsonable",
    "write_json",
    "write_report",
]


class _CallableReportModule(types.ModuleType):
    """This package, callable: ``saddlescope.report(...)`` is :func:`write_report`."""

    def __call__(self, *args, **kwargs):
        return write_report(*args, **kwargs)


# `ss.report(cp, obj, out=DIR)` reads as a verb while `saddlescope.report` stays the package of writers and plots.
sys.modules[__name__].__class__ = _CallableReportModule
