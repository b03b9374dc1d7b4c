"""Crash points in metadata writes, in the style SQLite tests itself: a worker SIGKILLs
itself right after its N-th metadata commit (or before its N-th data fsync), for every N
until the operation completes; after each, the next start must converge.

The seam is workers/testseams.py (HOSTAGENT_TEST_FAULTS), inside real workers of a real
agent; everything else is real.
"""

import json

import pytest

from agent.client import CallError
from tests.support.harness import task_state, wait_for
from tests.support.storage_flow import (
    MiB,
    dst_for,
    integrity,
    make_source,
    new_id,
    sha256,
    status,
    volume_path,
    wait_legal,
)

COPY = {"chunk_bytes": MiB, "checkpoint_bytes": 2 * MiB, "checkpoint_seconds": 60.0}
MAX_POINTS = 40


def crash_env(n: int) -> dict:
    return {"HOSTAGENT_TEST_FAULTS": json.dumps({"crash_after_writes": n})}


@pytest.fixture
def domain(make_agent, workdir):
    domain_id, path = new_id(), str(workdir / "d")
    setup = make_agent("setup", copy=COPY)
    setup.call("StorageDomain.create", {"domainID": domain_id, "path": path})
    src = make_source(setup, domain_id, 9 * MiB, [(0, 3 * MiB), (5 * MiB, 4 * MiB)])
    setup.kill()
    return domain_id, path, src


def one_state(agent, dst) -> str:
    """What storage says of the destination: absent, copying (ILLEGAL + marker) or legal."""
    try:
        st = status(agent, dst)
    except CallError as exc:
        assert exc.name == "NoSuchVolume"
        return "absent"
    if st["legality"] == "LEGAL":
        assert st["copy"] is None, "LEGAL with a marker"
        return "legal"
    assert st["copy"] is not None, "ILLEGAL without a marker"
    assert 0 <= st["copy"]["copied"] <= st["size"]
    return "copying"


def test_image_copy_converges_after_a_crash_at_every_write(make_agent, domain):
    domain_id, path, src = domain
    seen = []
    for n in range(1, MAX_POINTS + 1):
        agent = make_agent(f"n{n}", start=False, copy=COPY, host_id="crashy",
                           storage={"domains": {domain_id: path}},
                           recovery={"copy_policy": "manual"})
        agent.start(env=crash_env(n))
        dst = dst_for(domain_id)
        c = agent.client()
        c.send("Image.copy", {"src": src, "dst": dst}, id="c")
        wait_for(lambda: task_state(agent, "c") in ("done", "failed"), 30)
        rec = agent.call("Task.getStatus", {"taskID": "c"})
        if rec["state"] == "done":
            break  # past the last write: the operation completed under the seam
        assert rec["error"]["data"].get("signal") == "SIGKILL", rec
        assert integrity(path) == "ok"
        state = one_state(agent, dst)
        seen.append(state)
        # The next start (no faults, policy resume) must converge: the copy completes.
        agent.kill()
        agent.reconfigure(recovery={"copy_policy": "resume"})
        agent.start()
        if state == "absent":  # crashed before the first commit: nothing to recover
            agent.call("Image.copy", {"src": src, "dst": dst})
        wait_legal(agent, dst)
        assert sha256(volume_path(agent, dst)) == sha256(volume_path(agent, src))
        assert integrity(path) == "ok"
        agent.close()
    else:
        pytest.fail(f"the copy never completed within {MAX_POINTS} crash points")
    assert n > 3, f"too few write points ({n}): the seam is not counting"
    assert "copying" in seen


@pytest.mark.parametrize("verb", ["Volume.create", "Volume.delete"])
def test_volume_verbs_converge_after_a_crash_at_every_write(make_agent, domain, verb):
    domain_id, path, _ = domain
    for n in range(1, 10):
        loc = {"domainID": domain_id, "imageID": new_id(), "volumeID": new_id()}
        agent = make_agent(f"{verb}{n}", start=False, storage={"domains": {domain_id: path}})
        if verb == "Volume.delete":
            agent.start()
            agent.call("Volume.create", {**loc, "size": MiB})
            agent.kill()
        agent.start(env=crash_env(n))
        params = {**loc, "size": MiB} if verb == "Volume.create" else loc
        try:
            agent.call(verb, params)
            completed = True
        except CallError as exc:
            assert exc.data.get("signal") == "SIGKILL", exc
            completed = False
        assert integrity(path) == "ok"
        agent.kill()
        agent.start()
        # Converged: the volume is wholly there (create) or wholly gone (delete), and the
        # verb can be repeated to the same end.
        if verb == "Volume.create":
            try:
                info = agent.call("Volume.getInfo", loc)
                assert info["legality"] == "LEGAL" and info["size"] == MiB
            except CallError as exc:
                assert exc.name == "NoSuchVolume"
                agent.call("Volume.create", {**loc, "size": MiB})
        else:
            try:
                agent.call("Volume.delete", loc)
            except CallError as exc:
                assert exc.name == "NoSuchVolume"
            with pytest.raises(CallError):
                agent.call("Volume.getInfo", loc)
        agent.close()
        if completed:
            break
    assert completed
