"""Events: [topic, JSON-RPC notification] on the PUB socket, seq and boot_id, never blocking."""

import itertools
import json
import signal
import time

import zmq

from agent.client import CallError, Timeout
from agent.supervisor.tasks import Task

RECORD_FIELDS = set(Task(id="x", method="m").record())


def recv_event(sock: zmq.Socket, timeout: float = 5.0) -> dict:
    """The next event, checked to be two frames [topic, notification whose method is topic]."""
    if not sock.poll(int(timeout * 1000)):
        raise AssertionError(f"no event within {timeout} s")
    frames = sock.recv_multipart()
    assert len(frames) == 2, frames
    body = json.loads(frames[1])
    assert body["jsonrpc"] == "2.0" and "id" not in body, body
    assert body["method"] == frames[0].decode(), (frames[0], body)
    return body


def events_until(sock: zmq.Socket, predicate, timeout: float = 10.0) -> list[dict]:
    """Events read until one satisfies `predicate`, that one last."""
    got = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"event not seen within {timeout} s; saw {got[-5:]}"
        got.append(recv_event(sock, left))
        if predicate(got[-1]):
            return got


def is_state(ev: dict, task_id: str, state: str | None = None) -> bool:
    if ev["method"] != "Task.state" or ev["params"]["task"]["id"] != task_id:
        return False
    return state is None or ev["params"]["task"]["state"] == state


def make_live(agent, sock: zmq.Socket, timeout: float = 10.0) -> dict:
    """Ping until the Task.state event of one ping arrives (ZeroMQ's slow joiner): from then
    on the subscription is live. Returns that event; nothing older is left unread."""
    client = agent.client()
    counter = itertools.count()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ping_id = f"warm-{next(counter)}"
        assert client.call("Host.ping", id=ping_id) is True
        while sock.poll(200):
            ev = recv_event(sock)
            if is_state(ev, ping_id):
                return ev
    raise AssertionError(f"subscription not live within {timeout} s")


def test_task_state_order_seq_boot_id_and_progress_rate(agent):
    sock = agent.subscribe()
    got = [make_live(agent, sock)]
    assert agent.call("Debug.sleep", {"seconds": 0.5}, id="nap") == {"slept": 0.5}
    got += events_until(sock, lambda ev: is_state(ev, "nap", "done"))
    boot_id = agent.call("Host.getCapabilities")["boot_id"]
    got += events_until(sock, lambda ev: ev["method"] == "Task.state"
                        and ev["params"]["task"]["method"] == "Host.getCapabilities")

    mine = [ev["params"]["task"] for ev in got if is_state(ev, "nap")]
    assert [t["state"] for t in mine] == ["pending", "running", "done"]
    for record in mine:
        assert set(record) == RECORD_FIELDS and record["method"] == "Debug.sleep"
    assert mine[-1]["result"] == {"slept": 0.5} and mine[-1]["returned"] is True

    seqs = [ev["params"]["seq"] for ev in got]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    assert {ev["params"]["boot_id"] for ev in got} == {boot_id}

    progress = [ev["params"] for ev in got
                if ev["method"] == "Task.progress" and ev["params"]["taskID"] == "nap"]
    assert 1 <= len(progress) <= 15, progress  # at most ~10/s over the 0.5 s sleep
    values = [p["progress"] for p in progress]
    assert values == sorted(values) and values[-1] == 100.0


def test_topic_filter(agent):
    sock = agent.subscribe("Task.progress")
    client = agent.client()
    for n in itertools.count():  # slow joiner: until one progress event gets through
        client.call("Debug.sleep", {"seconds": 0}, id=f"p{n}")
        if sock.poll(200):
            break
        assert n < 50, "no Task.progress event reached a live subscription"
    agent.call("Host.ping", id="not-progress")
    agent.call("Debug.sleep", {"seconds": 0}, id="last")
    got = events_until(sock, lambda ev: ev["params"]["taskID"] == "last")
    assert {ev["method"] for ev in got} == {"Task.progress"}


def booted_subscriber(agent) -> zmq.Socket:
    """A SUB connected to the agent's ipc events endpoint before anything binds it.

    The agent publishes Host.booted a few milliseconds after binding, so the connect must be
    retried far more often than libzmq's default (100 ms) for it to be there in time."""
    sock = agent.ctx.socket(zmq.SUB)
    agent.clients.append(sock)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, 1)
    sock.setsockopt_string(zmq.SUBSCRIBE, "")
    sock.connect(agent.events_endpoint)
    return sock


