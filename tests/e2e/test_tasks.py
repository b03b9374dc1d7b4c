"""Tasks: caller-named, transient, one worker process each, abortable, reaped."""

import signal

import psutil
import pytest

from agent.client import CallError
from tests.support.harness import task_state, wait_for


def status(agent, task_id):
    return agent.call("Task.getStatus", {"taskID": task_id})


def test_duplicate_id_refused_while_active_then_reusable(agent):
    c = agent.client()
    c.send("Debug.sleep", {"seconds": 30}, id="dup")
    wait_for(lambda: task_state(agent, "dup") == "running")
    before = status(agent, "dup")
    with pytest.raises(CallError) as err:
        agent.call("Debug.sleep", {"seconds": 0}, id="dup")
    assert (err.value.code, err.value.name) == (100, "TaskIdInUse")
    after = status(agent, "dup")
    assert after["state"] == "running" and after["created"] == before["created"]
    agent.call("Task.abort", {"taskID": "dup"})
    wait_for(lambda: status(agent, "dup")["state"] == "aborted")
    # Ended: the ID is free again at once, and names a new task.
    assert agent.call("Debug.sleep", {"seconds": 0}, id="dup") == {"slept": 0}
    again = status(agent, "dup")
    assert again["state"] == "done" and again["created"] > before["created"]


def test_integer_id_is_its_decimal_string(agent):
    assert agent.call("Debug.sleep", {"seconds": 0}, id=-42) == {"slept": 0}
    assert status(agent, "-42")["method"] == "Debug.sleep"
    assert status(agent, -42)["id"] == "-42"


def test_responses_out_of_order(agent):
    c = agent.client()
    c.send("Debug.sleep", {"seconds": 1.0}, id="slow")
    c.send("Debug.sleep", {"seconds": 0}, id="fast")
    c.send("Host.ping", id="ping")
    order = [c.recv()["id"] for _ in range(3)]
    assert order[-1] == "slow"
    assert set(order[:2]) == {"fast", "ping"}


def test_many_in_flight_from_one_client(agent):
    c = agent.client()
    ids = [f"m{i}" for i in range(40)]
    for i in ids:
        c.send("Debug.sleep", {"seconds": 0.05}, id=i)
    got = {c.recv()["id"] for _ in ids}
    assert got == set(ids)


def test_record_fields(agent):
    agent.call("Debug.sleep", {"seconds": 0.2}, id="rec")
    rec = status(agent, "rec")
    assert set(rec) == {"id", "method", "state", "progress", "returned", "result", "error",
                        "created", "started", "ended"}
    assert rec["state"] == "done" and rec["returned"] is True and rec["progress"] == 100.0
    assert rec["created"] <= rec["started"] <= rec["ended"]


def test_failed_task_carries_named_error(agent):
    with pytest.raises(CallError) as err:
        agent.call("Debug.sleep", {"seconds": 0, "fail": True}, id="f")
    assert err.value.name == "OperationFailed"
    rec = status(agent, "f")
    assert rec["state"] == "failed" and rec["error"]["data"]["name"] == "OperationFailed"


def test_abort_is_two_phase_and_answers_the_request(agent):
    c = agent.client()
    c.send("Debug.sleep", {"seconds": 60}, id="ab")
    wait_for(lambda: task_state(agent, "ab") == "running")
    pid = worker_pid(agent, "ab")
    rec = agent.call("Task.abort", {"taskID": "ab"})
    assert rec["state"] == "aborting"
    resp = c.recv()
    assert resp["id"] == "ab" and resp["error"]["data"]["name"] == "TaskAborted"
    assert status(agent, "ab")["state"] == "aborted"
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    with pytest.raises(CallError) as err:
        agent.call("Task.abort", {"taskID": "ab"})
    assert (err.value.code, err.value.name) == (102, "TaskNotActive")
    with pytest.raises(CallError) as err:
        agent.call("Task.abort", {"taskID": "never"})
    assert (err.value.code, err.value.name) == (101, "NoSuchTask")


