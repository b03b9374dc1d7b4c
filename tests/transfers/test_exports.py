"""Exports are tasks: served by a real qemu-nbd on a private unix socket, ended by a stop, an
abort, idleness, or the death of their worker or agent (qemu-nbd never outlives them); a
write export is a transfer any host reads, never LEGAL until its finish has checked it."""

import grp
import os
import signal
import stat
import subprocess
import time

import psutil
import pytest

from agent.client import CallError
from tests.images.chains import (
    compare,
    announced_wait,
    make_chain,
    needs_qemu,
    qemu_io,
    qemu_nbd_under,
)
from tests.support.harness import events_until, task_state, wait_for, worker_of
from tests.support.storage_flow import MiB, ids, new_id
from tests.transfers.helpers import nbd_connect

pytestmark = needs_qemu
SIZE = 64 * MiB


def servers_of(worker: psutil.Process) -> list[psutil.Process]:
    return [p for p in worker.children() if p.name() == "qemu-nbd"]


def gone(*procs) -> None:
    def dead(p):
        try:
            return p.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    wait_for(lambda: all(dead(p) for p in procs), timeout=15, what="processes gone")


def nbdcopy(src: str, dst: str) -> None:
    done = subprocess.run(["nbdcopy", src, dst], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_read_and_layer_exports_serve_a_chain_and_end_when_stopped(domain_agent, workdir):
    agent = domain_agent
    chain = make_chain(agent, agent.domain_id, size=SIZE, base_format="raw", layers=3)
    client = agent.client()
    answer = client.call("Export.start", ids(chain[-1]), id="read")
    assert answer["mode"] == "read" and answer["size"] == SIZE and answer["format"] == "raw"
    assert answer["url"] == f"nbd+unix:///?socket={answer['socket']}"
    assert answer["imageio_url"] == f"nbd:unix:{answer['socket']}"
    sock_mode = os.stat(answer["socket"]).st_mode
    assert stat.S_ISSOCK(sock_mode) and stat.S_IMODE(sock_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(answer["socket"])).st_mode) == 0o700
    assert os.path.dirname(os.path.dirname(answer["socket"])) == str(agent.run_dir / "exports")
    active = agent.call("Task.getAll", {"states": ["running"]})
    assert [t["id"] for t in active if t["method"] == "Export.start"] == ["read"]
    out = workdir / "guest.raw"
    nbdcopy(answer["url"], str(out))
    nbdcopy(answer["url"], str(workdir / "again.raw"))  # it stays up between clients
    assert compare(chain[-1]["path"], "cow", str(out), "raw").returncode == 0
    layer = client.call("Export.start", {**ids(chain[1]), "mode": "layer"}, id="layer")
    nbdcopy(layer["url"], str(workdir / "layer.raw"))
    alone = f'json:{{"driver":"qcow2","backing":null,"file":{{"driver":"file",' \
            f'"filename":"{chain[1]["path"]}"}}}}'
    subprocess.run(["qemu-img", "convert", "-O", "raw", alone, str(workdir / "want.raw")],
                   check=True, timeout=60)
    assert compare(str(workdir / "want.raw"), "raw", str(workdir / "layer.raw"),
                   "raw").returncode == 0
    for task_id in ("read", "layer"):
        assert client.call("Export.stop", {"taskID": task_id}) == {"taskID": task_id,
                                                                    "stopping": True}
    for task_id in ("read", "layer"):
        wait_for(lambda: task_state(agent, task_id) == "done", what=f"{task_id} done")
        record = agent.call("Task.getStatus", {"taskID": task_id})
        assert record["result"]["ended"] == "stop" and record["result"]["qemu_nbd_exit"] == 0
    assert not os.path.exists(answer["socket"])
    assert qemu_nbd_under(str(agent.root)) == []


