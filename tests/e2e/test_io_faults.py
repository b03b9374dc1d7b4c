"""I/O faults during a copy: ENOSPC from a real small file system (a tmpfs mounted under the
domain's images/, so the data fills up while the metadata still has room), EIO on read and
on fsync from the copy engine's fault seam (workers/testseams.py). Expected: the task fails
with 204 NoSpace or a clear I/O error, the destination stays ILLEGAL, the marker keeps the
error, and nothing is reported as success."""

import json
import os

import pytest

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

COPY = {"chunk_bytes": MiB, "checkpoint_bytes": 2 * MiB, "checkpoint_seconds": 0.1}
RECOVERY = {"copy_policy": "resume", "max_attempts": 2, "backoff_seconds": 0.1}


def failed_copy(agent, src, dst):
    c = agent.client()
    c.send("Image.copy", {"src": src, "dst": dst}, id="c")
    wait_for(lambda: task_state(agent, "c") == "failed", 30)
    rec = agent.call("Task.getStatus", {"taskID": "c"})
    assert rec["state"] == "failed" and rec["returned"] is True
    assert rec["result"]["state"] == "copying"  # the only success it ever reported: started
    return rec["error"]


def settled_abandoned(agent, dst):
    st = wait_for(lambda: (s := status(agent, dst))["copy"]["state"] == "abandoned" and s, 30)
    assert st["legality"] == "ILLEGAL"
    assert st["copy"]["copied"] < st["copy"]["total"]
    return st


def test_enospc_from_a_real_small_filesystem(make_agent, workdir):
    agent = make_agent(copy=COPY, recovery=RECOVERY)
    big_id, small_id = new_id(), new_id()
    agent.call("StorageDomain.create", {"domainID": big_id, "path": str(workdir / "big")})
    small = workdir / "small"
    agent.call("StorageDomain.create", {"domainID": small_id, "path": str(small)})
    with tmpfs(small / "images", "8m"):
        src = make_source(agent, big_id, 32 * MiB)
        dst = dst_for(small_id)
        err = failed_copy(agent, src, dst)
        assert err["code"] == 204 and err["data"]["name"] == "NoSpace", err
        assert err["data"]["errno"] == "ENOSPC"
        st = settled_abandoned(agent, dst)
        names = [e["data"]["name"] for e in st["copy"]["errors"]]
        assert names == ["NoSpace", "NoSpace"]  # each attempt's own error, once each
        assert integrity(small) == "ok"
        agent.kill()


@pytest.mark.parametrize("kind", ["copy", "fsync"])
def test_eio(make_agent, workdir, kind):
    faults = {"io_error": {"kind": kind, "errno": "EIO", "at_offset": 4 * MiB}}
    agent = make_agent(copy=COPY, recovery=RECOVERY, start=False)
    agent.start(env={"HOSTAGENT_TEST_FAULTS": json.dumps(faults)})
    domain_id, path = new_id(), str(workdir / "d")
    agent.call("StorageDomain.create", {"domainID": domain_id, "path": path})
    src = make_source(agent, domain_id, 16 * MiB)
    dst = dst_for(domain_id)
    err = failed_copy(agent, src, dst)
    assert err["data"]["name"] == "OperationFailed" and err["data"]["errno"] == "EIO", err
    assert "Input/output error" in err["message"]
    st = settled_abandoned(agent, dst)
    assert [e["data"]["errno"] for e in st["copy"]["errors"]] == ["EIO", "EIO"]
    assert st["copy"]["copied"] <= 4 * MiB  # never claims data past the fault
    assert integrity(path) == "ok"
    assert not os.path.exists(os.path.join(path, "metadata.db-journal"))
