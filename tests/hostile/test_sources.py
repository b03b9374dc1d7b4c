"""Classes 2 and 3: a volume never turns LEGAL with data from two sources, or with zeros
where its source's data ended. A copy is bound to the source it began from (creation token,
generation, size), checked at every continue and before the commit; the source's data file
is checked for length and for being the file the copy read."""

import os

import pytest

from agent.client import CallError
from tests.support.harness import task_state, wait_for
from tests.support.storage_flow import MiB, dst_for, make_source, new_id, status

pytestmark = pytest.mark.timeout(120)

SIZE = 16 * MiB
SLOW = {"chunk_bytes": MiB, "checkpoint_bytes": MiB, "checkpoint_seconds": 0.05,
        "max_bytes_per_second": 4 * MiB}


@pytest.fixture
def setup(make_agent, workdir):
    agent = make_agent(copy=SLOW, recovery={"copy_policy": "manual"})
    domain = new_id()
    agent.call("StorageDomain.create", {"domainID": domain, "path": str(workdir / "d")})
    return agent, domain


def half_copied_then_aborted(agent, src, dst):
    c = agent.client()
    c.send("Image.copy", {"src": src, "dst": dst}, id="first")
    wait_for(lambda: (s := status_or_none(agent, dst)) and s["copy"]["copied"] >= 4 * MiB, 30)
    agent.call("Task.abort", {"taskID": "first"})
    wait_for(lambda: task_state(agent, "first") == "aborted", 30)
    st = status(agent, dst)
    assert st["legality"] == "ILLEGAL" and 0 < st["copy"]["copied"] < SIZE
    return st


def status_or_none(agent, loc):
    try:
        return status(agent, loc)
    except CallError:
        return None


def recreate(agent, src, size):
    agent.call("Volume.delete", src)
    info = agent.call("Volume.create", {**src, "size": size})
    with open(info["path"], "r+b") as f:
        f.write(os.urandom(min(size, 8 * MiB)))


def continue_fails(agent, src, dst, name):
    with pytest.raises(CallError) as exc:
        agent.call("Image.copy", {"src": src, "dst": dst})  # continue: refused at once
    assert exc.value.name == name, exc.value
    st = status(agent, dst)
    assert st["legality"] == "ILLEGAL" and st["copy"] is not None
    return exc.value


@pytest.mark.parametrize("new_size", [SIZE, 2 * SIZE, SIZE // 2])
def test_a_continue_from_a_recreated_source_is_a_conflict(setup, new_size):
    agent, domain = setup
    src, dst = make_source(agent, domain, SIZE), dst_for(domain)
    half_copied_then_aborted(agent, src, dst)
    recreate(agent, src, new_size)
    err = continue_fails(agent, src, dst, "CopyConflict")
    assert err.code == 205
    assert err.data["reason"] == ("source-replaced" if new_size == SIZE else "size")


def run_copy(agent, src, dst, task_id="c"):
    c = agent.client()
    c.send("Image.copy", {"src": src, "dst": dst}, id=task_id)
    wait_for(lambda: task_state(agent, task_id) in ("done", "failed"), 60)
    return agent.call("Task.getStatus", {"taskID": task_id})


def test_a_short_source_is_an_error_never_a_hole(setup):
    agent, domain = setup
    src, dst = make_source(agent, domain, SIZE), dst_for(domain)
    path = agent.call("Volume.getInfo", src)["path"]
    os.truncate(path, SIZE // 2)  # behind the agent's back
    # Found before the answer (the source is inspected first): refused, nothing made. Cut
    # during the copy, the copy finds it (test_a_source_changed_during_the_copy...).
    with pytest.raises(CallError) as exc:
        agent.call("Image.copy", {"src": src, "dst": dst})
    assert exc.value.code == 213 and exc.value.name == "VolumeTruncated", exc.value
    with pytest.raises(CallError) as gone:
        agent.call("Volume.getInfo", dst)
    assert gone.value.code == 201


@pytest.mark.parametrize("change", ["truncated", "recreated", "replaced", "deleted"])
def test_a_source_changed_during_the_copy_never_goes_legal(setup, change):
    agent, domain = setup
    src, dst = make_source(agent, domain, SIZE), dst_for(domain)
    path = agent.call("Volume.getInfo", src)["path"]
    c = agent.client()
    c.send("Image.copy", {"src": src, "dst": dst}, id="c")
    wait_for(lambda: (s := status_or_none(agent, dst)) and s["copy"]["copied"] >= 2 * MiB, 30)
    if change == "truncated":
        os.truncate(path, SIZE - MiB)
    elif change == "recreated":
        recreate(agent, src, SIZE)
    elif change == "replaced":  # another file renamed over the data file
        with open(path + ".new", "wb") as f:
            f.write(os.urandom(SIZE))
        os.rename(path + ".new", path)
    else:
        agent.call("Volume.delete", src)
    wait_for(lambda: task_state(agent, "c") in ("done", "failed"), 60)
    rec = agent.call("Task.getStatus", {"taskID": "c"})
    assert rec["state"] == "failed", rec
    assert rec["error"]["data"]["name"] in ("CopyConflict", "VolumeTruncated"), rec
    assert status(agent, dst)["legality"] == "ILLEGAL"
