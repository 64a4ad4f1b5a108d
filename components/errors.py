"""The project's error base: every failure a user can fix is an :class:`SKFError` with a one-line message.

The CLI's error boundary (:mod:`flows.cli`) prints ``error: <message>`` for these (and for the few library
errors it maps) and exits non-zero; ``skf --debug`` shows the traceback instead. A message names the file,
URI or value at fault and says what to do about it, so no traceback is needed to act on it.
"""

from __future__ import annotations

__all__ = ["SKFError", "UserInputError"]


class SKFError(Exception):
    """A failure the user can act on; ``str(exc)`` is the whole message (what, where, the fix)."""

    exit_code: int = 1


class UserInputError(SKFError, ValueError):
    """A bad argument, option value or reference given on the command line or in a request."""

    exit_code = 2
