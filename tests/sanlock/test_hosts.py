"""Hosts that share a domain, with real sanlock daemons (one per host, io_timeout 1 s): the
lockspace joined without blocking the agent, leases held by the writing worker and freed
when it dies, the owner seen from every host, an agent restart that keeps the lockspace,
and the writer fenced when its host loses the lockspace."""

import os
import signal
import time
import uuid

import psutil
import pytest

from agent.client import CallError
from tests.sanlock.daemons import needs_sanlock
from tests.support.harness import concurrently, task_state, wait_for, worker_of
from tests.support.storage_flow import (
    MiB,
    dst_for,
    make_source,
    new_id,
    sha256,
    wait_legal,
)

pytestmark = needs_sanlock

COPY = {"checkpoint_bytes": 4 * MiB, "checkpoint_seconds": 0.1,
        "max_bytes_per_second": 16 * MiB}


def host(make_agent, daemons, name, number, domain=None, **over):
    daemon = daemons(name)
    storage = {"lease_manager": "sanlock", "host_id_number": number,
               "sanlock_io_timeout": 1, "sanlock_run_dir": str(daemon.run_dir)}
    if domain:
        storage["domains"] = {domain[0]: domain[1]}
    over.setdefault("copy", COPY)
    over.setdefault("recovery", {"copy_policy": "manual"})
    agent = make_agent(name, storage=storage, **over)
    agent.daemon = daemon
    return agent


def first_host(make_agent, daemons, shared, name="a", number=1, **over):
    """A host that creates the shared domain and has joined its lockspace."""
    agent = host(make_agent, daemons, name, number, **over)
    agent.call("StorageDomain.create", {"domainID": shared[0], "path": shared[1]})
    joined(agent, shared[0])
    return agent


def second_host(make_agent, daemons, shared, name="b", number=2, **over):
    """A host that attaches the shared domain and has joined its lockspace."""
    agent = host(make_agent, daemons, name, number, **over)
    agent.call("StorageDomain.attach", {"domainID": shared[0], "path": shared[1]})
    joined(agent, shared[0])
    return agent


def lockspace(agent, domain_id):
    for d in agent.call("StorageDomain.list"):
        if d["domainID"] == domain_id:
            return d["lockspace"]


def joined(agent, domain_id, timeout=60):
    wait_for(lambda: lockspace(agent, domain_id) == "joined", timeout, interval=0.05,
             what="the lockspace joined")


def checkpointed(agent, dst):
    def past():
        try:
            st = agent.call("Image.getStatus", dst)
        except CallError:
            return None
        return st["copy"] and st["copy"]["copied"] > 0 and st["copy"]["copied"]
    return wait_for(past, timeout=60, what="a checkpoint")


def test_two_hosts_share_a_domain_and_a_dead_writers_lease_frees_at_once(make_agent, daemons,
                                                                        shared):
    a = host(make_agent, daemons, "a", 1)
    a.call("StorageDomain.create", {"domainID": shared[0], "path": shared[1]})
    assert lockspace(a, shared[0]) in ("joining", "joined")
    joined(a, shared[0])
    b = second_host(make_agent, daemons, shared)
    src = make_source(a, shared[0], 64 * MiB)
    dst = dst_for(shared[0])
    a.client().call("Image.copy", {"src": src, "dst": dst}, id="c1")
    worker = worker_of(a, "c1")
    checkpointed(a, dst)
    # Every host attached sees who writes: host ID 1, alive.
    for h in (a, b):
        lease = h.call("Volume.getInfo", dst)["lease"]
        assert lease["sanlock"]["host_id"] == 1 and lease["live"] is True, lease
        assert lease["task_id"] == "c1" and lease["pid"] == worker.pid
    with pytest.raises(CallError) as exc:  # another host cannot write it meanwhile
        b.call("Image.copy", {"src": src, "dst": dst})
    assert exc.value.code == 203 and exc.value.data["holder"]["sanlock"]["host_id"] == 1
    worker.kill()  # the writer dies: sanlock frees its lease at once, no host-dead wait
    wait_for(lambda: task_state(a, "c1") == "failed", what="the copy's task failed")
    # "At once" is when the daemon sees its client's socket close: a moment on a busy host,
    # never the host-dead wait of a lease whose host stopped renewing.
    wait_for(lambda: not (b.call("Volume.getInfo", dst)["lease"] or {}).get("live"), 10,
             what="sanlock freed the dead writer's lease")
    b.client().call("Image.copy", {"src": src, "dst": dst}, id="c2")
    wait_legal(b, dst)
    path = b.call("Volume.getInfo", dst)["path"]
    assert sha256(path) == sha256(a.call("Volume.getInfo", src)["path"])
    lease = a.call("Volume.getInfo", dst)["lease"]
    assert lease["live"] is False and lease["task_id"] == "c2"


