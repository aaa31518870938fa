"""ctlesion's own error types. The CLI prints one line for a :class:`CtlesionError` (a
problem the user can fix: a bad config key, a damaged file, unusable data) and exits 2;
anything else is a bug and keeps its traceback.

Each also derives from the built-in type it replaced (``ValueError``, ``RuntimeError``,
``FloatingPointError``), so existing ``except ValueError`` code keeps working.
"""

from __future__ import annotations

__all__ = ["CtlesionError", "ConfigError", "DataError", "CheckpointError", "NonFiniteLossError"]


class CtlesionError(Exception):
    """Base of every error a user can act on; the message names the file, key or sample."""


class ConfigError(CtlesionError, ValueError):
    """A configuration key or value that cannot be used; the message names the key."""


class DataError(CtlesionError, ValueError):
    """Input data that cannot be used (unreadable file, bad mask values, missing labels...);
    the message names the file or sample and the problem."""


class CheckpointError(CtlesionError, RuntimeError):
    """A checkpoint folder that is missing, incomplete, corrupted or does not fit."""


class NonFiniteLossError(CtlesionError, FloatingPointError):
    """A loss became NaN or infinite; the message names the epoch, step, samples and terms."""
