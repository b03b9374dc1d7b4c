"""Image.copy: a copy outlives its task, its worker, its agent, and even its host.

Copies here are rate-limited ([copy] max_bytes_per_second, a real setting) so that a kill
lands mid-copy whatever the machine's speed; nothing waits on time, only on facts.
"""

import signal
import subprocess

import psutil
import pytest

from agent.client import CallError
from tests.support.harness import events_until, task_state, wait_for
from tests.support.storage_flow import (
    MiB,
    allocated,
    block_checksum,
    copied,
    dst_for,
    integrity,
    make_source,
    new_id,
    recorded_checksum,
    sha256,
    status,
    volume_path,
    wait_legal,
)

SIZE = 256 * MiB
GiB = 1024 * MiB
COPY = {"chunk_bytes": 4 * MiB, "checkpoint_bytes": 16 * MiB, "checkpoint_seconds": 0.1,
        "max_bytes_per_second": 64 * MiB}
RECOVERY = {"backoff_seconds": 0.1}


@pytest.fixture
def shared(workdir):
    """A domain (path and ID) that several agents attach through their config."""
    return new_id(), str(workdir / "shared")


def copy_agent(make_agent, shared, name="a", create=False, start=True, **over):
    domain_id, path = shared
    over.setdefault("copy", COPY)
    over.setdefault("recovery", RECOVERY)
    if create:
        agent = make_agent(name, **over)
        agent.call("StorageDomain.create", {"domainID": domain_id, "path": path})
        return agent
    return make_agent(name, start=start, storage={"domains": {domain_id: path}}, **over)


def start_copy(agent, src, dst, task_id="copy1"):
    c = agent.client()
    return c.call("Image.copy", {"src": src, "dst": dst}, id=task_id)


def worker_pid(agent, task_id):
    def find():
        for w in agent.call("Host.getStats")["workers"]:
            if w["taskID"] == task_id and w["pid"]:
                return w["pid"]
    return wait_for(find, what=f"the worker of {task_id}")


def test_copy_answers_before_the_data_is_there_and_ends_identical(make_agent, shared):
    agent = copy_agent(make_agent, shared, create=True)
    src = make_source(agent, shared[0], SIZE)
    dst = dst_for(shared[0])
    events = agent.subscribe("Task.state", "Image.copy")
    wait_for(lambda: agent.call("Host.ping") and events.poll(50), what="subscription live")
    result = start_copy(agent, src, dst)
    # The response says: destination created, nothing copied yet, the task goes on.
    assert result == {"volumeID": dst["volumeID"], "state": "copying", "generation": 0,
                      "copied": 0, "total": SIZE, "attempts": 1, "failures": 0}
    rec = agent.call("Task.getStatus", {"taskID": "copy1"})
    assert rec["returned"] is True and rec["state"] in ("running", "done")
    mid = status(agent, dst)
    assert mid["legality"] == "ILLEGAL" and mid["copy"]["source"] == src
    def midway():  # progress is null until the worker's first report
        progress = agent.call("Task.getStatus", {"taskID": "copy1"})["progress"]
        return progress is not None and 0 < progress < 100
    wait_for(midway, what="progress on this host")
    final = wait_legal(agent, dst)
    assert final["generation"] == 1 and final["copy"] is None
    assert sha256(volume_path(agent, dst)) == sha256(volume_path(agent, src))
    assert agent.call("Task.getStatus", {"taskID": "copy1"})["state"] == "done"
    seen = events_until(events, lambda e: e["method"] == "Image.copy"
                        and e["params"]["state"] == "done")
    assert any(e["method"] == "Image.copy" and e["params"]["state"] == "copying" for e in seen)
    assert integrity(shared[1]) == "ok"


def test_status_from_a_second_agent_while_the_first_copies(make_agent, shared):
    first = copy_agent(make_agent, shared, create=True)
    second = copy_agent(make_agent, shared, "b")
    src = make_source(first, shared[0], SIZE)
    dst = dst_for(shared[0])
    start_copy(first, src, dst)
    st = wait_for(lambda: (s := status(second, dst))["copy"] and s["copy"]["copied"] > 0 and s,
                  what="a checkpoint seen from the second agent")
    assert st["copy"]["host_id"] == "host-a" and st["copy"]["lease"]["live"] is True
    assert st["copy"]["total"] == SIZE and 0 < st["copy"]["percent"] <= 100
    assert second.call("Host.getCapabilities")["host_id"] == "host-b"
    wait_legal(second, dst)


