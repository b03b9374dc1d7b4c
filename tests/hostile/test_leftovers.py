"""What a killed life leaves, a later one finds and removes: the data file of a create
SIGKILLed before its row (a 2 TiB preallocating qcow2), and the export directories of copy
workers SIGKILLed mid-copy. Real kills, real qemu-img and qemu-nbd."""

from __future__ import annotations

import os
import signal

import psutil
import pytest

from agent.client import CallError
from tests.images.chains import needs_qemu
from tests.support.harness import task_state, wait_for
from tests.support.storage_flow import MiB, dst_for, make_source, new_id, status

pytestmark = [needs_qemu, pytest.mark.timeout(180)]
TIB = 1 << 40


@pytest.fixture
def agent(domain_agent):
    return domain_agent


def _qemu_img_for(volume_id: str) -> psutil.Process | None:
    for p in psutil.process_iter(["name", "cmdline"]):
        if p.info["name"] == "qemu-img" and any(volume_id in a for a in p.info["cmdline"] or ()):
            return p
    return None


def _killed_create(agent, loc: dict) -> str:
    """A preallocating 2 TiB qcow2 create whose worker is SIGKILLed while qemu-img writes
    its metadata: the file it leaves, that no row names."""
    agent.client().send("Volume.create", {**loc, "size": 2 * TIB, "format": "cow",
                                          "preallocation": "preallocated"}, id="doomed")
    path = agent.root / "images" / loc["imageID"] / f"{loc['volumeID']}.qcow2"
    tool = wait_for(lambda: _qemu_img_for(loc["volumeID"]), 60, interval=0.005,
                    what="qemu-img preallocating")
    wait_for(lambda: path.exists() and path.stat().st_blocks > 0, 60, interval=0.005,
             what="qemu-img writing the file")
    worker = next(w for w in agent.call("Host.getStats")["workers"] if w["taskID"] == "doomed")
    os.kill(worker["pid"], signal.SIGKILL)
    wait_for(lambda: task_state(agent, "doomed") == "failed", 60, what="the create failed")
    psutil.wait_procs([tool], timeout=30)  # it dies with its worker
    assert path.exists() and path.stat().st_blocks > 0, "the kill left nothing to find"
    with pytest.raises(CallError) as exc:
        agent.call("Volume.getInfo", loc)
    assert exc.value.code == 201  # no row names it
    return str(path)


def _held(agent) -> int:
    """Bytes the domain's images hold (its own directory: a file system's free space moves
    with every other test writing beside this one)."""
    return sum(os.stat(os.path.join(d, f)).st_blocks * 512
               for d, _, files in os.walk(agent.root / "images") for f in files)


def test_a_killed_creates_file_is_gone_when_its_id_is_made_again_in_another_format(agent):
    loc = {"domainID": agent.domain_id, "imageID": new_id(), "volumeID": new_id()}
    leftover = _killed_create(agent, loc)
    info = agent.call("Volume.create", {**loc, "size": 16 * MiB, "format": "raw"})
    assert not os.path.exists(leftover) and os.path.exists(info["path"])
    assert sorted(os.listdir(os.path.dirname(info["path"]))) == \
        [os.path.basename(info["path"])]


def test_a_delete_of_a_killed_create_removes_its_file_and_says_no_such_volume(agent):
    loc = {"domainID": agent.domain_id, "imageID": new_id(), "volumeID": new_id()}
    leftover = _killed_create(agent, loc)
    before, its = _held(agent), os.stat(leftover).st_blocks * 512
    with pytest.raises(CallError) as exc:
        agent.call("Volume.delete", loc)
    assert exc.value.code == 201 and exc.value.data["removed_leftover"] == ["cow"]
    assert not os.path.exists(leftover)
    assert its > 0 and _held(agent) <= before - its  # the space is back


def test_a_restart_sweeps_what_killed_creates_left_and_keeps_every_volume(agent):
    kept = agent.call("Volume.create", {"domainID": agent.domain_id, "imageID": new_id(),
                                        "volumeID": new_id(), "size": 8 * MiB})
    loc = {"domainID": agent.domain_id, "imageID": new_id(), "volumeID": new_id()}
    leftover = _killed_create(agent, loc)
    agent.kill()
    agent.start()
    wait_for(lambda: not os.path.exists(leftover), 60, what="the leftover swept at start-up")
    assert os.path.exists(kept["path"])
    assert agent.call("Volume.getInfo", {k: kept[k] for k in ("domainID", "imageID",
                                                              "volumeID")})["legality"] == "LEGAL"


def test_killed_copy_workers_leave_no_export_directory_for_ever(make_agent, workdir):
    """qcow2 copies SIGKILLed mid-copy (their qemu-nbd with them) leave their export dirs
    (socket, log) under the run dir; the next start of the agent removes every one."""
    agent = make_agent(copy={"chunk_bytes": MiB, "checkpoint_bytes": MiB,
                             "max_bytes_per_second": 2 * MiB},
                       recovery={"copy_policy": "manual"})
    domain = new_id()
    agent.call("StorageDomain.create", {"domainID": domain, "path": str(workdir / "d")})
    exports = agent.run_dir / "exports"
    killed = set()
    for i in range(3):
        src = make_source(agent, domain, 32 * MiB)
        dst = dst_for(domain)
        agent.client().call("Image.copy", {"src": src, "dst": dst, "format": "cow"},
                            id=f"c{i}")
        holder = wait_for(lambda: (s := status(agent, dst))["copy"] and s["copy"]["lease"]
                          and s["copy"]["lease"]["live"] and s["copy"]["lease"], 60,
                          what="a live copier")
        wait_for(lambda: exports.exists() and any(n.startswith(f"{holder['pid']}-")
                                                  for n in os.listdir(exports)), 30,
                 what="its export dir")
        os.kill(holder["pid"], signal.SIGKILL)
        killed.add(str(holder["pid"]))
        wait_for(lambda: task_state(agent, f"c{i}") == "failed", 60, what="the copy failed")
    # Nobody could remove them: their owners died (a copy makes one for its source and one
    # for its destination; the kill may land between the two).
    assert {name.split("-", 1)[0] for name in os.listdir(exports)} == killed
    agent.kill()
    agent.start()
    assert os.listdir(exports) == []
