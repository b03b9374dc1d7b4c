"""Merges killed at every step: the worker SIGKILLed (for real mid-commit, and at each named
step through the crash seam), the agent SIGKILLed mid-commit. Each merge is then finished by
the same host's start-up recovery or by another host continuing it; the commit resumes from
a checkpoint above zero, and at every crash point the child's guest view (the view a guest
reads) is what it was before the merge.

The commit is rate-limited ([copy] max_bytes_per_second) so a kill lands mid-commit
whatever the machine's speed; the tests wait on facts (a checkpoint recorded, a task
failed, a pid gone), never on time.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from agent.client import CallError
from tests.images.chains import (
    announced_wait,
    check,
    compare,
    needs_qemu,
    qemu_nbd_under,
)
from tests.images.test_merges import four_volume_chain, ids, views
from tests.support.harness import events_until, task_state, wait_for, worker_of
from tests.support.storage_flow import MiB, new_id
from workers.testseams import ENV

pytestmark = [needs_qemu, pytest.mark.timeout(240)]

COPY = {"checkpoint_bytes": 4 * MiB, "checkpoint_seconds": 0.05,
        "max_bytes_per_second": 4 * MiB}  # top holds ~9 MiB: a merge takes 2 s+


def merge_params(base: dict, top: dict) -> dict:
    return {"domainID": base["domainID"], "imageID": base["imageID"],
            "baseVolumeID": base["volumeID"], "topVolumeID": top["volumeID"]}


def merge_state(agent, base: dict) -> dict | None:
    return agent.call("Image.getStatus", ids(base))["merge"]


def finished(agent, chain: list[dict], before: list[str], top_index: int) -> None:
    """The merge done: one volume fewer, every remaining view right, every qcow2 clean,
    top's file gone, no qemu-nbd left."""
    base, top = chain[top_index - 1], chain[top_index]
    wait_for(lambda: agent.call("Volume.getInfo", ids(base))["legality"] == "LEGAL",
             timeout=120, what="base LEGAL again")
    info = agent.call("Image.getInfo", {"domainID": base["domainID"],
                                        "imageID": base["imageID"]})
    rest = [v for v in chain if v is not top]
    assert [v["volumeID"] for v in info["chain"]] == [v["volumeID"] for v in rest]
    assert info["merges"] == []
    for v in rest:
        want = before[top_index] if v is base else before[chain.index(v)]
        assert compare(v["path"], v["format"], want, "raw").returncode == 0, v
        if v["format"] == "cow":
            assert check(v["path"])["check-errors"] == 0
    assert not os.path.exists(top["path"])


def views_intact(chain: list[dict], before: list[str], top_index: int) -> None:
    """Whatever step the merge died at: every volume a guest can read (below base, and
    top's child through whichever backing its header names) shows its own view."""
    for i, v in enumerate(chain):
        if i in (top_index - 1, top_index):
            continue  # base and top are ILLEGAL: nobody reads them until the merge ends
        assert compare(v["path"], v["format"], before[i], "raw").returncode == 0, i


# (the seam's point, commits of that name to let pass, the step it leaves, who finishes)
POINTS = [
    ("commit:begin_merge", 0, "commit", "restart"),
    ("commit:merge_checkpoint", 1, "commit", "other-host"),
    ("commit:merge_committed", 0, "committed", "restart"),
    ("write:repoint-header", 0, "committed", "other-host"),
    ("commit:merge_repoint", 0, "repointed", "restart"),
    ("commit:complete_merge", 0, None, "other-host"),
]


@pytest.mark.parametrize("point,skip,step,finisher", POINTS,
                         ids=[p[0].split(":")[1] for p in POINTS])
