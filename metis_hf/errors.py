"""The project's own error types: the command line prints each as one line naming the culprit
(a traceback is for bugs only)."""

from __future__ import annotations


class MetisHFError(Exception):
    """A known failure the user can act on: its message says what and where."""


class DataUnavailableError(MetisHFError):
    """Data metis-hf must fetch (BIG-bench retention tasks) cannot be had here; the message says
    how to provide it by hand."""
