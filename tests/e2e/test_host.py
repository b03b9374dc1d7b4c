"""Host: ping, statistics, capabilities, and Debug.* only where debug = true."""

import pytest

from agent import __version__, api
from agent.client import CallError
from agent.supervisor import states
from tests.support.harness import wait_for


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def test_ping(agent):
    assert agent.call("Host.ping") is True


def test_stats_fields_and_types(agent):
    stats = agent.call("Host.getStats")
    assert is_number(stats["cpu_percent"]) and 0 <= stats["cpu_percent"]
    assert isinstance(stats["cpu_count"], int) and stats["cpu_count"] >= 1
    mem = stats["memory"]
    assert isinstance(mem["total"], int) and mem["total"] > 0
    assert 0 <= mem["available"] <= mem["total"] and 0 <= mem["percent"] <= 100
    assert isinstance(stats["load"], list) and len(stats["load"]) == 3
    assert all(is_number(x) and x >= 0 for x in stats["load"])
    assert is_number(stats["uptime_seconds"]) and stats["uptime_seconds"] > 0
    me = stats["agent"]
    assert me["pid"] == agent.pid
    assert isinstance(me["rss_bytes"], int) and me["rss_bytes"] > 0
    assert is_number(me["uptime_seconds"]) and me["uptime_seconds"] >= 0
    assert me["boot_id"] == agent.call("Host.getCapabilities")["boot_id"]
    assert isinstance(stats["forkserver_pid"], int)
    assert stats["workers_running"] == 0 and stats["workers"] == []
    assert set(stats["tasks"]) == set(states.STATES)


def test_stats_count_workers_and_tasks(agent):
    c = agent.client()
    agent.call("Debug.sleep", {"seconds": 0}, id="ok")
    with pytest.raises(CallError):
        agent.call("Debug.sleep", {"seconds": 0, "fail": True}, id="bad")
    c.send("Debug.sleep", {"seconds": 60}, id="busy")
    # Polled with Task.getAll, which never fails: a Task.getStatus that came before the
    # request would be a failed task (NoSuchTask) in the counts this test checks.
    wait_for(lambda: any(t["id"] == "busy" and t["state"] == "running"
                         for t in agent.call("Task.getAll", {"states": ["running"]})))

    # "ok" and "bad" have answered, but their processes are listed until they
    # are reaped: wait for that, which is the fact this test is about.
    stats = wait_for(lambda: (s := agent.call("Host.getStats"))["workers_running"] == 1 and s)
    assert [(w["taskID"], w["op"]) for w in stats["workers"]] == [("busy", "debug.sleep")]
    assert stats["workers"][0]["pid"] in {p.pid for p in agent.workers()}
    counts = stats["tasks"]
    assert all(isinstance(n, int) and n >= 0 for n in counts.values())
    assert counts["running"] == 1 and counts["failed"] == 1 and counts["aborted"] == 0
    assert counts["done"] >= 2  # "ok" and the status calls before this one

    agent.call("Task.abort", {"taskID": "busy"})
    assert c.recv()["error"]["data"]["name"] == "TaskAborted"
    stats = wait_for(lambda: (s := agent.call("Host.getStats"))["workers_running"] == 0 and s)
    assert stats["tasks"]["running"] == 0 and stats["tasks"]["aborted"] == 1


def test_capabilities(agent):
    caps = agent.call("Host.getCapabilities")
    assert caps["version"] == __version__
    assert caps["host_id"] == "host-a"
    assert isinstance(caps["boot_id"], str) and len(caps["boot_id"]) == 32
    assert caps["task_states"] == list(states.STATES)
    by_name = {m["name"]: m for m in caps["methods"]}
    assert set(by_name) == set(api.load_all())  # debug = true: every method, Debug.* too
    assert {"Host.ping", "Host.getStats", "Host.getCapabilities", "Task.getStatus",
            "Task.getAll", "Task.abort", "Debug.sleep", "Debug.crash"} <= set(by_name)
    for m in caps["methods"]:
        assert m["doc"] and m["runs_in"] in ("supervisor", "worker"), m
        assert all(set(p) == {"name", "type", "required", "doc"} for p in m["params"]), m
    sleep = by_name["Debug.sleep"]
    assert [p["name"] for p in sleep["params"]] == ["seconds", "fail", "exit_code", "stubborn"]
    assert [p["required"] for p in sleep["params"]] == [True, False, False, False]
    assert sleep["params"][0]["type"] == "number" and sleep["runs_in"] == "worker"
    assert by_name["Task.getStatus"]["params"][0]["name"] == "taskID"
    assert by_name["Host.ping"]["params"] == [] and by_name["Host.ping"]["runs_in"] == "supervisor"


def test_debug_verbs_only_with_debug_true(make_agent):
    with_debug = make_agent("a")
    without = make_agent("b", debug=False)
    names = {m["name"] for m in without.call("Host.getCapabilities")["methods"]}
    assert "Host.ping" in names and "Task.abort" in names
    assert not {n for n in names if n.startswith("Debug.")}
    for method, params in (("Debug.sleep", {"seconds": 0}), ("Debug.crash", None)):
        with pytest.raises(CallError) as err:
            without.call(method, params)
        assert (err.value.code, err.value.name) == (-32601, "MethodNotFound")
    # The same call on the debug agent works: the refusal is the setting, not the call.
    assert with_debug.call("Debug.sleep", {"seconds": 0}) == {"slept": 0}
    assert "Debug.sleep" in {m["name"] for m in with_debug.call("Host.getCapabilities")["methods"]}
