"""Volume.fence with the local lease manager: the same contract as with sanlock, on one
host (tests/sanlock/test_hosts.py has the hosts that share storage)."""

import pytest

from agent.client import CallError
from tests.support.harness import task_state, wait_for
from tests.support.storage_flow import (
    MiB,
    dst_for,
    make_source,
    new_id,
    sha256,
    wait_legal,
)


def test_fence_raises_the_generation_and_a_stale_one_is_refused(make_agent, workdir):
    agent = make_agent(copy={"max_bytes_per_second": 16 * MiB, "checkpoint_seconds": 0.1},
                       recovery={"copy_policy": "manual"})
    domain_id = new_id()
    agent.call("StorageDomain.create", {"domainID": domain_id, "path": str(workdir / "d")})
    src = make_source(agent, domain_id, 32 * MiB)
    dst = dst_for(domain_id)
    first = agent.client().call("Image.copy", {"src": src, "dst": dst}, id="c1")
    with pytest.raises(CallError) as exc:  # the copy holds the lease: a short fence gives up
        agent.call("Volume.fence", {**dst, "generation": first["generation"], "timeout": 1})
    assert exc.value.code == 203
    agent.call("Task.abort", {"taskID": "c1"})
    wait_for(lambda: task_state(agent, "c1") == "aborted", what="the copy stopped")
    fenced = agent.call("Volume.fence", {**dst, "generation": first["generation"]})
    assert fenced == {"volumeID": dst["volumeID"], "generation": first["generation"] + 1,
                      "fenced": True, "waited": fenced["waited"]}
    status = agent.call("Image.getStatus", dst)
    assert status["generation"] == status["copy"]["generation"] == fenced["generation"]
    with pytest.raises(CallError) as exc:  # fencing from a generation that moved on
        agent.call("Volume.fence", {**dst, "generation": first["generation"]})
    assert exc.value.code == 206
    with pytest.raises(CallError) as exc:
        agent.call("Volume.fence", {**dst, "generation": 0, "timeout": 0})
    assert exc.value.code == -32602
    agent.client().call("Image.copy", {"src": src, "dst": dst}, id="c2")  # continue
    wait_legal(agent, dst)
    assert sha256(agent.call("Volume.getInfo", dst)["path"]) == \
        sha256(agent.call("Volume.getInfo", src)["path"])
