"""Errors a run stops with; each message says what to change."""

from sftkit.errors import SftkitError


class TrainingError(SftkitError, RuntimeError):
    """The run cannot continue; the message says what to change."""


class CheckpointWriteError(TrainingError):
    """A checkpoint could not be written (disk full, permissions); earlier ones are intact."""