def test_an_export_ends_by_abort_and_when_idle_but_not_while_a_client_is_connected(
        domain_agent):
    agent = domain_agent
    vol = make_chain(agent, agent.domain_id, size=SIZE, layers=1)[0]
    client = agent.client()
    client.call("Export.start", ids(vol), id="aborted")
    agent.call("Task.abort", {"taskID": "aborted"})
    wait_for(lambda: task_state(agent, "aborted") == "aborted", what="the export aborted")
    answer = client.call("Export.start", {**ids(vol), "timeout": 1}, id="idle")
    h = nbd_connect(answer["socket"])
    connected = time.monotonic()
    while time.monotonic() - connected < 3.0:  # three times its timeout, a client connected
        assert task_state(agent, "idle") == "running"  # (a window asserted over, no wait)
        h.pread(4 * MiB, 0)
    h.shutdown()
    wait_for(lambda: task_state(agent, "idle") == "done", timeout=20, what="idle export done")
    assert agent.call("Task.getStatus", {"taskID": "idle"})["result"]["ended"] == "inactive"
    assert qemu_nbd_under(str(agent.root)) == []


def test_qemu_nbd_never_outlives_its_worker_or_its_agent(domain_agent):
    agent = domain_agent
    loc = {"domainID": agent.domain_id, "imageID": new_id(), "volumeID": new_id()}
    client = agent.client()
    answer = client.call("Export.start", {**loc, "mode": "write", "tag": "t",
                                          "create": {"size": SIZE, "format": "cow"}}, id="w1")
    h = nbd_connect(answer["socket"])
    h.pwrite(b"\x07" * MiB, 0)
    h.flush()
    worker = worker_of(agent, "w1")
    servers = servers_of(worker)
    assert len(servers) == 1
    worker.kill()
    gone(worker, *servers)
    wait_for(lambda: task_state(agent, "w1") == "failed", what="the export failed")
    status = agent.call("Image.getStatus", loc)
    assert status["legality"] == "ILLEGAL" and status["transfer"]["state"] == "interrupted"
    again = client.call("Export.start", {**loc, "mode": "write", "tag": "t"}, id="w2")
    assert again["generation"] == answer["generation"] + 1
    assert agent.call("Image.getStatus", loc)["transfer"]["attempts"] == 2
    h = nbd_connect(again["socket"])
    assert h.pread(MiB, 0) == b"\x07" * MiB  # what was flushed before the kill is there
    worker = worker_of(agent, "w2")
    servers = servers_of(worker)
    agent.kill(signal.SIGKILL)
    gone(worker, *servers)
    assert qemu_nbd_under(str(agent.root)) == []
    assert os.listdir(agent.run_dir / "exports")  # what the dead life left...
    agent.start()
    assert os.listdir(agent.run_dir / "exports") == []  # ...is swept by the next
    status = agent.call("Image.getStatus", loc)
    assert status["legality"] == "ILLEGAL" and status["transfer"]["state"] == "interrupted"


def test_a_transfer_is_read_from_any_host_and_never_legal_until_finished(domain_agent,
                                                                         make_agent):
    a = domain_agent
    b = make_agent("b")
    b.call("StorageDomain.attach", {"domainID": a.domain_id, "path": str(a.root)})
    loc = {"domainID": a.domain_id, "imageID": new_id(), "volumeID": new_id()}
    answer = a.client().call("Export.start", {**loc, "mode": "write", "tag": "t1", "create": {
        "size": SIZE, "format": "raw"}}, id="up")
    h = nbd_connect(answer["socket"])
    h.pwrite(b"\x05" * (4 * MiB), 0)
    h.flush()
    seen = b.call("Image.getStatus", loc)
    assert seen["legality"] == "ILLEGAL"
    assert seen["transfer"]["state"] == "serving" and seen["transfer"]["host_id"] == "host-a"
    assert seen["transfer"]["lease"]["live"] and seen["transfer"]["task_id"] == "up"
    assert b.call("Volume.getInfo", loc)["transfer"]["tag"] == "t1"
    wait_for(lambda: b.call("Image.getStatus", loc)["transfer"]["written"] >= 4 * MiB,
             what="written recorded while it serves")
    for call, params in (("Export.start", loc), ("Image.copy", {"src": loc, "dst": {
            **loc, "volumeID": new_id()}})):
        with pytest.raises(CallError) as exc:
            b.client().call(call, params, id=new_id())
        assert exc.value.name == "VolumeIllegal", call
    with pytest.raises(CallError) as exc:  # another writer, from another host
        b.client().call("Export.start", {**loc, "mode": "write", "tag": "t1"}, id="b-up")
    assert exc.value.name == "LeaseHeld"
    h.shutdown()
    a.kill(signal.SIGKILL)
    wait_for(lambda: b.call("Image.getStatus", loc)["transfer"]["state"] == "interrupted",
             what="the transfer interrupted, seen from b")
    assert b.call("Image.getStatus", loc)["legality"] == "ILLEGAL"
    with pytest.raises(CallError) as exc:  # another client's upload is never taken over
        b.client().call("Export.start", {**loc, "mode": "write", "tag": "t2"}, id=new_id())
    assert exc.value.name == "TransferConflict" and exc.value.data["reason"] == "tag"
    again = b.client().call("Export.start", {**loc, "mode": "write", "tag": "t1"}, id="b-up2")
    h = nbd_connect(again["socket"])
    assert h.pread(4 * MiB, 0) == b"\x05" * (4 * MiB)
    h.pwrite(b"\x06" * MiB, 8 * MiB)
    h.flush()
    h.shutdown()
    done = b.client().call("Export.finish", loc, id="fin", timeout=60)
    assert done["legality"] == "LEGAL" and done["generation"] == again["generation"] + 1
    assert b.call("Image.getStatus", loc)["transfer"] is None
    wait_for(lambda: task_state(b, "b-up2") == "done", what="the export stopped by finish")


