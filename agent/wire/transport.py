"""Binding ZeroMQ sockets to configured endpoints, the way an operator expects.

An ipc socket file is created mode 0600 (umask around the bind, then chmod to be sure). A
stale file left by a crash is no obstacle: libzmq unlinks it before it binds, and the run-dir
lock (startup.claim_run_dir) guarantees that the file we replace is never a live agent's.
"""

from __future__ import annotations

import os

import zmq

# Connects waiting to be accepted, per listener: small, so a burst of connects is accepted a
# few at a time and the agent sees each before the next (agent/wire/peers.py).
BACKLOG = 8


def bind(sock: zmq.Socket, endpoint: str) -> str:
    """Bind one endpoint; returns the endpoint actually bound (a wildcard port resolved)."""
    sock.setsockopt(zmq.BACKLOG, BACKLOG)
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        old = os.umask(0o077)
        try:
            sock.bind(endpoint)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
    else:
        sock.bind(endpoint)
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


class BindError(Exception):
    """An endpoint of the config that cannot be bound at start-up (a port taken, an ipc
    path the OS refuses): the agent exits 2 with this line, not a traceback."""


def bind_all(sock: zmq.Socket, endpoints: list[str]) -> list[str]:
    bound = []
    for ep in endpoints:
        try:
            bound.append(bind(sock, ep))
        except (zmq.ZMQError, OSError) as exc:
            raise BindError(f"cannot bind {ep}: {zmq.strerror(exc.errno)}") from None
    return bound