def test_an_agent_restart_finds_its_lockspace_joined(make_agent, daemons, shared):
    a = first_host(make_agent, daemons, shared)
    first = a.call("Task.getStatus", {"taskID": f"join:{shared[0]}"})["result"]
    assert first["already"] is False and first["seconds"] > 0
    a.kill(signal.SIGKILL)
    # What a life killed between writing an area and linking it leaves (one old tmp file
    # in each area directory), and what another host may be writing now (a fresh one).
    stale = [os.path.join(shared[1], d, f"{n}.{uuid.uuid4().hex}.tmp")
             for d, n in (("dom_md", "ids"), ("leases", new_id() + ".sanlock"))]
    fresh = os.path.join(shared[1], "leases", f"{new_id()}.sanlock.{uuid.uuid4().hex}.tmp")
    for path in (*stale, fresh):
        with open(path, "wb") as f:
            f.truncate(1 << 20)
    for path in stale:
        os.utime(path, (time.time() - 2 * 3600,) * 2)
    a.start()  # attached.json names the domain; the daemon kept the lockspace
    joined(a, shared[0], timeout=10)
    again = a.call("Task.getStatus", {"taskID": f"join:{shared[0]}"})["result"]
    assert again["already"] is True and again["swept"] == 2
    assert not any(os.path.exists(p) for p in stale) and os.path.exists(fresh)
    src = make_source(a, shared[0], 4 * MiB)  # a lease taken after the restart
    lease = a.call("Volume.getInfo", src)["lease"]
    assert lease["op"] == "create" and lease["live"] is False and lease["sanlock_host_id"] == 1


def test_work_waits_pending_while_the_lockspace_joins(make_agent, daemons, shared):
    """A copy asked for while the domain is joining is a pending task, started once the
    domain is joined; the agent answers throughout."""
    a = first_host(make_agent, daemons, shared)
    src = make_source(a, shared[0], 4 * MiB)
    a.kill(signal.SIGKILL)
    a.daemon.client("rem_lockspace", "-s", f"{shared[0]}:1:{shared[1]}/dom_md/ids:0")
    assert shared[0] not in a.daemon.client("status")
    a.start()
    dst = dst_for(shared[0])
    assert lockspace(a, shared[0]) == "joining"  # add_lockspace takes seconds
    a.client().send("Image.copy", {"src": src, "dst": dst}, id="c1")
    wait_for(lambda: task_state(a, "c1") is not None, what="the copy admitted")
    assert task_state(a, "c1") == "pending"
    assert a.call("Volume.getInfo", src)["size"] == 4 * MiB  # queries are answered
    joined(a, shared[0])
    wait_for(lambda: task_state(a, "c1") in ("done", "failed"), timeout=60,
             what="the copy started once joined, and ended")
    assert task_state(a, "c1") == "done"
    assert a.call("Image.getStatus", dst)["legality"] == "LEGAL"


def test_a_host_that_loses_the_lockspace_has_its_writer_killed(make_agent, daemons, shared):
    a = first_host(make_agent, daemons, shared)
    src = make_source(a, shared[0], 64 * MiB)
    dst = dst_for(shared[0])
    a.client().call("Image.copy", {"src": src, "dst": dst}, id="c1")
    worker = worker_of(a, "c1")
    checkpointed(a, dst)
    # The lockspace goes away under the writer (as when the host cannot renew its ID):
    # sanlock kills the process that holds a lease in it.
    a.daemon.client("rem_lockspace", "-s", f"{shared[0]}:1:{shared[1]}/dom_md/ids:0")
    wait_for(lambda: not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE,
             timeout=30, what="the writer killed by sanlock")
    wait_for(lambda: task_state(a, "c1") == "failed", what="the copy failed")
    status = a.call("Image.getStatus", dst)
    assert status["legality"] == "ILLEGAL" and status["copy"] is not None
    assert os.path.exists(shared[1])


