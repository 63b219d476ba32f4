"""Exceptions that carry a message meant for the user (the CLI prints them on one line).

Messages name options the CLI's way (``--overwrite``, ``--at-s``); the Python API
(``mfres.simulate`` and friends) re-words them with ``in_python_terms`` before they
reach the caller (``overwrite=True``, ``at_s``), so one message serves both.
"""

from __future__ import annotations

import re

# CLI flags whose Python counterpart is a keyword set to a value
_FLAGS = {"overwrite": "overwrite=True", "resume": "resume=True", "quiet": "progress=False"}
_OPTION = re.compile(r"(?<![\w/.-])--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)")


def python_terms(message: str) -> str:
    """``message`` with CLI option names as the Python API's keywords: ``--at-s`` → ``at_s``,
    ``--overwrite`` → ``overwrite=True``."""
    return _OPTION.sub(lambda m: _FLAGS.get(m.group(1), m.group(1).replace("-", "_")), message)


class MfresError(Exception):
    """Base class: an error whose message alone tells the user what went wrong."""

    exit_code = 2

    def in_python_terms(self) -> MfresError:
        """Re-word this error's message for Python callers (in place; returns ``self``)."""
        if self.args and isinstance(self.args[0], str):
            self.args = (python_terms(self.args[0]), *self.args[1:])
        return self


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
