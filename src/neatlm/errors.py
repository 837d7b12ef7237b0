"""Errors a user can cause. The CLI prints their one-line message and exits with code 2."""


class NeatError(Exception):
    """Base class: the message is written for the user, in their terms (key, file, allowed values)."""


class DataError(NeatError):
    """A corpus path is missing, empty or unreadable."""


class CheckpointError(NeatError):
    """A checkpoint or run directory is missing, truncated or corrupted."""


class TrainingDiverged(NeatError):
    """The loss or the gradients became non-finite and could not be recovered."""
