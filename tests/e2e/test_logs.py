"""What `hostagent serve` logs: JSON lines off a terminal, readable lines on one (tmux), and
every line about a task with its task ID (a copy's with its volume too)."""

from __future__ import annotations

import json

import psutil
import pytest

from tests.e2e.test_cli import HOSTAGENT
from tests.support.harness import kill_all, task_state, wait_for
from tests.support.storage_flow import MiB, dst_for, make_source, new_id, wait_legal


def log_lines(agent) -> list[dict]:
    """Every line of the agent's log, the whole file (AgentProcess.log() is its tail)."""
    return [json.loads(line) for line in agent.log_path.read_text().splitlines() if line.strip()]


def test_json_lines_off_a_terminal_each_task_line_with_its_task_and_volume(make_agent, workdir):
    agent = make_agent(start=False)  # its stderr is a file: JSON
    # A fault seam that never fires: each worker says it is on, a line of the worker's own.
    agent.start(env={"HOSTAGENT_TEST_FAULTS": json.dumps(
        {"io_error": {"kind": "fsync", "errno": "EIO", "at_offset": 1 << 60}})})
    domain_id = new_id()
    agent.call("StorageDomain.create", {"domainID": domain_id, "path": str(workdir / "d")})
    src = make_source(agent, domain_id, 8 * MiB)
    dst = dst_for(domain_id)
    agent.client().call("Image.copy", {"src": src, "dst": dst}, id="copy-7")
    wait_legal(agent, dst)
    agent.client().send("Debug.sleep", {"seconds": 60}, id="sleep-7")
    wait_for(lambda: task_state(agent, "sleep-7") == "running", what="the sleeper running")
    agent.call("Task.abort", {"taskID": "sleep-7"})
    wait_for(lambda: any(r.get("task_id") == "sleep-7" and r["event"] == "task_ended"
                         for r in log_lines(agent)), what="the abort logged")

    records = log_lines(agent)  # every line is one JSON object (json.loads raised otherwise)
    assert all({"event", "level", "timestamp", "pid"} <= r.keys() for r in records)
    copy_lines = [r for r in records if r.get("task_id") == "copy-7"]
    assert {r["event"] for r in copy_lines} >= {"task_started", "task_ended"}
    # The copy's worker writes its own lines, with its task and volume bound.
    assert any(r["event"] == "test_faults_enabled" and r.get("component") == "worker"
               and r["op"] == "image.copy" for r in copy_lines), copy_lines
    assert all(r["volume_id"] == dst["volumeID"] for r in copy_lines), copy_lines
    about_tasks = [r for r in records if r["event"].startswith(("task_", "worker_"))]
    assert about_tasks and all("task_id" in r for r in about_tasks), about_tasks


def stop(pid: int) -> None:
    """SIGKILL the agent and everything it started, by pid."""
    try:
        proc = psutil.Process(pid)
        kill_all([proc, *proc.children(recursive=True)])
    except psutil.NoSuchProcess:
        return


@pytest.mark.parametrize("flags, readable", [((), True), (("--log-format", "json"), False)])
def test_a_terminal_gets_readable_lines_unless_told_json(make_agent, tmux, flags,
                                                         readable):
    agent = make_agent(start=False)
    pid = tmux.start(f"{HOSTAGENT} serve --config {agent.config_path} {' '.join(flags)}",
                     width=200, height=50)
    try:
        client = agent.client()
        wait_for(lambda: "ready" in tmux.screen(), 30, what="the agent's ready line")
        client.send("Debug.sleep", {"seconds": 0}, id="tty-1")
        def screen_lines():
            return [line for line in tmux("capture-pane", "-p", "-J", "-t", "t").splitlines()
                    if line.strip()]
        wait_for(lambda: any("tty-1" in line and "task_ended" in line
                             for line in screen_lines()), 30, what="the task's end logged")
        lines = screen_lines()
        task_line = next(line for line in lines if "tty-1" in line and "task_ended" in line)
        if readable:
            assert not any(line.lstrip().startswith("{") for line in lines), lines
            assert "task_ended" in task_line and "task_id=tty-1" in task_line, task_line
            assert "method=Debug.sleep" in task_line, task_line
        else:
            record = json.loads(task_line)
            assert record["task_id"] == "tty-1" and record["event"] == "task_ended"
        assert "Traceback" not in "\n".join(lines)
    finally:
        stop(pid)
