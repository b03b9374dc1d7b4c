"""The supervisor's end of the fork server (workers/forkserver.py): start it, ask it for a
worker, read what it answers.

The fork server is a process of its own, started with posix_spawn (the supervisor holds a
ZeroMQ context, so it never forks), talking over a socketpair on its fd 3: one JSON request
per line out, one JSON reply per line in, {"token", "pid"} or {"token", "error"}.
"""

from __future__ import annotations

import json
import os
import socket
import sys


class ForkClient:
    def __init__(self, run_dir, log):
        self.run_dir = run_dir
        self.log = log
        self.pid: int | None = None
        self.control: socket.socket | None = None
        self._buf = b""

    def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = [sys.executable, "-m", "workers.forkserver", "--supervisor-pid", str(os.getpid()),
                "--run-dir", str(self.run_dir)]
        self.pid = os.posix_spawn(sys.executable, argv, os.environ,
                                  file_actions=[(os.POSIX_SPAWN_DUP2, theirs.fileno(), 3)])
        theirs.close()
        ours.settimeout(5.0)  # sends only; reads happen when the poller says readable
        self.control, self._buf = ours, b""
        self.log.info("forkserver_started", forkserver_pid=self.pid)

    def request(self, request: dict) -> None:
        """Ask for a worker; OSError if the fork server cannot be reached."""
        self.control.sendall(json.dumps(request).encode() + b"\n")

    def replies(self) -> list[dict]:
        """The replies that have arrived (call when the control socket is readable)."""
        try:
            data = self.control.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return []
        if not data:  # the fork server is gone; its exit is handled when reaped
            return []
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        out = []
        for line in lines:
            try:
                reply = json.loads(line)
                if isinstance(reply, dict) and isinstance(reply.get("token"), str):
                    out.append(reply)
                    continue
            except ValueError:
                pass
            self.log.error("bad_forkserver_reply", reply=line[:200].decode(errors="replace"))
        return out

    def died(self) -> None:
        self.control.close()
