"""What the command line shows: exit codes, readable errors, tables, sizes and times.

Human output goes through rich (tables, progress bars; no colour when not on a terminal or
with NO_COLOR set); `--json` prints JSON on stdout for scripts, and errors as JSON on stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time

# rich is imported where it draws: it is a third of a command's start, which `--json` and
# a command that prints one line do not pay (docs/performance.md).

# Exit codes (documented in the README and `hostagent --help`).
OK = 0
AGENT_ERROR = 1  # the agent answered an error, or the task ended failed or aborted
USAGE = 2  # bad usage or configuration
NO_ANSWER = 3  # nothing listens, or no answer in time: is the agent running (keys right)?
NEEDS_CONTINUING = 4  # a copy stopped and nobody copies it: continue it, or delete it
DETACHED = 130  # Ctrl-C: we stopped watching; the task goes on in the agent

EXIT_CODES = f"""\
exit codes: {OK} success; {AGENT_ERROR} the agent answered an error, or the task failed or was
aborted; {USAGE} bad usage or configuration; {NO_ANSWER} nothing listens, or no answer in
time (is the agent running?); {NEEDS_CONTINUING} a copy stopped and nobody copies it
(continue it or delete it); {DETACHED} interrupted by Ctrl-C (a task goes on in the agent)."""


class UsageError(Exception):
    """Bad arguments found after parsing: exit 2 with the message."""


def console(stderr: bool = False):
    from rich.console import Console
    c = Console(stderr=stderr, highlight=False, soft_wrap=False)
    if not c.is_terminal and "COLUMNS" not in os.environ:
        c = Console(stderr=stderr, highlight=False, soft_wrap=False, width=160)
    return c


def escape(text: str) -> str:
    """`text` shown as it is within rich's markup (rich.markup.escape)."""
    from rich.markup import escape as rich_escape
    return rich_escape(text)


def emit_json(value) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")
    sys.stdout.flush()


def error(message: str) -> None:
    sys.stderr.write(f"hostagent: {message}\n")
    sys.stderr.flush()


def call_error(exc, as_json: bool) -> int:
    """An agent's error, readable (or as JSON on stderr): exit 1."""
    if as_json:
        sys.stderr.write(json.dumps({"code": exc.code, "message": exc.message,
                                     "data": exc.data}) + "\n")
        return AGENT_ERROR
    details = ", ".join(f"{k}={_short(v)}" for k, v in exc.data.items() if k != "name")
    error(f"{exc.name or 'error'} ({exc.code}): {exc.message}" + (f" [{details}]"
                                                                  if details else ""))
    return AGENT_ERROR


def _short(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 120 else text[:117] + "..."


def size(n) -> str:
    """Bytes, human: 1.5 GiB."""
    if not isinstance(n, (int, float)):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20,
         "g": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """'1073741824', '512M', '1G', '1.5GiB' -> bytes (units are binary)."""
    t = text.strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    try:
        value = float(num)
    except ValueError:
        raise UsageError(f"not a size: {text!r} (e.g. 1073741824, 512M, 1G)") from None
    if unit not in UNITS or value < 0:
        raise UsageError(f"not a size: {text!r} (units: K, M, G, T, binary)")
    return int(value * UNITS[unit])


def ago(t) -> str:
    if not isinstance(t, (int, float)):
        return "-"
    s = max(0.0, time.time() - t)
    if s < 60:
        return f"{s:.0f}s ago"
    if s < 3600:
        return f"{s / 60:.0f}m ago"
    if s < 86400:
        return f"{s / 3600:.1f}h ago"
    return f"{s / 86400:.1f}d ago"


def duration(s) -> str:
    if not isinstance(s, (int, float)):
        return "-"
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.1f}h"


STATE_STYLE = {"pending": "yellow", "running": "cyan", "aborting": "magenta", "done": "green",
               "failed": "red", "aborted": "red", "LEGAL": "green", "ILLEGAL": "yellow",
               "joined": "green", "joining": "yellow", "ok": "green", "full": "red",
               "unreachable": "red", "broken": "red", "unknown": "yellow"}


def styled(state) -> str:
    style = STATE_STYLE.get(state)
    return f"[{style}]{state}[/]" if style else str(state)


def table(*columns: str, title: str | None = None):
    from rich.table import Table
    t = Table(title=title, title_justify="left", header_style="bold", box=None,
              pad_edge=False)
    for i, c in enumerate(columns):  # the last column folds, the others (IDs) never break
        t.add_column(c, overflow="fold", no_wrap=i < len(columns) - 1)
    return t


def fields(pairs, title: str | None = None):
    """Aligned `name  value` lines (values may hold markup). Print with crop=False: a long
    value (a location, a path) stays on its line for the terminal to wrap, and stays
    whole when copied."""
    from rich.console import Group
    from rich.text import Text
    pairs = [(k, "-" if v is None else str(v)) for k, v in pairs]
    width = max((len(k) for k, _ in pairs), default=0)
    lines = [Text(title, style="bold")] if title else []
    lines += [Text.assemble((k.ljust(width), "bold"), "  ", Text.from_markup(v), no_wrap=True,
                            overflow="ignore") for k, v in pairs]
    return Group(*lines)
