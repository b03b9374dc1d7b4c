"""Crashes in the middle of qcow2 copies: the worker or the agent SIGKILLed. The copy resumes
from its checkpoint on the same qcow2, ends equal to its source, qemu-img check finds no
corruption, and no qemu-nbd of the dead life is left.

Copies are rate-limited ([copy] max_bytes_per_second) so a kill lands mid-copy whatever the
machine's speed; the tests wait on facts (a checkpoint recorded, a pid gone), never on time.
"""

import signal

import psutil
import pytest

from tests.images.chains import (
    announced_wait,
    check,
    compare,
    make_chain,
    needs_qemu,
    qemu_io,
    qemu_nbd_under,
)
from tests.support.harness import events_until, task_state, wait_for, worker_of
from tests.support.storage_flow import MiB, ids, new_id, wait_legal

pytestmark = needs_qemu

SIZE = 128 * MiB
COPY = {"checkpoint_bytes": 8 * MiB, "checkpoint_seconds": 0.1,
        "max_bytes_per_second": 32 * MiB}
RECOVERY = {"backoff_seconds": 0.1}


@pytest.fixture
def domain(workdir):
    return new_id(), str(workdir / "dom")


def start_agent(make_agent, domain):
    agent = make_agent(copy=COPY, recovery=RECOVERY)
    agent.call("StorageDomain.create", {"domainID": domain[0], "path": domain[1]})
    return agent


def exports_of(worker: psutil.Process, count: int = 2) -> list[psutil.Process]:
    """The worker's qemu-nbd children, once `count` are running (the source's, and a qcow2
    destination's: a raw one is written by the worker itself)."""
    def two():
        kids = []
        for p in worker.children():
            try:  # the worker's qemu-img runs come and go between listing and asking
                if p.name() == "qemu-nbd":
                    kids.append(p)
            except psutil.NoSuchProcess:
                continue
        return kids if len(kids) == count else None
    return wait_for(two, what=f"the copy's {count} qemu-nbd exports")


def dense(chain: list[dict]) -> list[dict]:
    """The chain with the layer above its base holding half the disk: the rate limit paces
    the data a copy moves, so a kill meant for a copy (a chain's middle layer) lands while
    it runs, a checkpoint past its start (the few MiB make_chain writes take a fraction of
    a second, and a copy could end before its kill)."""
    qemu_io(chain[1]["path"], chain[1]["format"], f"write -P 9 {SIZE // 4} {SIZE // 2}")
    return chain


def checkpointed(agent, dst, above=0):
    def past():
        try:
            st = agent.call("Image.getStatus", dst)
        except Exception:
            return None
        return st["copy"] and st["copy"]["copied"] > above and st["copy"]["copied"]
    return wait_for(past, timeout=60, what="a checkpoint past the start")


def alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def gone(procs):
    wait_for(lambda: not any(alive(p) for p in procs), timeout=15,
             what="the dead life's processes gone")


def resumed_from(events, volume_id) -> int:
    """The offset the next life of the copy started from (its "started" event)."""
    found = events_until(events, lambda e: e["params"].get("volumeID") == volume_id
                         and e["params"].get("state") == "started", timeout=60)
    return found[-1]["params"]["copied"]


@pytest.mark.parametrize("fmt", ["cow", "raw"])
def test_a_killed_worker_resumes_a_collapse_from_its_checkpoint(make_agent, domain, fmt):
    agent = start_agent(make_agent, domain)
    chain = dense(make_chain(agent, domain[0], size=SIZE, base_format="cow", layers=3))
    dst = {"domainID": domain[0], "imageID": new_id(), "volumeID": new_id()}
    events = agent.subscribe("Image.copy")
    agent.client().call("Image.copy", {"src": ids(chain[-1]), "dst": dst, "format": fmt},
                        id="c1")
    assert resumed_from(events, dst["volumeID"]) == 0  # the first life's start
    worker = worker_of(agent, "c1")
    nbds = exports_of(worker, 2 if fmt == "cow" else 1)
    at = checkpointed(agent, dst)
    worker.kill()
    gone([worker, *nbds])
    assert resumed_from(events, dst["volumeID"]) >= at > 0
    wait_legal(agent, dst)
    info = agent.call("Volume.getInfo", dst)
    same = compare(chain[-1]["path"], "cow", info["path"], fmt)
    assert same.returncode == 0, same.stdout
    if fmt == "cow":
        assert check(info["path"])["check-errors"] == 0
    assert qemu_nbd_under(domain[1]) == []


