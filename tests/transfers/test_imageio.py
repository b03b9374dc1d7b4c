"""The field's data path: ovirt-imageio's real daemon, given tickets whose URL is an agent's
export, serves the volume over HTTP, and its real client uploads, downloads and checksums
through it; its checksum of the original equals the agent's of the volume."""

import http.client
import json
import shutil
import subprocess

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


def test_imageio_downloads_incremental_backups_through_a_bitmap_export(domain_agent, imageio,
                                                                      workdir):
    """imageio's own incremental backup: its daemon serves the export's bitmap as the dirty
    extents, its client downloads only those into a qcow2 on the previous backup."""
    from ovirt_imageio import client

    from tests.images.chains import qemu_io
    agent = domain_agent
    loc = {"domainID": agent.domain_id, "imageID": new_id(), "volumeID": new_id()}
    path = agent.call("Volume.create", {**loc, "size": SIZE, "format": "cow"})["path"]
    qemu_io(path, "cow", f"write -P 1 0 {16 * MiB}")
    full = str(workdir / "full.qcow2")
    exp = agent.client().call("Export.start", {**loc, "checkpoint": "c1"}, id="full")
    client.download(imageio.ticket(exp, ["read"]), full, None, fmt="qcow2", secure=False)
    agent.call("Export.stop", {"taskID": "full"})
    wait_for(lambda: task_state(agent, "full") == "done", what="the full backup's end")

    qemu_io(path, "cow", f"write -P 2 {MiB} {MiB}", f"write -z {8 * MiB} {MiB}",
            f"discard {12 * MiB} {MiB}", f"write -P 3 {40 * MiB} {MiB}")
    exp = agent.client().call("Export.start", {**loc, "bitmap": "c1"}, id="inc")
    url = imageio.ticket(exp, ["read"], dirty=True)
    status, body = _get(imageio.port, url + "/extents?context=dirty")
    assert status == 200
    dirty = [(e["start"], e["length"]) for e in json.loads(body) if e["dirty"]]
    assert dirty == [(MiB, MiB), (8 * MiB, MiB), (12 * MiB, MiB), (40 * MiB, MiB)]
    inc = str(workdir / "inc.qcow2")
    client.download(url, inc, None, fmt="qcow2", incremental=True, backing_file=full,
                    backing_format="qcow2", secure=False)
    agent.call("Export.stop", {"taskID": "inc"})
    assert compare(inc, "cow", path, "cow").returncode == 0
    allocated = json.loads(subprocess.run(
        ["qemu-img", "map", "--output=json", "-f", "qcow2", inc], capture_output=True,
        text=True, check=True).stdout)
    own = sum(e["length"] for e in allocated if e["depth"] == 0 and e["data"])
    assert own <= 4 * MiB  # only what changed lives in the incremental
