"""Classes 6 and 7: what a peer can make the agent hold, and running short of descriptors.

Every queue the agent keeps for a peer has a bound (docs/crash-model.md, "Bounds"), and each
test here pushes one past it from outside and checks the agent's memory (RSS, read with
psutil) stays far below what the same traffic cost before the bound existed, while a
well-behaved client is served throughout. The sizes are set by --hostile-scale."""

import json
import socket

import psutil
import pytest
import zmq

from agent.client import CallError
from tests.support.harness import wait_for

pytestmark = pytest.mark.timeout(300)

MiB = 1 << 20


def rss(agent) -> int:
    return psutil.Process(agent.pid).memory_info().rss


def dealer(agent, endpoint=None):
    sock = agent.ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint or agent.rpc_endpoint)
    agent.clients.append(sock)
    return sock


def request(method, params=None, id_=1) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "method": method, "params": params or {},
                       "id": id_}).encode()


def retained_tasks(agent, n, window=200):
    """n finished tasks in the table, so that Task.getAll answers n records (~1 MB per 4,000).
    At most `window` in flight: a client with more than [rpc] max_queued_replies unread may
    lose replies, by design."""
    sock = dealer(agent)
    for start in range(0, n, window):
        count = min(window, n - start)
        for i in range(start, start + count):
            sock.send(request("Host.ping", None, f"p{i}"))
        for _ in range(count):
            assert sock.poll(30000)
            sock.recv()


def test_a_message_of_many_frames_is_dropped_not_kept(make_agent, scale):
    agent = make_agent(rpc={"endpoints": ["ipc://{run_dir}/rpc.sock"],
                            "max_message_bytes": MiB})
    before = rss(agent)
    sock = dealer(agent)
    big = b"x" * (MiB - 1)
    for i in range(20 * scale):  # each: 32 frames of 1 MiB, then a request that would live
        sock.send_multipart([big] * 32 + [request("Debug.sleep", {"seconds": 30}, i)])
    wait_for(lambda: agent.call("Host.getStats")["limits"]["rpc"]["messages_dropped"]
             == 20 * scale, 60, interval=0.1)
    assert not [t for t in agent.call("Task.getAll") if t["method"] == "Debug.sleep"]
    grew = rss(agent) - before
    # libzmq holds a multipart message whole until its last frame is in (ZMQ_MAXMSGSIZE
    # bounds frames, nothing bounds their count), so a few in flight are counted here; kept
    # as routes, as before the bound, they were all of it.
    assert grew < 128 * MiB, f"grew {grew >> 20} MiB for {20 * scale * 32} MiB of frames"
    # A REQ-shaped and a proxied (two identities) request still work.
    assert not sock.poll(100)
    sock.send_multipart([b"", request("Host.ping", None, "req")])
    assert sock.poll(5000) and json.loads(sock.recv_multipart()[-1])["result"] is True


def test_a_subscriber_that_never_reads_holds_no_large_results(make_agent, scale):
    agent = make_agent()
    retained_tasks(agent, 4000)
    stuck = agent.ctx.socket(zmq.SUB)
    stuck.setsockopt(zmq.RCVHWM, 1)  # and then never reads
    stuck.setsockopt(zmq.RCVBUF, 4096)
    stuck.setsockopt_string(zmq.SUBSCRIBE, "")
    stuck.connect(agent.events_endpoint)
    agent.clients.append(stuck)
    watcher = agent.subscribe("Task.state")
    wait_for(lambda: agent.call("Host.ping") and watcher.poll(10), 10)
    before = rss(agent)
    sock = dealer(agent)
    n = 100 * scale
    for i in range(n):  # each answer ~1 MB; before the bound, each event carried it too
        sock.send(request("Task.getAll", None, f"g{i}"))
        assert sock.poll(30000)
        sock.recv()
    grew = rss(agent) - before
    assert grew < 64 * MiB, f"grew {grew >> 20} MiB publishing {n} Task.getAll ends"
    while watcher.poll(1000):
        ev = json.loads(watcher.recv_multipart()[-1])["params"]["task"]
        if ev["method"] == "Task.getAll" and ev["state"] == "done":
            assert ev["result"] is None and ev["result_omitted"] is True
            break
    else:
        pytest.fail("no Task.state of a Task.getAll seen")