def test_a_merge_killed_at_each_step_is_finished_by_recovery_or_another_host(
        make_agent, workdir, point, skip, step, finisher):
    root, domain_id = str(workdir / "dom"), new_id()
    a = make_agent("a", start=False, copy=COPY, recovery={"copy_policy": "manual"})
    a.start(env={ENV: json.dumps({"crash_after": point, "skip": skip, "op": "image.merge"})})
    a.call("StorageDomain.create", {"domainID": domain_id, "path": root})
    chain = four_volume_chain(a, domain_id)
    before = views(chain, workdir)
    base, top = chain[1], chain[2]
    try:
        a.client().call("Image.merge", merge_params(base, top), id="m1")
    except CallError as exc:  # killed before its answer: the merge was recorded, though
        assert point == "commit:begin_merge" and exc.name == "WorkerDied", exc
    wait_for(lambda: task_state(a, "m1") == "failed", timeout=60, what="the worker killed")
    assert a.call("Task.getStatus", {"taskID": "m1"})["error"]["data"]["name"] == "WorkerDied"
    found = merge_state(a, chain[3])  # as top's child sees it
    assert (found and found["step"]) == step, found
    if step is not None:
        assert found["running"] is False and found["baseVolumeID"] == base["volumeID"]
    views_intact(chain, before, 2)
    a.kill(signal.SIGKILL)
    if finisher == "restart":
        a.reconfigure(recovery={"copy_policy": "resume", "backoff_seconds": 0.1})
        a.start()  # no fault now: start-up recovery finishes it
        finished(a, chain, before, 2)
        return
    b = make_agent("b", copy=COPY)
    b.call("StorageDomain.attach", {"domainID": domain_id, "path": root})
    events = b.subscribe("Image.merge")
    again = b.client().call("Image.merge", merge_params(base, top), id="m2")
    if step is None:
        assert again["state"] == "done" and again["already"] is True
        b.kill(signal.SIGKILL)
        b.start()  # top's file, a leftover once its row is gone, is swept at start-up
    else:
        started = events_until(events, lambda e: e["params"].get("state") == "started")
        assert started[-1]["params"]["step"] == step
        if point == "commit:merge_checkpoint":
            assert started[-1]["params"]["copied"] > 0  # from the checkpoint, not zero
        wait_for(lambda: task_state(b, "m2") == "done", timeout=120, what="b's merge done")
    finished(b, chain, before, 2)
    assert qemu_nbd_under(root) == []


@pytest.fixture
def slow_merge(make_agent, workdir):
    """An agent whose merges are retried at once, and a chain whose top is big enough for
    the commit to checkpoint several times under the rate limit."""
    agent = make_agent(copy=COPY, recovery={"backoff_seconds": 0.1})
    domain_id = new_id()
    agent.call("StorageDomain.create", {"domainID": domain_id, "path": str(workdir / "dom")})
    chain = four_volume_chain(agent, domain_id, base_format="cow")
    return agent, chain, views(chain, workdir)


def checkpointed(agent, base) -> int:
    def past():
        m = merge_state(agent, base)
        return m and m["copied"] > 0 and m["copied"]
    return wait_for(past, timeout=60, what="a merge checkpoint past the start")


def test_a_worker_killed_mid_commit_is_retried_from_its_checkpoint(slow_merge):
    agent, chain, before = slow_merge
    base, top = chain[0], chain[1]
    events = agent.subscribe("Image.merge")
    agent.client().call("Image.merge", merge_params(base, top), id="m1")
    worker = worker_of(agent, "m1")
    at = checkpointed(agent, base)
    worker.kill()
    retried = events_until(events, lambda e: e["params"].get("state") == "started"
                           and e["params"].get("taskID", "").startswith("retry:"),
                           timeout=60)
    assert retried[-1]["params"]["copied"] >= at > 0
    finished(agent, chain, before, 1)


def test_a_merge_continued_waits_out_the_lock_its_killed_writer_holds(make_agent, workdir):
    """A killed merge's qemu-nbd can hold base's lock a while after its worker is gone (a
    thread still finishing its I/O): the merge continued says it waits (Image.merge waiting)
    and goes on from its checkpoint once the lock is let go."""
    agent = make_agent(copy=COPY, recovery={"copy_policy": "manual"})
    domain_id = new_id()
    agent.call("StorageDomain.create", {"domainID": domain_id, "path": str(workdir / "dom")})
    chain = four_volume_chain(agent, domain_id, base_format="cow")
    before = views(chain, workdir)
    base, top = chain[0], chain[1]
    events = agent.subscribe("Image.merge")
    agent.client().call("Image.merge", merge_params(base, top), id="m1")
    worker = worker_of(agent, "m1")
    at = checkpointed(agent, base)
    worker.kill()
    wait_for(lambda: task_state(agent, "m1") == "failed", what="the first merge failed")
    seen = announced_wait(workdir, base["path"], "cow", events, lambda: agent.client().call(
        "Image.merge", merge_params(base, top), id="m2"))
    started = [e["params"] for e in seen if e["params"].get("state") == "started"]
    assert started[-1]["copied"] >= at > 0
    finished(agent, chain, before, 1)


