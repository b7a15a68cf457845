"""The errors boatvit raises for input a user can fix; the bottom of the package (it imports nothing of it).

Every library module raises these; the command line (`boatvit.cli`) prints them as one line with exit status 2.
They subclass ``ValueError`` so callers that catch ``ValueError`` for bad arguments keep working.
"""

from __future__ import annotations

__all__ = [
    'BoatvitError',
    'UsageError',
    'CheckpointFileError',
    'UnsafeCheckpointError',
    'WeightsMetadataError',
    'UnreadableImageError',
    'OutputWriteError',
    'TrainingDivergedError',
]


class BoatvitError(ValueError):
    """Bad input the user can fix; the message names the value, what was expected and how to fix it."""


class UsageError(BoatvitError):
    """A bad argument, file or data layout: printed as one line, exit status 2, no traceback."""


class CheckpointFileError(UsageError):
    """A checkpoint file that cannot be read: missing, not a checkpoint, truncated or corrupt."""


class UnsafeCheckpointError(CheckpointFileError):
    """A file that would run code while loading: a pickle calling outside the allow-list, or a TorchScript archive."""


class WeightsMetadataError(CheckpointFileError):
    """Metadata of a weights file with unknown keys, or values of the wrong type or outside their range."""


class UnreadableImageError(UsageError):
    """An image file that cannot be decoded: not an image, truncated, too large to open safely, or a pixel format
    that would be read wrongly."""


class OutputWriteError(BoatvitError):
    """A file could not be written (a full disk, no permission); the file it was to replace is left as it was."""


class TrainingDivergedError(BoatvitError):
    """The training loss or the weights became non-finite; the last finite checkpoint is kept."""
