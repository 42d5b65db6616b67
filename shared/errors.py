"""The user errors: mistakes the user can fix, which the CLI reports in one line.

A command's error boundary (:func:`shared.cli_utils.user_errors`) prints a :class:`UserError`
as one red line and exits 2. Every other exception is a bug and keeps its traceback, so
raise one of these (or a subclass) only where the message alone tells the user what to fix.

Each family member also derives from the builtin it replaced (``ValueError``,
``FileNotFoundError``, ...), so code and tests that catch the builtin still catch it.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of every error the user can fix; the message says what to do."""


class ConfigError(UserError, ValueError):
    """A config file or override is malformed or inconsistent; the message says where."""


class BadInput(UserError, ValueError):
    """An input the user gave (a table, a file's contents, a name, an option) cannot be used as asked."""


class UnknownName(UserError, KeyError):
    """A name the user gave (a model, an overlay, a target) is not known; the message lists the known ones."""

    def __str__(self) -> str:  # a KeyError's str() is the repr of its key: print the message as written
        return str(self.args[0]) if self.args else ""


class MissingInput(UserError, FileNotFoundError):
    """A file, folder or object the user named (or a stage before should have written) does not exist."""


class MissingArtifact(UserError, RuntimeError):
    """An artifact cannot be used: missing, corrupt, an unknown schema or the wrong encoder."""


class ArtifactError(MissingArtifact):
    """A router artifact cannot be used: missing, corrupt, unknown schema, wrong encoder, or features that do
    not fit it (``shared.artifact``, ``shared.router``)."""


class ClusterUnreachable(UserError, ConnectionError):
    """No Ray cluster answers (or it refused the request); the message says how to start or reach one."""


class ModelUnavailable(UserError, RuntimeError):
    """A model's weights cannot be found, verified or loaded; the message says how to fix it."""