def test_supervisor_sigkill_mid_copy_resumes_from_checkpoint(make_agent, shared):
    agent = copy_agent(make_agent, shared, create=True)
    src = make_source(agent, shared[0], SIZE)
    dst = dst_for(shared[0])
    start_copy(agent, src, dst)
    wait_for(lambda: copied(agent, dst) > 0, what="a first checkpoint")
    pid = worker_pid(agent, "copy1")
    agent.kill(signal.SIGKILL)
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie")
    assert integrity(shared[1]) == "ok"
    events = agent.subscribe("Image.recovered")
    agent.cfg["storage"] = {"domains": {shared[0]: shared[1]}}
    agent.start()
    rec = events_until(events, lambda e: e["params"]["volumeID"] == dst["volumeID"])[-1]
    assert rec["params"]["action"] == "resume"
    task_id = rec["params"]["taskID"]
    assert task_id == f"recover:{dst['volumeID']}:0"
    resumed = wait_for(lambda: agent.call("Task.getStatus", {"taskID": task_id})["result"])
    assert 0 < resumed["copied"] < SIZE and resumed["generation"] == 1
    wait_legal(agent, dst)
    assert sha256(volume_path(agent, dst)) == sha256(volume_path(agent, src))
    # The checksum was hashed behind the resumed copy, the earlier life's prefix read back.
    assert recorded_checksum(shared[1], dst["volumeID"]) == block_checksum(volume_path(agent, dst))
    assert integrity(shared[1]) == "ok"


def test_worker_sigkill_mid_copy_is_retried_from_checkpoint(make_agent, shared):
    agent = copy_agent(make_agent, shared, create=True)
    src = make_source(agent, shared[0], SIZE)
    dst = dst_for(shared[0])
    start_copy(agent, src, dst)
    wait_for(lambda: copied(agent, dst) > 0, what="a first checkpoint")
    psutil.Process(worker_pid(agent, "copy1")).kill()
    wait_for(lambda: task_state(agent, "copy1") == "failed")
    err = agent.call("Task.getStatus", {"taskID": "copy1"})["error"]
    assert err["data"]["signal"] == "SIGKILL"
    retry_id = f"retry:{dst['volumeID']}:0"
    retried = wait_for(lambda: task_state(agent, retry_id) and
                       agent.call("Task.getStatus", {"taskID": retry_id})["result"])
    assert retried["copied"] > 0 and retried["attempts"] == 2
    mid = status(agent, dst)
    if mid["copy"]:  # the killed attempt's error is kept in the marker
        assert mid["copy"]["errors"][0]["data"]["signal"] == "SIGKILL"
    wait_legal(agent, dst)
    assert sha256(volume_path(agent, dst)) == sha256(volume_path(agent, src))
    assert integrity(shared[1]) == "ok"


def test_a_second_agent_continues_when_the_first_is_gone_for_good(make_agent, shared):
    first = copy_agent(make_agent, shared, create=True)
    src = make_source(first, shared[0], SIZE)
    dst = dst_for(shared[0])
    start_copy(first, src, dst)
    wait_for(lambda: copied(first, dst) > 0, what="a first checkpoint")
    first.kill(signal.SIGKILL)
    second = copy_agent(make_agent, shared, "b")
    st = wait_for(lambda: (s := status(second, dst))["copy"]["lease"]["live"] is False and s,
                  what="the dead host's lease freed by the kernel")
    assert st["copy"]["host_id"] == "host-a"  # not ours: this host's start-up left it alone
    with pytest.raises(CallError) as other_src:
        start_copy(second, {**src, "volumeID": new_id()}, dst, "conflict")
    assert other_src.value.name in ("CopyConflict", "NoSuchVolume")
    result = start_copy(second, src, dst, "continue")
    assert result["copied"] == st["copy"]["copied"] > 0 and result["generation"] == 1
    wait_legal(second, dst)
    assert sha256(volume_path(second, dst)) == sha256(volume_path(second, src))
    with pytest.raises(CallError) as done:
        start_copy(second, src, dst, "again")
    assert done.value.name == "VolumeExists"
    assert integrity(shared[1]) == "ok"


