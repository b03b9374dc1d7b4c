"""agent/logs.py: every logger writes in the format set up, whenever it was made."""

from __future__ import annotations

import io
import json

import structlog

from agent import logs


def test_a_logger_made_before_setup_writes_as_setup_says(monkeypatch):
    """Module-level loggers (recovery, lockspaces, domains, replies) are made at import,
    before `serve` sets the format up: their lines must be JSON too off a terminal."""
    monkeypatch.delenv(logs.ENV, raising=False)
    early = logs.get(component="early")
    buf = io.StringIO()
    try:
        assert logs.setup(stream=buf, fmt="json") == "json"
        early.info("hello", x=1)
        early.bind(y=2).warning("again")
    finally:
        structlog.reset_defaults()
        monkeypatch.delenv(logs.ENV, raising=False)
    first, second = (json.loads(line) for line in buf.getvalue().splitlines())
    assert first["event"] == "hello" and first["component"] == "early" and first["x"] == 1
    assert second["y"] == 2 and second["level"] == "warning"