def start_and_read_first(agent, sock: zmq.Socket, timeout: float = 20.0):
    """Start the agent; its boot_id, the first event of that life that `sock` received and
    how many pings it took to make the life publish something after a missed Host.booted.

    The SUB socket is polled all along: after a reconnect libzmq re-sends the subscription
    only once the socket's own thread runs, so a subscriber left alone during the restart
    would miss every event until it is next touched."""
    agent.start(wait=False)
    endpoints = agent.run_dir / "endpoints.json"
    client = agent.client(timeout=1.0)
    boot_id, pings = None, 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert agent.proc.poll() is None, f"agent exited\n{agent.log()}"
        while sock.poll(5):
            ev = recv_event(sock)
            if boot_id is None and ev["method"] == "Host.booted" \
                    and ev["params"]["pid"] == agent.pid:
                return ev["params"]["boot_id"], ev, pings
            if boot_id is not None and ev["params"]["boot_id"] == boot_id:
                return boot_id, ev, pings
        if boot_id is None:  # written just before Host.booted is published
            try:
                written = json.loads(endpoints.read_text())
            except (OSError, ValueError):
                continue
            if written["pid"] == agent.pid:
                boot_id = written["boot_id"]
        else:  # booted and missed it: make the life publish something of its own
            pings += 1
            try:
                client.call("Host.ping")
            except (CallError, Timeout):
                pass
    raise AssertionError(f"no event of the new life within {timeout} s")


def test_host_booted_with_seq_1_and_a_new_boot_id_after_sigkill(make_agent):
    """A subscriber connected before the agent binds gets Host.booted, seq 1.

    The agent publishes Host.booted milliseconds after it binds, and a SUB socket needs a
    reconnect attempt and a handshake to join, so now and then it joins too late. Each life
    is judged on its own: its first event is Host.booted with seq 1, or else a ping's that
    counts on from it; Host.booted must be caught in a restarted life within a few lives.
    """
    agent = make_agent(start=False)
    sock = booted_subscriber(agent)
    boot_ids, caught = [], []
    for life in range(12):
        if life:
            for n in range(3):  # push seq well past where a new life starts it
                agent.call("Debug.sleep", {"seconds": 0}, id=f"life{life}-{n}")
            last = events_until(sock, lambda ev: is_state(ev, f"life{life}-2", "done"))[-1]
            assert last["params"]["seq"] > 5 and last["params"]["boot_id"] == boot_ids[-1]
            agent.kill(signal.SIGKILL)
        boot_id, first, pings = start_and_read_first(agent, sock)
        assert boot_id not in boot_ids
        boot_ids.append(boot_id)
        assert agent.call("Host.getCapabilities")["boot_id"] == boot_id
        if first["method"] == "Host.booted":
            assert first["params"]["seq"] == 1
            assert first["params"]["host_id"] == "host-a"
            caught.append(life)
        else:  # joined late: what it did get still counts from the start of this life
            assert first["method"] == "Task.state", first
            assert first["params"]["task"]["method"] == "Host.ping", first
            assert 1 < first["params"]["seq"] <= 1 + pings, (first, pings)
        if caught and caught[-1] > 0:
            break
    assert caught and caught[-1] > 0, f"Host.booted caught only in lives {caught} of {life + 1}"


def test_subscriber_that_never_reads_does_not_block_the_agent(agent):
    deaf = agent.ctx.socket(zmq.SUB)
    deaf.setsockopt(zmq.LINGER, 0)
    deaf.setsockopt(zmq.RCVHWM, 1)
    deaf.setsockopt(zmq.RCVBUF, 4096)
    deaf.setsockopt_string(zmq.SUBSCRIBE, "")
    agent.clients.append(deaf)
    deaf.connect(agent.events_endpoint)
    make_live(agent, agent.subscribe())  # it connected at the same time: it is live too

    client = agent.client(timeout=60)
    ids = [f"quick{i}" for i in range(200)]
    for task_id in ids:
        client.send("Debug.sleep", {"seconds": 0}, id=task_id)
    answers = [client.recv() for _ in ids]
    assert {a["id"] for a in answers} == set(ids)
    assert all(a.get("result") == {"slept": 0} for a in answers), [
        a for a in answers if "error" in a][:3]
    started = time.monotonic()
    assert agent.client(timeout=2.0).call("Host.ping") is True
    assert time.monotonic() - started < 2.0
    assert deaf.poll(0), "the deaf subscriber never got anything: the test proved nothing"


def test_publisher_never_raises_on_a_value_json_cannot_carry():
    """One NaN progress must not take the loop down: it goes out as null, in sequence."""
    from agent.wire.events import Publisher

    ctx = zmq.Context()
    try:
        pub = Publisher(ctx, ["inproc://pub-nan"], "b" * 32)
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt_string(zmq.SUBSCRIBE, "")
        sub.connect("inproc://pub-nan")
        for n in itertools.count():  # slow joiner, even in-process
            pub.publish("Task.progress", {"taskID": f"warm{n}", "progress": 1.0})
            if sub.poll(50):
                break
            assert n < 100
        events_until(sub, lambda ev: ev["params"]["taskID"] == f"warm{n}")
        pub.publish("Task.progress", {"taskID": "nan", "progress": float("nan"),
                                      "more": [float("inf"), 2.5]})
        ev = recv_event(sub)
        assert ev["params"]["progress"] is None and ev["params"]["more"] == [None, 2.5]
        assert ev["params"]["seq"] == n + 2 and ev["params"]["taskID"] == "nan"
        sub.close(0)
        pub.close()
    finally:
        ctx.term()