def test_two_agents_starting_together_resume_each_marker_once(make_agent, shared):
    maker = copy_agent(make_agent, shared, "maker", create=True)
    srcs = [make_source(maker, shared[0], 64 * MiB, seed=i) for i in range(3)]
    dsts = [dst_for(shared[0]) for _ in srcs]
    for i, (s, d) in enumerate(zip(srcs, dsts)):
        start_copy(maker, s, d, f"c{i}")
    wait_for(lambda: all(copied(maker, d) > 0 for d in dsts), what="checkpoints")
    maker.kill(signal.SIGKILL)
    wait_for(lambda: all(not status_live(maker, shared, d) for d in dsts))
    over = {"recovery": {**RECOVERY, "resume_foreign": True}}
    a = copy_agent(make_agent, shared, "a", start=False, **over)
    b = copy_agent(make_agent, shared, "b", start=False, **over)
    a.start(wait=False)
    b.start(wait=False)
    a.wait_ready()
    b.wait_ready()
    for d in dsts:
        wait_legal(a, d)
    done = [t for ag in (a, b) for t in ag.call("Task.getAll", {"states": ["done"]})
            if t["method"] == "Image.copy"]
    resumed = sorted(t["result"]["volumeID"] for t in done)
    assert resumed == sorted(d["volumeID"] for d in dsts)  # each exactly once
    for s, d in zip(srcs, dsts):
        assert sha256(volume_path(a, d)) == sha256(volume_path(a, s))
    assert integrity(shared[1]) == "ok"


def status_live(agent_unused, shared, dst) -> bool:
    from agent.storage.layout import Layout
    from agent.storage.leases import local
    probe = local.probe(Layout(shared[1]).lease_path(dst["volumeID"]))
    return bool(probe and probe["live"])


def test_sparse_source_keeps_its_holes(make_agent, shared):
    agent = copy_agent(make_agent, shared, create=True, copy={**COPY, "max_bytes_per_second": 0})
    size = 512 * MiB
    layout = [(0, MiB), (100 * MiB, 3 * MiB), (400 * MiB, 2 * MiB), (size - MiB, MiB)]
    src = make_source(agent, shared[0], size, layout)
    dst = dst_for(shared[0])
    start_copy(agent, src, dst)
    wait_legal(agent, dst)
    src_path, dst_path = volume_path(agent, src), volume_path(agent, dst)
    assert sha256(dst_path) == sha256(src_path)
    assert allocated(dst_path) <= allocated(src_path) + MiB
    assert allocated(dst_path) < 16 * MiB


@pytest.mark.parametrize("fmt", ["raw", "cow"])
def test_the_rate_limit_paces_the_data_moved_not_the_holes(make_agent, shared, fmt):
    """[copy] max_bytes_per_second paces what a copy moves: a 4 GiB disk holding 2 MiB, at
    1 MiB/s, is copied in seconds (paced by its offset it would take 70 minutes), by the
    kernel (raw) and through qemu (a collapse into cow)."""
    agent = copy_agent(make_agent, shared, create=True,
                       copy={**COPY, "max_bytes_per_second": MiB})
    size = 4 * GiB
    src = make_source(agent, shared[0], size, [(0, MiB), (size - MiB, MiB)])
    dst = dst_for(shared[0])
    agent.call("Image.copy", {"src": src, "dst": dst, **({"format": fmt} if fmt == "cow"
                                                           else {})})
    wait_legal(agent, dst, timeout=90)
    info = agent.call("Volume.getInfo", dst)
    driver = {"raw": "raw", "cow": "qcow2"}[info["format"]]
    same = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", driver,
                           volume_path(agent, src), info["path"]], capture_output=True,
                          text=True, timeout=120)
    assert same.returncode == 0, same.stdout + same.stderr


def test_abort_leaves_a_continuable_destination(make_agent, shared):
    agent = copy_agent(make_agent, shared, create=True)
    src = make_source(agent, shared[0], SIZE)
    dst = dst_for(shared[0])
    start_copy(agent, src, dst)
    wait_for(lambda: copied(agent, dst) > 0, what="a first checkpoint")
    agent.call("Task.abort", {"taskID": "copy1"})
    wait_for(lambda: task_state(agent, "copy1") == "aborted")
    st = status(agent, dst)
    assert st["legality"] == "ILLEGAL" and st["copy"]["state"] == "copying"
    assert st["copy"]["lease"]["live"] is False and 0 < st["copy"]["copied"] < SIZE
    # Not retried: an abort is the caller's decision.
    assert task_state(agent, f"retry:{dst['volumeID']}:0") is None
    result = start_copy(agent, src, dst, "continue")
    assert result["copied"] == st["copy"]["copied"]
    wait_legal(agent, dst)
    assert sha256(volume_path(agent, dst)) == sha256(volume_path(agent, src))