def fence_waits_out_a_cut_off_host_and_its_late_writer_is_refused(make_agent, daemons,
                                                                   shared, names):
    """Host A's daemon is frozen (SIGSTOP: A is cut off from the storage, its writer goes on).
    Host B's Volume.fence waits until sanlock counts A dead (~70 s with io_timeout 1 s),
    takes the lease and raises the generation; A's writer can commit nothing after that,
    and B's continue ends the copy with the source's data."""
    a = first_host(make_agent, daemons, shared, names[0],
                   copy={**COPY, "max_bytes_per_second": 2 * MiB})
    b = second_host(make_agent, daemons, shared, names[1],
                    copy={**COPY, "max_bytes_per_second": 0})
    # Dense: the rate paces data, and A must still be copying after ~70 s (128 s of data).
    src = make_source(a, shared[0], 256 * MiB)
    dst = dst_for(shared[0])
    first = a.client().call("Image.copy", {"src": src, "dst": dst}, id="c1")
    checkpointed(a, dst)
    os.kill(a.daemon.pid, signal.SIGSTOP)  # A is cut off: nothing renews its host ID
    try:
        fenced = b.client(timeout=240).call(
            "Volume.fence", {**dst, "generation": first["generation"], "timeout": 200},
            id="fence1")
        assert fenced["generation"] == first["generation"] + 1 and fenced["waited"] > 10
        print(f"fence waited {fenced['waited']} s for the cut-off host's lease")
        # A's writer is still running, and can commit nothing any more (206 at its next
        # checkpoint); its task ends failed, never done.
        wait_for(lambda: task_state(a, "c1") == "failed", timeout=90,
                 what="the late writer's copy failed")
        status = b.call("Image.getStatus", dst)
        assert status["legality"] == "ILLEGAL" and status["generation"] == fenced["generation"]
    finally:
        a.daemon.kill()  # SIGKILL ends a stopped process too
    b.client().call("Image.copy", {"src": src, "dst": dst}, id="c2")
    wait_legal(b, dst, timeout=200)
    path = b.call("Volume.getInfo", dst)["path"]
    assert sha256(path) == sha256(b.call("Volume.getInfo", src)["path"])


def two_hosts_configured_with_one_host_id_cannot_both_join(make_agent, daemons, shared, names):
    """An operator's mistake: the second host with the same ID fails its join, visibly
    (StorageDomain.list), and the work that needs the domain fails instead of waiting for
    ever; the first host is unharmed."""
    a = first_host(make_agent, daemons, shared, names[0], number=7)
    b = host(make_agent, daemons, names[1], 7)
    b.call("StorageDomain.attach", {"domainID": shared[0], "path": shared[1]})
    src = make_source(a, shared[0], 4 * MiB)
    b.client().send("Image.copy", {"src": src, "dst": dst_for(shared[0])}, id="c1")
    wait_for(lambda: lockspace(b, shared[0]) == "failed", timeout=120, interval=0.2,
             what="the second host's join failed")
    listed = [d for d in b.call("StorageDomain.list") if d["domainID"] == shared[0]][0]
    assert listed["error"]["data"]["name"] == "OperationFailed", listed
    wait_for(lambda: task_state(b, "c1") == "failed", what="the waiting copy failed")
    assert b.call("Task.getStatus", {"taskID": "c1"})["error"]["data"]["name"] == \
        "DomainUnusable"
    assert lockspace(a, shared[0]) == "joined"
    dst = dst_for(shared[0])
    a.client().call("Image.copy", {"src": src, "dst": dst}, id="c2")
    wait_legal(a, dst)


# Both scenarios above wait out sanlock's own times (a host's ID watched for ~70 s with
# io_timeout 1 s), a floor no code of ours can shorten: they run side by side, each with its
# own hosts, daemons and domain, so the suite pays it once; and with room beyond pytest's
# default 120 s for a loaded 2-core machine (a CI dry run once hit it after a 70 s fence).
@pytest.mark.timeout(300)
def test_a_fence_and_a_duplicate_host_id_each_wait_out_sanlock(make_agent, daemons, workdir):
    concurrently(
        lambda: fence_waits_out_a_cut_off_host_and_its_late_writer_is_refused(
            make_agent, daemons, (new_id(), str(workdir / "fenced")), ("a", "b")),
        lambda: two_hosts_configured_with_one_host_id_cannot_both_join(
            make_agent, daemons, (new_id(), str(workdir / "one-id")), ("c", "d")))