def test_abort_escalates_to_sigkill_when_sigterm_is_not_enough(make_agent):
    agent = make_agent(workers={"kill_grace_seconds": 0.5})
    c = agent.client()
    c.send("Debug.sleep", {"seconds": 60, "stubborn": True}, id="stubborn")
    wait_for(lambda: task_state(agent, "stubborn") == "running")
    agent.call("Task.abort", {"taskID": "stubborn"})
    rec = wait_for(lambda: (r := status(agent, "stubborn"))["state"] == "aborted" and r)
    assert rec["error"]["data"]["name"] == "TaskAborted"
    assert '"worker_sigkill"' in agent.log()


def worker_pid(agent, task_id) -> int:
    """The pid of the worker running `task_id`, as the agent reports it."""
    def find():
        for w in agent.call("Host.getStats")["workers"]:
            if w["taskID"] == task_id and w["pid"]:
                return w["pid"]
    return wait_for(find, what=f"the worker of {task_id}")


def test_worker_killed_by_signal_fails_its_task_naming_it(agent):
    c = agent.client()
    c.send("Debug.sleep", {"seconds": 60}, id="victim")
    pid = worker_pid(agent, "victim")
    psutil.Process(pid).send_signal(signal.SIGKILL)
    resp = c.recv()
    assert resp["error"]["data"]["name"] == "WorkerDied"
    assert resp["error"]["data"]["signal"] == "SIGKILL"
    assert "SIGKILL" in resp["error"]["message"]
    rec = status(agent, "victim")
    assert rec["state"] == "failed" and rec["error"]["data"]["signal"] == "SIGKILL"
    wait_for(lambda: not psutil.pid_exists(pid), what="the worker reaped")


def test_worker_exit_code_is_reported(agent):
    with pytest.raises(CallError) as err:
        agent.call("Debug.sleep", {"seconds": 0, "exit_code": 3}, id="ex")
    assert err.value.name == "WorkerDied" and err.value.data["exit_code"] == 3


def test_silent_worker_is_killed_past_its_deadline(make_agent):
    agent = make_agent(workers={"deadline_seconds": 1.0, "kill_grace_seconds": 0.5,
                                "heartbeat_seconds": 0.2})
    c = agent.client()
    c.send("Debug.sleep", {"seconds": 60}, id="hung")
    pid = worker_pid(agent, "hung")
    psutil.Process(pid).send_signal(signal.SIGSTOP)  # alive, silent
    resp = c.recv(timeout=15)
    assert resp["error"]["data"]["name"] == "WorkerTimeout"
    assert status(agent, "hung")["state"] == "failed"
    wait_for(lambda: not psutil.pid_exists(pid), what="the hung worker reaped")


def test_supervisor_sigkill_leaves_no_worker_and_forgets_tasks(agent):
    c = agent.client()
    for i in range(3):
        c.send("Debug.sleep", {"seconds": 60}, id=f"orphan{i}")
    pids = [worker_pid(agent, f"orphan{i}") for i in range(3)]
    agent.call("Debug.sleep", {"seconds": 0}, id="finished")
    agent.kill(signal.SIGKILL)
    wait_for(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status()
                             != psutil.STATUS_ZOMBIE for p in pids),
             what="workers to die with their supervisor")
    # The fork server and a worker that was ending die of the same parent-death signal,
    # each in its own time (CI once listed one a moment before it was a zombie).
    wait_for(lambda: not agent.workers(), what="the fork server and every worker dead")
    agent.start()
    for task_id in ("orphan0", "finished"):
        with pytest.raises(CallError) as err:
            status(agent, task_id)
        assert (err.value.code, err.value.name) == (101, "NoSuchTask")
    known = {t["id"] for t in agent.call("Task.getAll")}
    assert not known & {"orphan0", "orphan1", "orphan2", "finished"}
    assert all(t["method"] in ("Task.getAll", "Task.getStatus", "Host.ping")
               for t in agent.call("Task.getAll"))


def test_sigterm_leaves_the_same_as_sigkill(agent):
    c = agent.client()
    c.send("Debug.sleep", {"seconds": 60}, id="t")
    pid = worker_pid(agent, "t")
    agent.kill(signal.SIGTERM)
    assert agent.proc.returncode == -signal.SIGTERM  # no clean-stop path: it just dies
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status()
             == psutil.STATUS_ZOMBIE)
    agent.start()
    with pytest.raises(CallError) as err:
        status(agent, "t")
    assert err.value.name == "NoSuchTask"


