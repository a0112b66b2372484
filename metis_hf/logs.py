"""Logging shared by the library's layers."""

from __future__ import annotations

import functools
import logging


@functools.cache
def warn_once(logger_name: str, message: str) -> None:
    """Log ``message`` as a warning on ``logger_name`` the first time only: a compare scores every
    model on the same tasks and builds a trainer per run, so a problem is said once a process."""
    logging.getLogger(logger_name).warning(message)