def test_an_agent_killed_mid_commit_resumes_the_merge_at_start_up(slow_merge):
    agent, chain, before = slow_merge
    base, top = chain[2], chain[3]  # the leaf merged into its parent
    agent.client().call("Image.merge", merge_params(base, top), id="m1")
    worker = worker_of(agent, "m1")
    at = checkpointed(agent, base)
    agent.kill(signal.SIGKILL)
    wait_for(lambda: not worker.is_running() or worker.status() == "zombie", timeout=15,
             what="the worker gone with its agent")
    seen = []
    agent.start()

    def done():
        m = merge_state(agent, base)
        if m:
            seen.append(m["copied"])
        return m is None
    wait_for(done, timeout=120, interval=0.02, what="the recovered merge done")
    assert not seen or min(seen) >= at > 0, (seen[:5], at)
    recovered = [t["id"] for t in agent.call("Task.getAll") if t["method"] == "Image.merge"]
    assert recovered and all(t.startswith("recover:") for t in recovered), recovered
    finished(agent, chain, before, 3)


def _merge_killed_under_faults(make_agent, workdir, max_attempts: int, faults: dict):
    """An agent with the crash seam `faults`, whose merge of a four-volume chain's base and
    top has had its worker killed once; (agent, chain, the guests' views before, base)."""
    agent = make_agent(start=False, copy=COPY, recovery={"copy_policy": "resume",
                                                         "max_attempts": max_attempts,
                                                         "backoff_seconds": 0.1})
    agent.start(env={ENV: json.dumps(faults)})
    domain_id = new_id()
    agent.call("StorageDomain.create", {"domainID": domain_id, "path": str(workdir / "dom")})
    chain = four_volume_chain(agent, domain_id, base_format="cow")
    before = views(chain, workdir)
    agent.client().call("Image.merge", merge_params(chain[0], chain[1]), id="m1")
    worker_of(agent, "m1").kill()
    return agent, chain, before, chain[0]


def test_merge_retries_that_die_before_they_say_what_they_took_still_end(make_agent, workdir):
    """As for copies (tests/hostile/test_restarts.py): every retry's worker dies right after
    its take-over commits. Each next one, and the abandon, take the merge at the generation
    the dead raised, so it is abandoned after max_attempts, each failure counted once with
    its reason, and no guest's view has changed."""
    agent, chain, before, base = _merge_killed_under_faults(
        make_agent, workdir, 3, {"crash_after": "commit:take_over_merge", "op": "image.merge"})
    m = wait_for(lambda: (m := merge_state(agent, base)) and m["state"] == "abandoned" and m,
                 timeout=60, what="the merge abandoned after max_attempts failures")
    assert (m["failures"], m["attempts"]) == (3, 3), m
    assert [e["data"]["name"] for e in m["errors"]] == ["WorkerDied"] * 3
    views_intact(chain, before, 1)


def test_a_merge_abandon_whose_worker_dies_is_tried_again(make_agent, workdir):
    """As for copies (tests/hostile/test_restarts.py): the abandon's worker is SIGKILLed
    before it writes anything (once); it is tried again, so the merge ends abandoned with
    its one failure counted once, and no guest's view has changed."""
    once = workdir / "the-first-abandon-dies"
    once.write_text("")
    agent, chain, before, base = _merge_killed_under_faults(
        make_agent, workdir, 1, {"crash_before": "begin:abandon_merge", "once": str(once),
                                 "op": "image.merge_abandon"})
    m = wait_for(lambda: (m := merge_state(agent, base)) and m["state"] == "abandoned" and m,
                 timeout=60, what="the merge abandoned by the second abandon")
    assert not once.exists()  # the first abandon's worker did die
    assert (m["failures"], m["attempts"]) == (1, 1), m
    assert [e["data"]["name"] for e in m["errors"]] == ["WorkerDied"]
    views_intact(chain, before, 1)