def test_leftover_worker_from_an_earlier_life_is_killed_at_start(agent):
    """A worker that escaped its parent-death signal (here: a stray process that looks like
    one of ours) is found with psutil and killed before the agent serves."""
    import subprocess
    import sys
    agent.kill(signal.SIGKILL)
    stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)",
                              "workers.forkserver", "--run-dir", str(agent.run_dir)])
    try:
        # `python -c CODE args...`: args land in the cmdline, as a forked worker's would.
        wait_for(lambda: any(p.pid == stray.pid for p in agent.workers()))
        agent.start()
        assert stray.wait(10) == -signal.SIGKILL
    finally:
        stray.kill()
        stray.wait()


def test_max_active_tasks(make_agent):
    agent = make_agent(rpc={"max_active_tasks": 2})
    c = agent.client()
    c.send("Debug.sleep", {"seconds": 60}, id="one")
    c.send("Debug.sleep", {"seconds": 60}, id="two")
    wait_for(lambda: agent.call("Host.getStats")["workers_running"] == 2)
    with pytest.raises(CallError) as err:
        agent.call("Debug.sleep", {"seconds": 0}, id="three")
    assert (err.value.code, err.value.name) == (1100, "ResourceExhausted")
    assert agent.call("Host.ping") is True  # queries are not limited
    agent.call("Task.abort", {"taskID": "one"})
    wait_for(lambda: status(agent, "one")["state"] == "aborted")
    assert agent.call("Debug.sleep", {"seconds": 0}, id="three") == {"slept": 0}


def test_retention_by_count_and_by_age(make_agent):
    agent = make_agent(tasks={"retain_max": 3, "retain_seconds": 3600.0})
    for i in range(3):
        agent.call("Debug.sleep", {"seconds": 0}, id=f"r{i}")
    assert status(agent, "r0")["state"] == "done"
    agent.call("Debug.sleep", {"seconds": 0}, id="r3")
    # r0 pushed out by the newer ones (each call's own record counts too).
    with pytest.raises(CallError):
        status(agent, "r0")
    young = make_agent("b", tasks={"retain_seconds": 0.5})
    young.call("Debug.sleep", {"seconds": 0}, id="old")
    def gone():
        try:
            young.call("Task.getStatus", {"taskID": "old"})
        except CallError as exc:
            return exc.name == "NoSuchTask"
    wait_for(gone, 10, what="the record to expire")


def test_get_all_filters_by_state(agent):
    c = agent.client()
    c.send("Debug.sleep", {"seconds": 60}, id="live")
    wait_for(lambda: task_state(agent, "live") == "running")
    agent.call("Debug.sleep", {"seconds": 0}, id="over")
    running = agent.call("Task.getAll", {"states": ["running"]})
    assert [t["id"] for t in running] == ["live"]
    done_ids = {t["id"] for t in agent.call("Task.getAll", {"states": ["done"]})}
    assert "over" in done_ids and "live" not in done_ids
    with pytest.raises(CallError) as err:
        agent.call("Task.getAll", {"states": ["bogus"]})
    assert err.value.code == -32602


def test_a_client_gone_before_its_response_leaves_a_readable_task(agent):
    c = agent.client()
    c.send("Debug.sleep", {"seconds": 0.5}, id="gone")
    wait_for(lambda: task_state(agent, "gone") == "running")
    c.close()  # the client is gone; the response has nowhere to go
    rec = wait_for(lambda: (r := status(agent, "gone"))["state"] == "done" and r)
    assert rec["result"] == {"slept": 0.5} and rec["returned"] is True
    assert agent.call("Host.ping") is True


def test_a_query_keeps_no_result_in_its_record(agent):
    caps = agent.call("Host.getCapabilities", id="caps")
    assert caps["methods"]
    rec = status(agent, "caps")
    assert (rec["state"], rec["returned"], rec["result"]) == ("done", True, None)
    agent.call("Debug.sleep", {"seconds": 0}, id="op")
    assert status(agent, "op")["result"] == {"slept": 0}  # an operation's result is kept
