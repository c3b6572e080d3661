"""The exceptions aiayn raises for problems a user can fix.

The CLI turns any `AiaynError` into one line, ``error: <message>``, and a non-zero exit;
every message says what is wrong and what to do about it.
"""


class AiaynError(Exception):
    """Base class of every error caused by the user's input rather than by a bug."""


class ConfigError(AiaynError, ValueError):
    """A configuration value is unknown, of the wrong type, or out of its allowed range."""


class DataError(AiaynError, ValueError):
    """A data file or an input tensor is missing, malformed, or inconsistent."""


class CheckpointError(AiaynError):
    """A checkpoint is missing, damaged, unsafe, or does not match the model."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint is intact but holds another model: other tensor names or shapes."""