def test_a_killed_agent_leaves_no_qemu_nbd_and_its_copy_resumes_at_start_up(make_agent,
                                                                            domain):
    agent = start_agent(make_agent, domain)
    chain = dense(make_chain(agent, domain[0], size=SIZE, base_format="raw", layers=3))
    dst = {"domainID": domain[0], "imageID": new_id(), "volumeID": new_id()}
    agent.client().call("Image.copy", {"src": ids(chain[-1]), "dst": dst, "format": "cow"},
                        id="c1")
    worker = worker_of(agent, "c1")
    nbds = exports_of(worker)
    at = checkpointed(agent, dst)
    agent.kill(signal.SIGKILL)
    gone([worker, *nbds])
    assert qemu_nbd_under(domain[1]) == []
    agent.start()  # the same host again: its recovery policy resumes the copy
    again = agent
    seen = []  # every checkpoint seen until LEGAL: a resume never goes below the dead life's

    def legal():
        st = again.call("Image.getStatus", dst)
        if st["copy"]:
            seen.append(st["copy"]["copied"])
        return st["legality"] == "LEGAL"
    wait_for(legal, timeout=60, interval=0.02, what="the recovered copy LEGAL")
    assert seen and min(seen) >= at > 0, (seen[:5], at)
    info = again.call("Volume.getInfo", dst)
    assert compare(chain[-1]["path"], "cow", info["path"], "cow").returncode == 0
    assert check(info["path"])["check-errors"] == 0
    status = again.call("Image.getStatus", dst)
    assert status["legality"] == "LEGAL" and status["generation"] >= 2



def test_a_continued_chain_copy_resumes_each_layer(make_agent, domain):
    """Killed while its middle layer copies: the client's continue skips the LEGAL base and
    resumes the middle layer from its own checkpoint, then copies the leaf."""
    agent = make_agent(copy=COPY, recovery={"copy_policy": "manual"})  # no retry: the client
    agent.call("StorageDomain.create", {"domainID": domain[0], "path": domain[1]})
    chain = dense(make_chain(agent, domain[0], size=SIZE, base_format="raw", layers=3))
    dst = {"domainID": domain[0], "imageID": new_id(), "volumeID": new_id()}
    events = agent.subscribe("Image.copy")
    answer = agent.client().call("Image.copy", {"src": ids(chain[-1]), "dst": dst,
                                                "mode": "chain"}, id="c1")
    base, middle, leaf = answer["chain"]
    worker = worker_of(agent, "c1")
    middle_loc = {**dst, "volumeID": middle}
    at = checkpointed(agent, middle_loc)
    assert agent.call("Image.getStatus", {**dst, "volumeID": base})["legality"] == "LEGAL"
    worker.kill()
    gone([worker])
    wait_for(lambda: task_state(agent, "c1") == "failed", what="the first copy failed")
    events_until(events, lambda e: e["params"].get("volumeID") == middle
                 and e["params"].get("state") == "started", timeout=5)  # the first life's
    agent.client().call("Image.copy", {"src": ids(chain[-1]), "dst": dst, "mode": "chain"},
                        id="c2")
    assert resumed_from(events, middle) >= at > 0
    wait_legal(agent, dst)
    image = agent.call("Image.getInfo", {"domainID": domain[0],
                                         "imageID": dst["imageID"]})["chain"]
    assert [v["volumeID"] for v in image] == [base, middle, leaf]
    for copy, source in zip(image, chain):
        assert compare(source["path"], source["format"], copy["path"],
                       copy["format"]).returncode == 0
        if copy["format"] == "cow":
            assert check(copy["path"])["check-errors"] == 0
    assert qemu_nbd_under(domain[1]) == []


