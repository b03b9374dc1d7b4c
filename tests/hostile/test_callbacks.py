"""Class 1: a bug or a refusal while serving one request (a handler, an end hook, a timer, a
worker's report) costs that request an answer, never the agent: every other task goes on.

Refusals are caused for real (Image.copy refused by its handler, alone, as a notification, in
a batch); bugs that cannot be caused for real are planted by Debug.fault (agent/api/debug.py),
the seam for them."""

import json

import pytest

from agent.client import CallError
from tests.support.harness import task_state, wait_for
from tests.support.storage_flow import dst_for, make_source, new_id

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def busy_agent(make_agent, workdir):
    """An agent with a domain, a source volume, and a long task running in a worker: what a
    crash of the supervisor would take with it."""
    agent = make_agent()
    domain = new_id()
    agent.call("StorageDomain.create", {"domainID": domain, "path": str(workdir / "d")})
    agent.src = make_source(agent, domain, 1 << 20)
    agent.domain = domain
    bystander = agent.client()
    bystander.send("Debug.sleep", {"seconds": 3}, id="bystander")
    wait_for(lambda: task_state(agent, "bystander") == "running", 10)
    return agent


def still_serving(agent, pid):
    assert agent.proc.poll() is None and agent.pid == pid, agent.log()
    assert agent.call("Host.ping") is True
    wait_for(lambda: task_state(agent, "bystander") == "done", 20,
             what="the task that was running meanwhile to finish")


def refused_copies(agent):
    src = agent.src
    unattached = {**dst_for(new_id())}
    return [
        ({"src": src, "dst": src}, -32602),  # src == dst, refused by the handler
        ({"src": src, "dst": unattached}, 200),  # NoSuchDomain, from the handler
        ({"src": unattached, "dst": dst_for(agent.domain)}, 200),
    ]


def test_refused_copies_answered_and_the_agent_lives(busy_agent):
    agent, pid = busy_agent, busy_agent.pid
    for params, code in refused_copies(agent):
        with pytest.raises(CallError) as exc:
            agent.call("Image.copy", params)
        assert exc.value.code == code, exc.value
    still_serving(agent, pid)


def test_refused_copies_as_notifications_and_in_a_batch(busy_agent):
    agent, pid = busy_agent, busy_agent.pid
    c = agent.client()
    copies = refused_copies(agent)
    for params, _ in copies:  # notifications: never answered, and never fatal
        c.send_raw(json.dumps({"jsonrpc": "2.0", "method": "Image.copy",
                               "params": params}).encode())
    batch = [{"jsonrpc": "2.0", "method": "Image.copy", "params": p, "id": f"b{i}"}
             for i, (p, _) in enumerate(copies)]
    batch.append({"jsonrpc": "2.0", "method": "Image.copy", "params": copies[0][0]})
    c.send_raw(json.dumps(batch).encode())
    answers = c.recv()
    assert sorted((a["id"], a["error"]["code"]) for a in answers) == \
        [(f"b{i}", code) for i, (_, code) in enumerate(copies)]
    still_serving(agent, pid)


@pytest.mark.parametrize("where", ["hook", "timer", "listener"])
def test_a_bug_in_a_callback_costs_only_what_it_served(busy_agent, where):
    agent, pid = busy_agent, busy_agent.pid
    assert agent.call("Debug.fault", {"where": where}) is True
    c = agent.client()
    c.send("Debug.sleep", {"seconds": 0.5}, id="victim")
    wait_for(lambda: task_state(agent, "victim") in ("done", "failed"), 20)
    rec = agent.call("Task.getStatus", {"taskID": "victim"})
    if where == "hook":  # the task whose ending crashed fails, with -32603 and no traceback
        assert rec["state"] == "failed" and rec["error"]["code"] == -32603, rec
        assert "Traceback" not in json.dumps(rec)
    elif where == "listener":
        # The next report handled, the victim's or the bystander's, crashes: that worker is
        # stopped and its task fails by name; the other finishes.
        wait_for(lambda: task_state(agent, "bystander") in ("done", "failed"), 20)
        ends = {t: agent.call("Task.getStatus", {"taskID": t}) for t in ("victim", "bystander")}
        failed = [r for r in ends.values() if r["state"] == "failed"]
        assert len(failed) == 1 and failed[0]["error"]["data"]["name"] == "WorkerDied", ends
        assert [r["state"] for r in ends.values()].count("done") == 1, ends
    else:  # a timer's bug belongs to no task
        assert rec["state"] == "done", rec
    if where != "listener":
        still_serving(agent, pid)
    else:
        assert agent.proc.poll() is None and agent.pid == pid and agent.call("Host.ping")
    stats = agent.call("Host.getStats")
    assert stats["agent"]["callback_errors"] >= 1
    assert "RuntimeError: a planted bug" in agent.log()  # the details are in the log
