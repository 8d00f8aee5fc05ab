"""Exceptions raised for bad input or impossible requests.

Every error names what was wrong and what to do about it; the CLI prints the
message as one line and exits non-zero. All inherit from :class:`SaddlescopeError`,
and those about bad arguments also from :class:`ValueError`, so generic handlers work.
"""

from __future__ import annotations


class SaddlescopeError(Exception):
    """Base class of every saddlescope error."""


class InvalidInputError(SaddlescopeError, ValueError):
    """An argument has the wrong type, shape, dtype or value."""


class NonScalarLossError(InvalidInputError):
    """The loss function returned something other than a scalar."""


class NonFiniteLossError(SaddlescopeError, ArithmeticError):
    """The loss (or its gradient) is NaN or infinite at the requested point."""


class NoTrainableParametersError(InvalidInputError):
    """The model has no parameter to differentiate."""


class ThetaError(InvalidInputError):
    """A parameter vector has the wrong length, dtype, device or dimension."""


class EmptyDataError(InvalidInputError):
    """The data iterable yielded no batch (or only empty batches)."""


class BatchShapeError(InvalidInputError):
    """A batch is malformed: inputs and targets disagree, or the model rejects its shape."""


class TooLargeError(SaddlescopeError, MemoryError):
    """An exact computation would exceed the memory budget; use the iterative path."""


class MissingFileError(InvalidInputError, FileNotFoundError):
    """A file named by the user (checkpoint, module file) does not exist."""


class UserCodeError(InvalidInputError):
    """The user's model factory, data function or loss cannot be imported or raised when called."""


class CheckpointError(InvalidInputError):
    """A checkpoint cannot be read as a state dict of tensors."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint pickles code (a whole module or custom class); it is refused without running it."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint's names or shapes differ from the model's."""


class NotADescentPointError(SaddlescopeError):
    """An escape step was asked for where no negative-curvature direction exists."""


class UnsupportedModelError(SaddlescopeError):
    """The model uses an operation the computation cannot differentiate (e.g. twice)."""


class DistributedError(SaddlescopeError):
    """A torch.distributed collective failed: another rank failed, stopped or disagrees with this one."""


class DataChangedError(InvalidInputError):
    """A data loader yielded other batches on a later pass than on the first (shuffling, random transforms)."""


class MemoryBudgetError(TooLargeError):
    """Not even the smallest useful plan (e.g. a Krylov basis) fits the memory budget; raised before any product."""
