"""The field's data path: ovirt-imageio's real daemon, given tickets whose URL is an agent's
export, serves the volume over HTTP, and its real client uploads, downloads and checksums
through it; its checksum of the original equals the agent's of the volume."""

import http.client
import json
import shutil

import pytest

from tests.images.chains import compare, needs_qemu, qemu_nbd_under
from tests.support.harness import task_state, wait_for
from tests.support.imageio import Daemon, executable
from tests.support.storage_flow import MiB, new_id
from tests.transfers.helpers import local_image

pytestmark = needs_qemu
SIZE = 64 * MiB


@pytest.fixture
def imageio(workdir):
    if shutil.which(executable()) is None:
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
