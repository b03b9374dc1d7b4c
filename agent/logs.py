"""structlog set up to write one line per event on stderr, each carrying the pid: readable
lines for a person at a terminal, JSON objects for everything else (journald, files, a
pipe), or as `hostagent serve --log-format` says. The choice is passed on to the processes
the agent starts (workers, scrubs) in $HOSTAGENT_LOG_FORMAT, since they write to the same
stderr; a worker binds its task (`bind`: what the supervisor's lines about it carry,
Task.about), so every line it writes carries it too."""

from __future__ import annotations

import logging
import os
import sys

import structlog

FORMATS = ("auto", "console", "json")
ENV = "HOSTAGENT_LOG_FORMAT"


def _add_pid(_logger, _name, event: dict) -> dict:
    # Looked up per line, not bound once: workers are forked from a process that set this up.
    event.setdefault("pid", os.getpid())
    return event


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def setup(level: str = "info", stream=None, fmt: str | None = None) -> str:
    """`fmt`: "console" (aligned, coloured lines), "json" (one object a line), or "auto":
    console when `stream` is a terminal, else json. None: $HOSTAGENT_LOG_FORMAT, else auto.
    Returns the format chosen, and leaves it in $HOSTAGENT_LOG_FORMAT for children."""
    stream = stream or sys.stderr
    fmt = fmt or os.environ.get(ENV) or "auto"
    if fmt not in FORMATS:
        fmt = "auto"
    if fmt == "auto":
        fmt = "console" if _isatty(stream) else "json"
    os.environ[ENV] = fmt
    if fmt == "console":
        tail = [structlog.dev.ConsoleRenderer(colors=_isatty(stream),
                                              exception_formatter=structlog.dev.plain_traceback)]
        stamp = structlog.processors.TimeStamper(fmt="%H:%M:%S.%f", utc=False)
    else:
        tail = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
        stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                    stamp, _add_pid, *tail],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    return fmt


def bind(**fields) -> None:
    """Every line this process writes from here on carries `fields` (a worker: its task)."""
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**fields)


def get(**bound):
    """A logger with `bound` fields, configured when it first writes, not now: a module's
    logger made at import (before setup) still writes in the format setup chose."""
    return structlog.get_logger(**bound)
