"""ovirt-imageio's real daemon for tests and benchmarks: a config of its own (run dir,
control socket, a free port, TLS off, its log in the test's dir), tickets put through its
control socket, stopped by its pid."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import uuid

from tests.support.harness import wait_for


def executable() -> str:
    return os.path.join(os.path.dirname(sys.executable), "ovirt-imageio")


DAEMON_CONF = """\
[daemon]
run_dir = {run}
drop_privileges = false
systemd_enable = false
poll_interval = 0.1

[tls]
enable = false

[remote]
host = 127.0.0.1
port = {port}

[local]
enable = false

[control]
transport = unix
socket = {run}/ctl.sock

[profile]
filename = {run}/profile

[handler_logfile]
args = ('{log}',)
kwargs = {{}}
"""


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=30)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(self.path)


class Daemon:
    """An ovirt-imageio daemon of the test's own: its config, run dir, control socket and
    a free port, TLS off; stopped by its pid."""

    def __init__(self, base):
        self.base = base
        self.run = base / "run"
        self.run.mkdir(parents=True)
        (base / "conf.d").mkdir()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        (base / "conf.d" / "test.conf").write_text(DAEMON_CONF.format(
            run=self.run, port=self.port, log=base / "daemon.log"))
        self.proc = subprocess.Popen([executable(), "-c", str(base)], stdout=subprocess.DEVNULL,
                                     stderr=open(base / "stderr.log", "wb"))
        wait_for(self._ready, timeout=30, what="the imageio daemon")

    def _ready(self):
        assert self.proc.poll() is None, (self.base / "stderr.log").read_text()[-2000:]
        try:
            self.control("GET", "/tickets/nonesuch")
            return True
        except OSError:
            return False

    def control(self, method: str, path: str, body=None) -> tuple[int, bytes]:
        conn = UnixHTTP(str(self.run / "ctl.sock"))
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def ticket(self, export: dict, ops: list[str], dirty: bool = False) -> str:
        """A ticket for an export; `dirty`: a backup's, whose bitmap imageio serves as
        the dirty extents (download(incremental=True))."""
        ticket_id = str(uuid.uuid4())
        status, body = self.control("PUT", f"/tickets/{ticket_id}", {
            "uuid": ticket_id, "size": export["size"], "url": export["imageio_url"],
            "ops": ops, "timeout": 300, "sparse": True, "dirty": dirty,
            "transfer_id": ticket_id})
        assert status == 200, body
        return f"http://127.0.0.1:{self.port}/images/{ticket_id}"

    def stop(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)


