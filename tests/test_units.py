"""Pure units, no processes: states, the task table, JSON-RPC framing, configuration."""

import json
import socket
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent import config as configmod
from agent import errors
from agent.supervisor import states
from agent.supervisor.tasks import Full, IdInUse, TaskTable
from agent.wire import jsonrpc
from agent.wire.jsonrpc import MAX_ID_LENGTH

# -- states ------------------------------------------------------------------------------


def test_every_edge_in_transitions():
    assert len(states.TRANSITIONS) == 10
    for (state, event), new in states.TRANSITIONS.items():
        assert state in states.STATES and new in states.STATES
        assert states.next_state(state, event) == new


def test_ended_states_have_no_outgoing_edge():
    assert states.ENDED | states.ACTIVE == set(states.STATES)
    assert not states.ENDED & states.ACTIVE
    for state in states.ENDED:
        for event in ("start", "succeed", "fail", "abort"):
            with pytest.raises(states.InvalidTransition):
                states.next_state(state, event)


def test_every_active_state_can_end():
    for state in states.ACTIVE:
        seen, todo = set(), [state]
        while todo:
            s = todo.pop()
            seen.add(s)
            todo += [n for (f, _), n in states.TRANSITIONS.items() if f == s and n not in seen]
        assert seen & states.ENDED, state


@pytest.mark.parametrize("state, event", [("running", "start"), ("aborting", "abort"),
                                          ("pending", "explode"), ("nowhere", "start")])
def test_invalid_transition(state, event):
    with pytest.raises(states.InvalidTransition, match=f"{state} --{event}-->"):
        states.next_state(state, event)


# -- the task table ----------------------------------------------------------------------


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


# -- JSON-RPC framing --------------------------------------------------------------------


def parse(text: str):
    return jsonrpc.parse_request(jsonrpc.loads(text.encode()))


def test_plain_request_and_notification():
    req = parse('{"jsonrpc": "2.0", "method": "Host.ping", "id": "a1", "params": []}')
    assert (req.id, req.task_id, req.method, req.params) == ("a1", "a1", "Host.ping", [])
    assert not req.is_notification
    req = parse('{"jsonrpc": "2.0", "method": "Host.ping", "id": -42}')
    assert (req.id, req.task_id, req.params) == (-42, "-42", None)
    note = parse('{"jsonrpc": "2.0", "method": "Host.ping"}')
    assert note.is_notification and note.task_id is None


@pytest.mark.parametrize("id_", ["1" * 1001, "true", "false", "null", "1.5", '""', "[]", "{}",
                                 json.dumps("x" * (MAX_ID_LENGTH + 1))])
def test_ids_that_cannot_name_a_task_are_refused(id_):
    with pytest.raises(jsonrpc.BadRequest) as bad:
        parse(f'{{"jsonrpc": "2.0", "method": "Host.ping", "id": {id_}}}')
    assert isinstance(bad.value.error, errors.InvalidRequest) and bad.value.id is None


def test_huge_int_is_kept_as_text_then_refused():
    value = jsonrpc.loads(b"1" + b"0" * 1000)
    assert isinstance(value, jsonrpc.HugeInt) and len(value) == 1001
    assert jsonrpc.loads(b"9" * 1000) == int("9" * 1000)  # long, but int() takes it
    assert jsonrpc.task_id_of("x" * MAX_ID_LENGTH) == "x" * MAX_ID_LENGTH
    assert jsonrpc.task_id_of(7) == "7"
    for bad in (True, False, jsonrpc.HugeInt("1" * 1001), 1.0, None, "", b"7"):
        with pytest.raises(errors.InvalidRequest):
            jsonrpc.task_id_of(bad)


@pytest.mark.parametrize("body", [b"NaN", b"[Infinity]", b'{"a": -Infinity}', b"\xff\xfe",
                                  b"{", b"", b"[" * 100000 + b"]" * 100000])
def test_parse_errors(body):
    with pytest.raises(errors.ParseError) as err:
        jsonrpc.loads(body)
    assert err.value.code == -32700


@pytest.mark.parametrize("obj, answer_id", [
    ([], None), ("x", None),
    ({"method": "Host.ping", "id": 3}, 3),
    ({"jsonrpc": "1.0", "method": "Host.ping", "id": "i"}, "i"),
    ({"jsonrpc": "2.0", "method": 5, "id": "i"}, "i"),
    ({"jsonrpc": "2.0", "id": "i"}, "i"),
    ({"jsonrpc": "2.0", "method": "Host.ping", "params": "x", "id": "i"}, "i"),
    ({"jsonrpc": "2.0", "method": "Host.ping", "params": None, "id": "i"}, "i"),
    ({"jsonrpc": "2.0", "method": "Host.ping", "params": 1}, None),
])
def test_invalid_requests_answer_with_their_id(obj, answer_id):
    with pytest.raises(jsonrpc.BadRequest) as bad:
        jsonrpc.parse_request(obj)
    assert bad.value.error.code == -32600 and bad.value.id == answer_id


def test_dumps_writes_only_what_a_strict_parser_reads():
    assert jsonrpc.dumps({"a": [1, "b"]}) == b'{"a":[1,"b"]}'
    # NaN and Infinity are not JSON: null, as events send them.
    assert jsonrpc.dumps({"x": float("nan"), "y": [float("inf"), 2.5]}) == \
        b'{"x":null,"y":[null,2.5]}'
    # What the fast encoder refuses, the standard one writes: huge integers, integer keys.
    assert json.loads(jsonrpc.dumps({"n": 10 ** 30, 7: "k"})) == {"n": 10 ** 30, "7": "k"}
    assert jsonrpc.dumps([jsonrpc.HugeInt("1" * 1200)]) == b'["' + b"1" * 1200 + b'"]'
    with pytest.raises((TypeError, ValueError)):
        jsonrpc.dumps({"x": object()})
    for value in ({"x": float("nan"), "n": 10 ** 30}, {"s": "\u2028\x00é", "t": (1, 2)}):
        out = jsonrpc.dumps(value)
        assert json.loads(out, parse_constant=lambda c: pytest.fail(c)) is not None


