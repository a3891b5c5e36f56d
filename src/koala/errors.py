"""Errors that carry a message meant for the user: what is wrong and how to fix it.

The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""


class KoalaError(Exception):
    """Base class for every error that koala-fl reports to the user."""


class ConfigError(KoalaError):
    """The experiment configuration is malformed or asks for something impossible."""


class DataError(KoalaError):
    """A data set is missing, corrupt, or cannot be split as asked."""


class ModelError(KoalaError):
    """An unknown model name, or weights that do not fit the model."""


class CheckpointError(KoalaError):
    """A run cannot be resumed: its directory is not a run, or its checkpoint is missing or damaged."""


class UpdateRejected(KoalaError):
    """A client update failed validation and must not be aggregated."""
