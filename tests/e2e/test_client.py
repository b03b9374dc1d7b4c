"""The client library against real agents: matching, timeouts, typed errors, events."""

import asyncio
import json
import signal
import time

import pytest

from agent.client import (
    AsyncClient,
    BlockingClient,
    CallError,
    Client,
    Event,
    SeqTracker,
    Timeout,
)
from agent.client.protocol import guess_events_endpoint
from agent.client.subscription import decode
from tests.support.harness import wait_for


def aclient(agent, **kw) -> AsyncClient:
    return AsyncClient(agent.rpc_endpoint, agent.events_endpoint, **kw)


def run(coro, timeout: float = 60):
    """Run a test coroutine under a deadline: nothing here may hang."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def make_live(client, sub, timeout: float = 10.0, log=None) -> Event:
    """Ping until a ping's Task.state arrives on `sub` (ZeroMQ's slow joiner); every event
    read on the way is appended to `log`."""
    deadline = time.monotonic() + timeout
    n = 0
    while time.monotonic() < deadline:
        n += 1
        ping_id = f"warm-{n}-{client.new_id()}"
        await client.call("Host.ping", task_id=ping_id)
        while (ev := await sub.next(0.2)) is not None:
            if log is not None:
                log.append(ev)
            if ev.topic == "Task.state" and ev.params["task"]["id"] == ping_id:
                return ev
    raise AssertionError("subscription not live")


def test_calls_in_flight_answer_out_of_order(agent):
    async def main():
        async with aclient(agent) as c:
            finished = []

            async def one(name, seconds):
                result = await c.call("Debug.sleep", {"seconds": seconds}, task_id=name)
                finished.append(name)
                return result
            results = await asyncio.gather(one("slow", 1.0), one("fast", 0.0),
                                           c.call("Host.ping"))
            assert results == [{"slept": 1.0}, {"slept": 0.0}, True]
            assert finished == ["fast", "slow"]  # answered as they ended, matched by id
            # 50 at once on the one socket, each gets its own answer.
            many = await asyncio.gather(*(c.call("Debug.sleep", {"seconds": i % 3 / 10})
                                          for i in range(50)))
            assert many == [{"slept": i % 3 / 10} for i in range(50)]
    run(main())


def test_typed_errors(agent):
    async def main():
        async with aclient(agent) as c:
            with pytest.raises(CallError) as e:
                await c.call("Task.getStatus", {"taskID": "nope"})
            assert (e.value.code, e.value.name, e.value.data["taskID"]) == \
                (101, "NoSuchTask", "nope")
            with pytest.raises(CallError) as e:
                await c.call("Volume.create", {"domainID": "x"})
            assert e.value.code == -32602 and e.value.name == "InvalidParams"
            assert e.value.data["param"]
            with pytest.raises(CallError) as e:
                await c.call("No.such")
            assert (e.value.code, e.value.name) == (-32601, "MethodNotFound")
            # An id the agent cannot use is refused here, as the agent would refuse it.
            with pytest.raises(CallError) as e:
                await c.call("Host.ping", task_id="x" * 129)
            assert e.value.code == -32600
            # The same task ID twice while the first runs: 100, from the agent...
            other = aclient(agent)
            try:
                first = asyncio.ensure_future(c.call("Debug.sleep", {"seconds": 1},
                                                     task_id="once"))
                await wait_running(c, "once")
                with pytest.raises(CallError) as e:
                    await other.call("Debug.sleep", {"seconds": 0}, task_id="once")
                assert (e.value.code, e.value.name) == (100, "TaskIdInUse")
                # ...and refused on this client without asking, its answer being awaited.
                with pytest.raises(CallError) as e:
                    await c.call("Debug.sleep", {"seconds": 0}, task_id="once")
                assert e.value.name == "TaskIdInUse"
                assert await first == {"slept": 1}
            finally:
                await other.close()
    run(main())


async def until(predicate, timeout: float = 10.0, what: str = ""):
    """harness.wait_for for coroutines: await predicate() until it is true, polling."""
    deadline = time.monotonic() + timeout
    while not (value := await predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)  # the poll's interval, as in wait_for
    return value


async def state_of(c, task_id):
    """The task's state, or None while the agent has not seen its request yet."""
    try:
        return (await c.call("Task.getStatus", {"taskID": task_id}))["state"]
    except CallError as exc:
        assert exc.name == "NoSuchTask", exc
        return None