# -- the supervisor's end of a task ------------------------------------------------------


class Recorder:
    def __init__(self):
        self.published = []

    def publish(self, topic, params):
        self.published.append((topic, params))


def test_an_attachment_is_on_disk_before_the_client_is_told(tmp_path):
    """Supervisor.end runs a task's end hook before it answers: what the hook makes durable
    (RUN_DIR/attached.json) must already be there when the client hears "attached"."""
    from agent.supervisor import recovery
    from agent.supervisor.loop import Supervisor

    agent = Supervisor(configmod.load(overrides={"run_dir": str(tmp_path), "host_id": "h"}))
    agent.events = Recorder()
    on_disk_when_told = []
    task = agent.tasks.admit("d1", "StorageDomain.create", limited=True)
    task.request_id = "d1"
    task.reply = lambda msg: on_disk_when_told.append(
        (msg, json.loads((tmp_path / "attached.json").read_text())))
    agent.tasks.transition(task, "start")
    result = {"domainID": "5d0d0e5e-0000-4000-8000-000000000001", "path": str(tmp_path / "s")}
    from agent.supervisor.jobs import WorkerJob
    agent.domains.reserve(result["domainID"], result["path"])  # as the handler does
    task.job = WorkerJob("domain.create", dict(result), on_end=recovery.domain_created)
    agent.end(task, "succeed", result)
    agent.flush()
    assert on_disk_when_told == [({"jsonrpc": "2.0", "id": "d1", "result": result},
                                  {result["domainID"]: result["path"]})]
    assert task.state == states.DONE and task.reply is None
    assert agent.events.published[-1][0] == "Task.state"
    assert agent.domains.pending == {}  # the reservation ends with the task


# -- configuration -----------------------------------------------------------------------


@pytest.fixture
def no_xdg(monkeypatch, tmp_path):
    for var in ("XDG_RUNTIME_DIR", "XDG_STATE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def test_defaults_load(no_xdg):
    cfg = configmod.load()
    assert cfg.host_id == socket.gethostname() and cfg["debug"] is False
    assert cfg.run_dir == no_xdg / "home/.local/state/hostagent/run"
    assert cfg["rpc"]["endpoints"] == ["tcp://127.0.0.1:5670", f"ipc://{cfg.run_dir}/rpc.sock"]
    assert cfg["events"]["endpoints"] == ["tcp://127.0.0.1:5671",
                                          f"ipc://{cfg.run_dir}/events.sock"]
    assert cfg["recovery"]["copy_policy"] == "resume"
    assert configmod.DEFAULTS["rpc"]["endpoints"][1] == "ipc://{run_dir}/rpc.sock"  # untouched


def test_xdg_runtime_dir_is_the_default_run_dir(no_xdg, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(no_xdg / "xdg"))
    cfg = configmod.load()
    assert cfg.run_dir == no_xdg / "xdg/hostagent"
    assert cfg["rpc"]["endpoints"][1] == f"ipc://{no_xdg}/xdg/hostagent/rpc.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", str(no_xdg / "state"))
    assert configmod.load().run_dir == no_xdg / "state/hostagent/run"


def test_run_dir_expansion_in_endpoints(tmp_path, monkeypatch):
    cfg_file = tmp_path / "a.toml"
    cfg_file.write_text('run_dir = "/srv/ha"\nhost_id = "h1"\n'
                        '[events]\nendpoints = ["ipc://{run_dir}/ev.sock", "tcp://*:0"]\n')
    cfg = configmod.load(cfg_file)
    assert cfg.host_id == "h1" and cfg.run_dir == Path("/srv/ha")
    assert cfg["events"]["endpoints"] == ["ipc:///srv/ha/ev.sock", "tcp://*:0"]
    assert cfg["rpc"]["endpoints"][1] == "ipc:///srv/ha/rpc.sock"
    monkeypatch.chdir(tmp_path)
    assert configmod.load(overrides={"run_dir": "rel"}).run_dir == tmp_path / "rel"


@pytest.mark.parametrize("overrides, words", [
    ({"bogus": 1}, "unknown key 'bogus'"),
    ({"rpc": {"endpoint": []}}, "unknown key 'rpc.endpoint'"),
    ({"rpc": 5}, "'rpc' must be a table"),
    ({"recovery": {"copy_policy": "yolo"}}, "recovery.copy_policy must be one of"),
    ({"tasks": {"retain_max": 0}}, "tasks.retain_max must be a positive number"),
    ({"workers": {"deadline_seconds": True}}, "workers.deadline_seconds"),
    ({"rpc": {"endpoints": "tcp://*:1"}}, "rpc.endpoints must be a list of strings"),
    ({"storage": {"domains": []}}, "storage.domains"),
])
def test_bad_config_is_refused(overrides, words):
    with pytest.raises(configmod.ConfigError, match=words.replace(".", r"\.")):
        configmod.load(overrides=overrides)


def test_bad_config_files(tmp_path):
    with pytest.raises(configmod.ConfigError, match="unknown key 'nope'"):
        (tmp_path / "u.toml").write_text("nope = 1\n")
        configmod.load(tmp_path / "u.toml")
    (tmp_path / "b.toml").write_text("this is = not [toml\n")
    with pytest.raises(configmod.ConfigError):
        configmod.load(tmp_path / "b.toml")
    with pytest.raises(configmod.ConfigError):
        configmod.load(tmp_path / "missing.toml")