def interrupted_copy(make_agent, shared, **over):
    """A copy whose agent was SIGKILLed after a checkpoint; returns (agent, src, dst, copied)."""
    agent = copy_agent(make_agent, shared, create=True, **over)
    src = make_source(agent, shared[0], SIZE)
    dst = dst_for(shared[0])
    start_copy(agent, src, dst)
    wait_for(lambda: copied(agent, dst) > 0, what="a first checkpoint")
    agent.kill(signal.SIGKILL)
    agent.cfg["storage"] = {"domains": {shared[0]: shared[1]}}
    from tests.support.harness import write_config
    write_config(agent.config_path, agent.cfg)
    return agent, src, dst


@pytest.mark.parametrize("policy", ["restart", "abandon", "manual"])
def test_recovery_policies(make_agent, shared, policy):
    agent, src, dst = interrupted_copy(make_agent, shared,
                                       recovery={**RECOVERY, "copy_policy": policy})
    events = agent.subscribe("Image.recovered")
    agent.start()
    ev = events_until(events, lambda e: e["params"]["volumeID"] == dst["volumeID"])[-1]
    assert ev["params"]["policy"] == policy
    if policy == "restart":
        assert ev["params"]["action"] == "restart"
        result = wait_for(lambda: agent.call("Task.getStatus",
                                             {"taskID": ev["params"]["taskID"]})["result"])
        assert result["copied"] == 0
        wait_legal(agent, dst)
        assert sha256(volume_path(agent, dst)) == sha256(volume_path(agent, src))
    elif policy == "abandon":
        assert ev["params"]["action"] == "abandon"
        wait_for(lambda: status(agent, dst)["copy"]["state"] == "abandoned")
        assert status(agent, dst)["legality"] == "ILLEGAL"
    else:
        assert ev["params"]["action"] == "leave" and ev["params"]["taskID"] is None
        st = status(agent, dst)
        assert st["copy"]["state"] == "copying" and st["legality"] == "ILLEGAL"
        assert [t for t in agent.call("Task.getAll") if t["method"] == "Image.copy"] == []


def test_failing_copy_is_abandoned_after_max_attempts(make_agent, shared):
    agent = copy_agent(make_agent, shared, create=True,
                       recovery={**RECOVERY, "max_attempts": 3})
    src = make_source(agent, shared[0], SIZE)
    dst = dst_for(shared[0])
    events = agent.subscribe("Image.copy")
    start_copy(agent, src, dst)
    killed = []
    for task_id in ("copy1", f"retry:{dst['volumeID']}:0", f"retry:{dst['volumeID']}:1"):
        # Kill each attempt once it owns the marker (its response carries the generation).
        wait_for(lambda: task_state(agent, task_id) == "running" and
                 agent.call("Task.getStatus", {"taskID": task_id})["returned"],
                 what=f"{task_id} owning the copy")
        psutil.Process(worker_pid(agent, task_id)).kill()
        wait_for(lambda: task_state(agent, task_id) == "failed")
        killed.append(task_id)
    ev = events_until(events, lambda e: e["params"].get("state") == "abandoned")[-1]
    assert ev["params"]["attempts"] == 3
    st = wait_for(lambda: (s := status(agent, dst))["copy"]["state"] == "abandoned" and s)
    assert len(st["copy"]["errors"]) == 3
    assert all(e["data"]["signal"] == "SIGKILL" for e in st["copy"]["errors"])
    assert st["legality"] == "ILLEGAL"


def test_recovery_in_progress_until_the_scan_ends(make_agent, shared):
    """The start-up scan waits on the domain's metadata lock; until it ends: 99."""
    import sqlite3
    agent, src, dst = interrupted_copy(make_agent, shared)
    conn = sqlite3.connect(f"{shared[1]}/metadata.db", isolation_level=None, timeout=5)
    conn.execute("BEGIN EXCLUSIVE")  # nobody reads the metadata until we let go
    try:
        agent.start(wait=False)
        c = agent.client()

        def answered_99():
            try:
                c.call("Host.ping", timeout=0.5)
            except CallError as exc:
                return exc.code == 99 and exc.name == "RecoveryInProgress"
            except Exception:
                return False
        wait_for(answered_99, 20, what="99 RecoveryInProgress")
    finally:
        conn.execute("COMMIT")
        conn.close()
    agent.wait_ready()
    wait_legal(agent, dst)


