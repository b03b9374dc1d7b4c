"""Class 5: a domain that fills its own file system (data and metadata on one small tmpfs).

A full disk is 204 NoSpace, every time it happens (the data's ENOSPC and the metadata's
SQLITE_FULL alike), never 105; and there is always a way out: deleting a volume on the full
domain works (the metadata reserve, agent/storage/metadata.py), gives the space back, and the
domain is usable again."""

import os

import pytest

from agent.client import CallError
from tests.support.harness import task_state, wait_for
from tests.support.storage_flow import (
    MiB,
    dst_for,
    integrity,
    make_source,
    new_id,
    status,
    tmpfs,
)

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def small_fs(workdir):
    with tmpfs(workdir / "small", "24m") as path:
        yield path


def free_bytes(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def deleted(agent, loc) -> bool:
    try:
        return agent.call("Volume.delete", loc)["deleted"]
    except CallError as exc:
        assert exc.name == "LeaseHeld", exc  # a retry is copying it (and will find no room)
        return False


@pytest.mark.parametrize("round_", range(2))
def test_a_domain_that_fills_its_own_disk_always_has_a_way_out(make_agent, workdir, small_fs,
                                                               round_, scale):
    agent = make_agent(copy={"chunk_bytes": MiB, "checkpoint_bytes": MiB,
                             "checkpoint_seconds": 0.01},
                       recovery={"copy_policy": "resume", "max_attempts": 2,
                                 "backoff_seconds": 0.1})
    big, small = new_id(), new_id()
    agent.call("StorageDomain.create", {"domainID": big, "path": str(workdir / "big")})
    agent.call("StorageDomain.create", {"domainID": small, "path": str(small_fs)})
    empty = free_bytes(small_fs)
    src = make_source(agent, big, 48 * MiB, seed=round_)
    dst = dst_for(small)
    c = agent.client()
    c.send("Image.copy", {"src": src, "dst": dst}, id="fill")
    wait_for(lambda: task_state(agent, "fill") == "failed", 60)
    rec = agent.call("Task.getStatus", {"taskID": "fill"})
    assert rec["error"]["code"] == 204 and rec["error"]["data"]["name"] == "NoSpace", rec
    # Its retries meet the same full disk: each is NoSpace too, then it is given up (or left
    # copying, if even the abandon's write found no room).
    wait_for(lambda: [t for t in agent.call("Task.getAll", {"states": ["done", "failed"]})
                      if t["method"] == "Recovery.abandon"], 60, interval=0.1,
             what="the retries to end in an abandon (which may itself find no room)")
    for t in agent.call("Task.getAll", {"states": ["failed"]}):
        if t["method"] in ("Image.copy", "Recovery.abandon"):
            assert t["error"]["data"]["name"] == "NoSpace", t
    assert free_bytes(small_fs) < 2 * MiB  # it is full
    # The way out: delete the partial destination.
    assert agent.call("Volume.delete", dst) == {"volumeID": dst["volumeID"], "deleted": True}
    with pytest.raises(CallError) as exc:
        status(agent, dst)
    assert exc.value.name == "NoSuchVolume"
    assert free_bytes(small_fs) >= empty - 2 * MiB  # the room is back, the reserve too
    assert os.path.getsize(small_fs / "metadata.reserve") > 0
    assert integrity(small_fs) == "ok"
    # And the domain is usable: a copy that fits ends LEGAL; fill it again and again.
    fits = make_source(agent, big, 4 * MiB, seed=9)
    dst2 = dst_for(small)
    agent.call("Image.copy", {"src": fits, "dst": dst2})
    wait_for(lambda: status(agent, dst2)["legality"] == "LEGAL", 60)
    for again in range(scale - 1):
        dst3 = dst_for(small)
        c.send("Image.copy", {"src": src, "dst": dst3}, id=f"again{again}")
        wait_for(lambda: task_state(agent, f"again{again}") == "failed", 60)
        wait_for(lambda: deleted(agent, dst3), 60, interval=0.2,
                 what="the partial copy's delete, once no retry holds its lease")
        assert free_bytes(small_fs) >= empty - 6 * MiB
    assert agent.call("Host.getStats")["agent"]["callback_errors"] == 0
