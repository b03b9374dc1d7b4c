"""Who may connect, and what happens when file descriptors run short.

Every peer (an RPC client, an event subscriber, a worker) costs the agent one descriptor,
and libzmq's ipc listener aborts the whole process when accept() finds none left (measured:
"Too many open files (src/ipc_listener.cpp:297)" under `ulimit -n 64` with about 45 idle ipc
clients). So the agent never lets an accept reach its limit:

- at start the soft RLIMIT_NOFILE is raised to the hard limit;
- listeners have a short accept backlog (transport.BACKLOG), so a burst of connects is
  accepted a few at a time, and each accept is seen (a socket monitor) and answered by a
  count of the descriptors in use;
- with fewer than PAUSE_HEADROOM to spare, the RPC and events listeners are unbound: new
  peers are refused at connect (libzmq retries for them), connected ones are untouched; they
  are bound again once RESUME_HEADROOM are free. Each pause is counted and logged;
- a worker is spawned only with WORKER_HEADROOM to spare, else its task is refused with
  1100 ResourceExhausted: the reserve the agent keeps for its own work.
"""

from __future__ import annotations

import os
import resource

import zmq
from zmq.utils.monitor import parse_monitor_message

from agent import transport

PAUSE_HEADROOM = 24
RESUME_HEADROOM = 40
WORKER_HEADROOM = 12
RECHECK_SECONDS = 0.5  # while paused, how often free descriptors are counted again
_WATCHED = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED


def raise_limit() -> int:
    """Raise the soft descriptor limit to the hard one; returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return soft


def in_use() -> int:
    """Descriptors open in this process now (the listing's own descriptor not counted)."""
    return len(os.listdir("/proc/self/fd")) - 1


class Gate:
    def __init__(self, log, limit: int, clock):
        self.log = log
        self.limit = limit
        self.clock = clock
        self._listeners: list[tuple[zmq.Socket, list[str]]] = []  # pausable ones
        self.monitors: list[zmq.Socket] = []
        self.paused = False
        self.pauses = 0  # times new peers were refused for want of descriptors
        self.refused_workers = 0
        self.peers = 0  # accepted minus disconnected, over every watched socket
        self._next_check = 0.0

    def watch(self, sock: zmq.Socket, endpoints: list[str], pausable: bool) -> None:
        """Count `sock`'s accepts; a pausable one is unbound when descriptors run short."""
        self.monitors.append(sock.get_monitor_socket(_WATCHED))
        if pausable:
            self._listeners.append((sock, endpoints))

    def on_monitor(self, mon: zmq.Socket) -> None:
        accepted = False
        while True:
            try:
                event = parse_monitor_message(mon.recv_multipart(zmq.NOBLOCK))["event"]
            except zmq.Again:
                break
            if event == zmq.EVENT_ACCEPTED:
                self.peers, accepted = self.peers + 1, True
            elif event == zmq.EVENT_DISCONNECTED:
                self.peers = max(0, self.peers - 1)
        if accepted or self.paused:
            self.check()

    def headroom(self) -> int:
        return self.limit - in_use()

    def check(self) -> None:
        free = self.headroom()
        if not self.paused and free < PAUSE_HEADROOM:
            self.paused, self.pauses = True, self.pauses + 1
            for sock, endpoints in self._listeners:
                for ep in endpoints:
                    try:
                        sock.unbind(ep)
                    except zmq.ZMQError:
                        pass
            self.log.warning("peers_refused", why="file descriptors are short", free=free,
                             limit=self.limit, peers=self.peers)
        elif self.paused and free >= RESUME_HEADROOM:
            for sock, endpoints in self._listeners:
                for ep in endpoints:
                    transport.bind(sock, ep)
            self.paused = False
            self.log.info("peers_admitted", free=free, limit=self.limit, peers=self.peers)
        self._next_check = self.clock() + RECHECK_SECONDS

    def tick(self) -> None:
        """Called every loop turn: while paused, look again now and then (no peer may be
        disconnecting to wake us)."""
        if self.paused and self.clock() >= self._next_check:
            self.check()

    def spare_for_worker(self) -> bool:
        if self.headroom() >= WORKER_HEADROOM:
            return True
        self.refused_workers += 1
        return False

    def stats(self) -> dict:
        return {"limit": self.limit, "in_use": in_use(), "peers": self.peers,
                "listening": not self.paused, "pauses": self.pauses,
                "refused_workers": self.refused_workers}