async def begin(c, method, params, task_id):
    """Send a call in the background; return its future once the agent knows the task."""
    fut = asyncio.ensure_future(c.call(method, params, task_id=task_id))
    await until(lambda: state_of(c, task_id), what=f"{task_id} to start")
    return fut


async def wait_running(c, task_id):
    async def running():
        return await state_of(c, task_id) == "running"
    await until(running, what=f"{task_id} to run")


def test_timeout_when_nothing_listens(workdir):
    async def main():
        async with AsyncClient(f"ipc://{workdir}/nobody.sock", timeout=0.5) as c:
            started = time.monotonic()
            with pytest.raises(Timeout):
                await c.call("Host.ping")
            assert time.monotonic() - started < 3
    run(main(), 20)
    with BlockingClient(f"ipc://{workdir}/nobody.sock", timeout=0.5) as b:
        with pytest.raises(Timeout):
            b.call("Host.ping")


def test_a_task_outlasting_the_timeout_raises_and_the_client_goes_on(agent):
    async def main():
        async with aclient(agent, timeout=5) as c:
            started = time.monotonic()
            with pytest.raises(Timeout):
                await c.call("Debug.sleep", {"seconds": 2}, task_id="long", timeout=0.3)
            assert time.monotonic() - started < 2
            assert await c.call("Host.ping") is True
            # The late answer to "long" is dropped, never taken for another call's.
            outcome = await c.wait_task("long", poll_interval=0.2)
            assert outcome.state == "done" and outcome.result == {"slept": 2}
            assert await c.call("Debug.sleep", {"seconds": 0}) == {"slept": 0}
            with pytest.raises(Timeout):
                await c.call("Debug.sleep", {"seconds": 5}, task_id="longer", timeout=0.3)
            started = time.monotonic()
            with pytest.raises(Timeout):
                await c.wait_task("longer", timeout=0.5, poll_interval=0.1)
            assert time.monotonic() - started < 3
            await c.call("Task.abort", {"taskID": "longer"})
    run(main())


def test_wait_task_follows_events_and_reports_progress(agent):
    async def main():
        async with aclient(agent) as c:
            seen = []
            call = await begin(c, "Debug.sleep", {"seconds": 1.5}, "nap")
            outcome = await c.wait_task("nap", poll_interval=30, on_progress=seen.append)
            assert outcome.state == "done" and outcome.result == {"slept": 1.5}
            assert outcome.via == "task" and not outcome.restarted
            # With polls 30 s apart, what came in between came from events.
            assert any(p.source == "event" for p in seen), seen
            percents = [p.percent for p in seen]
            assert percents == sorted(percents) and percents[-1] == 100.0
            await call
            # Failures are outcomes; raise_for_state turns them into typed errors.
            await asyncio.gather(c.call("Debug.sleep", {"seconds": 0, "fail": True},
                                        task_id="bad"), return_exceptions=True)
            bad = await c.wait_task("bad")
            assert bad.state == "failed" and bad.error["data"]["name"] == "OperationFailed"
            with pytest.raises(CallError) as e:
                bad.raise_for_state()
            assert e.value.name == "OperationFailed"
            lost = await c.wait_task("never-was")
            assert lost.state == "lost"
    run(main())


def test_wait_task_polls_when_no_event_comes(agent, workdir):
    """An events endpoint where nothing publishes: polling alone finds the end."""
    async def main():
        async with AsyncClient(agent.rpc_endpoint, f"ipc://{workdir}/silent.sock") as c:
            call = await begin(c, "Debug.sleep", {"seconds": 0.5}, "quiet")
            seen = []
            outcome = await c.wait_task("quiet", poll_interval=0.1, on_progress=seen.append)
            assert outcome.state == "done" and {p.source for p in seen} == {"poll"}
            await call
    run(main())


