"""Class 11: an agent's restart is not a failure of the copy it was running. A copy SIGKILLed
with its agent more times than [recovery] max_attempts still resumes and ends LEGAL, with
no failure counted; failures that are counted each record their reason."""

import json
import os
import signal

import psutil
import pytest

from tests.support.harness import wait_for
from tests.support.storage_flow import (
    MiB,
    dst_for,
    make_source,
    new_id,
    sha256,
    status,
    volume_path,
)
from workers.testseams import ENV

pytestmark = pytest.mark.timeout(180)

SIZE = 24 * MiB


def slow_copy(make_agent, workdir, rate: int):
    """An agent with max_attempts 2 and a copy of SIZE running at `rate` bytes a second."""
    agent = make_agent(copy={"chunk_bytes": MiB, "checkpoint_bytes": MiB,
                             "checkpoint_seconds": 0.05, "max_bytes_per_second": rate},
                       recovery={"copy_policy": "resume", "max_attempts": 2,
                                 "backoff_seconds": 0.1})
    domain = new_id()
    agent.call("StorageDomain.create", {"domainID": domain, "path": str(workdir / "d")})
    src = make_source(agent, domain, SIZE)
    dst = dst_for(domain)
    agent.call("Image.copy", {"src": src, "dst": dst})
    return agent, src, dst


def test_restarts_do_not_use_up_a_copys_attempts(make_agent, workdir):
    agent, src, dst = slow_copy(make_agent, workdir, 8 * MiB)
    seen = 0
    for restart in range(4):  # twice max_attempts
        # Kill it mid-copy, each time further along (the checkpoint moves on).
        wait_for(lambda: (s := status(agent, dst))["copy"] and s["copy"]["copied"] > seen
                 and s["copy"]["lease"] and s["copy"]["lease"]["live"], 60,
                 what=f"the copy to make progress before kill {restart + 1}")
        seen = status(agent, dst)["copy"]["copied"]
        agent.kill()
        agent.start()
    final = wait_for(lambda: (s := status(agent, dst))["legality"] == "LEGAL" and s, 120,
                     interval=0.1, what="the copy to end LEGAL")
    assert final["copy"] is None
    assert sha256(volume_path(agent, dst)) == sha256(volume_path(agent, src))


def test_counted_failures_each_record_their_reason(make_agent, workdir):
    """A copy that fails for real (its worker SIGKILLed while the agent lives) counts a
    failure each time, recorded with its reason, and is abandoned after max_attempts."""
    agent, src, dst = slow_copy(make_agent, workdir, 4 * MiB)
    for kill in range(2):
        holder = wait_for(lambda: (s := status(agent, dst))["copy"]["state"] == "copying"
                          and s["copy"]["lease"] and s["copy"]["lease"]["live"]
                          and s["copy"]["failures"] == kill and s["copy"]["lease"], 60,
                          what=f"a live copier after {kill} failures")
        os.kill(holder["pid"], signal.SIGKILL)
    st = wait_for(lambda: (s := status(agent, dst))["copy"]["state"] == "abandoned" and s, 60,
                  what="the copy abandoned after max_attempts failures")
    assert st["copy"]["failures"] == 2
    assert [e["data"]["name"] for e in st["copy"]["errors"]] == ["WorkerDied", "WorkerDied"]
    assert st["legality"] == "ILLEGAL"


def ours(agent, pid) -> bool:
    """Whether `pid` is a worker of this life of the agent (not a dying one of the last)."""
    if not isinstance(pid, int):  # a lease whose holder record is not written yet
        return False
    try:
        return agent.proc.pid in [p.pid for p in psutil.Process(pid).parents()]
    except psutil.NoSuchProcess:
        return False