def test_a_retry_killed_before_it_owns_the_marker_is_retried_too(make_agent, shared):
    agent = copy_agent(make_agent, shared, create=True,
                       recovery={**RECOVERY, "max_attempts": 5, "backoff_seconds": 0.5})
    src = make_source(agent, shared[0], SIZE)
    dst = dst_for(shared[0])
    start_copy(agent, src, dst)
    wait_for(lambda: copied(agent, dst) > 0, what="a first checkpoint")
    import sqlite3
    conn = sqlite3.connect(f"{shared[1]}/metadata.db", isolation_level=None, timeout=10)
    psutil.Process(worker_pid(agent, "copy1")).kill()
    retry = f"retry:{dst['volumeID']}:0"
    # Hold the metadata lock: the retry (0.5 s of backoff later) blocks taking over.
    conn.execute("BEGIN EXCLUSIVE")
    try:
        pid = worker_pid(agent, retry)
        psutil.Process(pid).kill()
        wait_for(lambda: task_state(agent, retry) == "failed")
        assert conn.execute("SELECT generation FROM copy_markers").fetchone()[0] == 0
    finally:
        conn.execute("COMMIT")
        conn.close()
    wait_legal(agent, dst)
    assert sha256(volume_path(agent, dst)) == sha256(volume_path(agent, src))
    assert status(agent, dst)["generation"] == 2  # one takeover (the third attempt) + done


def test_recovered_copies_wait_in_order_and_run_a_few_at_a_time(make_agent, shared):
    """Start-up re-issues every leftover copy at once as a pending task, but starts them only
    after READY and at most [recovery] max_running at a time; one still waiting can be
    aborted, and it ends at once, its destination left as it was."""
    agent = copy_agent(make_agent, shared, create=True,
                       copy={**COPY, "max_bytes_per_second": 8 * MiB},
                       recovery={**RECOVERY, "max_running": 2})
    pairs = [(make_source(agent, shared[0], 32 * MiB, seed=i), dst_for(shared[0]))
             for i in range(5)]
    for i, (src, dst) in enumerate(pairs):
        start_copy(agent, src, dst, task_id=f"c{i}")
    wait_for(lambda: all(copied(agent, dst) > 0 for _, dst in pairs), 30,
             what="a checkpoint of every copy")
    agent.kill(signal.SIGKILL)
    agent.reconfigure(storage={"domains": {shared[0]: shared[1]}},
                      copy={"max_bytes_per_second": 16 * MiB})
    agent.start()

    def recovered():
        return [t for t in agent.call("Task.getAll") if t["id"].startswith("recover:")]
    first = recovered()
    assert len(first) == 5 and {t["state"] for t in first} <= {"pending", "running"}
    stats = agent.call("Host.getStats")
    running = {w["taskID"] for w in stats["workers"] if w["op"] == "image.copy"}
    assert len(running) <= 2 and stats["backlog"] >= 3, stats  # (the scan's may linger)
    waiting = [t["id"] for t in first if t["id"] not in running]
    victim = waiting[-1]  # behind at least two others that copy >= 16 MiB at 16 MiB/s each
    record = agent.call("Task.abort", {"taskID": victim})
    assert record["state"] == "aborted" and record["error"]["data"]["name"] == "TaskAborted"

    most = []
    def all_ended():  # counts running tasks: a worker that has reported may linger to exit
        records = recovered()
        most.append(sum(t["state"] == "running" for t in records))
        return all(t["state"] not in ("pending", "running") for t in records)
    wait_for(all_ended, 60, interval=0.05, what="every recovered copy to end")
    assert max(most) <= 2, most
    ends = {t["id"]: t["state"] for t in recovered()}
    assert ends == {t["id"]: "aborted" if t["id"] == victim else "done" for t in first}
    for src, dst in pairs:
        if f"recover:{dst['volumeID']}:0" == victim:
            st = status(agent, dst)
            assert st["legality"] == "ILLEGAL" and st["copy"]["generation"] == 0
        else:
            wait_legal(agent, dst)
            assert sha256(volume_path(agent, dst)) == sha256(volume_path(agent, src))
    assert integrity(shared[1]) == "ok"


def test_backlog_order_limit_and_discard():
    from agent.supervisor.backlog import Backlog

    class T:
        def __init__(self, name):
            self.name, self.active = name, True
    a, b, c, d = (T(n) for n in "abcd")
    log = Backlog(2)
    for t in (a, b, c, d):
        log.add(t, t.name)
    assert [job for _, job in log.take()] == ["a", "b"] and log.waiting() == 2
    assert log.take() == []  # both slots taken
    assert log.discard(c) and not log.discard(c) and not log.discard(a)
    a.active = False  # ended: its slot is free
    assert [job for _, job in log.take()] == ["d"] and log.waiting() == 0