def test_seq_tracker_marks_gaps_and_restarts():
    t = SeqTracker()
    assert t.see("a", 5) == (0, False)  # the first event: nothing to compare with
    assert t.see("a", 6) == (0, False)
    assert t.see("a", 9) == (2, False)  # 7 and 8 were lost
    assert t.see("b", 3) == (2, True)  # a new life, and its first two events lost
    assert SeqTracker("a").see("b", 1) == (0, True)  # known life a; b is a restart
    # Filtering seq (dropping events on purpose) is seen as a gap, topic or not.
    tracker = SeqTracker()
    frames = [[b"Task.state", json.dumps({"params": {"seq": s, "boot_id": "x"}}).encode()]
              for s in (1, 2, 4, 5)]
    events = [decode(f, tracker) for f in frames]
    assert [e.gap for e in events] == [0, 0, 1, 0] and events[2].stale
    assert decode([b"only-one-frame"], tracker) is None


def test_a_slow_subscriber_is_told_of_its_gap(agent):
    """A subscriber with a tiny queue that does not read while the agent publishes tens of
    thousands of events loses some; the next event it reads says so."""
    async def main():
        async with aclient(agent) as c:
            sub = c.subscribe(rcvhwm=1)
            await make_live(c, sub)
            flood = agent.client(timeout=60)
            batch = 1000
            for b in range(30):  # 30 000 pings, one Task.state each, while sub reads nothing
                flood.send_raw(json.dumps([{"jsonrpc": "2.0", "method": "Host.ping",
                                            "id": f"f{b}-{i}"} for i in range(batch)]).encode())
                assert len(flood.recv()) == batch
            gaps = []
            for _ in range(40000):  # what was queued, then the first event published after
                ev = await sub.next(0.5)
                if ev is None:
                    await c.call("Host.ping")
                    continue
                gaps.append(ev.gap)
                if ev.gap:
                    break
            assert any(gaps), f"no gap seen in {len(gaps)} events"
            assert not ev.restarted and 1000 < ev.gap < 30000, ev.gap
    run(main(), 120)


def test_restart_is_noticed(agent):
    async def main():
        async with aclient(agent) as c:
            boot = (await c.call("Host.getCapabilities"))["boot_id"]
            sub = c.subscribe(boot_id=boot)
            first = await make_live(c, sub)
            assert not first.restarted and first.boot_id == boot
            agent.kill(signal.SIGKILL)
            agent.start()
            new_boot = (await c.call("Host.getCapabilities"))["boot_id"]
            assert new_boot != boot
            log = []
            await make_live(c, sub, 30, log)  # the same socket reconnected on its own
            assert [e.restarted for e in log].count(True) == 1, log
            assert log[[e.restarted for e in log].index(True)].boot_id == new_boot
            # A subscription that knows the old life notices the restart on its first event.
            late = c.subscribe(boot_id=boot)
            ev = await make_live(c, late)
            assert ev.restarted and ev.boot_id == new_boot

    run(main(), 90)


def test_blocking_client_is_the_same_api(agent):
    with BlockingClient(agent.rpc_endpoint, agent.events_endpoint) as b:
        assert b.call("Host.ping") is True
        with pytest.raises(CallError) as e:
            b.call("Task.getStatus", {"taskID": "nope"})
        assert e.value.name == "NoSuchTask"
        sub = b.subscribe("Task.state")
        wait_for(lambda: b.call("Host.ping") and sub.next(0.2) is not None, 10,
                 what="a live blocking subscription")
        b.call("Debug.sleep", {"seconds": 0}, task_id="bz")
        ev = wait_for(lambda: (e := sub.next(1)) and e.params["task"]["id"] == "bz" and e, 10)
        assert ev.topic == "Task.state"
        sub.close()
        assert b.wait_task("bz").state == "done"


def test_low_level_client_keeps_its_wire_semantics(agent):
    c = Client(agent.rpc_endpoint, timeout=5)
    try:
        sent = c.send("Host.ping", id=7)
        assert c.recv() == {"jsonrpc": "2.0", "id": sent, "result": True}
        assert c.call("Host.ping") is True
    finally:
        c.close()


def test_events_endpoint_guess():
    assert guess_events_endpoint("tcp://10.0.0.5:5670") == "tcp://10.0.0.5:5671"
    assert guess_events_endpoint("ipc:///run/hostagent/rpc.sock") == \
        "ipc:///run/hostagent/events.sock"