def test_backoff_follows_failures_not_take_overs(make_agent, workdir):
    """Five restarts take the copy over five times (attempts 6, failures 0); then its worker
    is SIGKILLed: the retry waits one backoff (a first failure), not 2**5 of them."""
    agent, src, dst = slow_copy(make_agent, workdir, 2 * MiB)
    for restart in range(5):  # each life takes the copy over before it is killed
        wait_for(lambda: (s := status(agent, dst))["copy"] and s["copy"]["lease"]
                 and s["copy"]["lease"]["live"] and ours(agent, s["copy"]["lease"].get("pid"))
                 and s["copy"]["attempts"] == restart + 1, 60,
                 what=f"life {restart + 1}'s copier")
        agent.kill()
        agent.start()
    # Its lease is taken before its take-over: wait for both.
    holder = wait_for(lambda: (s := status(agent, dst))["copy"]["lease"]
                      and s["copy"]["lease"]["live"] and ours(agent, s["copy"]["lease"].get("pid"))
                      and s["copy"]["attempts"] == 6 and s["copy"]["lease"], 60,
                      what="this life's copier after the restarts")
    os.kill(holder["pid"], signal.SIGKILL)

    def failed_line():
        for line in agent.log_path.read_text().splitlines():
            if '"copy_failed"' in line:
                return json.loads(line)
        return None
    line = wait_for(failed_line, 60, what="the failure logged")
    assert line["failures"] == 1 and line["attempts"] == 6, line
    assert line["action"] == "retry" and line["retry_in"] == pytest.approx(0.1), line
    final = wait_for(lambda: (s := status(agent, dst))["legality"] == "LEGAL" and s, 120,
                     interval=0.1, what="the retried copy to end LEGAL")
    assert final["copy"] is None


def _copy_killed_under_faults(make_agent, workdir, max_attempts: int, faults: dict):
    """An agent with the crash seam `faults`, whose copy (answered: its generation known)
    has had its copier killed once; (agent, its destination)."""
    agent = make_agent(start=False, copy={"max_bytes_per_second": 2 * MiB},
                       recovery={"copy_policy": "resume", "max_attempts": max_attempts,
                                 "backoff_seconds": 0.1})
    agent.start(env={ENV: json.dumps(faults)})
    domain = new_id()
    agent.call("StorageDomain.create", {"domainID": domain, "path": str(workdir / "d")})
    src = make_source(agent, domain, SIZE)
    dst = dst_for(domain)
    agent.call("Image.copy", {"src": src, "dst": dst})
    holder = wait_for(lambda: (s := status(agent, dst))["copy"]["lease"]
                      and s["copy"]["lease"]["live"] and s["copy"]["lease"], 60,
                      what="the first copier")
    os.kill(holder["pid"], signal.SIGKILL)
    return agent, dst


def test_retries_that_die_before_they_say_what_they_took_still_end(make_agent, workdir):
    """Every retry's worker dies right after its take-over commits, before it can say what
    generation it took (the crash seam, in every copy worker). Each next retry, and then
    the abandon, are told who died since: they take the copy at the generation the dead
    raised, so it is abandoned after max_attempts with each failure counted once, with its
    reason, never left copying with nobody at it."""
    agent, dst = _copy_killed_under_faults(
        make_agent, workdir, 3, {"crash_after": "commit:take_over", "op": "image.copy"})
    st = wait_for(lambda: (s := status(agent, dst))["copy"]["state"] == "abandoned" and s, 60,
                  what="the copy abandoned after max_attempts failures")
    copy = st["copy"]
    assert (copy["failures"], copy["attempts"], copy["generation"]) == (3, 3, 2), copy
    assert [e["data"]["name"] for e in copy["errors"]] == ["WorkerDied"] * 3
    assert len({(e["task_id"], e["time"]) for e in copy["errors"]}) == 3
    assert st["legality"] == "ILLEGAL"


def test_an_abandon_whose_worker_dies_is_tried_again(make_agent, workdir):
    """The abandon after max_attempts is SIGKILLed before it writes anything (the crash
    seam, once): it is tried again after a backoff, so the copy ends abandoned, its one
    failure counted once though two abandons carried it, never left copying with nobody at
    it until the next start-up."""
    once = workdir / "the-first-abandon-dies"
    once.write_text("")
    agent, dst = _copy_killed_under_faults(
        make_agent, workdir, 1, {"crash_before": "begin:abandon", "once": str(once),
                                 "op": "image.abandon"})
    st = wait_for(lambda: (s := status(agent, dst))["copy"]["state"] == "abandoned" and s, 60,
                  what="the copy abandoned by the second abandon")
    assert not once.exists()  # the first abandon's worker did die
    retried = [json.loads(line) for line in agent.log_path.read_text().splitlines()
               if '"abandon_failed"' in line]
    assert [(r["error"], r["action"]) for r in retried] == [("WorkerDied", "retry")], retried
    copy = st["copy"]
    assert (copy["failures"], copy["attempts"]) == (1, 1), copy
    assert [e["data"]["name"] for e in copy["errors"]] == ["WorkerDied"]
    assert st["legality"] == "ILLEGAL"
