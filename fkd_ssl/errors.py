"""User-facing error types.

Every error a user can cause (a bad path, a wrong flag, a checkpoint of the wrong kind, a
store from another dataset) is raised as a subclass of :class:`FKDError` with a one-line
message that names the file or flag at fault.  Scripts catch these at the top level
(:func:`fkd_ssl.cli.run_main`) and print ``error: <message>`` with exit code 2 instead of a
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class FKDError(Exception):
    """Base class for errors caused by user input."""


class DataError(FKDError):
    """A dataset spec, path or file is missing, empty or unreadable."""


class CheckpointError(FKDError):
    """A checkpoint is missing, truncated, of the wrong kind or does not match."""


class ConfigError(FKDError):
    """A flag or config value is invalid or conflicts with an existing run."""