def test_a_reply_larger_than_the_unread_bound_reaches_a_client_that_reads(make_agent):
    """The bound holds back a client's next reply while earlier ones are unread; a client
    with nothing unread gets even a reply larger than the bound, every time."""
    agent = make_agent(rpc={"max_unread_reply_bytes": 64 * 1024})
    retained_tasks(agent, 1000)  # Task.getAll: ~250 KB
    reader = agent.client(timeout=30)
    for _ in range(3):
        assert len(reader.call("Task.getAll")) >= 1000
    assert agent.call("Host.getStats")["limits"]["rpc"]["replies_refused"] == 0


def test_unread_replies_are_bounded_and_readers_still_served(make_agent, scale):
    agent = make_agent(rpc={"endpoints": ["ipc://{run_dir}/rpc.sock"],
                            "max_unread_reply_bytes": 16 * MiB})
    retained_tasks(agent, 4000)
    before = rss(agent)
    hogs = []
    for h in range(4):
        hog = dealer(agent)
        hog.setsockopt(zmq.RCVHWM, 1)
        hog.setsockopt(zmq.RCVBUF, 4096)
        for i in range(100 * scale):  # ~1 MB answers, never read
            hog.send(request("Task.getAll", None, f"h{h}-{i}"))
        hogs.append(hog)
    wait_for(lambda: agent.call("Host.getStats")["limits"]["rpc"]["replies_refused"] > 0, 60)
    # The hogs are at their bounds; a client that reads still gets its large answers.
    reader = agent.client(timeout=60)
    for _ in range(3):
        assert len(reader.call("Task.getAll")) >= 4000
    grew = rss(agent) - before
    # 4 hogs: at most 4 x 16 MiB of large replies, plus small ones; before the bound it was
    # 400 x ~1 MB each.
    assert grew < 160 * MiB, f"grew {grew >> 20} MiB"
    for hog in hogs:
        hog.close(0)
        agent.clients.remove(hog)
    # The requests they sent before leaving are still served (about 20 ms each here), and
    # each answer finds its client gone: wait for that work too.
    wait_for(lambda: agent.call("Host.getStats")["limits"]["rpc"]["unread_reply_bytes"] == 0,
             30 + 20 * scale, interval=0.1, what="the hogs' queued replies freed once they left")


def test_running_short_of_descriptors_refuses_peers_and_stays_up(make_agent, scale):
    """Under `ulimit -n 64` (this machine lets no process raise a hard limit), peers that
    keep coming: the agent stops taking new ones before libzmq could run out, serves the
    ones it has, refuses workers by name while short, and takes peers again once they go.
    (A same-machine burst of connects can outrun the loop: docs/reliability.md.)"""
    agent = make_agent(rpc={"endpoints": ["ipc://{run_dir}/rpc.sock", "tcp://127.0.0.1:*"]},
                       start=False)
    agent.start(nofile=(64, 64))
    first = agent.client(timeout=30)
    assert first.call("Host.ping") is True
    tcp = json.loads((agent.run_dir / "endpoints.json").read_text())["rpc"][1]
    crowd, refused = [], 0
    for i in range(100 * scale):  # one at a time, each with a request
        sock = dealer(agent, agent.rpc_endpoint if i % 2 else tcp)
        crowd.append(sock)
        sock.send(request("Host.ping", None, i))
        if not sock.poll(300):
            refused += 1
        assert agent.proc.poll() is None, agent.log()
    assert refused > 0
    limits = first.call("Host.getStats")["limits"]["descriptors"]
    assert limits["pauses"] >= 1 and not limits["listening"], limits
    # Connected peers are served; work in a worker is refused by name while short.
    assert first.call("Host.ping") is True
    with pytest.raises(CallError) as exc:
        first.call("Debug.sleep", {"seconds": 0})
    assert exc.value.name == "ResourceExhausted" and exc.value.data["reason"] == "descriptors"
    for sock in crowd:
        sock.close(0)
        agent.clients.remove(sock)
    # Once the crowd has gone, new peers get in again, and work runs.
    wait_for(lambda: first.call("Host.getStats")["limits"]["descriptors"]["listening"], 30,
             interval=0.1)
    late = agent.client(timeout=30)
    assert late.call("Host.ping") is True
    assert late.call("Debug.sleep", {"seconds": 0}) == {"slept": 0}
    assert agent.proc.poll() is None


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one(make_agent):
    agent = make_agent(start=False)
    agent.start(nofile=(64, 4096))
    assert agent.call("Host.getStats")["limits"]["descriptors"]["limit"] == 4096
    crowd = [dealer(agent) for _ in range(200)]
    for i, sock in enumerate(crowd):
        sock.send(request("Host.ping", None, i))
    for sock in crowd:
        assert sock.poll(20000), agent.log()
        assert json.loads(sock.recv())["result"] is True


