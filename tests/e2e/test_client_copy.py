"""copy_image, continue_copy and wait_task across what a copy outlives: its agent above all.

Copies are rate-limited ([copy] max_bytes_per_second, as in tests/e2e/test_copy.py) so that a
kill lands mid-copy; the tests wait on facts (a checkpoint on storage), never on time.
"""

import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

from agent.client import BlockingClient, CallError, NeedsContinuing, TaskFailed
from tests.support.harness import wait_for, write_config
from tests.support.storage_flow import (
    MiB,
    copied,
    dst_for,
    integrity,
    make_source,
    new_id,
    sha256,
    status,
    volume_path,
)

SIZE = 192 * MiB
COPY = {"chunk_bytes": 4 * MiB, "checkpoint_bytes": 16 * MiB, "checkpoint_seconds": 0.1,
        "max_bytes_per_second": 64 * MiB}


@pytest.fixture
def shared(workdir):
    return new_id(), str(workdir / "shared")


@pytest.fixture
def pool():
    with ThreadPoolExecutor(2) as ex:
        yield ex


def copy_agent(make_agent, shared, **over):
    over.setdefault("copy", COPY)
    over.setdefault("recovery", {"backoff_seconds": 0.1})
    agent = make_agent(**over)
    agent.call("StorageDomain.create", {"domainID": shared[0], "path": shared[1]})
    return agent


def restart_with_domain(agent, shared) -> None:
    """SIGKILL, then start again with the domain in the config: recovery resumes the copy."""
    agent.kill(signal.SIGKILL)
    agent.cfg["storage"] = {"domains": {shared[0]: shared[1]}}
    write_config(agent.config_path, agent.cfg)
    agent.start()


def blocking(agent, events: bool, workdir) -> BlockingClient:
    events_ep = agent.events_endpoint if events else f"ipc://{workdir}/nothing-publishes.sock"
    return BlockingClient(agent.rpc_endpoint, events_ep, timeout=10)


def test_copy_image_waits_until_legal_with_progress(make_agent, shared, workdir):
    agent = copy_agent(make_agent, shared)
    src = make_source(agent, shared[0], 64 * MiB)
    dst = dst_for(shared[0])
    seen = []
    with blocking(agent, True, workdir) as b:
        outcome = b.copy_image(src, dst, task_id="c1", on_progress=seen.append,
                               poll_interval=0.5)
        assert outcome.state == "done" and outcome.via == "task"
        assert outcome.result["generation"] == 1 and outcome.result["total"] == 64 * MiB
        assert status(agent, dst)["legality"] == "LEGAL"
        assert seen and seen[-1].percent == 100.0 and seen[-1].total == 64 * MiB
        assert any(0 < p.percent < 100 for p in seen), seen
        # No wait: the first answer and the task ID; the copy goes on.
        dst2 = dst_for(shared[0])
        first = b.copy_image(src, dst2, wait=False, task_id="c2")
        assert first["taskID"] == "c2" and first["state"] == "copying"
        assert b.wait_task("c2", dst=dst2).state == "done"
        # Continuing a finished copy has nothing to do.
        assert b.continue_copy(dst2).state == "done"
        with pytest.raises(CallError) as e:  # the agent's typed error, as it answered
            b.copy_image(src, dst2)
        assert (e.value.code, e.value.name) == (202, "VolumeExists")
    assert sha256(volume_path(agent, dst)) == sha256(volume_path(agent, src))


@pytest.mark.parametrize("events", [True, False], ids=["events", "polling-only"])
def test_copy_image_across_an_agent_restart(make_agent, shared, workdir, pool, events):
    """The agent is SIGKILLed mid-copy and restarted; recovery resumes the copy as a new
    task; the waiting client finds the old task gone and follows the destination on storage
    until it is LEGAL. Without events it gets there by polling alone."""
    agent = copy_agent(make_agent, shared)
    src = make_source(agent, shared[0], SIZE)
    dst = dst_for(shared[0])
    seen = []
    with blocking(agent, events, workdir) as b:
        fut = pool.submit(b.copy_image, src, dst, task_id="copy-r", on_progress=seen.append,
                          poll_interval=0.2, unreachable_timeout=60)
        wait_for(lambda: fut.done() or copied(agent, dst) > 0, 30, what="a first checkpoint")
        assert not fut.done(), fut.result()
        before = copied(agent, dst)
        restart_with_domain(agent, shared)
        outcome = fut.result(timeout=120)
    assert outcome.state == "done" and outcome.via == "storage"
    assert outcome.image["legality"] == "LEGAL" and outcome.image["generation"] >= 2
    if events:
        assert outcome.restarted  # a new boot_id came in on the events
        assert any(p.source == "event" for p in seen)
    else:  # polls alone: the task's, then the destination's once the task was forgotten
        assert {p.source for p in seen} <= {"poll", "storage"}
        assert any(p.source == "storage" and p.copied >= before for p in seen), seen
    assert sha256(volume_path(agent, dst)) == sha256(volume_path(agent, src))
    assert integrity(shared[1]) == "ok"
    resumed = [t for t in agent.call("Task.getAll") if t["id"].startswith("recover:")]
    assert resumed and resumed[0]["state"] == "done"


def test_a_copy_nobody_resumes_needs_continuing_then_continues(make_agent, shared, workdir,
                                                              pool):
    """Policy manual: after the restart nobody takes the copy up. The waiting client says
    it needs continuing (after `settle`), and continue_copy finishes it from the marker."""
    agent = copy_agent(make_agent, shared, recovery={"copy_policy": "manual"})
    src = make_source(agent, shared[0], SIZE)
    dst = dst_for(shared[0])
    with blocking(agent, True, workdir) as b:
        fut = pool.submit(b.copy_image, src, dst, task_id="copy-m", poll_interval=0.2,
                          settle=1.0)
        wait_for(lambda: fut.done() or copied(agent, dst) > 0, 30, what="a first checkpoint")
        restart_with_domain(agent, shared)
        with pytest.raises(NeedsContinuing) as e:
            fut.result(timeout=60)
        outcome = e.value.outcome
        assert outcome.state == "needs_continuing" and outcome.dst == dst
        mark = outcome.image["copy"]
        assert mark["state"] == "copying" and mark["lease"]["live"] is False
        assert 0 < mark["copied"] < SIZE and mark["source"] == src
        done = b.continue_copy(dst, task_id="copy-m2", poll_interval=0.2)  # src from the marker
        assert done.state == "done" and done.result["generation"] >= 2
    assert sha256(volume_path(agent, dst)) == sha256(volume_path(agent, src))


def test_an_aborted_copy_is_a_failure_of_its_task(make_agent, shared, workdir, pool):
    agent = copy_agent(make_agent, shared)
    src = make_source(agent, shared[0], SIZE)
    dst = dst_for(shared[0])
    with blocking(agent, True, workdir) as b:
        fut = pool.submit(b.copy_image, src, dst, task_id="copy-a", poll_interval=0.2)
        wait_for(lambda: fut.done() or copied(agent, dst) > 0, 30, what="a first checkpoint")
        b.call("Task.abort", {"taskID": "copy-a"})
        with pytest.raises(TaskFailed) as e:
            fut.result(timeout=60)
        assert e.value.outcome.state == "aborted" and e.value.name == "TaskAborted"
        assert status(agent, dst)["legality"] == "ILLEGAL"