def test_what_a_write_export_refuses_and_what_a_finish_checks(domain_agent):
    agent = domain_agent
    chain = make_chain(agent, agent.domain_id, size=SIZE, layers=2)
    client = agent.client()

    def refused(method, params, name, reason=None):
        with pytest.raises(CallError) as exc:
            client.call(method, params, id=new_id(), timeout=60)
        assert exc.value.name == name, (method, exc.value)
        if reason:
            assert exc.value.data["reason"] == reason, exc.value.data
        return exc.value
    refused("Export.start", {**ids(chain[0]), "mode": "write"}, "VolumeHasChildren")
    refused("Export.start", {**ids(chain[1]), "mode": "write", "create": {"size": SIZE}},
            "VolumeExists")
    refused("Export.start", {**ids(chain[1]), "create": {"size": SIZE}}, "InvalidParams")
    refused("Export.start", {**ids(chain[1]), "mode": "write", "create": {"size": 1000,
            "format": "cow"}}, "InvalidParams")
    loc = {"domainID": agent.domain_id, "imageID": new_id(), "volumeID": new_id()}
    answer = client.call("Export.start", {**loc, "mode": "write", "create": {
        "size": SIZE, "format": "cow"}}, id="up")
    h = nbd_connect(answer["socket"])
    h.pwrite(b"\x01" * MiB, 0)
    h.flush()
    h.shutdown()
    refused("Export.stop", {"taskID": "up", "finish": True, "checksum": "md5:00"},
            "InvalidParams")
    wrong = "blake3-4m:" + "0" * 64
    err = refused("Export.stop", {"taskID": "up", "finish": True, "checksum": wrong},
                  "TransferConflict", "checksum")
    assert err.data["expected"] == wrong and err.data["found"].startswith("blake3-4m:")
    assert client.call("Image.getStatus", loc)["legality"] == "ILLEGAL"  # nothing lost
    done = client.call("Export.finish", {**loc, "checksum": err.data["found"]}, id="fin")
    assert done["legality"] == "LEGAL" and done["checksum"] == err.data["found"]
    assert done["already"] is False
    again = client.call("Export.finish", {**loc, "checksum": err.data["found"]}, id="fin2")
    assert again["already"] is True and again["generation"] == done["generation"]
    refused("Export.finish", {**loc, "checksum": wrong}, "TransferConflict", "checksum")
    refused("Export.stop", {"taskID": "fin"}, "InvalidParams")  # not an export's task
    refused("Export.finish", ids(chain[1]) | {"volumeID": new_id()}, "NoSuchVolume")