def test_a_batch_answer_is_bounded_by_the_message_limit(make_agent):
    """A batch of 1,000 Task.getAll (4,000 tasks retained: ~1 MB each) would be a 1 GB
    answer held at once; its answers stay within max_message_bytes, the rest are refused
    by name, and every member is answered."""
    agent = make_agent(rpc={"endpoints": ["ipc://{run_dir}/rpc.sock"],
                            "max_message_bytes": 8 * MiB})
    retained_tasks(agent, 4000)
    before = rss(agent)
    sock = dealer(agent)
    sock.send(json.dumps([{"jsonrpc": "2.0", "method": "Task.getAll", "id": i}
                          for i in range(1000)]).encode())
    assert sock.poll(120000)
    body = sock.recv()
    answers = json.loads(body)
    assert len(body) <= 8 * MiB and len(answers) == 1000
    full = [a for a in answers if "result" in a]
    refused = [a for a in answers if "error" in a]
    assert full and refused
    assert {a["error"]["data"]["reason"] for a in refused} == {"batch-too-large"}
    assert rss(agent) - before < 128 * MiB


def test_an_unknown_methods_name_is_not_echoed_in_full(agent):
    sock = dealer(agent)
    sock.send(json.dumps({"jsonrpc": "2.0", "method": "x" * (4 * MiB), "id": 1}).encode())
    assert sock.poll(10000)
    body = sock.recv()
    answer = json.loads(body)
    assert answer["error"]["code"] == -32601 and len(body) < 2048


def test_listening_resumes_even_after_a_port_was_taken_meanwhile():
    """A pause lets TCP endpoints go; if one is taken while paused, resuming tries again
    later, and binds each endpoint exactly once (not those already bound again)."""
    from types import SimpleNamespace

    from agent.wire import peers

    ctx = zmq.Context()
    sock, thief = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    gate = None
    try:
        a = sock.bind_to_random_port("tcp://127.0.0.1")
        b = sock.bind_to_random_port("tcp://127.0.0.1")
        eps = [f"tcp://127.0.0.1:{a}", f"tcp://127.0.0.1:{b}"]
        logged = []
        gate = peers.Gate(SimpleNamespace(warning=lambda *a, **k: logged.append(a),
                                          info=lambda *a, **k: None,
                                          error=lambda *a, **k: logged.append(a)),
                          limit=1 << 20, clock=lambda: 0.0)
        gate.watch(sock, eps)
        gate._pause()

        def taken():  # unbind is asynchronous in libzmq: the port is free a moment later
            try:
                thief.bind(eps[1])
                return True
            except zmq.ZMQError:
                return False
        wait_for(taken, 10, what="the paused port to be free for another socket")
        gate._resume()
        assert gate.paused and ("rebind_failed",) in logged
        thief.unbind(eps[1])

        def resumed():
            gate._resume()
            return not gate.paused
        wait_for(resumed, 10, what="listening again once the port is free")
        assert gate._unbound == [] and logged.count(("rebind_failed",)) >= 1
    finally:
        for mon in gate.monitors if gate else ():
            mon.close(0)
        sock.close(0)
        thief.close(0)
        ctx.term()


@pytest.mark.parametrize("which", ["rpc", "events"])
def test_an_endpoint_taken_at_start_up_ends_it_with_one_line_naming_it(make_agent, which):
    """A configured port another process holds: exit 2 with one line naming the endpoint
    and the OS's reason, not a traceback; once it is free, the same agent starts."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        endpoint = f"tcp://127.0.0.1:{holder.getsockname()[1]}"
        agent = make_agent(start=False, **{
            which: {"endpoints": [f"ipc://{{run_dir}}/{which}.sock", endpoint]}})
        agent.start(wait=False)
        assert agent.proc.wait(30) == 2, agent.log()
        out = agent.log()
        assert "Traceback" not in out, out
        lines = [line for line in out.splitlines() if line.startswith("hostagent: ")]
        assert lines == [f"hostagent: cannot bind {endpoint}: Address already in use"], out
    agent.start()
    assert agent.call("Host.ping") is True
