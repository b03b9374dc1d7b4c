"""The field's data path: ovirt-imageio's real daemon, given tickets whose URL is an agent's
export, serves the volume over HTTP, and its real client uploads, downloads and checksums
through it; its checksum of the original equals the agent's of the volume."""

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid

import pytest

from tests.images.chains import compare, needs_qemu, qemu_nbd_under
from tests.support.harness import task_state, wait_for
from tests.support.storage_flow import MiB, new_id
from tests.transfers.helpers import local_image

pytestmark = needs_qemu
SIZE = 64 * MiB
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
        exe = os.path.join(os.path.dirname(sys.executable), "ovirt-imageio")
        self.proc = subprocess.Popen([exe, "-c", str(base)], stdout=subprocess.DEVNULL,
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

    def ticket(self, export: dict, ops: list[str]) -> str:
        ticket_id = str(uuid.uuid4())
        status, body = self.control("PUT", f"/tickets/{ticket_id}", {
            "uuid": ticket_id, "size": export["size"], "url": export["imageio_url"],
            "ops": ops, "timeout": 300, "sparse": True, "dirty": False,
            "transfer_id": ticket_id})
        assert status == 200, body
        return f"http://127.0.0.1:{self.port}/images/{ticket_id}"

    def stop(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)


@pytest.fixture
def imageio(workdir):
    if shutil.which(os.path.join(os.path.dirname(sys.executable), "ovirt-imageio")) is None:
        pytest.fail("ovirt-imageio is not installed (pip install -e '.[test]')")
    daemon = Daemon(workdir / "imageio")
    yield daemon
    daemon.stop()


def test_imageio_uploads_downloads_and_checksums_through_exports(domain_agent, imageio,
                                                                 workdir):
    from ovirt_imageio import client
    agent = domain_agent
    local = workdir / "local"
    local.mkdir()
    src = local_image(local / "src.qcow2", "qcow2", SIZE)
    loc = {"domainID": agent.domain_id, "imageID": new_id(), "volumeID": new_id()}
    exp = agent.client().call("Export.start", {**loc, "mode": "write", "tag": "imageio",
                                               "create": {"size": SIZE, "format": "cow"}},
                              id="up")
    url = imageio.ticket(exp, ["read", "write"])
    client.upload(src, url, None, secure=False)
    theirs = client.checksum(src)
    assert theirs["algorithm"] == "blake2b" and theirs["block_size"] == 4 * MiB
    done = agent.client().call("Export.stop", {
        "taskID": "up", "finish": True, "checksum": "blake2b:" + theirs["checksum"]},
        id="finish", timeout=120)
    assert done["legality"] == "LEGAL"
    info = agent.call("Volume.getInfo", loc)
    assert compare(src, "cow", info["path"], "cow").returncode == 0
    ours = agent.call("Image.checksum", {**loc, "algorithm": "blake2b"})
    assert ours["checksum"] == theirs["checksum"]
    read = agent.client().call("Export.start", loc, id="down")
    url = imageio.ticket(read, ["read"])
    status, body = _get(imageio.port, url + "/checksum")
    assert status == 200 and json.loads(body)["checksum"] == theirs["checksum"]
    for fmt in ("raw", "qcow2"):
        out = str(local / f"down.{fmt}")
        client.download(url, out, None, fmt=fmt, secure=False)
        assert compare(src, "cow", out, "cow" if fmt == "qcow2" else "raw").returncode == 0
    agent.call("Export.stop", {"taskID": "down"})
    wait_for(lambda: task_state(agent, "down") == "done", what="the read export done")
    assert qemu_nbd_under(str(agent.root)) == []


def _get(port: int, url: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", url.split(str(port), 1)[1])
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()