def test_a_fenced_transfer_stops_serving(domain_agent):
    agent = domain_agent
    loc = {"domainID": agent.domain_id, "imageID": new_id(), "volumeID": new_id()}
    answer = agent.client().call("Export.start", {**loc, "mode": "write", "create": {
        "size": SIZE, "format": "raw"}}, id="up")
    worker = worker_of(agent, "up")
    servers = servers_of(worker)
    # The engine lost track of the upload and fences it (the lease is held: it waits out a
    # short timeout and fences through the generation only once the export lets go).
    with pytest.raises(CallError) as exc:
        agent.client().call("Volume.fence", {**loc, "generation": answer["generation"],
                                             "timeout": 1}, id="fence")
    assert exc.value.name == "LeaseHeld"
    agent.call("Task.abort", {"taskID": "up"})
    gone(*servers)
    fenced = agent.client().call("Volume.fence", {**loc, "generation": answer["generation"]},
                                 id="fence2")
    assert fenced["generation"] == answer["generation"] + 1
    status = agent.call("Image.getStatus", loc)
    assert status["transfer"]["generation"] == fenced["generation"]
    assert status["legality"] == "ILLEGAL"


def test_export_sockets_open_to_a_configured_group(make_agent, workdir):
    group = grp.getgrnam("daemon")
    agent = make_agent(exports={"group": "daemon"})
    dom = new_id()
    agent.call("StorageDomain.create", {"domainID": dom, "path": str(workdir / "dom")})
    loc = {"domainID": dom, "imageID": new_id(), "volumeID": new_id()}
    agent.call("Volume.create", {**loc, "size": SIZE})
    answer = agent.client().call("Export.start", loc, id="e")
    sock, folder = os.stat(answer["socket"]), os.stat(os.path.dirname(answer["socket"]))
    assert (stat.S_IMODE(sock.st_mode), sock.st_gid) == (0o660, group.gr_gid)
    assert (stat.S_IMODE(folder.st_mode), folder.st_gid) == (0o750, group.gr_gid)
    base = os.stat(agent.run_dir / "exports")
    assert (stat.S_IMODE(base.st_mode), base.st_gid) == (0o710, group.gr_gid)
    agent.call("Task.abort", {"taskID": "e"})
    wait_for(lambda: task_state(agent, "e") == "aborted", what="aborted")


def test_qemu_io_sees_what_the_export_wrote(domain_agent, workdir):
    """The guest view written through a cow volume's export is the volume's own, made by
    qemu: thin, and checked clean at finish."""
    agent = domain_agent
    loc = {"domainID": agent.domain_id, "imageID": new_id(), "volumeID": new_id()}
    answer = agent.client().call("Export.start", {**loc, "mode": "write", "create": {
        "size": SIZE, "format": "cow"}}, id="up")
    h = nbd_connect(answer["socket"])
    h.pwrite(b"\x09" * MiB, 10 * MiB)
    h.zero(2 * MiB, 20 * MiB)
    h.flush()
    h.shutdown()
    agent.client().call("Export.finish", loc, id="fin", timeout=60)
    info = agent.call("Volume.getInfo", loc)
    want = workdir / "want.raw"
    with open(want, "wb") as f:
        f.truncate(SIZE)
    qemu_io(str(want), "raw", f"write -P 9 {10 * MiB} {MiB}")
    assert compare(str(want), "raw", info["path"], "cow").returncode == 0
    assert info["allocated"] < 4 * MiB


def test_a_transfer_taken_up_again_waits_out_the_lock_a_dying_writer_holds(domain_agent,
                                                                         workdir):
    """A killed writer's qemu-nbd can hold the image's lock a while after its worker is
    gone (a thread still finishing its I/O): the next export of the transfer says it waits
    (Export.state waiting) and serves once the lock is let go, rather than failing."""
    agent = domain_agent
    loc = {"domainID": agent.domain_id, "imageID": new_id(), "volumeID": new_id()}
    client = agent.client()
    answer = client.call("Export.start", {**loc, "mode": "write", "tag": "t",
                                          "create": {"size": SIZE, "format": "cow"}}, id="w1")
    worker = worker_of(agent, "w1")
    servers = servers_of(worker)
    worker.kill()
    gone(worker, *servers)
    events = agent.subscribe("Export.state")
    announced_wait(workdir, agent.call("Volume.getInfo", loc)["path"], "cow", events,
                   lambda: client.send("Export.start", {**loc, "mode": "write", "tag": "t"},
                                       id="w2"))
    again = client.recv(30)
    assert again.get("id") == "w2" and again["result"]["generation"] == \
        answer["generation"] + 1, again
    client.call("Export.stop", {"taskID": "w2"})
    wait_for(lambda: task_state(agent, "w2") == "done", what="the export's end")
