"""Who may connect, and what happens when file descriptors run short.

Every peer (an RPC client, an event subscriber, a worker) costs the agent one descriptor,
and libzmq's ipc listener aborts the whole process when accept() finds none left (measured:
"Too many open files (src/ipc_listener.cpp:297)" under `ulimit -n 64` with about 45 idle ipc
clients). So the agent never lets an accept reach its limit:

- at start it asks for WANTED_NOFILE descriptors: the soft RLIMIT_NOFILE is raised to the
  hard limit, and a hard limit below WANTED_NOFILE is raised too where the agent may
  (CAP_SYS_RESOURCE, as root; Redis and nginx do the same), logged either way. This is what
  holds against a burst: libzmq's I/O thread accepts a same-machine burst of connects
  (measured: 40 within 1.4 ms) in its own thread, whatever the loop does;
- every accept is seen (a socket monitor) and answered at once by a count of the descriptors
  in use. With fewer than PAUSE_HEADROOM (or an eighth of the limit) to spare, new peers are
  refused: an ipc listener's socket file is renamed aside (synchronous, so a connect from
  then on fails with ENOENT and its libzmq retries; the listener itself, and libzmq, never
  notice), a TCP listener is unbound (libzmq's TCP accept tolerates EMFILE). Connected peers
  are untouched. Listening resumes once RESUME_HEADROOM more are free (or, under a limit
  that small, as many as the agent has with no peer at all). The reserve covers what is
  accepted while the loop reacts when its thread runs promptly (measured: 8 of a burst of
  40 local connects before it woke, plus each listener's backlog, transport.BACKLOG); when
  the two cores are busy and the thread waits for one, a burst can outrun it (the first
  point is the defence then; docs/reliability.md has the measured rates);
- a worker is spawned only with WORKER_HEADROOM to spare and while listening (its own
  connect goes through workers.sock, which pauses with the rest), else its task is
  refused with 1100 ResourceExhausted.

Each pause is counted and logged (Host.getStats limits.descriptors).
"""

from __future__ import annotations

import os
import resource

import zmq
from zmq.utils.monitor import parse_monitor_message

from agent.wire import transport

WANTED_NOFILE = 65536
PAUSE_HEADROOM = 32  # at least; an eighth of the limit where that is more
RESUME_HEADROOM = 8  # above the pause's
WORKER_HEADROOM = 12
RECHECK_SECONDS = 0.5  # while paused, how often free descriptors are counted again
_WATCHED = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
PAUSED = ".paused"  # an ipc socket file renamed aside while new peers are refused


def raise_limit(log) -> int:
    """Raise the descriptor limit towards WANTED_NOFILE; returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before = soft
    if hard != resource.RLIM_INFINITY and hard < WANTED_NOFILE:
        try:  # only with CAP_SYS_RESOURCE; else EPERM, and the hard limit stands
            resource.setrlimit(resource.RLIMIT_NOFILE, (WANTED_NOFILE, WANTED_NOFILE))
            soft = hard = WANTED_NOFILE
        except (ValueError, OSError):
            pass
    if soft < hard:
        want = hard if hard != resource.RLIM_INFINITY else max(soft, WANTED_NOFILE)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    if soft < WANTED_NOFILE:
        log.warning("descriptor_limit_low", limit=soft, wanted=WANTED_NOFILE,
                    consequence="new peers are refused when short; a burst of local ipc "
                                "connects can still exhaust it (raise LimitNOFILE)")
    elif soft != before:
        log.info("descriptor_limit_raised", before=before, limit=soft)
    return soft


def in_use(limit: int | None = None) -> int:
    """Descriptors open in this process now (the listing's own descriptor not counted). The
    listing needs one itself: with none left, the answer is all of them."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1
    except OSError:  # EMFILE
        return limit if limit is not None else resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Gate:
    def __init__(self, log, limit: int, clock):
        self.log = log
        self.limit = limit
        self.clock = clock
        self.pause_at = max(PAUSE_HEADROOM, limit // 8)
        self.resume_at = self.pause_at + RESUME_HEADROOM
        self._ipc: list[str] = []  # socket files of pausable ipc listeners
        self._tcp: list[tuple[zmq.Socket, str]] = []
        self._unbound: list[tuple[zmq.Socket, str]] = []  # TCP endpoints a pause let go
        self.monitors: list[zmq.Socket] = []
        self.paused = False
        self.pauses = 0  # times new peers were refused for want of descriptors
        self.refused_workers = 0
        self.peers = 0  # accepted minus disconnected, over every watched socket
        self._next_check = 0.0

    def watch(self, sock: zmq.Socket, endpoints: list[str]) -> None:
        """Count `sock`'s accepts, and refuse new peers on its endpoints when short."""
        self.monitors.append(sock.get_monitor_socket(_WATCHED))
        for ep in endpoints:
            if ep.startswith("ipc://"):
                path = ep[len("ipc://"):]
                _unlink(path + PAUSED)  # a pause of an earlier life
                self._ipc.append(path)
            else:
                self._tcp.append((sock, ep))

    def settle(self) -> None:
        """Once the agent listens: what it holds with no peer at all bounds how far it can
        ever get from its limit, so listening resumes at a headroom it can reach."""
        idle_free = self.headroom()
        self.resume_at = max(1, min(self.pause_at + RESUME_HEADROOM, idle_free - 2))

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
        return self.limit - in_use(self.limit)

    def check(self) -> None:
        free = self.headroom()
        if not self.paused and free < self.pause_at:
            self._pause()
            self.log.warning("peers_refused", why="file descriptors are short", free=free,
                             limit=self.limit, peers=self.peers)
        elif self.paused and free >= self.resume_at:
            self._resume()
            self.log.info("peers_admitted", free=free, limit=self.limit, peers=self.peers)
        self._next_check = self.clock() + RECHECK_SECONDS

    def _pause(self) -> None:
        self.paused, self.pauses = True, self.pauses + 1
        for path in self._ipc:  # first: these are what would abort us
            try:
                os.rename(path, path + PAUSED)
            except OSError:
                pass
        for sock, ep in self._tcp:
            try:
                sock.unbind(ep)
                self._unbound.append((sock, ep))
            except zmq.ZMQError:
                pass

    def _resume(self) -> None:
        for path in self._ipc:
            try:
                os.rename(path + PAUSED, path)
            except OSError:
                pass
        while self._unbound:  # each bound again once; one taken meanwhile is tried next time
            sock, ep = self._unbound[0]
            try:
                transport.bind(sock, ep)
            except zmq.ZMQError as exc:
                self.log.error("rebind_failed", endpoint=ep, error=str(exc))
                return
            self._unbound.pop(0)
        self.paused = False

    def tick(self) -> None:
        """Called by the loop's housekeeping while paused: look again now and then (no peer
        may be disconnecting to wake us)."""
        if self.paused and self.clock() >= self._next_check:
            self.check()

    def spare_for_worker(self) -> bool:
        if not self.paused and self.headroom() >= WORKER_HEADROOM:
            return True
        self.refused_workers += 1
        return False

    def stats(self) -> dict:
        return {"limit": self.limit, "in_use": in_use(self.limit), "peers": self.peers,
                "listening": not self.paused, "pauses": self.pauses,
                "refused_workers": self.refused_workers}


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
