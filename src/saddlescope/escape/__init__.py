"""Getting out of saddles: escape steps (and, later, saddle-aware optimizers)."""

from saddlescope.escape.step import EscapeStep, escape

__all__ = ["EscapeStep", "escape"]
