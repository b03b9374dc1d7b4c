"""systemd's sd_notify datagram protocol, stdlib only.

We do not depend on libsystemd or python-systemd: the protocol is one
datagram on a unix socket, and the agent must also run where systemd is absent.
"""
from __future__ import annotations

import os
import socket

_sock: socket.socket | None = None
_sock_pid: int | None = None


def _address(raw: str) -> str | bytes:
    # '@' is systemd's spelling of the Linux abstract namespace, whose
    # names start with a NUL byte and never exist on the file system.
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    return raw


def _socket() -> socket.socket:
    global _sock, _sock_pid
    # After a fork each process gets its own socket, so that one closing or
    # resetting it never pulls the descriptor from under the other.
    if _sock is None or _sock_pid != os.getpid():
        _sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        _sock_pid = os.getpid()
    return _sock


def notify(*fields: str) -> bool:
    """Send fields as one notification; True once the datagram is handed to the kernel."""
    raw = os.environ.get("NOTIFY_SOCKET")
    if not raw:
        return False
    try:
        _socket().sendto("\n".join(fields).encode(), _address(raw))
        return True
    except OSError:
        # The agent must outlive its supervisor's socket: an undeliverable
        # notification is lost, never fatal. A fresh socket next time.
        _reset()
        return False


def _reset() -> None:
    global _sock, _sock_pid
    if _sock is not None and _sock_pid == os.getpid():
        try:
            _sock.close()
        except OSError:
            pass
    _sock = None
    _sock_pid = None


def watchdog_interval() -> float | None:
    """systemd's watchdog timeout in seconds, or None if none applies to us.

    Ping at half of it, as sd_watchdog_enabled(3) advises, so that one late
    tick does not get the agent killed.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    # The variables are inherited by children that systemd does not watch.
    if pid and pid.strip() != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None


class Watchdog:
    """systemd's watchdog, kicked from the loop at half its interval (nothing if none)."""

    def __init__(self, monotonic):
        self.interval = watchdog_interval()
        self.monotonic = monotonic
        self.due = 0.0

    def wait_at_most(self, timeout: float) -> float:
        """`timeout`, cut so that the loop wakes in time to kick."""
        return min(timeout, self.interval / 2) if self.interval else timeout

    def kick(self) -> None:
        if self.interval:
            now = self.monotonic()
            if now >= self.due:
                notify("WATCHDOG=1")
                self.due = now + self.interval / 2
