"""The worker table's deadline logic driven through the OS seam with a fake clock and fake signals:
no processes, so every edge can be shown exactly."""

import signal

from agent.config import load
from agent.supervisor.tasks import Task
from agent.supervisor.workertable import Worker, WorkerTable


class FakeSystem:
    def __init__(self):
        self.now = 100.0
        self.signals = []

    def monotonic(self):
        return self.now

    def kill(self, pid, sig):
        self.signals.append((pid, sig))
        return True


class Listener:
    def __init__(self):
        self.gone = []

    def worker_gone(self, w, err):
        self.gone.append((w, err))


def make_table():
    config = load(overrides={"run_dir": "/nonexistent", "host_id": "h", "workers": {
        "deadline_seconds": 10.0, "kill_grace_seconds": 2.0, "heartbeat_seconds": 1.0}})
    system, listener = FakeSystem(), Listener()
    return WorkerTable(config, system, listener), system, listener


def add_worker(table, system, pid=42):
    w = Worker(token="w1", task=Task(id="t1", method="Debug.sleep"), op="x", spawned=system.now,
               last_seen=system.now, deadline=10.0, pid=pid)
    table.by_token[w.token] = w
    table.by_pid[pid] = w
    return w


def test_silent_worker_gets_sigterm_then_sigkill():
    table, system, _ = make_table()
    add_worker(table, system)
    assert table.next_deadline() == 10.0
    system.now += 9.9
    table.enforce_deadlines()
    assert system.signals == []
    system.now += 0.2
    table.enforce_deadlines()
    assert (42, signal.SIGTERM) in system.signals
    assert table.next_deadline() == 2.0  # the grace before SIGKILL
    system.now += 2.0
    table.enforce_deadlines()
    assert system.signals[-1] == (42, signal.SIGKILL)
    table.enforce_deadlines()
    assert system.signals.count((42, signal.SIGKILL)) == 1  # once


def test_a_stalled_supervisor_does_not_blame_its_workers():
    table, system, _ = make_table()
    add_worker(table, system)
    system.now += 60  # the supervisor was SIGSTOPped for a minute
    table.forgive_stall()
    table.enforce_deadlines()
    assert system.signals == []
    assert table.next_deadline() == 10.0


def test_a_worker_that_reported_must_exit_within_the_grace():
    """Its task has ended: no heartbeat deadline any more, only the time to exit. One that
    lingers (SIGSTOPped between its result and its exit, as the chaos suite did) gets
    SIGKILL, once."""
    table, system, _ = make_table()
    w = add_worker(table, system)
    system.now += 5
    w.reported, w.reported_at = True, system.now
    assert table.next_deadline() == 2.0  # the grace, not what is left of the 10 s deadline
    system.now += 1.9
    table.enforce_deadlines()
    assert system.signals == []
    system.now += 0.2
    table.enforce_deadlines()
    assert system.signals == [(42, signal.SIGKILL)]
    system.now += 10
    table.enforce_deadlines()
    assert system.signals == [(42, signal.SIGKILL)]  # once; the reaper takes it from there


def test_a_stalled_supervisor_gives_a_reported_worker_its_grace_again():
    table, system, _ = make_table()
    w = add_worker(table, system)
    w.reported, w.reported_at = True, system.now
    system.now += 60
    table.forgive_stall()
    table.enforce_deadlines()
    assert system.signals == [] and table.next_deadline() == 2.0


def test_a_worker_never_forked_is_failed_at_its_deadline():
    table, system, listener = make_table()
    w = add_worker(table, system, pid=None)
    table.by_pid.clear()
    system.now += 11
    table.enforce_deadlines()
    assert listener.gone and listener.gone[0][1].name == "WorkerTimeout"
    assert w.token not in table.by_token
