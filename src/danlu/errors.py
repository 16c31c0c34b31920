"""Errors a user can cause and fix.

Every message says what happened, what was expected and how to fix it, naming the config key,
file, row or column and the value received. The CLI prints a DanluError as one line (no
traceback unless --debug) and exits with status 2; the server maps it to a 4xx answer.
"""

from __future__ import annotations


class DanluError(Exception):
    """A problem in the user's config, data, files or request (not a bug in danlu)."""

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        self.message = message
        self.fix = fix
        super().__init__(f"{message}. {fix}" if fix else message)


class ConfigError(DanluError):
    """The config file, a key=value override or a CLI option is invalid."""


class DataError(DanluError):
    """A dataset is missing, unreadable or not what the config says it is."""


class CheckpointError(DanluError):
    """A run directory or checkpoint is missing, incomplete or does not match."""


class ServeError(DanluError):
    """A request to a served model is invalid."""