def test_a_host_that_loses_the_lockspace_has_its_upload_export_killed(make_agent, daemons,
                                                                      shared):
    """A write export's worker holds the volume's sanlock lease for the export's life: when
    its host loses the lockspace, sanlock kills it, its qemu-nbd dies with it (parent-death
    signal), and the transfer reads interrupted, ILLEGAL, from the other host."""
    from tests.transfers.helpers import nbd_connect
    a = first_host(make_agent, daemons, shared)
    b = second_host(make_agent, daemons, shared)
    loc = {"domainID": shared[0], "imageID": new_id(), "volumeID": new_id()}
    answer = a.client().call("Export.start", {**loc, "mode": "write", "create": {
        "size": 16 * MiB, "format": "raw"}}, id="up")
    h = nbd_connect(answer["socket"])
    h.pwrite(b"\x01" * MiB, 0)
    h.flush()
    worker = worker_of(a, "up")
    server = [p for p in worker.children() if p.name() == "qemu-nbd"]
    assert len(server) == 1
    # B's daemon counts A's host live once it has seen A renew its ID (a few seconds).
    wait_for(lambda: b.call("Image.getStatus", loc)["transfer"]["state"] == "serving",
             timeout=30, what="the transfer serving, seen from b")
    a.daemon.client("rem_lockspace", "-s", f"{shared[0]}:1:{shared[1]}/dom_md/ids:0")

    def dead(p):
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    wait_for(lambda: dead(worker) and dead(server[0]), timeout=30,
             what="the writer and its qemu-nbd killed")
    wait_for(lambda: b.call("Image.getStatus", loc)["transfer"]["state"] == "interrupted",
             timeout=30, what="the transfer interrupted, seen from b")
    assert b.call("Image.getStatus", loc)["legality"] == "ILLEGAL"


def test_a_merge_whose_host_died_is_continued_by_another_host(make_agent, daemons, shared,
                                                              workdir):
    from tests.images.test_merge_crashes import finished, merge_params
    from tests.images.test_merges import four_volume_chain, views
    # Slow on a: the rate paces the data the merge moves, and its top holds ~10 MiB, which
    # at the usual rate could be merged before the kill lands.
    a = first_host(make_agent, daemons, shared, copy={**COPY, "max_bytes_per_second": 2 * MiB})
    b = second_host(make_agent, daemons, shared)
    chain = four_volume_chain(a, shared[0])
    before = views(chain, workdir)
    base, top = chain[1], chain[2]
    a.client().call("Image.merge", merge_params(base, top), id="m1")
    worker = worker_of(a, "m1")

    def merging():
        m = b.call("Image.getStatus", {k: base[k] for k in ("domainID", "imageID",
                                                             "volumeID")})["merge"]
        return m and m["copied"] > 0 and m
    seen = wait_for(merging, timeout=60, what="b sees a's merge checkpointed")
    assert seen["host_id"] == "host-a" and seen["running"] is True
    assert seen["lease"]["sanlock"]["host_id"] == 1
    with pytest.raises(CallError) as held:  # one writer: b cannot take it over meanwhile
        b.call("Image.merge", merge_params(base, top))
    assert held.value.error["data"]["name"] == "LeaseHeld"
    a.kill(signal.SIGKILL)  # the host's agent dies; sanlock frees what its worker held
    wait_for(lambda: not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE,
             timeout=30, what="a's merge worker gone")
    held = [{k: v[k] for k in ("domainID", "imageID", "volumeID")} for v in chain[1:]]
    wait_for(lambda: not any((b.call("Volume.getInfo", loc)["lease"] or {}).get("live")
                             for loc in held), timeout=30,
             what="sanlock freed every lease of the dead worker")
    again = b.client().call("Image.merge", merge_params(base, top), id="m2")
    assert again["step"] == "commit" and again["copied"] >= seen["copied"] > 0
    wait_for(lambda: task_state(b, "m2") == "done", timeout=120, what="b's merge done")
    finished(b, chain, before, 2)
