"""The fork server: a process prepared at start-up that forks one worker per operation.

Why: a fresh interpreter that imports pyzmq costs ~50 ms; a fork of a process with the
imports already done costs a few. It never creates a ZeroMQ context, so forking is safe (a
process must never fork while it holds a live one).

Each worker is double-forked: the intermediate child exits at once, so the worker is adopted
by the nearest subreaper, the supervisor. The supervisor then reaps its workers itself and
sees exactly how each one died, and a worker's parent-death signal fires when the supervisor
dies (workers/runtime.py sets it once adopted).

A spare: while it is idle the fork server keeps one worker forked ahead, adopted and with its
ZeroMQ socket made (runtime.prepare), waiting on a pipe for its request. A request is handed
to the spare if there is one (a write: the fork, the adoption and the socket are off the
request's path), else a worker is forked for it; the next spare is forked once no request
waits. A spare whose fork server dies reads end-of-file and exits; one whose supervisor dies
is killed by its parent-death signal, like any worker.

The fork server never waits for a fork: an intermediate reports its worker's pid on a pipe,
read when it is readable, so requests that come together are forked side by side, at most
MAX_FORKING at once (a burst, such as a thousand copies resumed at start-up, waits in a
queue here rather than forking a thousand processes at the same moment). Requests are read
as soon as they come and replies wait in a buffer until the socket takes them, so neither
side's writes wait on the other's: a supervisor busy sending a burst of requests (it reads
no reply meanwhile) can never fill our socket and block us from reading its requests.

Protocol on fd 3 (a socketpair to the supervisor): one JSON request per line in, one JSON
reply per line out: {"token": ..., "pid": N} or {"token": ..., "error": "..."}.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import selectors
import signal
import socket
import sys

CONTROL_FD = 3
SPARE = object()  # the request of a spare: it reads its real one from a pipe later
REAP_POLL = 0.005  # seconds between looks for exited intermediates while any is left
MAX_FORKING = 4  # intermediates that have not yet reported their worker's pid


class ForkServer:
    def __init__(self, control: socket.socket, supervisor_pid: int):
        self.control = control
        control.setblocking(False)
        self.supervisor_pid = supervisor_pid
        self.sel = selectors.DefaultSelector()
        self.sel.register(control, selectors.EVENT_READ)
        self.buf = b""
        self.out = bytearray()  # replies the socket has not taken yet
        self.queue: collections.deque = collections.deque()  # requests waiting for a fork
        self.forking: dict[int, tuple] = {}  # pid pipe fd -> (token, intermediate, spare fd)
        self.intermediates: set[int] = set()  # forked, not yet reaped
        self.spare: tuple[int, int] | None = None  # (pid, fd of the pipe it reads)
        self.spare_forking = False
        self.spare_failures = 0
        self.inherited: set[int] = set()  # fds a new child must not keep

    def run(self) -> None:
        while True:
            idle = (self.spare is None and not self.spare_forking and not self.queue
                    and self.spare_failures < 3)
            timeout = 0 if idle else (REAP_POLL if self.intermediates else None)
            ready = self.sel.select(timeout)
            for key, events in ready:
                if key.fileobj is self.control:
                    if events & selectors.EVENT_WRITE:
                        self._flush()
                    if events & selectors.EVENT_READ and not self._read_requests():
                        return  # the supervisor closed its end: it is gone
                else:
                    self._reported(key.fd)
            while self.queue and len(self.forking) < MAX_FORKING:
                self._fork(self.queue.popleft())
            if not ready and idle:
                self._fork(SPARE)
            self._reap()

    def _read_requests(self) -> bool:
        try:
            data = self.control.recv(65536)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            return False
        *lines, self.buf = (self.buf + data).split(b"\n")
        for line in lines:
            try:
                request = json.loads(line)
            except ValueError:
                continue
            if not self._hand_to_spare(request, line):
                self.queue.append(request)
        return True

    def _hand_to_spare(self, request: dict, line: bytes) -> bool:
        if self.spare is None:
            return False
        (pid, fd), self.spare = self.spare, None
        self.inherited.discard(fd)
        try:
            view = memoryview(line + b"\n")
            while view:  # the pipe is empty and holds 64 KiB: this never blocks
                view = view[os.write(fd, view):]
        except OSError:  # EPIPE: the spare died; fork a worker instead
            return False
        finally:
            os.close(fd)
        self._reply({"token": request["token"], "pid": pid})
        return True

    def _fork(self, request) -> None:
        rfd = wfd = spare_r = spare_w = None
        try:
            rfd, wfd = os.pipe()
            if request is SPARE:
                spare_r, spare_w = os.pipe()
            pid = os.fork()
        except OSError as exc:
            for fd in (rfd, wfd, spare_r, spare_w):
                if fd is not None:
                    os.close(fd)
            if request is SPARE:
                self.spare_failures += 1
            else:
                self._reply({"token": request["token"], "error": f"fork failed: {exc.strerror}"})
            return
        if pid == 0:  # the intermediate: fork the worker, say its pid, vanish
            self._intermediate(request, rfd, wfd, spare_r, spare_w)
        os.close(wfd)
        if spare_r is not None:
            os.close(spare_r)
            self.inherited.add(spare_w)
            self.spare_forking = True
        self.intermediates.add(pid)
        self.forking[rfd] = (None if request is SPARE else request["token"], pid, spare_w)
        self.inherited.add(rfd)
        self.sel.register(rfd, selectors.EVENT_READ)

    def _intermediate(self, request, rfd: int, wfd: int, spare_r, spare_w) -> None:
        try:
            os.close(rfd)
            if spare_w is not None:
                os.close(spare_w)
            me = os.getpid()
            worker = os.fork()
            if worker == 0:
                os.close(wfd)
                self._child_closes()
                from workers import runtime

                if request is SPARE:
                    runtime.spare(spare_r, self.supervisor_pid, me)  # never returns
                runtime.main(request, self.supervisor_pid, intermediate=me)  # never returns
            os.write(wfd, str(worker).encode())
        finally:
            os._exit(0)

    def _child_closes(self) -> None:
        """A worker keeps none of the fork server's descriptors (a spare's pipe in another
        worker would keep that spare from seeing end-of-file when we die)."""
        for fd in (*self.inherited, self.sel.fileno()):
            try:
                os.close(fd)
            except OSError:
                pass
        os.close(self.control.detach())

    def _reported(self, rfd: int) -> None:
        token, pid, spare_w = self.forking.pop(rfd)
        self.sel.unregister(rfd)
        self.inherited.discard(rfd)
        try:
            data = os.read(rfd, 32)  # written at once, before the intermediate exits
        finally:
            os.close(rfd)
        if token is None:  # a spare
            self.spare_forking = False
            if data:
                self.spare, self.spare_failures = (int(data), spare_w), 0
            else:
                self.inherited.discard(spare_w)
                os.close(spare_w)
                self.spare_failures += 1
        elif data:
            self.spare_failures = 0
            self._reply({"token": token, "pid": int(data)})
        else:
            self._reply({"token": token, "error": "fork failed in the intermediate"})

    def _reap(self) -> None:
        for pid in list(self.intermediates):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.intermediates.discard(pid)

    def _reply(self, reply: dict) -> None:
        self.out += json.dumps(reply).encode() + b"\n"
        self._flush()

    def _flush(self) -> None:
        try:
            del self.out[:self.control.send(self.out)]
        except BlockingIOError:
            pass
        except OSError:  # the supervisor is gone; reading will tell
            self.out.clear()
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.out else 0)
        if self.sel.get_key(self.control).events != want:
            self.sel.modify(self.control, want)


def preload() -> None:
    """Import everything a worker imports, so a forked worker imports nothing; and set its
    logs up as the agent writes them ($HOSTAGENT_LOG_FORMAT), once for every worker.

    Not rich: structlog imports it whenever it can, for console tracebacks that agent/logs.py
    does not use (it names plain_traceback), and with pygments it was 3.9 MiB of the fork
    server's memory, and of every worker's resident set (docs/performance.md). No worker
    draws anything; the command line, which does, is another process."""
    sys.modules.setdefault("rich", None)  # None: an import of it fails; structlog copes
    from agent import logs
    from workers import ops, runtime  # noqa: F401  (ops imports every op's module)
    logs.setup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hostagent-forkserver")
    parser.add_argument("--supervisor-pid", type=int, required=True)
    parser.add_argument("--run-dir", required=True)  # names this agent's processes for psutil
    args = parser.parse_args(argv)

    from agent import system

    system.set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != args.supervisor_pid:  # the supervisor died before we got here
        os._exit(0)
    # The supervisor's terminal Ctrl-C must not reach us through the process group first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    preload()
    ForkServer(socket.socket(fileno=CONTROL_FD), args.supervisor_pid).run()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
