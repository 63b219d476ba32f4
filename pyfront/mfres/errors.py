"""Exceptions that carry a message meant for the user (the CLI prints them on one line)."""


class MfresError(Exception):
    """Base class: an error whose message alone tells the user what went wrong."""

    exit_code = 2


class ConfigError(MfresError, ValueError):
    """An invalid option or combination of options."""


class DataError(MfresError, ValueError):
    """A data set that cannot be used: unreadable file, bad shapes, NaN/inf values."""


class BackendError(MfresError, RuntimeError):
    """A backend that cannot be used here (e.g. Julia not available)."""

    exit_code = 3


class StorageError(MfresError, OSError):
    """The run file cannot be written or read (unwritable path, disk full, wrong file)."""

    exit_code = 4


class RunStopped(MfresError):
    """A run that stopped before its last step (diverged, interrupted); the file holds what was done."""

    exit_code = 1
