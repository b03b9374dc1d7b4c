"""What a transfer writes is never trusted: a volume's file made hostile while it is under
transfer (by anyone who can write it: the uploader's bytes through another door, a second
writer) is refused when the transfer is finished or exported again, with the named reasons
of the hostile-disk suite, and nothing the image names is ever opened; a qcow2 uploaded as
the data of a raw volume stays data."""

import json
import os

import pytest

from agent.client import CallError
from tests.hostile.test_images import HEADER_KINDS, SIZE
from tests.images.chains import make_chain, needs_qemu, qemu_nbd_under
from tests.support.harness import task_state, wait_for
from tests.support.opens import Opens
from tests.support.storage_flow import ids, new_id
from tests.transfers.helpers import nbd_connect, run

pytestmark = needs_qemu
KINDS = ["data-file-host", "data-file-host-raw", "backing-host", "backing-json",
         "marked-corrupt", "virtual-size", "vmdk", "unknown-feature"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_transfer_made_hostile_is_refused_at_finish_and_never_served_again(domain_agent,
                                                                             workdir, kind):
    agent = domain_agent
    chain = make_chain(agent, agent.domain_id, size=SIZE, base_format="raw", layers=2)
    top = chain[1]
    client = agent.client()
    exp = client.call("Export.start", {**ids(top), "mode": "write", "tag": "t"}, id="up")
    h = nbd_connect(exp["socket"])
    h.pwrite(b"\x03" * 65536, 0)
    h.flush()
    h.shutdown()
    client.call("Export.stop", {"taskID": "up"})
    wait_for(lambda: task_state(agent, "up") == "done", what="the export stopped")
    scratch, targets = workdir / "scratch", workdir / "targets"
    scratch.mkdir()
    targets.mkdir()
    (targets / "host-file").write_bytes(b"secret " * 1000)
    plant, reason = HEADER_KINDS[kind]
    watched = plant(top, chain[0], scratch, targets)
    opens = Opens(*watched) if watched else None
    for method, params in (("Export.finish", ids(top)),
                           ("Export.start", {**ids(top), "mode": "write", "tag": "t"}),
                           ("Image.checksum", ids(top))):
        with pytest.raises(CallError) as exc:
            client.call(method, params, id=new_id(), timeout=60)
        err = exc.value
        assert err.code == 216 and err.data["reason"] == reason, (method, err.data)
        text = json.dumps(err.data) + err.message
        assert "host-file" not in text and "/etc" not in text, text
    if opens is not None:
        assert opens.seen() == [], "a file the image names was opened"
        opens.close()
    status = agent.call("Image.getStatus", ids(top))
    assert status["legality"] == "ILLEGAL" and status["transfer"]["state"] == "stopped"
    assert qemu_nbd_under(str(agent.root)) == []
    deleted = agent.call("Volume.delete", ids(top))  # the way out: delete it
    assert deleted["deleted"] is True


def test_a_qcow2_uploaded_into_a_raw_volume_stays_data(domain_agent, workdir):
    """A qcow2 naming a host file as its backing, uploaded as the bytes of a raw volume:
    LEGAL as raw, and copying or downloading it never opens what it names."""
    import subprocess
    agent = domain_agent
    target = workdir / "host-file"
    target.write_bytes(b"secret " * 1000)
    hostile = str(workdir / "hostile.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", str(target), "-F",
                    "raw", hostile, str(SIZE)], check=True, timeout=60)
    loc = {"domainID": agent.domain_id, "imageID": new_id(), "volumeID": new_id()}
    opens = Opens(str(target))
    show = f"{loc['domainID']}/{loc['imageID']}/{loc['volumeID']}"
    code, answer, err = run(agent, "upload", hostile, show, "--local-format", "raw")
    assert code == 0, err
    info = agent.call("Volume.getInfo", loc)
    assert info["format"] == "raw" and info["legality"] == "LEGAL"
    assert info["size"] == os.path.getsize(hostile)  # the file's bytes, to the last one
    with open(info["path"], "rb") as f:
        assert f.read(4) == b"QFI\xfb"  # its bytes, as sent
    dst = {"domainID": agent.domain_id, "imageID": new_id(), "volumeID": new_id()}
    agent.client().call("Image.copy", {"src": loc, "dst": dst}, id="c")
    wait_for(lambda: agent.call("Image.getStatus", dst)["legality"] == "LEGAL", timeout=60,
             what="the copy LEGAL")
    code, _, err = run(agent, "download", show, str(workdir / "down.raw"))
    assert code == 0, err
    assert opens.seen() == [], "the backing file the raw volume's bytes name was opened"
    opens.close()
