"""structlog set up to write one line per event on stderr, each carrying the pid: readable
lines for a person at a terminal, JSON objects for everything else (journald, files, a
pipe), or as `hostagent serve --log-format` says."""

from __future__ import annotations

import logging
import os
import sys

import structlog

FORMATS = ("auto", "console", "json")


def _add_pid(_logger, _name, event: dict) -> dict:
    # Looked up per line, not bound once: workers are forked from a process that set this up.
    event.setdefault("pid", os.getpid())
    return event


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def setup(level: str = "info", stream=None, fmt: str = "auto") -> None:
    """`fmt`: "console" (aligned, coloured lines), "json" (one object a line), or "auto":
    console when `stream` is a terminal, else json."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if _isatty(stream) else "json"
    if fmt == "console":
        tail = [structlog.dev.ConsoleRenderer(colors=_isatty(stream),
                                              exception_formatter=structlog.dev.plain_traceback)]
        stamp = structlog.processors.TimeStamper(fmt="%H:%M:%S.%f", utc=False)
    else:
        tail = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
        stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[structlog.processors.add_log_level, stamp, _add_pid, *tail],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


def get(**bound):
    return structlog.get_logger().bind(**bound)
