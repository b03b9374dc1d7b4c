"""structlog set up to write one JSON object per line on stderr, each carrying the pid."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def _add_pid(_logger, _name, event: dict) -> dict:
    # Looked up per line, not bound once: workers are forked from a process that set this up.
    event.setdefault("pid", os.getpid())
    return event


def setup(level: str = "info", stream=None) -> None:
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _add_pid,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.WriteLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def get(**bound):
    return structlog.get_logger().bind(**bound)