def test_a_continued_copy_waits_out_the_lock_its_killed_writer_holds(make_agent, domain,
                                                                      workdir):
    """A killed copy's qemu-nbd can hold a qcow2 destination's lock a while after its worker
    is gone (a thread still finishing its I/O): the copy continued then says it waits
    (Image.copy waiting) and goes on from its checkpoint once the lock is let go. (A raw
    destination takes no lock a second writer would meet: qemu shares a raw file.)"""
    fmt = "cow"
    agent = make_agent(copy=COPY, recovery={"copy_policy": "manual"})
    agent.call("StorageDomain.create", {"domainID": domain[0], "path": domain[1]})
    chain = dense(make_chain(agent, domain[0], size=SIZE, base_format="cow", layers=2))
    dst = {"domainID": domain[0], "imageID": new_id(), "volumeID": new_id()}
    events = agent.subscribe("Image.copy")
    agent.client().call("Image.copy", {"src": ids(chain[-1]), "dst": dst, "format": fmt},
                        id="c1")
    worker = worker_of(agent, "c1")
    at = checkpointed(agent, dst)
    worker.kill()
    wait_for(lambda: task_state(agent, "c1") == "failed", what="the first copy failed")
    seen = announced_wait(workdir, agent.call("Volume.getInfo", dst)["path"], fmt, events,
                          lambda: agent.client().call("Image.copy", {
                              "src": ids(chain[-1]), "dst": dst}, id="c2"))
    started = [e["params"] for e in seen if e["params"].get("state") == "started"]
    assert started[-1]["copied"] >= at > 0  # the second life's, from its checkpoint
    wait_legal(agent, dst)
    info = agent.call("Volume.getInfo", dst)
    assert compare(chain[-1]["path"], "cow", info["path"], fmt).returncode == 0
    assert qemu_nbd_under(domain[1]) == []


def test_a_chain_copy_killed_with_its_agent_is_recovered_from_its_leaf(make_agent, domain):
    """Start-up recovery continues a chain copy once, from its leaf's marker: the inner
    layer's own marker is covered by it, not recovered as a copy of its own."""
    agent = start_agent(make_agent, domain)
    chain = dense(make_chain(agent, domain[0], size=SIZE, base_format="cow", layers=3))
    dst = {"domainID": domain[0], "imageID": new_id(), "volumeID": new_id()}
    answer = agent.client().call("Image.copy", {"src": ids(chain[-1]), "dst": dst,
                                                "mode": "chain"}, id="c1")
    worker = worker_of(agent, "c1")
    checkpointed(agent, {**dst, "volumeID": answer["chain"][1]})
    agent.kill(signal.SIGKILL)
    gone([worker])
    agent.start()
    wait_legal(agent, dst)
    recovered = [t["id"] for t in agent.call("Task.getAll")
                 if t["method"] == "Image.copy"]
    assert recovered and all(answer["chain"][-1] in t for t in recovered), recovered
    image = agent.call("Image.getInfo", {"domainID": domain[0],
                                         "imageID": dst["imageID"]})["chain"]
    assert [v["legality"] for v in image] == ["LEGAL"] * 3
    for copy, source in zip(image, chain):
        assert compare(source["path"], "cow", copy["path"], "cow").returncode == 0
        assert check(copy["path"])["check-errors"] == 0
    assert qemu_nbd_under(domain[1]) == []


def test_a_destination_qemu_cannot_reopen_is_made_again_and_the_copy_starts_over(make_agent,
                                                                                domain):
    """What an earlier life left is unusable (its qcow2 header destroyed behind our back):
    the continue records that nothing is durable (checkpoint 0) before it makes the file
    again, copies from the start, and ends equal."""
    agent = make_agent(copy=COPY, recovery={"copy_policy": "manual"})
    agent.call("StorageDomain.create", {"domainID": domain[0], "path": domain[1]})
    chain = make_chain(agent, domain[0], size=SIZE, base_format="cow", layers=2)
    qemu_io(chain[-1]["path"], "cow", f"write -P 9 0 {SIZE}")  # dense: many checkpoints
    dst = {"domainID": domain[0], "imageID": new_id(), "volumeID": new_id()}
    agent.client().call("Image.copy", {"src": ids(chain[-1]), "dst": dst, "format": "cow"},
                        id="c1")
    checkpointed(agent, dst)
    agent.call("Task.abort", {"taskID": "c1"})
    wait_for(lambda: task_state(agent, "c1") == "aborted", what="the copy stopped")
    path = agent.call("Volume.getInfo", dst)["path"]
    with open(path, "r+b") as f:
        f.write(b"\0" * 4096)
    seen = []

    def legal():
        st = agent.call("Image.getStatus", dst)
        if st["copy"]:
            seen.append(st["copy"]["copied"])
        return st["legality"] == "LEGAL"
    agent.client().call("Image.copy", {"src": ids(chain[-1]), "dst": dst}, id="c2")
    wait_for(legal, timeout=60, interval=0.02, what="the copy LEGAL")
    assert 0 in seen or min(seen, default=0) < SIZE // 2, seen[:5]  # it started over
    assert compare(chain[-1]["path"], "cow", path, "cow").returncode == 0
    assert check(path)["check-errors"] == 0
