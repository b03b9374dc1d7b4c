"""The task table: admission, IDs in use, retention, counts (agent/supervisor/tasks.py)."""


import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.supervisor import states
from agent.supervisor.tasks import Full, IdInUse, TaskTable


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def table(clock, retain_seconds=3600.0, retain_max=100, max_active=10) -> TaskTable:
    return TaskTable(retain_seconds=retain_seconds, retain_max=retain_max,
                     max_active=max_active, wall=clock)


def run_to(t: TaskTable, task, *events):
    for event in events:
        t.transition(task, event)
    return task


def test_admit_and_lifecycle_times():
    clock = Clock()
    t = table(clock)
    task = t.admit("a", "Debug.sleep", limited=True)
    assert (task.state, task.created, task.started, task.ended) == ("pending", 1000.0, None, None)
    assert t.get("a") is task and t.limited_active == 1
    clock.now = 1001.0
    assert t.transition(task, "start") == "pending"
    assert (task.state, task.started) == ("running", 1001.0)
    clock.now = 1002.5
    t.transition(task, "succeed")
    assert (task.state, task.ended) == ("done", 1002.5) and t.limited_active == 0
    assert t.get("a") is task and "a" not in t.active
    with pytest.raises(states.InvalidTransition):
        t.transition(task, "fail")
    assert task.state == "done"


def test_id_in_use_while_active_then_reusable():
    clock = Clock()
    t = table(clock)
    first = t.admit("x", "Debug.sleep", limited=True)
    with pytest.raises(IdInUse):
        t.admit("x", "Host.ping", limited=False)
    assert t.get("x") is first and first.state == "pending"
    run_to(t, first, "start", "abort", "fail")
    assert first.state == "aborted"
    clock.now += 1
    second = t.admit("x", "Host.ping", limited=False)
    assert second is not first and t.get("x") is second
    assert [task.id for task in t.all()] == ["x"]  # the ended record was replaced


def test_resource_exhausted_only_for_limited_tasks():
    t = table(Clock(), max_active=2)
    a = t.admit("a", "Debug.sleep", limited=True)
    t.admit("b", "Debug.sleep", limited=True)
    with pytest.raises(Full) as err:
        t.admit("c", "Debug.sleep", limited=True)
    assert err.value.args == (2,)
    assert t.get("c") is None and t.limited_active == 2  # nothing touched
    for i in range(5):  # supervisor-only tasks are never refused for the limit
        t.admit(f"inline{i}", "Host.ping", limited=False)
    run_to(t, a, "fail")
    assert t.admit("c", "Debug.sleep", limited=True).id == "c"


def test_retain_max_pushes_out_the_oldest():
    clock = Clock()
    t = table(clock, retain_max=3)
    for i in range(5):
        clock.now += 1
        run_to(t, t.admit(f"t{i}", "Host.ping", limited=False), "succeed")
    assert [task.id for task in t.all()] == ["t2", "t3", "t4"]
    assert t.get("t0") is None and t.get("t1") is None
    active = t.admit("live", "Debug.sleep", limited=True)  # active tasks never pushed out
    assert [task.id for task in t.all()] == ["live", "t2", "t3", "t4"]
    assert t.get("live") is active


def test_retain_seconds_expiry():
    clock = Clock()
    t = table(clock, retain_seconds=10.0)
    run_to(t, t.admit("old", "Host.ping", limited=False), "succeed")
    clock.now += 5
    run_to(t, t.admit("new", "Host.ping", limited=False), "succeed")
    running = run_to(t, t.admit("run", "Debug.sleep", limited=True), "start")
    clock.now += 5  # exactly retain_seconds after "old" ended: still kept
    assert t.get("old") is not None
    clock.now += 0.1
    assert t.get("old") is None and t.get("new") is not None
    clock.now += 5
    assert t.get("new") is None
    clock.now += 3600
    assert t.get("run") is running  # an active task never expires


def test_counts_and_filter():
    t = table(Clock())
    run_to(t, t.admit("p", "Debug.sleep", limited=True))
    run_to(t, t.admit("r", "Debug.sleep", limited=True), "start")
    run_to(t, t.admit("ab", "Debug.sleep", limited=True), "start", "abort")
    run_to(t, t.admit("d1", "Host.ping", limited=False), "succeed")
    run_to(t, t.admit("d2", "Debug.sleep", limited=True), "start", "abort", "succeed")
    run_to(t, t.admit("f", "Debug.sleep", limited=True), "fail")
    run_to(t, t.admit("x", "Debug.sleep", limited=True), "abort", "fail")
    assert t.counts() == {"pending": 1, "running": 1, "aborting": 1, "done": 2, "failed": 1,
                          "aborted": 1}
    assert list(t.counts()) == list(states.STATES)
    assert [task.id for task in t.all({"done", "aborted"})] == ["d1", "d2", "x"]
    assert [task.id for task in t.all()][:3] == ["p", "r", "ab"]  # active first
    assert t.limited_active == 3


@settings(max_examples=200, deadline=None)
@example([(0, "admit"), (0, "succeed"), (0, "tick"), (0, "tick"), (0, "tick"), (1, "admit")])
@example([(n, op) for n in range(5) for op in ("admit", "succeed")] + [(5, "admit")])
@given(st.lists(st.tuples(st.integers(0, 5), st.sampled_from(
    ["admit", "start", "succeed", "fail", "abort", "tick"])), max_size=60))
def test_kept_counts_and_the_active_filter_agree_with_a_walk(steps):
    """counts() and all(active states) are kept as tasks move, not walked: whatever IDs are
    reused, states taken and records pruned, they say what a walk over every record says."""
    clock = Clock()
    t = table(clock, retain_max=3, retain_seconds=5.0)
    for n, op in steps:
        task = t.get(f"t{n}")
        if op == "admit":
            if task is None or not task.active:
                t.admit(f"t{n}", "Debug.sleep", limited=False)
        elif op == "tick":
            clock.now += 2
        elif task is not None and (task.state, op) in states.TRANSITIONS:
            t.transition(task, op)
        t.prune()
        walked = [*t.active.values(), *t.finished.values()]
        assert t.counts() == {s: sum(x.state == s for x in walked) for s in states.STATES}
        for wanted in ({"running"}, {"pending", "aborting"}, set(states.ACTIVE)):
            assert t.all(wanted) == [x for x in walked if x.state in wanted]
